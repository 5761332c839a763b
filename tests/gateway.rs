//! The east-west gateway end to end: a real `strait gateway` process in
//! front of a real TLS backend (`openssl s_server`), driven by `openssl
//! s_client` and `curl`. The client must see the backend's certificate: the
//! gateway routes by SNI and never terminates TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::envoy::envoy_bin;

use common::Scratch;

const SNI: &str = "outbound_.9080_._.reviews.bookinfo.svc.cluster.local";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} not listening in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A PKI, a workload certificate for reviews, and `openssl s_server -www`
/// serving it on a loopback port.
fn backend(s: &Scratch) -> (Proc, u16) {
    s.pki("example.org", &["east"]);
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "east",
        "--spiffe-id",
        "spiffe://example.org/ns/bookinfo/sa/reviews",
        "--out",
        "reviews",
    ])
    .ok();
    let chain = s.read("reviews/cert-chain.pem");
    let split =
        chain.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
    s.write("reviews/leaf.pem", &chain[..split]);
    s.write("reviews/inter.pem", &chain[split..]);
    let port = common::free_port();
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            "reviews/leaf.pem",
            "-cert_chain",
            "reviews/inter.pem",
            "-key",
            "reviews/key.pem",
            "-www",
            "-quiet",
        ])
        .current_dir(s.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let p = Proc(child);
    wait_port(&format!("127.0.0.1:{port}"));
    (p, port)
}

/// A gateway with `extra` flags, routing reviews:9080 to the backend.
fn gateway(s: &Scratch, backend_port: u16, name: &str, extra: &[&str]) -> (Proc, String, String) {
    s.write(
        &format!("{name}.yaml"),
        &format!(
            "services:\n- host: reviews.bookinfo.svc.cluster.local\n  ports: [9080]\n  subsets: {{v1: {{version: v1}}}}\n  endpoints:\n  - {{address: 127.0.0.1, ports: {{9080: {backend_port}}}, labels: {{version: v1}}}}\n"
        ),
    );
    let listen = format!("127.0.0.1:{}", common::free_port());
    let routes = format!("{name}.yaml");
    let mut args = vec![
        "gateway",
        "--cluster",
        "east",
        "--network",
        "net-east",
        "--listen",
        &listen,
        "--routes",
        &routes,
    ];
    args.extend_from_slice(extra);
    let (p, metrics) = start_gateway(s, &args);
    (p, listen, metrics)
}

