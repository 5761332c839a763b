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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_ca::testing::TestPki;
use tokio::net::TcpListener;
use tonic::codec::Streaming;
use tonic::{Code, Request, Response, Status};

/// The one message type of the test service.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
    #[prost(string, tag = "2")]
    note: String,
}

fn codec() -> tonic_prost::ProstCodec<Msg, Msg> {
    tonic_prost::ProstCodec::default()
}

fn path(method: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_maybe_shared(format!("/strait.test.Echo/{method}")).unwrap()
}

/// `strait.test.Echo`, served over HTTP/2 only:
/// - `Unary` echoes `data`, with `note` the `x-forwarded-client-cert` it
///   got; `data` = `fail` answers NOT_FOUND;
/// - `Sum` (client streaming) answers `n=<messages> len=<bytes>`;
/// - `Count` (server streaming) sends `data[0]` messages, then ABORTED;
/// - `Ping` (bidirectional) answers each message as it comes.
async fn grpc_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                    Ok::<_, Infallible>(serve(req).await)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

async fn serve(req: hyper::Request<Incoming>) -> http::Response<tonic::body::Body> {
    let method = req
        .uri()
        .path()
        .strip_prefix("/strait.test.Echo/")
        .unwrap_or_default()
        .to_string();
    let mut grpc = tonic::server::Grpc::new(codec());
    match method.as_str() {
        "Unary" => {
            let svc = tower::service_fn(|r: Request<Msg>| async move {
                let xfcc = r
                    .metadata()
                    .get("x-forwarded-client-cert")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let m = r.into_inner();
                if m.data == b"fail" {
                    return Err(Status::not_found("no such thing"));
                }
                Ok(Response::new(Msg {
                    data: m.data,
                    note: xfcc,
                }))
            });
            grpc.unary(svc, req).await
        }
        "Sum" => {
            let svc = tower::service_fn(|r: Request<Streaming<Msg>>| async move {
                let mut s = r.into_inner();
                let (mut n, mut len) = (0, 0);
                while let Some(m) = s.message().await? {
                    n += 1;
                    len += m.data.len();
                }
                Ok::<_, Status>(Response::new(Msg {
                    data: vec![],
                    note: format!("n={n} len={len}"),
                }))
            });
            grpc.client_streaming(svc, req).await
        }
        "Count" => {
            let svc = tower::service_fn(|r: Request<Msg>| async move {
                let n = r.into_inner().data.first().copied().unwrap_or(0);
                let items: Vec<Result<Msg, Status>> = (0..n)
                    .map(|i| {
                        Ok(Msg {
                            data: vec![i],
                            note: String::new(),
                        })
                    })
                    .chain([Err(Status::aborted(format!("stopped after {n}")))])
                    .collect();
                Ok::<_, Status>(Response::new(futures::stream::iter(items)))
            });
            grpc.server_streaming(svc, req).await
        }
        "Ping" => {
            let svc = tower::service_fn(|r: Request<Streaming<Msg>>| async move {
                let answers = r.into_inner().map(|m| {
                    m.map(|m| Msg {
                        note: format!("pong {}", String::from_utf8_lossy(&m.data)),
                        data: m.data,
                    })
                });
                Ok::<_, Status>(Response::new(answers))
            });
            grpc.streaming(svc, req).await
        }
        other => Status::unimplemented(format!("no method {other:?}")).into_http(),
    }
}

/// A gRPC client for `echo.demo:8080` that connects to `outbound` (as a
/// redirected connection would) and names the service in `:authority`.
async fn client(outbound: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin("http://echo.demo:8080".parse().unwrap())
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

fn msg(data: &[u8]) -> Msg {
    Msg {
        data: data.to_vec(),
        note: String::new(),
    }
}

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
