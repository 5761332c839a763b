//! Routing and sending one HTTP request: the route, the destination, the
//! attempts (retries, per-try timeouts, connection limits) and how each
//! ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Request, Response, StatusCode};
use strait_proto::strait::mesh::v1 as pb;

use super::*;
use crate::identity::Identity;
use crate::policy::{Outcome, RequestAttrs};
use crate::{ProxyBody, Shared, names};

/// Routes and sends one HTTP request (with retries). Returns the answer
/// and the service it resolved to.
pub(super) async fn forward(
    shared: &Shared,
    parts: &mut http::request::Parts,
    request: Forward<'_>,
    settled: &mut Settled,
) -> (Response<ProxyBody>, Option<Arc<pb::Service>>) {
    let Forward {
        body,
        host,
        port,
        path,
        upgrade,
        original,
    } = request;
    let cfg = shared.config.borrow().clone();
    let my_ns = shared.opts.workload.namespace.as_str();
    let Some((service, port)) = resolve(&cfg, my_ns, host, port, original) else {
        return (
            no_service(shared, parts, body, host, path, original, settled).await,
            None,
        );
    };
    let Some(id) = shared.current_identity() else {
        let r = fail(
            settled,
            StatusCode::SERVICE_UNAVAILABLE,
            "this sidecar has no workload certificate yet".into(),
        );
        return (r, Some(service));
    };
    add_peer_metadata(shared, &mut parts.headers);
    let route = match route_of(&cfg, my_ns, &service, port, parts, host, path).await {
        Ok(r) => r,
        Err((status, why)) => return (fail(settled, status, why), Some(service)),
    };
    let authority = take_authority(parts, host, port);
    // The weighted destination (service, subset, port) is chosen once per
    // request, as Envoy chooses the cluster; retries only pick another
    // endpoint of it (see `attempts`).
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
    let (dest_service, dest_port, tp) = match destination(&cfg, my_ns, &service, &dest, port) {
        Ok(d) => d,
        Err((status, why)) => return (fail(settled, status, why), Some(service)),
    };
    let app_h2 = parts.version == http::Version::HTTP_2;
    let routed = Routed {
        wire: wire_for(app_h2, tp.h2_upgrade, upgrade.is_some()),
        // Rerouted to another service or port: name that one.
        authority: if dest_service.hostname == service.hostname && dest.port.is_none() {
            authority
        } else {
            format!("{}:{dest_port}", dest_service.hostname)
        },
        locality: cfg.my_locality(),
        id,
        dest,
        dest_service,
        dest_port,
        tp,
        app_h2,
    };
    let sending = Sending {
        parts,
        body,
        path,
        upgrade: upgrade.as_ref(),
    };
    let resp = routed.send(shared, &route, sending, settled).await;
    (resp, Some(service))
}

/// A refusal the sidecar answers itself, `why` in the access log.
fn fail(settled: &mut Settled, status: StatusCode, why: String) -> Response<ProxyBody> {
    settled.reason = Some(why.clone());
    reply_body(status, &why)
}

/// [`fail`] for a request no upstream could take, for the reason `code`
/// (`strait_sidecar_upstream_failures_total{reason}`).
fn fail_code(
    settled: &mut Settled,
    status: StatusCode,
    code: &'static str,
    why: String,
) -> Response<ProxyBody> {
    settled.reason_code = Some(code);
    fail(settled, status, why)
}

/// Where a routed request goes: the destination its route picked (once
/// per request), and how its attempts speak to it.
struct Routed<'c> {
    id: Arc<Identity>,
    dest: crate::policy::Destination,
    dest_service: Arc<pb::Service>,
    dest_port: u16,
    tp: Arc<crate::policy::TrafficPolicy>,
    /// This workload's locality (for locality-aware picking).
    locality: &'c str,
    wire: Wire,
    /// The authority the upstream gets: the app's, or the service and
    /// port the route rerouted to.
    authority: String,
    /// The app spoke HTTP/2.
    app_h2: bool,
}