/// Starts `strait ARGS` (a gateway) with health and metrics endpoints and
/// waits until it is ready; returns the process and the metrics address.
fn start_gateway(s: &Scratch, args: &[&str]) -> (Proc, String) {
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let health = format!("127.0.0.1:{}", common::free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .args(["--metrics-listen", &metrics, "--health-listen", &health])
        .current_dir(s.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::http_status(&health, "/healthz/ready") != Some(200) {
        assert!(Instant::now() < deadline, "gateway {args:?} not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, metrics)
}

fn s_client(s: &Scratch, addr: &str, sni: &str, alpn: &str) -> common::Run {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            addr,
            "-servername",
            sni,
            "-alpn",
            alpn,
            "-CAfile",
            "root/root-cert.pem",
            "-verify_return_error",
            "-ign_eof",
        ])
        .current_dir(s.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    common::Run::from(format!("openssl s_client {sni}"), out)
}

#[test]
fn openssl_reaches_the_backend_through_the_gateway_without_termination() {
    let s = Scratch::new();
    let (_backend, port) = backend(&s);
    let (_gw, addr, metrics) = gateway(&s, port, "gw", &[]);
    let r = s_client(&s, &addr, SNI, "istio");
    assert!(
        r.stdout.contains("Verify return code: 0 (ok)"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    // The certificate the client verified is the backend's workload SVID.
    assert!(
        r.stdout
            .contains("i:O = example.org, OU = strait clusters, CN = east"),
        "{}",
        r.stdout
    );
    // And the backend answered over that session.
    assert!(r.stdout.contains("HTTP/1.0 200 ok"), "{}", r.stdout);
    // A subset works; an unexported service, port or subset does not.
    let r = s_client(
        &s,
        &addr,
        "outbound_.9080_.v1_.reviews.bookinfo.svc.cluster.local",
        "istio",
    );
    assert!(r.stdout.contains("HTTP/1.0 200 ok"), "{}", r.stdout);
    for bad in [
        "outbound_.9080_._.ratings.bookinfo.svc.cluster.local",
        "outbound_.9999_._.reviews.bookinfo.svc.cluster.local",
        "outbound_.9080_.v9_.reviews.bookinfo.svc.cluster.local",
        "reviews.bookinfo.svc.cluster.local",
    ] {
        let r = s_client(&s, &addr, bad, "istio");
        assert!(
            r.stdout.contains("no peer certificate available"),
            "{bad} was let through: {}",
            r.stdout
        );
        assert!(!r.stdout.contains("HTTP/1.0 200"), "{bad} was let through");
    }
    // Without Istio's ALPN the gateway refuses (the check is on by default).
    let r = s_client(&s, &addr, SNI, "h2");
    assert!(
        r.stdout.contains("no peer certificate available"),
        "non-Istio ALPN let through: {}",
        r.stdout
    );
    let m = common::http_get(&metrics, "/metrics");
    for needle in [
        "strait_gateway_connections_total{outcome=\"spliced\",reason=\"ok\"} 2",
        "reason=\"not_exported\"} 1",
        "reason=\"port_not_exported\"} 1",
        "reason=\"unknown_subset\"} 1",
        "reason=\"bad_sni\"} 1",
        "reason=\"alpn\"} 1",
    ] {
        assert!(m.contains(needle), "{needle} not in\n{m}");
    }
}

#[test]
fn curl_through_the_gateway_with_alpn_check_off() {
    let s = Scratch::new();
    let (_backend, port) = backend(&s);
    let (_gw, addr, _) = gateway(&s, port, "gw", &["--alpn-check", "off"]);
    let gw_port = addr.rsplit(':').next().unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-v",
            "-k",
            "--resolve",
            &format!("{SNI}:{gw_port}:127.0.0.1"),
            &format!("https://{SNI}:{gw_port}/"),
        ])
        .output()
        .expect("curl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("issuer: O=example.org; OU=strait clusters; CN=east"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("s_server"),
        "the backend's page"
    );
}

#[test]
fn garbage_and_slow_clients_do_not_disturb_good_ones() {
    let s = Scratch::new();
    let (_backend, port) = backend(&s);
    let (_gw, addr, metrics) = gateway(&s, port, "gw", &["--hello-timeout", "2s"]);
    // Garbage: closed at once.
    let mut g = TcpStream::connect(&addr).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        g.read(&mut buf).unwrap_or(0),
        0,
        "garbage gets no answer, just a close"
    );
    // Slow: half a ClientHello, then silence.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(&[22, 3, 1, 0, 200, 1, 0]).unwrap();
    // A good client meanwhile.
    let r = s_client(&s, &addr, SNI, "istio");
    assert!(r.stdout.contains("HTTP/1.0 200 ok"), "{}", r.stdout);
    // The slow one is cut at the hello deadline.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    assert_eq!(slow.read(&mut buf).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(9));
    let m = common::http_get(&metrics, "/metrics");
    assert!(m.contains("reason=\"malformed_hello\"} 1"), "{m}");
    assert!(m.contains("reason=\"hello_timeout\"} 1"), "{m}");
}

/// A stock Envoy 1.40 as an Istio-style client sidecar: plain TCP in,
/// mTLS out with Istio's SNI and ALPN, verifying the destination's SPIFFE
/// ID, to strait's gateway, which passes it through to the backend.
#[test]
fn envoy_as_an_istio_sidecar_reaches_the_backend_through_the_gateway() {
    let s = Scratch::new();
    let (_backend, port) = backend(&s);
    let (_gw, gw_addr, metrics) = gateway(&s, port, "gw", &[]);
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "east",
        "--spiffe-id",
        "spiffe://example.org/ns/bookinfo/sa/productpage",
        "--out",
        "productpage",
    ])
    .ok();
    let listen = common::free_port();
    let admin = common::free_port();
    let (gw_host, gw_port) = gw_addr.rsplit_once(':').unwrap();
    let dir = s.dir.path().display().to_string();
    s.write(
        "envoy.yaml",
        &format!(
            r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: outbound
          cluster: reviews
  clusters:
  - name: reviews
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: reviews
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {gw_host}, port_value: {gw_port}}}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {SNI}
        common_tls_context:
          alpn_protocols: [istio-peer-exchange, istio]
          tls_certificates:
          - certificate_chain: {{filename: {dir}/productpage/cert-chain.pem}}
            private_key: {{filename: {dir}/productpage/key.pem}}
          validation_context:
            trusted_ca: {{filename: {dir}/root/root-cert.pem}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{exact: spiffe://example.org/ns/bookinfo/sa/reviews}}
"#
        ),
    );
    let child = Command::new(envoy_bin())
        .args([
            "-c",
            "envoy.yaml",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ])
        .current_dir(s.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("envoy");
    let _envoy = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::http_status(&format!("127.0.0.1:{admin}"), "/ready") != Some(200) {
        assert!(Instant::now() < deadline, "envoy not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{listen}/"),
        ])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    // s_server -www answers plain GETs over the TLS session Envoy opened.
    assert!(
        body.contains("s_server"),
        "through envoy and the gateway: {body:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = common::http_get(&metrics, "/metrics");
    assert!(m.contains("outcome=\"spliced\",reason=\"ok\"} 1"), "{m}");
    // Envoy verified the backend's SPIFFE ID, not the gateway's (it has none).
    let stats = common::http_get(
        &format!("127.0.0.1:{admin}"),
        "/stats?filter=cluster.reviews.ssl.handshake",
    );
    assert!(
        stats.contains("cluster.reviews.ssl.handshake: 1"),
        "{stats}"
    );
}

/// A gateway identity from the east cluster's CA.
fn gateway_identity(s: &Scratch, ca: &str, out: &str) {
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        ca,
        "--spiffe-id",
        "spiffe://example.org/ns/strait-system/sa/eastwest-gateway",
        "--out",
        out,
    ])
    .ok();
}

