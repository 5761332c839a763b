//! The strait sidecar: the data-plane proxy next to every workload.
//!
//! - [`outbound`]: the app's side: an HTTP proxy (absolute-form requests,
//!   `CONNECT`, HTTP/2 with prior knowledge) and, in transparent mode,
//!   redirected connections; Istio routing (VirtualService,
//!   DestinationRule) picks a destination and an endpoint, and the request
//!   goes over mTLS, in the HTTP version the app spoke, to the
//!   destination's sidecar, or to another network's east-west gateway with
//!   Istio's SNI, with the peer's SPIFFE ID checked against the service's
//!   identities.
//! - [`inbound`]: the mTLS listener: PeerAuthentication (STRICT /
//!   PERMISSIVE / DISABLE), AuthorizationPolicy, then the app, with
//!   `x-forwarded-client-cert` in Envoy's format.
//! - [`policy`]: pure evaluation of the Istio policies.
//! - [`config`]: the mesh as the control plane pushed it.
//! - [`identity`]: the workload certificate as the data path uses it (the
//!   control plane client's `IdentityManager` gets and renews it).
//! - [`metrics`]: Istio's metrics and the JSON access log.
//! - [`body`]: how bodies go through: streamed and counted, or held whole
//!   (for retries, and under a route timeout).
//! - [`transparent`]: iptables interception rules and `SO_ORIGINAL_DST`.
//! - [`probe`]: the app probes answered on the health port for the kubelet
//!   under transparent interception.
//! - [`role`]: the role's wiring: its one [`role::Config`], certificate,
//!   discovery, listeners, health and metrics, drain; [`cli`]: the flags of
//!   `strait sidecar` and `strait-sidecar` (the binary this package builds)
//!   into that config.
//! - `live`: live mTLS connections (both ways) end once a trust change
//!   (deny-listed intermediate, removed root or peered mesh) makes their
//!   peer fail verification.

mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod identity;
mod idle;
pub mod inbound;
mod live;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod role;
pub mod transparent;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strait_ca::tls::Trust;
use tokio::sync::watch;

pub use body::{
    BodyError, Counted, Ended, MAX_BUFFERED_BODY, MAX_REPLAYABLE_BODY, Observed, ProxyBody,
    grpc_status, read_body, read_whole,
};
use config::{MeshConfig, WorkloadRef};
use identity::Identity;

/// The calling sidecar's cluster, for the destination's telemetry.
pub const SOURCE_CLUSTER_HEADER: &str = "x-strait-source-cluster";
/// The calling sidecar's workload name, for the destination's telemetry.
pub const SOURCE_WORKLOAD_HEADER: &str = "x-strait-source-workload";

/// Carries the HTTP version the app spoke when its sidecar sent the
/// request on as HTTP/2 although the app spoke HTTP/1.1 (a DestinationRule
/// with `h2UpgradePolicy: UPGRADE`): the destination's sidecar speaks that
/// version to its app. A request over HTTP/2 without it came from an
/// HTTP/2 client (a gRPC app, or an Istio sidecar) and reaches the app as
/// HTTP/2. Linkerd's `l5d-orig-proto` does the same.
pub const ORIG_PROTO_HEADER: &str = "x-strait-orig-proto";

/// Header names the data path uses on every request, made at compile
/// time: a `&str` name is parsed on every use, and a custom one copied.
pub(crate) mod names {
    use http::HeaderName;

    pub(crate) const SOURCE_CLUSTER: HeaderName =
        HeaderName::from_static(super::SOURCE_CLUSTER_HEADER);
    pub(crate) const SOURCE_WORKLOAD: HeaderName =
        HeaderName::from_static(super::SOURCE_WORKLOAD_HEADER);
    pub(crate) const ORIG_PROTO: HeaderName = HeaderName::from_static(super::ORIG_PROTO_HEADER);
    pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub(crate) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    pub(crate) const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
}

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
    /// Other ports the app serves on `app`'s host (a pod with several
    /// ports): a request or connection for one of them as its workload
    /// port goes there; anything else goes to `app`.
    pub app_ports: Vec<u16>,
    /// The HTTP proxy for the app.
    pub outbound: SocketAddr,
    /// How long in-flight requests may finish on shutdown.
    pub drain: Duration,
    /// What redirected traffic for destinations outside the mesh gets.
    pub outbound_policy: OutboundPolicy,
}

/// What the outbound side does with redirected traffic for a destination
/// outside the mesh: a connection that is not HTTP, or an HTTP request for
/// a host no service has (Istio's `outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboundPolicy {
    /// It goes on, unchanged and without mTLS, to where the app was going
    /// (Istio's default and its `PassthroughCluster`).
    #[default]
    AllowAny,
    /// It is refused: closed, or answered 502.
    RegistryOnly,
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

/// Keeps `ready` true exactly while the sidecar has a workload
/// certificate and a config from the control plane (`/healthz/ready`).
pub fn follow_readiness(
    mut identity: watch::Receiver<Option<Arc<Identity>>>,
    mut config: watch::Receiver<Arc<MeshConfig>>,
    ready: strait_runtime::http::Ready,
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
                crate::config::apply_trust(&trust, &cfg.bundles);
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
                relay_tcp(&mut c, &mut u, TCP_IDLE_TIMEOUT, life.phase).await
            }
            Err(e) => Err(format!("protocol switch failed: {e}")),
        };
        done(copied);
    });
}

/// How long a relayed TCP connection may stay silent both ways before it
/// is closed: Envoy's `tcp_proxy` default, which Istio keeps. Without one,
/// a connection whose peer vanished without a FIN would stay forever.
pub const TCP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The idle timeout a DestinationRule's `connectionPool.tcp.idleTimeout`
/// asks for: unset, [`TCP_IDLE_TIMEOUT`]; `0s`, none (a century).
pub(crate) fn tcp_idle_timeout(asked: Option<std::time::Duration>) -> std::time::Duration {
    match asked {
        None => TCP_IDLE_TIMEOUT,
        Some(d) if d.is_zero() => std::time::Duration::from_secs(100 * 365 * 86400),
        Some(d) => d,
    }
}

/// Relays bytes both ways (half-close, no buffer held while idle) until
/// both sides close, nothing moves for `idle`, or the phase reaches
/// [`Phase::Kill`]. Returns (a→b, b→a) bytes, or why it ended otherwise.
pub(crate) async fn relay_tcp<A, B>(
    a: A,
    b: B,
    idle: std::time::Duration,
    phase: watch::Receiver<Phase>,
) -> Result<(u64, u64), String>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match until_killed(strait_io::relay(a, b, idle), phase).await {
        Some(strait_io::Spliced {
            error: Some(why), ..
        }) => Err(why),
        Some(s) => Ok((s.up, s.down)),
        None => Err("closed at the drain deadline".into()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_idle_timeout_is_istios_hour_unless_a_rule_says_otherwise() {
        use std::time::Duration;
        assert_eq!(tcp_idle_timeout(None), Duration::from_secs(3600));
        assert_eq!(
            tcp_idle_timeout(Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        // 0s turns it off: far enough never to fire, near enough to add
        // to an Instant.
        let off = tcp_idle_timeout(Some(Duration::ZERO));
        assert!(off > Duration::from_secs(50 * 365 * 86400));
        assert!(std::time::Instant::now().checked_add(off).is_some());
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
}
