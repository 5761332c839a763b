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
//!
//! This module has the listener and the connections (TLS, the peer's
//! verification, plaintext detection, TCP); `request` has what one HTTP
//! request goes through on its way to the app.

mod request;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_ca::tls::{Accept, SpiffeClientVerifier};
use strait_model::sni::IstioSni;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::config::MeshConfig;
use crate::identity::Identity;
use crate::metrics::{self, RequestLabels};
use crate::policy::{Decision, MtlsMode, RequestAttrs};
use crate::{Life, Shared};
use request::{App, Apps, request};

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

/// The workload port an mTLS connection is for: the target port of the
/// service port its SNI names (Istio's authorization `ports` and
/// port-level mTLS speak of workload ports), the SNI's port itself when
/// the service or port is not known here; `None` without an Istio SNI.
fn workload_port(cfg: &MeshConfig, sni: Option<IstioSni<'_>>) -> Option<u16> {
    let sni = sni?;
    Some(cfg.target_port(sni.host, sni.port).unwrap_or(sni.port))
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

/// Accepts until the drain starts.
pub(crate) async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener, drain: Life) {
    let apps = Apps::new(&shared.opts);
    // The config of the newest identity; holding the identity keeps the
    // comparison by pointer sound.
    let mut tls_cache: Option<(Arc<Identity>, Arc<rustls::ServerConfig>)> = None;
    let mut listener = strait_runtime::accept::Acceptor::new(listener, "inbound");
    loop {
        let (tcp, addr) = tokio::select! {
            c = listener.accept() => c,
            () = drain.draining() => return,
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
        let guard = drain.guard();
        let life = drain.clone();
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

/// Serves one accepted connection: plaintext (HTTP or TCP, unless STRICT)
/// or mTLS, by what its first byte says.
async fn handle(
    shared: Arc<Shared>,
    apps: Apps,
    tls: Option<Arc<rustls::ServerConfig>>,
    tcp: TcpStream,
    addr: SocketAddr,
    life: Life,
) {
    let cfg = shared.config.borrow().clone();
    // Redirected here (transparent inbound capture): the port the caller
    // dialed is the workload port.
    let dialed = crate::transparent::redirected_to(&tcp).map(|a| a.port());
    let app_port = dialed.unwrap_or(shared.opts.app.port());
    let app = apps.get(app_port);
    let mode = cfg
        .policies
        .mtls_mode(&shared.opts.workload.namespace, &cfg.my_labels, app_port);
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
                life.clone(),
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
                shared,
                tcp,
                plain,
                app_port,
                app.socket,
                life.clone(),
                None,
                None,
            )
            .await;
        }
        return;
    }
    let Some(tls) = tls else {
        tracing::info!(%addr, "no workload certificate yet: TLS connection refused");
        return;
    };
    let Some(Accepted {
        stream,
        peer,
        port,
        tcp_mode,
        watched,
    }) = accept_mtls(&shared, &cfg, tls, tcp, addr, app_port).await
    else {
        return;
    };
    let app = apps.get(port);
    if tcp_mode {
        serve_tcp(
            shared,
            stream,
            peer,
            port,
            app.socket,
            life.clone(),
            None,
            watched,
        )
        .await;
    } else {
        let served = serve_http(shared, app.clone(), TokioIo::new(stream), peer, port, life);
        crate::live::Watched::run(watched, served).await;
    }
}

/// An mTLS connection the inbound accepted, and what it is for.
struct Accepted {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// The verified caller.
    peer: Peer,
    /// The workload port (from the SNI; else the one dialed).
    port: u16,
    /// ALPN `istio`: TCP, not HTTP.
    tcp_mode: bool,
    /// What ends the connection when the peer stops verifying.
    watched: Option<crate::live::Watched>,
}

/// The TLS handshake of a connection whose workload port is `app_port`
/// unless its SNI says otherwise, and its peer's certificate verified
/// (`x-forwarded-client-cert` made for it); `None` (logged): the
/// handshake failed or timed out, the certificate does not verify, or the
/// port's PeerAuthentication is STRICT and the peer presented none.
async fn accept_mtls(
    shared: &Shared,
    cfg: &MeshConfig,
    tls: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    addr: SocketAddr,
    app_port: u16,
) -> Option<Accepted> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%addr, error = %e, "inbound TLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::info!(%addr, "inbound TLS handshake timed out");
            return None;
        }
    };
    let (_, conn) = stream.get_ref();
    let sni = conn
        .server_name()
        .and_then(|n| strait_model::sni::parse(n).ok());
    let port = workload_port(cfg, sni).unwrap_or(app_port);
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
                return None;
            }
        }
    }
    let mode = cfg
        .policies
        .mtls_mode(&shared.opts.workload.namespace, &cfg.my_labels, port);
    if mode == MtlsMode::Strict && peer.identity.is_none() {
        tracing::info!(%addr, "STRICT mTLS: a connection without a client certificate refused");
        return None;
    }
    let watched = Some(crate::live::Watched::new(
        &shared.metrics,
        "inbound",
        watch,
        chain,
    ));
    Some(Accepted {
        stream,
        peer,
        port,
        tcp_mode,
        watched,
    })
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
    life: Life,
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
    let relay = crate::relay_tcp(&mut stream, &mut conn, crate::TCP_IDLE_TIMEOUT, &life);
    let copied = crate::live::Watched::run(watched, relay)
        .await
        .unwrap_or(Err(crate::RelayError::Untrusted("peer")));
    shared.metrics.tcp_closed.get_or_create(&labels).inc();
    let reason = copied.as_ref().err().map(ToString::to_string);
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
        reason: reason.as_deref(),
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
    let phase = life.clone();
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
    phase.drive(conn, |c| c.graceful_shutdown()).await;
}

/// The `x-forwarded-client-cert` value for a verified peer (Envoy's format).
pub fn xfcc(own_id: &str, hash: &str, peer_id: &str) -> String {
    format!("By={own_id};Hash={hash};URI={peer_id}")
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
