//! Protocol switches through the sidecar pair (WebSocket's handshake is
//! one): the client asks its sidecar to upgrade, the request crosses mTLS
//! as HTTP/1.1 on a connection of its own, the app answers 101, and from
//! then on bytes flow both ways untouched until each side closes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use strait_ca::testing::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An app that switches to `websocket` when asked: it first sends the
/// `x-forwarded-client-cert` it got as a line, then answers every chunk
/// with `echo:<chunk>`, and closes when the client closes. Other requests
/// get 426.
async fn upgrading_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|mut req: hyper::Request<_>| async move {
                    let asks = req
                        .headers()
                        .get("upgrade")
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
                    if !asks {
                        let mut r =
                            hyper::Response::new(Full::new(Bytes::from("upgrade required\n")));
                        *r.status_mut() = hyper::StatusCode::UPGRADE_REQUIRED;
                        return Ok::<_, Infallible>(r);
                    }
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(on.await.unwrap());
                        io.write_all(format!("xfcc={xfcc}\n").as_bytes())
                            .await
                            .unwrap();
                        let mut buf = [0u8; 1024];
                        loop {
                            match io.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    let mut out = b"echo:".to_vec();
                                    out.extend_from_slice(&buf[..n]);
                                    io.write_all(&out).await.unwrap();
                                }
                            }
                        }
                        let _ = io.shutdown().await;
                    });
                    let mut r = hyper::Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                    r.headers_mut()
                        .insert("connection", "upgrade".parse().unwrap());
                    r.headers_mut()
                        .insert("upgrade", "websocket".parse().unwrap());
                    Ok(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Sends `head` to `proxy` and reads the response head (up to the blank
/// line), byte by byte so nothing after it is consumed.
async fn handshake(proxy: SocketAddr, head: &str) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.unwrap(),
            1,
            "closed mid-head: {got:?}"
        );
        got.push(byte[0]);
    }
    (tcp, String::from_utf8(got).unwrap())
}

async fn read_some(tcp: &mut TcpStream, want: usize) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < want {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("bytes in time")
            .unwrap();
        assert!(n > 0, "closed early after {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

const HANDSHAKE: &str = "GET http://echo.demo:8080/ws HTTP/1.1\r\n\
    Host: echo.demo:8080\r\n\
    Connection: Upgrade\r\n\
    Upgrade: websocket\r\n\
    Sec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test]
async fn a_websocket_handshake_switches_both_sidecars_to_raw_bytes() {
    let pki = TestPki::new(TD);
    let (client, _server, _mesh) = sleep_and_echo(&pki, upgrading_app().await).await;

    let (mut ws, head) = handshake(client.outbound, HANDSHAKE).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );

    // The app saw the caller's verified identity on the handshake.
    let mut line = String::new();
    while !line.ends_with('\n') {
        line += &read_some(&mut ws, 1).await;
    }
    assert!(
        line.starts_with("xfcc=By=spiffe://cluster.local/ns/demo/sa/echo;")
            && line
                .trim_end()
                .ends_with(";URI=spiffe://cluster.local/ns/demo/sa/sleep"),
        "{line}"
    );

    // Bytes both ways, several times, on the same connection.
    for i in 0..5 {
        let msg = format!("ping {i}");
        ws.write_all(msg.as_bytes()).await.unwrap();
        assert_eq!(
            read_some(&mut ws, 5 + msg.len()).await,
            format!("echo:{msg}")
        );
    }

    // The client closes its side; the app sees the end and closes too.
    ws.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), ws.read_to_end(&mut rest))
        .await
        .expect("the close reaches the app and comes back")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn switched_connections_are_separate_and_plain_requests_unaffected() {
    let pki = TestPki::new(TD);
    let (client, _server, _mesh) = sleep_and_echo(&pki, upgrading_app().await).await;
    // No Upgrade: an ordinary request, the app's own 426.
    let r = via_proxy(client.outbound, "http://echo.demo:8080/ws", &[]).await;
    assert_eq!(r.status, 426, "{r:?}");

    // Four switched connections at once, each answering its own bytes.
    let proxy = client.outbound;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let (mut ws, head) = handshake(proxy, HANDSHAKE).await;
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                let mut line = String::new();
                while !line.ends_with('\n') {
                    line += &read_some(&mut ws, 1).await;
                }
                let msg = format!("connection {i}");
                ws.write_all(msg.as_bytes()).await.unwrap();
                assert_eq!(
                    read_some(&mut ws, 5 + msg.len()).await,
                    format!("echo:{msg}")
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // And plain requests still work next to them.
    let r = via_proxy(client.outbound, "http://echo.demo:8080/ws", &[]).await;
    assert_eq!(r.status, 426, "{r:?}");
}

#[tokio::test]
async fn a_switched_connection_holds_shutdown_until_the_drain_deadline() {
    let pki = TestPki::new(TD);
    let mut client = Sidecar::start_with(
        "sleep",
        "demo",
        backend("sleep").await,
        identity(&pki, &spiffe("demo", "sleep")),
        &pki,
        Duration::from_millis(500),
    )
    .await;
    let server = Sidecar::start(
        "echo-v1",
        "demo",
        upgrading_app().await,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
    )
    .await;
    let id = spiffe("demo", "echo");
    let mesh = Mesh::new(&pki).echo(vec![server.endpoint("v1", &id)], std::slice::from_ref(&id));
    client.push(&mesh);
    server.push(&mesh);

    let (mut ws, head) = handshake(client.outbound, HANDSHAKE).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut line = String::new();
    while !line.ends_with('\n') {
        line += &read_some(&mut ws, 1).await;
    }
    // Shutdown waits for the open switched connection, which still
    // works meanwhile, then closes it at the drain deadline.
    let start = std::time::Instant::now();
    let stopping = tokio::spawn(async move {
        client.shutdown().await;
        start.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    ws.write_all(b"still").await.unwrap();
    assert_eq!(read_some(&mut ws, 10).await, "echo:still");
    let took = tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown ends at the drain deadline")
        .unwrap();
    assert!(took >= Duration::from_millis(500), "stopped after {took:?}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), ws.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the switched connection is closed at the deadline"
    );
}
