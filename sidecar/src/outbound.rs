//! The outbound side: an HTTP proxy for the app. A request names its
//! destination in absolute form (`GET http://echo.demo:8080/path`, as
//! `http_proxy`/`curl -x` send it) or asks for a tunnel (`CONNECT
//! echo.demo:8080`); the host resolves against the pushed services;
//! VirtualService and DestinationRule pick the destination, subset and
//! endpoint; the request travels over mTLS with Istio's SNI
//! (`outbound_.<port>_.<subset>_.<host>`) to the destination's sidecar or
//! to another network's gateway (HTTP/2, ALPN `istio-h2`; a tunnel is raw
//! TCP, ALPN `istio`), and the server must present one of the service's
//! identities. Retries, timeouts, fault injection, connection-pool limits
//! and outlier reporting follow the route and the DestinationRule.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_ca::SpiffeId;
use strait_ca::tls::{Accept, SpiffeServerVerifier};
use strait_proto::strait::mesh::v1 as pb;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::metrics::{self, RequestLabels};
use crate::policy::{Outcome, RequestAttrs, RetryPolicy, TrafficPolicy, endpoint_key};
use crate::{Life, Observed, Phase, ProxyBody, Shared, Tracker};

/// Istio's default TCP connect timeout, when no DestinationRule sets one.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The reason header on answers the sidecar makes itself.
pub const REASON_HEADER: &str = "x-strait-reason";

/// ALPN for HTTP/2 between sidecars (Istio's), then plain `h2`.
const ALPN_H2: &[&[u8]] = &[b"istio-h2", b"h2"];
/// ALPN for a TCP tunnel between sidecars (Istio's).
const ALPN_TCP: &[&[u8]] = &[b"istio"];

/// Pooled HTTP/2 connections to upstreams, and the in-flight count per
/// destination that enforces DestinationRule `connectionPool` limits.
#[derive(Default)]
pub struct Pool {
    // foldhash rather than SipHash: looked up on every request.
    conns: Mutex<foldhash::HashMap<PoolKey, Pooled>>,
    in_flight: Mutex<foldhash::HashMap<String, Arc<AtomicU32>>>,
}

/// What a pooled connection was opened for: a connection is reused only
/// for the same address, SNI, accepted identities and client identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    target: String,
    sni: String,
    identities: String,
    tls: bool,
    /// The client identity's allocation (kept alive by [`Pooled`], so it
    /// cannot be reused by a newer identity while the entry exists).
    generation: usize,
    /// The trust (bundles, deny-list) the server was verified under.
    trust_version: u64,
}

#[derive(Clone)]
struct Pooled {
    sender: SendRequest<Full<Bytes>>,
    /// The verified server identity (`unknown` without TLS).
    peer: String,
    /// Holds the client identity alive while pooled (see [`PoolKey`]).
    _identity: Arc<Identity>,
}

impl Pool {
    fn get(&self, key: &PoolKey) -> Option<Pooled> {
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
    fn put(&self, key: PoolKey, p: Pooled) {
        if let Ok(mut m) = self.conns.lock() {
            m.retain(|k, v| {
                !v.sender.is_closed()
                    && k.generation == key.generation
                    && k.trust_version == key.trust_version
            });
            m.insert(key, p);
        }
    }

    fn forget(&self, key: &PoolKey) {
        if let Ok(mut m) = self.conns.lock() {
            m.remove(key);
        }
    }

    /// Pooled connections (open or not yet noticed closed).
    pub fn len(&self) -> usize {
        self.conns.lock().map_or(0, |m| m.len())
    }

    /// Whether no connection is pooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes one of `limit` in-flight slots of `destination` (named only
    /// when there is a limit); `None` when all are taken (the request
    /// overflows). No limit always admits.
    fn admit(&self, destination: impl FnOnce() -> String, limit: Option<u32>) -> Option<InFlight> {
        let Some(limit) = limit else {
            return Some(InFlight(None));
        };
        let counter = self
            .in_flight
            .lock()
            .ok()?
            .entry(destination())
            .or_default()
            .clone();
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight(Some(counter)))
    }
}

