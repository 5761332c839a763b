//! Following the trust the control plane pushes: the local roots, the
//! peered meshes' bundles, the deny-listed intermediates and the binding of
//! identities to clusters, from `strait.mesh.v1.TrustBundle` resources into
//! a [`strait_ca::tls::Trust`] that live connections verify against.

use std::collections::BTreeMap;

use strait_ca::TrustDomain;
use strait_ca::tls::ClusterIdentities;
use strait_proto::strait::mesh::v1 as pb;

/// A SHA-256 fingerprint in `strait_ca`'s form (`AB:CD:…`), from hex
/// with or without colons, any case.
pub fn fingerprint(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let hex = hex.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..32).filter_map(|i| hex.get(i * 2..i * 2 + 2)).collect();
    Some(pairs.join(":"))
}

/// The local trust domain's bundle and the peered ones in pushed bundle
/// resources (unusable ones left out: validation refuses them first).
pub fn trust_bundles(
    bundles: &[pb::TrustBundle],
) -> (
    Option<strait_ca::TrustBundle>,
    BTreeMap<String, strait_ca::TrustBundle>,
) {
    let mut local = None;
    let mut federated = BTreeMap::new();
    for b in bundles {
        let Ok(td) = TrustDomain::new(&b.trust_domain) else {
            continue;
        };
        let pem = b.roots_pem.join("\n");
        let Ok(bundle) = strait_ca::TrustBundle::from_pem(pem.as_bytes(), Some(td)) else {
            continue;
        };
        if b.local {
            local = Some(bundle);
        } else {
            federated.insert(b.trust_domain.clone(), bundle);
        }
    }
    (local, federated)
}

/// Deny-listed intermediates across pushed bundles, as `strait_ca`
/// fingerprints.
pub fn denied(bundles: &[pb::TrustBundle]) -> Vec<String> {
    bundles
        .iter()
        .flat_map(|b| b.denied_intermediates.iter().filter_map(|d| fingerprint(d)))
        .collect()
}

/// What each cluster runs, when the local bundle binds identities to
/// clusters (`None` when it does not, or no local bundle is pushed).
pub fn cluster_identities(bundles: &[pb::TrustBundle]) -> Option<ClusterIdentities> {
    let local = bundles.iter().find(|b| b.local && b.bind_identities)?;
    Some(
        local
            .cluster_identities
            .iter()
            .map(|(c, s)| (c.clone(), s.names.iter().cloned().collect()))
            .collect(),
    )
}

/// Sets `trust` to what pushed bundles say: the local roots (kept when no
/// local bundle is pushed), the peered meshes' bundles, the deny-list and
/// the binding of identities to clusters.
pub fn apply_trust(trust: &strait_ca::tls::Trust, bundles: &[pb::TrustBundle]) {
    let (local, federated) = trust_bundles(bundles);
    if let Some(b) = local {
        trust.set_bundle(b);
    }
    trust.set_federated(federated);
    trust.set_denied(denied(bundles));
    trust.set_cluster_identities(cluster_identities(bundles));
}
