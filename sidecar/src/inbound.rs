//! The inbound listener: mTLS termination (a TLS client must present a
//! certificate that verifies against the trust bundles, whatever the
//! PeerAuthentication mode, as Istio's inbound requires: TLS without one
//! is refused in the handshake, never served as an anonymous peer),
//! plaintext detection for PERMISSIVE and DISABLE (HTTP per request,
//! anything else, including a server-first protocol, as TCP; STRICT
//! refuses plaintext), AuthorizationPolicy per request or connection, and
//! the app behind it with `x-forwarded-client-cert` set to what was
//! verified. A request's path is normalized (the mesh's
//! `pathNormalization`, [`strait_model::request_path`]) before policy sees
//! it, and the app gets the normalized path; a path that cannot be
//! normalized (`%00`) is answered 400 and goes no further.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_ca::tls::{Accept, SpiffeClientVerifier};
use strait_model::request_path::normalize;
use strait_model::sni::IstioSni;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::MeshConfig;
use crate::identity::Identity;
use crate::metrics::{self, RequestLabels};
use crate::policy::{Decision, MtlsMode, RequestAttrs};
use crate::{Counted, Life, Observed, Phase, ProxyBody, Shared, Tracker};
use tracing::Instrument;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS server config for the current identity (rebuilt when it
/// changes). A client certificate is mandatory: PERMISSIVE means
/// "plaintext or mTLS", not "TLS from anyone" (Istio's inbound requires
/// one on its TLS filter chains too).
fn server_config(shared: &Shared, id: &Identity) -> Option<Arc<rustls::ServerConfig>> {
    let verifier = SpiffeClientVerifier::new(shared.trust.clone(), Accept::Any, true);
    strait_ca::tls::server_config(
        &id.chain_der,
        &id.key_pkcs8,
        verifier,
        &[b"h2", b"istio-h2", b"http/1.1", b"istio-http/1.1", b"istio"],
    )
    .map(Arc::new)
    .map_err(|e| tracing::error!(error = %e, "inbound TLS config"))
    .ok()
}

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
    socket: SocketAddr,
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
    fn new(opts: &crate::Options) -> Apps {
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
    fn get(&self, port: u16) -> &App {
        self.others.get(&port).unwrap_or(&self.main)
    }
}

/// The workload port an mTLS connection is for: the target port of the
/// service port its SNI names (Istio's authorization `ports` and
/// port-level mTLS speak of workload ports), the SNI's port itself when
/// the service or port is not known here; `None` without an Istio SNI.
fn workload_port(cfg: &MeshConfig, sni: Option<IstioSni<'_>>) -> Option<u16> {
    let sni = sni?;
    Some(cfg.target_port(sni.host, sni.port).unwrap_or(sni.port))
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

/// Who is calling, as far as the connection tells.
#[derive(Debug, Clone, Default)]
struct Peer {
    /// Verified SPIFFE ID.
    identity: Option<String>,
    /// SHA-256 of the peer's leaf.
    hash: Option<String>,
    mtls: bool,
    addr: Option<SocketAddr>,
    /// The service FQDN the client asked for in its SNI.
    service: Option<String>,
    /// `x-forwarded-client-cert` for the app, made once per connection.
    xfcc: Option<http::HeaderValue>,
}

/// Accepts until `stop`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<Phase>,
    active: Tracker,
) {
    let apps = Apps::new(&shared.opts);
    // The config of the newest identity; holding the identity keeps the
    // comparison by pointer sound.
    let mut tls_cache: Option<(Arc<Identity>, Arc<rustls::ServerConfig>)> = None;
    let mut listener = strait_runtime::accept::Acceptor::new(listener, "inbound");
    loop {
        let (tcp, addr) = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        // One TLS config per identity version.
        let tls = match shared.current_identity() {
            Some(id) => match &tls_cache {
                Some((k, c)) if Arc::ptr_eq(k, &id) => Some(c.clone()),
                _ => {
                    let c = server_config(&shared, &id);
                    if let Some(c) = &c {
                        tls_cache = Some((id, c.clone()));
                    }
                    c
                }
            },
            None => None,
        };
        let shared = shared.clone();
        let apps = apps.clone();
        let guard = active.guard();
        let life = Life {
            active: active.clone(),
            phase: stop.clone(),
        };
        tokio::spawn(async move {
            let _guard = guard;
            handle(shared, apps, tls, tcp, addr, life)
                .instrument(tracing::debug_span!(
                    "inbound",
                    peer = %addr,
                    peer_identity = tracing::field::Empty,
                    service = tracing::field::Empty,
                ))
                .await;
        });
    }
}

/// What the first byte of a connection says it is.
fn looks_like_tls(first: u8) -> bool {
    // A TLS record of type handshake.
    first == 0x16
}

async fn handle(
    shared: Arc<Shared>,
    apps: Apps,
    tls: Option<Arc<rustls::ServerConfig>>,
    tcp: TcpStream,
    addr: SocketAddr,
    life: Life,
) {
    let cfg = shared.config.borrow().clone();
    let ns = shared.opts.workload.namespace.clone();
    // Redirected here (transparent inbound capture): the port the caller
    // dialed is the workload port.
    let dialed = crate::transparent::redirected_to(&tcp).map(|a| a.port());
    let app_port = dialed.unwrap_or(shared.opts.app.port());
    let app = apps.get(app_port);
    let mode = cfg.policies.mtls_mode(&ns, &cfg.my_labels, app_port);
    let first = match first_move(&tcp, mode, app.socket).await {
        Some(f) => f,
        None => return,
    };
    let plain = Peer {
        addr: Some(addr),
        ..Peer::default()
    };
    let is_tls = match first {
        FirstMove::Client(byte) => looks_like_tls(byte),
        FirstMove::App(app_conn) => {
            // A server-first protocol in plaintext (MySQL, SMTP): bytes
            // both ways, the connection authorized as TCP.
            serve_tcp(
                shared,
                tcp,
                plain,
                app_port,
                app.socket,
                life.phase,
                Some(app_conn),
                None,
            )
            .await;
            return;
        }
    };
    if !is_tls {
        if mode == MtlsMode::Strict {
            tracing::info!(%addr, "STRICT mTLS: a plaintext connection refused");
            return;
        }
        // Plaintext (PERMISSIVE, DISABLE): HTTP per request, anything
        // else as TCP, as Istio's inbound passes it on.
        if crate::transparent::sniff(&tcp, crate::transparent::SNIFF_WAIT).await
            == crate::transparent::Sniffed::Http
        {
            serve_http(
                shared,
                app.clone(),
                TokioIo::new(tcp),
                plain,
                app_port,
                life,
            )
            .await;
        } else {
            serve_tcp(
                shared, tcp, plain, app_port, app.socket, life.phase, None, None,
            )
            .await;
        }
        return;
    }
    let Some(tls) = tls else {
        tracing::info!(%addr, "no workload certificate yet: TLS connection refused");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%addr, error = %e, "inbound TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(%addr, "inbound TLS handshake timed out");
            return;
        }
    };
    let (_, conn) = stream.get_ref();
    let sni = conn
        .server_name()
        .and_then(|n| strait_model::sni::parse(n).ok());
    let port = workload_port(&cfg, sni).unwrap_or(app_port);
    let app = apps.get(port);
    let service = sni.map(|s| s.host.to_string());
    let tcp_mode = conn.alpn_protocol() == Some(b"istio".as_slice());
    let certs = conn
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    if let Some(service) = &service {
        tracing::Span::current().record("service", service.as_str());
    }
    let mut peer = Peer {
        mtls: !certs.is_empty(),
        addr: Some(addr),
        service,
        ..Peer::default()
    };
    // Taken before the chain is verified below: a trust change from here
    // on is seen by the connection (see `crate::live`).
    let watch = strait_ca::live::TrustWatch::new(&shared.trust);
    let chain = strait_ca::live::PeerChain::from_certs(&certs);
    if let Some(leaf) = certs.first() {
        match strait_ca::tls::peer_identity(&shared.trust, &certs, time::OffsetDateTime::now_utc())
        {
            Ok(svid) => {
                let id = svid.spiffe_id.as_str().to_owned();
                let hash = strait_ca::tls::sha256_hex(leaf.as_ref());
                let own = shared.current_identity();
                let own = own.as_ref().map_or("", |i| i.spiffe_id.as_str());
                peer.xfcc = http::HeaderValue::try_from(xfcc(own, &hash, &id)).ok();
                tracing::Span::current().record("peer_identity", id.as_str());
                peer.identity = Some(id);
                peer.hash = Some(hash);
            }
            Err(e) => {
                tracing::info!(%addr, error = %e, "peer certificate refused");
                return;
            }
        }
    }
    let mode = cfg.policies.mtls_mode(&ns, &cfg.my_labels, port);
    if mode == MtlsMode::Strict && peer.identity.is_none() {
        tracing::info!(%addr, "STRICT mTLS: a connection without a client certificate refused");
        return;
    }
    let watched = Some(crate::live::Watched::new(
        &shared.metrics,
        "inbound",
        watch,
        chain,
    ));
    if tcp_mode {
        serve_tcp(
            shared, stream, peer, port, app.socket, life.phase, None, watched,
        )
        .await;
    } else {
        let served = serve_http(shared, app.clone(), TokioIo::new(stream), peer, port, life);
        crate::live::Watched::run(watched, served).await;
    }
}

