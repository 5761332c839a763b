//! Reaching an upstream: the request body across attempts, the endpoint
//! to dial ([`Target`], with Istio's SNI), TCP and mTLS to it (the server
//! verified against the service's identities), the HTTP/1.1 and HTTP/2
//! handshakes, and one attempt of a request over a connection from the
//! pool (`pool`) with its failure classified for retries. Endpoint
//! picking is in `pick`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

use crate::identity::Identity;
use crate::policy::{Outcome, TrafficPolicy, endpoint_key};
use crate::{Counted, Shared};

use super::attempts::Tried;
use super::pool::{Http1Conn, h1_connection, h2_connection};

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

/// Why one attempt failed. Cloned to every request that waited for a
/// shared HTTP/2 connect, so it holds what went wrong as text.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum SendError {
    /// No connection (TCP, TLS or HTTP/2 setup).
    #[error("upstream connect error: {0}")]
    Connect(String),
    /// The server closed the connection during the TLS handshake, before
    /// answering the ClientHello: what an east-west gateway does with an
    /// SNI it cannot route (a service, port or subset it does not know).
    #[error("upstream connect error: {0} (closed by the server)")]
    Closed(String),
    /// The connection broke before a response.
    #[error("upstream reset: {0}")]
    Reset(String),
    /// The per-try or route timeout passed.
    #[error("upstream request timeout")]
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

/// Why no TLS client config for calling a service could be made.
#[derive(Debug, thiserror::Error)]
pub(super) enum ClientTlsError {
    /// The service lists no identity that parses as a SPIFFE ID.
    #[error("{service} lists no valid identity to verify its servers against")]
    NoIdentity { service: String },
    /// rustls refused the config (the workload certificate or key).
    #[error("TLS client config: {0}")]
    Config(#[source] rustls::Error),
}

/// The TLS client config for calling `service` as `id`: the server must
/// present one of the service's identities, chained to its trust domain's
/// bundle.
pub(super) fn client_tls(
    shared: &Shared,
    id: &Identity,
    service: &pb::Service,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, ClientTlsError> {
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
        return Err(ClientTlsError::NoIdentity {
            service: service.hostname.clone(),
        });
    }
    let verifier = SpiffeServerVerifier::new(shared.trust.clone(), Accept::Ids(accepted));
    strait_ca::tls::client_config(verifier, Some((&id.chain_der, &id.key_pkcs8)), alpn)
        .map(Arc::new)
        .map_err(ClientTlsError::Config)
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
    let config =
        client_tls(shared, id, t.service, alpn).map_err(|e| SendError::Connect(e.to_string()))?;
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
pub(super) type UpstreamIo = Box<dyn Io>;

/// What an upstream connection is.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// TCP to `t`, then mTLS offering `alpn` when `t.tls`; with the identity
/// the server proved (`unknown` without TLS).
pub(super) async fn open(
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

pub(super) async fn h1_handshake<I>(
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
