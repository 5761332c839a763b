//! QUIC tunnels between gateways (ALPN `strait-tunnel/1`): one pooled
//! connection per remote gateway, mutual TLS with gateway identities, and
//! one bidirectional stream per proxied TCP connection. A stream starts with
//! a length-prefixed [`TunnelHeader`] naming the target in Istio's SNI form;
//! the receiving gateway routes it exactly like SNI passthrough. The bytes
//! after the header are the client's TLS session, untouched.
//!
//! Both ends watch the trust their peer was verified under: when it
//! changes (a deny-listed intermediate, a root removed at a rotation's
//! finish, a peered mesh removed) and the peer gateway's chain no longer
//! verifies, the tunnel is closed with [`UNTRUSTED`] and its streams with
//! it. The end-to-end TLS inside the streams (as in SNI passthrough) is the
//! sidecars' to watch; they do so at both ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use strait_ca::live::{PeerChain, TrustWatch};
use strait_ca::tls::Trust;
use strait_proto::tunnel::v1::TunnelHeader;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tracing::Instrument;

use crate::passthrough::{self, Config, Metrics};
use crate::route::{self, RouteTable};

/// The tunnel's ALPN.
pub const ALPN: &[u8] = b"strait-tunnel/1";
/// The largest header accepted.
pub const MAX_HEADER: usize = 16 * 1024;
/// The QUIC application error code of a tunnel closed because its peer no
/// longer verifies under changed trust.
pub const UNTRUSTED: quinn::VarInt = quinn::VarInt::from_u32(0x5354_0001);

/// The chain the peer of `conn` presented (rustls gives quinn the whole
/// chain, leaf first).
fn peer_chain(conn: &quinn::Connection) -> Option<PeerChain> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    PeerChain::from_certs(&certs)
}

/// Closes `conn` once `watch` sees a trust change under which its peer no
/// longer verifies (`side`: `server` for tunnels accepted, `client` for
/// those dialled); returns when the tunnel closes for any reason.
async fn close_when_untrusted(
    conn: quinn::Connection,
    watch: TrustWatch,
    side: &'static str,
    metrics: Metrics,
) {
    let peer = peer_chain(&conn);
    tokio::select! {
        reason = watch.untrusted_opt(peer.as_ref()) => {
            conn.close(UNTRUSTED, b"peer no longer trusted");
            metrics.count_untrusted(side);
            tracing::info!(
                remote = %conn.remote_address(),
                side,
                peer = peer.as_ref().map_or("unknown", PeerChain::identity),
                %reason,
                "tunnel closed: its peer gateway no longer verifies under the new trust"
            );
        }
        _ = conn.closed() => {}
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("tunnel header of {0} bytes exceeds {MAX_HEADER}")]
    TooLarge(usize),
    #[error("tunnel header is empty")]
    Empty,
    #[error("tunnel header is not a valid TunnelHeader: {0}")]
    Decode(#[source] prost::DecodeError),
    #[error("tunnel header has no target")]
    NoTarget,
    #[error("reading the tunnel header: {0}")]
    Io(String),
}

/// The header as sent: 4-byte big-endian length, then the message.
pub fn encode_header(h: &TunnelHeader) -> Vec<u8> {
    let body = h.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a header body (after the length prefix).
pub fn decode_header(body: &[u8]) -> Result<TunnelHeader, HeaderError> {
    if body.is_empty() {
        return Err(HeaderError::Empty);
    }
    let h = TunnelHeader::decode(body).map_err(HeaderError::Decode)?;
    if h.target.is_empty() {
        return Err(HeaderError::NoTarget);
    }
    Ok(h)
}

/// Reads a length-prefixed header from a stream.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<TunnelHeader, HeaderError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .map_err(|e| HeaderError::Io(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(HeaderError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| HeaderError::Io(e.to_string()))?;
    decode_header(&body)
}

/// Why a tunnel could not be set up or reached.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The rustls config offers no cipher suite QUIC can start with.
    #[error(transparent)]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("tunnel to {addr}: backing off for {} ms after a failure", .wait.as_millis())]
    BackingOff { addr: SocketAddr, wait: Duration },
    #[error("tunnel to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("tunnel to {addr}: handshake timed out")]
    HandshakeTimeout { addr: SocketAddr },
    /// The handshake failed, or the connection could not open a stream.
    #[error("tunnel to {addr}: {source}")]
    Connection {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
}

/// Why a remote gateway's `host:port` gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0:?} is not host:port")]
    NotHostPort(String),
    #[error("no DNS resolver")]
    NoResolver,
    #[error("{host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: hickory_resolver::net::NetError,
    },
    #[error("{0}: no address")]
    NoAddress(String),
}

