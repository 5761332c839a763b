//! The control plane authenticated as its ServiceAccount
//! (`strait-system/controlplane`, a TokenRequest token in its kubeconfig)
//! with the RBAC of `deploy/multicluster/manifests/cluster.yaml` as it is:
//! everything Kubernetes mode reads and writes is allowed. Then one rule
//! less (no writing ServiceEntries): the import of that kind fails
//! visibly, with the API's 403, while the rest is applied; with the rule
//! back, the retry applies it.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use super::*;
use crate::common::free_port;

const ACCOUNT: &str = "system:serviceaccount:strait-system:controlplane";

/// Whether the API server lets the control plane's account do `verb` on
/// `resource` in `demo` (`kubectl auth can-i --as`).
fn can(api: &ApiServer, verb: &str, resource: &str) -> bool {
    let (code, out, err) = api.kubectl(&[
        "auth", "can-i", verb, resource, "-n", "demo", "--as", ACCOUNT,
    ]);
    assert!(code == 0 || code == 1, "kubectl auth can-i: {out}{err}");
    out.trim() == "yes"
}

/// Waits until [`can`] answers `allowed` (RBAC changes reach the
/// authorizer through its informers).
fn until_can(api: &ApiServer, verb: &str, resource: &str, allowed: bool) {
    let deadline = Instant::now() + WAIT;
    while can(api, verb, resource) != allowed {
        assert!(
            Instant::now() < deadline,
            "{ACCOUNT} {verb} {resource}: never {allowed}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The manifest's ClusterRole without writing ServiceEntries: the rule
/// that grants them keeps its other resources, and ServiceEntries keep
/// only get, list and watch (what the watcher needs).
fn without_serviceentry_writes(role: &Value) -> Value {
    let mut role = role.clone();
    let rules = role["rules"].as_array_mut().unwrap();
    let rule = rules
        .iter_mut()
        .find(|r| {
            r["resources"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|x| x == "serviceentries"))
        })
        .expect("a rule granting serviceentries");
    assert!(
        rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "patch"),
        "{rule}"
    );
    rule["resources"]
        .as_array_mut()
        .unwrap()
        .retain(|x| x != "serviceentries");
    rules.push(json!({
        "apiGroups": ["networking.istio.io"],
        "resources": ["serviceentries"],
        "verbs": ["get", "list", "watch"],
    }));
    role
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_as_its_service_account_with_the_manifests_rbac() {
    let s = Scratch::new();
    let Some(api) = ApiServer::start(&s.path("kube")) else {
        return;
    };
    api.install_crds();
    api.apply(REVIEWS);
    api.apply(LOCAL_ECHO);
    reviews_running(&api);
    let docs = manifest(&[
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
    ]);
    for d in &docs {
        apply_value(&api, d);
    }
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    until_can(&api, "patch", "serviceentries.networking.istio.io", true);
    // The account is not an admin: what the manifest does not grant is
    // refused (the negative below relies on it).
    assert!(!can(&api, "get", "secrets"));
    let kubeconfig = api.service_account_kubeconfig(
        "strait-system",
        "controlplane",
        3600,
        &s.path("controlplane.kubeconfig"),
    );

    let broker = Broker::start(&s.path("broker"), TD);
    let inject = format!("127.0.0.1:{}", free_port());
    let east = ControlPlane::east_on_kube(
        &s,
        &broker,
        &kubeconfig,
        &["--inject-listen".into(), inject],
    );
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    west_echo(&west, 8080, true);

    // TokenReview: a pod's projected token gets its account's identity.
    let token = api.token("bookinfo", "bookinfo-reviews", "istio-ca", 600);
    let identity = certificate_with(&east, "bookinfo-reviews", &token)
        .await
        .unwrap();
    assert_eq!(
        identity.spiffe_id.as_str(),
        format!("spiffe://{TD}/ns/bookinfo/sa/bookinfo-reviews")
    );
    // Services, EndpointSlices and Pods read: discovery serves reviews
    // with its ready pod.
    let proxy = east.subscribe(&identity, "reviews-v1");
    let mut res = proxy.resources();
    until(&mut res, "reviews with its pod", &east, |r| {
        let svc = services(r).remove("reviews.bookinfo.svc.cluster.local")?;
        svc.endpoints
            .iter()
            .any(|e| e.address == "10.1.0.5")
            .then_some(())
    })
    .await;
    // ServiceExports read: east's reviews reaches west.
    until_imported(&west, &east, "east's reviews imported by west", |t| {
        t.contains("reviews") && t.contains("192.0.2.10")
    })
    .await;
    // Imports applied: the ServiceEntry, the WorkloadEntry (east has a
    // local echo) and the ServiceImport.
    for (kind, name) in [
        ("serviceentries.networking.istio.io", "strait-echo"),
        ("workloadentries.networking.istio.io", "strait-echo.west"),
        ("serviceimports.multicluster.x-k8s.io", "echo"),
    ] {
        let o = api.wait_get(
            &[kind, name, "-n", "demo", "--show-managed-fields"],
            WAIT,
            |_| true,
        );
        assert!(
            o["metadata"]["managedFields"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["manager"] == "strait-controlplane"),
            "{o}"
        );
    }
    // The roots published in every namespace, and the webhook's caBundle.
    let roots = std::fs::read_to_string(east.state.join("cacerts/root-cert.pem")).unwrap();
    for ns in ["bookinfo", "demo", "default", "strait-system"] {
        let cm = api.wait_get(&["configmap", "strait-ca-root-cert", "-n", ns], WAIT, |v| {
            v["data"]["root-cert.pem"].is_string()
        });
        assert_eq!(
            pem_certs(cm["data"]["root-cert.pem"].as_str().unwrap()),
            pem_certs(&roots)
        );
    }
    let bundle = base64::engine::general_purpose::STANDARD.encode(roots.as_bytes());
    api.wait_get(
        &["mutatingwebhookconfiguration", "strait-sidecar-injector"],
        WAIT,
        |v| v["webhooks"][0]["clientConfig"]["caBundle"] == bundle.as_str(),
    );
    // Nothing was refused along the way.
    let log = east.log();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");

    // One rule less: ServiceEntries may be read but not written.
    apply_value(&api, &without_serviceentry_writes(role));
    until_can(&api, "patch", "serviceentries.networking.istio.io", false);
    assert!(can(&api, "watch", "serviceentries.networking.istio.io"));
    put(
        &west.config,
        "ratings.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("ratings", 9080, true),
            workload_yaml("ratings-v1", "ratings", "10.2.0.2", "net-west")
        ),
    );
    // The same pass applies the ServiceImport, and logs the 403 that
    // names the ServiceEntry, the resource and the account.
    api.wait_get(
        &[
            "serviceimports.multicluster.x-k8s.io",
            "ratings",
            "-n",
            "demo",
        ],
        WAIT,
        |_| true,
    );
    let line = until_logged(&east, "the ServiceEntry's 403", |l| {
        l.contains("import not applied")
            && l.contains("ServiceEntry demo/strait-ratings")
            && l.contains("403")
    })
    .await;
    assert!(
        line.contains("forbidden") && line.contains("\"serviceentries\"") && line.contains(ACCOUNT),
        "{line}"
    );
    assert!(
        absent(
            &api,
            "serviceentries.networking.istio.io",
            "demo",
            "strait-ratings"
        ),
        "a ServiceEntry the account may not write exists"
    );

    // The rule back: the retry (with backoff) applies it.
    apply_value(&api, role);
    api.wait_get(
        &[
            "serviceentries.networking.istio.io",
            "strait-ratings",
            "-n",
            "demo",
        ],
        WAIT,
        |_| true,
    );
    // And the rules let it prune: ratings unexported, its imports go.
    std::fs::remove_file(west.config.join("ratings.yaml")).unwrap();
    for (kind, name) in [
        ("serviceentries.networking.istio.io", "strait-ratings"),
        ("serviceimports.multicluster.x-k8s.io", "ratings"),
    ] {
        wait_gone(&api, kind, "demo", name, WAIT);
    }
    assert!(
        api.get(&[
            "serviceentries.networking.istio.io",
            "strait-echo",
            "-n",
            "demo"
        ])
        .is_some()
    );
}
