//! The strait sidecar: the data-plane proxy next to every workload.
//!
//! - [`outbound`]: an HTTP proxy for the app (absolute-form requests);
//!   Istio routing (VirtualService, DestinationRule) picks a destination
//!   and an endpoint, and the request goes over mTLS (HTTP/2) to the
//!   destination's sidecar, or to another network's east-west gateway
//!   with Istio's SNI, with the peer's SPIFFE ID checked against the
//!   service's identities.
//! - [`inbound`]: the mTLS listener: PeerAuthentication (STRICT /
//!   PERMISSIVE / DISABLE), AuthorizationPolicy, then the app, with
//!   `x-forwarded-client-cert` in Envoy's format.
//! - [`policy`]: pure evaluation of the Istio policies.
//! - [`config`]: the mesh as the control plane pushed it.
//! - [`identity`]: the workload certificate (CSR API), renewed at half life.
//! - [`metrics`]: Istio's metrics and the JSON access log.
//! - [`transparent`]: iptables interception rules and `SO_ORIGINAL_DST`.

pub mod config;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod transparent;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strait_ca::tls::Trust;
use tokio::sync::watch;

use config::{MeshConfig, WorkloadRef};
use identity::Identity;

/// The calling sidecar's cluster, for the destination's telemetry.
pub const SOURCE_CLUSTER_HEADER: &str = "x-strait-source-cluster";
/// The calling sidecar's workload name, for the destination's telemetry.
pub const SOURCE_WORKLOAD_HEADER: &str = "x-strait-source-workload";

/// Where the sidecar listens and what it serves.
#[derive(Debug, Clone)]
pub struct Options {
    /// The workload this sidecar serves.
    pub workload: WorkloadRef,
    /// The mTLS listener.
    pub inbound: SocketAddr,
    /// The app, plain HTTP (HTTP/1.1, or HTTP/2 with prior knowledge for
    /// requests whose client spoke HTTP/2).
    pub app: SocketAddr,
    /// The HTTP proxy for the app.
    pub outbound: SocketAddr,
    /// How long in-flight requests may finish on shutdown.
    pub drain: Duration,
}

/// What every connection handler shares.
pub struct Shared {
    /// Listeners and the app.
    pub opts: Options,
    /// The newest accepted config.
    pub config: watch::Receiver<Arc<MeshConfig>>,
    /// The newest workload certificate (`None` until issued).
    pub identity: watch::Receiver<Option<Arc<Identity>>>,
    /// The trust bundles peers are verified against.
    pub trust: Trust,
    /// Endpoint picking and outlier detection state.
    pub balancer: policy::Balancer,
    /// Istio's metrics.
    pub metrics: metrics::Metrics,
    /// Upstream connections and in-flight counts.
    pub pool: outbound::Pool,
}

impl Shared {
    /// Everything a sidecar needs; the trust store follows the bundles in
    /// `config` (see [`follow_trust`]).
    pub fn new(
        opts: Options,
        config: watch::Receiver<Arc<MeshConfig>>,
        identity: watch::Receiver<Option<Arc<Identity>>>,
        trust: Trust,
        metrics: metrics::Metrics,
    ) -> Shared {
        follow_trust(trust.clone(), config.clone());
        Shared {
            opts,
            config,
            identity,
            trust,
            balancer: policy::Balancer::new(),
            metrics,
            pool: outbound::Pool::default(),
        }
    }

    /// The cluster this workload runs in (from the control plane).
    pub fn cluster(&self) -> String {
        self.config
            .borrow()
            .me
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |w| w.cluster.clone())
    }

    /// Whether the sidecar can serve: a certificate and a first config.
    pub fn is_ready(&self) -> bool {
        self.identity.borrow().is_some() && self.config.borrow().loaded
    }

    /// The current identity, if issued.
    pub fn current_identity(&self) -> Option<Arc<Identity>> {
        self.identity.borrow().clone()
    }
}