/// The namespace in a SPIFFE ID of Istio's form (`.../ns/<ns>/sa/<sa>`).
fn namespace_of(id: &str) -> Option<&str> {
    // A plain window scan: `split_once("/ns/")` sets up a two-way string
    // searcher, which costs more than the whole scan of an id this short.
    let at = id.as_bytes().windows(4).position(|w| w == b"/ns/")?;
    let rest = &id[at + 4..];
    let ns = rest.split('/').next()?;
    (!ns.is_empty()).then_some(ns)
}

/// Who spoke first on a new inbound connection.
enum FirstMove {
    /// The client, with its first byte.
    Client(u8),
    /// The app (the client was silent, and plaintext is allowed): the
    /// connection to it, which has bytes waiting.
    App(TcpStream),
}

/// Waits for a new connection's first byte. Under STRICT only the client
/// can move (it must start a TLS handshake). Otherwise a client silent for
/// [`crate::transparent::SNIFF_WAIT`] may be waiting for the server to
/// speak first, in plaintext: the app is connected, and whichever speaks
/// first decides. `None`: closed, failed, or silent past the handshake
/// timeout.
async fn first_move(tcp: &TcpStream, mode: MtlsMode, app: SocketAddr) -> Option<FirstMove> {
    let mut first = [0u8; 1];
    let client = |wait| async move {
        let mut first = [0u8; 1];
        match tokio::time::timeout(wait, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => Some(Some(first[0])),
            Ok(_) => None,
            Err(_) => Some(None),
        }
    };
    if mode == MtlsMode::Strict {
        return client(HANDSHAKE_TIMEOUT)
            .await
            .flatten()
            .map(FirstMove::Client);
    }
    if let Some(byte) = client(crate::transparent::SNIFF_WAIT).await? {
        return Some(FirstMove::Client(byte));
    }
    let app = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(app))
        .await
        .ok()
        .and_then(Result::ok);
    let Some(app) = app else {
        // The app cannot speak: only the client can.
        return client(HANDSHAKE_TIMEOUT)
            .await
            .flatten()
            .map(FirstMove::Client);
    };
    tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)) => match r {
            Ok(Ok(1)) => Some(FirstMove::Client(first[0])),
            _ => None,
        },
        r = app.readable() => r.ok().map(|()| {
            let _ = app.set_nodelay(true);
            FirstMove::App(app)
        }),
    }
}

