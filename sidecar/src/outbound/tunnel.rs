//! TCP to a mesh service, over mTLS (ALPN `istio`) to an endpoint of the
//! service: `CONNECT host:port` from the app, and a redirected connection
//! (transparent mode) to a service's address.

use super::*;

/// `CONNECT host:port`: a TCP tunnel over mTLS (ALPN `istio`) to an
/// endpoint of the service; the TCP route and traffic policy apply.
pub(super) async fn tunnel(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    life: Life,
) -> Response<Full<Bytes>> {
    let started = metrics::now_rfc3339();
    let start = Instant::now();
    let (host, port) = match destination_of(req.uri(), req.headers(), true, None) {
        Ok(d) => d,
        Err(e) => return reply(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let cfg = shared.config.borrow().clone();
    let Some(service) = cfg.lookup(&host, &shared.opts.workload.namespace).cloned() else {
        return reply(
            StatusCode::BAD_GATEWAY,
            &format!("no service {host} in the mesh"),
        );
    };
    let mut conn = match open_mesh_tcp(&shared, &cfg, service, &host, port).await {
        Ok(c) => c,
        Err((status, why)) => return reply(status, &why),
    };
    let guard = life.guard();
    tokio::spawn(async move {
        let _guard = guard;
        let relayed = match hyper::upgrade::on(req).await {
            Ok(upgraded) => relay_mesh_tcp(TokioIo::new(upgraded), &mut conn, &life).await,
            Err(e) => Err(crate::RelayError::Handover(e)),
        };
        conn.finish(
            &shared,
            relayed,
            "CONNECT",
            &format!("{host}:{port}"),
            started,
            start,
        );
    });
    Response::new(Full::new(Bytes::new()))
}

/// A redirected connection (transparent mode) that is not HTTP, to one of
/// a mesh service's addresses (see [`crate::config::MeshConfig::service_at`]):
/// relayed over mTLS to an endpoint of the service as a `CONNECT` would
/// be, so the destination's sidecar sees the caller's identity (a STRICT
/// destination accepts it; passed through as plain TCP it would not). If
/// no endpoint can be had, the connection is closed and the access log
/// says why.
pub(super) async fn redirected_tcp(
    shared: &Arc<Shared>,
    client: TcpStream,
    service: Arc<pb::Service>,
    port: u16,
    life: &Life,
) {
    let started = metrics::now_rfc3339();
    let start = Instant::now();
    let cfg = shared.config.borrow().clone();
    let host = service.hostname.clone();
    let authority = format!("{host}:{port}");
    match open_mesh_tcp(shared, &cfg, service, &host, port).await {
        Ok(mut conn) => {
            let relayed = relay_mesh_tcp(client, &mut conn, life).await;
            conn.finish(shared, relayed, "TCP", &authority, started, start);
        }
        Err((_, why)) => {
            tracing::debug!(%authority, error = %why, "redirected TCP connection refused");
            metrics::log(&metrics::AccessLog {
                start_time: started,
                reporter: "source",
                method: "TCP",
                path: "",
                authority: &authority,
                response_code: 0,
                duration_ms: start.elapsed().as_secs_f64() * 1000.0,
                upstream_host: "-",
                peer_identity: None,
                source_cluster: &shared.cluster(),
                destination_cluster: "unknown",
                request_id: "",
                grpc_status: None,
                reason: Some(&why),
            });
        }
    }
}

/// A TCP connection over mTLS (or plain TCP, if the DestinationRule turns
/// TLS off) to an endpoint of a mesh service, counted as opened.
struct MeshTcp {
    upstream: Box<dyn Duplex>,
    /// Ends the relay when the upstream's chain stops verifying.
    watched: Option<Watched>,
    settled: Settled,
    labels: RequestLabels,
    /// Its place under the DestinationRule's `maxConnections`.
    _slot: InFlight,
    /// Closed after this long with nothing moving (the DestinationRule's
    /// `connectionPool.tcp.idleTimeout`).
    idle: std::time::Duration,
}

/// Routes TCP for `host:port` (the service `service` it resolved to): the
/// TCP route, the destination's traffic policy and connection limit, an
/// endpoint picked as for HTTP, and the connection opened. An error is
/// the status a `CONNECT` answers with and why.
async fn open_mesh_tcp(
    shared: &Shared,
    cfg: &crate::config::MeshConfig,
    service: Arc<pb::Service>,
    host: &str,
    port: u16,
) -> Result<MeshTcp, (StatusCode, String)> {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why);
    let my_ns = shared.opts.workload.namespace.as_str();
    let Some(id) = shared.current_identity() else {
        return Err(unavailable(
            "this sidecar has no workload certificate yet".into(),
        ));
    };
    let attrs = RequestAttrs {
        method: None,
        host: Some(host),
        port,
        source_namespace: Some(my_ns),
        source_labels: Some(&cfg.my_labels),
        ..RequestAttrs::default()
    };
    let policy_error = |e: crate::policy::RouteError| {
        (
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            e.to_string(),
        )
    };
    let route = cfg
        .policies
        .route(my_ns, &service.hostname, port, &attrs)
        .map_err(policy_error)?;
    let Some(dest) = route.pick(fastrand::f64()).cloned() else {
        return Err(unavailable(
            "every destination of the route has weight 0".into(),
        ));
    };
    let Some(dest_service) = cfg.lookup(&dest.host, my_ns).cloned() else {
        return Err(unavailable(format!(
            "route destination {} is not a known service",
            dest.host
        )));
    };
    let tp = cfg
        .policies
        .traffic_policy(my_ns, &dest_service.hostname, dest.subset.as_deref())
        .map_err(policy_error)?;
    let limit_key = || {
        format!(
            "tcp|{}|{}",
            dest_service.hostname,
            dest.subset.as_deref().unwrap_or("")
        )
    };
    let Some(slot) = shared.pool.limits.admit(limit_key, tp.max_connections) else {
        return Err(unavailable(format!(
            "upstream connection pool overflow: {} allows {} connections",
            dest_service.hostname,
            tp.max_connections.unwrap_or(0)
        )));
    };
    let picked = pick(shared, &dest_service, &tp, cfg.my_locality(), &[]).map_err(|e| {
        unavailable(format!(
            "no healthy upstream for {}: {e}",
            dest_service.hostname
        ))
    })?;
    let ep = &dest_service.endpoints[picked.index];
    let target = Target::new(
        &dest_service,
        ep,
        dest.port.unwrap_or(port),
        dest.subset.as_deref(),
        &tp,
        DEFAULT_CONNECT_TIMEOUT,
    );
    let upstream: Result<Connected<Box<dyn Duplex>>, SendError> = if target.tls {
        connect_tls(shared, &id, &target, ALPN_TCP)
            .await
            .map(|c| Connected {
                stream: Box::new(c.stream) as Box<dyn Duplex>,
                peer: c.peer,
                watched: c.watched,
            })
    } else {
        connect_tcp(&target).await.map(|t| Connected {
            stream: Box::new(t) as Box<dyn Duplex>,
            peer: "unknown".to_string(),
            watched: None,
        })
    };
    let Connected {
        stream: upstream,
        peer,
        watched,
    } = match upstream {
        Ok(u) => u,
        Err(e) => {
            let why = format!("{e} ({})", target.address);
            picked.report(e.outcome());
            return Err((e.status(), why));
        }
    };
    let settled = Settled {
        upstream: target.address,
        destination_cluster: or_unknown(&ep.cluster),
        destination_workload: or_unknown(&ep.workload),
        destination_principal: peer,
        ..Settled::default()
    };
    // A TCP endpoint's health is whether it could be connected to.
    picked.report(Outcome::Success);
    let labels = source_labels(shared, &settled, Some(&service), host, "tcp", 200);
    shared.metrics.tcp_opened.get_or_create(&labels).inc();
    Ok(MeshTcp {
        upstream,
        watched,
        settled,
        labels,
        _slot: slot,
        idle: crate::tcp_idle_timeout(tp.tcp_idle_timeout),
    })
}

/// Copies between `client` and the mesh connection until both ends close
/// (or the drain deadline): the bytes each way, or why it ended.
async fn relay_mesh_tcp<C>(
    mut client: C,
    conn: &mut MeshTcp,
    life: &Life,
) -> Result<(u64, u64), crate::RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let watched = conn.watched.take();
    let relay = crate::relay_tcp(&mut client, &mut conn.upstream, conn.idle, life);
    Watched::run(watched, relay)
        .await
        .unwrap_or(Err(crate::RelayError::Untrusted("upstream")))
}

impl MeshTcp {
    /// Counts the connection closed and writes its access log line.
    fn finish(
        &self,
        shared: &Shared,
        relayed: Result<(u64, u64), crate::RelayError>,
        method: &str,
        authority: &str,
        started: String,
        start: Instant,
    ) {
        shared.metrics.tcp_closed.get_or_create(&self.labels).inc();
        let (sent, received) = relayed.as_ref().map_or((0, 0), |(a, b)| (*a, *b));
        let reason = relayed.err().map(|e| e.to_string());
        metrics::log(&metrics::AccessLog {
            start_time: started,
            reporter: "source",
            method,
            path: "",
            authority,
            response_code: 200,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            upstream_host: &self.settled.upstream,
            peer_identity: Some(&self.settled.destination_principal),
            source_cluster: &self.labels.source_cluster,
            destination_cluster: &self.settled.destination_cluster,
            request_id: "",
            grpc_status: None,
            reason: reason.as_deref(),
        });
        tracing::debug!(
            sent,
            received,
            method,
            authority,
            "mesh TCP connection closed"
        );
    }
}

/// A byte stream both ways (TLS or plain TCP upstream).
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}
