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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue, TE, USER_AGENT};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use strait_model::probe::{Action, AppProbe, AppProbers};
use strait_runtime::http::{Routes, respond};
use tokio::net::TcpStream;

use crate::transparent::PROBE_SOURCE;

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

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: i32 = 1;

/// A gRPC health check over h2c, as the kubelet's gRPC probe: success
/// when the app answers `SERVING`.
async fn grpc_health(
    tcp: TcpStream,
    addr: SocketAddr,
    service: &str,
    what: &str,
) -> Result<(), ProbeError> {
    let http = |source| ProbeError::Http {
        target: what.to_owned(),
        source,
    };
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(http)?;
    let message = HealthCheckRequest {
        service: service.to_string(),
    }
    .encode_to_vec();
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0); // not compressed
    body.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    body.extend_from_slice(&message);
    let request = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(CONTENT_TYPE, "application/grpc")
        .header(TE, "trailers")
        .header(USER_AGENT, "kube-probe/strait")
        .body(Full::new(Bytes::from(body)))
        .map_err(|source| ProbeError::Request {
            target: what.to_owned(),
            source,
        })?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let (head, body) = response.into_parts();
        let body = body.collect().await?;
        Ok::<_, hyper::Error>((head, body))
    };
    tokio::pin!(conn, exchange);
    let (head, body) = tokio::select! {
        biased;
        r = &mut exchange => r,
        c = &mut conn => match c {
            Ok(()) => exchange.await,
            Err(e) => return Err(http(e)),
        },
    }
    .map_err(http)?;
    if head.status != StatusCode::OK {
        return Err(ProbeError::GrpcHttpStatus {
            target: what.to_owned(),
            status: head.status,
        });
    }
    // grpc-status is a trailer, or a header of a trailers-only answer.
    let trailers = body.trailers().cloned().unwrap_or_default();
    let grpc_status = trailers
        .get("grpc-status")
        .or_else(|| head.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none");
    if grpc_status != "0" {
        let message = trailers
            .get("grpc-message")
            .or_else(|| head.headers.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        return Err(ProbeError::GrpcStatus {
            target: what.to_owned(),
            code: grpc_status.to_owned(),
            message: message.to_owned(),
        });
    }
    let bytes = body.to_bytes();
    let message = match bytes.as_ref() {
        [0, len @ ..] if len.len() >= 4 => {
            let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            len.get(4..4 + n)
        }
        _ => None,
    }
    .ok_or_else(|| ProbeError::NotOneMessage {
        target: what.to_owned(),
    })?;
    let status = HealthCheckResponse::decode(message)
        .map_err(|source| ProbeError::NotHealthResponse {
            target: what.to_owned(),
            source,
        })?
        .status;
    match status {
        SERVING => Ok(()),
        status => Err(ProbeError::NotServing {
            target: what.to_owned(),
            status,
        }),
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

/// TLS for HTTPS probes: as the kubelet's, the app's certificate is not
/// verified (it is the app's own, often self-signed), only the handshake's
/// signature with it; no SNI (the address is an IP).
fn insecure_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut config =
                rustls::ClientConfig::builder_with_provider(strait_ca::tls::provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default versions")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate))
                    .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .clone()
}

/// Accepts any server certificate (see [`insecure_tls`]); the handshake
/// signature is checked as every strait verifier checks it.
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        strait_ca::tls::verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        strait_ca::tls::verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        strait_ca::tls::verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use strait_model::probe::{Grpc, Header, HttpGet, TcpSocket};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// [`check`] on loopback, the error as the kubelet reads it.
    async fn check_lo(probe: &AppProbe) -> Result<(), String> {
        check(probe, LO).await.map_err(|e| e.to_string())
    }

    fn http(port: u16, path: &str, headers: Vec<Header>) -> AppProbe {
        AppProbe {
            http_get: Some(HttpGet {
                path: path.into(),
                port,
                scheme: None,
                http_headers: headers,
            }),
            tcp_socket: None,
            grpc: None,
            timeout_seconds: 1,
        }
    }

    /// An app that answers every request with `status` and hands back the
    /// request heads it read.
    async fn app(status: &'static str) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.ends_with(b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                    let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn an_http_probe_passes_on_2xx_and_3xx_with_the_probes_headers() {
        for status in ["200 OK", "302 Found"] {
            let (port, mut heads) = app(status).await;
            let probe = http(
                port,
                "/healthz?deep=1",
                vec![
                    Header {
                        name: "Host".into(),
                        value: "app.example".into(),
                    },
                    Header {
                        name: "X-Probe".into(),
                        value: "kubelet".into(),
                    },
                ],
            );
            check(&probe, LO).await.unwrap();
            let head = heads.recv().await.unwrap().to_ascii_lowercase();
            assert!(
                head.starts_with("get /healthz?deep=1 http/1.1\r\n"),
                "{head}"
            );
            assert!(
                head.contains("host: app.example\r\n"),
                "the probe's Host wins: {head}"
            );
            assert!(!head.contains("host: 127.0.0.1"), "one Host only: {head}");
            assert!(head.contains("x-probe: kubelet\r\n"), "{head}");
            assert!(head.contains("user-agent: kube-probe/strait\r\n"), "{head}");
        }
    }

    #[tokio::test]
    async fn an_https_probe_takes_the_apps_own_certificate() {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        // A certificate no trust here knows of, as an app's self-signed one.
        let pki = strait_ca::testing::TestPki::new("app.example");
        let (leaf, key) = pki.leaf("spiffe://app.example/ns/app/sa/web");
        let config = rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.into()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (tcp, _) = l.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut buf = [0u8; 1024];
                let n = tls.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"GET /ready HTTP/1.1\r\n"));
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                tls.write_all(reply.as_bytes()).await.unwrap();
                tls.shutdown().await.unwrap();
            }
        });
        let mut probe = http(port, "/ready", vec![]);
        probe.http_get.as_mut().unwrap().scheme = Some("HTTPS".into());
        check(&probe, LO).await.unwrap();
        let err = check(&probe, LO).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!("https://127.0.0.1:{port}/ready answered 503 Service Unavailable")
        );
        server.await.unwrap();

        // Plain text where TLS is expected: a TLS error, named.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
            let _ = s.read(&mut [0u8; 1024]).await;
        });
        let mut probe = http(plain, "/", vec![]);
        probe.http_get.as_mut().unwrap().scheme = Some("HTTPS".into());
        let err = check(&probe, LO).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("https://127.0.0.1:{plain}/: TLS: ")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_http_probe_fails_on_an_error_status_naming_it() {
        let (port, _heads) = app("500 Internal Server Error").await;
        let err = check_lo(&http(port, "/healthz", vec![])).await.unwrap_err();
        assert_eq!(
            err,
            format!("http://127.0.0.1:{port}/healthz answered 500 Internal Server Error")
        );
    }

    #[tokio::test]
    async fn probes_fail_on_a_closed_port_or_a_silent_app() {
        // A port nothing listens on: bind, note it, close.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let tcp = AppProbe {
            http_get: None,
            tcp_socket: Some(TcpSocket { port: closed }),
            grpc: None,
            timeout_seconds: 1,
        };
        let err = check(&tcp, LO).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("tcp 127.0.0.1:{closed}: ")),
            "{err}"
        );
        assert!(check_lo(&http(closed, "/", vec![])).await.is_err());

        // Accepts and never answers: the probe's timeout ends it.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let started = tokio::time::Instant::now();
        let err = check_lo(&http(port, "/", vec![])).await.unwrap_err();
        assert!(err.ends_with("no answer within 1s"), "{err}");
        assert!(started.elapsed() >= Duration::from_secs(1));
        drop(silent);
    }

    /// A gRPC health server (h2c): `shop` is SERVING, `down` NOT_SERVING,
    /// anything else NOT_FOUND (trailers only), as grpc-health servers do.
    async fn grpc_app() -> u16 {
        use futures::stream;
        use hyper::body::Frame;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                        assert_eq!(req.headers()[CONTENT_TYPE], "application/grpc");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let asked = HealthCheckRequest::decode(&body[5..]).unwrap().service;
                        let mut trailers = http::HeaderMap::new();
                        let status = match asked.as_str() {
                            "shop" => 1,
                            "down" => 2,
                            _ => {
                                let r = http::Response::builder()
                                    .header(CONTENT_TYPE, "application/grpc")
                                    .header("grpc-status", "5")
                                    .header("grpc-message", "unknown service")
                                    .body(http_body_util::Either::Right(Empty::<Bytes>::new()))
                                    .unwrap();
                                return Ok::<_, std::convert::Infallible>(r);
                            }
                        };
                        let message = HealthCheckResponse { status }.encode_to_vec();
                        let mut data = vec![0u8];
                        data.extend_from_slice(&(message.len() as u32).to_be_bytes());
                        data.extend_from_slice(&message);
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(data))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let body = http_body_util::StreamBody::new(stream::iter(frames));
                        let r = http::Response::builder()
                            .header(CONTENT_TYPE, "application/grpc")
                            .body(http_body_util::Either::Left(body))
                            .unwrap();
                        Ok(r)
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        port
    }

    #[tokio::test]
    async fn a_grpc_probe_passes_only_when_the_service_is_serving() {
        let port = grpc_app().await;
        let probe = |service: &str| AppProbe {
            http_get: None,
            tcp_socket: None,
            grpc: Some(Grpc {
                port,
                service: Some(service.into()),
            }),
            timeout_seconds: 1,
        };
        check_lo(&probe("shop")).await.unwrap();
        assert_eq!(
            check_lo(&probe("down")).await.unwrap_err(),
            format!("grpc 127.0.0.1:{port} service \"down\" answered NOT_SERVING")
        );
        assert_eq!(
            check_lo(&probe("cart")).await.unwrap_err(),
            format!(
                "grpc 127.0.0.1:{port} service \"cart\" answered grpc-status 5 unknown service"
            )
        );
        // Not a gRPC server: an HTTP/1.1 app.
        let (plain, _heads) = app("200 OK").await;
        let mut p = probe("shop");
        p.grpc.as_mut().unwrap().port = plain;
        let err = check(&p, LO).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("grpc 127.0.0.1:{plain} service \"shop\"")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn probes_go_to_the_address_given() {
        // An app on 127.0.0.2 alone, as one listening on the pod's IP only.
        let l = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let tcp = AppProbe {
            http_get: None,
            tcp_socket: Some(TcpSocket { port }),
            grpc: None,
            timeout_seconds: 1,
        };
        let pod_ip: IpAddr = "127.0.0.2".parse().unwrap();
        check(&tcp, pod_ip).await.unwrap();
        let err = check(&tcp, LO).await.unwrap_err().to_string();
        assert!(err.starts_with(&format!("tcp 127.0.0.1:{port}: ")), "{err}");
    }

    #[test]
    fn grpc_answers_read_as_the_kubelet_would_say_them() {
        let target = || "grpc 10.0.0.1:9090".to_string();
        for (status, want) in [
            (0, "grpc 10.0.0.1:9090 answered UNKNOWN"),
            (2, "grpc 10.0.0.1:9090 answered NOT_SERVING"),
            (3, "grpc 10.0.0.1:9090 answered SERVICE_UNKNOWN"),
            (7, "grpc 10.0.0.1:9090 answered status 7"),
        ] {
            let e = ProbeError::NotServing {
                target: target(),
                status,
            };
            assert_eq!(e.to_string(), want);
        }
        // No grpc-message: no trailing space.
        let e = ProbeError::GrpcStatus {
            target: target(),
            code: "none".into(),
            message: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "grpc 10.0.0.1:9090 answered grpc-status none"
        );
    }

    #[tokio::test]
    async fn a_tcp_probe_passes_when_the_port_accepts() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = AppProbe {
            http_get: None,
            tcp_socket: Some(TcpSocket {
                port: l.local_addr().unwrap().port(),
            }),
            grpc: None,
            timeout_seconds: 1,
        };
        check(&tcp, LO).await.unwrap();
    }

    #[tokio::test]
    async fn routes_answer_known_paths_only() {
        let (up, _h1) = app("204 No Content").await;
        let (down, _h2) = app("503 Service Unavailable").await;
        let mut probers = AppProbers::default();
        probers
            .insert("/app-health/app/livez".into(), http(up, "/live", vec![]))
            .unwrap();
        probers
            .insert(
                "/app-health/app/readyz".into(),
                http(down, "/ready", vec![]),
            )
            .unwrap();
        let mut registry = Registry::default();
        let routes = routes(Arc::new(probers), LO, &mut registry);
        assert!(routes("/app-health/other/livez").is_none());
        assert!(routes("/healthz/ready").is_none());
        let live = routes("/app-health/app/livez").unwrap().await;
        assert_eq!(live.status(), StatusCode::OK);
        for _ in 0..2 {
            let ready = routes("/app-health/app/readyz").unwrap().await;
            assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"strait_sidecar_app_probes_total{path="/app-health/app/livez",outcome="ok"} 1"#,
            r#"strait_sidecar_app_probes_total{path="/app-health/app/readyz",outcome="failed"} 2"#,
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }
}
