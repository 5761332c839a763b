use strait_model::probe::{Grpc, Header, HttpGet, TcpSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;
use hyper_util::rt::TokioExecutor;
use prost::Message;

use super::grpc::{HealthCheckRequest, HealthCheckResponse};
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
        format!("grpc 127.0.0.1:{port} service \"cart\" answered grpc-status 5 unknown service")
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
