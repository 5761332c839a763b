//! The outbound side: an HTTP proxy for the app. A request names its
//! destination in absolute form (`GET http://echo.demo:8080/path`, as
//! `http_proxy`/`curl -x` send it), in `Host` or HTTP/2's `:authority`
//! (redirected connections, h2c and gRPC clients), or asks for a tunnel
//! (`CONNECT echo.demo:8080`); the host resolves against the pushed services;
//! VirtualService and DestinationRule pick the destination, subset and
//! endpoint; the request travels over mTLS with Istio's SNI
//! (`outbound_.<port>_.<subset>_.<host>`) to the destination's sidecar or
//! to another network's gateway (HTTP/2, ALPN `istio-h2`; a request that
//! switches protocols, such as a WebSocket handshake, HTTP/1.1 on its own
//! connection, ALPN `istio-http/1.1`; a tunnel is raw TCP, ALPN `istio`),
//! and the server must present one of the service's
//! identities (behind another network's gateway the SNI names no subset:
//! the subset was resolved here by labels, see `upstream::Target::new`).
//! Retries, timeouts, fault injection, connection-pool limits and outlier
//! reporting follow the route and the DestinationRule; the weighted
//! destination is chosen once per request and retries pick another
//! endpoint of it only (`attempts`). A request no upstream could answer
//! says why in its answer, the access log `reason` and
//! `strait_sidecar_upstream_failures_total{reason}` (`failure`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use strait_proto::strait::mesh::v1 as pb;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::metrics::{self, RequestLabels};
use crate::policy::{Outcome, RequestAttrs};
use crate::{Life, Observed, ProxyBody, Shared, names};

/// Istio's default TCP connect timeout, when no DestinationRule sets one.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The reason header on answers the sidecar makes itself.
pub const REASON_HEADER: &str = "x-strait-reason";

mod attempts;
mod failure;
mod forward;
mod limits;
mod passthrough;
mod pick;
mod pool;
mod tunnel;
mod upstream;

use attempts::{Attempts, Next, Tried};
use failure::{attempt_failure, no_upstream};
use forward::forward;
pub use limits::concurrency_limit;
use limits::{Connection, InFlight};
use passthrough::*;
use pick::{Picked, pick};
pub use pool::Pool;
use tunnel::{redirected_tcp, tunnel};
use upstream::*;

/// Accepts until the drain starts.
pub(crate) async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener, drain: Life) {
    let mut listener = strait_runtime::accept::Acceptor::new(listener, "outbound");
    loop {
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => c,
            () = drain.draining() => return,
        };
        let _ = tcp.set_nodelay(true);
        // Redirected by iptables (transparent mode): where the app was going.
        let original = crate::transparent::redirected_to(&tcp);
        let shared = shared.clone();
        let guard = drain.guard();
        let life = drain.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _guard = guard;
                if let Some(to) = original {
                    // Dialed a mesh service's address (a cluster IP, a pod's IP)?
                    let mesh = shared
                        .config
                        .borrow()
                        .service_at(to)
                        .map(|(s, port)| (s.clone(), port));
                    // On a port declared TCP (not HTTP, HTTP/2 or gRPC) it is
                    // relayed as TCP, unsniffed, as Istio does by port protocol.
                    if let Some((service, port)) = &mesh
                        && !carries_http(service, *port)
                    {
                        redirected_tcp(&shared, tcp, service.clone(), *port, &life).await;
                        return;
                    }
                    let Some(what) = life.until_killed(redirected(&shared, &tcp, to)).await else {
                        return;
                    };
                    if let Redirected::Raw(upstream) = what {
                        match mesh {
                            // Not HTTP after all, on an HTTP port: TCP through
                            // the mesh (the connection opened to `to` to see
                            // who speaks first is not used).
                            Some((service, port)) => {
                                drop(upstream);
                                redirected_tcp(&shared, tcp, service, port, &life).await;
                            }
                            None => passthrough_tcp(&shared, tcp, to, upstream, &life).await,
                        }
                        return;
                    }
                }
                let phase = life.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    let life = life.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(proxy(shared, req, life, original).await)
                    }
                });
                // HTTP/1.1 (proxy requests, CONNECT, redirected requests) or
                // HTTP/2 with prior knowledge (gRPC and other h2c clients),
                // told apart by the HTTP/2 preface.
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                phase.drive(conn, |c| c.graceful_shutdown()).await;
            },
            tracing::debug_span!("outbound", %peer, original = ?original),
        ));
    }
}

