//! Bodies stream through the sidecar pair (client sidecar, HTTP/2 over
//! mTLS, server sidecar), both ways: larger than any buffer limit, and
//! first bytes that arrive while the other side has not finished. Metrics
//! and the access log are written when the response ends. A request body
//! held whole (a declared length up to 1 MiB) can be retried; a streamed
//! one only until it was sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// returned slot (dropping the sender ends the response); `/upload` reads
/// the request body whole and answers its length and byte sum; `/first`
/// answers the request body's first chunk as soon as it has it, leaving
/// the rest unread; `/flaky` answers 503. The counter counts requests.
async fn streaming_app() -> (SocketAddr, Arc<Mutex<Option<Chunks>>>, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slot: Arc<Mutex<Option<Chunks>>> = Arc::default();
    let calls = Arc::new(AtomicU64::new(0));
    let held = slot.clone();
    let counted = calls.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let held = held.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let held = held.clone();
                        counted.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let path = req.uri().path().to_string();
                            let text = |s: String| Either::Left(Full::new(Bytes::from(s)));
                            let body = if path == "/upload" {
                                let got = req.into_body().collect().await.unwrap().to_bytes();
                                let sum: u64 = got.iter().map(|b| u64::from(*b)).sum();
                                text(format!("len={} sum={sum}", got.len()))
                            } else if path == "/first" {
                                let mut body = req.into_body();
                                let first = body.frame().await.unwrap().unwrap();
                                text(
                                    String::from_utf8_lossy(&first.into_data().unwrap())
                                        .to_string(),
                                )
                            } else if path == "/flaky" {
                                let mut r = hyper::Response::new(text("flaky\n".into()));
                                *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                return Ok::<_, Infallible>(r);
                            } else if path == "/big" {
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
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, slot, calls)
}

struct Setup {
    _pki: TestPki,
    client: Sidecar,
    server: Sidecar,
    mesh: Mesh,
    chunks: Arc<Mutex<Option<Chunks>>>,
    calls: Arc<AtomicU64>,
}

async fn setup() -> Setup {
    let pki = TestPki::new(TD);
    let (app, chunks, calls) = streaming_app().await;
    let (client, server, mesh) = sleep_and_echo(&pki, app).await;
    Setup {
        _pki: pki,
        client,
        server,
        mesh,
        chunks,
        calls,
    }
}

/// A request body the test feeds chunk by chunk (no declared length:
/// HTTP/1.1 chunked); dropping the sender ends it.
fn fed_body() -> (
    Chunks,
    StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>>>,
) {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    (tx, body)
}

/// `POST url` with `body` through the client sidecar's HTTP proxy.
async fn post<B>(proxy: SocketAddr, url: &str, body: B) -> hyper::Response<hyper::body::Incoming>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post(url).body(body).unwrap();
    sender.send_request(req).await.unwrap()
}

async fn text_of(resp: hyper::Response<hyper::body::Incoming>) -> String {
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).to_string()
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

#[tokio::test]
async fn an_upload_larger_than_any_buffer_streams_through() {
    let s = setup().await;
    // 20 MiB in 64 KiB chunks, no declared length.
    let (tx, body) = fed_body();
    let feed = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..BIG / chunk.len() {
            tx.send(Ok(Frame::data(Bytes::from(chunk.clone()))))
                .await
                .unwrap();
        }
    });
    let resp = post(s.client.outbound, "http://echo.demo:8080/upload", body).await;
    assert_eq!(resp.status(), 200);
    let per_chunk: u64 = (0..65536u64).map(|i| i % 251).sum();
    let want = format!("len={BIG} sum={}", per_chunk * (BIG as u64 / 65536));
    assert_eq!(text_of(resp).await, want);
    feed.await.unwrap();
    // The client's sidecar counted the request bytes as they went.
    let sum = s
        .client
        .metrics()
        .lines()
        .find(|l| l.starts_with("istio_request_bytes_sum{") && l.contains("response_code=\"200\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(sum, Some(BIG as f64));
}

#[tokio::test]
async fn a_streamed_request_reaches_the_app_before_the_client_finishes_it() {
    let s = setup().await;
    let (tx, body) = fed_body();
    tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
        .await
        .unwrap();
    // The app answers on the first chunk while the client still holds
    // the body open: nothing on the way waits for the whole body.
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        post(s.client.outbound, "http://echo.demo:8080/first", body),
    )
    .await
    .expect("the request is held back until the client ends it: it is buffered");
    assert_eq!(resp.status(), 200);
    drop(tx);
    assert_eq!(text_of(resp).await, "hello");
}

#[tokio::test]
async fn only_a_body_held_whole_is_retried_after_it_was_sent() {
    let s = setup().await;
    let mesh = s.mesh.clone().policy(
        "VirtualService",
        "demo",
        "echo",
        serde_json::json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}],
               "retries": {"attempts": 2, "retryOn": "5xx"}}]}),
    );
    s.client.push(&mesh);
    s.server.push(&mesh);

    // A declared length under the limit: held whole, sent three times.
    let resp = post(
        s.client.outbound,
        "http://echo.demo:8080/flaky",
        Full::new(Bytes::from_static(b"payload")),
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(s.calls.swap(0, Ordering::SeqCst), 3, "1 try + 2 retries");

    // No declared length: streamed, so once sent it cannot be sent again.
    let (tx, body) = fed_body();
    tx.send(Ok(Frame::data(Bytes::from_static(b"payload"))))
        .await
        .unwrap();
    drop(tx);
    let resp = post(s.client.outbound, "http://echo.demo:8080/flaky", body).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        text_of(resp).await,
        "flaky\n",
        "the app's own answer comes back"
    );
    assert_eq!(s.calls.load(Ordering::SeqCst), 1, "not retried");
}

#[tokio::test]
async fn curl_uploads_through_the_sidecars_with_and_without_a_length() {
    let s = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.bin");
    // 3 MiB: over the replay limit, so curl's `Expect: 100-continue` has
    // to be answered by the sidecar as it starts streaming the body.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let sum: u64 = data.iter().map(|b| u64::from(*b)).sum();
    let want = format!("len={} sum={sum}", data.len());
    let at_file = format!("@{}", file.display());
    for extra in [
        vec!["--data-binary", at_file.as_str()],
        vec![
            "--data-binary",
            at_file.as_str(),
            "-H",
            "Transfer-Encoding: chunked",
        ],
    ] {
        let r = via_proxy(s.client.outbound, "http://echo.demo:8080/upload", &extra).await;
        assert_eq!(r.status, 200, "{extra:?}: {r:?}");
        assert_eq!(r.body, want, "{extra:?}");
    }
}
