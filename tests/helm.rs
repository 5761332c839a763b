//! The Helm chart `deploy/helm/strait`, with helm built by
//! `bash scripts/tools.sh helm`:
//! - `helm lint --strict` is clean, with the defaults and with the values
//!   of each topology (`deploy/helm/examples/<topology>.yaml`);
//! - with the defaults it renders the objects of
//!   `deploy/multicluster/manifests/{broker,cluster}.yaml` as they are
//!   (only Helm's labels added; Namespace strait-system is Helm's);
//! - every topology renders objects that `kubernetes-validate --strict`
//!   accepts (the chart's CRDs too), whose strait containers' arguments
//!   parse with the binaries' own parser, and that carry what the
//!   topology needs (remotes, the exposed control plane, the peer API);
//! - values that do not fit are refused by name (`values.schema.json`
//!   and the chart's checks across values);
//! - `helm install` into a real API server (CRDs from the chart) is
//!   accepted object by object, with the manifest's ClusterRole; an
//!   upgrade to topology remote leaves the account the primary reads
//!   that cluster with, allowed exactly what the control plane watches
//!   and the review of that cluster's tokens.
//!
//! Each test skips with one line when helm (or kubernetes-validate) is
//! missing, and fails under `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use common::apiserver::{ApiServer, tool_from};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/strait");
const NAMESPACE: &str = "strait-system";
const TOPOLOGIES: [&str; 4] = ["multi-primary", "primary-remote", "remote", "federated"];

/// helm, run with its cache, config and data in a scratch directory (none
/// of the user's repositories or plugins).
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

/// What one helm run gave.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Helm {
    /// helm, or `None` (skipped, one line) when it is not built.
    fn find() -> Option<Helm> {
        Some(Helm {
            bin: tool_from("helm", "helm")?,
            home: tempfile::tempdir().unwrap(),
        })
    }

    fn run(&self, args: &[&str]) -> Out {
        let home = self.home.path();
        let out = Command::new(&self.bin)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env_remove("KUBECONFIG")
            .output()
            .expect("run helm");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `helm ARGS`, which must succeed; its stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.code, 0,
            "helm {args:?}:\n{}\n{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// `helm template` of the chart in strait-system with `extra` args.
    #[track_caller]
    fn template(&self, extra: &[&str]) -> String {
        let mut args = vec!["template", "strait", CHART, "-n", NAMESPACE];
        args.extend_from_slice(extra);
        self.ok(&args)
    }
}

/// The values file of `topology`, as `-f` arguments.
fn values_of(topology: &str) -> [String; 2] {
    let path = Path::new(ROOT).join(format!("deploy/helm/examples/{topology}.yaml"));
    assert!(path.is_file(), "{} missing", path.display());
    ["-f".into(), path.to_str().unwrap().into()]
}