/// An in-flight slot, given back on drop.
struct InFlight(Option<Arc<AtomicU32>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// How many requests may be in flight to one destination under `tp`
/// (Envoy's circuit breakers as Istio configures them): `http2MaxRequests`,
/// and for HTTP/1.1-style limits `maxConnections` plus
/// `http1MaxPendingRequests`; the smaller wins.
pub fn concurrency_limit(tp: &TrafficPolicy) -> Option<u32> {
    let queued = match (tp.max_connections, tp.max_pending_requests) {
        (Some(c), Some(p)) => Some(c.saturating_add(p)),
        _ => None,
    };
    [tp.max_requests, queued].into_iter().flatten().min()
}

/// Accepts until `stop`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<Phase>,
    active: Tracker,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: let it pass.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        // Redirected by iptables (transparent mode): the port the app dialed.
        let dialed = crate::transparent::redirected_port(&tcp);
        let shared = shared.clone();
        let guard = active.guard();
        let life = Life {
            active: active.clone(),
            phase: stop.clone(),
        };
        tokio::spawn(async move {
            let _guard = guard;
            let phase = life.phase.clone();
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let life = life.clone();
                async move { Ok::<_, std::convert::Infallible>(proxy(shared, req, life, dialed).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            crate::drive(conn, |c| c.graceful_shutdown(), phase).await;
        });
    }
}

/// An answer the sidecar makes itself: `reason` in the body and in
/// [`REASON_HEADER`].
pub fn reply(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    if let Ok(v) = http::HeaderValue::from_str(reason) {
        r.headers_mut().insert(REASON_HEADER, v);
    }
    r
}

/// A random hex id (`x-request-id`).
fn request_id() -> String {
    use std::fmt::Write;
    let mut id = String::with_capacity(32);
    let _ = write!(id, "{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    id
}

/// The host and port a proxied request names: the absolute-form URI, else
/// the `Host` header; the port defaults to `dialed` (the original
/// destination's, in transparent mode), else 80. `CONNECT` needs a port.
pub fn destination_of(
    uri: &http::Uri,
    headers: &http::HeaderMap,
    connect: bool,
    dialed: Option<u16>,
) -> Result<(String, u16), String> {
    let default_port = dialed.unwrap_or(80);
    if let Some(a) = uri.authority() {
        let host = a.host();
        if host.is_empty() {
            return Err(format!("{uri} names no host"));
        }
        return match a.port_u16() {
            Some(p) => Ok((host.to_string(), p)),
            None if connect => Err(format!("CONNECT {a} names no port")),
            None => Ok((host.to_string(), default_port)),
        };
    }
    if connect {
        return Err(format!("CONNECT {uri}: expected host:port"));
    }
    let host = headers.get(http::header::HOST).ok_or(
        "the request names no host: send absolute-form requests (curl -x) or a Host header",
    )?;
    let host = host
        .to_str()
        .map_err(|_| "the Host header is not ASCII".to_string())?;
    let a: http::uri::Authority = host
        .parse()
        .map_err(|_| format!("Host header {host:?} is not host[:port]"))?;
    if a.host().is_empty() {
        return Err(format!("Host header {host:?} names no host"));
    }
    Ok((a.host().to_string(), a.port_u16().unwrap_or(default_port)))
}

/// Why one attempt failed.
#[derive(Debug)]
enum SendError {
    /// No connection (TCP, TLS or HTTP/2 setup).
    Connect(String),
    /// The connection broke before a response.
    Reset(String),
    /// The per-try or route timeout passed.
    Timeout,
}

impl SendError {
    fn outcome(&self) -> Outcome {
        match self {
            SendError::Connect(_) => Outcome::ConnectFailure,
            SendError::Reset(_) | SendError::Timeout => Outcome::Reset,
        }
    }

    fn retriable(&self, r: &RetryPolicy) -> bool {
        match self {
            SendError::Connect(_) => r.retries_connect_failure(),
            SendError::Reset(_) => r.retries_reset(),
            SendError::Timeout => r.retries_per_try_timeout(),
        }
    }

    fn status(&self) -> StatusCode {
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
            SendError::Reset(e) => write!(f, "upstream reset: {e}"),
            SendError::Timeout => f.write_str("upstream request timeout"),
        }
    }
}

/// One endpoint to connect to, and how.
struct Target<'a> {
    service: &'a pb::Service,
    /// Where to open TCP: the endpoint's `via` (its network's gateway)
    /// when set, else the endpoint itself. Made once per attempt.
    address: String,
    /// The service port (in the SNI).
    port: u16,
    subset: Option<&'a str>,
    /// Originate mTLS (DestinationRule `tls.mode` other than DISABLE).
    tls: bool,
    connect_timeout: Duration,
}

/// Where to open TCP for `ep`: `via` when set, else the endpoint.
fn upstream_address(ep: &pb::Endpoint) -> String {
    if ep.via.is_empty() {
        endpoint_key(ep)
    } else {
        ep.via.clone()
    }
}

impl Target<'_> {
    fn sni(&self) -> String {
        crate::istio_sni(self.port, self.subset, &self.service.hostname)
    }
}

/// A connected upstream stream and the identity its server proved.
struct Connected<S> {
    stream: S,
    peer: String,
}

