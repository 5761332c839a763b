//! Request paths are normalized before AuthorizationPolicy and routing see
//! them, and the app gets the normalized path (Istio's pathNormalization;
//! the CVE-2021-31920 class). Driven with `curl --path-as-is`, through the
//! client sidecar (HTTP/1.1 in, HTTP/2 between the sidecars) and straight
//! at the server sidecar's inbound in plaintext (origin form, absolute
//! form, h2c), as a workload without a sidecar would send them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use strait_ca::testing::TestPki;
use strait_proto::strait::mesh::v1 as pb;

/// An app speaking HTTP/1.1 and h2c that answers `GET <path>` and counts
/// the requests it got.
async fn app() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let path = req.uri().path_and_query().map_or("", |p| p.as_str());
                    let body = format!("app saw {} {path}\n", req.method());
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// How a request reaches the server sidecar.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// `curl -x <client sidecar>`: the client sidecar's outbound, then
    /// HTTP/2 over mTLS to the server sidecar.
    ClientSidecar,
    /// Plaintext HTTP/1.1 to the inbound, origin form.
    Origin,
    /// Plaintext HTTP/1.1 to the inbound, absolute form.
    Absolute,
    /// Plaintext HTTP/2 (prior knowledge) to the inbound.
    H2c,
}

const ALL_WAYS: [Via; 4] = [Via::ClientSidecar, Via::Origin, Via::Absolute, Via::H2c];

struct Setup {
    _pki: TestPki,
    client: Sidecar,
    server: Sidecar,
    mesh: Mesh,
    seen: Arc<AtomicU64>,
}

async fn setup() -> Setup {
    let pki = TestPki::new(TD);
    let (app, seen) = app().await;
    let (client, server, mesh) = sleep_and_echo(&pki, app).await;
    Setup {
        _pki: pki,
        client,
        server,
        mesh,
        seen,
    }
}

impl Setup {
    fn push(&self, mesh: &Mesh) {
        self.client.push(mesh);
        self.server.push(mesh);
    }

    async fn get(&self, via: Via, path: &str) -> Curl {
        let url = format!("http://echo.demo:8080{path}");
        let inbound = format!("http://{}", self.server.inbound);
        match via {
            Via::ClientSidecar => via_proxy(self.client.outbound, &url, &["--path-as-is"]).await,
            Via::Origin => curl(&["--path-as-is", &format!("{inbound}{path}")]).await,
            Via::Absolute => curl(&["--path-as-is", "-x", &inbound, &url]).await,
            Via::H2c => {
                curl(&[
                    "--path-as-is",
                    "--http2-prior-knowledge",
                    &format!("{inbound}{path}"),
                ])
                .await
            }
        }
    }

    /// `path` is answered `status` every way, without reaching the app.
    async fn refused(&self, path: &str, status: u16) {
        for via in ALL_WAYS {
            let before = self.seen.load(Ordering::SeqCst);
            let r = self.get(via, path).await;
            assert_eq!(r.status, status, "{path} via {via:?}: {r:?}");
            assert_eq!(
                self.seen.load(Ordering::SeqCst),
                before,
                "{path} via {via:?} reached the app: {r:?}"
            );
        }
    }

    /// `path` reaches the app every way, which sees `want`.
    async fn reaches_app_as(&self, path: &str, want: &str) {
        for via in ALL_WAYS {
            let r = self.get(via, path).await;
            assert_eq!(r.status, 200, "{path} via {via:?}: {r:?}");
            assert_eq!(
                r.body,
                format!("app saw GET {want}\n"),
                "{path} via {via:?}"
            );
        }
    }
}