/// The QUIC transport settings both sides use.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    t.max_concurrent_bidi_streams(4096u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    if let Ok(idle) = Duration::from_secs(60).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// A QUIC server config from a rustls one (TLS 1.3, ALPN set here).
pub fn server_config(mut tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, TunnelError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(transport());
    Ok(c)
}

/// A QUIC client config from a rustls one.
pub fn client_config(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TunnelError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport());
    Ok(c)
}

/// Serves tunnel streams arriving at `endpoint`, routing each like SNI
/// passthrough. `trust` is what the endpoint's server config verifies
/// peers with: a tunnel whose peer stops verifying under it is closed.
pub async fn serve(
    endpoint: quinn::Endpoint,
    table: watch::Receiver<Arc<RouteTable>>,
    config: Config,
    metrics: Metrics,
    trust: Trust,
) {
    while let Some(incoming) = endpoint.accept().await {
        let table = table.clone();
        let config = config.clone();
        let metrics = metrics.clone();
        // Before the handshake verifies the peer.
        let watch = TrustWatch::new(&trust);
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    metrics.count_tunnel("refused", "handshake");
                    tracing::info!(%remote, error = %e, "tunnel handshake refused");
                    return;
                }
            };
            metrics.count_tunnel("accepted", "ok");
            let _up = metrics.tunnel_up();
            tracing::info!(%remote, "tunnel up");
            tokio::spawn(close_when_untrusted(
                conn.clone(),
                watch,
                "server",
                metrics.clone(),
            ));
            loop {
                let (send, mut recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(%remote, reason = %e, "tunnel closed");
                        return;
                    }
                };
                let table = table.borrow().clone();
                let config = config.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let header =
                        match tokio::time::timeout(config.hello_timeout, read_header(&mut recv))
                            .await
                        {
                            Ok(Ok(h)) => h,
                            Ok(Err(e)) => {
                                metrics.count_stream("refused", "bad_header");
                                tracing::info!(error = %e, "tunnel stream refused");
                                return;
                            }
                            Err(_) => {
                                metrics.count_stream("refused", "header_timeout");
                                return;
                            }
                        };
                    let target = match route::parse_target(&header.target) {
                        Ok(t) => t,
                        Err(e) => {
                            metrics.count_stream("refused", "bad_target");
                            tracing::info!(error = %e, "tunnel stream refused");
                            return;
                        }
                    };
                    let stream = tokio::io::join(recv, send);
                    passthrough::forward(
                        stream,
                        Vec::new(),
                        &target,
                        &table,
                        &config,
                        &metrics,
                        "tunnel",
                    )
                    .await;
                });
            }
        });
    }
}