/// Rendered YAML documents as JSON values (empty documents dropped).
fn docs(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The objects of the manifest files, by (kind, namespace, name).
fn manifests() -> BTreeMap<(String, String, String), Value> {
    let mut out = BTreeMap::new();
    for file in ["broker.yaml", "cluster.yaml"] {
        let path = Path::new(ROOT)
            .join("deploy/multicluster/manifests")
            .join(file);
        for d in docs(&std::fs::read_to_string(path).unwrap()) {
            out.insert(key(&d), d);
        }
    }
    out
}

fn key(d: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&d["kind"]),
        s(&d["metadata"]["namespace"]),
        s(&d["metadata"]["name"]),
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The argv of `kind/name`'s first container, with `$(VAR)` replaced from
/// the ConfigMaps of `objs` its env reads (as the kubelet does).
fn argv(objs: &[Value], kind: &str, name: &str) -> Vec<String> {
    let owner = find(objs, kind, name).unwrap_or_else(|| panic!("no {kind} {name}"));
    let c = &owner["spec"]["template"]["spec"]["containers"][0];
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let r = &e["valueFrom"]["configMapKeyRef"];
        let cm = find(objs, "ConfigMap", r["name"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{kind} {name} reads ConfigMap {}, not rendered", r["name"]));
        let value = cm["data"][r["key"].as_str().unwrap()].as_str().unwrap();
        env.insert(
            format!("$({})", e["name"].as_str().unwrap()),
            value.to_string(),
        );
    }
    strs(&c["command"])
        .into_iter()
        .chain(strs(&c["args"]))
        .map(|a| env.iter().fold(a, |a, (k, v)| a.replace(k, v)))
        .collect()
}

/// `helm lint --strict`: clean (no warning, no error) with the defaults
/// and with each topology's values.
#[test]
fn lint_is_clean_for_the_defaults_and_every_topology() {
    let Some(helm) = Helm::find() else { return };
    let mut runs: Vec<Vec<String>> = vec![vec![]];
    runs.extend(TOPOLOGIES.iter().map(|t| values_of(t).to_vec()));
    for extra in runs {
        let mut args = vec!["lint", "--strict", CHART, "-n", NAMESPACE];
        args.extend(extra.iter().map(String::as_str));
        let out = helm.run(&args);
        let all = format!("{}{}", out.stdout, out.stderr);
        assert_eq!(out.code, 0, "helm {args:?}:\n{all}");
        assert!(
            all.contains("0 chart(s) failed")
                && !all.contains("[WARNING]")
                && !all.contains("[ERROR]"),
            "helm {args:?} is not clean:\n{all}"
        );
    }
}

/// With the defaults, the chart renders every object of the manifests,
/// equal apart from the labels Helm adds (the manifests' labels kept), and
/// nothing else: the Namespace is Helm's (`--create-namespace`).
#[test]
fn the_defaults_render_the_manifests_objects() {
    let Some(helm) = Helm::find() else { return };
    let rendered = docs(&helm.template(&[]));
    let mut got: BTreeMap<_, _> = rendered.iter().map(|d| (key(d), d.clone())).collect();
    for (k, mut want) in manifests() {
        if k.0 == "Namespace" {
            assert!(
                !got.contains_key(&k),
                "the chart renders {k:?}: Helm makes it"
            );
            continue;
        }
        let mut have = got
            .remove(&k)
            .unwrap_or_else(|| panic!("{k:?} not rendered"));
        let want_labels = want["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("labels")
            .unwrap_or_default();
        let have_labels = have["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("labels")
            .unwrap_or_default();
        for (l, v) in want_labels.as_object().into_iter().flatten() {
            assert_eq!(&have_labels[l], v, "{k:?}: label {l}");
        }
        assert_eq!(have, want, "{k:?} differs from the manifest's");
    }
    assert!(
        got.is_empty(),
        "rendered beyond the manifests: {:?}",
        got.keys()
    );
}

/// `kubernetes-validate`, or `None` (skipped, one line; under `CI=true` a
/// failure) when it is not installed.
fn kubernetes_validate() -> Option<()> {
    let have = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Some(());
    }
    let why = "kubernetes-validate is missing: python3 -m pip install kubernetes-validate";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("kubernetes-validate must run in CI: {why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// `kubernetes-validate --strict` of `files`, which must pass.
#[track_caller]
fn validate(files: &[PathBuf]) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubernetes-validate {files:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every Deployment's and StatefulSet's strait container arguments (the
/// ConfigMap values they read filled in) parse with the binary's parser.
fn strait_containers_parse(what: &str, objs: &[Value]) {
    for d in objs {
        let kind = d["kind"].as_str().unwrap();
        if !matches!(kind, "Deployment" | "StatefulSet") {
            continue;
        }
        let name = d["metadata"]["name"].as_str().unwrap();
        let a = argv(objs, kind, name);
        if let Err(e) = strait::cli::commands::Cli::try_parse_from(&a) {
            panic!("{what}: {kind} {name}: {a:?} does not parse:\n{e}");
        }
    }
}

/// Each topology renders valid objects (the CRDs with them), whose
/// strait containers parse with the binary's parser and carry what the
/// topology is for.
#[test]
fn every_topology_renders_valid_objects_that_do_what_it_needs() {
    let Some(helm) = Helm::find() else { return };
    let Some(()) = kubernetes_validate() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let crds = dir.path().join("crds.yaml");
    std::fs::write(&crds, helm.ok(&["show", "crds", CHART])).unwrap();
    assert!(
        docs(&std::fs::read_to_string(&crds).unwrap())
            .iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .count()
            >= 3,
        "the chart's CRDs"
    );
    files.push(crds);
    let mut rendered = BTreeMap::new();
    for t in TOPOLOGIES {
        let values = values_of(t);
        let yaml = helm.template(&[&values[0], &values[1]]);
        let file = dir.path().join(format!("{t}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        files.push(file);
        let objs = docs(&yaml);
        strait_containers_parse(t, &objs);
        rendered.insert(t, objs);
    }
    validate(&files);
    topology_specifics(&rendered);
}

/// What each topology's values add to (or take from) the defaults.
fn topology_specifics(rendered: &BTreeMap<&str, Vec<Value>>) {
    let has = |argv: &[String], a: &str| argv.iter().any(|x| x == a);
    let ports = |objs: &[Value], svc: &str| -> Vec<i64> {
        let s = find(objs, "Service", svc).unwrap_or_else(|| panic!("Service {svc}"));
        s["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_i64().unwrap())
            .collect()
    };

    let mp = &rendered["multi-primary"];
    let cp = argv(mp, "StatefulSet", "strait-controlplane");
    assert!(
        has(&cp, "--cluster=east") && has(&cp, "--gateway=172.18.0.2:31443"),
        "{cp:?}"
    );
    assert!(
        has(&cp, "--inject-image=registry.example/strait:0.1"),
        "{cp:?}"
    );
    assert!(!cp.iter().any(|a| a.starts_with("--remote")), "{cp:?}");
    let join = find(mp, "Secret", "strait-join");
    assert!(join.is_none(), "no joinToken, no Secret strait-join");

    let pr = &rendered["primary-remote"];
    let cp = argv(pr, "StatefulSet", "strait-controlplane");
    assert!(
        has(&cp, "--remote=west=/etc/strait/remotes/west/kubeconfig"),
        "{cp:?}"
    );
    let spec = &find(pr, "StatefulSet", "strait-controlplane").unwrap()["spec"]["template"]["spec"];
    assert!(
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "strait-remote-west"),
        "the remote's kubeconfig is mounted: {spec}"
    );
    let gw = argv(pr, "Deployment", "eastwest-gateway");
    assert!(
        has(
            &gw,
            "--expose-control-plane=controlplane.strait-system.svc:15012"
        ),
        "{gw:?}"
    );
    assert!(
        ports(pr, "eastwest-gateway").contains(&15012),
        "the exposed control plane's port"
    );

    let remote = &rendered["remote"];
    for (kind, name) in [
        ("StatefulSet", "strait-controlplane"),
        ("StatefulSet", "strait-broker"),
        ("MutatingWebhookConfiguration", "strait-sidecar-injector"),
        ("ClusterRole", "strait-controlplane"),
    ] {
        assert!(
            find(remote, kind, name).is_none(),
            "remote renders {kind} {name}"
        );
    }
    let gw = argv(remote, "Deployment", "eastwest-gateway");
    assert!(has(&gw, "--control-plane=172.18.0.2:31012"), "{gw:?}");
    assert!(
        has(&gw, "--token=/var/run/secrets/tokens/istio-token"),
        "a remote's gateway authenticates with its own account's token: {gw:?}"
    );
    // The remote's sidecars reach the primary's control plane by the name
    // every cluster uses.
    let cp = find(remote, "Service", "controlplane").expect("Service controlplane");
    assert!(cp["spec"]["selector"].is_null(), "{cp}");
    assert_eq!(cp["spec"]["ports"][0]["port"], 15012);
    let slice = find(remote, "EndpointSlice", "controlplane-primary").expect("its EndpointSlice");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "controlplane"
    );
    assert_eq!(slice["endpoints"][0]["addresses"][0], "172.18.0.2");
    assert_eq!(slice["ports"][0]["port"], 31012);
    let svc = find(remote, "Service", "eastwest-gateway").unwrap();
    assert_eq!(
        svc["metadata"]["labels"][strait_controlplane::remote::NETWORK_LABEL],
        "net-west",
        "the primary finds the remote's gateway by its network label"
    );
    assert_eq!(svc["spec"]["externalIPs"][0], "172.18.0.3");
    assert!(find(remote, "ClusterRole", "strait-remote-reader").is_some());

    let fed = &rendered["federated"];
    let broker = argv(fed, "StatefulSet", "strait-broker");
    assert!(
        has(&broker, "--peer-listen=0.0.0.0:15013") && has(&broker, "--mesh-name=a"),
        "{broker:?}"
    );
    assert!(
        ports(fed, "strait-broker").contains(&15013),
        "the peer API's port"
    );
    let mp_broker = argv(mp, "StatefulSet", "strait-broker");
    assert!(
        !mp_broker.iter().any(|a| a.starts_with("--peer-listen")),
        "{mp_broker:?}"
    );
}

/// Values that do not fit are refused, each by the value's name: by the
/// schema (a topology that does not exist, a misspelt key, a port out of
/// range) and by the chart's checks across values.
#[test]
fn bad_values_are_refused_by_name() {
    let Some(helm) = Helm::find() else { return };
    let remote_without_cp = [
        "topology=remote",
        "components.controlPlane=false",
        "components.webhook=false",
        "components.broker=false",
        "cluster.name=west",
        "cluster.network=net-west",
    ]
    .join(",");
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &["--set", "topology=mesh"],
            &["/topology", "multi-primary", "federated"],
        ),
        (&["--set", "topolgy=remote"], &["topolgy"]),
        (
            &["--set", "gateway.service.nodePort=443"],
            &["/gateway/service/nodePort"],
        ),
        (
            &["--set", "topology=remote"],
            &["components.controlPlane=false"],
        ),
        (&["--set", &remote_without_cp], &["remote.controlPlane"]),
        (
            &["--set", "topology=primary-remote"],
            &["controlPlane.remotes"],
        ),
    ];
    for (extra, words) in cases {
        let mut args = vec!["template", "strait", CHART, "-n", NAMESPACE];
        args.extend_from_slice(extra);
        let out = helm.run(&args);
        assert_ne!(out.code, 0, "helm {args:?} rendered:\n{}", out.stdout);
        for w in words {
            assert!(
                out.stderr.contains(w),
                "helm {args:?}: {w:?} not named in:\n{}",
                out.stderr
            );
        }
    }
    // Another namespace: the control plane's certificate names
    // controlplane.strait-system.svc.
    let out = helm.run(&["template", "strait", CHART, "-n", "mesh"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("strait-system"), "{}", out.stderr);
    // The same values, fixed, render: what is refused is the bad value.
    let fixed = format!("{remote_without_cp},remote.controlPlane=10.0.0.1:31012");
    helm.template(&["--set", &fixed]);
}

/// `kubectl get` of a rendered object: its kind qualified by group and
/// version, in its namespace.
fn get(api: &ApiServer, d: &Value) -> Option<Value> {
    let (kind, ns, name) = key(d);
    let api_version = d["apiVersion"].as_str().unwrap();
    let resource = match api_version.split_once('/') {
        Some((group, version)) => format!("{kind}.{version}.{group}/{name}"),
        None => format!("{kind}/{name}"),
    };
    let mut args = vec![resource.as_str()];
    if !ns.is_empty() {
        args.extend(["-n", ns.as_str()]);
    }
    api.get(&args)
}

/// Waits (bounded) until `kubectl get -n strait-system WHAT` finds
/// nothing.
#[track_caller]
fn until_absent(api: &ApiServer, what: &str) {
    let start = std::time::Instant::now();
    loop {
        let (code, out, err) = api.kubectl(&["get", what, "-n", NAMESPACE]);
        if code != 0 && err.contains("NotFound") {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "{what} still there after the upgrade: {out}{err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Whether the account `sa` of strait-system may `verb` `resource`.
fn can(api: &ApiServer, sa: &str, verb: &str, resource: &str) -> bool {
    let who = format!("--as=system:serviceaccount:{NAMESPACE}:{sa}");
    let (code, out, err) = api.kubectl(&["auth", "can-i", verb, resource, &who]);
    assert!(code == 0 || code == 1, "kubectl auth can-i: {out}{err}");
    code == 0
}

/// `helm install` into a real API server: the chart's CRDs are
/// established, every rendered object is there, the ClusterRole is the
/// manifest's; upgraded to topology remote, the control plane's objects
/// go and the account a primary reads the cluster with may read exactly
/// what the control plane watches and publish the roots, nothing more.
#[test]
fn helm_install_into_a_real_api_server() {
    let Some(helm) = Helm::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(api) = ApiServer::start(dir.path()) else {
        return;
    };
    let kubeconfig = api.kubeconfig.to_str().unwrap().to_string();
    let values = values_of("multi-primary");
    helm.ok(&[
        "install",
        "strait",
        CHART,
        "-n",
        NAMESPACE,
        "--create-namespace",
        "--kubeconfig",
        &kubeconfig,
        &values[0],
        &values[1],
        "--set",
        "cluster.joinToken=a-join-token",
        "--timeout",
        "60s",
    ]);
    for crd in [
        "serviceentries.networking.istio.io",
        "serviceexports.multicluster.x-k8s.io",
        "serviceimports.multicluster.x-k8s.io",
    ] {
        let c = api
            .get(&["crd", crd])
            .unwrap_or_else(|| panic!("CRD {crd} not installed by the chart"));
        let established = c["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        assert!(established, "{crd}: {}", c["status"]);
    }
    let manifest = helm.ok(&[
        "get",
        "manifest",
        "strait",
        "-n",
        NAMESPACE,
        "--kubeconfig",
        &kubeconfig,
    ]);
    let objs = docs(&manifest);
    assert!(objs.len() >= 15, "{} objects installed", objs.len());
    for d in &objs {
        assert!(get(&api, d).is_some(), "{:?} not in the API server", key(d));
    }
    let role = api.get(&["clusterrole", "strait-controlplane"]).unwrap();
    let want = &manifests()[&(
        "ClusterRole".into(),
        String::new(),
        "strait-controlplane".into(),
    )];
    assert_eq!(
        role["rules"], want["rules"],
        "the installed ClusterRole is not the manifest's"
    );
    let join = api
        .get(&["secret", "strait-join", "-n", NAMESPACE])
        .unwrap();
    assert_eq!(
        join["data"]["token"], "YS1qb2luLXRva2Vu",
        "base64 of a-join-token"
    );

    let values = values_of("remote");
    helm.ok(&[
        "upgrade",
        "strait",
        CHART,
        "-n",
        NAMESPACE,
        "--kubeconfig",
        &kubeconfig,
        &values[0],
        &values[1],
        "--timeout",
        "60s",
    ]);
    for gone in [
        "statefulset/strait-controlplane",
        "statefulset/strait-broker",
        "clusterrole/strait-controlplane",
        "mutatingwebhookconfiguration/strait-sidecar-injector",
    ] {
        until_absent(&api, gone);
    }
    let reader = "strait-remote-reader";
    assert!(
        api.get(&["serviceaccount", reader, "-n", NAMESPACE])
            .is_some()
    );
    for s in strait_controlplane::kube::store::SOURCES {
        let resource = if s.group.is_empty() {
            s.plural.to_string()
        } else {
            format!("{}.{}", s.plural, s.group)
        };
        for verb in ["list", "watch"] {
            assert!(
                can(&api, reader, verb, &resource),
                "{reader} may not {verb} {resource}"
            );
        }
    }
    assert!(
        can(&api, reader, "patch", "configmaps"),
        "the roots' ConfigMaps"
    );
    assert!(
        can(&api, reader, "create", "tokenreviews.authentication.k8s.io"),
        "the remote's proxies' tokens"
    );
    for (verb, resource) in [
        ("patch", "serviceentries.networking.istio.io"),
        ("get", "secrets"),
        ("delete", "configmaps"),
    ] {
        assert!(
            !can(&api, reader, verb, resource),
            "{reader} may {verb} {resource}"
        );
    }
}

/// `deploy/multicluster/kind/up.sh TOPOLOGY --render DIR`: the releases
/// the kind scripts install, rendered with placeholder addresses and
/// tokens. They cannot run here (kind needs pulled node images), but what
/// they apply is this chart with the examples' values, and it is checked
/// here: valid objects, strait containers that parse, and per topology
/// the parts each cluster needs.
#[test]
fn the_kind_scripts_install_valid_releases_of_this_chart() {
    let Some(helm) = Helm::find() else { return };
    let Some(()) = kubernetes_validate() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tools = helm.bin.parent().unwrap().to_path_buf();
    let path = format!("{}:{}", tools.display(), std::env::var("PATH").unwrap());
    let mut files = Vec::new();
    let mut rendered = BTreeMap::new();
    for t in ["multi-primary", "primary-remote", "federated"] {
        let out = Command::new("bash")
            .arg(Path::new(ROOT).join("deploy/multicluster/kind/up.sh"))
            .args([t, "--render"])
            .arg(dir.path())
            .env("PATH", &path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "up.sh {t} --render: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for c in ["east", "west"] {
            let file = dir.path().join(format!("{t}-{c}.yaml"));
            let objs = docs(&std::fs::read_to_string(&file).unwrap());
            strait_containers_parse(&format!("{t} {c}"), &objs);
            files.push(file);
            rendered.insert(format!("{t}-{c}"), objs);
        }
    }
    validate(&files);

    let data = |release: &str, cm: &str, key: &str| -> String {
        let objs = &rendered[release];
        let m = find(objs, "ConfigMap", cm).unwrap_or_else(|| panic!("{release}: ConfigMap {cm}"));
        m["data"][key].as_str().unwrap().to_string()
    };
    let has =
        |release: &str, kind: &str, name: &str| find(&rendered[release], kind, name).is_some();
    // multi-primary: the broker in east only; a control plane, a gateway
    // and a join token in both.
    assert!(has("multi-primary-east", "StatefulSet", "strait-broker"));
    assert!(!has("multi-primary-west", "StatefulSet", "strait-broker"));
    for c in ["east", "west"] {
        let r = format!("multi-primary-{c}");
        assert!(has(&r, "StatefulSet", "strait-controlplane"), "{r}");
        assert!(has(&r, "Secret", "strait-join"), "{r}");
        assert_eq!(data(&r, "strait-mesh", "cluster"), c);
        assert_eq!(data(&r, "strait-mesh", "network"), format!("net-{c}"));
    }
    // primary-remote: east serves west with the kubeconfig Secret the
    // script makes; west runs the gateway and points its sidecars at
    // east's exposed control plane.
    let cp = argv(
        &rendered["primary-remote-east"],
        "StatefulSet",
        "strait-controlplane",
    );
    assert!(
        cp.iter()
            .any(|a| a == "--remote=west=/etc/strait/remotes/west/kubeconfig"),
        "{cp:?}"
    );
    assert!(!has(
        "primary-remote-west",
        "StatefulSet",
        "strait-controlplane"
    ));
    assert!(has("primary-remote-west", "Deployment", "eastwest-gateway"));
    assert!(has(
        "primary-remote-west",
        "EndpointSlice",
        "controlplane-primary"
    ));
    // federated: a broker per cluster, each its own trust domain and mesh
    // name, with the peer API.
    for (c, mesh) in [("east", "a"), ("west", "b")] {
        let r = format!("federated-{c}");
        assert_eq!(
            data(&r, "strait-broker", "trust-domain"),
            format!("mesh-{mesh}.local")
        );
        let broker = argv(&rendered[&r], "StatefulSet", "strait-broker");
        assert!(
            broker.iter().any(|a| a == &format!("--mesh-name={mesh}"))
                && broker.iter().any(|a| a == "--peer-listen=0.0.0.0:15013"),
            "{r}: {broker:?}"
        );
    }
}
