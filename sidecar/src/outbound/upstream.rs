//! Reaching an upstream: pooled HTTP/1.1 and HTTP/2 connections over mTLS
//! (or plain TCP), the request body across attempts, and one attempt of a
//! request with its failure classified for retries. Endpoint picking is in
//! `pick`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2::SendRequest};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_ca::SpiffeId;
use strait_ca::tls::{Accept, SpiffeServerVerifier};
use strait_proto::strait::mesh::v1 as pb;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::idle::{self, IdleList};
use crate::policy::{Outcome, TrafficPolicy, endpoint_key};
use crate::{Counted, Shared};

use super::attempts::Tried;
use super::limits::Limits;

/// A request body as one attempt sends it: a copy of one held whole, or
/// the client's stream.
pub(super) type SendBody = http_body_util::Either<Full<Bytes>, Counted<Incoming>>;

/// A request body across the attempts of one request.
pub(super) enum Outgoing {
    /// Held whole: every attempt sends a copy.
    Whole(Bytes),
    /// Passed on as it arrives: the first attempt that sends takes it.
    Stream(std::sync::Mutex<Option<Counted<Incoming>>>),
}

impl Outgoing {
    /// Holds `body` whole when it declares a length of at most
    /// [`crate::MAX_REPLAYABLE_BODY`] (or has none), else streams it;
    /// `bytes` counts what goes through.
    pub(super) async fn new(
        body: Incoming,
        bytes: Arc<AtomicU64>,
    ) -> Result<Outgoing, crate::BodyError> {
        use hyper::body::Body;
        if body.is_end_stream() {
            return Ok(Outgoing::Whole(Bytes::new()));
        }
        match body.size_hint().exact() {
            Some(n) if n <= crate::MAX_REPLAYABLE_BODY as u64 => {
                let b = crate::read_body(body, crate::MAX_REPLAYABLE_BODY).await?;
                bytes.store(b.len() as u64, Ordering::Relaxed);
                Ok(Outgoing::Whole(b))
            }
            _ => Ok(Outgoing::Stream(std::sync::Mutex::new(Some(Counted::new(
                body, bytes,
            ))))),
        }
    }

    /// The body for one more attempt; `None` once a stream was taken.
    pub(super) fn take(&self) -> Option<SendBody> {
        match self {
            Outgoing::Whole(b) => Some(Either::Left(Full::new(b.clone()))),
            Outgoing::Stream(s) => s.lock().ok()?.take().map(Either::Right),
        }
    }

    /// Whether another attempt can still send the body.
    pub(super) fn replayable(&self) -> bool {
        match self {
            Outgoing::Whole(_) => true,
            Outgoing::Stream(s) => s.lock().is_ok_and(|s| s.is_some()),
        }
    }
}

/// ALPN for HTTP/2 between sidecars (Istio's), then plain `h2`.
pub(super) const ALPN_H2: &[&[u8]] = &[b"istio-h2", b"h2"];
/// ALPN for HTTP/1.1 between sidecars (Istio's), then plain `http/1.1`.
pub(super) const ALPN_H1: &[&[u8]] = &[b"istio-http/1.1", b"http/1.1"];
/// ALPN for a TCP tunnel between sidecars (Istio's).
pub(super) const ALPN_TCP: &[&[u8]] = &[b"istio"];

/// Pooled connections to upstreams (HTTP/2: one shared per destination;
/// HTTP/1.1: idle keep-alive connections, one request at a time each), and
/// the in-flight count per destination that enforces DestinationRule
/// `connectionPool` limits.
#[derive(Default)]
pub struct Pool {
    // foldhash rather than SipHash: looked up on every request.
    pub(super) conns: Mutex<foldhash::HashMap<PoolKey, Pooled>>,
    /// Idle HTTP/1.1 connections, most recently used last.
    idle: Arc<Mutex<foldhash::HashMap<PoolKey, IdleList<SendBody, Http1Meta>>>>,
    /// HTTP/2 connects under way, and where their outcome will be told.
    connecting: Mutex<foldhash::HashMap<PoolKey, watch::Receiver<Option<Connected2>>>>,
    /// DestinationRule `connectionPool` limits.
    pub(super) limits: Limits,
    /// HTTP/1.1 to destinations outside the mesh (passthrough), made on
    /// first use.
    passthrough: std::sync::OnceLock<PassthroughClient>,
}