/// The sidecar's runtime for `worker_threads` workers. With one (the
/// CLI's default) it is a current-thread runtime: listeners, connections,
/// discovery and timers all run on the calling thread, so a request that
/// crosses several tasks (the app's connection, the pooled HTTP/2
/// connection, the stream) never wakes another thread, and the process
/// keeps no idle worker stacks. More workers give the multi-thread
/// scheduler, for sidecars that must use several cores.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads {
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "worker threads: at least 1 is needed (got 0)",
        )),
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

/// Keeps `ready` true exactly while the sidecar has a workload
/// certificate and a config from the control plane (`/healthz/ready`).
pub fn follow_readiness(
    mut identity: watch::Receiver<Option<Arc<Identity>>>,
    mut config: watch::Receiver<Arc<MeshConfig>>,
    ready: strait_broker::http::Ready,
) {
    tokio::spawn(async move {
        loop {
            let now = identity.borrow_and_update().is_some() && config.borrow_and_update().loaded;
            ready.set(now);
            tokio::select! {
                r = identity.changed() => if r.is_err() { break },
                r = config.changed() => if r.is_err() { break },
            }
        }
        ready.set(false);
    });
}

/// Keeps `trust` in line with the bundles and deny-list in the config.
pub fn follow_trust(trust: Trust, mut config: watch::Receiver<Arc<MeshConfig>>) {
    tokio::spawn(async move {
        loop {
            {
                let cfg = config.borrow_and_update().clone();
                let (local, federated) = cfg.trust_bundles();
                if let Some(b) = local {
                    trust.set_bundle(b);
                }
                trust.set_federated(federated);
                trust.set_denied(cfg.denied());
            }
            if config.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Runs both listeners until `shutdown`, then stops accepting and lets
/// the open connections finish for up to `opts.drain`.
pub async fn run(
    shared: Arc<Shared>,
    inbound: tokio::net::TcpListener,
    outbound: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(Phase::Run);
    let active = Tracker::default();
    let i = tokio::spawn(inbound::serve(
        shared.clone(),
        inbound,
        stop_rx.clone(),
        active.clone(),
    ));
    let o = tokio::spawn(outbound::serve(
        shared.clone(),
        outbound,
        stop_rx,
        active.clone(),
    ));
    shutdown.await;
    tracing::info!(drain = ?shared.opts.drain, "draining: no new connections");
    let _ = stop_tx.send(Phase::Drain);
    let _ = i.await;
    let _ = o.await;
    if active.wait_idle(shared.opts.drain).await.is_err() {
        tracing::warn!(
            open = active.open(),
            "drain deadline passed; closing the remaining connections"
        );
    }
    let _ = stop_tx.send(Phase::Kill);
}

/// What a connection task needs to follow the sidecar's life.
#[derive(Clone)]
pub(crate) struct Life {
    pub(crate) active: Tracker,
    pub(crate) phase: watch::Receiver<Phase>,
}

/// Where the sidecar is in its life; connections follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Serving.
    Run,
    /// No new connections; open ones finish what is in flight.
    Drain,
    /// The drain deadline passed: close everything.
    Kill,
}

/// Drives `conn` (a hyper connection) to its end: on [`Phase::Drain`]
/// `shutdown` asks it to finish gracefully (HTTP/2 GOAWAY, HTTP/1.1
/// close after the current request); on [`Phase::Kill`] it is dropped.
pub(crate) async fn drive<C, F>(conn: C, shutdown: F, mut phase: watch::Receiver<Phase>)
where
    C: std::future::Future,
    F: FnOnce(std::pin::Pin<&mut C>),
{
    let mut conn = std::pin::pin!(conn);
    let mut shutdown = Some(shutdown);
    if *phase.borrow_and_update() != Phase::Run
        && let Some(f) = shutdown.take()
    {
        f(conn.as_mut());
    }
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            r = phase.changed() => {
                let now = if r.is_err() { Phase::Kill } else { *phase.borrow_and_update() };
                match now {
                    Phase::Run => {}
                    Phase::Drain => {
                        if let Some(f) = shutdown.take() {
                            f(conn.as_mut());
                        }
                    }
                    Phase::Kill => return,
                }
            }
        }
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection:
/// upgrade` and `Upgrade: <protocol>`, as WebSocket's handshake sends).
pub fn upgrade_of(version: http::Version, headers: &http::HeaderMap) -> Option<http::HeaderValue> {
    if version != http::Version::HTTP_11 {
        return None;
    }
    let upgrade = headers.get(http::header::UPGRADE)?;
    let asked = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asked.then(|| upgrade.clone())
}

/// Once both sides of a switched protocol are handed over (the client's
/// connection after hyper sent it the 101, and the upstream's after it
/// received one), copies bytes both ways until both end, the sidecar's
/// drain deadline passes, or one side fails. Counted as an open
/// connection for the drain. Returns (client→upstream, upstream→client)
/// bytes, or why the copy ended early.
pub(crate) fn splice_upgraded(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    life: Life,
    done: impl FnOnce(Result<(u64, u64), String>) + Send + 'static,
) {
    let guard = life.active.guard();
    tokio::spawn(async move {
        let _guard = guard;
        let copied = match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (mut c, mut u) = (
                    hyper_util::rt::TokioIo::new(c),
                    hyper_util::rt::TokioIo::new(u),
                );
                match until_killed(tokio::io::copy_bidirectional(&mut c, &mut u), life.phase).await
                {
                    Some(Ok(n)) => Ok(n),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("closed at the drain deadline".to_string()),
                }
            }
            Err(e) => Err(format!("protocol switch failed: {e}")),
        };
        done(copied);
    });
}

/// Runs `fut` (a byte copy) until it ends or the phase reaches
/// [`Phase::Kill`].
pub(crate) async fn until_killed<T>(
    fut: impl std::future::Future<Output = T>,
    mut phase: watch::Receiver<Phase>,
) -> Option<T> {
    let kill = async move {
        let _ = phase.wait_for(|p| *p == Phase::Kill).await;
    };
    tokio::select! {
        r = fut => Some(r),
        () = kill => None,
    }
}

/// Counts open connections, so shutdown can wait until none is left.
#[derive(Clone, Default)]
pub(crate) struct Tracker(Arc<watch::Sender<usize>>);

impl Tracker {
    /// Counts a connection until the guard is dropped.
    pub(crate) fn guard(&self) -> ActiveGuard {
        self.0.send_modify(|n| *n += 1);
        ActiveGuard(self.0.clone())
    }

    pub(crate) fn open(&self) -> usize {
        *self.0.borrow()
    }

    /// Waits until no connection is open, at most `deadline`.
    pub(crate) async fn wait_idle(&self, deadline: Duration) -> Result<(), ()> {
        let mut rx = self.0.subscribe();
        match tokio::time::timeout(deadline, rx.wait_for(|n| *n == 0)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(()),
        }
    }
}

/// Counts a connection as open while alive.
pub(crate) struct ActiveGuard(Arc<watch::Sender<usize>>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The most bytes of one response the sidecar buffers: responses on a
/// route with a timeout are read whole (the timeout covers the whole
/// response, as in Envoy), data and trailers. Other responses stream.
pub const MAX_BUFFERED_BODY: usize = 16 << 20;

/// The largest request body held whole so that a retry can send it again
/// (Envoy's default buffer limit): a body that declares its length up to
/// this is read before it is sent. Longer bodies, and bodies of unknown
/// length (HTTP/2 and gRPC streams, chunked uploads), stream as they
/// arrive; such a request is retried only while none of it was sent.
pub const MAX_REPLAYABLE_BODY: usize = 1 << 20;

/// Carries the HTTP version the app spoke when its sidecar sent the
/// request on as HTTP/2 (sidecars always talk HTTP/2 to each other): the
/// destination's sidecar speaks that version to its app. A request over
/// HTTP/2 without it came from an HTTP/2 client (a gRPC app, or an Istio
/// sidecar, which upgrades nothing by default) and reaches the app as
/// HTTP/2. Linkerd's `l5d-orig-proto` does the same.
pub const ORIG_PROTO_HEADER: &str = "x-strait-orig-proto";

/// A response body as the sidecar relays it.
pub enum ProxyBody {
    /// The upstream's, streamed.
    Stream(hyper::body::Incoming),
    /// One the sidecar made itself.
    Own(http_body_util::Full<bytes::Bytes>),
    /// The upstream's, read whole (data and trailers).
    Buffered(http_body_util::Collected<bytes::Bytes>),
}

impl From<http_body_util::Full<bytes::Bytes>> for ProxyBody {
    fn from(b: http_body_util::Full<bytes::Bytes>) -> Self {
        ProxyBody::Own(b)
    }
}

impl hyper::body::Body for ProxyBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::pin::Pin;
        use std::task::Poll;
        let infallible = |p: Poll<Option<Result<_, std::convert::Infallible>>>| {
            p.map(|f| f.map(|r| r.map_err(|e| match e {})))
        };
        match self.get_mut() {
            ProxyBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Own(b) => infallible(Pin::new(b).poll_frame(cx)),
            ProxyBody::Buffered(b) => infallible(Pin::new(b).poll_frame(cx)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream(b) => b.is_end_stream(),
            ProxyBody::Own(b) => b.is_end_stream(),
            ProxyBody::Buffered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ProxyBody::Stream(b) => b.size_hint(),
            ProxyBody::Own(b) => b.size_hint(),
            ProxyBody::Buffered(b) => b.size_hint(),
        }
    }
}

/// A request body passed on as it arrives, its data bytes counted into a
/// shared counter (read for `istio_request_bytes` when the exchange ends).
pub struct Counted<B> {
    inner: B,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl<B> Counted<B> {
    /// `inner`, counted into `bytes`.
    pub fn new(inner: B, bytes: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Counted { inner, bytes }
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.bytes
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose end is observed: `on_end` gets the bytes that went
/// through, once, when the last frame is handed on, the stream fails, or
/// the body is dropped unfinished (the client went away). Metrics and the
/// access log of a streamed response are written there, when its size
/// and duration are known.
pub struct Observed<B> {
    inner: B,
    ended: Ended,
    on_end: Option<Box<dyn FnOnce(Ended) + Send>>,
}

/// What went through an [`Observed`] body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ended {
    /// Data bytes.
    pub bytes: u64,
    /// The `grpc-status` of a gRPC response: from its trailers, or from
    /// its head when it had no body (trailers-only).
    pub grpc_status: Option<String>,
}

/// `grpc-status` in `headers`, if any.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl<B> Observed<B> {
    /// `inner`, the body of a response with headers `head`, with
    /// `on_end` called once at its end.
    pub fn new(
        inner: B,
        head: &http::HeaderMap,
        on_end: impl FnOnce(Ended) + Send + 'static,
    ) -> Self {
        Observed {
            inner,
            ended: Ended {
                bytes: 0,
                grpc_status: grpc_status(head),
            },
            on_end: Some(Box::new(on_end)),
        }
    }

    /// `inner`, with nothing to report.
    pub fn plain(inner: B) -> Self {
        Observed {
            inner,
            ended: Ended::default(),
            on_end: None,
        }
    }

    fn finish(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(std::mem::take(&mut self.ended));
        }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> hyper::body::Body for Observed<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.ended.bytes += data.len() as u64;
                } else if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                    this.ended.grpc_status = Some(status);
                }
                // The last frame: hyper may not ask again.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None | Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a body could not be buffered.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Longer than the limit.
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    /// The stream failed.
    #[error("the body could not be read: {0}")]
    Broken(String),
}