/// A TCP connection (ALPN `istio`, or plaintext that is not HTTP):
/// AuthorizationPolicy on the connection (denied: closed), then bytes both
/// ways to the app (over `connected` when the app was connected already),
/// ended early when `watched` sees the peer stop verifying.
#[allow(clippy::too_many_arguments)]
async fn serve_tcp<S>(
    shared: Arc<Shared>,
    mut stream: S,
    peer: Peer,
    port: u16,
    app: SocketAddr,
    phase: watch::Receiver<Phase>,
    connected: Option<TcpStream>,
    watched: Option<crate::live::Watched>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = Instant::now();
    let started = metrics::now_rfc3339();
    let cfg = shared.config.borrow().clone();
    let ns = shared.opts.workload.namespace.clone();
    let attrs = RequestAttrs {
        method: None,
        port,
        peer_identity: peer.identity.as_deref(),
        source_ip: peer.addr.map(|a| a.ip()),
        source_namespace: peer.identity.as_deref().and_then(namespace_of),
        ..RequestAttrs::default()
    };
    if let Decision::Deny { policy, reason } = cfg.policies.authorize(&ns, &cfg.my_labels, &attrs) {
        tracing::info!(%policy, %reason, peer = ?peer.identity, port, "TCP connection denied");
        return;
    }
    let labels = destination_labels(&shared, &peer, Claimed::from(None), "tcp", 0);
    let connect = async {
        match connected {
            Some(conn) => Ok(Ok(conn)),
            None => tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(app)).await,
        }
    };
    let mut conn = match connect.await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            tracing::warn!(%app, error = %e, "the app is unreachable");
            return;
        }
        Err(_) => {
            tracing::warn!(%app, "connecting to the app timed out");
            return;
        }
    };
    shared.metrics.tcp_opened.get_or_create(&labels).inc();
    let relay = crate::relay_tcp(&mut stream, &mut conn, crate::TCP_IDLE_TIMEOUT, phase);
    let copied = crate::live::Watched::run(watched, relay)
        .await
        .unwrap_or_else(|| Err("closed: the peer no longer verifies under the new trust".into()));
    shared.metrics.tcp_closed.get_or_create(&labels).inc();
    let reason = copied.as_ref().err();
    metrics::log(&metrics::AccessLog {
        start_time: started,
        reporter: "destination",
        method: "TCP",
        path: "",
        authority: "",
        response_code: 0,
        duration_ms: start.elapsed().as_secs_f64() * 1000.0,
        upstream_host: &app.to_string(),
        peer_identity: peer.identity.as_deref(),
        source_cluster: "unknown",
        destination_cluster: &labels.destination_cluster,
        request_id: "",
        grpc_status: None,
        reason: reason.map(String::as_str),
    });
}

