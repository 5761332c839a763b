//! Kubernetes mode against a real API server (etcd and kube-apiserver
//! built by `scripts/tools.sh`): what the recorded responses cannot show,
//! the API server's own validation of what strait writes (the Istio and
//! MCS CRD schemas, server-side apply), real watches, and TokenReview of
//! real projected tokens.
//!
//! Each test starts its own API server:
//! - here: what Kubernetes mode writes is accepted, discovery from the API;
//! - [`rbac`]: the control plane as its ServiceAccount with the manifest's
//!   RBAC, and one rule less;
//! - [`tokens`]: TokenReview of valid, foreign, expired and invalidated
//!   tokens;
//! - [`ssa`]: server-side apply of imports next to another field manager,
//!   and their deletion when the export goes;
//! - [`remote_tokens`]: a primary reviews its remote clusters' tokens
//!   with their API servers;
//! - [`roots`]: the roots ConfigMap and the webhook's caBundle through a
//!   root rotation.

mod rbac;
mod remote_tokens;
mod roots;
mod ssa;
mod tokens;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::apiserver::ApiServer;
use crate::common::{Broker, Scratch};
use serde_json::Value;
use strait_proto::strait::mesh::v1 as pb;
use strait_proxy_client::identity::{self as ca, Credential, Identity};

use crate::support::*;

/// The member cluster's manifest, whose RBAC and webhook the tests apply
/// as they are.
const CLUSTER_MANIFEST: &str = "deploy/multicluster/manifests/cluster.yaml";

/// The documents of [`CLUSTER_MANIFEST`] of `kinds`, in the file's order.
fn manifest(kinds: &[&str]) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(CLUSTER_MANIFEST);
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let picked: Vec<Value> = docs
        .into_iter()
        .filter(|d| kinds.iter().any(|k| d["kind"] == *k))
        .collect();
    for k in kinds {
        assert!(
            picked.iter().any(|d| d["kind"] == *k),
            "{CLUSTER_MANIFEST} has no {k}"
        );
    }
    picked
}

/// Server-side applies `doc` as the admin.
#[track_caller]
fn apply_value(api: &ApiServer, doc: &Value) {
    api.apply(&serde_json::to_string(doc).unwrap());
}

/// A local `echo` Service in east's `demo`: an imported echo then also
/// gets a WorkloadEntry (Istio does not merge a ServiceEntry into a
/// Service of the same host).
const LOCAL_ECHO: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 8080}]
"#;

/// West's exported echo with one workload, as the directory config says.
fn west_echo(west: &ControlPlane, port: u32, export: bool) {
    put(
        &west.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", port, export),
            workload_yaml("echo-v2", "echo", "10.2.0.1", "net-west")
        ),
    );
}

/// Whether the `kind` object `namespace/name` is absent, by a list by
/// name that must work: a misspelt kind fails rather than counting as
/// absent.
#[track_caller]
fn absent(api: &ApiServer, kind: &str, namespace: &str, name: &str) -> bool {
    let selector = format!("metadata.name={name}");
    let args = [kind, "-n", namespace, "--field-selector", &selector];
    let list = api
        .get(&args)
        .unwrap_or_else(|| panic!("kubectl get {args:?} failed"));
    list["items"].as_array().unwrap().is_empty()
}

