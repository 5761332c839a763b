use std::time::Instant;

use envoy_types::pb::google::rpc::Status as RpcStatus;
use strait_proto::strait::mesh::v1 as pb;
use strait_proto::strait::mesh::v1::type_url::{NETWORK, SERVICE};

use super::*;

#[test]
fn node_ids_must_name_the_namespace_of_the_certificate() {
    let echo = "spiffe://cluster.local/ns/demo/sa/echo";
    let gateway = "spiffe://cluster.local/ns/strait-system/sa/eastwest-gateway";
    // (node id, peer, Ok or a fragment of the error)
    let cases: &[(&str, &str, Result<(), &str>)] = &[
        (
            "sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local",
            echo,
            Ok(()),
        ),
        (
            "sidecar~10.0.0.1~echo.v1.demo~demo.svc.cluster.local",
            echo,
            Ok(()),
        ),
        ("router~10.0.0.1~echo-1.demo~", echo, Ok(())),
        (
            "gateway~127.0.0.1~eastwest-gateway.strait-system~strait-system.svc.cluster.local",
            gateway,
            Ok(()),
        ),
        (
            "sidecar~10.0.0.1~echo-1.other~other.svc.cluster.local",
            echo,
            Err("names namespace \"other\""),
        ),
        (
            "gateway~127.0.0.1~eastwest-gateway.strait-system~strait-system.svc.cluster.local",
            echo,
            Err("namespace \"demo\""),
        ),
        (
            "sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local",
            gateway,
            Err("names namespace \"demo\""),
        ),
        ("", echo, Err("is not <kind>")),
        ("sidecar~10.0.0.1~echo-1.demo", echo, Err("is not <kind>")),
        (
            "sidecar~10.0.0.1~echo-1.demo~d~extra",
            echo,
            Err("is not <kind>"),
        ),
        (
            "ingress~10.0.0.1~echo-1.demo~d",
            echo,
            Err("kind \"ingress\""),
        ),
        ("sidecar~~echo-1.demo~d", echo, Err("no IP address")),
        (
            "sidecar~10.0.0.1~echo-1~d",
            echo,
            Err("is not <name>.<namespace>"),
        ),
        (
            "sidecar~10.0.0.1~.demo~d",
            echo,
            Err("is not <name>.<namespace>"),
        ),
        (
            "sidecar~10.0.0.1~echo-1.~d",
            echo,
            Err("is not <name>.<namespace>"),
        ),
        (
            "sidecar~10.0.0.1~east.cluster~d",
            "spiffe://cluster.local/cluster/east",
            Err("not a workload identity"),
        ),
    ];
    for (node, peer, want) in cases {
        let peer = SpiffeId::parse(peer).unwrap();
        let got = check_node(node, &peer);
        match (want, &got) {
            (Ok(()), Ok(())) => {}
            (Err(fragment), Err(e)) => assert!(
                e.to_string().contains(fragment),
                "{node:?} as {peer}: error {e:?} lacks {fragment:?}"
            ),
            _ => panic!("{node:?} as {peer}: want {want:?}, got {got:?}"),
        }
    }
}

fn scoped_services(snap: &Snapshot, kind: &str, ns: &str, name: &str) -> Option<Vec<String>> {
    scope(snap, kind, ns, name).map(|s| s.resources(SERVICE).unwrap().keys().cloned().collect())
}