fn deny_admin(mesh: &Mesh) -> Mesh {
    mesh.clone().policy(
        "AuthorizationPolicy",
        "demo",
        "deny-admin",
        json!({"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
               "rules": [{"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}]}),
    )
}

fn with_mode(mesh: Mesh, mode: pb::mesh_settings::PathNormalization) -> Mesh {
    Mesh {
        settings: vec![pb::MeshSettings {
            path_normalization: mode as i32,
        }],
        ..mesh
    }
}

#[tokio::test]
async fn a_deny_on_admin_is_not_bypassed_by_another_spelling_of_it() {
    let s = setup().await;
    s.push(&deny_admin(&s.mesh));
    s.refused("/admin", 403).await;
    for bypass in [
        "/x/../admin",
        "/./admin",
        "/%61dmin",
        "/%2e/admin",
        "/%2E%2e/admin",
        "/admin\\x",
        "/public/.%2e/admin/",
        "/public/..;/admin",
        "/ADMIN/../admin?q=1",
    ] {
        s.refused(bypass, 403).await;
    }
    // Not a path Envoy would forward: 400, before any policy.
    s.refused("/admin%00", 400).await;
    s.refused("/x%00", 400).await;
    s.refused("/%%36%31dmin", 400).await;
    // Other paths pass, as the app is given them normalized; the query
    // is left alone.
    s.reaches_app_as("/public/x", "/public/x").await;
    s.reaches_app_as("/public/./a/../x?p=/../admin", "/public/x?p=/../admin")
        .await;
    s.reaches_app_as("/%70ublic/x%20y", "/public/x%20y").await;
}

#[tokio::test]
async fn an_allow_on_public_does_not_admit_a_path_that_climbs_out() {
    let s = setup().await;
    let allow = s.mesh.clone().policy(
        "AuthorizationPolicy",
        "demo",
        "public-only",
        json!({"selector": {"matchLabels": {"app": "echo"}}, "action": "ALLOW",
               "rules": [{"to": [{"operation": {"paths": ["/public/*"]}}]}]}),
    );
    s.push(&allow);
    s.refused("/public/../admin", 403).await;
    s.refused("/public/%2e%2e/admin", 403).await;
    s.refused("/public\\..\\admin", 403).await;
    s.reaches_app_as("/public/x", "/public/x").await;
    s.reaches_app_as("/public/y/../x", "/public/x").await;

    // notPaths sees the same path: DENY what is not under /public.
    let deny_others = s.mesh.clone().policy(
        "AuthorizationPolicy",
        "demo",
        "public-only",
        json!({"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
               "rules": [{"to": [{"operation": {"notPaths": ["/public/*"]}}]}]}),
    );
    s.push(&deny_others);
    s.refused("/public/../admin", 403).await;
    s.refused("/public/..\\admin", 403).await;
    s.reaches_app_as("/public/./x", "/public/x").await;
}

#[tokio::test]
async fn the_mesh_setting_picks_istios_other_modes() {
    use pb::mesh_settings::PathNormalization as Mode;
    let s = setup().await;
    // BASE keeps `//` and escaped slashes, as Istio's default does.
    s.push(&deny_admin(&s.mesh));
    s.reaches_app_as("//admin", "//admin").await;
    s.reaches_app_as("/public%2F..%2Fadmin", "/public%2F..%2Fadmin")
        .await;

    s.push(&with_mode(deny_admin(&s.mesh), Mode::MergeSlashes));
    s.refused("//admin", 403).await;
    s.refused("/x/..//admin//", 403).await;
    s.reaches_app_as("//public///x", "/public/x").await;
    s.reaches_app_as("/public%2F..%2Fadmin", "/public%2F..%2Fadmin")
        .await;

    s.push(&with_mode(deny_admin(&s.mesh), Mode::DecodeAndMergeSlashes));
    s.refused("/public%2F..%2Fadmin", 403).await;
    s.refused("/public%5c..%5cadmin", 403).await;
    s.reaches_app_as("/public%2fx", "/public/x").await;

    // NONE: raw paths, as Envoy without normalize_path.
    s.push(&with_mode(deny_admin(&s.mesh), Mode::None));
    s.reaches_app_as("/x/../admin", "/x/../admin").await;
}

#[tokio::test]
async fn virtual_service_uri_matches_see_the_normalized_path() {
    let s = setup().await;
    // The client sidecar aborts /admin with 418 and routes the rest.
    let routes = s.mesh.clone().policy(
        "VirtualService",
        "demo",
        "echo",
        json!({"hosts": ["echo"], "http": [
            {"match": [{"uri": {"prefix": "/admin"}}],
             "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
             "route": [{"destination": {"host": "echo"}}]},
            {"route": [{"destination": {"host": "echo"}}]}]}),
    );
    s.push(&routes);
    for path in ["/admin", "/x/../admin", "/%61dmin/x", "/.\\admin"] {
        let before = s.seen.load(Ordering::SeqCst);
        let r = s.get(Via::ClientSidecar, path).await;
        assert_eq!(r.status, 418, "{path}: {r:?}");
        assert_eq!(s.seen.load(Ordering::SeqCst), before, "{path}");
    }
    let r = s.get(Via::ClientSidecar, "/admin%00").await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = s.get(Via::ClientSidecar, "/pub/./lic").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "app saw GET /pub/lic\n");
}