/// Reconnect backoff for one remote gateway: after a failed connect the
/// gateway is not dialled again before the delay passes; the delay doubles
/// per failure up to a cap and resets on success. Pure (time is an argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    until: Option<tokio::time::Instant>,
    delay: Duration,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        Backoff {
            until: None,
            delay: Self::MIN,
        }
    }

    /// Whether a dial may happen at `now`; `Err` carries the wait left.
    pub fn ready(&self, now: tokio::time::Instant) -> Result<(), Duration> {
        match self.until {
            Some(u) if now < u => Err(u - now),
            _ => Ok(()),
        }
    }

    pub fn failed(&mut self, now: tokio::time::Instant) {
        self.until = Some(now + self.delay);
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    pub fn succeeded(&mut self) {
        *self = Backoff::new();
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// Pooled QUIC connections to remote gateways, one per address.
pub struct Pool {
    endpoint: quinn::Endpoint,
    resolver: Option<hickory_resolver::TokioResolver>,
    /// The gateway's identity and the verifier of remote gateways; replaced
    /// when the identity is renewed (new connections use the new one, live
    /// ones keep theirs).
    client: std::sync::RwLock<quinn::ClientConfig>,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    backoff: Mutex<HashMap<SocketAddr, Backoff>>,
    /// What `client` verifies remote gateways with: a tunnel whose peer
    /// stops verifying under it is closed.
    trust: Trust,
    metrics: Metrics,
}

impl Pool {
    pub fn new(
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        trust: Trust,
        metrics: Metrics,
    ) -> Self {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| tracing::warn!(error = %e, "no DNS resolver: remote gateways must be IP addresses"))
            .ok();
        Pool {
            endpoint,
            resolver,
            client: std::sync::RwLock::new(client),
            conns: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
            trust,
            metrics,
        }
    }

    /// The addresses of `host:port` (an IP literal, or a DNS name resolved
    /// with hickory; answers are cached for their TTL).
    pub async fn resolve(&self, gateway: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(a) = gateway.parse::<SocketAddr>() {
            return Ok(vec![a]);
        }
        let (host, port) = gateway
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| ResolveError::NotHostPort(gateway.to_string()))?;
        let resolver = self.resolver.as_ref().ok_or(ResolveError::NoResolver)?;
        let ips = resolver
            .lookup_ip(host)
            .await
            .map_err(|source| ResolveError::Lookup {
                host: host.to_string(),
                source,
            })?;
        let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        if addrs.is_empty() {
            return Err(ResolveError::NoAddress(host.to_string()));
        }
        Ok(addrs)
    }

    /// Uses `client` for connections made from now on.
    pub fn set_client_config(&self, client: quinn::ClientConfig) {
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
    }

    /// A new stream to `addr`, reusing the pooled connection, or making one.
    pub async fn open(
        &self,
        addr: SocketAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr)
            && c.close_reason().is_none()
            && let Ok(s) = c.open_bi().await
        {
            return Ok(s);
        }
        conns.remove(&addr);
        let now = tokio::time::Instant::now();
        if let Err(wait) = self
            .backoff
            .lock()
            .await
            .entry(addr)
            .or_default()
            .ready(now)
        {
            return Err(TunnelError::BackingOff { addr, wait });
        }
        let conn = match self.dial(addr).await {
            Ok(c) => {
                self.backoff
                    .lock()
                    .await
                    .entry(addr)
                    .or_default()
                    .succeeded();
                c
            }
            Err(e) => {
                self.backoff
                    .lock()
                    .await
                    .entry(addr)
                    .or_default()
                    .failed(tokio::time::Instant::now());
                return Err(e);
            }
        };
        tracing::info!(%addr, "tunnel connected");
        let s = conn
            .open_bi()
            .await
            .map_err(|source| TunnelError::Connection { addr, source })?;
        conns.insert(addr, conn);
        Ok(s)
    }

    /// A new tunnel to `addr`, closed when its peer stops verifying.
    async fn dial(&self, addr: SocketAddr) -> Result<quinn::Connection, TunnelError> {
        let watch = TrustWatch::new(&self.trust);
        let config = self
            .client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connecting = self
            .endpoint
            .connect_with(config, addr, "gateway.strait.internal")
            .map_err(|source| TunnelError::Connect { addr, source })?;
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| TunnelError::HandshakeTimeout { addr })?
            .map_err(|source| TunnelError::Connection { addr, source })?;
        tokio::spawn(close_when_untrusted(
            conn.clone(),
            watch,
            "client",
            self.metrics.clone(),
        ));
        Ok(conn)
    }

    pub async fn connections(&self) -> usize {
        self.conns
            .lock()
            .await
            .values()
            .filter(|c| c.close_reason().is_none())
            .count()
    }
}

/// The egress listener: local sidecars hand it their end-to-end mTLS
/// connection; it reads the SNI, finds the remote gateway that serves the
/// target, and sends the connection over that gateway's tunnel.
pub async fn serve_egress(
    listener: TcpListener,
    table: watch::Receiver<Arc<RouteTable>>,
    pool: Arc<Pool>,
    config: Config,
    metrics: Metrics,
) {
    let mut listener = strait_runtime::accept::Acceptor::new(listener, "egress");
    loop {
        let (tcp, peer) = listener.accept().await;
        let _ = tcp.set_nodelay(true);
        let table = table.borrow().clone();
        let pool = pool.clone();
        let config = config.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            egress(tcp, peer, &table, &pool, &config, &metrics)
                .instrument(tracing::debug_span!("egress", %peer))
                .await;
        });
    }
}