/// The request as every attempt sends it.
struct Sending<'a> {
    parts: &'a http::request::Parts,
    body: &'a Outgoing,
    path: &'a str,
    /// The protocol the request asks to switch to.
    upgrade: Option<&'a http::HeaderValue>,
}

impl Routed<'_> {
    /// Sends the request to endpoints of the destination until an attempt
    /// settles it, as `route`'s retries and timeout allow (see
    /// [`Attempts`]): each attempt takes a request slot (and, over
    /// HTTP/1.1, a connection slot) of the destination's pool, and a fresh
    /// endpoint while one is left.
    async fn send(
        &self,
        shared: &Shared,
        route: &crate::policy::RouteDecision,
        request: Sending<'_>,
        settled: &mut Settled,
    ) -> Response<ProxyBody> {
        let Sending {
            parts,
            body,
            path,
            upgrade,
        } = request;
        let (dest_service, tp) = (&self.dest_service, &self.tp);
        let subset = self.dest.subset.as_deref();
        let limit_key = || format!("{}|{}", dest_service.hostname, subset.unwrap_or(""));
        let mut tried: Vec<String> = Vec::new();
        let mut attempts = Attempts::new(&route.retries, route.timeout, Instant::now());
        let deadline = attempts.deadline();
        loop {
            // A retry gives back the slots of the attempt before.
            settled.request = None;
            settled.connection = None;
            let Some(slot) = shared.pool.limits.admit(limit_key, concurrency_limit(tp)) else {
                let why = overflow(dest_service, tp);
                return fail_code(settled, StatusCode::SERVICE_UNAVAILABLE, "overflow", why);
            };
            let picked = match pick(shared, dest_service, tp, self.locality, &tried) {
                Ok(p) => p,
                Err(e) => {
                    let (code, why) = no_upstream(dest_service, subset, tp, &e);
                    return fail_code(settled, StatusCode::SERVICE_UNAVAILABLE, code, why);
                }
            };
            settled.request = Some(slot);
            let ep = &dest_service.endpoints[picked.index];
            tried.push(picked.key.clone());
            let target = Target::new(
                dest_service,
                ep,
                self.dest_port,
                subset,
                tp,
                DEFAULT_CONNECT_TIMEOUT,
            );
            if matches!(self.wire, Wire::Http1) {
                match http1_connection(shared, limit_key, &dest_service.hostname, tp, deadline)
                    .await
                {
                    Ok(c) => settled.connection = Some(c),
                    Err((status, code, why)) => return fail_code(settled, status, code, why),
                }
            }
            let (target_uri, host) = match request_target(self.wire, &self.authority, path) {
                Ok(t) => t,
                Err(why) => return fail(settled, StatusCode::BAD_REQUEST, why.to_string()),
            };
            let (attempt, per_try) = attempts.start(Instant::now());
            let one = Attempt {
                shared,
                id: &self.id,
                target: &target,
                wire: self.wire,
                max_requests: tp.max_requests_per_connection,
                parts,
                body,
                target_uri: &target_uri,
                host: host.as_ref(),
                app_h2: self.app_h2,
                upgrade,
                authority: &self.authority,
                path,
            };
            let result = one.send(per_try).await;
            let (tried_as, resp) = settle_attempt(settled, result, picked, attempt, ep, &target);
            settled.upstream = target.address;
            if attempts.after(tried_as, Instant::now(), body.replayable()) != Next::Retry {
                return resp;
            }
        }
    }
}

/// Peer metadata for the destination's telemetry (Istio exchanges the
/// same through its metadata-exchange filter).
fn add_peer_metadata(shared: &Shared, headers: &mut http::HeaderMap) {
    for (name, value) in [
        (names::SOURCE_CLUSTER, shared.cluster()),
        (names::SOURCE_WORKLOAD, shared.opts.workload.name.clone()),
    ] {
        if let Ok(v) = http::HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    }
}