/// A peer metadata header (as the calling sidecar set it), or `unknown`.
/// Only reported in metrics: it is the caller's claim, not verified.
fn peer_header(headers: Option<&http::HeaderMap>, name: &str) -> String {
    headers
        .and_then(|h| h.get(name))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 253)
        .unwrap_or("unknown")
        .to_string()
}

/// The source workload and cluster a caller's sidecar names in its
/// request headers (`"unknown"` when absent or not plain text).
struct Claimed {
    workload: String,
    cluster: String,
}

impl Claimed {
    fn from(headers: Option<&http::HeaderMap>) -> Self {
        Claimed {
            workload: peer_header(headers, crate::SOURCE_WORKLOAD_HEADER),
            cluster: peer_header(headers, crate::SOURCE_CLUSTER_HEADER),
        }
    }
}

/// Istio's labels for a request or connection this sidecar received.
/// `claimed` is what the caller's sidecar said about it: its workload and
/// cluster headers (see [`Claimed`]).
fn destination_labels(
    shared: &Shared,
    peer: &Peer,
    claimed: Claimed,
    protocol: &str,
    code: u16,
) -> RequestLabels {
    let source_ns = peer.identity.as_deref().and_then(namespace_of);
    RequestLabels {
        reporter: "destination".into(),
        source_workload: claimed.workload,
        source_workload_namespace: source_ns.unwrap_or("unknown").into(),
        source_principal: peer.identity.clone().unwrap_or_else(|| "unknown".into()),
        source_cluster: claimed.cluster,
        destination_workload: shared.opts.workload.name.clone(),
        destination_workload_namespace: shared.opts.workload.namespace.clone(),
        destination_principal: shared
            .current_identity()
            .map_or_else(|| "unknown".into(), |i| i.spiffe_id.as_str().to_owned()),
        destination_service: peer.service.clone().unwrap_or_else(|| "unknown".into()),
        destination_cluster: shared.cluster(),
        request_protocol: protocol.into(),
        response_code: code.to_string(),
        connection_security_policy: if peer.mtls { "mutual_tls" } else { "none" }.into(),
    }
}

