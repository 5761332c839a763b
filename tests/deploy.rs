//! The Kubernetes manifests of `deploy/multicluster/manifests`, checked
//! against the code they run, where no cluster is at hand:
//! - every strait container's arguments (with Kubernetes' `$(VAR)`
//!   expansion) parse with the binaries' own parsers;
//! - the files those arguments name are mounted, from volumes that hold
//!   them;
//! - the control plane's RBAC grants exactly what its Kubernetes source
//!   watches and what its import sink writes;
//! - Services select pods that exist, on ports those pods serve; probes hit
//!   the health listener; `--control-plane` names a Service and port;
//! - the ConfigMaps and Secrets the installer makes carry every key the
//!   manifests read.
//!
//! The schemas are checked by `kubernetes-validate` and the scripts by
//! `shellcheck` (scripts/test.sh); `tests/kind/run.sh` installs all of it
//! on real kind clusters where docker and kind exist.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::Parser;
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/multicluster");

/// One object of a manifest file.
struct Obj {
    file: String,
    v: Value,
}

impl Obj {
    fn kind(&self) -> &str {
        self.v["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.v["metadata"]["name"].as_str().unwrap_or_default()
    }
    fn namespace(&self) -> &str {
        self.v["metadata"]["namespace"].as_str().unwrap_or_default()
    }
    fn what(&self) -> String {
        format!(
            "{}: {} {}/{}",
            self.file,
            self.kind(),
            self.namespace(),
            self.name()
        )
    }
}

fn load() -> Vec<Obj> {
    let dir = Path::new(DEPLOY).join("manifests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "manifests missing in {}", dir.display());
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        out.extend(docs.into_iter().filter(|d| !d.is_null()).map(|v| Obj {
            file: file.clone(),
            v,
        }));
    }
    out
}

/// What the installer (`install.sh`) creates before applying the
/// manifests: ConfigMaps and Secrets by name, with a sample value per key.
fn installer_made() -> BTreeMap<&'static str, BTreeMap<&'static str, &'static str>> {
    [
        (
            "strait-mesh",
            [
                ("cluster", "east"),
                ("network", "net-east"),
                ("gateway", "172.18.0.2:31443"),
            ]
            .into(),
        ),
        ("strait-join", [("token", "a-join-token")].into()),
        (
            "strait-broker",
            [
                ("trust-domain", "cluster.local"),
                ("advertise", "172.18.0.2:31011"),
            ]
            .into(),
        ),
    ]
    .into()
}

/// What exists for the manifests to read: what the installer makes, and
/// the mesh roots the control plane publishes in every namespace.
fn made() -> BTreeMap<&'static str, BTreeMap<&'static str, &'static str>> {
    use strait_controlplane::kube::roots;
    let mut m = installer_made();
    m.insert(
        roots::NAME,
        [(roots::KEY, "-----BEGIN CERTIFICATE-----")].into(),
    );
    m
}

/// A pod template and where it came from.
#[derive(Clone, Copy)]
struct Pod<'a> {
    owner: &'a Obj,
    spec: &'a Value,
    labels: &'a Value,
}

fn pods(objs: &[Obj]) -> Vec<Pod<'_>> {
    objs.iter()
        .filter(|o| matches!(o.kind(), "Deployment" | "StatefulSet" | "DaemonSet" | "Job"))
        .map(|o| Pod {
            owner: o,
            spec: &o.v["spec"]["template"]["spec"],
            labels: &o.v["spec"]["template"]["metadata"]["labels"],
        })
        .collect()
}

