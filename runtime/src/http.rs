//! The small HTTP endpoints every strait server exposes, off the data path:
//! health (`/healthz/ready`, `/healthz/live`) and Prometheus metrics
//! (`/metrics`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Readiness. A component is ready when it says it serves
/// ([`Ready::set`]) and no named task it waits for is pending
/// ([`Ready::pending`]: e.g. the first certificate, the first
/// configuration), so `/healthz/ready` can say what it still waits for.
/// Cheap to clone (every clone is the same state) and to read;
/// [`Ready::wait`] resolves when it turns ready, without polling.
#[derive(Debug, Clone)]
pub struct Ready(Arc<watch::Sender<ReadyState>>);

#[derive(Debug, Default)]
struct ReadyState {
    serving: bool,
    /// Named tasks still pending, with how many of each.
    pending: std::collections::BTreeMap<&'static str, usize>,
}

impl ReadyState {
    fn ready(&self) -> bool {
        self.serving && self.pending.is_empty()
    }
}

impl Default for Ready {
    fn default() -> Self {
        Ready(Arc::new(watch::Sender::new(ReadyState::default())))
    }
}

impl Ready {
    /// Whether the component serves (it is ready once nothing is pending
    /// either).
    pub fn set(&self, serving: bool) {
        self.0.send_if_modified(|s| {
            let was = s.ready();
            s.serving = serving;
            was != s.ready()
        });
    }

    /// Ready now.
    pub fn get(&self) -> bool {
        self.0.borrow().ready()
    }

    /// Registers a task readiness waits for, until the returned guard is
    /// dropped (or [`Pending::done`]).
    pub fn pending(&self, task: &'static str) -> Pending {
        self.0.send_if_modified(|s| {
            let was = s.ready();
            *s.pending.entry(task).or_default() += 1;
            was != s.ready()
        });
        Pending {
            ready: self.clone(),
            task,
        }
    }

    /// What readiness waits for: the pending tasks' names, and `serving`
    /// when the component does not serve yet.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let s = self.0.borrow();
        let mut out: Vec<&'static str> = s.pending.keys().copied().collect();
        if !s.serving {
            out.push("serving");
        }
        out
    }

    /// Resolves once ready (at once when ready already).
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(ReadyState::ready).await;
    }

    fn finish(&self, task: &'static str) {
        self.0.send_if_modified(|s| {
            let was = s.ready();
            if let Some(n) = s.pending.get_mut(task) {
                *n -= 1;
                if *n == 0 {
                    s.pending.remove(task);
                }
            }
            was != s.ready()
        });
    }
}

/// A task readiness waits for; done when dropped.
#[derive(Debug)]
#[must_use = "the task is done when this is dropped"]
pub struct Pending {
    ready: Ready,
    task: &'static str,
}

impl Pending {
    /// The task is done.
    pub fn done(self) {}
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.ready.finish(self.task);
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

/// [`serve`], with extra routes (the built-in paths come first).
pub async fn serve_with(
    listener: TcpListener,
    ready: Ready,
    registry: Option<Arc<Registry>>,
    routes: Option<Routes>,
) {
    let all: Routes = Arc::new(move |path: &str| {
        if let Some(r) = builtin(path, &ready, registry.as_deref()) {
            return Some(Box::pin(std::future::ready(r)) as RouteFuture);
        }
        routes.as_ref().and_then(|r| r(path))
    });
    serve_routes(listener, "health/metrics", all).await
}

/// The answer of a built-in path, `None` for any other.
fn builtin(
    path: &str,
    ready: &Ready,
    registry: Option<&Registry>,
) -> Option<Response<Full<Bytes>>> {
    Some(match (path, registry) {
        ("/healthz/ready", _) if ready.get() => {
            respond(StatusCode::OK, "text/plain", "ready\n".into())
        }
        ("/healthz/ready", _) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!(
                "not ready: waiting for {}\n",
                ready.waiting_for().join(", ")
            ),
        ),
        ("/healthz/live", _) => respond(StatusCode::OK, "text/plain", "live\n".into()),
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
        _ => return None,
    })
}

