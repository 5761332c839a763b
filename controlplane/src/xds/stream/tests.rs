//! The stream without sockets: a [`Session`] fed requests and snapshots,
//! and what [`XdsServer::record`] keeps of its replies.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prometheus_client::registry::Registry;
use prost::Message;
use strait_ca::tls::Trust;
use strait_ca::{SpiffeId, TrustDomain};
use strait_proto::strait::mesh::v1 as pb;
use strait_proto::strait::mesh::v1::type_url::{NETWORK, POLICY, SERVICE};
use tokio::sync::watch;

use super::super::{Delta, Metrics, Sotw, XdsServer};
use super::{Reply, Session, Variant};
use crate::resources::Snapshot;

const PEER: &str = "spiffe://cluster.local/ns/demo/sa/echo";
const NODE: &str = "sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local";

fn peer() -> SpiffeId {
    SpiffeId::parse(PEER).unwrap()
}

fn node(id: &str, cluster_id: Option<&str>) -> Node {
    let metadata = cluster_id.map(|c| Struct {
        fields: [(
            "CLUSTER_ID".to_string(),
            Value {
                kind: Some(Kind::StringValue(c.into())),
            },
        )]
        .into(),
    });
    Node {
        id: id.into(),
        metadata,
        ..Default::default()
    }
}

fn networks(items: &[(&str, &str)]) -> Arc<Snapshot> {
    let mut s = Snapshot::empty(Instant::now());
    for (name, gw) in items {
        s.insert(
            NETWORK,
            name,
            &pb::Network {
                name: (*name).into(),
                gateways: vec![(*gw).into()],
                ..Default::default()
            },
        );
    }
    Arc::new(s)
}

fn error(detail: Option<&str>) -> Option<RpcStatus> {
    detail.map(|e| RpcStatus {
        code: 3,
        message: e.into(),
        details: vec![],
    })
}

fn sotw(names: &[&str], nonce: &str, detail: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: NETWORK.into(),
        resource_names: names.iter().map(|n| (*n).to_string()).collect(),
        response_nonce: nonce.into(),
        version_info: format!("running-{nonce}"),
        error_detail: error(detail),
        ..Default::default()
    }
}

fn delta(sub: &[&str], unsub: &[&str], nonce: &str, detail: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: NETWORK.into(),
        resource_names_subscribe: sub.iter().map(|n| (*n).to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|n| (*n).to_string()).collect(),
        response_nonce: nonce.into(),
        error_detail: error(detail),
        ..Default::default()
    }
}

/// Network names and gateways of a state-of-the-world response.
fn sotw_items(r: &DiscoveryResponse) -> Vec<(String, String)> {
    r.resources
        .iter()
        .map(|a| {
            let n = pb::Network::decode(a.value.as_slice()).unwrap();
            (n.name, n.gateways.join(","))
        })
        .collect()
}

/// Updated and removed names of a delta response.
fn delta_items(r: &DeltaDiscoveryResponse) -> (Vec<&str>, Vec<&str>) {
    (
        r.resources.iter().map(|r| r.name.as_str()).collect(),
        r.removed_resources.iter().map(String::as_str).collect(),
    )
}

fn server() -> XdsServer {
    let (_tx, rx) = watch::channel(networks(&[]));
    XdsServer::new(
        rx,
        Trust::default(),
        TrustDomain::new("cluster.local").unwrap(),
        Metrics::new(&mut Registry::default()),
    )
}

/// A session whose node was admitted with its first request.
fn admitted<V: Variant>(first: &V::Request) -> Session<V> {
    let mut s = Session::<V>::new(peer());
    assert_eq!(s.admit(first).unwrap(), Some(String::new()));
    s
}

/// Feeds `req` to the session and records the reply, as the stream does.
fn handle<V: Variant>(
    server: &XdsServer,
    s: &mut Session<V>,
    req: &V::Request,
    snap: &Arc<Snapshot>,
) -> (Reply, Option<V::Response>) {
    s.admit(req).unwrap();
    let (reply, resp) = s.on_request(req, snap);
    server.record(s.node(), s.peer(), &V::ask(req), &reply);
    (reply, resp)
}

