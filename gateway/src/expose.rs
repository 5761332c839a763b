//! Exposing the local control plane to the proxies of remote clusters
//! (primary-remote), as Istio's east-west gateway exposes istiod on 15012:
//! a TLS passthrough listener that admits only connections whose SNI names
//! the control plane ([`CONTROL_PLANE_SNI`]) and splices them to it. The
//! mTLS between proxy and control plane runs end to end; the gateway sees
//! no plaintext and checks no identity (the control plane does).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use strait_io::splice;

use crate::passthrough::read_hello;

/// The TLS server name strait's proxies send to their control plane.
pub const CONTROL_PLANE_SNI: &str = strait_ca::tls::CONTROL_PLANE_SERVER_NAME;

/// Where and how the control plane is exposed.
#[derive(Debug, Clone)]
pub struct ExposeConfig {
    /// The control plane's discovery and CSR address (`host:port`).
    pub upstream: String,
    pub hello_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
    reason: &'static str,
}

/// `strait_gateway_control_plane_connections{outcome, reason}`.
#[derive(Debug, Clone, Default)]
pub struct ExposeMetrics {
    connections: Family<Outcome, Counter>,
}

impl ExposeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = ExposeMetrics::default();
        registry
            .sub_registry_with_prefix("strait_gateway")
            .register(
                "control_plane_connections",
                "Connections to the exposed control plane, by outcome and reason",
                m.connections.clone(),
            );
        m
    }

    fn count(&self, outcome: &'static str, reason: &'static str) {
        self.connections
            .get_or_create(&Outcome { outcome, reason })
            .inc();
    }

    /// The count of one outcome and reason (for tests).
    pub fn get(&self, outcome: &'static str, reason: &'static str) -> u64 {
        self.connections
            .get_or_create(&Outcome { outcome, reason })
            .get()
    }
}

/// Serves until the drain starts; live connections finish (counted by
/// the drain) until its deadline.
pub async fn serve(
    listener: TcpListener,
    config: ExposeConfig,
    metrics: ExposeMetrics,
    drain: strait_runtime::drain::Watch,
) {
    let config = Arc::new(config);
    let mut listener = strait_runtime::accept::Acceptor::new(listener, "exposed control plane");
    loop {
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => c,
            () = drain.draining() => return,
        };
        let _ = tcp.set_nodelay(true);
        let config = config.clone();
        let metrics = metrics.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let _open = drain.guard();
            let Some(outcome) = drain.until_killed(handle(tcp, &config)).await else {
                return;
            };
            metrics.count(outcome.0, outcome.1);
            tracing::debug!(%peer, outcome = outcome.0, reason = outcome.1, "control plane connection");
        });
    }
}

async fn handle(mut client: TcpStream, config: &ExposeConfig) -> (&'static str, &'static str) {
    let (hello, buf) = match read_hello(&mut client, config.hello_timeout).await {
        Ok(h) => h,
        Err((reason, _)) => return ("refused", reason),
    };
    if hello.server_name.as_deref() != Some(CONTROL_PLANE_SNI) {
        tracing::info!(sni = ?hello.server_name, "not the control plane's server name; refused");
        return ("refused", "sni");
    }
    let connect = TcpStream::connect(&config.upstream);
    let mut upstream = match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(upstream = %config.upstream, error = %e, "control plane connect failed");
            return ("failed", "connect");
        }
        Err(_) => return ("failed", "connect_timeout"),
    };
    let _ = upstream.set_nodelay(true);
    if upstream.write_all(&buf).await.is_err() {
        return ("failed", "upstream_write");
    }
    splice(client, upstream, config.idle_timeout).await;
    ("spliced", "ok")
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::hello::tests::rustls_hello;

    /// An upstream that answers every connection with `pong` after reading
    /// what arrived first, and reports those bytes.
    async fn upstream() -> (String, tokio::sync::mpsc::Receiver<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let _ = tx.send(buf[..n].to_vec()).await;
                    let _ = s.write_all(b"pong").await;
                });
            }
        });
        (addr, rx)
    }

    async fn exposed(upstream: String) -> (String, ExposeMetrics, strait_runtime::drain::Trigger) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let metrics = ExposeMetrics::new(&mut Registry::default());
        let (stop, drain) = strait_runtime::drain::channel();
        let config = ExposeConfig {
            upstream,
            hello_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
        };
        tokio::spawn(serve(l, config, metrics.clone(), drain));
        (addr, metrics, stop)
    }

    /// Sends `bytes` and returns what comes back before the gateway closes.
    async fn exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    }

    async fn counted(m: &ExposeMetrics, outcome: &'static str, reason: &'static str) {
        for _ in 0..200 {
            if m.get(outcome, reason) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{outcome}/{reason} not counted");
    }

    #[tokio::test]
    async fn only_the_control_planes_server_name_is_spliced() {
        let (up, mut seen) = upstream().await;
        let (addr, metrics, _stop) = exposed(up).await;

        let hello = rustls_hello(CONTROL_PLANE_SNI, &[b"h2"]);
        assert_eq!(exchange(&addr, &hello).await, b"pong");
        assert_eq!(
            seen.recv().await.unwrap(),
            hello,
            "the ClientHello replayed as sent"
        );
        counted(&metrics, "spliced", "ok").await;

        // A workload's SNI, garbage and a silent client: closed, counted.
        let other = rustls_hello("outbound_.8080_._.echo.demo.svc.cluster.local", &[b"istio"]);
        assert!(exchange(&addr, &other).await.is_empty());
        counted(&metrics, "refused", "sni").await;
        assert!(exchange(&addr, b"GET / HTTP/1.1\r\n\r\n").await.is_empty());
        counted(&metrics, "refused", "malformed_hello").await;
        let _silent = TcpStream::connect(&addr).await.unwrap();
        counted(&metrics, "refused", "hello_timeout").await;
        assert!(
            seen.try_recv().is_err(),
            "nothing else reached the control plane"
        );
    }

    #[tokio::test]
    async fn an_unreachable_control_plane_is_counted() {
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap().to_string();
        drop(gone);
        let (exposed_addr, metrics, _stop) = exposed(addr).await;
        let hello = rustls_hello(CONTROL_PLANE_SNI, &[b"h2"]);
        assert!(exchange(&exposed_addr, &hello).await.is_empty());
        counted(&metrics, "failed", "connect").await;
    }
}
