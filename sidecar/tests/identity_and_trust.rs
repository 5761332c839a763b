//! Identity rotation, federated trust domains, deny-listed intermediates,
//! and the health/metrics endpoints, end to end on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use strait_ca::testing::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads from `s` until `needle` has been seen (or the peer closes).
async fn read_until(s: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the answer comes");
    String::from_utf8_lossy(&got).to_string()
}

#[tokio::test]
async fn new_connections_use_the_newest_identity_and_live_ones_stay() {
    let pki = TestPki::new(TD);
    let client = sleep_client(&pki).await;
    let server = Sidecar::start(
        "echo-v1",
        "demo",
        backend("v1").await,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
    )
    .await;
    let id = spiffe("demo", "echo");
    let mesh = Mesh::new(&pki).echo(vec![server.endpoint("v1", &id)], std::slice::from_ref(&id));
    client.push(&mesh);
    server.push(&mesh);

    // A tunnel opened with the first certificate.
    let mut tunnel = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    tunnel
        .write_all(b"CONNECT echo.demo:8080 HTTP/1.1\r\nHost: echo.demo:8080\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut tunnel, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let mut c = ProxyClient::connect(client.outbound).await;
    let (_, body, _) = c.get("http://echo.demo:8080/").await;
    let first = client.identity.borrow().clone().unwrap();
    let xfcc = header_in(&body, "x-forwarded-client-cert")
        .unwrap()
        .to_string();
    assert!(
        xfcc.contains(&format!("Hash={}", first.leaf_sha256())),
        "{xfcc}"
    );

    // Rotate the client's certificate (same ID, new key).
    let second = identity(&pki, &spiffe("demo", "sleep"));
    client.identity.send_replace(Some(second.clone()));
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 200, "{body}");
    let xfcc = header_in(&body, "x-forwarded-client-cert").unwrap();
    assert!(
        xfcc.contains(&format!("Hash={}", second.leaf_sha256())),
        "{xfcc}"
    );
    assert_ne!(first.leaf_sha256(), second.leaf_sha256());

    // Rotate the server's too: it keeps serving new connections.
    server
        .identity
        .send_replace(Some(identity(&pki, &spiffe("demo", "echo"))));
    let r = via_proxy(client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");

    // The tunnel of the first certificate still works.
    tunnel
        .write_all(b"GET /still-here HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut tunnel, "/still-here").await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("backend=v1"), "{answer}");
}

#[tokio::test]
async fn a_federated_server_is_trusted_until_its_intermediate_is_denied() {
    let local = TestPki::new(TD);
    let peer = TestPki::new("peer.example");
    let client = Sidecar::start(
        "sleep",
        "demo",
        backend("sleep").await,
        identity(&local, &spiffe("demo", "sleep")),
        &local,
    )
    .await;
    let peer_id = "spiffe://peer.example/ns/demo/sa/echo".to_string();
    let server = Sidecar::start(
        "echo-peer",
        "demo",
        backend("peer").await,
        identity(&peer, &peer_id),
        &peer,
    )
    .await;
    let ep = server.endpoint("v1", &peer_id);
    // Each side: its own bundle local, the other federated.
    let mut client_mesh = Mesh::new(&local).echo(vec![ep.clone()], std::slice::from_ref(&peer_id));
    let mut server_mesh = Mesh::default().echo(vec![ep], std::slice::from_ref(&peer_id));
    server_mesh.bundles = vec![bundle_of(&peer, true), bundle_of(&local, false)];

    // Without the peer's bundle the server cannot be verified.
    client.push(&client_mesh);
    server.push(&server_mesh);
    let r = via_proxy(client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("TLS handshake"), "{}", r.body);

    client_mesh.bundles.push(bundle_of(&peer, false));
    client.push(&client_mesh);
    let r = via_proxy(client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(backend_of(&r.body), Some("peer"));
    let xfcc = header_in(&r.body, "x-forwarded-client-cert").unwrap();
    assert!(xfcc.starts_with(&format!("By={peer_id};")), "{xfcc}");
    assert!(
        xfcc.ends_with(&format!("URI={}", spiffe("demo", "sleep"))),
        "{xfcc}"
    );

    // Deny-list the peer's intermediate: new connections are refused.
    let denied = strait_ca::tls::sha256_hex(peer.intermediate.certificate_der());
    client_mesh.bundles[1].denied_intermediates = vec![denied];
    client.push(&client_mesh);
    let r = via_proxy(client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("revoked"), "{}", r.body);
}

#[tokio::test]
async fn readiness_needs_an_identity_and_a_config_and_metrics_are_served() {
    let pki = TestPki::new(TD);
    let server = Sidecar::start(
        "echo-v1",
        "demo",
        backend("v1").await,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
    )
    .await;
    let ready = strait_runtime::http::Ready::default();
    let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_addr = health.local_addr().unwrap();
    tokio::spawn(strait_runtime::http::serve(
        health,
        ready.clone(),
        Some(server.registry.clone()),
    ));
    strait_sidecar::follow_readiness(
        server.identity.subscribe(),
        server.config.subscribe(),
        ready,
    );
    let url = format!("http://{health_addr}/healthz/ready");
    // An identity but no config yet.
    let r = curl(&["--noproxy", "*", &url]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body.contains("waiting for configuration") && !r.body.contains("certificate"),
        "{}",
        r.body
    );

    server.push(&Mesh::new(&pki));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut status = 0;
    while tokio::time::Instant::now() < deadline {
        status = curl(&["--noproxy", "*", &url]).await.status;
        if status == 200 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(status, 200, "ready once both are there");

    // Losing the identity makes it unready again.
    server.identity.send_replace(None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        status = curl(&["--noproxy", "*", &url]).await.status;
        if status == 503 {
            break;
        }
    }
    assert_eq!(status, 503);

    // A plaintext request is recorded; the endpoint serves Istio's names.
    server
        .identity
        .send_replace(Some(identity(&pki, &spiffe("demo", "echo"))));
    let inbound = format!("http://{}/", server.inbound);
    assert_eq!(curl(&["--noproxy", "*", &inbound]).await.status, 200);
    let stats = format!("http://{health_addr}/stats/prometheus");
    let r = curl(&["--noproxy", "*", &stats]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("istio_requests_total{"), "{}", r.body);
    assert!(
        r.body.contains("destination_workload=\"echo-v1\""),
        "{}",
        r.body
    );
}

/// Waits (up to 5 s, the bound live connections must close within) until
/// the peer closes `s`; how long it took.
async fn closed_within_5s(s: &mut tokio::net::TcpStream) -> Duration {
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the live connection closes within 5 s");
    start.elapsed()
}

/// A CONNECT tunnel through `client`'s outbound proxy to the echo service,
/// checked to carry a request.
async fn open_tunnel(client: &Sidecar) -> tokio::net::TcpStream {
    let mut tunnel = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    tunnel
        .write_all(b"CONNECT echo.demo:8080 HTTP/1.1\r\nHost: echo.demo:8080\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut tunnel, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tunnel
        .write_all(b"GET /live HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut tunnel, "/live").await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    tunnel
}

/// `strait_sidecar_untrusted_closed_connections_total{direction}` of `s`.
fn untrusted_closed(s: &Sidecar, direction: &str) -> u64 {
    let want =
        format!("strait_sidecar_untrusted_closed_connections_total{{direction=\"{direction}\"}} ");
    s.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(want.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The mesh of two clusters sharing a root: the caller `sleep` with the
/// `west` intermediate, `echo` with the `east` one.
async fn west_calls_east() -> (TestPki, TestPki, Sidecar, Sidecar, Mesh) {
    let east = TestPki::with_cluster(TD, "east");
    let west = east.sibling("west");
    let client = sleep_client(&west).await;
    let id = spiffe("demo", "echo");
    let server = Sidecar::start(
        "echo-v1",
        "demo",
        backend("v1").await,
        identity(&east, &id),
        &east,
    )
    .await;
    let mesh = Mesh::new(&east).echo(vec![server.endpoint("v1", &id)], std::slice::from_ref(&id));
    client.push(&mesh);
    server.push(&mesh);
    (east, west, client, server, mesh)
}

#[tokio::test]
async fn live_inbound_connections_close_when_the_callers_intermediate_is_denied() {
    let (_east, west, client, server, mesh) = west_calls_east().await;
    let mut tunnel = open_tunnel(&client).await;
    let mut c = ProxyClient::connect(client.outbound).await;
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 200, "{body}");

    // Only the server learns of the revocation (the revoked cluster's
    // sidecar keeps its config): it must close what it holds.
    let mut revoked = mesh.clone();
    revoked.bundles[0].denied_intermediates = vec![strait_ca::tls::sha256_hex(
        west.intermediate.certificate_der(),
    )];
    server.push(&revoked);
    let took = closed_within_5s(&mut tunnel).await;
    eprintln!("inbound: tunnel closed {took:?} after the deny-list arrived");
    // The pooled connection went too: the next request needs a handshake,
    // which the server refuses.
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        untrusted_closed(&server, "inbound") >= 2,
        "{}",
        server.metrics()
    );
    assert_eq!(untrusted_closed(&client, "outbound"), 0);
    // The closed TCP connection is counted closed as any other.
    assert!(
        server
            .metrics()
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{") && !l.ends_with(" 0")),
        "{}",
        server.metrics()
    );
}

#[tokio::test]
async fn live_outbound_connections_close_when_the_servers_intermediate_is_denied() {
    let (east, _west, client, server, mesh) = west_calls_east().await;
    let mut tunnel = open_tunnel(&client).await;
    let mut c = ProxyClient::connect(client.outbound).await;
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 200, "{body}");

    // Only the client learns that the server's intermediate is revoked.
    let mut revoked = mesh.clone();
    revoked.bundles[0].denied_intermediates = vec![strait_ca::tls::sha256_hex(
        east.intermediate.certificate_der(),
    )];
    client.push(&revoked);
    let took = closed_within_5s(&mut tunnel).await;
    eprintln!("outbound: tunnel closed {took:?} after the deny-list arrived");
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert!(
        untrusted_closed(&client, "outbound") >= 2,
        "{}",
        client.metrics()
    );
    assert_eq!(untrusted_closed(&server, "inbound"), 0);
}

#[tokio::test]
async fn a_config_push_with_the_same_trust_leaves_live_connections_alone() {
    let (_east, _west, client, server, mesh) = west_calls_east().await;
    let mut tunnel = open_tunnel(&client).await;
    // Another push, other services, the same trust: nothing closes.
    let more = mesh.clone().workload("sleep", "demo", &[("app", "sleep")]);
    client.push(&more);
    server.push(&more);
    tunnel
        .write_all(b"GET /still-here HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut tunnel, "/still-here").await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    assert_eq!(untrusted_closed(&server, "inbound"), 0);
    assert_eq!(untrusted_closed(&client, "outbound"), 0);
}