fn with_node<V: Variant>(check: impl Fn(Option<Node>) -> V::Request) {
    let mut s = Session::<V>::new(peer());
    assert_eq!(
        s.node(),
        PEER,
        "the peer stands for the node until it is named"
    );
    let err = s.admit(&check(None)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let other = "sidecar~10.0.0.1~x.kube-system~d";
    let err = s.admit(&check(Some(node(other, None)))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("names namespace \"kube-system\""),
        "{err:?}"
    );
    // The first admitted request names the cluster, from CLUSTER_ID.
    let cluster = s.admit(&check(Some(node(NODE, Some("west"))))).unwrap();
    assert_eq!(cluster.as_deref(), Some("west"));
    assert_eq!(s.node(), NODE);
    // Later requests may leave the node out, and choose no cluster.
    assert_eq!(s.admit(&check(None)).unwrap(), None);
    assert_eq!(
        s.admit(&check(Some(node(NODE, Some("east"))))).unwrap(),
        None
    );
    let err = s.admit(&check(Some(node(other, None)))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(s.node(), NODE, "a refused node is not taken");
}

#[test]
fn a_session_authorizes_its_node_and_names_the_cluster_once() {
    with_node::<Sotw>(|node| DiscoveryRequest {
        node,
        ..Default::default()
    });
    with_node::<Delta>(|node| DeltaDiscoveryRequest {
        node,
        ..Default::default()
    });
}

#[test]
fn sotw_full_set_ack_silence_nack_recorded_without_resend() {
    let server = server();
    let s1 = networks(&[("a", "gw-a:1"), ("b", "gw-b:1")]);
    let first = DiscoveryRequest {
        node: Some(node(NODE, None)),
        ..sotw(&[], "", None)
    };
    let mut s = admitted::<Sotw>(&first);
    // The first request gets the full set.
    let (reply, r1) = handle(&server, &mut s, &first, &s1);
    assert_eq!(reply, Reply::Initial);
    let r1 = r1.unwrap();
    assert_eq!(
        sotw_items(&r1),
        [("a".into(), "gw-a:1".into()), ("b".into(), "gw-b:1".into())]
    );
    // An ACK is not answered, and not recorded as a NACK.
    assert_eq!(
        handle(&server, &mut s, &sotw(&[], &r1.nonce, None), &s1),
        (Reply::Ack, None)
    );
    assert!(server.nacks().is_empty());
    // A new snapshot is pushed as the full set, with a new nonce.
    let s2 = networks(&[("a", "gw-a:2"), ("b", "gw-b:1")]);
    let r2 = s.on_snapshot(&s2);
    assert_eq!(r2.len(), 1);
    let r2 = &r2[0];
    assert_eq!(
        sotw_items(r2),
        [("a".into(), "gw-a:2".into()), ("b".into(), "gw-b:1".into())]
    );
    assert_ne!(r2.nonce, r1.nonce);
    assert_ne!(r2.version_info, r1.version_info);
    // The superseded nonce is stale: ignored, not recorded.
    assert_eq!(
        handle(&server, &mut s, &sotw(&[], &r1.nonce, Some("old")), &s2),
        (Reply::Stale, None)
    );
    assert!(server.nacks().is_empty());
    // A NACK is recorded with its detail, and not answered.
    let nack = sotw(&[], &r2.nonce, Some("a: bad gateway"));
    let (reply, resp) = handle(&server, &mut s, &nack, &s2);
    assert_eq!((reply, resp), (Reply::Nack("a: bad gateway".into()), None));
    let recorded = server
        .nacks()
        .remove(NODE)
        .expect("NACK recorded for the node");
    assert_eq!(recorded.type_url, NETWORK);
    assert_eq!(recorded.nonce, r2.nonce);
    assert_eq!(recorded.version_info, format!("running-{}", r2.nonce));
    assert_eq!(recorded.error, "a: bad gateway");
    assert_eq!(server.metrics().nacks(NETWORK), 1);
    // No resend loop: the same NACK again, or the same snapshot again,
    // sends nothing.
    assert_eq!(handle(&server, &mut s, &nack, &s2).1, None);
    assert!(s.on_snapshot(&s2).is_empty());
    assert_eq!(server.metrics().nacks(NETWORK), 2);
}

#[test]
fn delta_sends_only_changes_and_records_a_nack_once() {
    let server = server();
    let s1 = networks(&[("a", "1"), ("b", "1")]);
    let first = DeltaDiscoveryRequest {
        node: Some(node(NODE, None)),
        ..delta(&[], &[], "", None)
    };
    let mut s = admitted::<Delta>(&first);
    let (reply, r1) = handle(&server, &mut s, &first, &s1);
    assert_eq!(reply, Reply::Initial);
    let r1 = r1.unwrap();
    assert_eq!(delta_items(&r1), (vec!["a", "b"], vec![]));
    assert_eq!(
        handle(&server, &mut s, &delta(&[], &[], &r1.nonce, None), &s1),
        (Reply::Ack, None)
    );
    // Only what changed goes, and what is gone.
    let s2 = networks(&[("a", "2"), ("b", "1"), ("c", "1")]);
    let r2 = s.on_snapshot(&s2).remove(0);
    assert_eq!(delta_items(&r2), (vec!["a", "c"], vec![]));
    let s3 = networks(&[("a", "2"), ("c", "1")]);
    let r3 = s.on_snapshot(&s3).remove(0);
    assert_eq!(delta_items(&r3), (vec![], vec!["b"]));
    // A nonce the stream never gave is stale.
    assert_eq!(
        handle(&server, &mut s, &delta(&[], &[], "999", Some("?")), &s3),
        (Reply::Stale, None)
    );
    assert!(server.nacks().is_empty());
    // A NACK is recorded (no version in delta) and not answered; the same
    // NACK again is settled, hence stale.
    let nack = delta(&[], &[], &r3.nonce, Some("b: still used"));
    let (reply, resp) = handle(&server, &mut s, &nack, &s3);
    assert_eq!((reply, resp), (Reply::Nack("b: still used".into()), None));
    let recorded = server.nacks().remove(NODE).expect("NACK recorded");
    assert_eq!(
        (recorded.nonce.as_str(), recorded.version_info.as_str()),
        (r3.nonce.as_str(), "")
    );
    assert_eq!(recorded.error, "b: still used");
    assert_eq!(
        handle(&server, &mut s, &nack, &s3),
        (Reply::Stale, None),
        "no resend loop"
    );
    assert_eq!(server.metrics().nacks(NETWORK), 1);
}

#[test]
fn delta_unsubscribed_names_are_no_longer_pushed() {
    let server = server();
    let s1 = networks(&[("a", "1"), ("b", "1")]);
    let first = DeltaDiscoveryRequest {
        node: Some(node(NODE, None)),
        ..delta(&["a", "b"], &[], "", None)
    };
    let mut s = admitted::<Delta>(&first);
    let r1 = handle(&server, &mut s, &first, &s1).1.unwrap();
    assert_eq!(delta_items(&r1), (vec!["a", "b"], vec![]));
    // Unsubscribing from a changes nothing the client must hear of.
    let unsub = delta(&[], &["a"], &r1.nonce, None);
    assert_eq!(handle(&server, &mut s, &unsub, &s1), (Reply::Ack, None));
    assert!(
        s.on_snapshot(&networks(&[("a", "2"), ("b", "1")]))
            .is_empty()
    );
    let r2 = s
        .on_snapshot(&networks(&[("a", "3"), ("b", "2")]))
        .remove(0);
    assert_eq!(delta_items(&r2), (vec!["b"], vec![]));
    // Subscribing to it again sends it at once.
    let resub = delta(&["a"], &[], &r2.nonce, None);
    let (reply, r3) = handle(
        &server,
        &mut s,
        &resub,
        &networks(&[("a", "3"), ("b", "2")]),
    );
    assert_eq!(reply, Reply::Ack);
    assert_eq!(delta_items(&r3.unwrap()), (vec!["a"], vec![]));
}

#[test]
fn a_session_serves_the_view_scoped_for_its_node() {
    let mut snap = Snapshot::empty(Instant::now());
    for (ns, host) in [
        ("demo", "echo.demo.svc.cluster.local"),
        ("prod", "api.prod.svc.cluster.local"),
    ] {
        snap.insert(
            SERVICE,
            host,
            &pb::Service {
                hostname: host.into(),
                namespace: ns.into(),
                ..Default::default()
            },
        );
    }
    snap.insert(
        POLICY,
        "Sidecar/demo/default",
        &pb::Policy {
            kind: "Sidecar".into(),
            namespace: "demo".into(),
            name: "default".into(),
            spec_json: r#"{"egress":[{"hosts":["./*"]}]}"#.into(),
            generation: 1,
        },
    );
    let snap = Arc::new(snap);
    let hosts = |r: &DiscoveryResponse| -> Vec<String> {
        r.resources
            .iter()
            .map(|a| pb::Service::decode(a.value.as_slice()).unwrap().hostname)
            .collect()
    };
    let request = |id: &str| DiscoveryRequest {
        node: Some(node(id, None)),
        type_url: SERVICE.into(),
        ..Default::default()
    };
    let sidecar = request(NODE);
    let mut s = admitted::<Sotw>(&sidecar);
    let resp = s.on_request(&sidecar, &snap).1.unwrap();
    assert_eq!(hosts(&resp), ["echo.demo.svc.cluster.local"]);
    // A gateway of the namespace sees everything.
    let gateway = request("gateway~10.0.0.2~gw-1.demo~demo.svc.cluster.local");
    let mut s = admitted::<Sotw>(&gateway);
    let resp = s.on_request(&gateway, &snap).1.unwrap();
    assert_eq!(
        hosts(&resp),
        ["api.prod.svc.cluster.local", "echo.demo.svc.cluster.local"]
    );
}
