//! The reconciliation rules, driven directly: revisions, resync, removal,
//! ownership, export-to filtering.

use super::*;
use strait_ca::TrustDomain;
use strait_model::mesh::{ExportTarget, ExportTo, Network, Protocol, ServicePort};

fn name(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

fn info(n: &str, net: &str) -> ClusterInfo {
    ClusterInfo {
        name: name(n),
        network: Network::new(net).unwrap(),
        locality: None,
        gateways: vec![],
        trust_domain: TrustDomain::new("td").unwrap(),
    }
}

fn key(ns: &str, n: &str) -> ServiceKey {
    ServiceKey::new(ns, n).unwrap()
}

fn svc(ns: &str, n: &str) -> ExportedService {
    ExportedService::new(
        key(ns, n),
        vec![ServicePort::new("http", 8080, Protocol::Http, None).unwrap()],
    )
}

fn svc_to(ns: &str, n: &str, to: &[&str]) -> ExportedService {
    let mut s = svc(ns, n);
    s.export_to = ExportTo::only(to.iter().map(|t| ExportTarget::parse(t).unwrap()));
    s
}

/// A mesh with the given clusters joined.
fn mesh(names: &[&str]) -> Mesh {
    let mut m = Mesh::new(BTreeMap::new(), 0);
    for n in names {
        let p = m.plan_join(info(n, &format!("net-{n}")));
        m.apply(p);
    }
    m
}

fn run(m: &mut Mesh, cluster: &str, change: ExportsChange) -> Result<Plan, SyncError> {
    let p = m.plan_exports(&name(cluster), change)?;
    m.apply(p.clone());
    Ok(p)
}

fn snap(rev: u64, services: Vec<ExportedService>) -> ExportsChange {
    ExportsChange::Snapshot {
        revision: rev,
        services,
    }
}

fn delta(base: u64, rev: u64, up: Vec<ExportedService>, rm: Vec<ServiceKey>) -> ExportsChange {
    ExportsChange::Delta {
        base,
        revision: rev,
        upserts: up,
        removals: rm,
    }
}

#[test]
fn exports_reach_every_other_cluster_but_not_the_exporter() {
    let mut m = mesh(&["east", "west", "central"]);
    run(&mut m, "east", snap(1, vec![svc("shop", "cart")])).unwrap();
    for importer in ["west", "central"] {
        let imports = m.imports_for(&name(importer));
        let remotes = &imports[&key("shop", "cart")];
        assert_eq!(remotes.len(), 1);
        assert_eq!(remotes[0].from.name.as_str(), "east");
    }
    assert!(m.imports_for(&name("east")).is_empty());
}

#[test]
fn namespace_sameness_merges_exporters_sorted() {
    let mut m = mesh(&["east", "west", "central"]);
    run(&mut m, "west", snap(1, vec![svc("shop", "cart")])).unwrap();
    run(&mut m, "east", snap(1, vec![svc("shop", "cart")])).unwrap();
    let imports = m.imports_for(&name("central"));
    let from: Vec<_> = imports[&key("shop", "cart")]
        .iter()
        .map(|r| r.from.name.to_string())
        .collect();
    assert_eq!(from, ["east", "west"]);
}

#[test]
fn export_to_filters_importers() {
    let mut m = mesh(&["east", "west", "central"]);
    run(
        &mut m,
        "east",
        snap(1, vec![svc_to("shop", "cart", &["west"])]),
    )
    .unwrap();
    assert_eq!(m.imports_for(&name("west")).len(), 1);
    assert!(m.imports_for(&name("central")).is_empty());
    // Only a peered mesh: no cluster of the own mesh imports it.
    run(
        &mut m,
        "east",
        snap(2, vec![svc_to("shop", "cart", &["mesh:partner"])]),
    )
    .unwrap();
    assert!(m.imports_for(&name("west")).is_empty());
}

#[test]
fn revisions_bump_only_on_change() {
    let mut m = mesh(&["east", "west"]);
    let r0 = m.revision();
    run(&mut m, "east", snap(1, vec![svc("shop", "cart")])).unwrap();
    assert_eq!(m.revision(), r0 + 1);
    // The same snapshot again: the cluster revision moves, the mesh's not.
    let p = run(&mut m, "east", snap(2, vec![svc("shop", "cart")])).unwrap();
    assert!(p.changed.is_empty());
    assert_eq!(m.revision(), r0 + 1);
    assert_eq!(m.cluster(&name("east")).unwrap().export_revision, 2);
}

#[test]
fn deltas_need_the_right_base() {
    let mut m = mesh(&["east", "west"]);
    run(&mut m, "east", snap(5, vec![svc("shop", "cart")])).unwrap();
    let err = run(
        &mut m,
        "east",
        delta(4, 6, vec![svc("shop", "pay")], vec![]),
    )
    .unwrap_err();
    assert_eq!(err, SyncError::BaseMismatch { have: 5, base: 4 });
    let err = run(&mut m, "east", delta(5, 5, vec![], vec![])).unwrap_err();
    assert_eq!(
        err,
        SyncError::NotNewer {
            base: 5,
            revision: 5
        }
    );
    run(
        &mut m,
        "east",
        delta(5, 6, vec![svc("shop", "pay")], vec![key("shop", "cart")]),
    )
    .unwrap();
    let keys: Vec<_> = m.imports_for(&name("west")).into_keys().collect();
    assert_eq!(keys, [key("shop", "pay")]);
    // Nothing of a refused update is applied.
    let before = m.cluster(&name("east")).unwrap().clone();
    let dup = delta(6, 7, vec![svc("shop", "x")], vec![key("shop", "x")]);
    assert!(matches!(
        run(&mut m, "east", dup),
        Err(SyncError::Duplicate(_))
    ));
    assert_eq!(m.cluster(&name("east")).unwrap(), &before);
    let dup = snap(8, vec![svc("shop", "x"), svc("shop", "x")]);
    assert!(matches!(
        run(&mut m, "east", dup),
        Err(SyncError::Duplicate(_))
    ));
    assert_eq!(
        run(&mut m, "east", snap(0, vec![])),
        Err(SyncError::ZeroRevision)
    );
}

#[test]
fn a_snapshot_replaces_everything_even_after_a_cluster_restart() {
    let mut m = mesh(&["east", "west"]);
    run(
        &mut m,
        "east",
        snap(40, vec![svc("shop", "cart"), svc("shop", "pay")]),
    )
    .unwrap();
    // The cluster lost its counter: revision 1 snapshot is still taken.
    run(&mut m, "east", snap(1, vec![svc("shop", "pay")])).unwrap();
    let keys: Vec<_> = m.imports_for(&name("west")).into_keys().collect();
    assert_eq!(keys, [key("shop", "pay")]);
}

#[test]
fn ownership_a_cluster_only_touches_its_own_exports() {
    let mut m = mesh(&["east", "west", "central"]);
    run(&mut m, "east", snap(1, vec![svc("shop", "cart")])).unwrap();
    // west "removes" east's service and "exports" the same key itself.
    run(&mut m, "west", snap(1, vec![])).unwrap();
    run(
        &mut m,
        "west",
        delta(1, 2, vec![], vec![key("shop", "cart")]),
    )
    .unwrap();
    let imports = m.imports_for(&name("central"));
    assert_eq!(imports[&key("shop", "cart")][0].from.name.as_str(), "east");
    // An unknown cluster cannot publish at all.
    assert_eq!(
        m.plan_exports(&name("ghost"), snap(1, vec![svc("shop", "cart")])),
        Err(SyncError::UnknownCluster("ghost".into()))
    );
}

#[test]
fn removal_and_revocation_remove_imports() {
    let mut m = mesh(&["east", "west"]);
    run(&mut m, "east", snap(1, vec![svc("shop", "cart")])).unwrap();
    let seen = m.revision();
    run(
        &mut m,
        "east",
        delta(1, 2, vec![], vec![key("shop", "cart")]),
    )
    .unwrap();
    let u = m.import_update(&name("west"), seen, true);
    assert!(!u.snapshot);
    assert!(u.upserts.is_empty());
    assert_eq!(u.removals, [key("shop", "cart")].into());

    run(&mut m, "east", snap(3, vec![svc("shop", "cart")])).unwrap();
    let seen = m.revision();
    let p = m.plan_remove(&name("east")).unwrap();
    m.apply(p);
    let u = m.import_update(&name("west"), seen, true);
    assert_eq!(u.removals, [key("shop", "cart")].into());
    assert!(m.cluster(&name("east")).is_none());
}

#[test]
fn resume_gets_a_delta_of_only_what_changed() {
    let mut m = mesh(&["east", "west"]);
    run(
        &mut m,
        "east",
        snap(1, vec![svc("shop", "cart"), svc("shop", "pay")]),
    )
    .unwrap();
    let seen = m.revision();
    run(
        &mut m,
        "east",
        delta(1, 2, vec![svc_to("shop", "pay", &["west"])], vec![]),
    )
    .unwrap();
    let u = m.import_update(&name("west"), seen, true);
    assert!(!u.snapshot);
    assert_eq!(
        u.upserts.keys().cloned().collect::<Vec<_>>(),
        [key("shop", "pay")]
    );
    assert_eq!(u.revision, m.revision());
    // Up to date: nothing to send.
    assert!(
        m.import_update(&name("west"), m.revision(), true)
            .is_empty()
    );
}

#[test]
fn unknown_or_old_revisions_get_a_snapshot() {
    let mut m = mesh(&["east", "west"]).with_log_capacity(2);
    run(&mut m, "east", snap(1, vec![svc("shop", "a")])).unwrap();
    let old = m.revision();
    for (i, n) in ["b", "c", "d"].iter().enumerate() {
        let rev = i as u64 + 2;
        run(
            &mut m,
            "east",
            delta(rev - 1, rev, vec![svc("shop", n)], vec![]),
        )
        .unwrap();
    }
    // The log only holds the last two changes: `old` is too old.
    let u = m.import_update(&name("west"), old, true);
    assert!(u.snapshot);
    assert_eq!(u.upserts.len(), 4);
    // A revision from the future, another epoch, or none: snapshot.
    assert!(
        m.import_update(&name("west"), m.revision() + 5, true)
            .snapshot
    );
    assert!(m.import_update(&name("west"), m.revision(), false).snapshot);
    assert!(m.import_update(&name("west"), 0, true).snapshot);
    // A mesh loaded from the store starts with an empty log.
    let loaded = Mesh::new(
        m.clusters().map(|(k, v)| (k.clone(), v.clone())).collect(),
        m.revision(),
    );
    assert!(
        loaded
            .import_update(&name("west"), m.revision() - 1, true)
            .snapshot
    );
    assert!(
        loaded
            .import_update(&name("west"), m.revision(), true)
            .is_empty()
    );
}

#[test]
fn gateway_changes_reach_importers() {
    let mut m = mesh(&["east", "west"]);
    run(&mut m, "east", snap(1, vec![svc("shop", "cart")])).unwrap();
    let seen = m.revision();
    let mut new_info = info("east", "net-east");
    new_info.gateways = vec![strait_model::mesh::GatewayAddress::parse("127.0.0.1:15443").unwrap()];
    let p = m.plan_info(&name("east"), new_info).unwrap();
    assert_eq!(p.changed, [key("shop", "cart")].into());
    m.apply(p);
    let u = m.import_update(&name("west"), seen, true);
    assert_eq!(u.upserts[&key("shop", "cart")][0].from.gateways.len(), 1);
}

#[test]
fn export_diff_lists_rows_to_write() {
    let mut m = mesh(&["east"]);
    run(
        &mut m,
        "east",
        snap(1, vec![svc("shop", "a"), svc("shop", "b")]),
    )
    .unwrap();
    let before = m.cluster(&name("east")).cloned();
    let p = m
        .plan_exports(
            &name("east"),
            delta(
                1,
                2,
                vec![svc_to("shop", "a", &["west"])],
                vec![key("shop", "b")],
            ),
        )
        .unwrap();
    let (up, rm) = p.export_diff(before.as_ref());
    assert_eq!(up.len(), 1);
    assert_eq!(rm, [key("shop", "b")]);
}

#[test]
fn peered_services_reach_every_cluster_and_only_mesh_targets_leave() {
    let mut m = mesh(&["east", "west"]);
    run(
        &mut m,
        "east",
        snap(
            1,
            vec![
                svc_to("shop", "cart", &["mesh:partner"]),
                svc("shop", "own"),
            ],
        ),
    )
    .unwrap();
    let out: Vec<_> = m
        .exports_to_mesh("partner")
        .iter()
        .map(|r| r.service.key.clone())
        .collect();
    assert_eq!(out, [key("shop", "cart")]);
    assert!(m.exports_to_mesh("other").is_empty());

    let mut foreign = info("north", "net-north");
    foreign.trust_domain = TrustDomain::new("partner.example").unwrap();
    let remote = RemoteService {
        from: foreign,
        service: svc("bank", "ledger"),
    };
    let seen = m.revision();
    let p = m.plan_peer("partner", vec![remote.clone()]);
    assert_eq!(p.changed, [key("bank", "ledger")].into());
    m.apply_peer(p);
    for c in ["east", "west"] {
        let imports = m.imports_for(&name(c));
        assert_eq!(
            imports[&key("bank", "ledger")][0]
                .from
                .trust_domain
                .as_str(),
            "partner.example"
        );
    }
    let u = m.import_update(&name("west"), seen, true);
    assert_eq!(u.upserts.len(), 1);
    // The same snapshot again changes nothing; an empty one removes it.
    assert!(m.plan_peer("partner", vec![remote]).changed.is_empty());
    let seen = m.revision();
    let p = m.plan_peer("partner", vec![]);
    m.apply_peer(p);
    assert_eq!(
        m.import_update(&name("west"), seen, true).removals,
        [key("bank", "ledger")].into()
    );
}

fn healthy_svc(ns: &str, n: &str, healthy: u32) -> ExportedService {
    let mut s = svc(ns, n);
    s.endpoints = vec![strait_model::mesh::LocalityEndpoints {
        locality: None,
        healthy,
        total: 3,
    }];
    s.addresses = vec!["10.0.0.7".into()];
    s
}

#[test]
fn a_withdrawn_cluster_is_imported_with_no_healthy_endpoints_and_restored() {
    let mut m = mesh(&["east", "west", "north"]);
    run(
        &mut m,
        "west",
        snap(1, vec![healthy_svc("shop", "cart", 2)]),
    )
    .unwrap();
    run(
        &mut m,
        "north",
        snap(1, vec![healthy_svc("shop", "cart", 1)]),
    )
    .unwrap();
    let seen = m.revision();

    let p = m.plan_withdrawn(&name("west"), true).unwrap();
    assert_eq!(p.changed, [key("shop", "cart")].into());
    assert_eq!(p.mesh_revision, seen + 1);
    m.apply(p);
    // east gets a delta in which west's endpoints are all unhealthy, with
    // no addresses, and north's untouched.
    let u = m.import_update(&name("east"), seen, true);
    assert!(!u.snapshot);
    let remotes = &u.upserts[&key("shop", "cart")];
    assert_eq!(remotes.len(), 2);
    let (west, north) = (&remotes[1], &remotes[0]);
    assert_eq!(west.from.name, name("west"));
    assert_eq!(west.service.healthy(), 0);
    assert_eq!(west.service.endpoints[0].total, 3, "totals stay visible");
    assert!(west.service.addresses.is_empty());
    assert_eq!(north.service.healthy(), 1);
    assert_eq!(north.service.addresses, ["10.0.0.7"]);
    // The cluster's own exports are kept as published, for its return.
    assert_eq!(
        m.cluster(&name("west")).unwrap().exports[&key("shop", "cart")].healthy(),
        2
    );

    // Updates while withdrawn are kept, still withdrawn.
    run(
        &mut m,
        "west",
        delta(1, 2, vec![healthy_svc("shop", "cart", 3)], vec![]),
    )
    .unwrap();
    assert_eq!(
        m.remotes_for(&name("east"), &key("shop", "cart"))[1]
            .service
            .healthy(),
        0
    );
    // Withdrawing twice changes nothing.
    let again = m.plan_withdrawn(&name("west"), true).unwrap();
    assert!(again.changed.is_empty());
    assert_eq!(again.mesh_revision, m.revision());

    let seen = m.revision();
    let p = m.plan_withdrawn(&name("west"), false).unwrap();
    m.apply(p);
    let u = m.import_update(&name("east"), seen, true);
    let west = &u.upserts[&key("shop", "cart")][1];
    assert_eq!(west.service.healthy(), 3);
    assert_eq!(west.service.addresses, ["10.0.0.7"]);
    assert_eq!(
        m.plan_withdrawn(&name("nowhere"), true),
        Err(SyncError::UnknownCluster("nowhere".into()))
    );
}

#[test]
fn a_withdrawn_cluster_is_withdrawn_from_peered_meshes_too() {
    let mut m = mesh(&["west"]);
    let mut s = healthy_svc("shop", "cart", 2);
    s.export_to = ExportTo::only([ExportTarget::parse("mesh:other").unwrap()]);
    run(&mut m, "west", snap(1, vec![s])).unwrap();
    assert_eq!(m.exports_to_mesh("other")[0].service.healthy(), 2);
    let p = m.plan_withdrawn(&name("west"), true).unwrap();
    m.apply(p);
    assert_eq!(m.exports_to_mesh("other")[0].service.healthy(), 0);
}

/// A replica that follows another's commits gives importers the same
/// updates the other would: only what changed, not a snapshot.
#[test]
fn a_following_replica_gives_importers_the_same_updates() {
    let mut leader = mesh(&["east", "west", "central"]);
    run(
        &mut leader,
        "east",
        snap(1, vec![svc("shop", "cart"), svc("shop", "pay")]),
    )
    .unwrap();
    let mut follower = leader.clone();
    let since = leader.revision();
    run(
        &mut leader,
        "east",
        delta(
            1,
            2,
            vec![svc_to("shop", "cart", &["west"])],
            vec![key("shop", "pay")],
        ),
    )
    .unwrap();
    let p = leader.plan_join(info("north", "net-north"));
    leader.apply(p);
    follower.follow(
        leader.clusters.clone(),
        leader.peers.clone(),
        leader.revision(),
    );
    assert_eq!(follower.revision(), leader.revision());
    for importer in ["west", "central", "north"] {
        let (f, l) = (
            follower.import_update(&name(importer), since, true),
            leader.import_update(&name(importer), since, true),
        );
        assert!(!f.snapshot, "{importer}: {f:?}");
        assert_eq!(f, l, "{importer}");
    }
    assert!(
        follower
            .import_update(&name("central"), since, true)
            .removals
            .contains(&key("shop", "cart"))
    );
    // Nothing changed: nothing logged, the revision kept.
    let before = follower.revision();
    follower.follow(leader.clusters.clone(), leader.peers.clone(), before);
    assert!(
        follower
            .import_update(&name("west"), before, true)
            .is_empty()
    );
}