/// The pooled HTTP/1.1 client for passthrough requests.
pub(super) type PassthroughClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    SendBody,
>;

/// What a pooled connection was opened for: a connection is reused only
/// for the same address, SNI, accepted identities and client identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct PoolKey {
    pub(super) target: String,
    pub(super) sni: String,
    pub(super) identities: String,
    pub(super) tls: bool,
    /// The client identity's allocation (kept alive by [`Pooled`], so it
    /// cannot be reused by a newer identity while the entry exists).
    pub(super) generation: usize,
    /// The trust (bundles, deny-list) the server was verified under.
    pub(super) trust_version: u64,
}

/// How a shared HTTP/2 connect ended.
type Connected2 = Result<Pooled, SendError>;

/// What a pooled HTTP/1.1 connection keeps with it.
struct Http1Meta {
    /// The verified server identity (`unknown` without TLS).
    peer: String,
    /// Holds the client identity alive while pooled (see [`PoolKey`]).
    _identity: Arc<Identity>,
    /// Requests it carried.
    used: u32,
}

/// A pooled HTTP/1.1 connection to an upstream.
type Http1Conn = idle::Conn<SendBody, Http1Meta>;

/// How long an HTTP/1.1 connection may wait in the pool (hyper's and
/// Go's default for idle keep-alive connections).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per destination; more are closed as
/// they come back (a burst's connections do not all stay open).
const MAX_IDLE: usize = 64;

#[derive(Clone)]
pub(super) struct Pooled {
    pub(super) sender: SendRequest<SendBody>,
    /// The verified server identity (`unknown` without TLS).
    pub(super) peer: String,
    /// Holds the client identity alive while pooled (see [`PoolKey`]).
    pub(super) _identity: Arc<Identity>,
}

impl Pool {
    pub(super) fn get(&self, key: &PoolKey) -> Option<Pooled> {
        let mut m = self.conns.lock().ok()?;
        match m.get(key) {
            Some(p) if !p.sender.is_closed() => Some(p.clone()),
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        }
    }

    /// Pools `p`, forgetting closed connections and those of older client
    /// identities (dropping a sender lets its connection finish the
    /// requests in flight, then close).
    pub(super) fn put(&self, key: PoolKey, p: Pooled) {
        if let Ok(mut m) = self.conns.lock() {
            m.retain(|k, v| {
                !v.sender.is_closed()
                    && k.generation == key.generation
                    && k.trust_version == key.trust_version
            });
            m.insert(key, p);
        }
    }

    pub(super) fn forget(&self, key: &PoolKey) {
        if let Ok(mut m) = self.conns.lock() {
            m.remove(key);
        }
    }

    /// An idle HTTP/1.1 connection for `key` (the most recently used one
    /// that is still open).
    fn take_idle(&self, key: &PoolKey) -> Option<Http1Conn> {
        let mut m = self.idle.lock().ok()?;
        let list = m.get_mut(key)?;
        let found = list.take();
        if list.is_empty() {
            m.remove(key);
        }
        found
    }

    /// Pools `c` as idle once its exchange is over, unless it carried
    /// `max_requests` requests.
    fn park(&self, key: PoolKey, c: Http1Conn, max_requests: Option<u32>) {
        if max_requests.is_some_and(|max| max > 0 && c.meta.used >= max) {
            return;
        }
        let idle = self.idle.clone();
        idle::when_idle(c, move |c| {
            let Ok(mut m) = idle.lock() else { return };
            // Connections of an older client identity or trust go.
            m.retain(|k, _| k.generation == key.generation && k.trust_version == key.trust_version);
            m.entry(key)
                .or_insert_with(|| IdleList::new(IDLE_TIMEOUT, MAX_IDLE))
                .put(c);
        });
    }

    /// Idle pooled HTTP/1.1 connections.
    pub fn idle_http1(&self) -> usize {
        self.idle
            .lock()
            .map_or(0, |m| m.values().map(IdleList::len).sum())
    }

    /// The client for passthrough HTTP/1.1 requests.
    pub(super) fn passthrough_http1(&self) -> &PassthroughClient {
        self.passthrough.get_or_init(|| {
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
        })
    }