async fn egress(
    mut client: TcpStream,
    peer: SocketAddr,
    table: &RouteTable,
    pool: &Pool,
    config: &Config,
    metrics: &Metrics,
) {
    let (hello, buf) = match passthrough::read_hello(&mut client, config.hello_timeout).await {
        Ok(h) => h,
        Err((reason, detail)) => {
            metrics.count_stream("refused", reason);
            tracing::info!(%peer, reason, detail, "egress connection refused");
            return;
        }
    };
    let Some(sni) = hello.server_name else {
        metrics.count_stream("refused", "egress_no_sni");
        return;
    };
    let target = match route::parse_target(&sni) {
        Ok(t) => t,
        Err(_) => {
            metrics.count_stream("refused", "egress_bad_sni");
            return;
        }
    };
    let gateways = match table.remote_gateways(&target.host) {
        Some(g) if !g.is_empty() => g,
        _ => {
            metrics.count_stream("refused", "egress_no_remote");
            tracing::info!(%peer, host = %target.host, "no remote gateway serves this host");
            return;
        }
    };
    let mut stream = None;
    'gateways: for gw in &gateways {
        // A DNS name is resolved on every new stream; the resolver caches
        // answers for their TTL, so a moved gateway is found again.
        let addrs = match pool.resolve(gw).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(gateway = %gw, error = %e, "gateway address not resolved");
                continue;
            }
        };
        for addr in addrs {
            match pool.open(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break 'gateways;
                }
                Err(e) => tracing::warn!(error = %e, "tunnel unavailable"),
            }
        }
    }
    let Some((mut send, recv)) = stream else {
        metrics.count_stream("failed", "tunnel_unavailable");
        return;
    };
    let header = TunnelHeader {
        target: sni.clone(),
        source_identity: String::new(),
        trace_context: Default::default(),
    };
    if send.write_all(&encode_header(&header)).await.is_err() || send.write_all(&buf).await.is_err()
    {
        metrics.count_stream("failed", "tunnel_write");
        return;
    }
    metrics.count_stream("sent", "ok");
    let (up, down) =
        strait_io::splice(client, tokio::io::join(recv, send), config.idle_timeout).await;
    tracing::debug!(%peer, %sni, sent = up, received = down, "egress connection done");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(target: &str) -> TunnelHeader {
        TunnelHeader {
            target: target.into(),
            source_identity: "spiffe://td/ns/a/sa/b".into(),
            trace_context: [("traceparent".to_string(), "00-abc-def-01".to_string())].into(),
        }
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let t0 = tokio::time::Instant::now();
        let mut b = Backoff::new();
        assert!(b.ready(t0).is_ok());
        b.failed(t0);
        assert_eq!(b.ready(t0), Err(Backoff::MIN));
        assert!(b.ready(t0 + Backoff::MIN).is_ok());
        let mut t = t0;
        for _ in 0..10 {
            b.failed(t);
            t += Duration::from_secs(60);
        }
        b.failed(t);
        assert_eq!(b.ready(t), Err(Backoff::MAX), "capped");
        b.succeeded();
        assert!(b.ready(t).is_ok());
        assert_eq!(b, Backoff::new());
    }

    #[tokio::test]
    async fn header_round_trip() {
        let h = header("outbound_.9080_._.reviews.bookinfo.svc.cluster.local");
        let mut wire = encode_header(&h);
        wire.extend_from_slice(b"tls bytes follow");
        let mut r = wire.as_slice();
        assert_eq!(read_header(&mut r).await.unwrap(), h);
        assert_eq!(
            r, b"tls bytes follow",
            "nothing after the header is consumed"
        );
    }

    #[tokio::test]
    async fn bad_headers() {
        let mut too_big = ((MAX_HEADER + 1) as u32).to_be_bytes().to_vec();
        too_big.extend_from_slice(&[0; 8]);
        assert_eq!(
            read_header(&mut too_big.as_slice()).await,
            Err(HeaderError::TooLarge(MAX_HEADER + 1))
        );
        let mut empty = 0u32.to_be_bytes().as_slice().to_vec();
        assert_eq!(
            read_header(&mut empty.as_slice()).await,
            Err(HeaderError::Empty)
        );
        empty.clear();
        assert!(matches!(
            read_header(&mut empty.as_slice()).await,
            Err(HeaderError::Io(_))
        ));
        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            read_header(&mut garbage.as_slice()).await,
            Err(HeaderError::Decode(_))
        ));
        let no_target = encode_header(&TunnelHeader::default());
        // An all-default message encodes to nothing: "empty".
        assert_eq!(
            read_header(&mut no_target.as_slice()).await,
            Err(HeaderError::Empty)
        );
        let mut only_id = encode_header(&TunnelHeader {
            source_identity: "x".into(),
            ..Default::default()
        });
        assert_eq!(
            read_header(&mut only_id.as_slice()).await,
            Err(HeaderError::NoTarget)
        );
        only_id.truncate(3);
        assert!(matches!(
            read_header(&mut only_id.as_slice()).await,
            Err(HeaderError::Io(_))
        ));
    }
}