async fn serve_http<I>(shared: Arc<Shared>, app: App, io: I, peer: Peer, port: u16, life: Life)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = Arc::new(peer);
    let phase = life.phase.clone();
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let app = app.clone();
        let peer = peer.clone();
        let life = life.clone();
        async move {
            Ok::<_, std::convert::Infallible>(request(shared, app, peer, port, req, life).await)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A peer must finish its request head in time (slowloris).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    // Upgrades: a WebSocket handshake the app accepts switches the
    // connection over to it.
    let conn = builder.serve_connection_with_upgrades(io, svc);
    crate::drive(conn, |c| c.graceful_shutdown(), phase).await;
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

/// The `x-forwarded-client-cert` value for a verified peer (Envoy's format).
pub fn xfcc(own_id: &str, hash: &str, peer_id: &str) -> String {
    format!("By={own_id};Hash={hash};URI={peer_id}")
}

async fn request(
    shared: Arc<Shared>,
    app: App,
    peer: Arc<Peer>,
    port: u16,
    req: Request<Incoming>,
    life: Life,
) -> Response<Observed<ProxyBody>> {
    let own = |r: Response<Full<Bytes>>| r.map(|b| Observed::plain(ProxyBody::Own(b)));
    let start = Instant::now();
    let started = metrics::now_rfc3339();
    let cfg = shared.config.borrow().clone();
    let ns = shared.opts.workload.namespace.clone();
    let app_address = app.address.clone();
    let (mut parts, body) = req.into_parts();
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
    let peer_ns = peer.identity.as_deref().and_then(namespace_of);
    let attrs = RequestAttrs {
        method: Some(&method),
        path: Some(&path),
        host: Some(&authority),
        port,
        headers: Some(&parts.headers),
        peer_identity: peer.identity.as_deref(),
        source_ip: peer.addr.map(|a| a.ip()),
        source_namespace: peer_ns,
        source_labels: None,
    };
    // `Err`: the path is refused before any policy.
    let decision = match bad_path {
        None => Ok(cfg.policies.authorize(&ns, &cfg.my_labels, &attrs)),
        Some(e) => Err(e.to_string()),
    };
    let protocol = metrics::http_protocol(&parts.headers);
    let claimed = Claimed::from(Some(&parts.headers));
    let rid = parts
        .headers
        .get(crate::names::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // The body streams to the app (no retries here to keep it for).
    let req_bytes = Arc::new(AtomicU64::new(0));
    let body = Counted::new(body, req_bytes.clone());
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
            // What the app learns about the caller is what was verified
            // here, never what the caller claimed.
            parts.headers.remove(crate::names::XFCC);
            parts.headers.remove(crate::names::SOURCE_CLUSTER);
            parts.headers.remove(crate::names::SOURCE_WORKLOAD);
            if let Some(v) = &peer.xfcc {
                parts.headers.insert(crate::names::XFCC, v.clone());
            }
            // A protocol switch (WebSocket): the caller's side of it.
            let client_side = crate::upgrade_of(parts.version, &parts.headers)
                .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
            // The app gets the HTTP version its client spoke.
            let orig_proto = parts.headers.remove(crate::names::ORIG_PROTO);
            let http2 = parts.version == http::Version::HTTP_2 && orig_proto.is_none();
            let sent = if http2 {
                // `:authority` stays what the client asked for; [`Dial`]
                // connects to the app whatever it says.
                let uri = format!("http://{authority}{path}");
                match uri.parse() {
                    Ok(u) => parts.uri = u,
                    Err(_) => {
                        return own(plain(
                            StatusCode::BAD_REQUEST,
                            "bad request authority or path\n",
                        ));
                    }
                }
                parts.headers.remove(http::header::HOST);
                app.http2
                    .request(Request::from_parts(parts, body))
                    .await
                    .map_err(|e| e.to_string())
            } else {
                // Origin form, as HTTP/1.1 sends it to a server.
                match http::Uri::try_from(path.as_str()) {
                    Ok(u) => parts.uri = u,
                    Err(_) => return own(plain(StatusCode::BAD_REQUEST, "bad request path\n")),
                }
                parts.version = http::Version::HTTP_11;
                // HTTP/2 carries the host in `:authority`; the app gets it as Host.
                if !parts.headers.contains_key(http::header::HOST)
                    && let Ok(v) = authority.parse()
                {
                    parts.headers.insert(http::header::HOST, v);
                }
                app.http1.request(Request::from_parts(parts, body)).await
            };
            match sent {
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
                    Some(format!("app {}: {e}", app.address)),
                ),
            }
        }
    };
    let code = resp.status().as_u16();
    // Metrics and the access log once the response has gone through (it
    // may stream): its size, gRPC status and the whole duration are known
    // then. The labels are made then too, off the response's path.
    let (head, body) = resp.into_parts();
    let body = Observed::new(body, &head.headers, move |end| {
        let millis = start.elapsed().as_secs_f64() * 1000.0;
        let mut labels = destination_labels(&shared, &peer, claimed, protocol, code);
        labels.destination_service = peer.service.clone().unwrap_or_else(|| {
            authority
                .rsplit_once(':')
                .map_or(authority.as_str(), |(h, _)| h)
                .to_string()
        });
        let req_len = req_bytes.load(Ordering::Relaxed);
        let grpc = end.grpc_status.as_deref();
        let labels = &shared
            .metrics
            .request_ended(labels, grpc, millis, req_len, end.bytes);
        metrics::log(&metrics::AccessLog {
            start_time: started,
            reporter: "destination",
            method: &method,
            path: &path,
            authority: &authority,
            response_code: code,
            duration_ms: millis,
            upstream_host: &app_address,
            peer_identity: peer.identity.as_deref(),
            source_cluster: &labels.source_cluster,
            destination_cluster: &labels.destination_cluster,
            request_id: &rid,
            grpc_status: grpc,
            reason: reason.as_deref(),
        });
    });
    Response::from_parts(head, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc_is_envoys_format() {
        assert_eq!(
            xfcc(
                "spiffe://cluster.local/ns/demo/sa/echo",
                "ab12",
                "spiffe://cluster.local/ns/demo/sa/sleep"
            ),
            "By=spiffe://cluster.local/ns/demo/sa/echo;Hash=ab12;URI=spiffe://cluster.local/ns/demo/sa/sleep"
        );
    }

    #[test]
    fn namespace_comes_from_istio_shaped_ids_only() {
        for (id, want) in [
            ("spiffe://cluster.local/ns/demo/sa/sleep", Some("demo")),
            ("spiffe://td/ns/a", Some("a")),
            ("spiffe://td/ns//sa/x", None),
            ("spiffe://td/strait/cluster/c1", None),
            ("", None),
        ] {
            assert_eq!(namespace_of(id), want, "{id}");
        }
    }

    #[test]
    fn only_a_tls_handshake_record_is_tls() {
        assert!(looks_like_tls(0x16));
        for b in [b'G', b'P', 0x15, 0x17, 0] {
            assert!(!looks_like_tls(b), "{b:#x}");
        }
    }

    #[test]
    fn peer_headers_fall_back_to_unknown() {
        let mut h = http::HeaderMap::new();
        assert_eq!(peer_header(None, "x"), "unknown");
        assert_eq!(peer_header(Some(&h), "x"), "unknown");
        h.insert("x", http::HeaderValue::from_static(""));
        assert_eq!(peer_header(Some(&h), "x"), "unknown");
        h.insert("x", http::HeaderValue::from_static("sleep"));
        assert_eq!(peer_header(Some(&h), "x"), "sleep");
        h.insert("x", http::HeaderValue::from_bytes(&[0xff, b'a']).unwrap());
        assert_eq!(peer_header(Some(&h), "x"), "unknown");
        let long = "a".repeat(300);
        h.insert("x", long.parse().unwrap());
        assert_eq!(peer_header(Some(&h), "x"), "unknown");
    }
}
