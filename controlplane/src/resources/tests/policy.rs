//! Policies, mesh settings, trust bundles and networks in the snapshot.

use super::*;

#[test]
fn policies_carry_their_spec_and_generation() {
    let (snap, warnings) = run(POLICIES);
    let names: Vec<&String> = snap.resources(type_url::POLICY).unwrap().keys().collect();
    assert_eq!(
        names,
        [
            "DestinationRule/demo/echo",
            "DestinationRule/other/echo-fqdn",
            "DestinationRule/other/unrelated",
            "PeerAuthentication/demo/strict"
        ]
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(
            "c.yaml: VirtualService demo/broken: invalid: spec.http[0].route[0].weight"
        ),
        "{warnings:?}"
    );
    let dr: pb::Policy = decode(&snap, type_url::POLICY, "DestinationRule/demo/echo");
    assert_eq!(dr.generation, 7);
    let spec: Value = serde_json::from_str(&dr.spec_json).unwrap();
    assert_eq!(spec["host"], "echo");
    let pa: pb::Policy = decode(&snap, type_url::POLICY, "PeerAuthentication/demo/strict");
    assert_eq!(
        pa.generation,
        strait_model::names::fnv1a64(pa.spec_json.as_bytes())
    );
}

#[test]
fn mesh_settings_carry_the_path_normalization() {
    use pb::mesh_settings::PathNormalization as W;
    let (snap, _) = run(ECHO);
    assert_eq!(snap.resources(type_url::MESH_SETTINGS).unwrap().len(), 1);
    let m: pb::MeshSettings = decode(&snap, type_url::MESH_SETTINGS, "mesh");
    assert_eq!(m.path_normalization(), W::Base);
    for (mode, wire) in [
        (PathNormalization::None, W::None),
        (PathNormalization::MergeSlashes, W::MergeSlashes),
        (
            PathNormalization::DecodeAndMergeSlashes,
            W::DecodeAndMergeSlashes,
        ),
    ] {
        let ctx = ClusterContext {
            path_normalization: mode,
            ..ctx()
        };
        let (snap, _) = build(&ctx, &config(ECHO), &TrustInput::default(), &[]);
        let m: pb::MeshSettings = decode(&snap, type_url::MESH_SETTINGS, "mesh");
        assert_eq!(m.path_normalization(), wire, "{mode}");
    }
}

#[test]
fn trust_bundles_and_networks() {
    let trust = TrustInput {
        local_roots_pem: vec!["LOCAL".into()],
        federated: BTreeMap::from([
            ("partner.example".to_string(), vec!["PARTNER".to_string()]),
            ("cluster.local".to_string(), vec!["SELF".to_string()]),
        ]),
        denied_intermediates: BTreeSet::from(["ab12".to_string()]),
        cluster_identities: Some(BTreeMap::from([(
            "west".to_string(),
            BTreeSet::from(["demo/client".to_string()]),
        )])),
    };
    let (snap, warnings) = build(
        &ctx(),
        &Config::default(),
        &trust,
        &[NetworkInput {
            name: "net-west".into(),
            gateways: vec!["gw.west:15443".into()],
            ..Default::default()
        }],
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let local: pb::TrustBundle = decode(&snap, type_url::TRUST_BUNDLE, "cluster.local");
    assert!(local.local);
    assert_eq!(local.roots_pem, ["LOCAL"]);
    assert_eq!(local.denied_intermediates, ["ab12"]);
    assert!(local.bind_identities);
    assert_eq!(local.cluster_identities["west"].names, ["demo/client"]);
    let partner: pb::TrustBundle = decode(&snap, type_url::TRUST_BUNDLE, "partner.example");
    assert!(!partner.local);
    assert!(!partner.bind_identities && partner.cluster_identities.is_empty());
    assert_eq!(partner.denied_intermediates, ["ab12"]);
    let n: pb::Network = decode(&snap, type_url::NETWORK, "net-west");
    assert_eq!(
        (n.mode, n.gateways.as_slice()),
        (
            pb::network::Mode::Sni as i32,
            ["gw.west:15443".to_string()].as_slice()
        )
    );
}

#[test]
fn a_policy_without_spec_is_served_as_an_empty_spec() {
    // Istio's allow-nothing: an AuthorizationPolicy with no spec selects
    // every workload of its namespace and, having no rules, allows nothing.
    // Dropping it (as an invalid object) would open what it closes.
    let (snap, warnings) = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: demo}
"#);
    assert!(warnings.is_empty(), "{warnings:?}");
    let ap: pb::Policy = decode(
        &snap,
        type_url::POLICY,
        "AuthorizationPolicy/demo/allow-nothing",
    );
    assert_eq!(ap.spec_json, "{}");
    assert!(matches!(
        strait_model::istio::parse("AuthorizationPolicy", &serde_json::from_str(&ap.spec_json).unwrap()),
        Ok(strait_model::istio::IstioSpec::AuthorizationPolicy(p)) if p.rules.is_empty()
    ));
}