#[test]
fn sidecar_resources_scope_the_services_a_sidecar_sees() {
    use strait_proto::strait::mesh::v1::type_url::{POLICY, WORKLOAD};
    let mut snap = snap(&[("net-west", "192.0.2.1:15443")]);
    for (ns, name, aliases) in [
        ("demo", "echo.demo.svc.cluster.local", vec!["echo.demo"]),
        ("demo", "db.demo.svc.cluster.local", vec![]),
        (
            "prod",
            "api.prod.svc.cluster.local",
            vec!["api.prod.svc.clusterset.local"],
        ),
        ("ext", "example.com", vec![]),
    ] {
        snap.insert(
            SERVICE,
            name,
            &pb::Service {
                hostname: name.into(),
                namespace: ns.into(),
                aliases: aliases.into_iter().map(String::from).collect(),
                ..Default::default()
            },
        );
    }
    for (name, app) in [("client-1", "client"), ("echo-1", "echo")] {
        snap.insert(
            WORKLOAD,
            &format!("demo/{name}"),
            &pb::Workload {
                name: name.into(),
                namespace: "demo".into(),
                labels: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            },
        );
    }
    let all = scoped_services(&snap, "gateway", "demo", "x");
    assert_eq!(all, None, "no Sidecar: everything");
    let sidecar = |snap: &mut Snapshot, name: &str, spec: &str| {
        snap.insert(
            POLICY,
            &format!("Sidecar/demo/{name}"),
            &pb::Policy {
                kind: "Sidecar".into(),
                namespace: "demo".into(),
                name: name.into(),
                spec_json: spec.into(),
                generation: 1,
            },
        );
    };
    assert_eq!(scoped_services(&snap, "sidecar", "demo", "echo-1"), None);
    sidecar(&mut snap, "default", r#"{"egress":[{"hosts":["./*"]}]}"#);
    sidecar(
        &mut snap,
        "client",
        r#"{"workloadSelector":{"labels":{"app":"client"}},
            "egress":[{"hosts":["prod/*.clusterset.local","*/example.com","~/*"]}]}"#,
    );
    // Other namespaces' Sidecars do not apply.
    snap.insert(
        POLICY,
        "Sidecar/prod/default",
        &pb::Policy {
            kind: "Sidecar".into(),
            namespace: "prod".into(),
            name: "default".into(),
            spec_json: r#"{"egress":[{"hosts":["~/*"]}]}"#.into(),
            generation: 1,
        },
    );
    // (kind, namespace, workload, services seen or None for all)
    let cases: &[(&str, &str, &str, Option<&[&str]>)] = &[
        (
            "sidecar",
            "demo",
            "echo-1",
            Some(&["db.demo.svc.cluster.local", "echo.demo.svc.cluster.local"]),
        ),
        // An unknown workload gets the namespace default.
        (
            "sidecar",
            "demo",
            "ghost",
            Some(&["db.demo.svc.cluster.local", "echo.demo.svc.cluster.local"]),
        ),
        (
            "sidecar",
            "demo",
            "client-1",
            Some(&["api.prod.svc.cluster.local", "example.com"]),
        ),
        ("sidecar", "prod", "api-1", Some(&[])),
        ("sidecar", "other", "x", None),
        ("gateway", "demo", "echo-1", None),
    ];
    for (kind, ns, name, want) in cases {
        let got = scoped_services(&snap, kind, ns, name);
        let want = want.map(|w| w.iter().map(|s| (*s).to_string()).collect::<Vec<_>>());
        assert_eq!(got, want, "{kind} {ns}/{name}");
    }
    // Other types are not scoped.
    let scoped = scope(&snap, "sidecar", "prod", "api-1").unwrap();
    assert_eq!(scoped.resources(NETWORK), snap.resources(NETWORK));
    assert_eq!(scoped.resources(POLICY), snap.resources(POLICY));
}

#[test]
fn a_stream_must_name_its_node_first_and_keep_to_it() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/echo").unwrap();
    let node = |id: &str| Node {
        id: id.into(),
        ..Default::default()
    };
    let mut current = None;
    let err = node_of(None, &peer, &mut current).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let good = "sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local";
    node_of(Some(&node(good)), &peer, &mut current).unwrap();
    assert_eq!(current.as_deref(), Some(good));
    // Later requests may leave the node out.
    node_of(None, &peer, &mut current).unwrap();
    node_of(Some(&node("")), &peer, &mut current).unwrap();
    // A switch to another namespace mid-stream is refused.
    let err = node_of(
        Some(&node("sidecar~10.0.0.1~x.kube-system~d")),
        &peer,
        &mut current,
    )
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(current.as_deref(), Some(good));
}