    /// Pooled HTTP/2 connections (open or not yet noticed closed).
    pub fn len(&self) -> usize {
        self.conns.lock().map_or(0, |m| m.len())
    }

    /// Whether no connection is pooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone)]
pub(super) enum SendError {
    /// No connection (TCP, TLS or HTTP/2 setup).
    Connect(String),
    /// The server closed the connection during the TLS handshake, before
    /// answering the ClientHello: what an east-west gateway does with an
    /// SNI it cannot route (a service, port or subset it does not know).
    Closed(String),
    /// The connection broke before a response.
    Reset(String),
    /// The per-try or route timeout passed.
    Timeout,
}

impl SendError {
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            SendError::Connect(_) | SendError::Closed(_) => Outcome::ConnectFailure,
            SendError::Reset(_) | SendError::Timeout => Outcome::Reset,
        }
    }

    /// The attempt's end, for the retry decision.
    pub(super) fn tried(&self) -> Tried {
        match self {
            SendError::Connect(_) | SendError::Closed(_) => Tried::ConnectFailure,
            SendError::Reset(_) => Tried::Reset,
            SendError::Timeout => Tried::Timeout,
        }
    }

    pub(super) fn status(&self) -> StatusCode {
        match self {
            SendError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "upstream connect error: {e}"),
            SendError::Closed(e) => write!(f, "upstream connect error: {e} (closed by the server)"),
            SendError::Reset(e) => write!(f, "upstream reset: {e}"),
            SendError::Timeout => f.write_str("upstream request timeout"),
        }
    }
}

/// One endpoint to connect to, and how.
pub(super) struct Target<'a> {
    pub(super) service: &'a pb::Service,
    /// Where to open TCP: the endpoint's `via` (its network's gateway)
    /// when set, else the endpoint itself. Made once per attempt.
    pub(super) address: String,
    /// The service port (in the SNI).
    pub(super) port: u16,
    pub(super) subset: Option<&'a str>,
    /// Originate mTLS (DestinationRule `tls.mode` other than DISABLE).
    pub(super) tls: bool,
    pub(super) connect_timeout: Duration,
}

/// Where to open TCP for `ep`: `via` when set, else the endpoint.
pub(super) fn upstream_address(ep: &pb::Endpoint) -> String {
    if ep.via.is_empty() {
        endpoint_key(ep)
    } else {
        ep.via.clone()
    }
}

impl<'a> Target<'a> {
    /// Endpoint `ep` of `service` on service port `port`, for `subset`
    /// under traffic policy `tp`.
    ///
    /// Behind another network's gateway the SNI names no subset: the
    /// subset was resolved here, by labels, and the gateway endpoint
    /// matched it only because every endpoint behind it carries the
    /// subset's labels (an export's `endpoint_labels` are those all its
    /// workloads share). So any endpoint the gateway picks is one of the
    /// subset, and the exporting cluster need not define the subset
    /// itself (Istio needs the DestinationRule copied there; a gateway
    /// refuses a subset name it does not know).
    pub(super) fn new(
        service: &'a pb::Service,
        ep: &pb::Endpoint,
        port: u16,
        subset: Option<&'a str>,
        tp: &TrafficPolicy,
        default_connect_timeout: Duration,
    ) -> Target<'a> {
        let behind_gateway = ep.kind() == pb::endpoint::Kind::Gateway;
        Target {
            service,
            address: upstream_address(ep),
            port,
            subset: subset.filter(|_| !behind_gateway),
            tls: tp.tls,
            connect_timeout: tp.connect_timeout.unwrap_or(default_connect_timeout),
        }
    }

    pub(super) fn sni(&self) -> String {
        strait_model::sni::format(self.port, self.subset, &self.service.hostname)
    }
}

/// A connected upstream stream and the identity its server proved.
pub(super) struct Connected<S> {
    pub(super) stream: S,
    pub(super) peer: String,
    /// What ends the connection when the server stops verifying.
    pub(super) watched: Option<Watched>,
}

pub(super) use crate::live::Watched;

