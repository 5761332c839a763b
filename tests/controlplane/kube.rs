//! Kubernetes mode against recorded API responses: config from the API,
//! imports applied to it, and a primary serving a remote cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{Broker, Scratch};
use strait_proto::strait::mesh::v1 as pb;
use strait_proxy_client::identity::{self as ca, Credential, Identity};

use crate::fake_api;
use crate::support::*;

/// A kubeconfig for the API server at `url` (no credentials).
fn kubeconfig(s: &Scratch, name: &str, url: &str) -> PathBuf {
    s.write(
        name,
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{url}\"}}\n\
contexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n\
users:\n- name: fake\n  user: {{}}\n"
        ),
    )
}

/// Starts the recorded API server of `controlplane/tests/testdata/<api>`
/// and east's control plane in Kubernetes mode against it, with `extra`
/// arguments.
fn start_on_recorded_api(
    s: &Scratch,
    broker: &Broker,
    api: &str,
    extra: &[String],
) -> (std::sync::Arc<fake_api::Fake>, ControlPlane) {
    let recorded = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("controlplane/tests/testdata")
        .join(api);
    let (fake, url) = fake_api::Fake::start(recorded);
    let kube = kubeconfig(s, &format!("{api}.kubeconfig"), &url);
    let east = ControlPlane::start_with(
        s,
        broker,
        "east",
        "net-east",
        "192.0.2.10:15443",
        Some(&kube),
        extra,
    );
    (fake, east)
}

