//! The Kubernetes config source and the write-back of imports against a
//! fake API server on loopback ([`support::fake_api`]) that serves recorded
//! API responses from `tests/testdata/kube/`. No cluster needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use serde_json::Value;
use strait_controlplane::kube::{
    KubeError, KubeOptions, apply_imports, watch_kube, watch_kube_with,
};
use strait_controlplane::source::Config;
use strait_model::ImportObjects;
use strait_model::objects::{
    MANAGED_BY, MANAGED_BY_LABEL, ObjectMeta, ServiceEntry, ServiceEntrySpec, ServiceImport,
    ServiceImportPort, ServiceImportSpec, ServiceImportType, WorkloadEntry, WorkloadEntrySpec,
};
use support::fake_api::{Fake, Seen, query_param};
use tokio::sync::watch;

fn testdata(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata/kube")
        .join(sub)
}

fn client(url: &str) -> kube::Client {
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

fn keys(config: &Config) -> BTreeSet<String> {
    config.objects.keys().map(|k| k.to_string()).collect()
}

fn opts() -> KubeOptions {
    KubeOptions {
        cluster: "east".into(),
        network: "net-east".into(),
    }
}

/// Waits (up to 10 s) for a config that satisfies `done`.
async fn config_where(
    rx: &mut watch::Receiver<Arc<Config>>,
    done: impl Fn(&Config) -> bool,
) -> Arc<Config> {
    let found = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| done(c)))
        .await
        .expect("the expected config within 10 s")
        .expect("the config source alive");
    found.clone()
}