/// Reads `body` whole (data and trailers), refusing more than `limit`
/// bytes.
pub async fn read_whole<B>(
    body: B,
    limit: usize,
) -> Result<http_body_util::Collected<bytes::Bytes>, BodyError>
where
    B: hyper::body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Err(e) => Err(BodyError::Broken(e.to_string())),
    }
}

/// Reads `body`'s data whole, refusing more than `limit` bytes.
pub async fn read_body<B>(body: B, limit: usize) -> Result<bytes::Bytes, BodyError>
where
    B: hyper::body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    read_whole(body, limit).await.map(|c| c.to_bytes())
}

/// Parses Istio's `outbound_.<port>_.<subset>_.<host>` SNI.
pub fn parse_sni(sni: &str) -> Option<(u16, Option<&str>, &str)> {
    let rest = sni.strip_prefix("outbound_.")?;
    let (port, rest) = rest.split_once("_.")?;
    let (subset, host) = rest.split_once("_.")?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((port, (!subset.is_empty()).then_some(subset), host))
}

/// Istio's SNI for a destination.
pub fn istio_sni(port: u16, subset: Option<&str>, host: &str) -> String {
    use std::fmt::Write;
    let subset = subset.unwrap_or("");
    // Sized up front: made for every request's pool lookup.
    let mut sni = String::with_capacity(20 + subset.len() + host.len());
    let _ = write!(sni, "outbound_.{port}_.{subset}_.{host}");
    sni
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let body = |n: usize| http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; n]));
        assert_eq!(read_body(body(10), 10).await.unwrap().len(), 10);
        assert_eq!(read_body(body(0), 10).await.unwrap().len(), 0);
        assert!(matches!(
            read_body(body(11), 10).await,
            Err(BodyError::TooLarge(10))
        ));
    }

    #[test]
    fn an_upgrade_needs_http11_both_headers_and_the_connection_token() {
        let h = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let v11 = http::Version::HTTP_11;
        for (version, headers, want) in [
            (
                v11,
                h(&[("connection", "Upgrade"), ("upgrade", "websocket")]),
                Some("websocket"),
            ),
            (
                v11,
                h(&[("connection", "keep-alive, upgrade"), ("upgrade", "h2c")]),
                Some("h2c"),
            ),
            (
                v11,
                h(&[
                    ("connection", "keep-alive"),
                    ("connection", " UPGRADE "),
                    ("upgrade", "x"),
                ]),
                Some("x"),
            ),
            // Upgrade without asking for it in Connection: not a switch.
            (v11, h(&[("upgrade", "websocket")]), None),
            (
                v11,
                h(&[("connection", "upgraded"), ("upgrade", "websocket")]),
                None,
            ),
            (v11, h(&[("connection", "upgrade")]), None),
            // HTTP/1.0 and HTTP/2 have no Upgrade.
            (
                http::Version::HTTP_10,
                h(&[("connection", "upgrade"), ("upgrade", "websocket")]),
                None,
            ),
            (
                http::Version::HTTP_2,
                h(&[("connection", "upgrade"), ("upgrade", "websocket")]),
                None,
            ),
        ] {
            let got = upgrade_of(version, &headers);
            assert_eq!(
                got.as_ref().map(|v| v.to_str().unwrap()),
                want,
                "{version:?} {headers:?}"
            );
        }
    }

    #[test]
    fn one_worker_is_a_current_thread_runtime() {
        use tokio::runtime::RuntimeFlavor;
        let flavor = |n| runtime(n).map(|r| r.handle().runtime_flavor()).ok();
        assert_eq!(flavor(1), Some(RuntimeFlavor::CurrentThread));
        assert_eq!(flavor(2), Some(RuntimeFlavor::MultiThread));
        assert!(matches!(runtime(0), Err(e) if e.kind() == std::io::ErrorKind::InvalidInput));
    }

    #[test]
    fn sni_round_trips_and_refuses_other_forms() {
        let s = istio_sni(8080, Some("v2"), "echo.demo.svc.cluster.local");
        assert_eq!(s, "outbound_.8080_.v2_.echo.demo.svc.cluster.local");
        assert_eq!(
            parse_sni(&s),
            Some((8080, Some("v2"), "echo.demo.svc.cluster.local"))
        );
        assert_eq!(parse_sni("outbound_.80_._.a.b"), Some((80, None, "a.b")));
        for bad in [
            "",
            "echo.demo",
            "outbound_.x_._.a",
            "outbound_.80_._.",
            "inbound_.80_._.a",
        ] {
            assert_eq!(parse_sni(bad), None, "{bad}");
        }
    }
}