/// Serves `routes` on `listener` (HTTP/1.1 and h2c) until the task is
/// dropped; a path no route knows gets 404. `what` names the listener in
/// logs.
pub async fn serve_routes(listener: TcpListener, what: &'static str, routes: Routes) {
    let mut acceptor = crate::accept::Acceptor::new(listener, what);
    loop {
        let (tcp, _) = acceptor.accept().await;
        let routes = routes.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let answer = routes(req.uri().path());
                    async move {
                        let r = match answer {
                            Some(answer) => answer.await,
                            None => {
                                respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
                            }
                        };
                        Ok::<_, Infallible>(r)
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_readiness_ends_when_it_turns_true() {
        let ready = Ready::default();
        let waiter = tokio::spawn({
            let ready = ready.clone();
            async move { ready.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        ready.set(true);
        waiter.await.unwrap();
        ready.wait().await;
        ready.set(false);
        assert!(!ready.get());
    }

    #[tokio::test]
    async fn ready_waits_for_every_named_task() {
        let ready = Ready::default();
        ready.set(true);
        let cert = ready.pending("certificate");
        let config = ready.pending("configuration");
        let config2 = ready.pending("configuration");
        assert!(!ready.get());
        assert_eq!(ready.waiting_for(), ["certificate", "configuration"]);
        let body = |r: &Ready| {
            let resp = builtin("/healthz/ready", r, None).unwrap();
            (resp.status().as_u16(), format!("{:?}", resp.body()))
        };
        let (status, text) = body(&ready);
        assert_eq!(status, 503);
        assert!(
            text.contains("waiting for certificate, configuration"),
            "{text}"
        );
        let waiter = tokio::spawn({
            let ready = ready.clone();
            async move { ready.wait().await }
        });
        cert.done();
        drop(config);
        assert_eq!(ready.waiting_for(), ["configuration"], "one of two left");
        assert!(!waiter.is_finished());
        drop(config2);
        waiter.await.unwrap();
        assert!(ready.get());
        ready.set(false);
        assert_eq!(ready.waiting_for(), ["serving"]);
    }

    #[test]
    fn built_in_paths_follow_readiness_and_the_registry() {
        let ready = Ready::default();
        let status = |p: &str, ready: &Ready, reg: Option<&Registry>| {
            builtin(p, ready, reg).map(|r| r.status().as_u16())
        };
        assert_eq!(status("/healthz/ready", &ready, None), Some(503));
        ready.set(true);
        assert_eq!(status("/healthz/ready", &ready, None), Some(200));
        assert_eq!(status("/healthz/live", &ready, None), Some(200));
        assert_eq!(status("/metrics", &ready, None), None);
        let reg = Registry::default();
        assert_eq!(status("/metrics", &ready, Some(&reg)), Some(200));
        assert_eq!(status("/debug", &ready, Some(&reg)), None);
    }

    /// `GET path` over a fresh connection: (status, body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[tokio::test]
    async fn a_health_listener_serves_health_only_and_extra_routes_after_it() {
        let ready = Ready::default();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health = l.local_addr().unwrap();
        tokio::spawn(serve(l, ready.clone(), None));
        // (path, ready, status, body fragment)
        let cases = [
            ("/healthz/ready", true, 200, "ready"),
            ("/healthz/ready", false, 503, "not ready"),
            ("/healthz/live", false, 200, "live"),
            ("/debug/nacks", true, 404, "not found"),
            ("/metrics", true, 404, "not found"),
        ];
        for (path, r, status, body) in cases {
            ready.set(r);
            let (s, b) = get(health, path).await;
            assert_eq!(s, status, "{path} ready={r}");
            assert!(b.contains(body), "{path}: {b:?}");
        }

        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = l.local_addr().unwrap();
        let routes: Routes = Arc::new(|path: &str| {
            (path == "/extra").then(|| {
                let r = respond(StatusCode::OK, "text/plain", "extra\n".into());
                Box::pin(std::future::ready(r)) as RouteFuture
            })
        });
        let registry = Arc::new(Registry::default());
        tokio::spawn(serve_with(l, ready.clone(), Some(registry), Some(routes)));
        assert_eq!(get(other, "/extra").await, (200, "extra\n".into()));
        assert_eq!(get(other, "/metrics").await.0, 200);
        assert_eq!(get(other, "/nothing").await.0, 404);
    }
}
