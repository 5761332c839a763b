//! The SNI passthrough listener (Istio `AUTO_PASSTHROUGH` compatible): read
//! the ClientHello without terminating TLS, admit only exported services,
//! connect to a healthy local endpoint (one retry on another), replay the
//! bytes read so far and splice both ways with half-close and an idle
//! timeout. Anything else is closed and counted by reason; one connection
//! never disturbs another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use strait_io::splice;

use crate::hello::{self, Progress};
use crate::route::{self, ISTIO_ALPN, RouteTable};

/// Timeouts and checks of the passthrough listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// The whole ClientHello must arrive within this.
    pub hello_timeout: Duration,
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Require one of Istio's ALPN values.
    pub require_istio_alpn: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hello_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            require_istio_alpn: true,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabel {
    side: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

/// `strait_gateway_*` metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    connections: Family<Outcome, Counter>,
    tunnels: Family<Outcome, Counter>,
    streams: Family<Outcome, Counter>,
    active: Gauge,
    tunnels_active: Gauge,
    untrusted_closed: Family<SideLabel, Counter>,
    bytes_sent: Family<ServiceLabel, Counter>,
    bytes_received: Family<ServiceLabel, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("strait_gateway");
        r.register(
            "connections",
            "Passthrough connections by outcome and reason",
            m.connections.clone(),
        );
        r.register(
            "active_connections",
            "Connections being spliced",
            m.active.clone(),
        );
        r.register(
            "active_tunnels",
            "QUIC tunnels from other gateways that are up",
            m.tunnels_active.clone(),
        );
        r.register(
            "tunnel_connections",
            "QUIC tunnel connections from other gateways, by outcome",
            m.tunnels.clone(),
        );
        r.register(
            "untrusted_closed_tunnels",
            "QUIC tunnels closed because a trust change made the peer gateway's chain fail verification, by side (server: accepted, client: dialled)",
            m.untrusted_closed.clone(),
        );
        r.register(
            "tunnel_streams",
            "Tunnel and egress streams by outcome and reason",
            m.streams.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes from clients to endpoints, by service",
            m.bytes_sent.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes from endpoints to clients, by service",
            m.bytes_received.clone(),
        );
        m
    }

    /// Connections being spliced right now.
    pub fn active(&self) -> i64 {
        self.active.get()
    }

    /// Counts one incoming tunnel up until the guard drops.
    pub(crate) fn tunnel_up(&self) -> GaugeGuard {
        GaugeGuard::up(&self.tunnels_active)
    }

    pub(crate) fn count_tunnel(&self, outcome: &'static str, reason: &'static str) {
        self.tunnels
            .get_or_create(&Outcome { outcome, reason })
            .inc();
    }

    pub(crate) fn count_untrusted(&self, side: &'static str) {
        self.untrusted_closed
            .get_or_create(&SideLabel { side })
            .inc();
    }

    pub(crate) fn count_stream(&self, outcome: &'static str, reason: &'static str) {
        self.streams
            .get_or_create(&Outcome { outcome, reason })
            .inc();
    }

    fn count(&self, outcome: &'static str, reason: &'static str) {
        self.connections
            .get_or_create(&Outcome { outcome, reason })
            .inc();
    }
}

