//! Kubernetes mode against a real API server under faults: the API server
//! restarted under a watching control plane, a watch answered 410 Gone
//! after etcd compacted its history, a remote cluster's API server down
//! (also when the control plane starts), and the injection webhook called
//! by the API server itself, then with the injector away.
//!
//! Every wait is bounded ([`WAIT`], or the API server's own readiness).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::apiserver::ApiServer;
use crate::common::{Broker, Scratch, http_status};
use strait_proto::strait::mesh::v1 as pb;
use strait_proxy_client::xds::Resources;

use crate::support::*;

/// A namespace `ns` with a ServiceAccount `sa` for the pods the tests make
/// (no controller manager runs: nobody else creates accounts).
fn namespace(ns: &str, sa: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n"
    )
}

/// Service `name` in `ns` (exported by annotation), its pods (no kubelet
/// runs: [`running`] sets their status as one would) and the EndpointSlice
/// the endpoint controller would write, one ready endpoint per address.
fn service(ns: &str, name: &str, sa: &str, addresses: &[&str]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
\x20 annotations: {{strait.io/export: \"true\"}}\n\
spec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 9080}}]\n"
    );
    let mut endpoints = String::new();
    for (i, ip) in addresses.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}-v{i}\n  namespace: {ns}\n\
\x20 labels: {{app: {name}}}\nspec:\n  serviceAccountName: {sa}\n  automountServiceAccountToken: false\n\
\x20 containers: [{{name: {name}, image: example.invalid/{name}:v1}}]\n"
        ));
        endpoints.push_str(&format!(
            "- addresses: [{ip}]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {name}-v{i}, namespace: {ns}}}\n"
        ));
    }
    out.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n\
\x20 labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
ports: [{{name: http, port: 9080, protocol: TCP}}]\nendpoints:\n{endpoints}"
    ));
    out
}

/// Sets pod `ns/name` Running and Ready at `ip`, as its kubelet would.
#[track_caller]
fn running(api: &ApiServer, ns: &str, name: &str, ip: &str) {
    let status = format!(
        r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#
    );
    let (code, _, err) = api.kubectl(&[
        "patch",
        "pod",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ]);
    assert_eq!(code, 0, "pod {ns}/{name} status: {err}");
}

/// The CRDs, namespaces `bookinfo` and `demo`, and `reviews` (exported)
/// with one running pod at 10.1.0.5: where most tests here start.
fn bookinfo_reviews(api: &ApiServer) {
    api.install_crds();
    api.apply(&namespace("bookinfo", "bookinfo-reviews"));
    api.apply(&namespace("demo", "echo"));
    serve(
        api,
        "bookinfo",
        "reviews",
        "bookinfo-reviews",
        &["10.1.0.5"],
    );
}

/// [`service`] applied, its pods running.
fn serve(api: &ApiServer, ns: &str, name: &str, sa: &str, addresses: &[&str]) {
    api.apply(&service(ns, name, sa, addresses));
    for (i, ip) in addresses.iter().enumerate() {
        running(api, ns, &format!("{name}-v{i}"), ip);
    }
}

/// The addresses of the endpoints of `name` (an FQDN) in `r`, sorted.
fn endpoints(r: &Resources, name: &str) -> Option<Vec<String>> {
    let svc = services(r).remove(name)?;
    let mut out: Vec<String> = svc.endpoints.iter().map(|e| e.address.clone()).collect();
    out.sort();
    Some(out)
}

/// Waits until `cp`'s log contains `needle`.
async fn until_logged(cp: &ControlPlane, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !cp.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in the control plane's log within {WAIT:?}:\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the ServiceEntries of `ns` in `api` name `needle`.
fn entry_names(needle: &str) -> impl Fn(&serde_json::Value) -> bool + '_ {
    move |v| {
        v["items"]
            .as_array()
            .is_some_and(|i| i.iter().any(|o| o.to_string().contains(needle)))
    }
}

const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";
const RATINGS: &str = "ratings.bookinfo.svc.cluster.local";

