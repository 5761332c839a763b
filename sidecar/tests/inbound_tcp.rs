//! Plaintext that is not HTTP on the inbound listener (PERMISSIVE, as a
//! pod with the interception rules meets it from callers outside the
//! mesh): bytes go to the app as TCP, whether the client speaks first or
//! waits for the app to (a server-first protocol such as MySQL); STRICT
//! refuses it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use strait_ca::testing::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP app that greets (`hi\r\n`) as soon as a connection opens, then
/// answers each chunk with `app:<chunk>`.
async fn greeting_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(b"hi\r\n").await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut out = b"app:".to_vec();
                            out.extend_from_slice(&buf[..n]);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> String {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

async fn server(pki: &TestPki) -> Sidecar {
    let s = Sidecar::start(
        "db-v1",
        "demo",
        greeting_app().await,
        identity(pki, &spiffe("demo", "db")),
        pki,
    )
    .await;
    s.push(&Mesh::new(pki).workload("db-v1", "demo", &[("app", "db")]));
    s
}

#[tokio::test]
async fn plaintext_tcp_reaches_the_app_whoever_speaks_first() {
    let pki = TestPki::new(TD);
    let db = server(&pki).await;

    // The client speaks first (bytes that are neither TLS nor HTTP).
    let mut c = TcpStream::connect(db.inbound).await.unwrap();
    c.write_all(b"\x00\x01ping").await.unwrap();
    assert_eq!(read_exactly(&mut c, 4).await, "hi\r\n");
    assert_eq!(read_exactly(&mut c, 10).await, "app:\x00\x01ping");

    // The client waits for the app's greeting (server-first), which
    // comes after the 100 ms sniffing wait, not after the TLS handshake
    // timeout (10 s) that used to close such connections.
    let start = Instant::now();
    let mut c = TcpStream::connect(db.inbound).await.unwrap();
    assert_eq!(read_exactly(&mut c, 4).await, "hi\r\n");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    c.write_all(b"QUIT").await.unwrap();
    assert_eq!(read_exactly(&mut c, 8).await, "app:QUIT");

    let m = db.metrics();
    assert!(
        m.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("connection_security_policy=\"none\"")
                && l.ends_with(" 2")),
        "{m}"
    );
}

#[tokio::test]
async fn strict_refuses_plaintext_tcp() {
    let pki = TestPki::new(TD);
    let db = server(&pki).await;
    db.push(
        &Mesh::new(&pki)
            .workload("db-v1", "demo", &[("app", "db")])
            .policy(
                "PeerAuthentication",
                "demo",
                "default",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
    );
    let mut c = TcpStream::connect(db.inbound).await.unwrap();
    c.write_all(b"\x00\x01ping").await.unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(
        r.is_err() || rest.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
}
