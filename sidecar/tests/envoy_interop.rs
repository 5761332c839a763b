//! A mixed mesh: stock Envoy 1.40 sidecars, configured as Istio configures
//! its sidecars, and strait sidecars call each other both ways.
//!
//! - Envoy as the caller's sidecar (an HTTP listener for the app; mTLS
//!   upstream with the caller's certificate, Istio's SNI, ALPN
//!   `istio-http/1.1` for HTTP/1.1 and `istio-h2` for gRPC, the
//!   destination's SPIFFE ID required) reaches apps behind strait's
//!   inbound: an HTTP/1.1 app, and a gRPC app that strait's inbound
//!   speaks HTTP/2 to because Envoy sent HTTP/2 (as Istio's sidecars do
//!   for `grpc` ports).
//! - strait as the caller's sidecar reaches an app behind Envoy as the
//!   server's sidecar (DownstreamTlsContext requiring a client certificate
//!   from the mesh root, `x-forwarded-client-cert` set from it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../tests/common/envoy.rs"]
mod envoy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::grpc::*;
use common::*;
use envoy::envoy_bin;
use strait_ca::testing::TestPki;
use strait_proto::strait::mesh::v1 as pb;
use tonic::{Code, Request};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `<name>-chain.pem` (leaf, intermediate) and `<name>-key.pem` for
/// `id`.
fn write_identity(pki: &TestPki, dir: &Path, name: &str, id: &str) {
    let (leaf, key) = pki.leaf(id);
    let chain = strait_ca::pemfile::encode_certificates([
        leaf.as_slice(),
        pki.intermediate.certificate_der(),
    ]);
    std::fs::write(dir.join(format!("{name}-chain.pem")), chain).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), key).unwrap();
}

const SNI: &str = "outbound_.8080_._.echo.demo.svc.cluster.local";