/// The TLS client config for calling `service` as `id`: the server must
/// present one of the service's identities, chained to its trust domain's
/// bundle.
fn client_tls(
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

async fn connect_tcp(t: &Target<'_>) -> Result<TcpStream, SendError> {
    let addr = &t.address;
    let tcp = tokio::time::timeout(t.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| SendError::Connect(format!("{addr}: connect timed out")))?
        .map_err(|e| SendError::Connect(format!("{addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// TCP then mTLS to `t`, offering `alpn`.
async fn connect_tls(
    shared: &Shared,
    id: &Identity,
    t: &Target<'_>,
    alpn: &[&[u8]],
) -> Result<Connected<tokio_rustls::client::TlsStream<TcpStream>>, SendError> {
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
    .map_err(|e| SendError::Connect(format!("{addr}: TLS handshake: {e}")))?;
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| strait_ca::cert::CertSummary::from_der(leaf.as_ref()).ok())
        .and_then(|s| s.spiffe_id)
        .unwrap_or_else(|| "unknown".to_string());
    Ok(Connected { stream, peer })
}

async fn h2_handshake<I>(io: I, addr: &str) -> Result<SendRequest<Full<Bytes>>, SendError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(format!("{addr}: HTTP/2: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

/// A pooled (or new) HTTP/2 connection to `t`.
async fn h2_connection(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
) -> Result<(PoolKey, Pooled), SendError> {
    let key = PoolKey {
        target: t.address.clone(),
        sni: t.sni(),
        identities: t.service.identities.join(","),
        tls: t.tls,
        generation: Arc::as_ptr(id) as usize,
        trust_version: shared.config.borrow().trust_version,
    };
    if let Some(p) = shared.pool.get(&key) {
        return Ok((key, p));
    }
    let (sender, peer) = if t.tls {
        let c = connect_tls(shared, id, t, ALPN_H2).await?;
        (h2_handshake(c.stream, &key.target).await?, c.peer)
    } else {
        let tcp = connect_tcp(t).await?;
        (h2_handshake(tcp, &key.target).await?, "unknown".to_string())
    };
    let pooled = Pooled {
        sender,
        peer,
        _identity: id.clone(),
    };
    shared.pool.put(key.clone(), pooled.clone());
    Ok((key, pooled))
}

/// Methods that may be sent twice without changing the outcome (RFC 9110
/// 9.2.2).
fn idempotent(m: &http::Method) -> bool {
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

/// Sends the request `make` builds to `t`; the verified server identity
/// comes with the answer. `make` is called again only when a pooled
/// connection lost a request it had sent (so no copy is made up front).
async fn send(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
    make: &(dyn Fn() -> Request<Full<Bytes>> + Sync),
) -> Result<(Response<Incoming>, String), SendError> {
    // A pooled connection may have died since it was last used; a request
    // it never sent goes once more over a fresh connection.
    let mut req = make();
    let mut fresh = false;
    let (resp, peer) = loop {
        let (key, pooled) = h2_connection(shared, id, t).await?;
        let mut sender = pooled.sender;
        if let Err(e) = sender.ready().await {
            shared.pool.forget(&key);
            if fresh {
                return Err(SendError::Connect(format!("{}: HTTP/2: {e}", key.target)));
            }
            fresh = true;
            continue;
        }
        // An idempotent request that a connection from the pool lost after
        // sending (the peer died a moment ago and the pool had not yet
        // seen it close) is sent once more over a fresh connection, as
        // the request cannot have been answered.
        let again = !fresh && idempotent(req.method());
        match sender.try_send_request(req).await {
            Ok(r) => break (r, pooled.peer),
            Err(mut e) => {
                shared.pool.forget(&key);
                match (e.take_message(), again) {
                    (Some(unsent), _) if !fresh => {
                        req = unsent;
                        fresh = true;
                    }
                    (None, true) => {
                        tracing::debug!(target = %key.target, error = %e.error(), "pooled connection lost; resending once on a fresh one");
                        req = make();
                        fresh = true;
                    }
                    _ => return Err(SendError::Reset(e.into_error().to_string())),
                }
            }
        }
    };
    Ok((resp, peer))
}

/// [`reply`] as a relayed response.
fn reply_body(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    reply(status, reason).map(Either::Right)
}

/// An endpoint the balancer picked. Its outcome is reported exactly once:
/// by [`Picked::report`], or, when the request is abandoned first (the
/// client went away), on drop as a non-error answer, which keeps the
/// balancer's in-flight count right.
struct Picked<'a> {
    balancer: &'a crate::policy::Balancer,
    tp: &'a TrafficPolicy,
    key: String,
    /// Index of the endpoint in its service's `endpoints`.
    index: usize,
    reported: bool,
}

impl Picked<'_> {
    fn report(mut self, outcome: Outcome) {
        self.reported = true;
        self.balancer
            .report(&self.key, outcome, self.tp, Instant::now());
    }
}

impl Drop for Picked<'_> {
    fn drop(&mut self) {
        if !self.reported {
            // nginx's "client closed request": not the endpoint's fault.
            self.balancer
                .report(&self.key, Outcome::Status(499), self.tp, Instant::now());
        }
    }
}

/// Picks an endpoint of `service` for `tp`, avoiding the `tried` ones
/// while others can serve (Envoy's `previous_hosts` retry predicate,
/// which Istio turns on).
fn pick<'a>(
    shared: &'a Shared,
    service: &pb::Service,
    tp: &'a TrafficPolicy,
    locality: &str,
    tried: &[String],
) -> Result<Picked<'a>, crate::policy::PickError> {
    let from = |endpoints: &[pb::Endpoint]| {
        shared.balancer.pick(
            endpoints,
            tp.subset_labels.as_ref(),
            tp,
            locality,
            Instant::now(),
            fastrand::f64(),
        )
    };
    let all = &service.endpoints;
    let index = if tried.is_empty() {
        from(all)?
    } else {
        // A retry (the uncommon path, so copying is fine): the endpoints
        // not tried yet, mapped back to their index in `all`.
        let fresh: Vec<usize> = (0..all.len())
            .filter(|&i| !tried.contains(&endpoint_key(&all[i])))
            .collect();
        let fresh_endpoints: Vec<pb::Endpoint> = fresh.iter().map(|&i| all[i].clone()).collect();
        if fresh.is_empty() {
            from(all)?
        } else {
            from(&fresh_endpoints)
                .map(|j| fresh[j])
                .or_else(|_| from(all))?
        }
    };
    Ok(Picked {
        balancer: &shared.balancer,
        tp,
        key: endpoint_key(&all[index]),
        index,
        reported: false,
    })
}

/// What the request loop settled on, for metrics and the log.
struct Settled {
    upstream: String,
    destination_cluster: String,
    destination_workload: String,
    destination_principal: String,
    reason: Option<String>,
}

impl Default for Settled {
    fn default() -> Self {
        Settled {
            upstream: "-".into(),
            destination_cluster: "unknown".into(),
            destination_workload: "unknown".into(),
            destination_principal: "unknown".into(),
            reason: None,
        }
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

async fn proxy(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    life: Life,
    dialed: Option<u16>,
) -> Response<Observed<ProxyBody>> {
    let own = |r: Response<Full<Bytes>>| r.map(|b| Observed::plain(Either::Right(b)));
    if req.method() == http::Method::CONNECT {
        return own(tunnel(shared, req, life).await);
    }
    let start = Instant::now();
    let started = metrics::now_rfc3339();
    let (mut parts, body) = req.into_parts();
    let (host, port) = match destination_of(&parts.uri, &parts.headers, false, dialed) {
        Ok(d) => d,
        Err(e) => return own(reply(StatusCode::BAD_REQUEST, &e)),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let method = parts.method.as_str().to_string();
    if !parts.headers.contains_key("x-request-id")
        && let Ok(v) = request_id().parse()
    {
        parts.headers.insert("x-request-id", v);
    }
    let rid = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = match crate::read_body(body, crate::MAX_BUFFERED_BODY).await {
        Ok(b) => b,
        Err(e @ crate::BodyError::TooLarge(_)) => {
            return own(reply(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()));
        }
        Err(e) => return own(reply(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    let req_len = body.len() as u64;
    let mut settled = Settled::default();
    let (resp, service) =
        forward(&shared, &mut parts, body, &host, port, &path, &mut settled).await;
    let code = resp.status().as_u16();
    let labels = source_labels(&shared, &settled, service.as_deref(), &host, "http", code);
    // Metrics and the access log once the response has gone through (it
    // may stream): its size and the whole duration are known then.
    resp.map(|body| {
        Observed::new(body, move |resp_len| {
            let millis = start.elapsed().as_secs_f64() * 1000.0;
            shared.metrics.request(&labels, millis, req_len, resp_len);
            metrics::log(&metrics::AccessLog {
                start_time: started,
                reporter: "source",
                method: &method,
                path: &path,
                authority: &host,
                response_code: code,
                duration_ms: millis,
                upstream_host: &settled.upstream,
                peer_identity: Some(&settled.destination_principal),
                source_cluster: &labels.source_cluster,
                destination_cluster: &settled.destination_cluster,
                request_id: &rid,
                reason: settled.reason.as_deref(),
            });
        })
    })
}

/// Istio's labels for a request this sidecar sent.
fn source_labels(
    shared: &Shared,
    s: &Settled,
    service: Option<&pb::Service>,
    host: &str,
    protocol: &str,
    code: u16,
) -> RequestLabels {
    RequestLabels {
        reporter: "source".into(),
        source_workload: shared.opts.workload.name.clone(),
        source_workload_namespace: shared.opts.workload.namespace.clone(),
        source_principal: shared
            .current_identity()
            .map_or_else(|| "unknown".into(), |i| i.spiffe_id.to_string()),
        source_cluster: shared.cluster(),
        destination_workload: s.destination_workload.clone(),
        destination_workload_namespace: service
            .map_or_else(|| "unknown".into(), |s| or_unknown(&s.namespace)),
        destination_principal: s.destination_principal.clone(),
        destination_service: service.map_or_else(|| host.to_string(), |s| s.hostname.clone()),
        destination_cluster: s.destination_cluster.clone(),
        request_protocol: protocol.into(),
        response_code: code.to_string(),
        connection_security_policy: "mutual_tls".into(),
    }
}

/// Routes and sends one HTTP request (with retries). Returns the answer
/// and the service it resolved to.
async fn forward(
    shared: &Shared,
    parts: &mut http::request::Parts,
    body: Bytes,
    host: &str,
    port: u16,
    path: &str,
    settled: &mut Settled,
) -> (Response<ProxyBody>, Option<Arc<pb::Service>>) {
    let cfg = shared.config.borrow().clone();
    let my_ns = shared.opts.workload.namespace.as_str();
    let Some(service) = cfg.lookup(host, my_ns).cloned() else {
        let why = format!(
            "no service {host} in the mesh (names: <svc>, <svc>.<ns>, <svc>.<ns>.svc.cluster.local, <svc>.<ns>.svc.clusterset.local)"
        );
        settled.reason = Some(why.clone());
        return (reply_body(StatusCode::BAD_GATEWAY, &why), None);
    };
    let fail = |settled: &mut Settled, status: StatusCode, why: String| {
        settled.reason = Some(why.clone());
        reply_body(status, &why)
    };
    let Some(id) = shared.current_identity() else {
        let r = fail(
            settled,
            StatusCode::SERVICE_UNAVAILABLE,
            "this sidecar has no workload certificate yet".into(),
        );
        return (r, Some(service));
    };
    // Peer metadata for the destination's telemetry (Istio exchanges the
    // same through its metadata-exchange filter).
    for (name, value) in [
        (crate::SOURCE_CLUSTER_HEADER, shared.cluster()),
        (
            crate::SOURCE_WORKLOAD_HEADER,
            shared.opts.workload.name.clone(),
        ),
    ] {
        if let Ok(v) = value.parse() {
            parts.headers.insert(name, v);
        }
    }
    let method = parts.method.as_str().to_string();
    let attrs = RequestAttrs {
        method: Some(&method),
        path: Some(path),
        host: Some(host),
        port,
        headers: Some(&parts.headers),
        peer_identity: None,
        source_ip: None,
        source_namespace: Some(my_ns),
        source_labels: Some(&cfg.my_labels),
    };
    let route = match cfg.policies.route(my_ns, &service.hostname, port, &attrs) {
        Ok(r) => r,
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return (fail(settled, status, e.to_string()), Some(service));
        }
    };
    if let Some(fault) = &route.fault {
        let action = fault.apply(fastrand::f64(), fastrand::f64());
        if let Some(d) = action.delay {
            tokio::time::sleep(d).await;
        }
        if let Some(code) = action.abort {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return (
                fail(settled, status, "fault filter abort".into()),
                Some(service),
            );
        }
    }
    // The authority as the app wrote it (Envoy keeps the Host header),
    // carried as HTTP/2's `:authority`.
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| format!("{host}:{port}"));
    parts.headers.remove(http::header::HOST);
    parts.headers.remove("proxy-connection");
    parts.headers.remove(http::header::CONNECTION);
    parts.headers.remove("keep-alive");
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    parts.headers.remove(http::header::UPGRADE);
    let tries = 1 + route.retries.attempts;
    let mut tried: Vec<String> = Vec::new();
    let deadline = route.timeout.map(|t| Instant::now() + t);
    let mut last: Option<Response<ProxyBody>> = None;
    for attempt in 0..tries {
        let Some(dest) = route.pick(fastrand::f64()).cloned() else {
            return (
                fail(
                    settled,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "every destination of the route has weight 0".into(),
                ),
                Some(service),
            );
        };
        let dest_service = if dest.host == service.hostname {
            service.clone()
        } else {
            match cfg.lookup(&dest.host, my_ns) {
                Some(s) => s.clone(),
                None => {
                    let why = format!("route destination {} is not a known service", dest.host);
                    return (
                        fail(settled, StatusCode::SERVICE_UNAVAILABLE, why),
                        Some(service),
                    );
                }
            }
        };
        let dest_port = dest.port.unwrap_or(port);
        let tp =
            match cfg
                .policies
                .traffic_policy(my_ns, &dest_service.hostname, dest.subset.as_deref())
            {
                Ok(tp) => tp,
                Err(e) => {
                    let status =
                        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    return (fail(settled, status, e.to_string()), Some(service));
                }
            };
        let limit_key = || {
            format!(
                "{}|{}",
                dest_service.hostname,
                dest.subset.as_deref().unwrap_or("")
            )
        };
        let Some(_slot) = shared.pool.admit(limit_key, concurrency_limit(&tp)) else {
            let why = format!(
                "upstream connection pool overflow: {} allows {} requests in flight",
                dest_service.hostname,
                concurrency_limit(&tp).unwrap_or(0)
            );
            return (
                fail(settled, StatusCode::SERVICE_UNAVAILABLE, why),
                Some(service),
            );
        };
        let picked = match pick(shared, &dest_service, &tp, cfg.my_locality(), &tried) {
            Ok(p) => p,
            Err(e) => {
                let subset = dest
                    .subset
                    .as_deref()
                    .map(|s| format!(" subset {s}"))
                    .unwrap_or_default();
                let why = format!(
                    "no healthy upstream for {}{subset}: {e}",
                    dest_service.hostname
                );
                return (
                    fail(settled, StatusCode::SERVICE_UNAVAILABLE, why),
                    Some(service),
                );
            }
        };
        let ep = &dest_service.endpoints[picked.index];
        tried.push(picked.key.clone());
        let target = Target {
            service: &dest_service,
            address: upstream_address(ep),
            port: dest_port,
            subset: dest.subset.as_deref(),
            tls: tp.tls,
            connect_timeout: tp.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        };
        let authority = if dest_service.hostname == service.hostname && dest.port.is_none() {
            authority.clone()
        } else {
            // Rerouted to another service or port: name that one.
            format!("{}:{dest_port}", dest_service.hostname)
        };
        let mut uri = String::with_capacity(7 + authority.len() + path.len());
        uri.push_str("http://");
        uri.push_str(&authority);
        uri.push_str(path);
        let uri = match http::Uri::try_from(uri) {
            Ok(u) => u,
            Err(e) => {
                return (
                    fail(
                        settled,
                        StatusCode::BAD_REQUEST,
                        format!("bad request path {path:?}: {e}"),
                    ),
                    Some(service),
                );
            }
        };
        let parts: &http::request::Parts = parts;
        let make = || {
            let mut out = Request::from_parts(parts.clone(), Full::new(body.clone()));
            *out.version_mut() = http::Version::HTTP_2;
            *out.uri_mut() = uri.clone();
            out
        };
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let per_try = match (route.retries.per_try_timeout, remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Under a timeout the response is read whole within it (the
        // timeout covers the whole response, as Envoy's does); otherwise
        // it streams.
        let buffer = per_try.is_some();
        let sent = async {
            let (resp, peer) = send(shared, &id, &target, &make).await?;
            if !buffer {
                return Ok((resp.map(Either::Left), peer));
            }
            let (p, b) = resp.into_parts();
            let bytes = crate::read_body(b, crate::MAX_BUFFERED_BODY)
                .await
                .map_err(|e| SendError::Reset(format!("response: {e}")))?;
            Ok((
                Response::from_parts(p, Either::Right(Full::new(bytes))),
                peer,
            ))
        };
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .unwrap_or(Err(SendError::Timeout)),
            None => sent.await,
        };
        settled.upstream = target.address;
        settled.destination_cluster = or_unknown(&ep.cluster);
        settled.destination_workload = or_unknown(&ep.workload);
        let retry = match result {
            Ok((resp, peer)) => {
                let code = resp.status().as_u16();
                let outcome = if code >= 500 {
                    Outcome::Status(code)
                } else {
                    Outcome::Success
                };
                picked.report(outcome);
                settled.destination_principal = peer;
                settled.reason = None;
                let retry = route.retries.retries_status(code);
                last = Some(resp);
                retry
            }
            Err(e) => {
                let why = format!("{e} ({})", settled.upstream);
                tracing::debug!(attempt, endpoint = %picked.key, error = %why, "upstream attempt failed");
                picked.report(e.outcome());
                settled.reason = Some(why.clone());
                let retry = e.retriable(&route.retries);
                last = Some(reply_body(e.status(), &why));
                retry
            }
        };
        if !retry || attempt + 1 == tries || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    let resp =
        last.unwrap_or_else(|| reply_body(StatusCode::SERVICE_UNAVAILABLE, "no attempt was made"));
    (resp, Some(service))
}

/// `CONNECT host:port`: a TCP tunnel over mTLS (ALPN `istio`) to an
/// endpoint of the service; the TCP route and traffic policy apply.
async fn tunnel(shared: Arc<Shared>, req: Request<Incoming>, life: Life) -> Response<Full<Bytes>> {
    let started = metrics::now_rfc3339();
    let start = Instant::now();
    let (host, port) = match destination_of(req.uri(), req.headers(), true, None) {
        Ok(d) => d,
        Err(e) => return reply(StatusCode::BAD_REQUEST, &e),
    };
    let cfg = shared.config.borrow().clone();
    let my_ns = shared.opts.workload.namespace.clone();
    let Some(service) = cfg.lookup(&host, &my_ns).cloned() else {
        return reply(
            StatusCode::BAD_GATEWAY,
            &format!("no service {host} in the mesh"),
        );
    };
    let Some(id) = shared.current_identity() else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "this sidecar has no workload certificate yet",
        );
    };
    let attrs = RequestAttrs {
        method: None,
        host: Some(&host),
        port,
        source_namespace: Some(&my_ns),
        source_labels: Some(&cfg.my_labels),
        ..RequestAttrs::default()
    };
    let route = match cfg.policies.route(&my_ns, &service.hostname, port, &attrs) {
        Ok(r) => r,
        Err(e) => {
            return reply(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                &e.to_string(),
            );
        }
    };
    let Some(dest) = route.pick(fastrand::f64()).cloned() else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "every destination of the route has weight 0",
        );
    };
    let dest_service = match cfg.lookup(&dest.host, &my_ns) {
        Some(s) => s.clone(),
        None => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("route destination {} is not a known service", dest.host),
            );
        }
    };
    let tp =
        match cfg
            .policies
            .traffic_policy(&my_ns, &dest_service.hostname, dest.subset.as_deref())
        {
            Ok(tp) => tp,
            Err(e) => {
                return reply(
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    &e.to_string(),
                );
            }
        };
    let limit_key = || {
        format!(
            "tcp|{}|{}",
            dest_service.hostname,
            dest.subset.as_deref().unwrap_or("")
        )
    };
    let Some(slot) = shared.pool.admit(limit_key, tp.max_connections) else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "upstream connection pool overflow: {} allows {} connections",
                dest_service.hostname,
                tp.max_connections.unwrap_or(0)
            ),
        );
    };
    let picked = match pick(&shared, &dest_service, &tp, cfg.my_locality(), &[]) {
        Ok(p) => p,
        Err(e) => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no healthy upstream for {}: {e}", dest_service.hostname),
            );
        }
    };
    let ep = &dest_service.endpoints[picked.index];
    let target = Target {
        service: &dest_service,
        address: upstream_address(ep),
        port: dest.port.unwrap_or(port),
        subset: dest.subset.as_deref(),
        tls: tp.tls,
        connect_timeout: tp.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
    };
    let upstream: Result<(Box<dyn Duplex>, String), SendError> = if target.tls {
        connect_tls(&shared, &id, &target, ALPN_TCP)
            .await
            .map(|c| (Box::new(c.stream) as Box<dyn Duplex>, c.peer))
    } else {
        connect_tcp(&target)
            .await
            .map(|t| (Box::new(t) as Box<dyn Duplex>, "unknown".to_string()))
    };
    let (mut upstream, peer) = match upstream {
        Ok(u) => u,
        Err(e) => {
            let why = format!("{e} ({})", target.address);
            picked.report(e.outcome());
            return reply(e.status(), &why);
        }
    };
    let settled = Settled {
        upstream: target.address,
        destination_cluster: or_unknown(&ep.cluster),
        destination_workload: or_unknown(&ep.workload),
        destination_principal: peer,
        reason: None,
    };
    // A TCP endpoint's health is whether it could be connected to.
    picked.report(Outcome::Success);
    let labels = source_labels(&shared, &settled, Some(&service), &host, "tcp", 200);
    shared.metrics.tcp_opened.get_or_create(&labels).inc();
    let shared2 = shared.clone();
    let guard = life.active.guard();
    tokio::spawn(async move {
        let _guard = guard;
        let _slot = slot;
        let copied = match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                crate::until_killed(
                    tokio::io::copy_bidirectional(&mut client, &mut upstream),
                    life.phase,
                )
                .await
                .unwrap_or_else(|| Err(std::io::Error::other("closed at the drain deadline")))
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        let (sent, received) = copied.as_ref().map_or((0, 0), |(a, b)| (*a, *b));
        shared2.metrics.tcp_closed.get_or_create(&labels).inc();
        let reason = copied.err().map(|e| e.to_string());
        metrics::log(&metrics::AccessLog {
            start_time: started,
            reporter: "source",
            method: "CONNECT",
            path: "",
            authority: &format!("{host}:{port}"),
            response_code: 200,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            upstream_host: &settled.upstream,
            peer_identity: Some(&settled.destination_principal),
            source_cluster: &shared2.cluster(),
            destination_cluster: &settled.destination_cluster,
            request_id: "",
            reason: reason.as_deref(),
        });
        tracing::debug!(sent, received, "tunnel closed");
    });
    Response::new(Full::new(Bytes::new()))
}