/// The TLS client config for calling `service` as `id`: the server must
/// present one of the service's identities, chained to its trust domain's
/// bundle.
pub(super) fn client_tls(
    shared: &Shared,
    id: &Identity,
    service: &pb::Service,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut accepted = std::collections::BTreeSet::new();
    for i in &service.identities {
        match SpiffeId::parse(i) {
            Ok(id) => {
                accepted.insert(id);
            }
            Err(e) => {
                tracing::warn!(service = %service.hostname, identity = %i, error = %e, "ignoring a bad service identity")
            }
        }
    }
    if accepted.is_empty() {
        return Err(format!(
            "{} lists no valid identity to verify its servers against",
            service.hostname
        ));
    }
    let verifier = SpiffeServerVerifier::new(shared.trust.clone(), Accept::Ids(accepted));
    strait_ca::tls::client_config(verifier, Some((&id.chain_der, &id.key_pkcs8)), alpn)
        .map(Arc::new)
        .map_err(|e| format!("TLS client config: {e}"))
}

pub(super) async fn connect_tcp(t: &Target<'_>) -> Result<TcpStream, SendError> {
    let addr = &t.address;
    let tcp = tokio::time::timeout(t.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| SendError::Connect(format!("{addr}: connect timed out")))?
        .map_err(|e| SendError::Connect(format!("{addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// TCP then mTLS to `t`, offering `alpn`.
pub(super) async fn connect_tls(
    shared: &Shared,
    id: &Identity,
    t: &Target<'_>,
    alpn: &[&[u8]],
) -> Result<Connected<tokio_rustls::client::TlsStream<TcpStream>>, SendError> {
    // Before the handshake verifies the server: a trust change from here
    // on reaches the connection.
    let watch = strait_ca::live::TrustWatch::new(&shared.trust);
    let config = client_tls(shared, id, t.service, alpn).map_err(SendError::Connect)?;
    let sni = t.sni();
    let name = rustls::pki_types::ServerName::try_from(sni.clone())
        .map_err(|e| SendError::Connect(format!("SNI {sni}: {e}")))?;
    let tcp = connect_tcp(t).await?;
    let addr = &t.address;
    let stream = tokio::time::timeout(
        t.connect_timeout,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| SendError::Connect(format!("{addr}: TLS handshake timed out")))?
    .map_err(|e| {
        let closed = matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
        );
        if closed {
            SendError::Closed(format!("{addr}: TLS handshake for SNI {sni}: {e}"))
        } else {
            SendError::Connect(format!("{addr}: TLS handshake: {e}"))
        }
    })?;
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(strait_ca::live::PeerChain::from_certs);
    let peer = chain
        .as_ref()
        .map_or("unknown", |c| c.identity())
        .to_string();
    let watched = Some(Watched::new(&shared.metrics, "outbound", watch, chain));
    Ok(Connected {
        stream,
        peer,
        watched,
    })
}

/// A connection to an upstream: mTLS, or plain TCP (DestinationRule
/// `tls.mode: DISABLE`).
type UpstreamIo = Box<dyn Io>;

/// What an upstream connection is.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// TCP to `t`, then mTLS offering `alpn` when `t.tls`; with the identity
/// the server proved (`unknown` without TLS).
async fn open(
    shared: &Shared,
    id: &Identity,
    t: &Target<'_>,
    alpn: &[&[u8]],
) -> Result<Connected<UpstreamIo>, SendError> {
    if t.tls {
        let c = connect_tls(shared, id, t, alpn).await?;
        Ok(Connected {
            stream: Box::new(c.stream),
            peer: c.peer,
            watched: c.watched,
        })
    } else {
        Ok(Connected {
            stream: Box::new(connect_tcp(t).await?),
            peer: "unknown".to_string(),
            watched: None,
        })
    }
}

/// An HTTP/2 connection over `io`, its task ended early when `watched`
/// says the server no longer verifies.
pub(super) async fn h2_handshake<I>(
    io: I,
    addr: &str,
    watched: Option<Watched>,
) -> Result<SendRequest<SendBody>, SendError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(format!("{addr}: HTTP/2: {e}")))?;
    tokio::spawn(async move {
        if let Some(Err(e)) = Watched::run(watched, conn).await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

/// What a connection to `t` as `id` is pooled under.
fn pool_key(shared: &Shared, id: &Arc<Identity>, t: &Target<'_>) -> PoolKey {
    PoolKey {
        target: t.address.clone(),
        sni: t.sni(),
        identities: t.service.identities.join(","),
        tls: t.tls,
        generation: Arc::as_ptr(id) as usize,
        trust_version: shared.config.borrow().trust_version,
    }
}

/// A pooled (or new) HTTP/2 connection to `t`.
pub(super) async fn h2_connection(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
) -> Result<(PoolKey, Pooled), SendError> {
    let key = pool_key(shared, id, t);
    loop {
        if let Some(p) = shared.pool.get(&key) {
            return Ok((key, p));
        }
        // One connect per destination at a time: the requests of a burst
        // wait for it and share its outcome, rather than each opening a
        // connection of its own (of which the pool would keep one).
        let joined = {
            let Ok(mut m) = shared.pool.connecting.lock() else {
                break;
            };
            match m.get(&key) {
                Some(rx) => Ok(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    m.insert(key.clone(), rx);
                    Err(tx)
                }
            }
        };
        let mut waiting = match joined {
            Ok(rx) => rx,
            Err(tx) => {
                let guard = Connecting {
                    pool: &shared.pool,
                    key: &key,
                };
                let made = h2_connect(shared, id, t, &key).await;
                if let Ok(p) = &made {
                    shared.pool.put(key.clone(), p.clone());
                }
                let _ = tx.send(Some(made.clone()));
                drop(guard);
                return made.map(|p| (key, p));
            }
        };
        match waiting.wait_for(Option::is_some).await.as_deref() {
            Ok(Some(Ok(p))) => return Ok((key, p.clone())),
            Ok(Some(Err(e))) => return Err(e.clone()),
            // The request that was connecting went away: try again.
            _ => continue,
        }
    }
    let p = h2_connect(shared, id, t, &key).await?;
    Ok((key, p))
}

/// Forgets an in-progress connect when it ends (or is abandoned).
struct Connecting<'a> {
    pool: &'a Pool,
    key: &'a PoolKey,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.pool.connecting.lock() {
            m.remove(self.key);
        }
    }
}

/// A new HTTP/2 connection to `t`.
async fn h2_connect(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
    key: &PoolKey,
) -> Result<Pooled, SendError> {
    let c = open(shared, id, t, ALPN_H2).await?;
    let sender = h2_handshake(c.stream, &key.target, c.watched).await?;
    Ok(Pooled {
        sender,
        peer: c.peer,
        _identity: id.clone(),
    })
}

/// The HTTP version sidecars speak to each other for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wire {
    /// HTTP/1.1 over a pooled keep-alive connection, one request at a
    /// time (ALPN `istio-http/1.1`).
    Http1,
    /// HTTP/2 over one shared connection (ALPN `istio-h2`).
    Http2,
}