/// Requests the certificate of `bookinfo/<account>` from `cp` with the
/// recorded API's `reviews-token` (a token of `bookinfo-reviews`).
async fn with_reviews_token(cp: &ControlPlane, account: &str) -> Result<Identity, String> {
    let td = cp.trust_domain();
    let id = strait_ca::SpiffeId::workload(&td, "bookinfo", account).unwrap();
    let tls = ca::mesh_client_tls(cp.trust(), ca::control_plane_id(&td));
    ca::request_certificate(
        &cp.listen,
        &tls,
        &cp.trust(),
        &id,
        Credential::Token("reviews-token"),
        None,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Waits for the first request to `api` that `wanted` picks.
async fn until_sent(
    api: &fake_api::Fake,
    what: &str,
    cp: &ControlPlane,
    wanted: impl Fn(&fake_api::Seen) -> bool,
) -> fake_api::Seen {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = api.seen().into_iter().find(&wanted) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}:\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PATCH that publishes the roots ConfigMap in `namespace`.
fn roots_published(namespace: &str) -> impl Fn(&fake_api::Seen) -> bool {
    let path = format!("/api/v1/namespaces/{namespace}/configmaps/strait-ca-root-cert");
    move |r| r.method == hyper::Method::PATCH && r.path == path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_reads_the_api_applies_imports_and_reviews_tokens() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    // The recorded bookinfo cluster; `reviews` has a ServiceExport.
    let (fake, east) = start_on_recorded_api(&s, &broker, "kube", &[]);
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

    // A pod's proxy bootstraps with its service-account token, reviewed by
    // the API server, and gets that account's identity.
    let identity = with_reviews_token(&east, "bookinfo-reviews").await.unwrap();
    assert_eq!(
        identity.spiffe_id.as_str(),
        format!("spiffe://{TD}/ns/bookinfo/sa/bookinfo-reviews")
    );
    let refused = with_reviews_token(&east, "admin").await.unwrap_err();
    assert!(
        refused.to_string().contains("bookinfo-reviews"),
        "{refused}"
    );

    // Discovery serves the API's services with the pods as endpoints.
    let proxy = east.subscribe(&identity, "reviews-v1");
    let mut res = proxy.resources();
    let reviews = until(&mut res, "reviews with its pods", &east, |r| {
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
    // Its cluster IP, as the API recorded it: what a redirected app's
    // connection is routed by.
    assert_eq!(reviews.addresses, ["10.96.0.81"]);

    // West's export is applied to the API (server-side apply, labelled as
    // strait's), and east's ServiceExport reaches west.
    let applied = until_sent(&fake, "west's echo applied to the API", &east, |r| {
        r.method == hyper::Method::PATCH
            && r.path.contains("/namespaces/demo/serviceentries/")
            && r.body.contains("192.0.2.20")
    })
    .await;
    assert_eq!(applied.content_type, "application/apply-patch+yaml");
    assert!(
        applied.query.contains("fieldManager=strait-controlplane"),
        "{applied:?}"
    );
    // It carries a ClusterSet IP, and the ServiceImport sent for it (this
    // API serves no MCS CRDs, so it is refused) the same one.
    let at = applied
        .body
        .find("240.241.")
        .unwrap_or_else(|| panic!("no ClusterSet IP: {}", applied.body));
    let vip: String = applied.body[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    assert!(vip.parse::<std::net::Ipv4Addr>().is_ok(), "{vip}");
    assert!(
        fake.seen().iter().any(|r| r.method == hyper::Method::PATCH
            && r.path.contains("/namespaces/demo/serviceimports/")
            && r.body.contains(&vip)),
        "no ServiceImport with {vip} sent"
    );
    // The mesh roots are published in every namespace but the cluster's
    // own machinery, as istiod publishes istio-ca-root-cert.
    let roots = std::fs::read_to_string(east.state.join("cacerts/root-cert.pem")).unwrap();
    let root_line = roots.lines().nth(1).unwrap().to_string();
    let published = until_sent(
        &fake,
        "the roots published in bookinfo",
        &east,
        roots_published("bookinfo"),
    )
    .await;
    assert_eq!(published.content_type, "application/apply-patch+yaml");
    assert!(published.body.contains(&root_line), "{}", published.body);
    assert!(
        published.body.contains("root-cert.pem"),
        "{}",
        published.body
    );
    assert!(
        !fake
            .seen()
            .iter()
            .any(|r| r.path.contains("/namespaces/kube-system/configmaps")),
        "kube-system is left alone"
    );
    until_imported(&west, &east, "east's reviews imported by west", |t| {
        t.contains("reviews") && t.contains("192.0.2.10")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_primary_serves_a_remote_cluster_from_its_api() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/tests/testdata");
    let (remote_api, remote_url) = fake_api::Fake::start(testdata.join("kube-remote"));
    let remote_kube = kubeconfig(&s, "remote.kubeconfig", &remote_url);
    let (_primary_api, east) = start_on_recorded_api(
        &s,
        &broker,
        "kube",
        &[
            "--remote".to_string(),
            format!("remote={}", remote_kube.display()),
        ],
    );
    let identity = with_reviews_token(&east, "bookinfo-reviews").await.unwrap();

    // The remote cluster's namespaces get the mesh roots too: its pods'
    // sidecars verify this control plane with them.
    let roots = std::fs::read_to_string(east.state.join("cacerts/root-cert.pem")).unwrap();
    let root_line = roots.lines().nth(1).unwrap().to_string();
    let in_bookinfo = roots_published("bookinfo");
    until_sent(
        &remote_api,
        "the roots published in the remote's bookinfo",
        &east,
        |r| in_bookinfo(r) && r.body.contains(&root_line),
    )
    .await;

    // A proxy of the remote cluster: the remote's pod is local (its
    // network from the remote's strait-system Namespace), east's exported
    // reviews is behind east's gateway.
    let remote_proxy = east.subscribe_as(&identity, "reviews-r", "remote");
    let mut res = remote_proxy.resources();
    let (ratings, reviews) = until(&mut res, "the remote's view", &east, |r| {
        let svcs = services(r);
        let ratings = svcs.get("ratings.bookinfo.svc.cluster.local")?.clone();
        let reviews = svcs.get("reviews.bookinfo.svc.cluster.local")?.clone();
        (!ratings.endpoints.is_empty() && !reviews.endpoints.is_empty())
            .then_some((ratings, reviews))
    })
    .await;
    let eps = |svc: &pb::Service| -> Vec<(i32, String, String)> {
        svc.endpoints
            .iter()
            .map(|e| (e.kind, e.address.clone(), e.network.clone()))
            .collect()
    };
    assert_eq!(
        eps(&ratings),
        [(
            pb::endpoint::Kind::Sidecar as i32,
            "10.20.0.5".to_string(),
            "net-remote".to_string()
        )]
    );
    assert!(
        eps(&reviews)
            .iter()
            .all(|(k, a, n)| *k == pb::endpoint::Kind::Gateway as i32
                && a == "192.0.2.10"
                && n == "net-east"),
        "{:?}",
        eps(&reviews)
    );

    // East's own proxies see the remote's exported ratings behind the
    // remote's gateway (from its LoadBalancer Service).
    let east_proxy = east.subscribe(&identity, "reviews-v1");
    let mut res = east_proxy.resources();
    let ratings = until(
        &mut res,
        "ratings behind the remote's gateway",
        &east,
        |r| {
            let svc = services(r).remove("ratings.bookinfo.svc.cluster.local")?;
            svc.endpoints
                .iter()
                .any(|e| e.address == "192.0.2.30" && e.network == "net-remote")
                .then_some(svc)
        },
    )
    .await;
    assert!(
        ratings
            .endpoints
            .iter()
            .any(|e| e.kind == pb::endpoint::Kind::Gateway as i32 && e.port == 15443),
        "{:?}",
        ratings.endpoints
    );

    // A proxy naming a cluster this control plane does not serve is
    // refused by name.
    let stranger = east.subscribe_as(&identity, "reviews-x", "elsewhere");
    let mut state = stranger.state();
    let refused = until_state(&mut state, "a refusal", |s| s.last_error.is_some()).await;
    let error = refused.last_error.unwrap();
    assert!(
        error.contains("elsewhere") && error.contains("remote"),
        "{error}"
    );
}

/// The injection webhook as the API server meets it: HTTPS to
/// controlplane.strait-system.svc with the mesh roots as the caBundle, an
/// AdmissionReview in, the review back with a JSON Patch whose sidecar
/// runs with arguments the real `strait-sidecar` parser accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injection_webhook_answers_the_api_server() {
    use base64::Engine;
    use clap::Parser;
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let port = crate::common::free_port();
    let (_fake, east) = start_on_recorded_api(
        &s,
        &broker,
        "kube",
        &[
            "--inject-listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--inject-image".to_string(),
            "registry.example/strait:1".to_string(),
        ],
    );
    let review = |object: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "b7b4ea5c-0001",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "namespace": "bookinfo",
                "object": object,
            },
        })
        .to_string()
    };
    let post = |body: &str| {
        s.write("review.json", body);
        s.run(
            "curl",
            &[
                "-sS",
                "-w",
                "\n%{http_code}",
                "--cacert",
                east.state.join("cacerts/root-cert.pem").to_str().unwrap(),
                "--resolve",
                &format!("controlplane.strait-system.svc:{port}:127.0.0.1"),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@review.json",
                &format!("https://controlplane.strait-system.svc:{port}/inject"),
            ],
        )
    };
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "reviews-v1-", "namespace": "bookinfo"},
        "spec": {
            "serviceAccountName": "bookinfo-reviews",
            "containers": [{"name": "reviews", "image": "reviews", "ports": [{"containerPort": 9080}]}],
        },
    });
    let run = post(&review(pod));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (body, status) = run.stdout.rsplit_once('\n').unwrap();
    assert_eq!(status, "200", "{body}");
    let answer: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(answer["response"]["uid"], "b7b4ea5c-0001");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let ops: Vec<serde_json::Value> = serde_json::from_slice(&patch).unwrap();
    let sidecar = &ops
        .iter()
        .find(|o| o["path"] == "/spec/containers/-")
        .expect("the sidecar is added")["value"];
    assert_eq!(sidecar["image"], "registry.example/strait:1");
    // Its arguments, with the pod's fields the kubelet fills in, parse
    // with the very parser of the binary it runs.
    let argv: Vec<String> = std::iter::once("strait-sidecar".to_string())
        .chain(sidecar["args"].as_array().unwrap().iter().map(|a| {
            a.as_str()
                .unwrap()
                .replace("$(POD_NAME)", "reviews-v1-x7k2p")
                .replace("$(POD_NAMESPACE)", "bookinfo")
                .replace("$(SERVICE_ACCOUNT)", "bookinfo-reviews")
        }))
        .collect();
    if let Err(e) = strait_sidecar::cli::SidecarCli::try_parse_from(&argv) {
        panic!("{argv:?}:\n{e}");
    }
    assert!(
        argv.contains(&"--app=127.0.0.1:9080".to_string()),
        "{argv:?}"
    );

    // A request that is no AdmissionReview is refused, and says why.
    let run = post("{\"kind\": \"Pod\"}");
    let (body, status) = run.stdout.rsplit_once('\n').unwrap();
    assert_eq!(status, "400", "{body}");
    assert!(body.contains("AdmissionReview"), "{body}");
    // Both counted.
    let metrics = crate::common::http_get(&east.metrics, "/metrics");
    for outcome in ["injected", "refused"] {
        assert!(
            metrics.contains(&format!(
                "strait_inject_reviews_total{{outcome=\"{outcome}\"}} 1"
            )),
            "{metrics}"
        );
    }
}