/// Whether `service` declares `port` as HTTP, HTTP/2 or gRPC (what the
/// outbound routes per request), rather than TCP or TLS.
fn carries_http(service: &pb::Service, port: u16) -> bool {
    service.ports.iter().any(|p| {
        p.port == u32::from(port)
            && matches!(p.protocol.as_str(), "http" | "http2" | "grpc" | "grpc-web")
    })
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

/// [`reply`] as a relayed response.
fn reply_body(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    reply(status, reason).map(ProxyBody::Own)
}

/// A random hex id (`x-request-id`).
fn request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for mut n in [fastrand::u64(..), fastrand::u64(..)] {
        let mut digits = [0u8; 16];
        for d in digits.iter_mut().rev() {
            *d = HEX[(n & 0xf) as usize];
            n >>= 4;
        }
        id.extend(digits.iter().map(|&d| char::from(d)));
    }
    id
}

/// Why a proxied request names no destination (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// An absolute-form URI with an empty host.
    #[error("{0} names no host")]
    UriNoHost(http::Uri),
    /// `CONNECT host` without a port.
    #[error("CONNECT {0} names no port")]
    ConnectNoPort(http::uri::Authority),
    /// `CONNECT` with something other than `host:port`.
    #[error("CONNECT {0}: expected host:port")]
    ConnectNotAuthority(http::Uri),
    /// Neither an absolute-form URI nor a `Host` header.
    #[error("the request names no host: send absolute-form requests (curl -x) or a Host header")]
    NoHost,
    /// A `Host` header that is not ASCII.
    #[error("the Host header is not ASCII")]
    HostNotAscii,
    /// A `Host` header that does not parse as `host[:port]`.
    #[error("Host header {0:?} is not host[:port]")]
    HostNotAuthority(String),
    /// A `Host` header with an empty host.
    #[error("Host header {0:?} names no host")]
    HostEmpty(String),
}

/// The host and port a proxied request names: the absolute-form URI, else
/// the `Host` header; the port defaults to `dialed` (the original
/// destination's, in transparent mode), else 80. `CONNECT` needs a port.
pub fn destination_of(
    uri: &http::Uri,
    headers: &http::HeaderMap,
    connect: bool,
    dialed: Option<u16>,
) -> Result<(String, u16), DestinationError> {
    let default_port = dialed.unwrap_or(80);
    if let Some(a) = uri.authority() {
        let host = a.host();
        if host.is_empty() {
            return Err(DestinationError::UriNoHost(uri.clone()));
        }
        return match a.port_u16() {
            Some(p) => Ok((host.to_string(), p)),
            None if connect => Err(DestinationError::ConnectNoPort(a.clone())),
            None => Ok((host.to_string(), default_port)),
        };
    }
    if connect {
        return Err(DestinationError::ConnectNotAuthority(uri.clone()));
    }
    let host = headers
        .get(http::header::HOST)
        .ok_or(DestinationError::NoHost)?;
    let host = host.to_str().map_err(|_| DestinationError::HostNotAscii)?;
    let a: http::uri::Authority = host
        .parse()
        .map_err(|_| DestinationError::HostNotAuthority(host.to_owned()))?;
    if a.host().is_empty() {
        return Err(DestinationError::HostEmpty(host.to_owned()));
    }
    Ok((a.host().to_string(), a.port_u16().unwrap_or(default_port)))
}

/// What the request loop settled on, for metrics and the log.
struct Settled {
    upstream: String,
    destination_cluster: String,
    destination_workload: String,
    destination_principal: String,
    reason: Option<String>,
    /// Why no upstream could answer, for `strait_sidecar_upstream_failures`
    /// (`None`: an upstream answered, or the sidecar refused the request
    /// for another cause: policy, fault injection, a bad request).
    reason_code: Option<&'static str>,
    /// Sent outside the mesh as it was (no mTLS).
    passthrough: bool,
    /// The HTTP/1.1 connection slot (`maxConnections`) the answer holds
    /// until its body has gone through.
    connection: Option<Connection>,
    /// The request slot (`http2MaxRequests`), held as long: Envoy counts a
    /// request active until its stream ends, not until its response head.
    request: Option<InFlight>,
}