fn snap(networks: &[(&str, &str)]) -> Snapshot {
    let mut s = Snapshot::empty(Instant::now());
    for (name, gw) in networks {
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
    s
}

fn sotw(type_url: &str, names: &[&str], nonce: &str, error: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| (*n).to_string()).collect(),
        response_nonce: nonce.into(),
        error_detail: error.map(|e| RpcStatus {
            code: 3,
            message: e.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| pb::Network::decode(a.value.as_slice()).unwrap().name)
        .collect()
}

use prost::Message;

#[test]
fn sotw_wildcard_ack_nack_and_pushes_only_on_change() {
    let s1 = snap(&[("a", "1"), ("b", "1")]);
    let mut st = SotwStream::default();
    let (reply, resp) = st.on_request(&sotw(NETWORK, &[], "", None), &s1);
    assert_eq!(reply, Reply::Initial);
    let resp = resp.unwrap();
    assert_eq!(names(&resp), ["a", "b"]);
    // ACK: no response.
    let (reply, resp2) = st.on_request(&sotw(NETWORK, &[], &resp.nonce, None), &s1);
    assert_eq!((reply, resp2), (Reply::Ack, None));
    // Same content again: nothing to push; other types are not pushed.
    assert!(st.on_snapshot(&snap(&[("a", "1"), ("b", "1")])).is_empty());
    // A change is pushed.
    let s2 = snap(&[("a", "2"), ("b", "1")]);
    let pushed = st.on_snapshot(&s2);
    assert_eq!(pushed.len(), 1);
    assert_ne!(pushed[0].version_info, resp.version_info);
    // A stale nonce is ignored, the current one NACKed.
    let (reply, _) = st.on_request(&sotw(NETWORK, &[], &resp.nonce, Some("bad")), &s2);
    assert_eq!(reply, Reply::Stale);
    let (reply, none) = st.on_request(&sotw(NETWORK, &[], &pushed[0].nonce, Some("bad a")), &s2);
    assert_eq!((reply, none), (Reply::Nack("bad a".into()), None));
    // Removal of a resource changes the view.
    let s3 = snap(&[("a", "2")]);
    assert_eq!(names(&st.on_snapshot(&s3)[0]), ["a"]);
}

#[test]
fn sotw_named_subscriptions_see_only_their_names() {
    let s1 = snap(&[("a", "1"), ("b", "1")]);
    let mut st = SotwStream::default();
    let resp = st
        .on_request(&sotw(NETWORK, &["b"], "", None), &s1)
        .1
        .unwrap();
    assert_eq!(names(&resp), ["b"]);
    assert!(
        st.on_snapshot(&snap(&[("a", "2"), ("b", "1")])).is_empty(),
        "a is not watched"
    );
    // Changing the subscription in an ACK is answered.
    let resp2 = st
        .on_request(&sotw(NETWORK, &["a", "b"], &resp.nonce, None), &s1)
        .1
        .unwrap();
    assert_eq!(names(&resp2), ["a", "b"]);
    // An unknown type is answered, empty.
    let other = st
        .on_request(&sotw("type.googleapis.com/x.Y", &[], "", None), &s1)
        .1
        .unwrap();
    assert!(other.resources.is_empty());
}

fn delta(
    type_url: &str,
    sub: &[&str],
    nonce: &str,
    error: Option<&str>,
    initial: &[(&str, &str)],
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: sub.iter().map(|n| (*n).to_string()).collect(),
        response_nonce: nonce.into(),
        error_detail: error.map(|e| RpcStatus {
            code: 3,
            message: e.into(),
            details: vec![],
        }),
        initial_resource_versions: initial
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
        ..Default::default()
    }
}

fn delta_names(r: &DeltaDiscoveryResponse) -> (Vec<&str>, Vec<&str>) {
    (
        r.resources.iter().map(|r| r.name.as_str()).collect(),
        r.removed_resources.iter().map(String::as_str).collect(),
    )
}

#[test]
fn delta_sends_changes_and_removals_only() {
    let s1 = snap(&[("a", "1"), ("b", "1")]);
    let mut st = DeltaStream::default();
    let (reply, r1) = st.on_request(&delta(NETWORK, &[], "", None, &[]), &s1);
    assert_eq!(reply, Reply::Initial);
    let r1 = r1.unwrap();
    assert_eq!(delta_names(&r1), (vec!["a", "b"], vec![]));
    assert_eq!(
        st.on_request(&delta(NETWORK, &[], &r1.nonce, None, &[]), &s1),
        (Reply::Ack, None)
    );
    let s2 = snap(&[("a", "2"), ("c", "1")]);
    let r2 = st.on_snapshot(&s2);
    assert_eq!(delta_names(&r2[0]), (vec!["a", "c"], vec!["b"]));
    assert!(st.on_snapshot(&s2).is_empty(), "nothing new");
    // An empty first response for another type, so the client knows.
    let r = st
        .on_request(&delta(SERVICE, &[], "", None, &[]), &s2)
        .1
        .unwrap();
    assert_eq!(delta_names(&r), (vec![], vec![]));
}