/// Waits until [`absent`], within `within`.
#[track_caller]
fn wait_gone(api: &ApiServer, kind: &str, namespace: &str, name: &str, within: Duration) {
    let start = Instant::now();
    while !absent(api, kind, namespace, name) {
        assert!(
            start.elapsed() < within,
            "{kind} {namespace}/{name}: still there after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until a line of the control plane's log satisfies `check`, and
/// returns it.
async fn until_logged(cp: &ControlPlane, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = cp.log();
        if let Some(line) = log.lines().find(|l| check(l)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not logged within {WAIT:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The certificates of a PEM bundle, each as its base64 text (for
/// comparing bundles whatever their order and line endings).
fn pem_certs(pem: &str) -> std::collections::BTreeSet<String> {
    pem.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|c| {
            c.split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .split_whitespace()
                .collect()
        })
        .collect()
}

/// Marks east's reviews-v1 pod running and ready with its address, as its
/// kubelet would (no kubelet runs).
#[track_caller]
fn reviews_running(api: &ApiServer) {
    let (code, _, err) = api.kubectl(&[
        "patch",
        "pod",
        "reviews-v1",
        "-n",
        "bookinfo",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"10.1.0.5","podIPs":[{"ip":"10.1.0.5"}],"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    assert_eq!(code, 0, "pod status: {err}");
}

/// Bookinfo's reviews in east: exported with an MCS ServiceExport, one
/// pod (no kubelet runs: its status is set by the test, as a kubelet
/// would) and the EndpointSlice the endpoint controller would write.
const REVIEWS: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: bookinfo}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-reviews, namespace: bookinfo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: other, namespace: bookinfo}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: reviews, namespace: bookinfo}
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1
  namespace: bookinfo
  labels: {app: reviews, version: v1}
spec:
  serviceAccountName: bookinfo-reviews
  automountServiceAccountToken: false
  containers: [{name: reviews, image: example.invalid/reviews:v1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-1
  namespace: bookinfo
  labels: {kubernetes.io/service-name: reviews}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}]
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: reviews-v1, namespace: bookinfo}
"#;

/// A pod's proxy asking east's CSR API for `bookinfo/<account>` with
/// `token`.
async fn certificate_with(
    cp: &ControlPlane,
    account: &str,
    token: &str,
) -> Result<Identity, String> {
    let td = cp.trust_domain();
    let id = strait_ca::SpiffeId::workload(&td, "bookinfo", account).unwrap();
    let tls = ca::mesh_client_tls(cp.trust(), ca::control_plane_id(&td));
    ca::request_certificate(
        &cp.listen,
        &tls,
        &cp.trust(),
        &id,
        Credential::Token(token),
        None,
    )
    .await
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_api_server_takes_what_kubernetes_mode_writes_and_reviews_real_tokens() {
    let s = Scratch::new();
    let Some(api) = ApiServer::start(&s.path("kube")) else {
        return;
    };
    api.install_crds();
    api.apply(REVIEWS);
    reviews_running(&api);

    let broker = Broker::start(&s.path("broker"), TD);
    let east = ControlPlane::east_on_kube(&s, &broker, &api.kubeconfig, &[]);
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    put(
        &west.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", 8080, true),
            workload_yaml("echo-v2", "echo", "10.2.0.1", "net-west")
        ),
    );

    // A real projected token (audience istio-ca) is reviewed by the API
    // server and gets its account's identity (the refusals: [`tokens`]).
    let token = api.token("bookinfo", "bookinfo-reviews", "istio-ca", 600);
    let identity = certificate_with(&east, "bookinfo-reviews", &token)
        .await
        .unwrap();
    assert_eq!(
        identity.spiffe_id.as_str(),
        format!("spiffe://{TD}/ns/bookinfo/sa/bookinfo-reviews")
    );

    // Discovery serves the API's reviews with its ready pod.
    let proxy = east.subscribe(&identity, "reviews-v1");
    let mut res = proxy.resources();
    let reviews = until(&mut res, "reviews with its pod", &east, |r| {
        let svc = services(r).remove("reviews.bookinfo.svc.cluster.local")?;
        (!svc.endpoints.is_empty()).then_some(svc)
    })
    .await;
    assert!(
        reviews
            .endpoints
            .iter()
            .all(|e| e.kind == pb::endpoint::Kind::Sidecar as i32 && e.network == "net-east"),
        "{:?}",
        reviews.endpoints
    );

    // West's echo lands in east's API: a ServiceEntry and a ServiceImport
    // the API server accepted against the CRD schemas, by server-side
    // apply under strait's field manager.
    let within = Duration::from_secs(60);
    let se = api.wait_get(
        &[
            "serviceentries.networking.istio.io",
            "-n",
            "demo",
            "--show-managed-fields",
        ],
        within,
        |v| {
            v["items"]
                .as_array()
                .is_some_and(|i| i.iter().any(|o| o.to_string().contains("192.0.2.20")))
        },
    );
    let entry = se["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o.to_string().contains("192.0.2.20"))
        .unwrap();
    assert_eq!(
        entry["metadata"]["labels"]["app.kubernetes.io/managed-by"], "strait",
        "{entry}"
    );
    assert!(
        entry["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["manager"] == "strait-controlplane" && m["operation"] == "Apply"),
        "{entry}"
    );
    api.wait_get(
        &["serviceimports.multicluster.x-k8s.io", "-n", "demo"],
        within,
        |v| v["items"].as_array().is_some_and(|i| !i.is_empty()),
    );
    // The mesh roots published in the namespaces.
    let roots = std::fs::read_to_string(east.state.join("cacerts/root-cert.pem")).unwrap();
    let cm = api.wait_get(
        &["configmap", "strait-ca-root-cert", "-n", "bookinfo"],
        within,
        |v| v["data"]["root-cert.pem"].is_string(),
    );
    assert_eq!(
        cm["data"]["root-cert.pem"].as_str().unwrap().trim(),
        roots.trim()
    );

    // East's ServiceExport reaches west.
    until_imported(&west, &east, "east's reviews imported by west", |t| {
        t.contains("reviews") && t.contains("192.0.2.10")
    })
    .await;

    // A watch, not a poll at start: the export withdrawn in the API is
    // withdrawn at west.
    let (code, _, err) = api.kubectl(&["delete", "serviceexport", "reviews", "-n", "bookinfo"]);
    assert_eq!(code, 0, "{err}");
    until_imported(
        &west,
        &east,
        "reviews withdrawn at west after its ServiceExport went",
        |t| !t.contains("reviews"),
    )
    .await;
}
