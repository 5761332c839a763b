//! The Kubernetes config source and the write-back of imports against a
//! fake API server on loopback that serves recorded API responses from
//! `tests/testdata/kube/` (lists as the API server returns them, watch
//! events as newline-delimited JSON). No cluster needed.
//!
//! The fake server: `GET <path>` serves `<last path segment>.json`, or a
//! 404 `Status` when there is none (a CRD that is not installed). A watch
//! (`?watch=true`) from the list's `resourceVersion` serves
//! `<segment>.watch.jsonl` once the test releases it, then ends; every
//! other watch stays open without events, so the watcher idles
//! deterministically. `PATCH` echoes the body (404 when the kind has no
//! list file), `DELETE` answers with the object; every request is logged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use strait_controlplane::kube::{
    KubeError, KubeOptions, apply_imports, watch_kube, watch_kube_with,
};
use strait_controlplane::source::Config;
use strait_model::ImportObjects;
use strait_model::objects::{
    MANAGED_BY, MANAGED_BY_LABEL, ObjectMeta, ServiceEntry, ServiceEntrySpec, ServiceImport,
    ServiceImportPort, ServiceImportSpec, ServiceImportType, WorkloadEntry, WorkloadEntrySpec,
};
use tokio::sync::watch;

/// A response body: some chunks, then either the end or nothing ever
/// again (an open watch with no events).
struct TestBody {
    chunks: VecDeque<Bytes>,
    hold_open: bool,
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.pop_front() {
            Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
            // Never woken: the client drops the connection when done.
            None if self.hold_open => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}

/// One request the fake server received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: String,
}

struct Fake {
    dir: PathBuf,
    seen: Mutex<Vec<Seen>>,
    release_watch: watch::Sender<bool>,
}

fn testdata(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata/kube")
        .join(sub)
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn respond(status: StatusCode, chunks: Vec<Bytes>, hold_open: bool) -> Response<TestBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(TestBody {
            chunks: chunks.into(),
            hold_open,
        })
        .unwrap()
}

fn not_found(path: &str) -> Response<TestBody> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("the server could not find the requested resource (get {path})"),
        "reason": "NotFound", "details": {}, "code": 404});
    respond(
        StatusCode::NOT_FOUND,
        vec![Bytes::from(status.to_string())],
        false,
    )
}

impl Fake {
    fn start(dir: PathBuf) -> (Arc<Fake>, String) {
        let (release_watch, _) = watch::channel(false);
        let fake = Arc::new(Fake {
            dir,
            seen: Mutex::new(Vec::new()),
            release_watch,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let server = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let fake = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let fake = fake.clone();
                        async move { Ok::<_, Infallible>(fake.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (fake, url)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn release_watches(&self) {
        self.release_watch.send_replace(true);
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<TestBody> {
        use http_body_util_free::collect;
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = collect(req.into_body()).await;
        self.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type,
            body: body.clone(),
        });
        // `/apis/<g>/<v>/namespaces/<ns>/<plural>/<name>` or `.../<plural>`.
        let segments: Vec<&str> = path.split('/').collect();
        let plural = |at_end: bool| -> String {
            let i = if at_end {
                segments.len() - 1
            } else {
                segments.len() - 2
            };
            segments[i].to_string()
        };
        match method {
            Method::GET => {
                let name = plural(true);
                let Ok(list) = std::fs::read_to_string(self.dir.join(format!("{name}.json")))
                else {
                    return not_found(&path);
                };
                if query_param(&query, "watch") != Some("true") {
                    return respond(StatusCode::OK, vec![Bytes::from(list)], false);
                }
                let listed: Value = serde_json::from_str(&list).unwrap();
                let from = query_param(&query, "resourceVersion");
                let events = std::fs::read_to_string(self.dir.join(format!("{name}.watch.jsonl")));
                match events {
                    Ok(events) if from == listed["metadata"]["resourceVersion"].as_str() => {
                        let mut release = self.release_watch.subscribe();
                        release.wait_for(|r| *r).await.unwrap();
                        let chunks = events
                            .lines()
                            .map(|l| Bytes::from(format!("{l}\n")))
                            .collect();
                        respond(StatusCode::OK, chunks, false)
                    }
                    _ => respond(StatusCode::OK, Vec::new(), true),
                }
            }
            Method::PATCH => {
                if !self.dir.join(format!("{}.json", plural(false))).exists() {
                    return not_found(&path);
                }
                respond(StatusCode::OK, vec![Bytes::from(body)], false)
            }
            Method::DELETE => {
                let obj = json!({"metadata": {"name": plural(true)}});
                respond(StatusCode::OK, vec![Bytes::from(obj.to_string())], false)
            }
            _ => not_found(&path),
        }
    }
}

/// Collects a request body without `http-body-util` (not a dependency).
mod http_body_util_free {
    use std::future::poll_fn;
    use std::pin::Pin;

    use hyper::body::{Body, Incoming};

    pub async fn collect(mut body: Incoming) -> String {
        let mut out = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(data) = frame.unwrap().into_data() {
                out.extend_from_slice(&data);
            }
        }
        String::from_utf8(out).unwrap()
    }
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
            "kube://DestinationRule/bookinfo/Reviews_Canary: DestinationRule bookinfo/Reviews_Canary: metadata.name"
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
    // The ServiceImport CRD is not installed: a failure naming the object.
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert_eq!(report.failed[0].object, "ServiceImport bookinfo/reviews");
    assert!(report.failed[0].error.contains("404") || report.failed[0].error.contains("not find"));
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