/// The API server restarts (same etcd, port and PKI) under a control plane
/// watching it: meanwhile discovery goes on from the last config (a new
/// proxy gets it, a certificate is issued); afterwards the watches resume
/// without a control plane restart: a Service exported after the restart
/// and an EndpointSlice change reach discovery and the importing cluster,
/// and an import that came while the API was away is applied to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_keeps_discovery_and_the_watches_resume() {
    let s = Scratch::new();
    let Some(mut api) = ApiServer::start(&s.path("kube")) else {
        return;
    };
    bookinfo_reviews(&api);

    let broker = Broker::start(&s.path("broker"), TD);
    let mut east = ControlPlane::east_on_kube(&s, &broker, &api.kubeconfig, &[]);
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    let identity = east
        .certificate("bookinfo", "bookinfo-reviews", "reviews-v0")
        .await;
    let proxy = east.subscribe(&identity, "reviews-v0");
    let mut res = proxy.resources();
    let mut state = proxy.state();
    until(&mut res, "reviews with its pod", &east, |r| {
        (endpoints(r, REVIEWS)? == ["10.1.0.5"]).then_some(())
    })
    .await;
    until_imported(&west, &east, "east's reviews at west", |t| {
        t.contains("reviews")
    })
    .await;
    let pid = east.child.as_ref().unwrap().id();

    api.stop();
    // The API is away: the control plane stays ready and serves what it
    // had, to the proxy it had and to a new one, and issues certificates.
    assert_eq!(http_status(&east.health, "/healthz/ready"), Some(200));
    let late = east
        .certificate("bookinfo", "bookinfo-reviews", "late")
        .await;
    let late = east.subscribe(&late, "late");
    let mut late_res = late.resources();
    until(
        &mut late_res,
        "reviews for a proxy new while the API is away",
        &east,
        |r| (endpoints(r, REVIEWS)? == ["10.1.0.5"]).then_some(()),
    )
    .await;
    assert!(state.borrow_and_update().connected);
    // West exports echo meanwhile: its import waits for east's API.
    put(
        &west.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", 8080, true),
            workload_yaml("echo-v2", "echo", "10.2.0.1", "net-west")
        ),
    );
    until_logged(&east, "watch failed").await;

    api.restart();
    // The import that came while the API was away is applied to it (the
    // write-back retries) and read back into discovery.
    let within = WAIT;
    api.wait_get(
        &["serviceentries.networking.istio.io", "-n", "demo"],
        within,
        entry_names("192.0.2.20"),
    );
    until(
        &mut res,
        "echo from west, through the restarted API",
        &east,
        |r| {
            services(r)
                .remove("echo.demo.svc.cluster.local")?
                .endpoints
                .iter()
                .any(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
                .then_some(())
        },
    )
    .await;
    // A Service exported after the restart, and an EndpointSlice change.
    api.apply(&namespace("bookinfo", "bookinfo-ratings"));
    serve(
        &api,
        "bookinfo",
        "ratings",
        "bookinfo-ratings",
        &["10.1.0.7"],
    );
    serve(
        &api,
        "bookinfo",
        "reviews",
        "bookinfo-reviews",
        &["10.1.0.5", "10.1.0.6"],
    );
    until(&mut res, "ratings, and reviews' second pod", &east, |r| {
        (endpoints(r, RATINGS)? == ["10.1.0.7"]
            && endpoints(r, REVIEWS)? == ["10.1.0.5", "10.1.0.6"])
        .then_some(())
    })
    .await;
    until_imported(&west, &east, "east's ratings at west", |t| {
        t.contains("ratings") && t.contains("192.0.2.10")
    })
    .await;
    // The same process throughout.
    let child = east.child.as_mut().unwrap();
    assert_eq!(child.id(), pid);
    assert!(child.try_wait().unwrap().is_none(), "{}", east.log());
}

