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
/// certificate and a config from the control plane (`/healthz/ready`,
/// which names what is missing: `certificate`, `configuration`).
pub fn follow_readiness(
    mut identity: watch::Receiver<Option<Arc<Identity>>>,
    mut config: watch::Receiver<Arc<MeshConfig>>,
    ready: strait_runtime::http::Ready,
) {
    /// Holds a pending task while `missing`.
    fn hold(
        slot: &mut Option<strait_runtime::http::Pending>,
        missing: bool,
        ready: &strait_runtime::http::Ready,
        task: &'static str,
    ) {
        if !missing {
            *slot = None;
        } else if slot.is_none() {
            *slot = Some(ready.pending(task));
        }
    }
    tokio::spawn(async move {
        let (mut certificate, mut configuration) = (None, None);
        loop {
            let has_identity = identity.borrow_and_update().is_some();
            let loaded = config.borrow_and_update().loaded;
            hold(&mut certificate, !has_identity, &ready, "certificate");
            hold(&mut configuration, !loaded, &ready, "configuration");
            ready.set(true);
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
    let (drain, watch) = strait_runtime::drain::channel();
    let i = tokio::spawn(inbound::serve(shared.clone(), inbound, watch.clone()));
    let o = tokio::spawn(outbound::serve(shared.clone(), outbound, watch));
    shutdown.await;
    tracing::info!(drain = ?shared.opts.drain, "draining: no new connections");
    drain.start();
    let _ = i.await;
    let _ = o.await;
    if let strait_runtime::drain::Drained::Deadline { open } = drain.drain(shared.opts.drain).await
    {
        tracing::warn!(
            open,
            "drain deadline passed; closing the remaining connections"
        );
    }
}

/// What a connection task holds to follow the sidecar's life (the drain):
/// a guard while it is open, the phase to finish gracefully or be killed.
pub(crate) type Life = strait_runtime::drain::Watch;

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
    done: impl FnOnce(Result<(u64, u64), RelayError>) + Send + 'static,
) {
    let guard = life.guard();
    tokio::spawn(async move {
        let _guard = guard;
        let copied = match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (mut c, mut u) = (
                    hyper_util::rt::TokioIo::new(c),
                    hyper_util::rt::TokioIo::new(u),
                );
                relay_tcp(&mut c, &mut u, TCP_IDLE_TIMEOUT, &life).await
            }
            Err(e) => Err(RelayError::Switch(e)),
        };
        done(copied);
    });
}

/// Why a relayed connection (TCP, or a switched protocol) ended other than
/// by both sides closing; its text is the access log's `reason`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    /// A read or write failed, or nothing moved for the idle timeout, as
    /// [`strait_io::relay`] tells it.
    #[error("{0}")]
    Copy(String),
    /// The sidecar's drain deadline passed.
    #[error("closed at the drain deadline")]
    Killed,
    /// A side of a protocol switch was never handed over.
    #[error("protocol switch failed: {0}")]
    Switch(#[source] hyper::Error),
    /// A `CONNECT` client's connection was never handed over.
    #[error("{0}")]
    Handover(#[source] hyper::Error),
    /// A trust change made the other side (`peer`, `upstream`) fail
    /// verification.
    #[error("closed: the {0} no longer verifies under the new trust")]
    Untrusted(&'static str),
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
/// both sides close, nothing moves for `idle`, or the drain deadline
/// passes. Returns (a→b, b→a) bytes, or why it ended otherwise.
pub(crate) async fn relay_tcp<A, B>(
    a: A,
    b: B,
    idle: std::time::Duration,
    life: &Life,
) -> Result<(u64, u64), RelayError>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match life.until_killed(strait_io::relay(a, b, idle)).await {
        Some(strait_io::Spliced {
            error: Some(why), ..
        }) => Err(RelayError::Copy(why)),
        Some(s) => Ok((s.up, s.down)),
        None => Err(RelayError::Killed),
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
