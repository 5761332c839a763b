//! The Sync protocol state machine driven without sockets: what the cluster
//! sends and publishes for each broker message and export change.

use super::*;

fn service_pb(name: &str, port: u32) -> pb::ExportedService {
    pb::ExportedService {
        namespace: "shop".into(),
        name: name.into(),
        ports: vec![pb::ServicePort {
            name: "http".into(),
            number: port,
            protocol: "HTTP".into(),
            target_port: 0,
        }],
        ..Default::default()
    }
}

/// Exports of the services `(name, port)`.
fn exports(services: &[(&str, u32)]) -> Exports {
    services
        .iter()
        .map(|(n, p)| {
            let s = wire::exported_service(&service_pb(n, *p)).unwrap();
            (s.key.clone(), s)
        })
        .collect()
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("shop", name).unwrap()
}

/// The exports update in `step`, which must send exactly one.
fn exports_update(step: &Step) -> &pb::ExportsUpdate {
    match step.send.as_slice() {
        [Msg::Exports(u)] => u,
        other => panic!("expected one ExportsUpdate, got {other:?}"),
    }
}

fn names(services: &[pb::ExportedService]) -> Vec<&str> {
    services.iter().map(|s| s.name.as_str()).collect()
}

fn removed(u: &pb::ExportsUpdate) -> Vec<&str> {
    u.removals.iter().map(|r| r.name.as_str()).collect()
}

fn ack_of(step: &Step) -> &pb::Ack {
    match step.send.as_slice() {
        [Msg::Ack(a)] => a,
        other => panic!("expected one Ack, got {other:?}"),
    }
}

/// An imports update from the broker importing `services` from `east`.
fn imports_pb(revision: u64, snapshot: bool, services: &[&str], removals: &[&str]) -> ImportsDelta {
    let remote = |name: &str| pb::RemoteService {
        cluster: "east".into(),
        trust_domain: "td".into(),
        cluster_info: Some(pb::ClusterInfo {
            network: "net1".into(),
            ..Default::default()
        }),
        service: Some(service_pb(name, 80)),
    };
    ImportsDelta::decode(&pb::ImportsUpdate {
        revision,
        epoch: "e1".into(),
        snapshot,
        upserts: services
            .iter()
            .map(|n| pb::ImportedService {
                namespace: "shop".into(),
                name: (*n).into(),
                remotes: vec![remote(n)],
            })
            .collect(),
        removals: removals
            .iter()
            .map(|n| pb::ServiceRef {
                namespace: "shop".into(),
                name: (*n).into(),
            })
            .collect(),
    })
    .unwrap()
}

fn imported(imports: &Imports) -> Vec<&str> {
    imports.services.keys().map(|k| k.name()).collect()
}

/// A state whose first stream sent `initial` as revision 1 and had it
/// acknowledged.
fn synced_with(initial: &Exports, imports: &mut Imports) -> SyncState {
    let mut s = SyncState::default();
    s.welcome(0, || initial.clone());
    s.exports_ack(&pb::ExportsAck { revision: 1 }, imports);
    s
}

#[test]
fn the_first_stream_sends_a_snapshot_above_the_brokers_revision() {
    let mut s = SyncState::default();
    let imports = Imports::default();
    let hello = s.hello(&imports, pb::ClusterInfo::default());
    assert_eq!(
        (
            hello.export_revision,
            hello.import_revision,
            hello.bundle_version
        ),
        (0, 0, 0)
    );
    // The broker remembers revision 7 from an earlier life of this cluster.
    let step = s.welcome(7, || exports(&[("cart", 80), ("pay", 80)]));
    let u = exports_update(&step);
    assert!(u.snapshot);
    assert_eq!(u.revision, 8);
    assert_eq!(names(&u.upserts), ["cart", "pay"]);
    assert!(!step.synced && !step.publish);
    assert_eq!(s.revision(), 8);
}

#[test]
fn an_acknowledged_snapshot_then_a_delta_of_only_what_changed() {
    let mut imports = Imports::default();
    let mut s = SyncState::default();
    s.welcome(0, || exports(&[("cart", 80), ("pay", 80)]));
    let step = s.exports_ack(&pb::ExportsAck { revision: 1 }, &mut imports);
    assert!(step.synced && step.publish && step.send.is_empty());
    assert!(imports.exports_acked);

    // pay changes its port, cart goes, search comes.
    let now = exports(&[("pay", 81), ("search", 80)]);
    let step = s.exports_changed(&now, &mut imports);
    let u = exports_update(&step);
    assert!(!u.snapshot);
    assert_eq!((u.base_revision, u.revision), (1, 2));
    assert_eq!(names(&u.upserts), ["pay", "search"]);
    assert_eq!(removed(u), ["cart"]);
    assert!(step.publish && !imports.exports_acked);

    // The same exports again: nothing to send, nothing to publish.
    let step = s.exports_changed(&now, &mut imports);
    assert_eq!(step, Step::default());
}