#[test]
fn delta_resume_sends_only_what_changed() {
    let s1 = snap(&[("a", "1"), ("b", "1")]);
    let mut first = DeltaStream::default();
    let r1 = first
        .on_request(&delta(NETWORK, &[], "", None, &[]), &s1)
        .1
        .unwrap();
    let held: Vec<(&str, &str)> = r1
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .chain([("gone", "x")])
        .collect();
    let s2 = snap(&[("a", "1"), ("b", "2")]);
    let mut resumed = DeltaStream::default();
    let r = resumed
        .on_request(&delta(NETWORK, &["*"], "", None, &held), &s2)
        .1
        .unwrap();
    assert_eq!(delta_names(&r), (vec!["b"], vec!["gone"]));
}

#[test]
fn delta_nack_resends_the_refused_response_on_the_next_change() {
    let s1 = snap(&[("a", "1")]);
    let mut st = DeltaStream::default();
    let r1 = st
        .on_request(&delta(NETWORK, &[], "", None, &[]), &s1)
        .1
        .unwrap();
    st.on_request(&delta(NETWORK, &[], &r1.nonce, None, &[]), &s1);
    let s2 = snap(&[("a", "2"), ("b", "bad")]);
    let r2 = st.on_snapshot(&s2).remove(0);
    let (reply, none) = st.on_request(&delta(NETWORK, &[], &r2.nonce, Some("b: bad"), &[]), &s2);
    assert_eq!((reply, none), (Reply::Nack("b: bad".into()), None));
    let s3 = snap(&[("a", "2"), ("b", "good")]);
    let r3 = st.on_snapshot(&s3).remove(0);
    assert_eq!(
        delta_names(&r3),
        (vec!["a", "b"], vec![]),
        "a was not applied by the client either"
    );
}

#[test]
fn delta_explicit_names_and_unsubscribe() {
    let s1 = snap(&[("a", "1"), ("b", "1")]);
    let mut st = DeltaStream::default();
    let r = st
        .on_request(&delta(NETWORK, &["a"], "", None, &[]), &s1)
        .1
        .unwrap();
    assert_eq!(delta_names(&r), (vec!["a"], vec![]));
    let mut unsub = delta(NETWORK, &["b"], &r.nonce, None, &[]);
    unsub.resource_names_unsubscribe = vec!["a".into()];
    let (reply, r2) = st.on_request(&unsub, &s1);
    assert_eq!(reply, Reply::Ack);
    assert_eq!(delta_names(&r2.unwrap()), (vec!["b"], vec![]));
    assert!(st.on_snapshot(&snap(&[("a", "9"), ("b", "1")])).is_empty());
}

#[tokio::test(start_paused = true)]
async fn debounce_waits_for_quiet_but_not_beyond_max_delay() {
    let (tx, rx) = watch::channel(0u32);
    let mut out = debounce(rx, Duration::from_millis(100), Duration::from_millis(500));
    assert_eq!(*out.borrow_and_update(), 0);
    // A burst of changes 50 ms apart: nothing until it is quiet.
    for i in 1..=3 {
        tx.send(i).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !out.has_changed().unwrap(),
            "published during the burst at {i}"
        );
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(out.has_changed().unwrap());
    assert_eq!(
        *out.borrow_and_update(),
        3,
        "one update with the last value"
    );
    // A never-ending burst is published after max_delay.
    let start = tokio::time::Instant::now();
    let mut i = 10;
    while !out.has_changed().unwrap() {
        i += 1;
        tx.send(i).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            start.elapsed() <= Duration::from_millis(540),
            "max_delay not honoured"
        );
    }
    assert!(start.elapsed() >= Duration::from_millis(500));
    out.borrow_and_update();
    // The end of the input publishes the last value and closes.
    tx.send(99).unwrap();
    drop(tx);
    out.changed().await.unwrap();
    assert_eq!(*out.borrow_and_update(), 99);
    assert!(out.changed().await.is_err());
}