/// Counts one up on a gauge until dropped (an open tunnel or splice).
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn up(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves until the drain starts, then stops accepting; live connections
/// finish (each counted by the drain) until the drain deadline.
pub async fn serve(
    listener: TcpListener,
    table: watch::Receiver<Arc<RouteTable>>,
    config: Config,
    metrics: Metrics,
    drain: strait_runtime::drain::Watch,
) {
    let mut listener = strait_runtime::accept::Acceptor::new(listener, "passthrough");
    loop {
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => c,
            () = drain.draining() => return,
        };
        let _ = tcp.set_nodelay(true);
        let table = table.borrow().clone();
        let config = config.clone();
        let metrics = metrics.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let _open = drain.guard();
            let span = tracing::debug_span!(
                "passthrough",
                %peer,
                sni = tracing::field::Empty,
                target = tracing::field::Empty,
            );
            let handled = handle(tcp, peer, &table, &config, &metrics).instrument(span);
            drain.until_killed(handled).await;
        });
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    table: &RouteTable,
    config: &Config,
    metrics: &Metrics,
) {
    // 1. The ClientHello, within the deadline and the size limit.
    let (hello, buf) = match read_hello(&mut client, config.hello_timeout).await {
        Ok(h) => h,
        Err((reason, detail)) => {
            metrics.count("refused", reason);
            tracing::info!(%peer, reason, detail, "connection refused");
            return;
        }
    };
    // 2. Where to.
    if config.require_istio_alpn
        && !hello
            .alpn
            .iter()
            .any(|p| ISTIO_ALPN.contains(&p.as_slice()))
    {
        metrics.count("refused", "alpn");
        tracing::info!(%peer, alpn = ?hello.alpn, "no Istio ALPN offered");
        return;
    }
    let Some(sni) = hello.server_name else {
        metrics.count("refused", "no_sni");
        return;
    };
    tracing::Span::current().record("sni", sni.as_str());
    let target = match route::parse_target(&sni) {
        Ok(t) => t,
        Err(e) => {
            metrics.count("refused", "bad_sni");
            tracing::info!(%peer, error = %e, "connection refused");
            return;
        }
    };
    tracing::Span::current().record(
        "target",
        tracing::field::display(format_args!("{}:{}", target.host, target.port)),
    );
    tracing::debug!(%peer, %sni, "routing");
    forward(client, buf, &target, table, config, metrics, "passthrough").await;
}

/// Reads the ClientHello at the start of `client` within `deadline`.
/// Returns it with every byte read (to replay upstream), or a metrics
/// reason and a detail.
pub async fn read_hello<S: AsyncRead + Unpin>(
    client: &mut S,
    deadline: Duration,
) -> Result<(hello::ClientHello, Vec<u8>), (&'static str, String)> {
    let mut buf = Vec::with_capacity(2048);
    let read = tokio::time::timeout(deadline, async {
        loop {
            match hello::parse(&buf) {
                Ok(Progress::Done(h)) => return Ok(h),
                Ok(Progress::NeedMore) => {}
                Err(e) => return Err(("malformed_hello", e.to_string())),
            }
            let mut chunk = [0u8; 4096];
            match client.read(&mut chunk).await {
                Ok(0) => return Err(("closed_before_hello", "client closed".to_string())),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(("read_error", e.to_string())),
            }
        }
    })
    .await;
    match read {
        Ok(Ok(h)) => Ok((h, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err((
            "hello_timeout",
            "no complete ClientHello in time".to_string(),
        )),
    }
}

/// Routes one connection to `target`: picks a healthy endpoint (one retry
/// on another), replays `buffered`, then splices. Used for passthrough
/// connections and for tunnel streams alike.
pub async fn forward<S>(
    client: S,
    buffered: Vec<u8>,
    target: &crate::route::Target,
    table: &RouteTable,
    config: &Config,
    metrics: &Metrics,
    via: &'static str,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let buf = buffered;
    let candidates = match table.pick(target, 2) {
        Ok(c) => c,
        Err(e) => {
            metrics.count("refused", e.reason());
            tracing::info!(via, host = %target.host, error = %e, "connection refused");
            return;
        }
    };
    // Connect, one retry on another endpoint.
    let mut upstream = None;
    for addr in &candidates {
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                upstream = Some(s);
                break;
            }
            Ok(Err(e)) => tracing::info!(%addr, error = %e, "endpoint connect failed"),
            Err(_) => tracing::info!(%addr, "endpoint connect timed out"),
        }
    }
    let Some(mut upstream) = upstream else {
        metrics.count("failed", "connect");
        return;
    };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = upstream.write_all(&buf).await {
        metrics.count("failed", "upstream_write");
        tracing::info!(error = %e, "replaying the ClientHello failed");
        return;
    }
    // Not kept for the connection's life: only its length is counted.
    let replayed = buf.len() as u64;
    drop(buf);
    // Splice.
    metrics.count("spliced", "ok");
    let active = GaugeGuard::up(&metrics.active);
    let service = ServiceLabel {
        service: target.host.clone(),
    };
    let (up, down) = splice(client, upstream, config.idle_timeout).await;
    drop(active);
    metrics
        .bytes_sent
        .get_or_create(&service)
        .inc_by(up + replayed);
    metrics.bytes_received.get_or_create(&service).inc_by(down);
    tracing::debug!(via, host = %target.host, sent = up, received = down, "connection done");
}
