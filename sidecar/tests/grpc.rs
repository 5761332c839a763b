//! gRPC through the sidecar pair, as a gRPC app meets it: a tonic client
//! talks HTTP/2 with prior knowledge (h2c) to its sidecar's outbound
//! listener, naming the service in `:authority`; the destination's
//! sidecar speaks HTTP/2 to a gRPC server (which serves nothing else).
//! Unary calls with their status, client and server streaming, a
//! ping-pong that only works when neither direction is buffered, and a
//! status in trailers that survives a route timeout (which buffers the
//! response).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::grpc::*;
use common::*;
use futures::SinkExt;
use strait_ca::testing::TestPki;
use tonic::{Code, Request, Status};

async fn setup() -> (TestPki, Sidecar, Sidecar, Mesh) {
    let pki = TestPki::new(TD);
    let app = grpc_app().await;
    let (client, server, mesh) = sleep_and_echo(&pki, app).await;
    (pki, client, server, mesh)
}

async fn count(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    n: u8,
) -> (Vec<u8>, Status) {
    grpc.ready().await.unwrap();
    let mut s = grpc
        .server_streaming(Request::new(msg(&[n])), path("Count"), codec())
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    loop {
        match s.message().await {
            Ok(Some(m)) => got.extend(m.data),
            Ok(None) => panic!("the stream ended without its status"),
            Err(status) => return (got, status),
        }
    }
}

#[tokio::test]
async fn unary_calls_and_their_status_cross_the_mesh() {
    let (_pki, client_sidecar, server, _mesh) = setup().await;
    let mut grpc = client(client_sidecar.outbound).await;
    grpc.ready().await.unwrap();
    let resp = grpc
        .unary(Request::new(msg(b"hello")), path("Unary"), codec())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.data, b"hello");
    // The server's sidecar verified the caller over mTLS.
    assert!(
        resp.note
            .ends_with(";URI=spiffe://cluster.local/ns/demo/sa/sleep"),
        "{}",
        resp.note
    );

    grpc.ready().await.unwrap();
    let err = grpc
        .unary(Request::new(msg(b"fail")), path("Unary"), codec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such thing");

    // Istio's metrics: HTTP 200s of protocol grpc, told apart by their
    // gRPC status (NOT_FOUND came in a trailers-only head), on both sides.
    for sidecar in [&client_sidecar, &server] {
        assert_eq!(grpc_calls(sidecar, "0"), 1, "{}", sidecar.metrics());
        assert_eq!(grpc_calls(sidecar, "5"), 1, "{}", sidecar.metrics());
    }
}

/// `istio_requests_total` of gRPC calls that got HTTP 200 and `status`.
fn grpc_calls(sidecar: &Sidecar, status: &str) -> u64 {
    sidecar
        .metrics()
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("response_code=\"200\"")
                && l.contains(&format!("grpc_response_status=\"{status}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn streams_flow_both_ways_without_buffering() {
    let (_pki, client_sidecar, _server, _mesh) = setup().await;
    let mut grpc = client(client_sidecar.outbound).await;

    // Client streaming: 64 messages of 64 KiB, 4 MiB in all.
    grpc.ready().await.unwrap();
    let outgoing = futures::stream::iter((0..64).map(|_| msg(&[7u8; 65536])));
    let resp = grpc
        .client_streaming(Request::new(outgoing), path("Sum"), codec())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.note, format!("n=64 len={}", 64 * 65536));

    // Server streaming, its status in trailers after the messages.
    let (got, status) = count(&mut grpc, 5).await;
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(status.message(), "stopped after 5");
    // ABORTED, read from the trailers.
    assert_eq!(grpc_calls(&client_sidecar, "10"), 1);

    // Ping-pong: each message is sent only after the answer to the last
    // one arrived, which cannot happen if either direction is held back.
    tokio::time::timeout(Duration::from_secs(10), async {
        grpc.ready().await.unwrap();
        let (mut tx, rx) = futures::channel::mpsc::channel::<Msg>(1);
        tx.send(msg(b"0")).await.unwrap();
        let mut answers = grpc
            .streaming(Request::new(rx), path("Ping"), codec())
            .await
            .unwrap()
            .into_inner();
        for i in 0..5 {
            let m = answers.message().await.unwrap().expect("an answer");
            assert_eq!(m.note, format!("pong {i}"));
            if i < 4 {
                tx.send(msg(format!("{}", i + 1).as_bytes())).await.unwrap();
            }
        }
        drop(tx);
        assert!(answers.message().await.unwrap().is_none());
    })
    .await
    .expect("the ping-pong stalled: a body is buffered on the way");
}

#[tokio::test]
async fn a_route_timeout_buffers_the_response_but_keeps_its_trailers() {
    let (_pki, client_sidecar, server, mesh) = setup().await;
    let mesh = mesh.policy(
        "VirtualService",
        "demo",
        "echo",
        serde_json::json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}],
               "timeout": "5s"}]}),
    );
    client_sidecar.push(&mesh);
    server.push(&mesh);
    let mut grpc = client(client_sidecar.outbound).await;
    let (got, status) = count(&mut grpc, 3).await;
    assert_eq!(got, vec![0, 1, 2]);
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(status.message(), "stopped after 3");
}