#[tokio::test]
async fn the_config_follows_the_recorded_cluster() {
    let (fake, url) = Fake::start(testdata(""));
    let mut rx = watch_kube(client(&url), opts())
        .await
        .expect("initial sync");
    let config = rx.borrow_and_update().clone();

    let want: BTreeSet<String> = [
        "Namespace bookinfo",
        "Namespace kube-system",
        "Service bookinfo/details",
        "Service bookinfo/productpage",
        "Service bookinfo/reviews",
        // Pods that are workloads; not productpage (its endpoint is not
        // ready), ratings (Pending), kube-proxy (host network).
        "WorkloadEntry bookinfo/details-v1-5498c86cf5-x4k2p",
        "WorkloadEntry bookinfo/reviews-v1-7b6d9c8f4-m2q9z",
        "WorkloadEntry bookinfo/reviews-v2-6c5bf657cf-h7d8w",
        // Istio and MCS objects; Sidecar's CRD is missing (404), which
        // stops nothing.
        "WorkloadEntry bookinfo/ratings-vm",
        "ServiceEntry bookinfo/external-api",
        "VirtualService bookinfo/reviews",
        "DestinationRule bookinfo/reviews",
        "PeerAuthentication bookinfo/default",
        "AuthorizationPolicy bookinfo/reviews-viewer",
        "ServiceExport bookinfo/reviews",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(keys(&config), want);

    // A pod's entry: its IP, labels, service account, network, and the
    // locality of its node.
    let we = config
        .objects
        .values()
        .find(|o| o.file == Path::new("kube://Pod/bookinfo/reviews-v1-7b6d9c8f4-m2q9z"))
        .expect("the reviews-v1 pod as a WorkloadEntry");
    assert_eq!(we.value["spec"]["address"], "10.244.2.11");
    assert_eq!(we.value["spec"]["labels"]["version"], "v1");
    assert_eq!(we.value["spec"]["serviceAccount"], "bookinfo-reviews");
    assert_eq!(we.value["spec"]["network"], "net-east");
    assert_eq!(we.value["spec"]["locality"], "eu-west1/eu-west1-c");

    // Objects come with their type, without bookkeeping fields.
    let svc = config
        .objects
        .values()
        .find(|o| o.file == Path::new("kube://Service/bookinfo/reviews"))
        .unwrap();
    assert_eq!(svc.value["apiVersion"], "v1");
    assert_eq!(svc.value["kind"], "Service");
    assert_eq!(svc.value["spec"]["ports"][0]["port"], 9081);
    assert!(svc.value["metadata"].get("managedFields").is_none());

    // The invalid DestinationRule is rejected by name; the rest applies.
    let rejections: Vec<String> = config.rejections.iter().map(|r| r.to_string()).collect();
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert!(
        rejections[0].starts_with(
            "kube://DestinationRule/bookinfo/Reviews_Canary: DestinationRule bookinfo/Reviews_Canary: invalid: metadata.name"
        ),
        "{rejections:?}"
    );

    // Pod events: ratings-v2 is added (Pending), then Running and ready;
    // details-v1 is deleted.
    fake.release_watches();
    let next = config_where(&mut rx, |c| {
        let k = keys(c);
        k.contains("WorkloadEntry bookinfo/ratings-v2-58f4d9b7c6-z9w8x")
            && !k.contains("WorkloadEntry bookinfo/details-v1-5498c86cf5-x4k2p")
    })
    .await;
    let ratings = next
        .objects
        .values()
        .find(|o| o.file == Path::new("kube://Pod/bookinfo/ratings-v2-58f4d9b7c6-z9w8x"))
        .unwrap();
    assert_eq!(ratings.value["spec"]["address"], "10.244.2.14");
    assert_eq!(ratings.value["spec"]["locality"], "eu-west1/eu-west1-c");
    let mut expected = want.clone();
    expected.remove("WorkloadEntry bookinfo/details-v1-5498c86cf5-x4k2p");
    expected.insert("WorkloadEntry bookinfo/ratings-v2-58f4d9b7c6-z9w8x".into());
    assert_eq!(keys(&next), expected);

    // What the watchers asked: paginated lists, then watches from the
    // list's resourceVersion with bookmarks.
    let seen = fake.seen();
    let pod_list = seen
        .iter()
        .find(|s| s.path == "/api/v1/pods" && query_param(&s.query, "watch").is_none())
        .expect("a pod list");
    assert_eq!(query_param(&pod_list.query, "limit"), Some("500"));
    let pod_watch = seen
        .iter()
        .find(|s| s.path == "/api/v1/pods" && query_param(&s.query, "watch") == Some("true"))
        .expect("a pod watch");
    assert_eq!(
        query_param(&pod_watch.query, "resourceVersion"),
        Some("1000")
    );
    assert_eq!(
        query_param(&pod_watch.query, "allowWatchBookmarks"),
        Some("true")
    );
    assert!(
        seen.iter()
            .any(|s| s.path == "/apis/networking.istio.io/v1/sidecars"),
        "the missing CRD was asked for"
    );
}

#[tokio::test]
async fn a_core_resource_that_cannot_be_listed_fails_the_initial_sync_by_name() {
    // The apply recordings have no Pod (or Service, ...) lists: 404s for
    // resources that are not optional.
    let (_fake, url) = Fake::start(testdata("apply"));
    let err = watch_kube_with(client(&url), opts(), Duration::from_secs(2))
        .await
        .expect_err("no initial sync");
    let KubeError::InitialSync { pending, .. } = &err else {
        panic!("{err}");
    };
    assert!(
        pending
            .iter()
            .any(|p| p.starts_with("v1 Pod (") && p.contains("404")),
        "{pending:?}"
    );
    assert!(
        !pending.iter().any(|p| p.contains("Sidecar")),
        "a missing CRD is not pending: {pending:?}"
    );
    assert!(err.to_string().contains("v1 Pod"), "{err}");
}

fn managed_meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: "bookinfo".into(),
        labels: [(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn imports_are_applied_server_side_and_stale_ones_deleted() {
    let (fake, url) = Fake::start(testdata("apply"));
    let objects = ImportObjects {
        service_entries: vec![ServiceEntry::new(
            managed_meta("reviews-clusterset"),
            ServiceEntrySpec {
                hosts: vec!["reviews.bookinfo.svc.clusterset.local".into()],
                addresses: vec![],
                ports: vec![],
                location: None,
                resolution: None,
                endpoints: vec![],
                export_to: vec![],
                subject_alt_names: vec![],
            },
        )],
        workload_entries: vec![WorkloadEntry::new(
            managed_meta("reviews-west-0"),
            WorkloadEntrySpec {
                address: "172.19.0.10".into(),
                network: Some("net-west".into()),
                ..Default::default()
            },
        )],
        service_imports: vec![ServiceImport::new(
            managed_meta("reviews"),
            ServiceImportSpec {
                type_: ServiceImportType::ClusterSetIP,
                ports: vec![ServiceImportPort {
                    name: Some("http".into()),
                    port: 9080,
                    protocol: Some("TCP".into()),
                    app_protocol: None,
                }],
                ips: vec![],
            },
            None,
        )],
        warnings: vec![],
    };
    let report = apply_imports(client(&url), "strait-controlplane", &objects)
        .await
        .expect("a report");
    assert_eq!(
        report.applied,
        vec![
            "ServiceEntry bookinfo/reviews-clusterset",
            "WorkloadEntry bookinfo/reviews-west-0"
        ]
    );
    // The ServiceImport CRD is not installed: not served, not a failure
    // to retry.
    assert_eq!(report.not_served, vec!["ServiceImport bookinfo/reviews"]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(report.is_complete());
    // Only the managed object no longer imported is deleted, not the
    // unlabelled one.
    assert_eq!(
        report.deleted,
        vec!["ServiceEntry bookinfo/ratings-clusterset"]
    );

    let seen = fake.seen();
    let patches: Vec<&Seen> = seen.iter().filter(|s| s.method == Method::PATCH).collect();
    assert_eq!(patches.len(), 3);
    let se = patches[0];
    assert_eq!(
        se.path,
        "/apis/networking.istio.io/v1/namespaces/bookinfo/serviceentries/reviews-clusterset"
    );
    assert_eq!(se.content_type, "application/apply-patch+yaml");
    assert_eq!(
        query_param(&se.query, "fieldManager"),
        Some("strait-controlplane")
    );
    assert_eq!(query_param(&se.query, "force"), Some("true"));
    let body: Value = serde_json::from_str(&se.body).unwrap();
    assert_eq!(body["kind"], "ServiceEntry");
    assert_eq!(body["metadata"]["labels"][MANAGED_BY_LABEL], "strait");
    assert_eq!(
        patches[2].path,
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/bookinfo/serviceimports/reviews"
    );

    let lists: Vec<&Seen> = seen.iter().filter(|s| s.method == Method::GET).collect();
    assert!(!lists.is_empty());
    for l in &lists {
        assert_eq!(
            query_param(&l.query, "labelSelector"),
            Some("app.kubernetes.io%2Fmanaged-by%3Dstrait"),
            "{l:?}"
        );
    }
    let deletes: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == Method::DELETE)
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(
        deletes,
        vec!["/apis/networking.istio.io/v1/namespaces/bookinfo/serviceentries/ratings-clusterset"]
    );
}

fn csr_for(uri: &str) -> String {
    use strait_ca::authority::{KeyAlgorithm, generate_key, leaf_csr};
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    leaf_csr(&strait_ca::SpiffeId::parse(uri).unwrap(), &[], &key).unwrap()
}

/// Asks the CA for a certificate for `uri` with `authorization: Bearer
/// <token>` (no client certificate).
async fn ask(
    ca: &strait_controlplane::ca::WorkloadCa,
    uri: &str,
    token: &str,
) -> Result<Vec<String>, tonic::Status> {
    use strait_proto::istio::v1::auth::IstioCertificateRequest;
    use strait_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr_for(uri),
        validity_duration: 3600,
        metadata: None,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    ca.create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

#[tokio::test]
async fn service_account_tokens_are_checked_with_a_token_review() {
    use strait_controlplane::ca::{TtlPolicy, WorkloadCa};
    let (fake, url) = Fake::start(testdata(""));
    let pki = strait_ca::testing::TestPki::new("cluster.local");
    let ca = WorkloadCa::new(
        strait_ca::testing::intermediate_of(&pki.root, "east", time::OffsetDateTime::now_utc()),
        strait_ca::tls::Trust::new(pki.bundle()),
        None,
        TtlPolicy::default(),
        &mut prometheus_client::registry::Registry::default(),
    )
    .unwrap()
    .with_token_review(strait_controlplane::ca::TokenReviewers::new(
        "east",
        client(&url),
    ));
    let reviews = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";

    // The account the API server names gets its certificate.
    let chain = ask(&ca, reviews, "reviews-token").await.unwrap();
    let leaf = strait_ca::pemfile::parse_single(chain[0].as_bytes(), "CERTIFICATE").unwrap();
    let cert = strait_ca::cert::CertSummary::from_der(&leaf).unwrap();
    assert_eq!(cert.spiffe_id.as_deref(), Some(reviews));

    // The review asked for Istio's audience, with the token as sent.
    let review = fake
        .seen()
        .into_iter()
        .find(|s| s.method == Method::POST)
        .expect("a TokenReview");
    assert_eq!(review.path, "/apis/authentication.k8s.io/v1/tokenreviews");
    let body: Value = serde_json::from_str(&review.body).unwrap();
    assert_eq!(body["spec"]["token"], "reviews-token");
    assert_eq!(body["spec"]["audiences"], serde_json::json!(["istio-ca"]));

    // Another identity with the same token, an unknown token, and a user
    // that is not a service account: refused, naming why.
    let other = ask(
        &ca,
        "spiffe://cluster.local/ns/bookinfo/sa/admin",
        "reviews-token",
    )
    .await
    .unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    assert!(
        other.message().contains("bookinfo-reviews"),
        "{}",
        other.message()
    );
    let unknown = ask(&ca, reviews, "forged").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unauthenticated);
    assert!(
        unknown.message().contains("invalid bearer token"),
        "{}",
        unknown.message()
    );
    let node = ask(&ca, reviews, "node-token").await.unwrap_err();
    assert!(
        node.message().contains("system:node:worker-1"),
        "{}",
        node.message()
    );

    // A strait token still goes to the token issuer (none here).
    let swt = ask(&ca, reviews, "swt1.abc.def").await.unwrap_err();
    assert!(
        swt.message().contains("accepts no workload tokens"),
        "{}",
        swt.message()
    );

    // No API server: unavailable, not a silent refusal.
    let down = WorkloadCa::new(
        strait_ca::testing::intermediate_of(&pki.root, "east", time::OffsetDateTime::now_utc()),
        strait_ca::tls::Trust::new(pki.bundle()),
        None,
        TtlPolicy::default(),
        &mut prometheus_client::registry::Registry::default(),
    )
    .unwrap()
    .with_token_review(strait_controlplane::ca::TokenReviewers::new(
        "east",
        client("http://127.0.0.1:9"),
    ));
    let err = ask(&down, reviews, "reviews-token").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

/// The mesh roots go to every namespace but kube-system, again when the
/// trust changes, and again at every resync (a ConfigMap someone deleted
/// comes back).
#[tokio::test]
async fn the_roots_config_map_follows_the_trust_and_is_resynced() {
    let (fake, url) = Fake::start(testdata(""));
    let mut config = strait_controlplane::kube::watch_kube(client(&url), opts())
        .await
        .unwrap();
    config_where(&mut config, |c| {
        c.objects.keys().any(|k| k.kind == "Namespace")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("root-cert.pem");
    let pem =
        |body: &str| format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n");
    std::fs::write(&roots, pem("T0xE")).unwrap();
    let (trust_changed, changed) = watch::channel(0u32);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    strait_controlplane::kube::roots::spawn_publisher(
        strait_controlplane::kube::roots::Publisher {
            client: client(&url),
            field_manager: "strait-controlplane".into(),
            roots_file: roots.clone(),
            resync: Duration::from_millis(300),
            webhook: Some("strait-sidecar-injector".into()),
        },
        config,
        changed,
        async {
            let _ = stop_rx.await;
        },
    );
    const PATH: &str = "/api/v1/namespaces/bookinfo/configmaps/strait-ca-root-cert";
    let patches = |with: &str| {
        fake.seen()
            .into_iter()
            .filter(|r: &Seen| r.method == Method::PATCH && r.path == PATH && r.body.contains(with))
            .count()
    };
    until("the roots applied in bookinfo", || patches("T0xE") >= 1).await;
    // Applied again at the resync, unchanged.
    until("the roots applied again at the resync", &|| {
        patches("T0xE") >= 2
    })
    .await;
    // A rotation: the file changes and the trust ticks.
    std::fs::write(&roots, pem("TkVX")).unwrap();
    trust_changed.send_replace(1);
    until("the new roots applied", || patches("TkVX") >= 1).await;
    // The injection webhook's caBundle follows the roots (base64 in JSON).
    use base64::Engine;
    let bundle = |body: &str| base64::engine::general_purpose::STANDARD.encode(pem(body));
    let webhook = |with: &str| {
        fake.seen().into_iter().any(|r: Seen| {
            r.method == Method::PATCH
                && r.path == "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/strait-sidecar-injector"
                && r.body.contains(with)
                && r.body.contains("/inject")
        })
    };
    until("the webhook's caBundle set", || webhook(&bundle("T0xE"))).await;
    until("the webhook's caBundle updated", || {
        webhook(&bundle("TkVX"))
    })
    .await;
    assert!(
        !fake
            .seen()
            .iter()
            .any(|r| r.path.contains("/namespaces/kube-system/configmaps")),
        "kube-system is left alone"
    );
    let _ = stop_tx.send(());
}

/// Polls `check` until it holds (up to 10 s), else fails naming `what`.
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