/// The authority as the app wrote it (Envoy keeps the Host header),
/// carried as HTTP/2's `:authority`; the hop-by-hop headers go.
fn take_authority(parts: &mut http::request::Parts, host: &str, port: u16) -> String {
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| format!("{host}:{port}"));
    for h in [
        http::header::HOST,
        names::PROXY_CONNECTION,
        http::header::CONNECTION,
        names::KEEP_ALIVE,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
    ] {
        parts.headers.remove(h);
    }
    authority
}

/// The service, port and traffic policy of the destination a route
/// picked.
type Destination = (Arc<pb::Service>, u16, Arc<crate::policy::TrafficPolicy>);

/// The [`Destination`] a route picked; the error is the status and why.
fn destination(
    cfg: &crate::config::MeshConfig,
    my_ns: &str,
    service: &Arc<pb::Service>,
    dest: &crate::policy::Destination,
    port: u16,
) -> Result<Destination, (StatusCode, String)> {
    let dest_service = if dest.host == service.hostname {
        service.clone()
    } else {
        match cfg.lookup(&dest.host, my_ns) {
            Some(s) => s.clone(),
            None => {
                let why = format!("route destination {} is not a known service", dest.host);
                return Err((StatusCode::SERVICE_UNAVAILABLE, why));
            }
        }
    };
    let tp = cfg
        .policies
        .traffic_policy(my_ns, &dest_service.hostname, dest.subset.as_deref())
        .map_err(|e| {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            (status, e.to_string())
        })?;
    Ok((dest_service, dest.port.unwrap_or(port), tp))
}

/// Why a request target cannot be made of the authority and path (the
/// request is answered 400).
#[derive(Debug, thiserror::Error)]
enum TargetError {
    #[error("bad request path {path:?}: {source}")]
    Path {
        path: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("bad authority {authority:?}: {source}")]
    Authority {
        authority: String,
        #[source]
        source: http::header::InvalidHeaderValue,
    },
}

/// The request target as `wire` wants it: absolute (`:scheme`,
/// `:authority`) for HTTP/2, origin form with a Host header for HTTP/1.1.
fn request_target(
    wire: Wire,
    authority: &str,
    path: &str,
) -> Result<(http::Uri, Option<http::HeaderValue>), TargetError> {
    let bad_path = |source| TargetError::Path {
        path: path.to_owned(),
        source,
    };
    match wire {
        Wire::Http2 => {
            let mut uri = String::with_capacity(7 + authority.len() + path.len());
            uri.push_str("http://");
            uri.push_str(authority);
            uri.push_str(path);
            Ok((http::Uri::try_from(uri).map_err(bad_path)?, None))
        }
        Wire::Http1 => {
            let uri = http::Uri::try_from(path).map_err(bad_path)?;
            let host = http::HeaderValue::try_from(authority).map_err(|source| {
                TargetError::Authority {
                    authority: authority.to_owned(),
                    source,
                }
            })?;
            Ok((uri, Some(host)))
        }
    }
}

/// Records how one attempt ended (in the access log's fields and the
/// balancer's outlier detection): what it was for the retry policy, and
/// the response to give if it is the last.
fn settle_attempt(
    settled: &mut Settled,
    result: Result<(Response<ProxyBody>, String), SendError>,
    picked: Picked<'_>,
    attempt: u32,
    ep: &pb::Endpoint,
    target: &Target<'_>,
) -> (Tried, Response<ProxyBody>) {
    settled.destination_cluster = or_unknown(&ep.cluster);
    settled.destination_workload = or_unknown(&ep.workload);
    match result {
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
            settled.reason_code = None;
            (Tried::Answered(code), resp)
        }
        Err(e) => {
            let (code, why) = attempt_failure(&e, ep, target);
            tracing::debug!(attempt, endpoint = %picked.key, error = %why, "upstream attempt failed");
            picked.report(e.outcome());
            settled.reason = Some(why.clone());
            settled.reason_code = Some(code);
            (e.tried(), reply_body(e.status(), &why))
        }
    }
}

