//! The kubelet's app probes, answered on the sidecar's health listener.
//!
//! Under transparent interception the injector rewrites an app
//! container's `httpGet`, `tcpSocket` and `grpc` probes to `GET
//! /app-health/<container>/<livez|readyz|startupz>` on the health port
//! (see [`strait_model::probe`]); [`routes`] answers those paths by
//! probing the app where the kubelet would have, at the pod's IP (or on
//! loopback), from [`PROBE_SOURCE`], which the interception rules let
//! through to the app, so the probe works whatever the inbound mTLS mode.
//! The answer is 200 when the app's is (HTTP or HTTPS 200–399, a TCP
//! connect, or a gRPC health check answering `SERVING`, within the probe's
//! timeout), 503 naming what failed otherwise.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{HOST, HeaderName, HeaderValue, USER_AGENT};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use strait_model::probe::{Action, AppProbe, AppProbers};
use strait_runtime::http::{Routes, respond};
use tokio::net::TcpStream;

use crate::transparent::PROBE_SOURCE;

mod grpc;
mod tls;

use grpc::grpc_health;
use tls::insecure_tls;

/// `strait_sidecar_app_probes_total` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProbeLabels {
    /// The path the kubelet asked for (`/app-health/<container>/<kind>`).
    path: String,
    /// `ok` or `failed`.
    outcome: &'static str,
}

/// The health listener's routes for `probers`; each answer is counted in
/// `strait_sidecar_app_probes_total{path,outcome}` (registered in
/// `registry`), and a probe that starts or stops failing is logged with
/// the reason.
pub fn routes(probers: Arc<AppProbers>, host: IpAddr, registry: &mut Registry) -> Routes {
    let counts = Family::<ProbeLabels, Counter>::default();
    registry.register(
        "strait_sidecar_app_probes",
        "The kubelet's app probes the sidecar answered, by path and outcome",
        counts.clone(),
    );
    // Whether each probe passed last time (all start as passing, so a
    // first failure is logged).
    let passing: Arc<HashMap<String, AtomicBool>> = Arc::new(
        probers
            .paths()
            .map(|p| (p.to_string(), AtomicBool::new(true)))
            .collect(),
    );
    Arc::new(move |path: &str| {
        let probe = probers.get(path)?.clone();
        let path = path.to_string();
        let counts = counts.clone();
        let passing = passing.clone();
        Some(Box::pin(async move {
            let result = check(&probe, host).await;
            let ok = result.is_ok();
            counts
                .get_or_create(&ProbeLabels {
                    path: path.clone(),
                    outcome: if ok { "ok" } else { "failed" },
                })
                .inc();
            let was = passing
                .get(&path)
                .map(|p| p.swap(ok, Ordering::Relaxed))
                .unwrap_or(ok);
            match result {
                Ok(()) => {
                    if !was {
                        tracing::info!(%path, "app probe passes again");
                    }
                    respond(StatusCode::OK, "text/plain", "ok\n".into())
                }
                Err(why) => {
                    if was {
                        tracing::warn!(%path, %why, "app probe failed");
                    } else {
                        tracing::debug!(%path, %why, "app probe still failing");
                    }
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("{why}\n"),
                    )
                }
            }
        }))
    })
}

/// Why a probe failed; each names what was probed (`http://10.1.2.3:8080/healthz`,
/// `tcp 10.1.2.3:5432`, `grpc 10.1.2.3:9090 service "shop"`), and the
/// text is the health endpoint's answer to the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe does not say what to probe.
    #[error("{0}")]
    Invalid(&'static str),
    /// The whole probe took longer than its `timeoutSeconds`.
    #[error("{target}: no answer within {limit:?}")]
    Timeout { target: String, limit: Duration },
    /// The app's port could not be connected to.
    #[error("{target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// The probe's request could not be made.
    #[error("{target}: {source}")]
    Request {
        target: String,
        #[source]
        source: http::Error,
    },
    /// A probe header whose name is not one.
    #[error("{target}: header {name}: {source}")]
    HeaderName {
        target: String,
        name: String,
        #[source]
        source: http::header::InvalidHeaderName,
    },
    /// A probe header whose value is not one.
    #[error("{target}: header {name}: {source}")]
    HeaderValue {
        target: String,
        name: String,
        #[source]
        source: http::header::InvalidHeaderValue,
    },
    /// The HTTPS probe's TLS handshake failed.
    #[error("{target}: TLS: {source}")]
    Tls {
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// HTTP/1.1 or HTTP/2 with the app failed.
    #[error("{target}: {source}")]
    Http {
        target: String,
        #[source]
        source: hyper::Error,
    },
    /// An HTTP probe answered outside 200–399.
    #[error("{target} answered {status}")]
    Status { target: String, status: StatusCode },
    /// A gRPC health check answered with an HTTP status other than 200.
    #[error("{target} answered HTTP {status}")]
    GrpcHttpStatus { target: String, status: StatusCode },
    /// A gRPC health check answered with a `grpc-status` other than 0
    /// (`none` when it had none) and its `grpc-message`.
    #[error("{}", grpc_status_text(target, code, message))]
    GrpcStatus {
        target: String,
        code: String,
        message: String,
    },
    /// A gRPC health check's answer is not one uncompressed message.
    #[error("{target}: the answer is not one uncompressed gRPC message")]
    NotOneMessage { target: String },
    /// A gRPC health check's answer does not decode.
    #[error("{target}: the answer is not a HealthCheckResponse: {source}")]
    NotHealthResponse {
        target: String,
        #[source]
        source: prost::DecodeError,
    },
    /// A gRPC health check answered a status other than `SERVING`.
    #[error("{target} answered {}", serving_status_name(*status))]
    NotServing { target: String, status: i32 },
}

fn grpc_status_text(target: &str, code: &str, message: &str) -> String {
    format!("{target} answered grpc-status {code} {message}")
        .trim_end()
        .to_string()
}

/// `HealthCheckResponse.ServingStatus` by name, `status <n>` for one
/// the protocol does not define.
fn serving_status_name(status: i32) -> std::borrow::Cow<'static, str> {
    match status {
        0 => "UNKNOWN".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        other => format!("status {other}").into(),
    }
}