fn containers<'a>(pod: &Pod<'a>) -> impl Iterator<Item = &'a Value> + 'a {
    let spec = pod.spec;
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(move |k| spec[k].as_array().into_iter().flatten())
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// A container's environment as Kubernetes resolves it for `$(VAR)`:
/// literal values, ConfigMap keys (from the manifests or the installer's)
/// and the pod fields strait's manifests use.
fn env_of(objs: &[Obj], pod: &Pod<'_>, c: &Value) -> BTreeMap<String, String> {
    let made = made();
    let ns = pod.owner.namespace();
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
            let (cm, key) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
            let in_manifests = objs
                .iter()
                .find(|o| o.kind() == "ConfigMap" && o.name() == cm && o.namespace() == ns)
                .map(|o| o.v["data"][key].as_str().map(str::to_string));
            match in_manifests {
                Some(v) => v.unwrap_or_else(|| {
                    panic!("{}: ConfigMap {ns}/{cm} has no key {key}", pod.owner.what())
                }),
                None => made
                    .get(cm)
                    .and_then(|m| m.get(key))
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: env {name} reads ConfigMap {cm} key {key}, which neither the manifests nor the installer make",
                            pod.owner.what()
                        )
                    })
                    .to_string(),
            }
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match path {
                "metadata.name" => format!("{}-0", pod.owner.name()),
                "metadata.namespace" => ns.to_string(),
                "spec.serviceAccountName" => pod.spec["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
                "status.podIP" => "10.244.0.10".to_string(),
                other => panic!("{}: fieldRef {other} not known here", pod.owner.what()),
            }
        } else {
            panic!("{}: env {name}: no value this test knows", pod.owner.what())
        };
        env.insert(name, value);
    }
    env
}

/// `$(VAR)` replaced as the kubelet does; an unknown variable fails.
fn expand(arg: &str, env: &BTreeMap<String, String>, what: &str) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find(')')
            .unwrap_or_else(|| panic!("{what}: unclosed $( in {arg:?}"));
        let var = &rest[i + 2..i + end];
        let value = env.get(var).unwrap_or_else(|| {
            panic!("{what}: {arg:?} uses $({var}), which the container does not define")
        });
        out.push_str(value);
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    out
}

/// The strait containers: what they are, the container, its pod and its
/// argv after expansion.
fn strait_containers(objs: &[Obj]) -> Vec<(String, &Value, Pod<'_>, Vec<String>)> {
    let mut all = Vec::new();
    for pod in pods(objs) {
        for c in containers(&pod) {
            let command = strs(&c["command"]);
            let Some(program) = command.first() else {
                continue;
            };
            if !matches!(program.as_str(), "strait" | "strait-sidecar" | "straitctl") {
                continue;
            }
            let what = format!(
                "{} container {}",
                pod.owner.what(),
                c["name"].as_str().unwrap()
            );
            let env = env_of(objs, &pod, c);
            let argv: Vec<String> = command
                .iter()
                .chain(strs(&c["args"]).iter())
                .map(|a| expand(a, &env, &what))
                .collect();
            all.push((what, c, pod, argv));
        }
    }
    all
}