/// A watch answered 410 Gone: the control plane is away (SIGSTOP) while
/// the API server restarts without a watch cache, Services change and
/// etcd compacts its history past every resource version the control
/// plane holds. Its watches resume from those versions, the API server
/// answers "too old resource version" (410 Expired), and the control plane
/// relists: the Service created meanwhile appears and the one deleted
/// meanwhile (a deletion no watch can deliver any more) goes, with no
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_answered_410_gone_relists_and_converges() {
    let s = Scratch::new();
    // Without the watch cache every watch is etcd's own, so a compacted
    // revision is answered 410 whatever the cache would have kept.
    let Some(mut api) = ApiServer::start_with(&s.path("kube"), &["--watch-cache=false"]) else {
        return;
    };
    api.apply(&namespace("bookinfo", "bookinfo-reviews"));
    serve(
        &api,
        "bookinfo",
        "reviews",
        "bookinfo-reviews",
        &["10.1.0.5"],
    );
    serve(
        &api,
        "bookinfo",
        "ratings",
        "bookinfo-reviews",
        &["10.1.0.7"],
    );
    let broker = Broker::start(&s.path("broker"), TD);
    let east = ControlPlane::east_on_kube(&s, &broker, &api.kubeconfig, &[]);
    let identity = east
        .certificate("bookinfo", "bookinfo-reviews", "reviews-v0")
        .await;
    let proxy = east.subscribe(&identity, "reviews-v0");
    let mut res = proxy.resources();
    until(&mut res, "reviews and ratings", &east, |r| {
        (endpoints(r, REVIEWS)?.len() == 1 && endpoints(r, RATINGS)?.len() == 1).then_some(())
    })
    .await;
    assert!(!east.log().contains("too old"), "{}", east.log());

    let pid = east.child.as_ref().unwrap().id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let resumed = scopeguard(|| {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status();
    });
    api.stop();
    api.restart();
    serve(
        &api,
        "bookinfo",
        "details",
        "bookinfo-reviews",
        &["10.1.0.9"],
    );
    let (code, _, err) = api.kubectl(&["delete", "service", "ratings", "-n", "bookinfo"]);
    assert_eq!(code, 0, "{err}");
    let compacted = api.compact();
    assert!(compacted > 0);
    drop(resumed);

    until(
        &mut res,
        "details in, ratings out, after the relist",
        &east,
        |r| {
            let svcs = services(r);
            (svcs.contains_key("details.bookinfo.svc.cluster.local") && !svcs.contains_key(RATINGS))
                .then_some(())
        },
    )
    .await;
    let log = east.log();
    assert!(
        log.contains("too old") && log.contains("Expired"),
        "the watches were answered 410 Gone:\n{log}"
    );
    assert!(
        http_status(&east.health, "/healthz/ready") == Some(200),
        "{log}"
    );
    // Watching again after the relist: a later change arrives.
    let (code, _, err) = api.kubectl(&["delete", "service", "details", "-n", "bookinfo"]);
    assert_eq!(code, 0, "{err}");
    until(&mut res, "details gone", &east, |r| {
        (!services(r).contains_key("details.bookinfo.svc.cluster.local")).then_some(())
    })
    .await;
}

/// Runs `f` when dropped (a SIGCONT that must happen even when an
/// assertion fails while the control plane is stopped).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The remote cluster's own objects: its network, and ratings with a pod.
pub(crate) fn remote_objects(api: &ApiServer) {
    api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: strait-system\n  labels: {topology.istio.io/network: net-remote}\n",
    );
    api.apply(&namespace("bookinfo", "bookinfo-ratings"));
    serve(
        api,
        "bookinfo",
        "ratings",
        "bookinfo-ratings",
        &["10.20.0.5"],
    );
}

/// Both API servers at once (each takes seconds to start).
pub(crate) fn two_api_servers(s: &Scratch) -> Option<(ApiServer, ApiServer)> {
    let (own, remote) = std::thread::scope(|scope| {
        let own = scope.spawn(|| ApiServer::start(&s.path("kube-east")));
        let remote = scope.spawn(|| ApiServer::start(&s.path("kube-remote")));
        (own.join().unwrap(), remote.join().unwrap())
    });
    Some((own?, remote?))
}