/// A connection ready to take one request.
enum Conn {
    Http2(SendRequest<SendBody>),
    Http1(Http1Conn),
}

/// An idle pooled HTTP/1.1 connection to `t`, or a new one (`fresh`:
/// only a new one).
async fn h1_connection(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
    fresh: bool,
) -> Result<(PoolKey, Http1Conn, bool), SendError> {
    let key = pool_key(shared, id, t);
    if !fresh && let Some(c) = shared.pool.take_idle(&key) {
        return Ok((key, c, false));
    }
    let c = open(shared, id, t, ALPN_H1).await?;
    let sender = h1_handshake(c.stream, &key.target, c.watched).await?;
    let meta = Http1Meta {
        peer: c.peer,
        _identity: id.clone(),
        used: 0,
    };
    Ok((key, idle::Conn::new(sender, meta), true))
}

async fn h1_handshake<I>(
    io: I,
    addr: &str,
    watched: Option<Watched>,
) -> Result<http1::SendRequest<SendBody>, SendError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| SendError::Connect(format!("{addr}: HTTP/1.1: {e}")))?;
    tokio::spawn(async move {
        if let Some(Err(e)) = Watched::run(watched, conn).await {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
        }
    });
    Ok(sender)
}

/// Methods that may be sent twice without changing the outcome (RFC 9110
/// 9.2.2).
pub(super) fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    )
}

