//! The small HTTP endpoints every strait server exposes, off the data path:
//! health (`/healthz/ready`, `/healthz/live`) and Prometheus metrics
//! (`/metrics`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Readiness, flipped by the component once it serves.
#[derive(Debug, Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A response with `body` of `content_type`.
pub fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

/// What an extra route answers.
pub type RouteFuture = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;

/// Extra routes of a listener: the answer for a path it knows, `None` for
/// the rest (the built-in paths come first).
pub type Routes = Arc<dyn Fn(&str) -> Option<RouteFuture> + Send + Sync>;

/// Serves health and/or metrics on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ready: Ready, registry: Option<Arc<Registry>>) {
    serve_with(listener, ready, registry, None).await
}

/// [`serve`], with extra routes.
pub async fn serve_with(
    listener: TcpListener,
    ready: Ready,
    registry: Option<Arc<Registry>>,
    routes: Option<Routes>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let ready = ready.clone();
        let registry = registry.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let ready = ready.clone();
                    let registry = registry.clone();
                    let routes = routes.clone();
                    async move {
                        let r = match (req.uri().path(), &registry) {
                            ("/healthz/ready", _) if ready.get() => {
                                respond(StatusCode::OK, "text/plain", "ready\n".into())
                            }
                            ("/healthz/ready", _) => respond(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain",
                                "not ready\n".into(),
                            ),
                            ("/healthz/live", _) => {
                                respond(StatusCode::OK, "text/plain", "live\n".into())
                            }
                            ("/metrics" | "/stats/prometheus", Some(reg)) => {
                                let mut text = String::new();
                                match prometheus_client::encoding::text::encode(&mut text, reg) {
                                    Ok(()) => respond(
                                        StatusCode::OK,
                                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                        text,
                                    ),
                                    Err(e) => respond(
                                        StatusCode::INTERNAL_SERVER_ERROR,
                                        "text/plain",
                                        format!("{e}\n"),
                                    ),
                                }
                            }
                            (path, _) => match routes.as_ref().and_then(|r| r(path)) {
                                Some(answer) => answer.await,
                                None => respond(
                                    StatusCode::NOT_FOUND,
                                    "text/plain",
                                    "not found\n".into(),
                                ),
                            },
                        };
                        Ok::<_, Infallible>(r)
                    }
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}
