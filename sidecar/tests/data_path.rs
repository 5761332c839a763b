//! End to end on loopback: a client sidecar, server sidecars and echo
//! backends, real mTLS from a test PKI, config pushed through the watch
//! channel; driven with curl, openssl and a hyper client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use strait_ca::testing::TestPki;

/// A client (`sleep`) and one server (`echo-v1`) sidecar with its backend.
struct Pair {
    pki: TestPki,
    client: Sidecar,
    server: Sidecar,
    mesh: Mesh,
}

async fn pair() -> Pair {
    let pki = TestPki::new(TD);
    let (client, server, mesh) = sleep_and_echo(&pki, backend("v1").await).await;
    Pair {
        pki,
        client,
        server,
        mesh,
    }
}

impl Pair {
    fn push(&mut self, mesh: Mesh) {
        self.client.push(&mesh);
        self.server.push(&mesh);
        self.mesh = mesh;
    }
}

#[tokio::test]
async fn a_request_reaches_the_app_over_mtls_with_xfcc_and_trace_headers() {
    let p = pair().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = via_proxy(
        p.client.outbound,
        "http://echo.demo:8080/hello?x=1",
        &[
            "-H",
            &format!("traceparent: {traceparent}"),
            "-H",
            "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7",
            "-H",
            "x-forwarded-client-cert: URI=spiffe://evil/ns/x/sa/y",
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(backend_of(&r.body), Some("v1"), "{}", r.body);
    assert!(r.body.contains("GET /hello?x=1\n"), "{}", r.body);
    let xfcc = header_in(&r.body, "x-forwarded-client-cert").expect("XFCC");
    let by = spiffe("demo", "echo");
    let uri = spiffe("demo", "sleep");
    assert!(xfcc.starts_with(&format!("By={by};Hash=")), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={uri}")), "{xfcc}");
    let hash = xfcc
        .split(";Hash=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    assert_eq!(hash.len(), 64, "{xfcc}");
    assert!(
        !r.body.contains("evil"),
        "the client's XFCC must be replaced: {}",
        r.body
    );
    assert_eq!(header_in(&r.body, "traceparent"), Some(traceparent));
    assert_eq!(
        header_in(&r.body, "x-b3-traceid"),
        Some("80f198ee56343ba864fe8b2a57d3eff7")
    );
    // The app sees the authority the client used.
    assert_eq!(
        header_in(&r.body, "host"),
        Some("echo.demo:8080"),
        "{}",
        r.body
    );
    let rid = header_in(&r.body, "x-request-id").expect("x-request-id generated");
    assert_eq!(rid.len(), 32, "{rid}");

    // Every name of the service resolves; a given x-request-id is kept.
    for url in [
        "http://echo.demo.svc.cluster.local:8080/",
        "http://echo.demo.svc.clusterset.local:8080/",
        "http://echo:8080/",
    ] {
        let r = via_proxy(p.client.outbound, url, &["-H", "x-request-id: abc-123"]).await;
        assert_eq!(r.status, 200, "{url}: {r:?}");
        assert_eq!(header_in(&r.body, "x-request-id"), Some("abc-123"));
    }
}

#[tokio::test]
async fn connect_tunnels_tcp_over_mtls() {
    let p = pair().await;
    // curl -p: CONNECT echo.demo:8080, then HTTP inside the tunnel.
    let r = via_proxy(
        p.client.outbound,
        "http://echo.demo:8080/tunnelled",
        &["-p"],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(backend_of(&r.body), Some("v1"));
    assert!(r.body.contains("GET /tunnelled\n"), "{}", r.body);
    // Bytes only: no XFCC is added to a TCP stream.
    assert_eq!(header_in(&r.body, "x-forwarded-client-cert"), None);

    // CONNECT to an unknown host is a 502 naming it.
    let r = via_proxy(p.client.outbound, "http://nope.demo:8080/", &["-p"]).await;
    assert!(r.stderr.contains("502") || r.status == 502, "{r:?}");

    let m = p.client.metrics();
    assert!(
        m.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains(&format!(
                    "destination_principal=\"{}\"",
                    spiffe("demo", "echo")
                ))),
        "{m}"
    );
}

#[tokio::test]
async fn unknown_host_is_a_502_naming_it() {
    let p = pair().await;
    let r = via_proxy(p.client.outbound, "http://nope.demo:8080/", &[]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains("nope.demo"), "{}", r.body);
    // `echo` is a short name in the caller's namespace only.
    let r = via_proxy(p.client.outbound, "http://echo.other:8080/", &[]).await;
    assert_eq!(r.status, 502, "{r:?}");
}

#[tokio::test]
async fn strict_refuses_clients_without_a_certificate() {
    let mut p = pair().await;
    let mesh = p.mesh.clone().policy(
        "PeerAuthentication",
        "demo",
        "default",
        json!({"mtls": {"mode": "STRICT"}}),
    );
    p.push(mesh);
    let inbound = p.server.inbound.to_string();
    let request = "GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n";

    // TLS without a client certificate: the connection is closed.
    let out = s_client(&inbound, &[], request).await;
    assert!(!out.contains("HTTP/1.1"), "{out}");

    // Plaintext: refused too.
    let url = format!("http://{inbound}/");
    let r = curl(&["--noproxy", "*", &url]).await;
    assert_eq!(r.status, 0, "{r:?}");

    // The same openssl with a mesh certificate gets through (the check
    // above fails for the right reason).
    let dir = tempfile::tempdir().unwrap();
    let (leaf, key) = p.pki.leaf(&spiffe("demo", "sleep"));
    let cert = dir.path().join("cert.pem");
    let chain = dir.path().join("chain.pem");
    let keyf = dir.path().join("key.pem");
    std::fs::write(&cert, strait_ca::pemfile::encode("CERTIFICATE", &leaf)).unwrap();
    std::fs::write(
        &chain,
        strait_ca::pemfile::encode("CERTIFICATE", p.pki.intermediate.certificate_der()),
    )
    .unwrap();
    std::fs::write(&keyf, key).unwrap();
    let out = s_client(
        &inbound,
        &[
            "-cert",
            cert.to_str().unwrap(),
            "-cert_chain",
            chain.to_str().unwrap(),
            "-key",
            keyf.to_str().unwrap(),
        ],
        request,
    )
    .await;
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains(&format!("URI={}", spiffe("demo", "sleep"))),
        "{out}"
    );

    // And the mesh path works under STRICT.
    let r = via_proxy(p.client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// Under PERMISSIVE (the default) plaintext is served, but TLS must
/// present a verifiable client certificate, as Istio's inbound requires:
/// a TLS client without one is refused in the handshake, not served as
/// an anonymous peer.
#[tokio::test]
async fn permissive_refuses_tls_without_a_client_certificate() {
    let p = pair().await;
    let inbound = p.server.inbound.to_string();
    let request = "GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n";

    // TLS without a client certificate: refused (the server asks for a
    // certificate and ends the handshake without one).
    let out = s_client_all(&inbound, &[], request).await;
    assert!(!out.contains("HTTP/1.1"), "{out}");
    assert!(
        out.contains("certificate required") || out.contains("alert"),
        "the handshake ends with an alert: {out}"
    );

    // Plaintext: served.
    let url = format!("http://{inbound}/plain");
    let r = curl(&["--noproxy", "*", &url]).await;
    assert_eq!(r.status, 200, "{r:?}");

    // A mesh certificate: served, with the identity it proves.
    let dir = tempfile::tempdir().unwrap();
    let (leaf, key) = p.pki.leaf(&spiffe("demo", "sleep"));
    let cert = dir.path().join("cert.pem");
    let chain = dir.path().join("chain.pem");
    let keyf = dir.path().join("key.pem");
    std::fs::write(&cert, strait_ca::pemfile::encode("CERTIFICATE", &leaf)).unwrap();
    std::fs::write(
        &chain,
        strait_ca::pemfile::encode("CERTIFICATE", p.pki.intermediate.certificate_der()),
    )
    .unwrap();
    std::fs::write(&keyf, key).unwrap();
    let with_cert = [
        "-cert",
        cert.to_str().unwrap(),
        "-cert_chain",
        chain.to_str().unwrap(),
        "-key",
        keyf.to_str().unwrap(),
    ];
    let out = s_client(&inbound, &with_cert, request).await;
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains(&format!("URI={}", spiffe("demo", "sleep"))),
        "{out}"
    );

    // A certificate of another CA: refused too.
    let other = strait_ca::testing::TestPki::new(TD);
    let (leaf, key) = other.leaf(&spiffe("demo", "sleep"));
    std::fs::write(&cert, strait_ca::pemfile::encode("CERTIFICATE", &leaf)).unwrap();
    std::fs::write(
        &chain,
        strait_ca::pemfile::encode("CERTIFICATE", other.intermediate.certificate_der()),
    )
    .unwrap();
    std::fs::write(&keyf, key).unwrap();
    let out = s_client(&inbound, &with_cert, request).await;
    assert!(!out.contains("HTTP/1.1"), "{out}");

    // And the mesh path still works.
    let r = via_proxy(p.client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// [`s_client`], with what openssl printed on stderr after its stdout.
async fn s_client_all(addr: &str, extra: &[&str], request: &str) -> String {
    s_client_output(addr, extra, request, true).await
}

/// `openssl s_client` to `addr` with Istio's SNI, sending `request`;
/// returns what the server answered.
async fn s_client(addr: &str, extra: &[&str], request: &str) -> String {
    s_client_output(addr, extra, request, false).await
}

async fn s_client_output(addr: &str, extra: &[&str], request: &str, stderr: bool) -> String {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", addr])
        .args([
            "-servername",
            "outbound_.8080_._.echo.demo.svc.cluster.local",
        ])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(request.as_bytes()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("openssl ends when the server closes")
        .unwrap();
    drop(stdin);
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    if stderr {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    text
}

#[tokio::test]
async fn permissive_also_accepts_plaintext() {
    let p = pair().await;
    let url = format!("http://{}/plain", p.server.inbound);
    let r = curl(&[
        "--noproxy",
        "*",
        "-H",
        "x-forwarded-client-cert: URI=spiffe://evil",
        &url,
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(backend_of(&r.body), Some("v1"));
    // No verified peer: no XFCC, and the client's is dropped.
    assert_eq!(
        header_in(&r.body, "x-forwarded-client-cert"),
        None,
        "{}",
        r.body
    );

    let m = p.server.metrics();
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains("connection_security_policy=\"none\"")),
        "{m}"
    );
}

#[tokio::test]
async fn authorization_policy_denies_then_allows() {
    let mut p = pair().await;
    let sleep = "cluster.local/ns/demo/sa/sleep";
    let deny = p.mesh.clone().policy(
        "AuthorizationPolicy",
        "demo",
        "echo",
        json!({"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"principals": [sleep]}}]}]}),
    );
    p.push(deny);
    let r = via_proxy(p.client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body, "RBAC: access denied");

    let allow = p.mesh.clone().policy(
        "AuthorizationPolicy",
        "demo",
        "echo",
        json!({"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [sleep]}}],
                                             "to": [{"operation": {"methods": ["GET"]}}]}]}),
    );
    p.push(allow);
    let r = via_proxy(p.client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Not a GET: no ALLOW rule matches.
    let r = via_proxy(
        p.client.outbound,
        "http://echo.demo:8080/",
        &["-X", "POST", "-d", "x"],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");

    // A TCP connection the policy does not allow is closed.
    let r = via_proxy(p.client.outbound, "http://echo.demo:8080/", &["-p"]).await;
    assert_ne!(r.status, 200, "{r:?}");

    let m = p.server.metrics();
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains("response_code=\"403\"")
            && l.contains(&format!("source_principal=\"{}\"", spiffe("demo", "sleep")))),
        "{m}"
    );
}

#[tokio::test]
async fn a_server_outside_the_service_identities_is_refused() {
    let mut p = pair().await;
    // The service says only `sa/echo-admin` may serve it; the server is `sa/echo`.
    let ep = p.server.endpoint("v1", &spiffe("demo", "echo"));
    let mut mesh = p.mesh.clone();
    mesh.services.clear();
    let mesh = mesh.echo(vec![ep], &[spiffe("demo", "echo-admin")]);
    p.push(mesh);
    let r = via_proxy(p.client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("TLS handshake"), "{}", r.body);
    assert!(r.body.contains(&spiffe("demo", "echo")), "{}", r.body);

    // A server of another trust domain's PKI is refused as well.
    let other = TestPki::new(TD);
    p.server
        .identity
        .send_replace(Some(identity(&other, &spiffe("demo", "echo"))));
    let mut mesh = p.mesh.clone();
    mesh.services.clear();
    let ep = p.server.endpoint("v1", &spiffe("demo", "echo"));
    let mesh = mesh.echo(vec![ep], &[spiffe("demo", "echo")]);
    p.push(mesh);
    let r = via_proxy(p.client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("TLS handshake"), "{}", r.body);
}

#[tokio::test]
async fn virtual_service_weights_split_traffic_80_20() {
    let pki = TestPki::new(TD);
    let client = sleep_client(&pki).await;
    let v1 = Sidecar::start(
        "echo-v1",
        "demo",
        backend("v1").await,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
    )
    .await;
    let v2 = Sidecar::start(
        "echo-v2",
        "demo",
        backend("v2").await,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
    )
    .await;
    let id = spiffe("demo", "echo");
    let mesh = Mesh::new(&pki)
        .echo(
            vec![v1.endpoint("v1", &id), v2.endpoint("v2", &id)],
            std::slice::from_ref(&id),
        )
        .workload("sleep", "demo", &[("app", "sleep")])
        .policy(
            "DestinationRule",
            "demo",
            "echo",
            json!({"host": "echo", "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}}]}),
        )
        .policy(
            "VirtualService",
            "demo",
            "echo",
            json!({"hosts": ["echo"], "http": [{"route": [
                {"destination": {"host": "echo", "subset": "v1"}, "weight": 80},
                {"destination": {"host": "echo", "subset": "v2"}, "weight": 20}]}]}),
        );
    for s in [&client, &v1, &v2] {
        s.push(&mesh);
    }
    let mut c = ProxyClient::connect(client.outbound).await;
    let n = 200;
    let mut v1_count = 0;
    for _ in 0..n {
        let (status, body, _) = c.get("http://echo.demo:8080/").await;
        assert_eq!(status, 200, "{body}");
        match backend_of(&body) {
            Some("v1") => v1_count += 1,
            Some("v2") => {}
            other => panic!("unexpected backend {other:?}"),
        }
    }
    // Binomial(200, 0.8): mean 160, sd 5.7; this range is ±5 sd.
    assert!((130..=190).contains(&v1_count), "v1 got {v1_count} of {n}");

    // Istio's metric names and labels, seen from the client.
    let m = client.metrics();
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{") && l.contains("destination_workload=\"echo-v2\"")
        })
        .unwrap_or_else(|| panic!("{m}"));
    for label in [
        "reporter=\"source\"",
        "source_workload=\"sleep\"",
        "source_workload_namespace=\"demo\"",
        &format!("source_principal=\"{}\"", spiffe("demo", "sleep")),
        "source_cluster=\"c1\"",
        "destination_workload_namespace=\"demo\"",
        &format!("destination_principal=\"{id}\""),
        &format!("destination_service=\"{ECHO}\""),
        "destination_cluster=\"c1\"",
        "response_code=\"200\"",
        "connection_security_policy=\"mutual_tls\"",
    ] {
        assert!(line.contains(label), "{label} missing in {line}");
    }
    for name in [
        "istio_request_duration_milliseconds_bucket{",
        "istio_request_bytes_bucket{",
        "istio_response_bytes_bucket{",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
    // The server reports the same request as the destination.
    let m = v1.metrics();
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains("source_cluster=\"c1\"")
            && l.contains("destination_workload=\"echo-v1\"")
            && l.contains(&format!("destination_service=\"{ECHO}\""))
            && l.contains("source_workload=\"sleep\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{m}"
    );
}

#[tokio::test]
async fn undefined_subsets_and_unhealthy_endpoints_are_503_with_a_reason() {
    let mut p = pair().await;
    let mesh = p.mesh.clone().policy(
        "VirtualService",
        "demo",
        "echo",
        json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo", "subset": "v3"}}]}]}),
    );
    p.push(mesh);
    let mut c = ProxyClient::connect(p.client.outbound).await;
    let (status, body, headers) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("v3"), "{body}");
    assert!(headers.contains_key("x-strait-reason"));

    let mut mesh = Mesh::new(&p.pki);
    let mut ep = p.server.endpoint("v1", &spiffe("demo", "echo"));
    ep.healthy = false;
    mesh = mesh.echo(vec![ep], &[spiffe("demo", "echo")]);
    p.push(mesh);
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no healthy upstream"), "{body}");
}

#[tokio::test]
async fn connection_pool_overflow_is_a_503() {
    let mut p = pair().await;
    let mesh = p.mesh.clone().policy(
        "DestinationRule",
        "demo",
        "echo",
        json!({"host": "echo", "trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 1}}}}),
    );
    p.push(mesh);
    let proxy = p.client.outbound;
    let slow = tokio::spawn(async move {
        let mut c = ProxyClient::connect(proxy).await;
        c.get("http://echo.demo:8080/slow").await
    });
    // Wait until the slow request holds the only slot: the server's app
    // has it in flight once the client reports nothing yet and the
    // backend is sleeping; poll the overflow answer with a deadline.
    let mut c = ProxyClient::connect(proxy).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut overflowed = None;
    while tokio::time::Instant::now() < deadline && !slow.is_finished() {
        let (status, body, headers) = c.get("http://echo.demo:8080/").await;
        if status == 503 {
            overflowed = Some((body, headers));
            break;
        }
    }
    let (body, headers) = overflowed.expect("a request overflows while /slow is in flight");
    assert!(body.contains("overflow"), "{body}");
    assert!(
        headers["x-strait-reason"]
            .to_str()
            .unwrap()
            .contains("overflow"),
        "{headers:?}"
    );
    let (status, _, _) = slow.await.unwrap();
    assert_eq!(status, 200);
    // The slot is free again.
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_stops_accepting() {
    let pki = TestPki::new(TD);
    let client = sleep_client(&pki).await;
    let (app, mut started) = backend_counted("v1").await;
    // On an address no other test binds, so that nothing else can take
    // the port once the server has closed it.
    let inbound = tokio::net::TcpListener::bind("127.0.83.1:0").await.unwrap();
    let mut server = Sidecar::start_on(
        "echo-v1",
        "demo",
        app,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
        inbound,
    )
    .await;
    let id = spiffe("demo", "echo");
    let mesh = Mesh::new(&pki).echo(vec![server.endpoint("v1", &id)], std::slice::from_ref(&id));
    client.push(&mesh);
    server.push(&mesh);
    let proxy = client.outbound;
    let slow = tokio::spawn(async move {
        let mut c = ProxyClient::connect(proxy).await;
        c.get("http://echo.demo:8080/slow").await
    });
    // In flight once the app has it.
    tokio::time::timeout(Duration::from_secs(5), started.wait_for(|n| *n >= 1))
        .await
        .expect("the app gets the request")
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(4), server.shutdown());
    let (status, body, _) = slow.await.unwrap();
    assert_eq!(status, 200, "{body}");
    stopped
        .await
        .expect("the server stops once its last request is done, before the drain deadline");
    // The server no longer accepts connections; the client says why.
    assert!(
        tokio::net::TcpStream::connect(server.inbound)
            .await
            .is_err()
    );
    let mut c = ProxyClient::connect(proxy).await;
    let (status, body, _) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connect"), "{body}");
}

/// A `CONNECT` tunnel to echo through `proxy`, answered 200.
async fn connect_tunnel(proxy: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"CONNECT echo.demo:8080 HTTP/1.1\r\nHost: echo.demo:8080\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "{head:?}");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// `mesh` with a DestinationRule for echo setting
/// `connectionPool.tcp.idleTimeout`.
fn idle_timeout_rule(mesh: &Mesh, timeout: &str) -> Mesh {
    let rule = json!({"host": "echo",
                      "trafficPolicy": {"connectionPool": {"tcp": {"idleTimeout": timeout}}}});
    mesh.clone().policy("DestinationRule", "demo", "echo", rule)
}

#[tokio::test]
async fn a_tcp_tunnel_quiet_past_the_rules_idle_timeout_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut p = pair().await;
    // Opened under the default (an hour, as Istio's).
    let mut before = connect_tunnel(p.client.outbound).await;
    p.push(idle_timeout_rule(&p.mesh, "300ms"));
    let mut quiet = connect_tunnel(p.client.outbound).await;
    let opened = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), quiet.read(&mut buf))
        .await
        .expect("the quiet tunnel is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed, not answered");
    assert!(
        opened.elapsed() >= Duration::from_millis(300),
        "closed after {:?}, before the idle timeout",
        opened.elapsed()
    );
    // The tunnel opened before the rule keeps its hour: still usable.
    before
        .write_all(b"GET /still-here HTTP/1.1\r\nHost: echo.demo:8080\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("GET /still-here") {
        let n = tokio::time::timeout(Duration::from_secs(10), before.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // `0s` turns the timeout off: the tunnel works (no timer overflow).
    p.push(idle_timeout_rule(&p.mesh, "0s"));
    let mut off = connect_tunnel(p.client.outbound).await;
    off.write_all(b"GET /no-timeout HTTP/1.1\r\nHost: echo.demo:8080\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), off.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}