/// The value of `--flag` in argv (`--flag=v` or `--flag v`).
fn flag<'a>(argv: &'a [String], name: &str) -> Option<&'a str> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&format!("{name}=")) {
            Some(v)
        } else if a == name {
            argv.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

#[test]
fn every_strait_container_parses_with_the_binarys_parser() {
    let objs = load();
    let all = strait_containers(&objs);
    assert!(all.len() >= 5, "strait containers: {}", all.len());
    for (what, _, _, argv) in &all {
        let parsed = match argv[0].as_str() {
            "strait" => strait::cli::commands::Cli::try_parse_from(argv).map(|_| ()),
            "strait-sidecar" => strait_sidecar::cli::SidecarCli::try_parse_from(argv).map(|_| ()),
            "straitctl" => strait::cli::ctl::Ctl::try_parse_from(argv).map(|_| ()),
            other => unreachable!("{other}"),
        };
        if let Err(e) = parsed {
            panic!("{what}: {argv:?} does not parse:\n{e}");
        }
    }
}

/// A bad flag is caught: the check above is not vacuous.
#[test]
fn a_misspelt_flag_would_be_caught() {
    let argv = [
        "strait",
        "gateway",
        "--cluster=east",
        "--network=n",
        "--route=x",
    ];
    assert!(strait::cli::commands::Cli::try_parse_from(argv).is_err());
    let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
    assert_eq!(expand("--x=$(A)-$(A)", &env, "t"), "--x=1-1");
    let r = std::panic::catch_unwind(|| expand("--x=$(B)", &env, "t"));
    assert!(r.is_err(), "an unknown $(VAR) must fail");
}

#[test]
fn files_the_arguments_name_are_mounted_from_volumes_that_hold_them() {
    let objs = load();
    let made = made();
    for (what, c, pod, argv) in strait_containers(&objs) {
        for name in [
            "--token",
            "--root-cert",
            "--join-token",
            "--state-dir",
            "--data-dir",
            "--identity",
            "--config-dir",
        ] {
            let Some(path) = flag(&argv, name) else {
                continue;
            };
            let mount = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    let mp = m["mountPath"].as_str().unwrap();
                    path == mp || path.starts_with(&format!("{}/", mp.trim_end_matches('/')))
                })
                .unwrap_or_else(|| panic!("{what}: {name} {path} is on no volume mount"));
            let volume_name = mount["name"].as_str().unwrap();
            let in_volume = path
                .strip_prefix(mount["mountPath"].as_str().unwrap())
                .unwrap()
                .trim_start_matches('/');
            let claims: BTreeSet<String> = pod.owner.v["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| t["metadata"]["name"].as_str().unwrap().to_string())
                .collect();
            if claims.contains(volume_name) {
                continue; // a persistent volume: the process writes it
            }
            let volume = pod.spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == volume_name)
                .unwrap_or_else(|| panic!("{what}: volume {volume_name} is not defined"));
            let files: Vec<String> = if let Some(cm) = volume.get("configMap") {
                let keys: Vec<String> = match cm["items"].as_array() {
                    Some(items) => items
                        .iter()
                        .map(|i| {
                            let key = i["key"].as_str().unwrap();
                            let source = made.get(cm["name"].as_str().unwrap());
                            assert!(
                                source.is_some_and(|m| m.contains_key(key)),
                                "{what}: ConfigMap {} key {key} is made by no one",
                                cm["name"]
                            );
                            i["path"].as_str().unwrap().to_string()
                        })
                        .collect(),
                    None => made[cm["name"].as_str().unwrap()]
                        .keys()
                        .map(|k| k.to_string())
                        .collect(),
                };
                keys
            } else if let Some(secret) = volume.get("secret") {
                made.get(secret["secretName"].as_str().unwrap())
                    .unwrap_or_else(|| {
                        panic!("{what}: Secret {} is made by no one", secret["secretName"])
                    })
                    .keys()
                    .map(|k| k.to_string())
                    .collect()
            } else if let Some(p) = volume.get("projected") {
                p["sources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|s| {
                        s["serviceAccountToken"]["path"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect()
            } else {
                panic!("{what}: volume {volume_name}: a kind this test does not know")
            };
            assert!(
                files.iter().any(|f| f == in_volume),
                "{what}: {name} {path}: volume {volume_name} holds {files:?}, not {in_volume}"
            );
        }
    }
}

#[test]
fn service_account_tokens_are_for_the_control_planes_audience() {
    let objs = load();
    let mut seen = 0;
    for pod in pods(&objs) {
        for v in pod.spec["volumes"].as_array().into_iter().flatten() {
            for s in v["projected"]["sources"].as_array().into_iter().flatten() {
                if let Some(t) = s.get("serviceAccountToken") {
                    seen += 1;
                    assert_eq!(
                        t["audience"].as_str(),
                        Some(strait_controlplane::ca::service::KUBE_AUDIENCE),
                        "{}",
                        pod.owner.what()
                    );
                }
            }
        }
    }
    assert!(seen >= 3, "gateway, echo and client use projected tokens");
}

/// The rules of the ClusterRole bound to `namespace/sa`, as
/// (group, resource) → verbs.
fn granted(
    objs: &[Obj],
    namespace: &str,
    sa: &str,
) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for b in objs.iter().filter(|o| o.kind() == "ClusterRoleBinding") {
        let bound = b.v["subjects"].as_array().into_iter().flatten().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == namespace
        });
        if !bound {
            continue;
        }
        let role = b.v["roleRef"]["name"].as_str().unwrap();
        let role = objs
            .iter()
            .find(|o| o.kind() == "ClusterRole" && o.name() == role)
            .unwrap_or_else(|| panic!("{}: ClusterRole {role} missing", b.what()));
        for rule in role.v["rules"].as_array().unwrap() {
            for g in strs(&rule["apiGroups"]) {
                for r in strs(&rule["resources"]) {
                    out.entry((g.clone(), r))
                        .or_default()
                        .extend(strs(&rule["verbs"]));
                }
            }
        }
    }
    out
}