/// East in Kubernetes mode on `api`, also serving cluster `remote` read
/// from the `remote` API server.
pub(crate) fn east_serving_remote(
    s: &Scratch,
    broker: &Broker,
    api: &ApiServer,
    remote: &ApiServer,
) -> ControlPlane {
    ControlPlane::east_on_kube(
        s,
        broker,
        &api.kubeconfig,
        &[
            "--remote".to_string(),
            format!("remote={}", remote.kubeconfig.display()),
        ],
    )
}

/// Primary-remote in Kubernetes mode with the remote's API server down:
/// the primary starts anyway (istiod refuses to, istio#33564) and serves
/// and imports for its own cluster; the remote is served once its API is
/// back, keeps its last config while it is away again, and is followed
/// again after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_clusters_api_server_down_leaves_the_primary_serving() {
    let s = Scratch::new();
    let Some((api, mut remote)) = two_api_servers(&s) else {
        return;
    };
    bookinfo_reviews(&api);
    remote_objects(&remote);
    remote.stop();

    let broker = Broker::start(&s.path("broker"), TD);
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    let east = east_serving_remote(&s, &broker, &api, &remote);
    // Started (ready) with the remote away: its own cluster is served and
    // imports.
    let identity = east
        .certificate("bookinfo", "bookinfo-reviews", "reviews-v0")
        .await;
    let own = east.subscribe(&identity, "reviews-v0");
    let mut own_res = own.resources();
    until(&mut own_res, "east's reviews", &east, |r| {
        (endpoints(r, REVIEWS)? == ["10.1.0.5"]).then_some(())
    })
    .await;
    let exported = |name: &str| {
        format!(
            "{}---\n{}",
            service_yaml(name, 8080, true),
            workload_yaml(&format!("{name}-v2"), name, "10.2.0.1", "net-west")
        )
    };
    put(&west.config, "echo.yaml", &exported("echo"));
    let gateway_of = |name: &'static str| {
        move |r: &Resources| {
            services(r)
                .remove(&format!("{name}.demo.svc.cluster.local"))?
                .endpoints
                .iter()
                .any(|e| e.address == "192.0.2.20")
                .then_some(())
        }
    };
    until(
        &mut own_res,
        "west's echo imported",
        &east,
        gateway_of("echo"),
    )
    .await;
    until_logged(&east, "remote cluster's Kubernetes API not read").await;
    // The remote's proxies get a view (east's exported reviews, behind
    // east's gateway) with nothing of the remote's own yet.
    let remote_proxy = east.subscribe_as(&identity, "ratings-r", "remote");
    let mut remote_res = remote_proxy.resources();
    until(
        &mut remote_res,
        "the remote's view, its API away",
        &east,
        |r| endpoints(r, REVIEWS).filter(|e| !e.is_empty()),
    )
    .await;
    assert!(
        !services(&remote_res.borrow_and_update()).contains_key(RATINGS),
        "nothing of the remote's while its API is away"
    );

    // The remote's API comes up: the remote is served (its pod local, on
    // its network).
    remote.restart();
    let ratings = until(&mut remote_res, "the remote's ratings", &east, |r| {
        services(r)
            .remove(RATINGS)
            .filter(|s| !s.endpoints.is_empty())
    })
    .await;
    let eps: Vec<(i32, &str, &str)> = ratings
        .endpoints
        .iter()
        .map(|e| (e.kind, e.address.as_str(), e.network.as_str()))
        .collect();
    assert_eq!(
        eps,
        [(
            pb::endpoint::Kind::Sidecar as i32,
            "10.20.0.5",
            "net-remote"
        )]
    );

    // Down again: the own cluster goes on importing; the remote keeps its
    // last config.
    remote.stop();
    put(&west.config, "echo2.yaml", &exported("echo2"));
    until(
        &mut own_res,
        "west's echo2 imported",
        &east,
        gateway_of("echo2"),
    )
    .await;
    api.wait_get(
        &["serviceentries.networking.istio.io", "-n", "demo"],
        WAIT,
        entry_names("echo2"),
    );
    assert!(services(&remote_res.borrow_and_update()).contains_key(RATINGS));

    // Back: a change made in the remote's API is followed.
    remote.restart();
    serve(
        &remote,
        "bookinfo",
        "details",
        "bookinfo-ratings",
        &["10.20.0.9"],
    );
    until(&mut remote_res, "the remote's details", &east, |r| {
        (endpoints(r, "details.bookinfo.svc.cluster.local")? == ["10.20.0.9"]).then_some(())
    })
    .await;
}