/// A byte stream both ways (TLS or plain TCP upstream).
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn destination_comes_from_the_uri_then_the_host_header() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert(http::header::HOST, v.parse().unwrap());
            m
        };
        let none = http::HeaderMap::new();
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        /// URI, headers, CONNECT, expected (host, port) or error fragment.
        type Case<'a> = (
            &'a str,
            &'a http::HeaderMap,
            bool,
            Result<(&'a str, u16), &'a str>,
        );
        let cases: &[Case<'_>] = &[
            (
                "http://echo.demo:8080/x",
                &none,
                false,
                Ok(("echo.demo", 8080)),
            ),
            ("http://echo.demo/x", &none, false, Ok(("echo.demo", 80))),
            ("/x", &h("echo:9090"), false, Ok(("echo", 9090))),
            ("/x", &h("echo"), false, Ok(("echo", 80))),
            ("echo.demo:8080", &none, true, Ok(("echo.demo", 8080))),
            ("/x", &none, false, Err("names no host")),
            ("/x", &h("a b"), false, Err("is not host[:port]")),
            ("/x", &h("echo"), true, Err("expected host:port")),
        ];
        for (u, headers, connect, want) in cases {
            let got = destination_of(&uri(u), headers, *connect, None);
            match (want, &got) {
                (Ok((host, port)), Ok((h, p))) => {
                    assert_eq!((*host, *port), (h.as_str(), *p), "{u}")
                }
                (Err(needle), Err(e)) => assert!(e.contains(needle), "{u}: {e}"),
                _ => panic!("{u}: want {want:?}, got {got:?}"),
            }
        }
        // Transparent mode: the dialed port when Host has none.
        assert_eq!(
            destination_of(&uri("/x"), &h("echo"), false, Some(8080)).unwrap(),
            ("echo".to_string(), 8080)
        );
        assert_eq!(
            destination_of(&uri("/x"), &h("echo:9"), false, Some(8080)).unwrap(),
            ("echo".to_string(), 9)
        );
        // CONNECT without a port.
        let a: http::Uri = http::Uri::builder().authority("echo.demo").build().unwrap();
        assert!(
            destination_of(&a, &none, true, None)
                .unwrap_err()
                .contains("names no port")
        );
    }

    #[test]
    fn concurrency_limit_takes_the_tightest_circuit_breaker() {
        let tp = |c, p, r| TrafficPolicy {
            max_connections: c,
            max_pending_requests: p,
            max_requests: r,
            ..TrafficPolicy::default()
        };
        assert_eq!(concurrency_limit(&tp(None, None, None)), None);
        assert_eq!(concurrency_limit(&tp(Some(1), Some(1), None)), Some(2));
        assert_eq!(concurrency_limit(&tp(Some(1), None, None)), None);
        assert_eq!(concurrency_limit(&tp(Some(10), Some(10), Some(5))), Some(5));
        assert_eq!(concurrency_limit(&tp(None, None, Some(3))), Some(3));
        assert_eq!(
            concurrency_limit(&tp(Some(u32::MAX), Some(5), None)),
            Some(u32::MAX)
        );
    }

    #[test]
    fn admission_overflows_at_the_limit_and_frees_slots_on_drop() {
        let pool = Pool::default();
        let a = pool.admit(|| "echo|".into(), Some(2)).unwrap();
        let b = pool.admit(|| "echo|".into(), Some(2)).unwrap();
        assert!(pool.admit(|| "echo|".into(), Some(2)).is_none());
        // Other destinations have their own count.
        assert!(pool.admit(|| "other|".into(), Some(1)).is_some());
        drop(a);
        let c = pool.admit(|| "echo|".into(), Some(2)).unwrap();
        drop((b, c));
        for _ in 0..100 {
            assert!(pool.admit(|| "echo|".into(), None).is_some());
        }
        assert!(pool.admit(|| "echo|".into(), Some(0)).is_none());
    }
}