/// West's egress listener → QUIC tunnel → east's gateway → backend: the
/// client's TLS session runs end to end inside the tunnel stream.
#[test]
fn quic_tunnel_between_two_gateways_carries_an_end_to_end_tls_session() {
    let s = Scratch::new();
    let (_backend, port) = backend(&s);
    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "root",
        "--cluster",
        "west",
        "--out",
        "west",
    ])
    .ok();
    gateway_identity(&s, "east", "east-gw");
    gateway_identity(&s, "west", "west-gw");
    // East: the backend's service, tunnels accepted on its listen address (UDP).
    let (_east, east_addr, east_metrics) = gateway(&s, port, "east", &["--identity", "east-gw"]);
    // West: no local services; reviews is remote, behind east's gateway.
    let egress = format!("127.0.0.1:{}", common::free_port());
    let west_listen = format!("127.0.0.1:{}", common::free_port());
    s.write(
        "west.yaml",
        // By DNS name: resolved with hickory (here from the hosts file).
        &format!(
            "services: []\nremote:\n- host: reviews.bookinfo.svc.cluster.local\n  gateways: [\"localhost:{}\"]\n",
            east_addr.rsplit(':').next().unwrap()
        ),
    );
    let (_west, west_metrics) = start_gateway(
        &s,
        &[
            "gateway",
            "--cluster",
            "west",
            "--network",
            "net-west",
            "--listen",
            &west_listen,
            "--routes",
            "west.yaml",
            "--identity",
            "west-gw",
            "--egress-listen",
            &egress,
        ],
    );
    for _ in 0..3 {
        let r = s_client(&s, &egress, SNI, "istio");
        assert!(
            r.stdout.contains("Verify return code: 0 (ok)"),
            "{}\n{}",
            r.stdout,
            r.stderr
        );
        assert!(r.stdout.contains("HTTP/1.0 200 ok"), "{}", r.stdout);
    }
    // One pooled tunnel carried all three connections.
    let m = common::http_get(&east_metrics, "/metrics");
    assert!(
        m.contains("strait_gateway_tunnel_connections_total{outcome=\"accepted\",reason=\"ok\"} 1"),
        "{m}"
    );
    assert!(m.contains("strait_gateway_active_tunnels 1"), "{m}");
    assert!(
        m.contains("strait_gateway_connections_total{outcome=\"spliced\",reason=\"ok\"} 3"),
        "{m}"
    );
    let m = common::http_get(&west_metrics, "/metrics");
    assert!(
        m.contains("strait_gateway_tunnel_streams_total{outcome=\"sent\",reason=\"ok\"} 3"),
        "{m}"
    );
}