#[test]
fn a_stale_or_duplicate_ack_does_not_count_as_the_current_exports() {
    let mut imports = Imports::default();
    let mut s = synced_with(&exports(&[("cart", 80)]), &mut imports);
    s.exports_changed(&exports(&[("cart", 81)]), &mut imports);
    s.exports_changed(&exports(&[("cart", 82)]), &mut imports);
    assert_eq!(s.revision(), 3);

    // Revision 2 acknowledged: still behind.
    s.exports_ack(&pb::ExportsAck { revision: 2 }, &mut imports);
    assert!(!imports.exports_acked);
    // The duplicate of the first ack changes nothing.
    s.exports_ack(&pb::ExportsAck { revision: 1 }, &mut imports);
    assert!(!imports.exports_acked);
    assert_eq!(s.acked.as_ref().map(|(r, _)| *r), Some(2));
    s.exports_ack(&pb::ExportsAck { revision: 3 }, &mut imports);
    assert!(imports.exports_acked);
    assert_eq!(s.acked, Some((3, exports(&[("cart", 82)]))));
    assert!(s.in_flight.is_empty());
}

#[test]
fn a_reconnect_to_a_broker_holding_the_acked_revision_sends_nothing() {
    let mut imports = Imports::default();
    let acked = exports(&[("cart", 80)]);
    let mut s = synced_with(&acked, &mut imports);
    let step = s.welcome(1, || panic!("in sync: the current exports are not read"));
    assert!(step.synced && step.send.is_empty());
    // A change made while disconnected is a delta against what was acked.
    let step = s.exports_changed(&exports(&[("cart", 80), ("pay", 80)]), &mut imports);
    let u = exports_update(&step);
    assert_eq!((u.base_revision, u.revision), (1, 2));
    assert_eq!(names(&u.upserts), ["pay"]);
}

#[test]
fn a_delta_lost_with_the_stream_is_sent_again_on_reconnect() {
    let mut imports = Imports::default();
    let mut s = synced_with(&exports(&[("cart", 80)]), &mut imports);
    // A delta goes out as revision 2; the stream breaks before its ack,
    // and the exports do not change again.
    s.exports_changed(&exports(&[("cart", 80), ("pay", 80)]), &mut imports);
    assert!(!imports.exports_acked);
    // The broker still holds revision 1: the lost delta is sent again.
    let step = s.welcome(1, || panic!("the exports last sent are known"));
    assert!(step.synced);
    let u = exports_update(&step);
    assert!(!u.snapshot);
    assert_eq!((u.base_revision, u.revision), (1, 2));
    assert_eq!(names(&u.upserts), ["pay"]);
    s.exports_ack(&pb::ExportsAck { revision: 2 }, &mut imports);
    assert!(imports.exports_acked);
    assert_eq!(s.acked, Some((2, exports(&[("cart", 80), ("pay", 80)]))));
}

#[test]
fn a_reconnect_to_a_broker_that_lost_the_revision_resends_the_current_exports() {
    let mut imports = Imports::default();
    let mut s = synced_with(&exports(&[("cart", 80)]), &mut imports);
    // E.g. a broker restored from an older backup.
    let step = s.welcome(0, || exports(&[("cart", 80), ("pay", 80)]));
    let u = exports_update(&step);
    assert!(u.snapshot);
    assert_eq!(u.revision, 2);
    assert_eq!(names(&u.upserts), ["cart", "pay"]);
    assert!(!step.synced);
    // Its ack brings the exports in sync again.
    s.exports_ack(&pb::ExportsAck { revision: 2 }, &mut imports);
    assert!(imports.exports_acked);
}

