//! The HTTP version sidecars speak to each other (Istio's
//! `h2UpgradePolicy`): an HTTP/1.1 app's requests stay HTTP/1.1 between
//! the sidecars, over pooled keep-alive connections, one request at a time
//! each; a DestinationRule with `UPGRADE` sends them as HTTP/2 over one
//! shared connection. A counting TCP relay in front of the server sidecar
//! shows the connections the client sidecar opens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::json;
use strait_ca::testing::TestPki;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

const WAIT: Duration = Duration::from_secs(10);

/// A TCP relay to `to`; counts the connections it accepted.
async fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    (addr, accepted)
}

/// An HTTP/1.1 app that answers its HTTP version, each answer only once
/// `gate` has let `n` requests through together (`None`: at once).
async fn gated_app(gate: Option<Arc<Barrier>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let gate = gate.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let gate = gate.clone();
                    async move {
                        if let Some(g) = gate {
                            g.wait().await;
                        }
                        let orig = req.headers().get("x-strait-orig-proto").is_some();
                        let body = format!("{:?} orig-proto={orig}", req.version());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A client and a server sidecar ([`sleep_and_echo`]), the server reached
/// through a counting relay, and `rule` (a DestinationRule spec for
/// `echo`) if any.
async fn pair(
    pki: &TestPki,
    app: SocketAddr,
    rule: Option<serde_json::Value>,
) -> (Sidecar, Sidecar, Arc<AtomicU64>, Mesh) {
    let (client, server, _) = sleep_and_echo(pki, app).await;
    let (relay, accepted) = counting_relay(server.inbound).await;
    let id = spiffe("demo", "echo");
    let mut ep = server.endpoint("v1", &id);
    ep.port = u32::from(relay.port());
    let mut mesh = Mesh::new(pki).echo(vec![ep], std::slice::from_ref(&id));
    if let Some(rule) = rule {
        mesh = mesh.policy("DestinationRule", "demo", "echo", rule);
    }
    client.push(&mesh);
    server.push(&mesh);
    (client, server, accepted, mesh)
}

/// Sends `n` GETs at once, each over a client connection of its own, and
/// returns the bodies (all must be 200).
async fn concurrent(proxy: SocketAddr, n: usize) -> Vec<String> {
    answered(spawn_gets(proxy, n)).await
}

/// The bodies of `gets`, each of which must be answered 200.
async fn answered(gets: Vec<Gets>) -> Vec<String> {
    let mut bodies = Vec::new();
    for t in gets {
        let (status, body, _) = tokio::time::timeout(WAIT, t)
            .await
            .expect("all requests answered")
            .unwrap();
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
    }
    bodies
}

/// Waits until `sidecar` has `n` idle pooled HTTP/1.1 connections.
async fn idle_connections(sidecar: &Sidecar, n: usize) {
    let pool = &sidecar.shared.pool;
    tokio::time::timeout(WAIT, async {
        while pool.idle_http1() != n {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} idle connections, not {n}", pool.idle_http1()));
}

#[tokio::test]
async fn http1_stays_http1_over_pooled_keep_alive_connections() {
    let pki = TestPki::new(TD);
    let gate = Arc::new(Barrier::new(6));
    let app = gated_app(Some(gate.clone())).await;
    let (client, _server, accepted, _) = pair(&pki, app, None).await;

    // Six requests at once need six HTTP/1.1 connections; the app answers
    // none of them before all six have reached it.
    for body in concurrent(client.outbound, 6).await {
        assert_eq!(body, "HTTP/1.1 orig-proto=false");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
    assert_eq!(client.shared.pool.len(), 0, "no HTTP/2 connection");
    // All six go back to the pool, and the next six reuse them.
    idle_connections(&client, 6).await;
    concurrent(client.outbound, 6).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        6,
        "pooled connections reused"
    );
}

#[tokio::test]
async fn sequential_requests_share_one_connection_up_to_max_requests_per_connection() {
    let pki = TestPki::new(TD);
    let app = gated_app(None).await;
    let rule = json!({"host": "echo", "trafficPolicy": {"connectionPool": {"http": {"maxRequestsPerConnection": 3}}}});
    let (client, _server, accepted, _) = pair(&pki, app, Some(rule)).await;
    let mut c = ProxyClient::connect(client.outbound).await;
    for _ in 0..9 {
        let (status, body, _) = c.get("http://echo.demo:8080/").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "HTTP/1.1 orig-proto=false");
    }
    // Three requests per connection: three connections for nine.
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn upgrade_sends_http1_as_http2_over_one_connection() {
    let pki = TestPki::new(TD);
    let gate = Arc::new(Barrier::new(6));
    let app = gated_app(Some(gate)).await;
    let rule = json!({"host": "echo", "trafficPolicy": {"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}}});
    let (client, _server, accepted, _) = pair(&pki, app, Some(rule)).await;
    // The destination's sidecar still speaks HTTP/1.1 to its app, and
    // takes the marker off.
    for body in concurrent(client.outbound, 6).await {
        assert_eq!(body, "HTTP/1.1 orig-proto=false");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one multiplexed connection"
    );
    assert_eq!(client.shared.pool.len(), 1);
    assert_eq!(client.shared.pool.idle_http1(), 0);
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_replaced() {
    let pki = TestPki::new(TD);
    let app = gated_app(None).await;
    let (client, mut server, accepted, mesh) = pair(&pki, app, None).await;
    let mut c = ProxyClient::connect(client.outbound).await;
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 200, "{body}");
    idle_connections(&client, 1).await;
    // The server sidecar restarts on the same address: the pooled
    // connection is dead, and the next request goes over a new one.
    let inbound = server.inbound;
    server.shutdown().await;
    let restarted = Sidecar::start_on(
        "echo-v1",
        "demo",
        app,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
        TcpListener::bind(inbound).await.unwrap(),
    )
    .await;
    restarted.push(&mesh);
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// An HTTP/1.1 app that holds every request until `open` says true, and
/// records how many it has in (now, and the most at once).
async fn held_app() -> (
    SocketAddr,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    tokio::sync::watch::Sender<bool>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let most = Arc::new(AtomicU64::new(0));
    let now = Arc::new(AtomicU64::new(0));
    let (open, opened) = tokio::sync::watch::channel(false);
    let (seen_most, seen_now) = (most.clone(), now.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (most, now, opened) = (most.clone(), now.clone(), opened.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: hyper::Request<_>| {
                    let (most, now, mut opened) = (most.clone(), now.clone(), opened.clone());
                    async move {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        let _ = opened.wait_for(|o| *o).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from("ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen_most, seen_now, open)
}

/// A GET under way: status, body, headers.
type Gets = tokio::task::JoinHandle<(u16, String, http::HeaderMap)>;

/// Sends `n` GETs at once, each over a client connection of its own.
fn spawn_gets(proxy: SocketAddr, n: usize) -> Vec<Gets> {
    (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = ProxyClient::connect(proxy).await;
                c.get("http://echo.demo:8080/").await
            })
        })
        .collect()
}

/// Waits until the app has `n` requests in.
async fn app_holds(now: &AtomicU64, n: u64) {
    tokio::time::timeout(WAIT, async {
        while now.load(Ordering::SeqCst) != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the app holds {}, not {n}", now.load(Ordering::SeqCst)));
}

#[tokio::test]
async fn max_connections_queues_requests_beyond_it() {
    // maxConnections 2, no pending limit (Istio's default): of 6 requests
    // at once the app gets 2, the rest wait (none overflows), and all are
    // answered once the app lets go.
    let pki = TestPki::new(TD);
    let (app, most, now, open) = held_app().await;
    let rule = json!({"host": "echo",
                      "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 2}}}});
    let (client, _server, _accepted, mesh) = pair(&pki, app, Some(rule)).await;
    let gets = spawn_gets(client.outbound, 6);
    app_holds(&now, 2).await;
    open.send_replace(true);
    answered(gets).await;
    assert_eq!(most.load(Ordering::SeqCst), 2);

    // With http1MaxPendingRequests 1: two in, one waiting, the other three
    // overflow at once (503 naming the limit) while the app holds the two.
    open.send_replace(false);
    most.store(0, Ordering::SeqCst);
    let rule = json!({"host": "echo",
                      "trafficPolicy": {"connectionPool": {
                          "tcp": {"maxConnections": 2},
                          "http": {"http1MaxPendingRequests": 1}}}});
    client.push(&mesh.policy("DestinationRule", "demo", "echo", rule));
    let mut gets = spawn_gets(client.outbound, 6);
    let mut overflowed = 0;
    while overflowed < 3 {
        let (done, _, rest) = futures::future::select_all(gets).await;
        gets = rest;
        let (status, body, _) = done.unwrap();
        assert_eq!(
            status, 503,
            "only overflows end while the app holds: {body}"
        );
        assert!(body.contains("overflow"), "{body}");
        overflowed += 1;
    }
    // The two with a connection reach the app (they may still be on the
    // way), the waiting one does not.
    app_holds(&now, 2).await;
    open.send_replace(true);
    answered(gets).await;
    assert_eq!(most.load(Ordering::SeqCst), 2);
}

/// An app whose answer sends its head and a first chunk at once and the
/// rest only once `open` is true.
async fn trickling_app() -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (open, opened) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let opened = opened.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: hyper::Request<_>| {
                    let opened = opened.clone();
                    let chunks = futures::stream::unfold(0u8, move |step| {
                        let mut opened = opened.clone();
                        async move {
                            let chunk = match step {
                                0 => "first ",
                                1 => {
                                    let _ = opened.wait_for(|o| *o).await;
                                    "last"
                                }
                                _ => return None,
                            };
                            let frame = Frame::data(Bytes::from(chunk));
                            Some((Ok::<_, std::convert::Infallible>(frame), step + 1))
                        }
                    });
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(
                            chunks,
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, open)
}

#[tokio::test]
async fn http2_max_requests_counts_a_request_until_its_body_ends() {
    // Envoy counts a request against max_requests until its stream ends:
    // while one answer's body is still coming, a second request overflows.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new(TD);
    let (app, open) = trickling_app().await;
    let rule = json!({"host": "echo",
                      "trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 1}}}});
    let (client, _server, _accepted, _mesh) = pair(&pki, app, Some(rule)).await;
    let mut first = TcpStream::connect(client.outbound).await.unwrap();
    first
        .write_all(b"GET http://echo.demo:8080/ HTTP/1.1\r\nHost: echo.demo:8080\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&seen).contains("first ") {
            let n = first.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the answer's head and first chunk");
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );

    let mut c = ProxyClient::connect(client.outbound).await;
    // (Let in, it would wait on the app's held body.)
    let (status, body, _) = tokio::time::timeout(WAIT, c.get("http://echo.demo:8080/"))
        .await
        .expect("a second request let in while the first answer's body is open");
    assert_eq!(
        status, 503,
        "the first request still holds the slot: {body}"
    );
    assert!(body.contains("overflow"), "{body}");

    open.send_replace(true);
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&seen).ends_with("0\r\n\r\n") {
            let n = first.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the rest of the answer");
    assert!(String::from_utf8_lossy(&seen).contains("last"));
    // The slot is given back once the body is through (the report that
    // drops it runs just after): the next request gets in.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body, _) = c.get("http://echo.demo:8080/").await;
        if status == 200 {
            break;
        }
        assert!(body.contains("overflow"), "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::task::yield_now().await;
    }
}
