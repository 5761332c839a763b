//! One request an inbound connection carries: its path normalized (the
//! mesh's `pathNormalization`; one that cannot be is answered 400),
//! AuthorizationPolicy, then the app (HTTP/1.1, or HTTP/2 for a client that
//! spoke it) with `x-forwarded-client-cert` set to what was verified and
//! the caller's claims removed; metrics and the access log once the answer
//! has gone through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_model::request_path::normalize;
use tokio::net::TcpStream;

use super::{Claimed, Peer, destination_labels, namespace_of};
use crate::metrics;
use crate::policy::{Decision, RequestAttrs};
use crate::{Counted, Life, Observed, ProxyBody, Shared};

/// The request body as it goes on to the app: streamed, counted.
type AppBody = Counted<Incoming>;

/// The app's pooled clients: HTTP/1.1, and HTTP/2 with prior knowledge
/// (h2c) for requests whose client spoke HTTP/2 (see
/// [`crate::ORIG_PROTO_HEADER`]).
#[derive(Clone)]
pub(crate) struct App {
    http1: crate::app::AppHttp1<AppBody>,
    http2: Client<Dial, AppBody>,
    /// `<ip>:<port>` of the app, formatted once (for every request's URI
    /// and access log line).
    address: Arc<str>,
    pub(super) socket: SocketAddr,
}

impl App {
    fn new(app: SocketAddr) -> App {
        let mut http2 = Client::builder(TokioExecutor::new());
        http2
            .timer(hyper_util::rt::TokioTimer::new())
            .http2_only(true);
        App {
            http1: crate::app::AppHttp1::new(app),
            http2: http2.build(Dial(app)),
            address: app.to_string().into(),
            socket: app,
        }
    }
}

/// The app's clients by workload port: `--app`, and `--app`'s host on
/// each of `--app-ports` (a pod that serves more than one port).
#[derive(Clone)]
pub(crate) struct Apps {
    main: App,
    others: Arc<std::collections::HashMap<u16, App>>,
}

impl Apps {
    pub(super) fn new(opts: &crate::Options) -> Apps {
        let others = opts
            .app_ports
            .iter()
            .filter(|&&p| p != opts.app.port())
            .map(|&p| (p, App::new(SocketAddr::new(opts.app.ip(), p))))
            .collect();
        Apps {
            main: App::new(opts.app),
            others: Arc::new(others),
        }
    }

    /// The app serving workload port `port`: its own listener when it is
    /// one of `--app-ports`, else `--app`.
    pub(super) fn get(&self, port: u16) -> &App {
        self.others.get(&port).unwrap_or(&self.main)
    }
}

/// Connects to the app whatever the request's URI names, so that an
/// HTTP/2 request keeps its `:authority` (the service name the client
/// used, as Envoy's inbound keeps it).
#[derive(Clone, Copy)]
pub(crate) struct Dial(SocketAddr);

impl tower::Service<http::Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(tcp))
        })
    }
}