#[test]
fn resync_sends_a_snapshot_of_what_was_sent_above_both_revisions() {
    let mut imports = Imports::default();
    let mut s = synced_with(&exports(&[("cart", 80)]), &mut imports);
    s.exports_changed(&exports(&[("cart", 80), ("pay", 80)]), &mut imports);
    let step = s.resync(&pb::ResyncExports {
        have_revision: 5,
        reason: "delta base 1 does not match the broker's revision 5".into(),
    });
    let u = exports_update(&step);
    assert!(u.snapshot);
    assert_eq!(u.revision, 6);
    assert_eq!(names(&u.upserts), ["cart", "pay"]);
    assert!(!step.publish);
    // The delta in flight before is forgotten: only the snapshot counts.
    s.exports_ack(&pb::ExportsAck { revision: 2 }, &mut imports);
    assert!(!imports.exports_acked);
    s.exports_ack(&pb::ExportsAck { revision: 6 }, &mut imports);
    assert!(imports.exports_acked);
}

#[test]
fn imports_are_assembled_from_a_snapshot_and_deltas_and_acknowledged() {
    let mut imports = Imports {
        bundle_version: 4,
        ..Imports::default()
    };
    let mut s = SyncState::default();
    let step = s.imports(
        imports_pb(3, true, &["cart", "pay"], &[]),
        "AA".into(),
        &mut imports,
    );
    assert!(step.synced && step.publish);
    let a = ack_of(&step);
    assert_eq!((a.import_revision, a.bundle_version), (3, 4));
    assert_eq!(a.intermediate_sha256, "AA");
    assert_eq!(imported(&imports), ["cart", "pay"]);
    assert_eq!((imports.revision, imports.epoch.as_str()), (3, "e1"));

    let step = s.imports(
        imports_pb(4, false, &["search"], &["cart"]),
        "AA".into(),
        &mut imports,
    );
    assert_eq!(ack_of(&step).import_revision, 4);
    assert_eq!(imported(&imports), ["pay", "search"]);
    assert_eq!(
        imports.services[&key("search")][0].from.name.as_str(),
        "east"
    );

    // A snapshot replaces everything imported before.
    s.imports(
        imports_pb(9, true, &["cart"], &[]),
        "AA".into(),
        &mut imports,
    );
    assert_eq!(imported(&imports), ["cart"]);

    // The next stream resumes from what was applied.
    let hello = s.hello(&imports, pb::ClusterInfo::default());
    assert_eq!(
        (
            hello.import_revision,
            hello.import_epoch.as_str(),
            hello.bundle_version
        ),
        (9, "e1", 4)
    );
}

#[test]
fn an_undecodable_imports_update_names_the_field() {
    let mut u = pb::ImportsUpdate {
        revision: 1,
        ..Default::default()
    };
    u.removals.push(pb::ServiceRef {
        namespace: "Bad_NS".into(),
        name: "x".into(),
    });
    let e = ImportsDelta::decode(&u).unwrap_err();
    assert_eq!(e.field, "service");
}

#[test]
fn trust_is_published_and_acknowledged_with_the_import_revision_held() {
    let mut imports = Imports::default();
    let mut s = SyncState::default();
    s.imports(
        imports_pb(3, true, &["cart"], &[]),
        String::new(),
        &mut imports,
    );
    let t = pb::TrustUpdate {
        bundle_version: 2,
        denied_intermediates: vec!["AB:CD".into()],
        bind_identities: true,
        cluster_identities: [(
            "east".to_string(),
            pb::ServiceAccounts {
                names: vec!["shop/cart".into()],
            },
        )]
        .into(),
        ..Default::default()
    };
    let step = s.trust(&t, "EF".into(), &mut imports);
    assert!(step.publish && !step.synced);
    let a = ack_of(&step);
    assert_eq!((a.import_revision, a.bundle_version), (3, 2));
    assert_eq!(a.intermediate_sha256, "EF");
    assert_eq!(imports.bundle_version, 2);
    assert!(imports.denied_intermediates.contains("AB:CD"));
    let ids = imports.cluster_identities.as_ref().unwrap();
    assert!(ids["east"].contains("shop/cart"));

    // Identities no longer bound: none published.
    let t = pb::TrustUpdate {
        bundle_version: 3,
        ..t
    };
    s.trust(
        &pb::TrustUpdate {
            bind_identities: false,
            ..t
        },
        "EF".into(),
        &mut imports,
    );
    assert_eq!(imports.cluster_identities, None);

    // A renewed intermediate is acknowledged with what is held.
    let a = s.intermediate_installed(&imports, "01:02".into());
    let a = ack_of(&a);
    assert_eq!((a.import_revision, a.bundle_version), (3, 3));
    assert_eq!(a.intermediate_sha256, "01:02");
}