/// A gateway whose identity comes from another root cannot open a tunnel;
/// once its identity files are replaced, it can (reload without restart).
#[test]
fn a_gateway_of_another_root_is_refused() {
    let s = Scratch::new();
    let (_backend, port) = backend(&s);
    gateway_identity(&s, "east", "east-gw");
    let (_east, east_addr, east_metrics) = gateway(&s, port, "east", &["--identity", "east-gw"]);
    // A rogue mesh with the same trust domain name but its own root.
    s.strait(&[
        "ca",
        "init-root",
        "--trust-domain",
        "example.org",
        "--out",
        "rogue-root",
    ])
    .ok();
    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "rogue-root",
        "--cluster",
        "rogue",
        "--out",
        "rogue",
    ])
    .ok();
    gateway_identity(&s, "rogue", "rogue-gw");
    let egress = format!("127.0.0.1:{}", common::free_port());
    s.write(
        "rogue.yaml",
        &format!(
            "remote:\n- host: reviews.bookinfo.svc.cluster.local\n  gateways: [\"{east_addr}\"]\n"
        ),
    );
    let (_rogue, _) = start_gateway(
        &s,
        &[
            "gateway",
            "--cluster",
            "rogue",
            "--network",
            "net-rogue",
            "--listen",
            &format!("127.0.0.1:{}", common::free_port()),
            "--routes",
            "rogue.yaml",
            "--identity",
            "rogue-gw",
            "--egress-listen",
            &egress,
        ],
    );
    let r = s_client(&s, &egress, SNI, "istio");
    assert!(
        !r.stdout.contains("HTTP/1.0 200"),
        "a rogue gateway got through: {}",
        r.stdout
    );
    let m = common::http_get(&east_metrics, "/metrics");
    assert!(
        !m.contains("tunnel_connections_total{outcome=\"accepted\""),
        "{m}"
    );
    assert!(
        !m.contains("strait_gateway_connections_total{outcome=\"spliced\""),
        "{m}"
    );

    // The same gateway gets a proper identity (a rotation, say): it is
    // picked up without a restart, and new tunnels work.
    gateway_identity(&s, "east", "good-gw");
    for f in ["root-cert.pem", "key.pem", "cert-chain.pem"] {
        let tmp = s.path(&format!("rogue-gw/.{f}.new"));
        std::fs::copy(s.path(&format!("good-gw/{f}")), &tmp).unwrap();
        std::fs::rename(&tmp, s.path(&format!("rogue-gw/{f}"))).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = s_client(&s, &egress, SNI, "istio");
        if r.stdout.contains("HTTP/1.0 200 ok") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed identity was not picked up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Gateways of two meshes (different trust domains, different roots)
/// tunnel to each other once each holds the other's bundle as a federated
/// bundle; each identity is verified against its own domain's bundle.
#[test]
fn tunnels_between_peered_meshes_use_federated_bundles() {
    let s = Scratch::new();
    let (_backend, port) = backend(&s);
    gateway_identity(&s, "east", "east-gw");
    s.strait(&[
        "ca",
        "init-root",
        "--trust-domain",
        "other.example",
        "--out",
        "oroot",
    ])
    .ok();
    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "oroot",
        "--cluster",
        "west",
        "--out",
        "owest",
    ])
    .ok();
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "owest",
        "--spiffe-id",
        "spiffe://other.example/ns/strait-system/sa/eastwest-gateway",
        "--out",
        "west-gw",
    ])
    .ok();
    s.write("east-fed/other.example.pem", &s.read("oroot/root-cert.pem"));
    s.write("west-fed/example.org.pem", &s.read("root/root-cert.pem"));
    let (_east, east_addr, _) = gateway(
        &s,
        port,
        "east",
        &["--identity", "east-gw", "--federated", "east-fed"],
    );
    let egress = format!("127.0.0.1:{}", common::free_port());
    s.write(
        "west.yaml",
        &format!(
            "remote:\n- host: reviews.bookinfo.svc.cluster.local\n  gateways: [\"{east_addr}\"]\n"
        ),
    );
    let (_west, _) = start_gateway(
        &s,
        &[
            "gateway",
            "--cluster",
            "west",
            "--network",
            "net-west",
            "--listen",
            &format!("127.0.0.1:{}", common::free_port()),
            "--routes",
            "west.yaml",
            "--identity",
            "west-gw",
            "--federated",
            "west-fed",
            "--egress-listen",
            &egress,
        ],
    );
    let r = s_client(&s, &egress, SNI, "istio");
    assert!(
        r.stdout.contains("HTTP/1.0 200 ok"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
}