/// The one document of `kind` (and `name`) in the cluster manifest.
fn manifest_document(kind: &str, name: &str) -> String {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/multicluster/manifests/cluster.yaml"),
    )
    .unwrap();
    let found: Vec<&str> = manifest
        .split("\n---\n")
        .filter(|d| {
            d.lines().any(|l| l == format!("kind: {kind}"))
                && d.lines().any(|l| l == format!("  name: {name}"))
        })
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name} in cluster.yaml");
    found[0].to_string()
}

/// A pod of `ns` created through the API server (its admission, the
/// webhook among it), as stored.
#[track_caller]
fn create_pod(api: &ApiServer, ns: &str, name: &str, annotations: &str) -> serde_json::Value {
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{annotations}}}\n\
spec:\n  serviceAccountName: web\n  automountServiceAccountToken: false\n  containers:\n\
\x20 - name: app\n    image: example.invalid/web:v1\n    ports: [{{containerPort: 8080}}]\n\
\x20   readinessProbe: {{httpGet: {{path: /ready, port: 8080}}}}\n"
    );
    let (code, out, err) = api.kubectl_with(&["create", "-f", "-", "-o", "json"], Some(&pod));
    assert_eq!(code, 0, "create pod {ns}/{name}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn container_names(pod: &serde_json::Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// `strait_inject_reviews_total{outcome}` of `cp`, 0 when not counted yet.
fn reviews_counted(cp: &ControlPlane, outcome: &str) -> u64 {
    let metrics = crate::common::http_get(&cp.metrics, "/metrics");
    let prefix = format!("strait_inject_reviews_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The injection webhook as the API server calls it: the manifest's
/// MutatingWebhookConfiguration and `controlplane` Service, the Service's
/// cluster IP on loopback where the control plane's `--inject-listen` is
/// (the API server dials a Service's cluster IP and checks the name
/// `controlplane.strait-system.svc` against the caBundle the control
/// plane keeps). Pods of a labelled namespace are stored with the sidecar
/// (transparent ones with the init container and rewritten probes); pods
/// elsewhere never reach the webhook; with the injector away, pods are
/// still created (failurePolicy Ignore), without sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_calls_the_injection_webhook() {
    // Service cluster IPs from a loopback range of this test's own, so that
    // the webhook's Service address is one the control plane can listen on.
    // (EndpointSlices cannot point at loopback: the API refuses it, which
    // rules out --enable-aggregator-routing here.)
    let net = (0..150)
        .map(|i| 100 + (std::process::id() + i) % 150)
        .find(|net| std::net::TcpListener::bind((format!("127.{net}.0.17"), 15017)).is_ok())
        .expect("a free loopback address for the webhook");
    let cluster_ip = format!("127.{net}.0.17");
    let s = Scratch::new();
    let Some(api) = ApiServer::start_with(
        &s.path("kube"),
        &[&format!("--service-cluster-ip-range=127.{net}.0.0/16")],
    ) else {
        return;
    };
    let loopback_slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {name: loopback, namespace: default}\naddressType: IPv4\nendpoints: [{addresses: [127.0.0.1]}]\n";
    let (code, _, err) = api.kubectl_with(
        &["create", "-f", "-", "--dry-run=server"],
        Some(loopback_slice),
    );
    assert!(
        code != 0 && err.contains("loopback"),
        "an EndpointSlice at loopback: {err}"
    );

    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: strait-system}\n");
    let svc = manifest_document("Service", "controlplane").replacen(
        "\nspec:\n",
        &format!("\nspec:\n  clusterIP: {cluster_ip}\n"),
        1,
    );
    api.apply(&svc);
    let webhook = manifest_document("MutatingWebhookConfiguration", "strait-sidecar-injector");
    assert!(webhook.contains("failurePolicy: Ignore"), "{webhook}");
    assert!(webhook.contains("port: 15017"), "{webhook}");
    api.apply(&webhook);
    api.apply(&namespace("shop", "web"));
    let (code, _, err) = api.kubectl(&["label", "namespace", "shop", "strait.io/inject=enabled"]);
    assert_eq!(code, 0, "{err}");
    api.apply(&namespace("plain", "web"));

    let broker = Broker::start(&s.path("broker"), TD);
    let mut east = ControlPlane::east_on_kube(
        &s,
        &broker,
        &api.kubeconfig,
        &[
            "--inject-listen".to_string(),
            format!("{cluster_ip}:15017"),
            "--inject-image".to_string(),
            "registry.example/strait:1".to_string(),
        ],
    );
    // The control plane keeps the caBundle equal to the mesh roots.
    let roots = std::fs::read_to_string(east.state.join("cacerts/root-cert.pem")).unwrap();
    let config = api.wait_get(
        &["mutatingwebhookconfiguration", "strait-sidecar-injector"],
        WAIT,
        |v| v["webhooks"][0]["clientConfig"]["caBundle"].is_string(),
    );
    use base64::Engine;
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(
            config["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(String::from_utf8(bundle).unwrap().trim(), roots.trim());

    // Explicit interception (the default): the sidecar, the app's proxy.
    let pod = create_pod(&api, "shop", "web-explicit", "");
    assert_eq!(
        container_names(&pod, "containers"),
        ["app", "strait-sidecar"]
    );
    assert!(
        container_names(&pod, "initContainers").is_empty(),
        "{pod:#}"
    );
    let sidecar = &pod["spec"]["containers"][1];
    assert_eq!(sidecar["image"], "registry.example/strait:1");
    assert!(
        pod["spec"]["containers"][0]["env"]
            .to_string()
            .contains("http://127.0.0.1:15001"),
        "{pod:#}"
    );
    assert!(
        pod["metadata"]["annotations"]["sidecar.strait.io/status"].is_string(),
        "{pod:#}"
    );
    // Transparent: the init container, and the probe rewritten to the
    // sidecar's health port, the original handed to the sidecar.
    let pod = create_pod(
        &api,
        "shop",
        "web-transparent",
        "sidecar.strait.io/interception: transparent",
    );
    assert_eq!(container_names(&pod, "initContainers"), ["strait-init"]);
    assert_eq!(
        pod["spec"]["containers"][0]["readinessProbe"]["httpGet"],
        serde_json::json!({"path": "/app-health/app/readyz", "port": 15021, "scheme": "HTTP"}),
        "{pod:#}"
    );
    let probers = pod["spec"]["containers"][1]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == strait_model::probe::ENV)
        .expect("the app's probes handed to the sidecar");
    assert!(
        probers["value"].as_str().unwrap().contains("/ready"),
        "{probers}"
    );
    assert_eq!(reviews_counted(&east, "injected"), 2);

    // An unlabelled namespace: never sent to the webhook.
    let pod = create_pod(&api, "plain", "web", "");
    assert_eq!(container_names(&pod, "containers"), ["app"]);
    assert_eq!(
        (
            reviews_counted(&east, "injected"),
            reviews_counted(&east, "unchanged")
        ),
        (2, 0)
    );

    // The injector away: failurePolicy Ignore lets the pod through as is.
    east.terminate();
    let start = Instant::now();
    let pod = create_pod(&api, "shop", "web-unattended", "");
    assert_eq!(container_names(&pod, "containers"), ["app"]);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "bounded by the webhook's timeoutSeconds: {:?}",
        start.elapsed()
    );
}
