//! Route behaviour end to end: retries around a dead endpoint, timeouts,
//! fault injection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;
use strait_ca::testing::TestPki;

/// A client sidecar, one live `echo` server sidecar, and a mesh whose
/// `echo` service also lists an endpoint nobody listens on.
async fn with_dead_endpoint() -> (TestPki, Sidecar, Sidecar, Mesh) {
    let pki = TestPki::new(TD);
    let client = sleep_client(&pki).await;
    let server = Sidecar::start(
        "echo-v1",
        "demo",
        backend("v1").await,
        identity(&pki, &spiffe("demo", "echo")),
        &pki,
    )
    .await;
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let id = spiffe("demo", "echo");
    let mut dead = server.endpoint("v1", &id);
    dead.port = u32::from(dead_port);
    dead.workload = "echo-dead".into();
    let mesh = Mesh::new(&pki).echo(
        vec![server.endpoint("v1", &id), dead],
        std::slice::from_ref(&id),
    );
    (pki, client, server, mesh)
}

#[tokio::test]
async fn retries_route_around_a_dead_endpoint() {
    let (_pki, client, server, mesh) = with_dead_endpoint().await;
    let mesh = mesh.policy(
        "VirtualService",
        "demo",
        "echo",
        json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}],
               "retries": {"attempts": 3, "retryOn": "connect-failure"}}]}),
    );
    client.push(&mesh);
    server.push(&mesh);
    let mut c = ProxyClient::connect(client.outbound).await;
    for i in 0..20 {
        let (status, body, _) = c.get("http://echo.demo:8080/").await;
        assert_eq!(status, 200, "request {i}: {body}");
    }

    // Without retries, the dead endpoint shows through as a 503 naming
    // the connect failure (Istio's default balancing picks either endpoint
    // at random: missing it 30 times in a row has odds of 2^-30).
    let mesh = mesh.policy(
        "VirtualService",
        "demo",
        "echo",
        json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}],
               "retries": {"attempts": 0}}]}),
    );
    client.push(&mesh);
    let mut failures = Vec::new();
    for _ in 0..30 {
        let (status, body, _) = c.get("http://echo.demo:8080/").await;
        if status != 200 {
            failures.push((status, body));
        }
    }
    assert!(!failures.is_empty(), "the dead endpoint was never picked");
    for (status, body) in failures {
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("upstream connect error"), "{body}");
    }
}

#[tokio::test]
async fn route_timeouts_and_faults_answer_for_the_upstream() {
    let (_pki, client, server, mut mesh) = with_dead_endpoint().await;
    // Only the live endpoint.
    mesh.services[0].endpoints.truncate(1);
    let timeout = mesh.clone().policy(
        "VirtualService",
        "demo",
        "echo",
        json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}],
               "timeout": "100ms"}]}),
    );
    client.push(&timeout);
    server.push(&timeout);
    let mut c = ProxyClient::connect(client.outbound).await;
    let (status, body, _) = c.get("http://echo.demo:8080/slow").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timeout"), "{body}");
    let (status, body, _) = c.get("http://echo.demo:8080/fast").await;
    assert_eq!(status, 200, "{body}");

    let fault = mesh.policy(
        "VirtualService",
        "demo",
        "echo",
        json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}],
               "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}}}]}),
    );
    client.push(&fault);
    let (status, body, headers) = c.get("http://echo.demo:8080/").await;
    assert_eq!(status, 418, "{body}");
    assert!(body.contains("fault filter abort"), "{body}");
    assert!(headers.contains_key("x-strait-reason"));
}
