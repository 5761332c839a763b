//! Traffic for destinations outside the mesh, from a redirected app
//! (transparent mode): what a redirected connection carries, and passing
//! it (or an HTTP request for an unknown host) on unchanged to where the
//! app was going, as Istio's `PassthroughCluster` does under
//! `outboundTrafficPolicy: ALLOW_ANY`; refused under registry-only.

use super::*;

/// Istio's name for traffic that leaves the mesh as it was.
const PASSTHROUGH: &str = "PassthroughCluster";

/// Why a connection or request passed through to a destination outside
/// the mesh ended early or never went; its text is the access log's
/// `reason` (and, for a request, the 502's).
#[derive(Debug, thiserror::Error)]
pub(super) enum PassthroughError {
    /// The outbound traffic policy lets nothing leave the mesh.
    #[error("{to} is outside the mesh and the outbound traffic policy is registry-only")]
    RegistryOnly { to: SocketAddr },
    /// The original destination refused the connection.
    #[error("passthrough to {to}: {source}")]
    Connect {
        to: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The original destination did not answer in time.
    #[error("passthrough to {to}: connect timed out")]
    ConnectTimeout { to: SocketAddr },
    /// The relay ended early.
    #[error(transparent)]
    Relay(#[from] crate::RelayError),
    /// An h2c request could not be sent (HTTP/2 set-up or the exchange).
    #[error("passthrough to {to}: {why}")]
    Http2 {
        to: SocketAddr,
        #[source]
        why: H2Failure,
    },
    /// An HTTP/1.x request could not be sent.
    #[error("passthrough to {to}: {source}")]
    Http1 {
        to: SocketAddr,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
}

/// What failed on the way of a passed-through h2c request.
#[derive(Debug, thiserror::Error)]
pub(super) enum H2Failure {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("{0}")]
    Connect(#[source] std::io::Error),
    #[error("{0}")]
    Handshake(#[source] SendError),
    #[error("{0}")]
    Send(#[source] hyper::Error),
}

/// What a redirected connection turned out to carry.
pub(super) enum Redirected {
    /// HTTP: routed.
    Http,
    /// Anything else: to pass through, over this connection to the
    /// original destination when one was opened already.
    Raw(Option<TcpStream>),
}

/// Tells what a redirected connection carries from its first bytes. A
/// client silent for [`crate::transparent::SNIFF_WAIT`] may wait for the
/// server to speak first (MySQL, SMTP) or may have connected ahead of its
/// first request: the way to the original destination is opened, and
/// whichever side speaks first decides. Under registry-only nothing may
/// pass through, so only the client can.
pub(super) async fn redirected(shared: &Shared, tcp: &TcpStream, to: SocketAddr) -> Redirected {
    use crate::transparent::{SNIFF_WAIT, Sniffed, sniff};
    match sniff(tcp, SNIFF_WAIT).await {
        Sniffed::Http => return Redirected::Http,
        Sniffed::Other => return Redirected::Raw(None),
        Sniffed::NeedMore => {}
    }
    let upstream = if shared.opts.outbound_policy == crate::OutboundPolicy::RegistryOnly {
        None
    } else {
        tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, TcpStream::connect(to))
            .await
            .ok()
            .and_then(Result::ok)
    };
    let client_spoke = match &upstream {
        Some(up) => tokio::select! {
            _ = tcp.readable() => true,
            _ = up.readable() => false,
        },
        // Nowhere to pass it, or the destination is unreachable (the
        // passthrough reports why): the client decides.
        None => tcp.readable().await.is_ok(),
    };
    if client_spoke && sniff(tcp, SNIFF_WAIT).await == Sniffed::Http {
        return Redirected::Http;
    }
    if let Some(up) = &upstream {
        let _ = up.set_nodelay(true);
    }
    Redirected::Raw(upstream)
}

/// A redirected connection that is not HTTP goes on unchanged, without
/// mTLS, to where the app was going (Istio's `PassthroughCluster`), unless
/// the outbound traffic policy is registry-only.
pub(super) async fn passthrough_tcp(
    shared: &Shared,
    mut client: TcpStream,
    to: SocketAddr,
    connected: Option<TcpStream>,
    life: &Life,
) {
    let started = metrics::now_rfc3339();
    let start = Instant::now();
    let settled = Settled {
        upstream: to.to_string(),
        passthrough: true,
        ..Settled::default()
    };
    let labels = source_labels(shared, &settled, None, PASSTHROUGH, "tcp", 0);
    let result = if shared.opts.outbound_policy == crate::OutboundPolicy::RegistryOnly {
        Err(PassthroughError::RegistryOnly { to })
    } else {
        let upstream = match connected {
            Some(up) => Ok(Ok(up)),
            None => tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, TcpStream::connect(to)).await,
        };
        match upstream {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                shared.metrics.tcp_opened.get_or_create(&labels).inc();
                let copied =
                    crate::relay_tcp(&mut client, &mut upstream, crate::TCP_IDLE_TIMEOUT, life)
                        .await;
                shared.metrics.tcp_closed.get_or_create(&labels).inc();
                copied.map_err(PassthroughError::from)
            }
            Ok(Err(source)) => Err(PassthroughError::Connect { to, source }),
            Err(_) => Err(PassthroughError::ConnectTimeout { to }),
        }
    };
    let reason = result.as_ref().err().map(ToString::to_string);
    if let Some(why) = &reason {
        tracing::debug!(%to, error = %why, "passthrough connection ended");
    }
    metrics::log(&metrics::AccessLog {
        start_time: started,
        reporter: "source",
        method: "TCP",
        path: "",
        authority: &settled.upstream,
        response_code: 0,
        duration_ms: start.elapsed().as_secs_f64() * 1000.0,
        upstream_host: &settled.upstream,
        peer_identity: None,
        source_cluster: &labels.source_cluster,
        destination_cluster: "unknown",
        request_id: "",
        grpc_status: None,
        reason: reason.as_deref(),
    });
}

/// An HTTP request from a redirected app for a host outside the mesh goes
/// to where the app was going, as it was (no mTLS, `Host` kept).
pub(super) async fn passthrough_http(
    shared: &Shared,
    parts: &http::request::Parts,
    body: &Outgoing,
    to: SocketAddr,
    path: &str,
    settled: &mut Settled,
) -> Response<ProxyBody> {
    settled.upstream = to.to_string();
    settled.passthrough = true;
    let fail = |settled: &mut Settled, why: String| {
        settled.reason = Some(why.clone());
        reply_body(StatusCode::BAD_GATEWAY, &why)
    };
    let Some(body) = body.take() else {
        return fail(settled, "the request body was already sent".into());
    };
    let mut req = Request::from_parts(parts.clone(), body);
    req.headers_mut().remove(crate::ORIG_PROTO_HEADER);
    let authority = req.uri().authority().map(|a| a.to_string());
    if req.version() == http::Version::HTTP_2 {
        // h2c to an outside host: rare; a connection of its own keeps the
        // request's `:authority`.
        let sent = async {
            let tcp = tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, TcpStream::connect(to))
                .await
                .map_err(|_| H2Failure::ConnectTimeout)?
                .map_err(H2Failure::Connect)?;
            let _ = tcp.set_nodelay(true);
            let mut sender = h2_handshake(tcp, &settled.upstream, None)
                .await
                .map_err(H2Failure::Handshake)?;
            sender.send_request(req).await.map_err(H2Failure::Send)
        };
        return match sent.await {
            Ok(r) => r.map(ProxyBody::Stream),
            Err(why) => fail(settled, PassthroughError::Http2 { to, why }.to_string()),
        };
    }
    // HTTP/1.x: origin form to the original destination, `Host` as the
    // app wrote it.
    if !req.headers().contains_key(http::header::HOST)
        && let Some(v) = authority.and_then(|a| a.parse().ok())
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
    match format!("http://{to}{path}").parse() {
        Ok(u) => *req.uri_mut() = u,
        Err(e) => return fail(settled, format!("bad request path {path:?}: {e}")),
    }
    match shared.pool.passthrough_http1().request(req).await {
        Ok(r) => r.map(ProxyBody::Stream),
        Err(source) => fail(settled, PassthroughError::Http1 { to, source }.to_string()),
    }
}
