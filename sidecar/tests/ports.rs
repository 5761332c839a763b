//! A pod that serves more than one port: the destination's sidecar sends
//! each request or connection to the app's port for it (`--app-ports`),
//! found from the service port its caller asked for (the port's
//! `targetPort`), and AuthorizationPolicy `ports` name those workload
//! ports, as in Istio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;
use strait_ca::testing::TestPki;
use strait_proto::strait::mesh::v1 as pb;

fn port(name: &str, port: u32, target_port: u32) -> pb::Port {
    pb::Port {
        name: name.into(),
        port,
        protocol: "http".into(),
        target_port,
    }
}

#[tokio::test]
async fn each_service_port_reaches_its_own_app_port() {
    let pki = TestPki::new(TD);
    let main = backend("main").await;
    let admin = backend("admin").await;
    let client = sleep_client(&pki).await;
    let server = Sidecar::start_opts(
        "echo-v1",
        "demo",
        main,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
        Tuning {
            app_ports: vec![admin.port()],
            ..Tuning::default()
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    let mut mesh = Mesh::new(&pki)
        .echo(
            vec![server.endpoint("v1", &spiffe("demo", "echo"))],
            &[spiffe("demo", "echo")],
        )
        .workload("sleep", "demo", &[("app", "sleep")])
        .workload("echo-v1", "demo", &[("app", "echo"), ("version", "v1")]);
    mesh.services[0].ports = vec![
        port("http", 8080, u32::from(main.port())),
        port("http-admin", 9090, u32::from(admin.port())),
        // A target port the app was not started with: --app serves it.
        port("http-other", 7070, 1),
    ];
    client.push(&mesh);
    server.push(&mesh);
    let get = |url: &'static str, extra: &'static [&'static str]| {
        let proxy = client.outbound;
        async move {
            let r = via_proxy(proxy, url, extra).await;
            assert_eq!(r.status, 200, "{url}: {r:?}");
            backend_of(&r.body).unwrap_or_default().to_string()
        }
    };
    assert_eq!(get("http://echo.demo:8080/", &[]).await, "main");
    assert_eq!(get("http://echo.demo:9090/", &[]).await, "admin");
    assert_eq!(get("http://echo.demo:7070/", &[]).await, "main");
    // TCP (CONNECT, then HTTP inside the tunnel) goes by port the same way.
    assert_eq!(get("http://echo.demo:9090/", &["-p"]).await, "admin");
    assert_eq!(get("http://echo.demo:8080/", &["-p"]).await, "main");

    // A DENY on the admin's workload port (not the service port 9090).
    let mesh = mesh.policy(
        "AuthorizationPolicy",
        "demo",
        "no-admin",
        json!({"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
               "rules": [{"to": [{"operation": {"ports": [admin.port().to_string()]}}]}]}),
    );
    server.push(&mesh);
    let r = via_proxy(client.outbound, "http://echo.demo:9090/", &[]).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(get("http://echo.demo:8080/", &[]).await, "main");
    // The same for a TCP connection: closed, so curl gets no answer.
    let r = via_proxy(client.outbound, "http://echo.demo:9090/", &["-p"]).await;
    assert_eq!(r.status, 0, "{r:?}");
}