/// One attempt at sending the request to one endpoint.
struct Attempt<'a, 't> {
    shared: &'a Shared,
    id: &'a Arc<Identity>,
    target: &'a Target<'t>,
    wire: Wire,
    max_requests: Option<u32>,
    parts: &'a http::request::Parts,
    body: &'a Outgoing,
    /// The request target and, for HTTP/1.1, its Host header.
    target_uri: &'a http::Uri,
    host: Option<&'a http::HeaderValue>,
    /// The app spoke HTTP/2.
    app_h2: bool,
    /// The protocol the request asks to switch to.
    upgrade: Option<&'a http::HeaderValue>,
    authority: &'a str,
    path: &'a str,
}

impl Attempt<'_, '_> {
    /// The request for this attempt (`None` once a body that cannot be
    /// replayed was sent).
    fn request(&self) -> Option<Request<SendBody>> {
        let mut out = Request::from_parts(self.parts.clone(), self.body.take()?);
        *out.uri_mut() = self.target_uri.clone();
        match self.host {
            None => {
                *out.version_mut() = http::Version::HTTP_2;
                if !self.app_h2 {
                    out.headers_mut().insert(
                        names::ORIG_PROTO,
                        http::HeaderValue::from_static("HTTP/1.1"),
                    );
                }
            }
            Some(host) => {
                *out.version_mut() = http::Version::HTTP_11;
                out.headers_mut().insert(http::header::HOST, host.clone());
            }
        }
        Some(out)
    }

    /// Sends it, within `per_try` if given. Under a timeout the response is
    /// read whole within it (the timeout covers the whole response, as
    /// Envoy's does); otherwise it streams.
    async fn send(
        &self,
        per_try: Option<Duration>,
    ) -> Result<(Response<ProxyBody>, String), SendError> {
        let buffer = per_try.is_some() && self.upgrade.is_none();
        let sent = async {
            let (resp, peer) = match self.upgrade {
                Some(proto) => {
                    // A protocol switch: the upgrade asked for, on top.
                    let mut req = self.request().ok_or_else(|| {
                        SendError::Reset(format!(
                            "cannot switch protocols for {}{}",
                            self.authority, self.path
                        ))
                    })?;
                    let h = req.headers_mut();
                    h.insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("upgrade"),
                    );
                    h.insert(http::header::UPGRADE, proto.clone());
                    send_upgrade(self.shared, self.id, self.target, req).await?
                }
                None => {
                    let make = || self.request();
                    send(
                        self.shared,
                        self.id,
                        self.target,
                        self.wire,
                        self.max_requests,
                        &make,
                    )
                    .await?
                }
            };
            if !buffer {
                return Ok((resp.map(ProxyBody::Stream), peer));
            }
            let (p, b) = resp.into_parts();
            let whole = crate::read_whole(b, crate::MAX_BUFFERED_BODY)
                .await
                .map_err(|e| SendError::Reset(format!("response: {e}")))?;
            Ok((Response::from_parts(p, ProxyBody::Buffered(whole)), peer))
        };
        match per_try {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .unwrap_or(Err(SendError::Timeout)),
            None => sent.await,
        }
    }
}

/// The route for the request (VirtualService matches), its fault
/// injection applied: a delay waited out here, an abort as the error (the
/// status and why, as are the route's own errors).
async fn route_of(
    cfg: &crate::config::MeshConfig,
    my_ns: &str,
    service: &pb::Service,
    port: u16,
    parts: &http::request::Parts,
    host: &str,
    path: &str,
) -> Result<crate::policy::RouteDecision, (StatusCode, String)> {
    let method = parts.method.as_str();
    let attrs = RequestAttrs {
        method: Some(method),
        path: Some(path),
        host: Some(host),
        port,
        headers: Some(&parts.headers),
        peer_identity: None,
        source_ip: None,
        source_namespace: Some(my_ns),
        source_labels: Some(&cfg.my_labels),
    };
    let status_of =
        |code: u16| StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let route = cfg
        .policies
        .route(my_ns, &service.hostname, port, &attrs)
        .map_err(|e| (status_of(e.status()), e.to_string()))?;
    if let Some(fault) = &route.fault {
        let action = fault.apply(fastrand::f64(), fastrand::f64());
        if let Some(d) = action.delay {
            tokio::time::sleep(d).await;
        }
        if let Some(code) = action.abort {
            return Err((status_of(code), "fault filter abort".into()));
        }
    }
    Ok(route)
}