/// One upstream cluster of the calling Envoy: `addr` over mTLS as `sleep`,
/// requiring `echo`'s identity, HTTP/1.1 or HTTP/2.
fn upstream_cluster(name: &str, addr: SocketAddr, h2: bool, dir: &str) -> String {
    let (alpn, protocol) = if h2 {
        (
            "istio-h2",
            "explicit_http_config: {http2_protocol_options: {}}",
        )
    } else {
        (
            "istio-http/1.1",
            "explicit_http_config: {http_protocol_options: {}}",
        )
    };
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        {protocol}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {SNI}
        common_tls_context:
          # As Istio sets it for ISTIO_MUTUAL (Envoy's client default
          # stops at TLS 1.2; strait speaks TLS 1.3 only).
          tls_params: {{tls_maximum_protocol_version: TLSv1_3}}
          alpn_protocols: [{alpn}]
          tls_certificates:
          - certificate_chain: {{filename: {dir}/sleep-chain.pem}}
            private_key: {{filename: {dir}/sleep-key.pem}}
          validation_context:
            trusted_ca: {{filename: {dir}/root.pem}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{exact: spiffe://cluster.local/ns/demo/sa/echo}}
"#,
        ip = addr.ip(),
        port = addr.port(),
    )
}

fn hcm(prefix: &str, routes: &str, extra: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          codec_type: AUTO
{extra}          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

/// Envoy, until dropped.
struct Envoy {
    child: tokio::process::Child,
    admin: u16,
}

impl Envoy {
    async fn start(dir: &Path, config: &str, admin: u16) -> Envoy {
        std::fs::write(dir.join("envoy.yaml"), config).unwrap();
        let child = tokio::process::Command::new(envoy_bin())
            .args([
                "-c",
                "envoy.yaml",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("envoy starts");
        let e = Envoy { child, admin };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = curl(&[&format!("http://127.0.0.1:{}/ready", e.admin)]).await;
            if r.status == 200 {
                return e;
            }
            assert!(Instant::now() < deadline, "envoy not ready: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn envoy_and_strait_sidecars_call_each_other() {
    let pki = TestPki::new(TD);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let dir_s = dir.display().to_string();
    std::fs::write(
        dir.join("root.pem"),
        strait_ca::pemfile::encode("CERTIFICATE", pki.root.root_der()),
    )
    .unwrap();
    let sleep_id = spiffe("demo", "sleep");
    let echo_id = spiffe("demo", "echo");
    write_identity(&pki, dir, "sleep", &sleep_id);
    write_identity(&pki, dir, "echo", &echo_id);

    // strait in front of an HTTP/1.1 app and in front of a gRPC app.
    let mesh = Mesh::new(&pki).workload("echo-v1", "demo", &[("app", "echo")]);
    let http_side = Sidecar::start(
        "echo-v1",
        "demo",
        backend("v1").await,
        identity(&pki, &echo_id),
        &pki,
    )
    .await;
    let grpc_side = Sidecar::start(
        "echo-v1",
        "demo",
        grpc_app().await,
        identity(&pki, &echo_id),
        &pki,
    )
    .await;
    http_side.push(&mesh);
    grpc_side.push(&mesh);

    // Envoy: the caller's sidecar (listener `outbound`, gRPC to the gRPC
    // app's sidecar, the rest to the HTTP one) and a server's sidecar
    // (listener `inbound`, in front of an HTTP/1.1 app).
    let (out_port, in_port, admin) = (free_port(), free_port(), free_port());
    let envoy_app = backend("behind-envoy").await;
    let outbound_routes = r#"              - match: {prefix: "/", headers: [{name: content-type, string_match: {prefix: application/grpc}}]}
                route: {cluster: strait_grpc, timeout: 0s}
              - match: {prefix: "/"}
                route: {cluster: strait_http, timeout: 0s}"#;
    let inbound_routes = r#"              - match: {prefix: "/"}
                route: {cluster: app, timeout: 0s}"#;
    let xfcc = "          forward_client_cert_details: SANITIZE_SET\n          set_current_client_cert_details: {uri: true}\n";
    let config = format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {out_port}}}}}
    filter_chains:
    - filters:
{outbound_hcm}  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {in_port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {{filename: {dir_s}/echo-chain.pem}}
              private_key: {{filename: {dir_s}/echo-key.pem}}
            validation_context:
              trusted_ca: {{filename: {dir_s}/root.pem}}
      filters:
{inbound_hcm}  clusters:
{h1}{h2}  - name: app
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app_port}}}}}}}}}]}}]
"#,
        outbound_hcm = hcm("outbound", outbound_routes, ""),
        inbound_hcm = hcm("inbound", inbound_routes, xfcc),
        h1 = upstream_cluster("strait_http", http_side.inbound, false, &dir_s),
        h2 = upstream_cluster("strait_grpc", grpc_side.inbound, true, &dir_s),
        app_port = envoy_app.port(),
    );
    let _envoy = Envoy::start(dir, &config, admin).await;

    // 1. Envoy → strait, HTTP/1.1: the app sees the identity strait's
    //    inbound verified from Envoy's client certificate.
    let r = curl(&[
        "-H",
        "Host: echo.demo:8080",
        &format!("http://127.0.0.1:{out_port}/from-envoy"),
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(backend_of(&r.body), Some("v1"), "{}", r.body);
    let got = header_in(&r.body, "x-forwarded-client-cert").unwrap_or_default();
    assert!(
        got.starts_with(&format!("By={echo_id};")) && got.ends_with(&format!(";URI={sleep_id}")),
        "{}",
        r.body
    );

    // 2. Envoy → strait, gRPC: HTTP/2 all the way to the gRPC app,
    //    statuses in trailers included.
    let mut grpc = client(format!("127.0.0.1:{out_port}").parse().unwrap()).await;
    grpc.ready().await.unwrap();
    let resp = grpc
        .unary(Request::new(msg(b"hi")), path("Unary"), codec())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.data, b"hi");
    assert!(
        resp.note.ends_with(&format!(";URI={sleep_id}")),
        "{}",
        resp.note
    );
    grpc.ready().await.unwrap();
    let mut s = grpc
        .server_streaming(Request::new(msg(&[2])), path("Count"), codec())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().data, vec![0]);
    assert_eq!(s.message().await.unwrap().unwrap().data, vec![1]);
    let status = s.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");

    // 3. strait → Envoy: strait's client sidecar calls `echo`, whose one
    //    endpoint is Envoy's inbound; Envoy verifies strait's client
    //    certificate and tells its app who called.
    let caller = Sidecar::start(
        "sleep",
        "demo",
        backend("sleep").await,
        identity(&pki, &sleep_id),
        &pki,
    )
    .await;
    let envoy_endpoint = pb::Endpoint {
        address: "127.0.0.1".into(),
        port: u32::from(in_port),
        labels: HashMap::from([("app".to_string(), "echo".to_string())]),
        cluster: "c1".into(),
        network: "net1".into(),
        identity: echo_id.clone(),
        healthy: true,
        weight: 1,
        workload: "echo-envoy".into(),
        ..Default::default()
    };
    caller.push(
        &Mesh::new(&pki)
            .echo(vec![envoy_endpoint], std::slice::from_ref(&echo_id))
            .workload("sleep", "demo", &[("app", "sleep")]),
    );
    let r = via_proxy(caller.outbound, "http://echo.demo:8080/from-strait", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(backend_of(&r.body), Some("behind-envoy"), "{}", r.body);
    let got = header_in(&r.body, "x-forwarded-client-cert").unwrap_or_default();
    assert!(got.contains(&format!("URI={sleep_id}")), "{}", r.body);
    // strait verified Envoy's certificate as echo's.
    assert!(
        caller
            .metrics()
            .contains(&format!("destination_principal=\"{echo_id}\"")),
        "{}",
        caller.metrics()
    );
}
