//! A gRPC test service (`strait.test.Echo`, codec only: no generated
//! code) and its client side, for the gRPC and interop tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;

use futures::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::codec::Streaming;
use tonic::{Request, Response, Status};

/// The one message type of the test service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    #[prost(string, tag = "2")]
    pub note: String,
}

pub fn codec() -> tonic_prost::ProstCodec<Msg, Msg> {
    tonic_prost::ProstCodec::default()
}

pub fn path(method: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_maybe_shared(format!("/strait.test.Echo/{method}")).unwrap()
}

/// `strait.test.Echo`, served over HTTP/2 only:
/// - `Unary` echoes `data`, with `note` the `x-forwarded-client-cert` it
///   got; `data` = `fail` answers NOT_FOUND;
/// - `Sum` (client streaming) answers `n=<messages> len=<bytes>`;
/// - `Count` (server streaming) sends `data[0]` messages, then ABORTED;
/// - `Ping` (bidirectional) answers each message as it comes.
pub async fn grpc_app() -> SocketAddr {
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
pub async fn client(outbound: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin("http://echo.demo:8080".parse().unwrap())
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

pub fn msg(data: &[u8]) -> Msg {
    Msg {
        data: data.to_vec(),
        note: String::new(),
    }
}