/// Sends the request `make` builds to `t` over `wire`; the verified
/// server identity comes with the answer. `make` is called once a
/// connection is ready (so a streamed body is not taken by an attempt
/// that never connects), and again only when a pooled connection lost a
/// request it had sent; it gives `None` when the body cannot be sent
/// again (it streamed). An HTTP/1.1 connection goes back to the pool once
/// its exchange is over, unless it carried `max_requests`.
pub(super) async fn send(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
    wire: Wire,
    max_requests: Option<u32>,
    make: &(dyn Fn() -> Option<Request<SendBody>> + Sync),
) -> Result<(Response<Incoming>, String), SendError> {
    let spent =
        || SendError::Reset("the request body streamed once and cannot be sent again".into());
    // A pooled connection may have died since it was last used; a request
    // it never sent goes once more over a fresh connection.
    let mut unsent: Option<Request<SendBody>> = None;
    let mut fresh = false;
    let (resp, peer) = loop {
        let (key, mut conn, peer) = match wire {
            Wire::Http2 => {
                let (key, pooled) = h2_connection(shared, id, t).await?;
                (key, Conn::Http2(pooled.sender), pooled.peer)
            }
            Wire::Http1 => {
                let (key, c, new) = h1_connection(shared, id, t, fresh).await?;
                fresh |= new;
                let peer = c.meta.peer.clone();
                (key, Conn::Http1(c), peer)
            }
        };
        let ready = match &mut conn {
            Conn::Http2(s) => s.ready().await,
            Conn::Http1(c) => c.sender.ready().await,
        };
        if let Err(e) = ready {
            if matches!(conn, Conn::Http2(_)) {
                shared.pool.forget(&key);
            }
            if fresh {
                return Err(SendError::Connect(format!("{}: {e}", key.target)));
            }
            fresh = true;
            continue;
        }
        let req = match unsent.take() {
            Some(r) => r,
            None => make().ok_or_else(spent)?,
        };
        // An idempotent request that a connection from the pool lost after
        // sending (the peer died a moment ago and the pool had not yet
        // seen it close) is sent once more over a fresh connection, as
        // the request cannot have been answered.
        let again = !fresh && idempotent(req.method());
        let sent = match &mut conn {
            Conn::Http2(s) => s.try_send_request(req).await,
            Conn::Http1(c) => {
                c.meta.used += 1;
                c.sender.try_send_request(req).await
            }
        };
        match sent {
            Ok(r) => {
                if let Conn::Http1(c) = conn {
                    shared.pool.park(key, c, max_requests);
                }
                break (r, peer);
            }
            Err(mut e) => {
                if matches!(conn, Conn::Http2(_)) {
                    shared.pool.forget(&key);
                }
                match (e.take_message(), again) {
                    (Some(r), _) if !fresh => {
                        unsent = Some(r);
                        fresh = true;
                    }
                    (None, true) => {
                        tracing::debug!(target = %key.target, error = %e.error(), "pooled connection lost; resending once on a fresh one");
                        unsent = Some(make().ok_or_else(|| {
                            SendError::Reset(format!(
                                "{} (the request body streamed; not resent)",
                                e.error()
                            ))
                        })?);
                        fresh = true;
                    }
                    _ => return Err(SendError::Reset(e.into_error().to_string())),
                }
            }
        }
    };
    Ok((resp, peer))
}

/// Sends a request that asks to switch protocols (`Upgrade`, as
/// WebSocket's handshake does) over a new HTTP/1.1 connection of its own:
/// HTTP/2 between sidecars has no `Upgrade`, and an upgraded connection
/// carries that one exchange, so it is never pooled. The connection
/// stays open for the switched protocol when the answer is 101.
pub(super) async fn send_upgrade(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
    req: Request<SendBody>,
) -> Result<(Response<Incoming>, String), SendError> {
    let c = open(shared, id, t, ALPN_H1).await?;
    Ok((
        h1_exchange(c.stream, &t.address, req, c.watched).await?,
        c.peer,
    ))
}

async fn h1_exchange<I>(
    io: I,
    addr: &str,
    req: Request<SendBody>,
    watched: Option<Watched>,
) -> Result<Response<Incoming>, SendError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| SendError::Connect(format!("{addr}: HTTP/1.1: {e}")))?;
    tokio::spawn(async move {
        if let Some(Err(e)) = Watched::run(watched, conn.with_upgrades()).await {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
        }
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| SendError::Reset(e.to_string()))
}