/// Probes the app at `host` (the pod's IP, as the kubelet, or loopback)
/// once; the error says what failed.
pub async fn check(probe: &AppProbe, host: IpAddr) -> Result<(), ProbeError> {
    let limit = Duration::from_secs(probe.timeout_seconds.into());
    tokio::time::timeout(limit, attempt(probe, host))
        .await
        .map_err(|_| ProbeError::Timeout {
            target: target(probe, host),
            limit,
        })?
}

fn target(probe: &AppProbe, host: IpAddr) -> String {
    match probe.action() {
        Ok(Action::Http(get)) => format!(
            "{}://{}{}",
            if get.https() { "https" } else { "http" },
            SocketAddr::new(host, get.port),
            get.path
        ),
        Ok(Action::Tcp(tcp)) => format!("tcp {}", SocketAddr::new(host, tcp.port)),
        Ok(Action::Grpc(g)) => match g.service.as_deref() {
            Some(service) if !service.is_empty() => {
                format!("grpc {} service {service:?}", SocketAddr::new(host, g.port))
            }
            _ => format!("grpc {}", SocketAddr::new(host, g.port)),
        },
        Err(why) => why.to_string(),
    }
}

async fn attempt(probe: &AppProbe, host: IpAddr) -> Result<(), ProbeError> {
    let what = target(probe, host);
    let action = probe.action().map_err(ProbeError::Invalid)?;
    let port = match action {
        Action::Http(get) => get.port,
        Action::Tcp(tcp) => tcp.port,
        Action::Grpc(g) => g.port,
    };
    let addr = SocketAddr::new(host, port);
    let tcp = connect(addr).await.map_err(|source| ProbeError::Connect {
        target: what.clone(),
        source,
    })?;
    let get = match action {
        Action::Tcp(_) => return Ok(()),
        Action::Grpc(g) => {
            let service = g.service.as_deref().unwrap_or_default();
            return grpc_health(tcp, addr, service, &what).await;
        }
        Action::Http(get) => get,
    };
    let mut request = http::Request::get(get.path.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|source| ProbeError::Request {
            target: what.clone(),
            source,
        })?;
    let headers = request.headers_mut();
    headers.insert(USER_AGENT, HeaderValue::from_static("kube-probe/strait"));
    headers.insert(
        HOST,
        HeaderValue::from_str(&addr.to_string()).expect("an address is a header value"),
    );
    for h in &get.http_headers {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|source| ProbeError::HeaderName {
                target: what.clone(),
                name: h.name.clone(),
                source,
            })?;
        let value = HeaderValue::from_bytes(h.value.as_bytes()).map_err(|source| {
            ProbeError::HeaderValue {
                target: what.clone(),
                name: h.name.clone(),
                source,
            }
        })?;
        // As the kubelet: a probe's own Host or User-Agent replaces ours.
        if name == HOST || name == USER_AGENT {
            headers.insert(name, value);
        } else {
            headers.append(name, value);
        }
    }
    let response = if get.https() {
        let tls = tokio_rustls::TlsConnector::from(insecure_tls())
            .connect(ServerName::IpAddress(host.into()), tcp)
            .await
            .map_err(|source| ProbeError::Tls {
                target: what.clone(),
                source,
            })?;
        send(tls, request, &what).await?
    } else {
        send(tcp, request, &what).await?
    };
    let status = response.status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(ProbeError::Status {
            target: what,
            status,
        })
    }
}

/// Connects to the app at `addr`. To the pod's own (IPv4, not loopback)
/// address, from [`PROBE_SOURCE`]: the iptables rules send the sidecar's
/// other connections to its pod's IP on to the inbound listener, which
/// the probe must not meet.
async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    match addr.ip() {
        IpAddr::V4(ip) if !ip.is_loopback() => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((PROBE_SOURCE, 0)))?;
            socket.connect(addr).await
        }
        _ => TcpStream::connect(addr).await,
    }
}

/// Sends `request` on `io` (HTTP/1.1): the response head.
async fn send<IO>(
    io: IO,
    request: http::Request<Empty<Bytes>>,
    what: &str,
) -> Result<http::Response<hyper::body::Incoming>, ProbeError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |source| ProbeError::Http {
        target: what.to_owned(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http)?;
    let answer = sender.send_request(request);
    tokio::pin!(conn, answer);
    // The connection may end (the app closes after answering) in the same
    // poll that hands over the answer: then the answer is still taken.
    tokio::select! {
        biased;
        r = &mut answer => r,
        c = &mut conn => match c {
            Ok(()) => answer.await,
            Err(e) => return Err(http(e)),
        },
    }
    .map_err(http)
}

#[cfg(test)]
mod tests;
