//! A weighted split and retries: the destination (service, subset) is
//! picked once per request, so a failing share shows as failures instead
//! of being retried onto the other share; a subset reached through
//! another network's gateway needs no DestinationRule at the exporter;
//! and a gateway that refuses the connection is named in the answer, the
//! access log reason and `strait_sidecar_upstream_failures_total`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use serde_json::json;
use strait_ca::testing::TestPki;
use strait_proto::strait::mesh::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// 80 % to subset v1, 20 % to v2, with Istio's default retries (2, on
/// connect failures).
fn split(mesh: Mesh) -> Mesh {
    mesh.workload("sleep", "demo", &[("app", "sleep")])
        .policy(
            "DestinationRule",
            "demo",
            "echo",
            json!({"host": "echo", "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}}]}),
        )
        .policy(
            "VirtualService",
            "demo",
            "echo",
            json!({"hosts": ["echo"], "http": [{"route": [
                {"destination": {"host": "echo", "subset": "v1"}, "weight": 80},
                {"destination": {"host": "echo", "subset": "v2"}, "weight": 20}]}]}),
        )
}

/// `strait_sidecar_upstream_failures_total` of echo for `reason`.
fn failures(metrics: &str, reason: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("strait_sidecar_upstream_failures_total{")
                && l.contains(&format!("destination_service=\"{ECHO}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Sends `n` requests; the backends that answered 200 and the bodies of
/// the other answers.
async fn send(outbound: SocketAddr, n: usize) -> (Vec<String>, Vec<(u16, String)>) {
    let mut c = ProxyClient::connect(outbound).await;
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (status, body, _) = c.get("http://echo.demo:8080/").await;
        if status == 200 {
            ok.push(backend_of(&body).unwrap_or("?").to_string());
        } else {
            failed.push((status, body));
        }
    }
    (ok, failed)
}

#[tokio::test]
async fn a_failing_share_of_a_split_fails_instead_of_being_retried_onto_the_other() {
    let pki = TestPki::new(TD);
    let client = sleep_client(&pki).await;
    let v1 = Sidecar::start(
        "echo-v1",
        "demo",
        backend("v1").await,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
    )
    .await;
    let id = spiffe("demo", "echo");
    // v2's only endpoint: nobody listens there.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut dead = v1.endpoint("v2", &id);
    dead.port = u32::from(dead_port);
    dead.workload = "echo-v2".into();
    let mesh = split(Mesh::new(&pki).echo(
        vec![v1.endpoint("v1", &id), dead],
        std::slice::from_ref(&id),
    ));
    client.push(&mesh);
    v1.push(&mesh);
    let n = 200;
    let (ok, failed) = send(client.outbound, n).await;
    // Binomial(200, 0.2): mean 40, sd 5.7; this range is about ±4 sd.
    // Retrying each v2 attempt onto v1 gave 1 or 2 failures (a request
    // fails only if all three of its weight rolls land on v2).
    assert!(
        (17..=70).contains(&failed.len()),
        "{} of {n} failed (v2's share is 20 %)",
        failed.len()
    );
    assert!(ok.iter().all(|b| b == "v1"), "{ok:?}");
    let dead_addr = format!("127.0.0.1:{dead_port}");
    for (status, body) in &failed {
        assert_eq!(*status, 503, "{body}");
        assert!(body.contains("upstream connect error"), "{body}");
        assert!(body.contains(&dead_addr), "{body}");
    }
    let m = client.metrics();
    assert_eq!(failures(&m, "connect_failure"), failed.len() as u64, "{m}");
}

/// What the fake gateway does with a connection.
struct Gateway {
    /// Refuse every connection (as a gateway does for a service it does
    /// not export); otherwise refuse only SNIs that name a subset (as a
    /// strait gateway does when its cluster defines no subsets).
    refuse_all: AtomicBool,
    /// Where accepted connections go.
    to: SocketAddr,
}

/// The SNI of a TLS ClientHello, when `buf` holds all of it.
fn sni_of(buf: &[u8]) -> Option<String> {
    let at = buf.windows(10).position(|w| w == b"outbound_.")?;
    let len = usize::from(u16::from_be_bytes([buf[at - 2], buf[at - 1]]));
    let name = buf.get(at..at + len)?;
    Some(String::from_utf8_lossy(name).into_owned())
}

/// A stand-in for another network's east-west gateway (SNI passthrough):
/// it reads the ClientHello, closes the connection when it would refuse
/// the SNI, else relays it (and the rest) to `to`.
async fn fake_gateway(gw: Arc<Gateway>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let gw = gw.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let sni = loop {
                    let mut chunk = [0u8; 4096];
                    let n = tcp.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // The record header says how long the ClientHello is.
                    if buf.len() >= 5 {
                        let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
                        if buf.len() >= 5 + len {
                            break sni_of(&buf);
                        }
                    }
                };
                let names_subset = sni
                    .as_deref()
                    .is_some_and(|s| !s.starts_with("outbound_.8080_._."));
                if gw.refuse_all.load(Ordering::SeqCst) || names_subset {
                    return;
                }
                let mut up = TcpStream::connect(gw.to).await.unwrap();
                up.write_all(&buf).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_subset_behind_a_gateway_is_reached_without_the_exporter_defining_it() {
    let pki = TestPki::new(TD);
    let client = sleep_client(&pki).await;
    let id = spiffe("demo", "echo");
    let v1 = Sidecar::start(
        "echo-v1",
        "demo",
        backend("v1").await,
        identity(&pki, &id),
        &pki,
    )
    .await;
    // v2 runs in cluster `west`, on another network, behind its gateway.
    let v2 = Sidecar::start(
        "echo-v2",
        "demo",
        backend("v2").await,
        identity(&pki, &id),
        &pki,
    )
    .await;
    let gw = Arc::new(Gateway {
        refuse_all: AtomicBool::new(false),
        to: v2.inbound,
    });
    let gw_addr = fake_gateway(gw.clone()).await;
    let west = pb::Endpoint {
        kind: pb::endpoint::Kind::Gateway as i32,
        address: gw_addr.ip().to_string(),
        port: u32::from(gw_addr.port()),
        // The labels every workload of west shares (its export's
        // `endpoint_labels`) and its cluster.
        labels: [
            ("version".to_string(), "v2".to_string()),
            ("strait.io/cluster".to_string(), "west".to_string()),
        ]
        .into(),
        network: "net-west".into(),
        cluster: "west".into(),
        healthy: true,
        weight: 1,
        ..Default::default()
    };
    let mesh = split(Mesh::new(&pki).echo(
        vec![v1.endpoint("v1", &id), west],
        std::slice::from_ref(&id),
    ));
    for s in [&client, &v1, &v2] {
        s.push(&mesh);
    }
    let n = 200;
    let (ok, failed) = send(client.outbound, n).await;
    assert!(failed.is_empty(), "{failed:?}");
    let to_v2 = ok.iter().filter(|b| *b == "v2").count();
    // Binomial(200, 0.2): mean 40, sd 5.7. With the subset in the SNI the
    // gateway refused every v2 attempt and retries moved it to v1: 0.
    assert!(
        (17..=70).contains(&to_v2),
        "v2 answered {to_v2} of {n} (its share is 20 %)"
    );

    // The gateway now refuses echo altogether: v2's share fails, saying
    // which gateway refused which SNI, and is counted by that reason.
    gw.refuse_all.store(true, Ordering::SeqCst);
    // Connections already open to the gateway stay up: start from none.
    let second = Sidecar::start(
        "sleep",
        "demo",
        backend("sleep").await,
        identity(&pki, &spiffe("demo", "sleep")),
        &pki,
    )
    .await;
    second.push(&mesh);
    let (ok, failed) = send(second.outbound, n).await;
    assert!(ok.iter().all(|b| b == "v1"), "{ok:?}");
    assert!(
        (17..=70).contains(&failed.len()),
        "{} of {n} failed (v2's share is 20 %)",
        failed.len()
    );
    for (status, body) in &failed {
        assert_eq!(*status, 503, "{body}");
        assert!(
            body.contains(&format!("east-west gateway of cluster west ({gw_addr}) closed the connection for SNI outbound_.8080_._.echo.demo.svc.cluster.local")),
            "{body}"
        );
    }
    let m = second.metrics();
    assert_eq!(failures(&m, "gateway_refused"), failed.len() as u64, "{m}");
}
