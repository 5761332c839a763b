//! `CONNECT host:port` from the app: a TCP tunnel over mTLS (ALPN
//! `istio`) to an endpoint of the service.

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
        passthrough: false,
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
            grpc_status: None,
            reason: reason.as_deref(),
        });
        tracing::debug!(sent, received, "tunnel closed");
    });
    Response::new(Full::new(Bytes::new()))
}

/// A byte stream both ways (TLS or plain TCP upstream).
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}