/// The service a request is for: the host it names; else, for a
/// redirected app, the service whose address it dialed (a cluster IP, a
/// pod's IP) on that service's port, as Istio routes a request by its
/// destination address.
fn resolve(
    cfg: &crate::config::MeshConfig,
    my_ns: &str,
    host: &str,
    port: u16,
    original: Option<SocketAddr>,
) -> Option<(Arc<pb::Service>, u16)> {
    cfg.lookup(host, my_ns)
        .map(|s| (s.clone(), port))
        .or_else(|| {
            original
                .and_then(|to| cfg.service_at(to))
                .map(|(s, p)| (s.clone(), p))
        })
}

/// A request for no service of the mesh: sent on unchanged to where a
/// redirected app was going (`ALLOW_ANY`), or refused.
async fn no_service(
    shared: &Shared,
    parts: &mut http::request::Parts,
    body: &Outgoing,
    host: &str,
    path: &str,
    original: Option<SocketAddr>,
    settled: &mut Settled,
) -> Response<ProxyBody> {
    if let Some(to) = original
        && shared.opts.outbound_policy == crate::OutboundPolicy::AllowAny
    {
        return passthrough_http(shared, parts, body, to, path, settled).await;
    }
    let why = format!(
        "no service {host} in the mesh (names: <svc>, <svc>.<ns>, <svc>.<ns>.svc.cluster.local, <svc>.<ns>.svc.clusterset.local)"
    );
    settled.reason = Some(why.clone());
    reply_body(StatusCode::BAD_GATEWAY, &why)
}

/// HTTP/2 from the app goes as HTTP/2; HTTP/1.1 stays HTTP/1.1 unless the
/// DestinationRule says UPGRADE (Istio's h2UpgradePolicy), and then the
/// destination's sidecar is told to speak HTTP/1.1 to its app. A protocol
/// switch always goes as HTTP/1.1.
fn wire_for(app_h2: bool, h2_upgrade: bool, switching: bool) -> Wire {
    if (app_h2 || h2_upgrade) && !switching {
        Wire::Http2
    } else {
        Wire::Http1
    }
}

/// HTTP/1.1 under `maxConnections`: one connection per request in flight,
/// so a request that finds them all busy waits for one, queued with at
/// most `http1MaxPendingRequests` others (and no longer than the route's
/// timeout), as Envoy's pending queue. The error is the status, the
/// reason code (the queue was full, or the route's timeout passed in it)
/// and why.
async fn http1_connection(
    shared: &Shared,
    key: impl FnOnce() -> String,
    host: &str,
    tp: &crate::policy::TrafficPolicy,
    deadline: Option<Instant>,
) -> Result<Connection, (StatusCode, &'static str, String)> {
    shared
        .pool
        .limits
        .http1_connection(key, host, tp, deadline)
        .await
        .map_err(|(status, why)| {
            let code = if status == StatusCode::GATEWAY_TIMEOUT {
                "timeout"
            } else {
                "overflow"
            };
            (status, code, why)
        })
}

/// Why a request found the destination's pool full.
fn overflow(service: &pb::Service, tp: &crate::policy::TrafficPolicy) -> String {
    format!(
        "upstream connection pool overflow: {} allows {} requests in flight",
        service.hostname,
        concurrency_limit(tp).unwrap_or(0)
    )
}