#[test]
fn the_control_planes_rbac_grants_what_its_kubernetes_source_uses() {
    use strait_controlplane::kube::apply::MANAGED;
    use strait_controlplane::kube::store::SOURCES;
    let objs = load();
    let cp = strait_containers(&objs)
        .into_iter()
        .find(|(_, _, _, argv)| argv.get(1).is_some_and(|a| a == "controlplane"))
        .expect("a control plane container");
    assert!(
        cp.3.iter().any(|a| a == "--kube"),
        "{}: runs with --kube",
        cp.0
    );
    let sa = cp.2.spec["serviceAccountName"].as_str().unwrap();
    let grants = granted(&objs, cp.2.owner.namespace(), sa);
    let has = |group: &str, resource: &str, verbs: &[&str]| {
        let got = grants
            .get(&(group.to_string(), resource.to_string()))
            .cloned()
            .unwrap_or_default();
        for v in verbs {
            assert!(
                got.contains(*v),
                "{sa} may not {v} {resource}.{group} (granted {got:?})"
            );
        }
    };
    // Watched: listed, then watched (kube-runtime's watcher).
    for s in SOURCES {
        has(s.group, s.plural, &["list", "watch"]);
    }
    // Written: server-side apply (patch), listed and deleted to prune.
    for m in MANAGED {
        let group = m.api_version.split_once('/').unwrap().0;
        has(group, m.plural, &["list", "patch", "delete"]);
    }
    // Sidecars' service account tokens are checked with TokenReviews.
    has("authentication.k8s.io", "tokenreviews", &["create"]);
    // The mesh roots' ConfigMap, server-side applied in every namespace
    // (an apply that creates needs create as well as patch).
    has("", "configmaps", &["create", "patch"]);
    // The injection webhook's caBundle (read, then merge-patched).
    has(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        &["get", "patch"],
    );
    // Nothing else: every grant is for something the code uses.
    let used: BTreeSet<(String, String)> = SOURCES
        .iter()
        .map(|s| (s.group.to_string(), s.plural.to_string()))
        .chain(MANAGED.iter().map(|m| {
            (
                m.api_version.split_once('/').unwrap().0.to_string(),
                m.plural.to_string(),
            )
        }))
        .chain([
            (
                "authentication.k8s.io".to_string(),
                "tokenreviews".to_string(),
            ),
            (String::new(), "configmaps".to_string()),
            (
                "admissionregistration.k8s.io".to_string(),
                "mutatingwebhookconfigurations".to_string(),
            ),
        ])
        .collect();
    for key in grants.keys() {
        assert!(
            used.contains(key),
            "{sa} is granted {key:?}, which no code uses"
        );
    }
}

#[test]
fn services_select_pods_and_ports_that_exist() {
    let objs = load();
    let pods = pods(&objs);
    let mut checked = 0;
    for svc in objs.iter().filter(|o| o.kind() == "Service") {
        let Some(selector) = svc.v["spec"]["selector"].as_object() else {
            continue;
        };
        let pod = pods
            .iter()
            .find(|p| {
                p.owner.namespace() == svc.namespace()
                    && selector.iter().all(|(k, v)| &p.labels[k] == v)
            })
            .unwrap_or_else(|| panic!("{}: selects no pod template", svc.what()));
        for port in svc.v["spec"]["ports"].as_array().unwrap() {
            let target = port["targetPort"]
                .as_u64()
                .or(port["port"].as_u64())
                .unwrap();
            let protocol = port["protocol"].as_str().unwrap_or("TCP");
            let declared = containers(pod).any(|c| {
                c["ports"].as_array().into_iter().flatten().any(|p| {
                    p["containerPort"].as_u64() == Some(target)
                        && p["protocol"].as_str().unwrap_or("TCP") == protocol
                })
            });
            // A mesh app listens on loopback behind its sidecar, which
            // takes the service port's traffic (mTLS on its inbound port)
            // to the app at --app.
            let behind_sidecar = containers(pod).any(|c| {
                strs(&c["command"])
                    .first()
                    .is_some_and(|p| p == "strait-sidecar")
                    && strs(&c["args"])
                        .iter()
                        .any(|a| *a == format!("--app=127.0.0.1:{target}"))
            });
            let served = declared || behind_sidecar;
            assert!(
                served,
                "{}: port {target}/{protocol} is served by no container of {}",
                svc.what(),
                pod.owner.what()
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "{checked} service ports checked");
}

#[test]
fn listeners_probes_and_the_control_plane_address_agree() {
    let objs = load();
    for (what, c, pod, argv) in strait_containers(&objs) {
        // Probes hit the health listener.
        for probe in ["readinessProbe", "livenessProbe"] {
            let Some(port) = c[probe]["httpGet"]["port"].as_u64() else {
                continue;
            };
            let health = flag(&argv, "--health-listen")
                .unwrap_or_else(|| panic!("{what}: a {probe} but no --health-listen"));
            assert!(
                health.ends_with(&format!(":{port}")),
                "{what}: {probe} on {port}, health on {health}"
            );
        }
        // Every listener is declared as a container port.
        for name in [
            "--listen",
            "--health-listen",
            "--metrics-listen",
            "--inbound",
            "--egress-listen",
        ] {
            let Some(addr) = flag(&argv, name) else {
                continue;
            };
            if addr.starts_with("127.") {
                continue; // pod-local, not for the Service or the kubelet
            }
            let port: u64 = addr.rsplit(':').next().unwrap().parse().unwrap();
            let declared = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["containerPort"].as_u64() == Some(port));
            assert!(
                declared,
                "{what}: {name} {addr}: port {port} is not a containerPort"
            );
        }
        // --control-plane names a Service of the manifests, on its port.
        if let Some(cp) = flag(&argv, "--control-plane") {
            let (host, port) = cp.rsplit_once(':').unwrap();
            let mut parts = host.split('.');
            let (name, ns) = (parts.next().unwrap(), parts.next().unwrap());
            assert_eq!(parts.next(), Some("svc"), "{what}: {cp}");
            let svc = objs
                .iter()
                .find(|o| o.kind() == "Service" && o.name() == name && o.namespace() == ns)
                .unwrap_or_else(|| panic!("{what}: --control-plane {cp}: no Service {ns}/{name}"));
            assert!(
                svc.v["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"].as_u64() == port.parse().ok()),
                "{what}: Service {ns}/{name} has no port {port}"
            );
        }
        let _ = pod;
    }
}