/// Why a request did not reach the app.
#[derive(Debug, thiserror::Error)]
enum AppUnreachable {
    /// Over HTTP/1.1.
    #[error(transparent)]
    Http1(#[from] crate::app::AppError),
    /// Over HTTP/2.
    #[error(transparent)]
    Http2(#[from] hyper_util::client::legacy::Error),
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

/// Serves one request of `peer` for workload port `port`.
pub(super) async fn request(
    shared: Arc<Shared>,
    app: App,
    peer: Arc<Peer>,
    port: u16,
    req: Request<Incoming>,
    life: Life,
) -> Response<Observed<ProxyBody>> {
    let start = Instant::now();
    let started = metrics::now_rfc3339();
    let cfg = shared.config.borrow().clone();
    let ns = shared.opts.workload.namespace.clone();
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // Policy and the app see the path normalized (Istio's
    // pathNormalization); one that cannot be is answered 400, as Envoy does.
    let (path, bad_path) = match normalize(raw_path, cfg.path_normalization) {
        Ok(p) => (p.into_owned(), None),
        Err(e) => (raw_path.to_string(), Some(e)),
    };
    let method = parts.method.as_str().to_string();
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let attrs = RequestAttrs {
        method: Some(&method),
        path: Some(&path),
        host: Some(&authority),
        port,
        headers: Some(&parts.headers),
        peer_identity: peer.identity.as_deref(),
        source_ip: peer.addr.map(|a| a.ip()),
        source_namespace: peer.identity.as_deref().and_then(namespace_of),
        source_labels: None,
    };
    // `Err`: the path is refused before any policy.
    let decision = match bad_path {
        None => Ok(cfg.policies.authorize(&ns, &cfg.my_labels, &attrs)),
        Some(e) => Err(e.to_string()),
    };
    let record = Record {
        start,
        started,
        protocol: metrics::http_protocol(&parts.headers),
        claimed: Claimed::from(Some(&parts.headers)),
        request_id: parts
            .headers
            .get(crate::names::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        app_address: app.address.clone(),
        req_bytes: Arc::new(AtomicU64::new(0)),
        method,
        path,
        authority,
    };
    // The body streams to the app (no retries here to keep it for).
    let body = Counted::new(body, record.req_bytes.clone());
    let (resp, reason) = match decision {
        Err(why) => {
            tracing::debug!(reason = %why, peer = ?peer.identity, "request refused");
            (
                plain(StatusCode::BAD_REQUEST, "invalid request path\n").map(ProxyBody::Own),
                Some(why),
            )
        }
        Ok(Decision::Deny { policy, reason }) => {
            tracing::debug!(%policy, %reason, peer = ?peer.identity, "request denied");
            (
                plain(StatusCode::FORBIDDEN, "RBAC: access denied").map(ProxyBody::Own),
                Some(format!("denied by {policy}: {reason}")),
            )
        }
        Ok(Decision::Allow { .. }) => {
            let to_app = ToApp {
                app: &app,
                peer: &peer,
                authority: &record.authority,
                path: &record.path,
            };
            match to_app.send(parts, body, life).await {
                Ok(answered) => answered,
                // Refused before it could be sent: answered as is, not
                // observed.
                Err(refused) => return refused.map(|b| Observed::plain(ProxyBody::Own(b))),
            }
        }
    };
    record.observe(shared, peer, resp, reason)
}

/// An allowed request on its way to the app.
struct ToApp<'a> {
    app: &'a App,
    peer: &'a Peer,
    /// `Host` or `:authority` as the client sent it.
    authority: &'a str,
    /// The normalized path.
    path: &'a str,
}

impl ToApp<'_> {
    /// Sends the request on, as what was verified says about the caller
    /// and in the HTTP version its client spoke: the app's answer, or the
    /// sidecar's when the app could not be reached (with why). `Err`: a
    /// request whose authority or path makes no request target, refused
    /// before anything was sent.
    async fn send(
        &self,
        mut parts: http::request::Parts,
        body: AppBody,
        life: Life,
    ) -> Result<(Response<ProxyBody>, Option<String>), Response<Full<Bytes>>> {
        // What the app learns about the caller is what was verified
        // here, never what the caller claimed.
        parts.headers.remove(crate::names::XFCC);
        parts.headers.remove(crate::names::SOURCE_CLUSTER);
        parts.headers.remove(crate::names::SOURCE_WORKLOAD);
        if let Some(v) = &self.peer.xfcc {
            parts.headers.insert(crate::names::XFCC, v.clone());
        }
        // A protocol switch (WebSocket): the caller's side of it.
        let client_side = crate::upgrade_of(parts.version, &parts.headers)
            .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        // The app gets the HTTP version its client spoke.
        let orig_proto = parts.headers.remove(crate::names::ORIG_PROTO);
        let http2 = parts.version == http::Version::HTTP_2 && orig_proto.is_none();
        let sent = if http2 {
            self.http2(parts, body).await?
        } else {
            self.http1(parts, body).await?
        };
        Ok(match sent {
            Ok(mut r) => {
                if r.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client_side) = client_side
                {
                    let app_side = hyper::upgrade::on(&mut r);
                    crate::splice_upgraded(
                        client_side,
                        app_side,
                        life,
                        |r| tracing::debug!(result = ?r, "switched protocol to the app ended"),
                    );
                }
                // The app's response streams through.
                (r.map(ProxyBody::Stream), None)
            }
            Err(e) => (
                plain(StatusCode::SERVICE_UNAVAILABLE, "the app is unreachable\n")
                    .map(ProxyBody::Own),
                Some(format!("app {}: {e}", self.app.address)),
            ),
        })
    }

    /// Over HTTP/2: `:authority` stays what the client asked for; [`Dial`]
    /// connects to the app whatever it says.
    async fn http2(
        &self,
        mut parts: http::request::Parts,
        body: AppBody,
    ) -> Result<Result<Response<Incoming>, AppUnreachable>, Response<Full<Bytes>>> {
        let uri = format!("http://{}{}", self.authority, self.path);
        match uri.parse() {
            Ok(u) => parts.uri = u,
            Err(_) => {
                return Err(plain(
                    StatusCode::BAD_REQUEST,
                    "bad request authority or path\n",
                ));
            }
        }
        parts.headers.remove(http::header::HOST);
        Ok(self
            .app
            .http2
            .request(Request::from_parts(parts, body))
            .await
            .map_err(AppUnreachable::from))
    }

    /// Over HTTP/1.1: origin form, as HTTP/1.1 sends it to a server.
    async fn http1(
        &self,
        mut parts: http::request::Parts,
        body: AppBody,
    ) -> Result<Result<Response<Incoming>, AppUnreachable>, Response<Full<Bytes>>> {
        match http::Uri::try_from(self.path) {
            Ok(u) => parts.uri = u,
            Err(_) => return Err(plain(StatusCode::BAD_REQUEST, "bad request path\n")),
        }
        parts.version = http::Version::HTTP_11;
        // HTTP/2 carries the host in `:authority`; the app gets it as Host.
        if !parts.headers.contains_key(http::header::HOST)
            && let Ok(v) = self.authority.parse()
        {
            parts.headers.insert(http::header::HOST, v);
        }
        Ok(self
            .app
            .http1
            .request(Request::from_parts(parts, body))
            .await
            .map_err(AppUnreachable::from))
    }
}

/// What the metrics and the access log say of one request, known before
/// its answer has gone through.
struct Record {
    start: Instant,
    started: String,
    method: String,
    path: String,
    authority: String,
    request_id: String,
    protocol: &'static str,
    /// What the caller's sidecar said about it.
    claimed: Claimed,
    app_address: Arc<str>,
    /// The request body's bytes so far.
    req_bytes: Arc<AtomicU64>,
}

impl Record {
    /// `resp` with the metrics and the access log line written once it
    /// has gone through (it may stream): its size, gRPC status and the
    /// whole duration are known then. The labels are made then too, off
    /// the response's path. `reason`: why the app did not answer.
    fn observe(
        self,
        shared: Arc<Shared>,
        peer: Arc<Peer>,
        resp: Response<ProxyBody>,
        reason: Option<String>,
    ) -> Response<Observed<ProxyBody>> {
        let code = resp.status().as_u16();
        let (head, body) = resp.into_parts();
        let body = Observed::new(body, &head.headers, move |end| {
            let r = self;
            let millis = r.start.elapsed().as_secs_f64() * 1000.0;
            let mut labels = destination_labels(&shared, &peer, r.claimed, r.protocol, code);
            labels.destination_service = peer.service.clone().unwrap_or_else(|| {
                r.authority
                    .rsplit_once(':')
                    .map_or(r.authority.as_str(), |(h, _)| h)
                    .to_string()
            });
            let req_len = r.req_bytes.load(Ordering::Relaxed);
            let grpc = end.grpc_status.as_deref();
            let labels = &shared
                .metrics
                .request_ended(labels, grpc, millis, req_len, end.bytes);
            metrics::log(&metrics::AccessLog {
                start_time: r.started,
                reporter: "destination",
                method: &r.method,
                path: &r.path,
                authority: &r.authority,
                response_code: code,
                duration_ms: millis,
                upstream_host: &r.app_address,
                peer_identity: peer.identity.as_deref(),
                source_cluster: &labels.source_cluster,
                destination_cluster: &labels.destination_cluster,
                request_id: &r.request_id,
                grpc_status: grpc,
                reason: reason.as_deref(),
            });
        });
        Response::from_parts(head, body)
    }
}