impl Default for Settled {
    fn default() -> Self {
        Settled {
            upstream: "-".into(),
            destination_cluster: "unknown".into(),
            destination_workload: "unknown".into(),
            destination_principal: "unknown".into(),
            reason: None,
            reason_code: None,
            passthrough: false,
            connection: None,
            request: None,
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
    original: Option<SocketAddr>,
) -> Response<Observed<ProxyBody>> {
    let dialed = original.map(|a| a.port());
    let own = |r: Response<Full<Bytes>>| r.map(|b| Observed::plain(ProxyBody::Own(b)));
    if req.method() == http::Method::CONNECT {
        return own(tunnel(shared, req, life).await);
    }
    let start = Instant::now();
    let started = metrics::now_rfc3339();
    let (mut parts, body) = req.into_parts();
    let (host, port) = match destination_of(&parts.uri, &parts.headers, false, dialed) {
        Ok(d) => d,
        Err(e) => return own(reply(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    // Routing (VirtualService `uri`) and the destination see the path
    // normalized as the destination's policy will (Istio's
    // pathNormalization applies to outbound listeners too).
    let raw_path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mode = shared.config.borrow().path_normalization;
    let path = match strait_model::request_path::normalize(raw_path, mode) {
        Ok(p) => p.into_owned(),
        Err(e) => return own(reply(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    let method = parts.method.as_str().to_string();
    if !parts.headers.contains_key(names::REQUEST_ID)
        && let Ok(v) = request_id().parse()
    {
        parts.headers.insert(names::REQUEST_ID, v);
    }
    let rid = parts
        .headers
        .get(names::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Set by this sidecar only (see `forward`), never by the app.
    parts.headers.remove(names::ORIG_PROTO);
    // A protocol switch (WebSocket): the client's side of it, taken now so
    // that no copy of the request carries it.
    let upgrade = crate::upgrade_of(parts.version, &parts.headers);
    let client_side = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let req_bytes = Arc::new(AtomicU64::new(0));
    let body = match Outgoing::new(body, req_bytes.clone()).await {
        Ok(b) => b,
        Err(e @ crate::BodyError::TooLarge(_)) => {
            return own(reply(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()));
        }
        Err(e) => return own(reply(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    let mut settled = Settled::default();
    let request = Forward {
        body: &body,
        host: &host,
        port,
        path: &path,
        upgrade,
        original,
    };
    let (mut resp, service) = forward(&shared, &mut parts, request, &mut settled).await;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = client_side
    {
        let upstream_side = hyper::upgrade::on(&mut resp);
        let upstream = settled.upstream.clone();
        crate::splice_upgraded(client_side, upstream_side, life, move |r| match r {
            Ok((sent, received)) => {
                tracing::debug!(%upstream, sent, received, "switched protocol ended")
            }
            Err(e) => tracing::debug!(%upstream, error = %e, "switched protocol ended"),
        });
    }
    let code = resp.status().as_u16();
    let protocol = metrics::http_protocol(&parts.headers);
    // Metrics and the access log once the response has gone through (it
    // may stream): its size, gRPC status and the whole duration are known
    // then. The labels are made then too, off the response's path.
    let (head, body) = resp.into_parts();
    let body = Observed::new(body, &head.headers, move |end| {
        let millis = start.elapsed().as_secs_f64() * 1000.0;
        let labels = source_labels(&shared, &settled, service.as_deref(), &host, protocol, code);
        let req_len = req_bytes.load(Ordering::Relaxed);
        let grpc = end.grpc_status.as_deref();
        if let (Some(code), Some(why)) = (settled.reason_code, settled.reason.as_deref()) {
            shared
                .metrics
                .upstream_failure(&labels.destination_service, code, why);
        }
        let labels = &shared
            .metrics
            .request_ended(labels, grpc, millis, req_len, end.bytes);
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
            grpc_status: grpc,
            reason: settled.reason.as_deref(),
        });
    });
    Response::from_parts(head, body)
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
            .map_or_else(|| "unknown".into(), |i| i.spiffe_id.as_str().to_owned()),
        source_cluster: shared.cluster(),
        destination_workload: s.destination_workload.clone(),
        destination_workload_namespace: service
            .map_or_else(|| "unknown".into(), |s| or_unknown(&s.namespace)),
        destination_principal: s.destination_principal.clone(),
        destination_service: service.map_or_else(|| host.to_string(), |s| s.hostname.clone()),
        destination_cluster: s.destination_cluster.clone(),
        request_protocol: protocol.into(),
        response_code: code.to_string(),
        connection_security_policy: if s.passthrough { "none" } else { "mutual_tls" }.into(),
    }
}

/// What [`forward`] sends besides the request head.
struct Forward<'a> {
    body: &'a Outgoing,
    /// The destination host and port the request named.
    host: &'a str,
    port: u16,
    path: &'a str,
    /// The protocol the request asks to switch to, if any.
    upgrade: Option<http::HeaderValue>,
    /// Where a redirected app was going (transparent mode).
    original: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn request_ids_are_32_lowercase_hex_digits() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| request_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        // Every digit value shows up: no nibble is lost.
        let digits: std::collections::HashSet<u8> = ids.iter().flat_map(|i| i.bytes()).collect();
        assert_eq!(digits.len(), 16);
        // Leading zeros are kept, as `{:016x}` keeps them.
        fastrand::seed(0);
        let id = request_id();
        fastrand::seed(0);
        let want = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        assert_eq!(id, want);
    }

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
            let got = destination_of(&uri(u), headers, *connect, None).map_err(|e| e.to_string());
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
                .to_string()
                .contains("names no port")
        );
    }
}
