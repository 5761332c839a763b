//! Responses stream through the sidecar pair (client sidecar, HTTP/2 over
//! mTLS, server sidecar): larger than the buffer limit, and a response
//! whose first bytes arrive while the app has not finished it. Metrics
//! and the access log are written when the response ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use strait_ca::testing::TestPki;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// 20 MiB: more than the sidecar buffers (16 MiB).
const BIG: usize = 20 << 20;

type Chunks = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// An app: `/big` answers [`BIG`] bytes of a pattern; `/stream` answers
/// `first\n` at once and the rest only when the test sends it through the
/// returned slot (dropping the sender ends the response).
async fn streaming_app() -> (SocketAddr, Arc<Mutex<Option<Chunks>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slot: Arc<Mutex<Option<Chunks>>> = Arc::default();
    let held = slot.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let held = held.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let held = held.clone();
                    async move {
                        let body = if req.uri().path() == "/big" {
                            let data: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
                            Either::Left(Full::new(Bytes::from(data)))
                        } else {
                            let (tx, rx) = mpsc::channel(4);
                            tx.send(Ok(Frame::data(Bytes::from_static(b"first\n"))))
                                .await
                                .unwrap();
                            *held.lock().unwrap() = Some(tx);
                            Either::Right(StreamBody::new(futures::stream::unfold(
                                rx,
                                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
                            )))
                        };
                        Ok::<_, Infallible>(hyper::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, slot)
}

struct Setup {
    _pki: TestPki,
    client: Sidecar,
    _server: Sidecar,
    chunks: Arc<Mutex<Option<Chunks>>>,
}

async fn setup() -> Setup {
    let pki = TestPki::new(TD);
    let (app, chunks) = streaming_app().await;
    let (client, server, _) = sleep_and_echo(&pki, app).await;
    Setup {
        _pki: pki,
        client,
        _server: server,
        chunks,
    }
}

/// `GET url` through the client sidecar's HTTP proxy; the response with
/// its body unread.
async fn get(proxy: SocketAddr, url: &str) -> hyper::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// The `istio_response_bytes_sum` of the client's 200s, if recorded.
fn response_bytes(client: &Sidecar) -> Option<f64> {
    client
        .metrics()
        .lines()
        .find(|l| l.starts_with("istio_response_bytes_sum{") && l.contains("response_code=\"200\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn a_response_larger_than_the_buffer_streams_through() {
    let s = setup().await;
    let resp = get(s.client.outbound, "http://echo.demo:8080/big").await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), BIG);
    assert!(
        body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
        "the body arrived changed"
    );
    // Its size was counted as it went through.
    assert_eq!(response_bytes(&s.client), Some(BIG as f64));
}

#[tokio::test]
async fn a_streamed_response_arrives_before_the_app_finishes_it() {
    let s = setup().await;
    // The head and the first chunk come while the app still holds the
    // response open: nothing on the way buffers it whole.
    let (body, first) = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = get(s.client.outbound, "http://echo.demo:8080/stream").await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await;
        (body, first)
    })
    .await
    .expect("the response is held back until the app ends it: it is buffered");
    let first = first.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"first\n"));
    // Not ended: not counted yet.
    assert_eq!(response_bytes(&s.client), None);

    let tx = s
        .chunks
        .lock()
        .unwrap()
        .take()
        .expect("the app holds the stream");
    tx.send(Ok(Frame::data(Bytes::from_static(b"last\n"))))
        .await
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"last\n"));
    // Ended: the client's sidecar counted the whole response.
    assert_eq!(response_bytes(&s.client), Some(11.0));
}