#[test]
fn the_installer_makes_the_config_maps_and_secrets_the_manifests_read() {
    let script = std::fs::read_to_string(Path::new(DEPLOY).join("install.sh")).unwrap();
    for (name, keys) in installer_made() {
        assert!(script.contains(name), "install.sh never makes {name}");
        for key in keys.keys() {
            assert!(
                script.contains(&format!("--from-literal={key}="))
                    || script.contains(&format!("--from-file={key}=")),
                "install.sh never sets {name} key {key}"
            );
        }
    }
}

/// The injection webhook the API server calls is the one the control
/// plane serves and keeps the caBundle of: its name, Service, port and
/// path.
#[test]
fn the_injection_webhook_reaches_the_control_planes_listener() {
    use strait_controlplane::kube::inject::WEBHOOK_CONFIGURATION;
    let objs = load();
    let mwc = objs
        .iter()
        .find(|o| o.kind() == "MutatingWebhookConfiguration")
        .expect("a MutatingWebhookConfiguration");
    assert_eq!(mwc.name(), WEBHOOK_CONFIGURATION);
    let cp = strait_containers(&objs)
        .into_iter()
        .find(|(_, _, _, argv)| argv.get(1).is_some_and(|a| a == "controlplane"))
        .expect("a control plane container");
    let listen = flag(&cp.3, "--inject-listen").expect("the control plane serves the webhook");
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    for hook in mwc.v["webhooks"].as_array().unwrap() {
        let svc = &hook["clientConfig"]["service"];
        assert_eq!(svc["path"], "/inject");
        assert!(
            hook["clientConfig"].get("caBundle").is_none(),
            "the control plane sets caBundle; a manifest value would fight it"
        );
        let service = objs
            .iter()
            .find(|o| {
                o.kind() == "Service"
                    && o.name() == svc["name"]
                    && o.namespace() == svc["namespace"]
            })
            .unwrap_or_else(|| panic!("no Service {svc}"));
        let target = service.v["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == svc["port"])
            .unwrap_or_else(|| panic!("{}: no port {}", service.what(), svc["port"]))["targetPort"]
            .as_u64();
        assert_eq!(
            target,
            Some(port),
            "the webhook port reaches --inject-listen"
        );
        // The control plane's certificate names this Service.
        assert_eq!(
            format!(
                "{}.{}.svc",
                svc["name"].as_str().unwrap(),
                svc["namespace"].as_str().unwrap()
            ),
            strait_ca::tls::CONTROL_PLANE_SERVER_NAME
        );
    }
}
