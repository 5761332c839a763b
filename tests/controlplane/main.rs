//! `strait controlplane` end to end: a real broker, real control plane
//! processes joined to it with `straitctl cluster add` tokens, and a
//! proxy-like client in the test that gets its certificate with a
//! bootstrap token (Istio's CSR API) and then subscribes to discovery
//! (delta ADS), ACKing or NACKing what it receives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
#[path = "../../controlplane/tests/support/fake_api.rs"]
mod fake_api;
mod gateway;
mod kube;
mod paths;
mod probes;
mod real_kube;
mod real_kube_faults;
mod rotation;
mod support;
mod validation;

use std::time::{Duration, Instant};

use common::{Broker, Scratch, http_get, http_status};
use strait_proto::strait::mesh::v1 as pb;
use strait_proto::strait::mesh::v1::type_url;
use strait_proxy_client::xds::Resources;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_config_changes_nacks_and_a_restart() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let mut east = ControlPlane::start(&s, &broker, "east", "net-east", "192.0.2.10:15443");
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    put(
        &east.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", 8080, false),
            workload_yaml("echo-v1", "echo", "10.1.0.1", "net-east")
        ),
    );
    put(
        &west.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", 8080, true),
            workload_yaml("echo-v2", "echo", "10.2.0.1", "net-west")
        ),
    );

    // A sidecar of east: certificate with a token, then discovery with it.
    let identity = east.certificate("demo", "echo", "echo-v1").await;
    assert_eq!(
        identity.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    let proxy = east.subscribe(&identity, "echo-v1");
    let mut res = proxy.resources();
    let mut state = proxy.state();

    // West's export reaches east's Service resource as a GATEWAY endpoint,
    // next to east's own SIDECAR endpoint.
    let echo = until(&mut res, "echo with west's gateway", &east, |r| {
        let svc = services(r).remove("echo.demo.svc.cluster.local")?;
        svc.endpoints
            .iter()
            .any(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
            .then_some(svc)
    })
    .await;
    let kinds: Vec<(i32, &str, &str)> = echo
        .endpoints
        .iter()
        .map(|e| (e.kind, e.address.as_str(), e.network.as_str()))
        .collect();
    assert!(
        kinds.contains(&(pb::endpoint::Kind::Sidecar as i32, "10.1.0.1", "net-east")),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(pb::endpoint::Kind::Gateway as i32, "192.0.2.20", "net-west")),
        "{kinds:?}"
    );
    let gw = echo
        .endpoints
        .iter()
        .find(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
        .unwrap();
    assert_eq!((gw.port, gw.cluster.as_str()), (15443, "west"), "{gw:?}");
    assert!(
        std::fs::read_to_string(east.config.join("imported/strait-imports.yaml"))
            .unwrap()
            .contains("192.0.2.20"),
        "imports written back to the config directory"
    );
    until_state(&mut state, "synced", |s| s.synced && s.connected).await;

    // The import carries a ClusterSet IP from the default range, in the
    // ServiceEntry's addresses and the ServiceImport's spec.ips, and the
    // service resource has it (for captured connections to it).
    let imported = east.config.join("imported/strait-imports.yaml");
    let vip = until(&mut res, "echo's ClusterSet IP", &east, |r| {
        let svc = services(r).remove("echo.demo.svc.cluster.local")?;
        svc.addresses
            .iter()
            .find(|a| a.starts_with("240.241."))
            .cloned()
    })
    .await;
    let text = std::fs::read_to_string(&imported).unwrap();
    assert_eq!(text.matches(vip.as_str()).count(), 2, "{text}");
    // An address the cluster already holds is kept, not moved back to where
    // the name hashes.
    let kept_ip = "240.241.9.9";
    assert_ne!(vip, kept_ip);
    std::fs::write(&imported, text.replace(&vip, kept_ip)).unwrap();
    let has_held = |r: &Resources| {
        services(r)
            .remove("echo.demo.svc.cluster.local")?
            .addresses
            .contains(&kept_ip.to_string())
            .then_some(())
    };
    until(
        &mut res,
        "the ClusterSet IP held in the config",
        &east,
        has_held,
    )
    .await;

    // A change to a file reaches the subscriber.
    put(
        &east.config,
        "extra.yaml",
        &service_yaml("extra", 9090, false),
    );
    until(
        &mut res,
        "extra",
        &east,
        has("extra.demo.svc.cluster.local"),
    )
    .await;

    // A bad file is isolated: named in the log, its last good version
    // stays, and a good change made at the same time applies.
    put(
        &east.config,
        "extra.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
    );
    put(
        &east.config,
        "more.yaml",
        &service_yaml("more", 7070, false),
    );
    until(&mut res, "more", &east, has("more.demo.svc.cluster.local")).await;
    let held = services(&res.borrow());
    assert_eq!(
        held["extra.demo.svc.cluster.local"].ports[0].port, 9090,
        "the last good version of extra.yaml is kept"
    );
    let deadline = Instant::now() + WAIT;
    while !east.log().contains("extra.yaml") {
        assert!(
            Instant::now() < deadline,
            "extra.yaml not named in the log:\n{}",
            east.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A config the proxy refuses is NACKed: it keeps what it had, the
    // control plane logs and counts the NACK (and names the node).
    let accepted = state.borrow().accepted;
    put(
        &east.config,
        "refused.yaml",
        &service_yaml("refuse-me", 80, false),
    );
    let st = until_state(&mut state, "a NACK", |s| s.last_nack.is_some()).await;
    let (nacked_type, error) = st.last_nack.unwrap();
    assert_eq!(nacked_type, type_url::SERVICE);
    assert!(error.contains("refused by the test proxy"), "{error}");
    assert!(!services(&res.borrow()).contains_key(REFUSED));
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = http_get(&east.metrics, "/metrics");
        let log = east.log();
        let counted = metrics.lines().any(|l| {
            l.starts_with("strait_xds_nacks_total{") && l.contains("Service") && !l.ends_with(" 0")
        });
        if counted
            && log.contains("proxy refused config (NACK)")
            && log.contains("sidecar~10.1.0.1~echo-v1.demo")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "NACK not logged and counted:\n{metrics}\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Served on the debug listener only, not on the health listener.
    assert_eq!(http_status(&east.health, "/debug/nacks"), Some(404));
    let nacks: serde_json::Value =
        serde_json::from_str(&http_get(&east.debug, "/debug/nacks")).unwrap();
    let ours = &nacks["sidecar~10.1.0.1~echo-v1.demo~demo.svc.cluster.local"];
    assert_eq!(ours["type_url"], type_url::SERVICE, "{nacks:#}");
    assert!(
        ours["error"]
            .as_str()
            .unwrap()
            .contains("refused by the test proxy"),
        "{nacks:#}"
    );
    // Taking the refused object away: the proxy accepts updates again.
    std::fs::remove_file(east.config.join("refused.yaml")).unwrap();
    put(
        &east.config,
        "after.yaml",
        &service_yaml("after", 6060, false),
    );
    until(
        &mut res,
        "after",
        &east,
        has("after.demo.svc.cluster.local"),
    )
    .await;
    // (The client publishes resources just before it counts the ACK.)
    until_state(&mut state, "the push accepted", |s| s.accepted > accepted).await;

    // An Istio Sidecar resource scopes what the sidecar sees (egress
    // hosts); taking it away shows everything again.
    put(
        &east.config,
        "scope.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: demo}\n\
spec:\n  egress:\n  - hosts: [./echo.demo.svc.cluster.local]\n",
    );
    until(&mut res, "only echo in scope", &east, |r| {
        (services(r).keys().collect::<Vec<_>>() == ["echo.demo.svc.cluster.local"]).then_some(())
    })
    .await;
    std::fs::remove_file(east.config.join("scope.yaml")).unwrap();
    until(
        &mut res,
        "everything back in scope",
        &east,
        has("after.demo.svc.cluster.local"),
    )
    .await;

    // The control plane restarts: the proxy keeps its resources meanwhile
    // and resumes (same certificate) when it is back.
    east.terminate();
    until_state(&mut state, "disconnected", |s| !s.connected).await;
    assert!(services(&res.borrow()).contains_key("after.demo.svc.cluster.local"));
    put(
        &east.config,
        "while-down.yaml",
        &service_yaml("while-down", 5050, false),
    );
    east.spawn();
    until(
        &mut res,
        "while-down",
        &east,
        has("while-down.demo.svc.cluster.local"),
    )
    .await;
    until_state(&mut state, "reconnected", |s| s.connected && s.synced).await;
    put(
        &east.config,
        "resumed.yaml",
        &service_yaml("resumed", 4040, false),
    );
    until(
        &mut res,
        "resumed",
        &east,
        has("resumed.demo.svc.cluster.local"),
    )
    .await;
    // West's export survived east's restart too.
    let echo = services(&res.borrow())["echo.demo.svc.cluster.local"].clone();
    assert!(
        echo.endpoints
            .iter()
            .any(|e| e.kind == pb::endpoint::Kind::Gateway as i32),
        "{echo:?}"
    );
    assert_eq!(
        echo.addresses,
        [kept_ip],
        "the ClusterSet IP survived the restart"
    );
    assert_eq!(
        std::fs::read_to_string(&imported)
            .unwrap()
            .matches(kept_ip)
            .count(),
        2
    );
}

/// Push latency: the time from a config file write to the subscriber
/// holding the new resource, over 100 changes. Prints figures (this
/// machine's, shared with other tests) rather than asserting a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_latency_from_file_write_to_subscriber() {
    const CHANGES: u32 = 100;
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let cp = ControlPlane::start(&s, &broker, "solo", "net-solo", "192.0.2.30:15443");
    let identity = cp.certificate("demo", "bench", "bench-1").await;
    let proxy = cp.subscribe(&identity, "bench-1");
    let mut res = proxy.resources();
    let mut state = proxy.state();
    until_state(&mut state, "synced", |s| s.synced).await;

    let mut samples = Vec::with_capacity(CHANGES as usize);
    for i in 0..CHANGES {
        let port = 10_000 + i;
        // Writes land at varied points of the control plane's 200 ms poll
        // (writing right after the previous push would phase-lock to it
        // and measure one point of the cycle only).
        tokio::time::sleep(Duration::from_millis(u64::from(i * 37 % 200))).await;
        let start = Instant::now();
        put(
            &cp.config,
            "bench.yaml",
            &service_yaml("bench", port, false),
        );
        until(&mut res, "the new port", &cp, |r| {
            let svc = services(r).remove("bench.demo.svc.cluster.local")?;
            (svc.ports.first()?.port == port).then_some(())
        })
        .await;
        samples.push(start.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    eprintln!(
        "push latency, file write to subscriber ({CHANGES} changes; poll {:?}, debounce 100ms): \
         p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        strait_controlplane::dirwatch::POLL,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        samples[samples.len() - 1]
    );
    let metrics = http_get(&cp.metrics, "/metrics");
    let histogram: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("strait_xds_push_latency_seconds"))
        .collect();
    eprintln!("{}", histogram.join("\n"));
    let count = histogram
        .iter()
        .find_map(|l| l.strip_prefix("strait_xds_push_latency_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("the push latency histogram is exported");
    assert!(
        count >= u64::from(CHANGES),
        "every change was pushed and observed: {count}"
    );
}
