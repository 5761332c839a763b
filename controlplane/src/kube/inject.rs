//! Sidecar injection: the mutating admission webhook's decision, pure.
//!
//! [`review`] reads an `admission.k8s.io/v1` `AdmissionReview` (the API
//! server's request, untrusted input) and answers one that lets the pod
//! through, with a JSON Patch ([`patch_for`]) adding `strait-sidecar` and
//! its two volumes: a projected service account token for the audience
//! `istio-ca` and the mesh roots' ConfigMap (`strait-ca-root-cert`, which
//! the control plane publishes in every namespace).
//!
//! By default the sidecar runs in explicit mode: the app reaches the mesh
//! through `http_proxy=http://127.0.0.1:15001` (set on the app containers
//! unless they set it themselves), and mesh callers reach the app through
//! the sidecar's inbound port 15006, which forwards to the app's first
//! container port on loopback (`--app`) or, for the other ports the pod
//! declares, to that port (`--app-ports`). No init container, no
//! NET_ADMIN: it fits namespaces that forbid privileged pods.
//!
//! With `sidecar.strait.io/interception: transparent` (or without the
//! annotation, when [`InjectConfig::interception`] says so) the pod also gets
//! the init container `strait-init` (`strait sidecar iptables --apply`,
//! with NET_ADMIN and NET_RAW, as istio-init), which redirects the pod's
//! TCP to the sidecar: the app's outbound connections to 15001 and inbound
//! ones to 15006, the sidecar's own (uid 1337) and ports 15021 and 15090
//! spared. The app then needs no proxy setting. It runs after the pod's
//! other init containers, so that they reach the network directly. The
//! app containers' `httpGet`, `tcpSocket` and `grpc` probes, which would
//! otherwise meet the inbound listener as plaintext (refused under
//! STRICT), are rewritten to `/app-health/<container>/<kind>` on the
//! sidecar's health port, and the sidecar is given the originals to run
//! at the pod's IP ([`strait_model::probe`]);
//! `sidecar.strait.io/rewriteAppHTTPProbers: "false"` keeps them as they
//! are.
//!
//! A pod is left alone when it asks (`sidecar.strait.io/inject: "false"`),
//! when it already has a `strait-sidecar` container, or when it runs in
//! the host's network namespace.

use base64::Engine;
use serde_json::{Value, json};
use strait_model::probe::{self, AppProbers};

mod probes;

/// The MutatingWebhookConfiguration whose `caBundle` the control plane
/// keeps equal to the mesh roots.
pub const WEBHOOK_CONFIGURATION: &str = "strait-sidecar-injector";
/// The injected container's name.
pub const CONTAINER: &str = "strait-sidecar";
/// A pod annotation: `"false"` keeps the pod as it is.
pub const INJECT_ANNOTATION: &str = "sidecar.strait.io/inject";
/// Set on every injected pod.
pub const STATUS_ANNOTATION: &str = "sidecar.strait.io/status";
/// A pod annotation: how the app's traffic reaches the sidecar,
/// `explicit` (the default: `http_proxy`) or `transparent` (iptables).
pub const INTERCEPTION_ANNOTATION: &str = "sidecar.strait.io/interception";
/// A pod annotation: `"false"` leaves the app's probes as they are under
/// transparent interception (by default they are rewritten, as Istio's
/// annotation of the same name does).
pub const REWRITE_PROBES_ANNOTATION: &str = "sidecar.strait.io/rewriteAppHTTPProbers";
/// The init container that sets up transparent interception.
pub const INIT_CONTAINER: &str = "strait-init";
/// The uid the sidecar runs as: its own traffic is never redirected.
const PROXY_UID: u32 = 1337;
/// The sidecar's listeners, as Istio numbers them. The iptables rules of
/// the init container redirect to the first two, so both sides take them
/// from here.
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
const HEALTH_PORT: u16 = 15021;
const METRICS_PORT: u16 = 15090;
/// The largest AdmissionReview read (the API server's own limit is 3 MiB).
pub const MAX_REVIEW: usize = 3 * 1024 * 1024;
const TOKEN_VOLUME: &str = "strait-token";
const ROOTS_VOLUME: &str = "strait-roots";

/// What the injected sidecar runs and where it finds the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image with `strait-sidecar`.
    pub image: String,
    /// The control plane's discovery and CSR address, `host:port`.
    pub control_plane: String,
    /// The interception of pods without [`INTERCEPTION_ANNOTATION`].
    pub interception: Interception,
}

/// How an injected pod's traffic reaches its sidecar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Interception {
    /// The app's `http_proxy` is the sidecar; no init container.
    #[default]
    Explicit,
    /// iptables rules from the init container `strait-init` redirect it.
    Transparent,
}

/// Why an `AdmissionReview` is refused ([`review`]; answered as 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the AdmissionReview is {size} bytes, more than {MAX_REVIEW}")]
    TooLarge { size: usize },
    #[error("the AdmissionReview is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error(
        "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion {api_version:?} kind {kind}"
    )]
    NotAReview { api_version: String, kind: Value },
    #[error("the AdmissionReview has no request.uid")]
    NoUid,
    #[error("the AdmissionReview's request.object is not a pod")]
    NotAPod,
    #[error(transparent)]
    Pod(#[from] PodError),
    #[error("the JSON Patch could not be encoded: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Why a pod cannot be injected ([`patch_for`]): what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("the pod has no spec.containers list")]
    NoContainerList,
    #[error("the pod has no containers")]
    NoContainers,
    #[error(
        "annotation {INTERCEPTION_ANNOTATION}: {value:?} is neither \"explicit\" nor \"transparent\""
    )]
    Interception { value: String },
    #[error("annotation {REWRITE_PROBES_ANNOTATION}: {value:?} is neither \"true\" nor \"false\"")]
    RewriteProbes { value: String },
    #[error(
        "the pod already has an init container named {INIT_CONTAINER}, which transparent interception needs"
    )]
    InitContainerTaken,
    #[error("the pod already has a volume named {name}, which the sidecar needs")]
    VolumeTaken { name: &'static str },
    #[error("the pod serves port {port}, which the sidecar listens on")]
    PortTaken { port: u16 },
    /// An app probe that cannot be rewritten.
    #[error(transparent)]
    Probe(#[from] probes::ProbeError),
}

/// The answer to an `AdmissionReview` request: the review to send back.
/// Errors name what is wrong with the request (answered as 400).
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<Value, ReviewError> {
    if body.len() > MAX_REVIEW {
        return Err(ReviewError::TooLarge { size: body.len() });
    }
    let v: Value = serde_json::from_slice(body).map_err(ReviewError::NotJson)?;
    let api_version = v["apiVersion"].as_str().unwrap_or_default();
    if api_version != "admission.k8s.io/v1" || v["kind"] != "AdmissionReview" {
        return Err(ReviewError::NotAReview {
            api_version: api_version.to_string(),
            kind: v["kind"].clone(),
        });
    }
    let request = &v["request"];
    let uid = request["uid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or(ReviewError::NoUid)?;
    let kind = request["kind"]["kind"].as_str().unwrap_or_default();
    let mut response = json!({"uid": uid, "allowed": true});
    if kind == "Pod" {
        let pod = &request["object"];
        if !pod.is_object() {
            return Err(ReviewError::NotAPod);
        }
        if let Some(ops) = patch_for(pod, cfg)? {
            let patch = serde_json::to_vec(&ops).map_err(ReviewError::Encode)?;
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
        }
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// What the injection of one pod does, decided from the pod.
struct Plan<'a> {
    containers: &'a [Value],
    transparent: bool,
    /// The app's TCP ports: the first is `--app`, the others `--app-ports`.
    ports: Vec<u16>,
    /// The rewrites of the app's probes, and the originals for the sidecar.
    probe_ops: Vec<Value>,
    probers: AppProbers,
}

/// The JSON Patch that injects the sidecar into `pod`, or `None` when the
/// pod is left alone. Errors name a malformed pod.
pub fn patch_for(pod: &Value, cfg: &InjectConfig) -> Result<Option<Vec<Value>>, PodError> {
    let Some(plan) = plan(pod, cfg)? else {
        return Ok(None);
    };
    let spec = &pod["spec"];
    let mut ops = Vec::new();
    if spec["volumes"].as_array().is_none() {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": []}));
    }
    for volume in volumes() {
        ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
    }
    let sidecar = sidecar_container(cfg, &plan.ports, &plan.probers);
    ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": sidecar}));
    if plan.transparent {
        if spec["initContainers"].as_array().is_none() {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": []}));
        }
        ops.push(
            json!({"op": "add", "path": "/spec/initContainers/-", "value": init_container(cfg)}),
        );
    } else {
        // The app's calls go through the sidecar, unless a container says
        // otherwise. Redirected, they need no setting.
        ops.extend(proxy_env_ops(plan.containers));
    }
    ops.extend(plan.probe_ops);
    ops.extend(status_annotation_ops(&pod["metadata"]["annotations"]));
    Ok(Some(ops))
}

/// Reads the pod: `None` when it is left alone, else what its injection
/// does. Refuses a pod whose annotations are not understood, or that
/// already uses a name or port the sidecar needs.
fn plan<'a>(pod: &'a Value, cfg: &InjectConfig) -> Result<Option<Plan<'a>>, PodError> {
    let annotations = &pod["metadata"]["annotations"];
    if annotations[INJECT_ANNOTATION] == "false" || pod["spec"]["hostNetwork"] == true {
        return Ok(None);
    }
    let containers = pod["spec"]["containers"]
        .as_array()
        .ok_or(PodError::NoContainerList)?;
    if containers.is_empty() {
        return Err(PodError::NoContainers);
    }
    if containers.iter().any(|c| c["name"] == CONTAINER) {
        return Ok(None);
    }
    let (transparent, rewrite_probes) = interception(annotations, cfg)?;
    let (probe_ops, probers) = if rewrite_probes {
        probes::rewritten(containers)?
    } else {
        (Vec::new(), AppProbers::default())
    };
    let named = |list: &str, name: &str| {
        pod["spec"][list]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["name"] == name))
    };
    if transparent && named("initContainers", INIT_CONTAINER) {
        return Err(PodError::InitContainerTaken);
    }
    if let Some(name) = [TOKEN_VOLUME, ROOTS_VOLUME]
        .into_iter()
        .find(|v| named("volumes", v))
    {
        return Err(PodError::VolumeTaken { name });
    }
    Ok(Some(Plan {
        containers,
        transparent,
        ports: app_ports(containers)?,
        probe_ops,
        probers,
    }))
}

/// Whether the pod's traffic is intercepted transparently, and whether
/// its probes are rewritten, from its annotations.
fn interception(annotations: &Value, cfg: &InjectConfig) -> Result<(bool, bool), PodError> {
    let transparent = match annotations[INTERCEPTION_ANNOTATION].as_str() {
        None => cfg.interception == Interception::Transparent,
        Some("explicit") => false,
        Some("transparent") => true,
        Some(other) => {
            return Err(PodError::Interception {
                value: other.to_string(),
            });
        }
    };
    let rewrite_probes = match annotations[REWRITE_PROBES_ANNOTATION].as_str() {
        None | Some("true") => transparent,
        Some("false") => false,
        Some(other) => {
            return Err(PodError::RewriteProbes {
                value: other.to_string(),
            });
        }
    };
    Ok((transparent, rewrite_probes))
}

/// The app's TCP container ports, in order, none of them one the sidecar
/// listens on.
fn app_ports(containers: &[Value]) -> Result<Vec<u16>, PodError> {
    let mut ports: Vec<u16> = Vec::new();
    for c in containers {
        for p in c["ports"].as_array().into_iter().flatten() {
            let tcp = p["protocol"].as_str().unwrap_or("TCP") == "TCP";
            if let Some(n) = p["containerPort"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
                && tcp
                && !ports.contains(&n)
            {
                ports.push(n);
            }
        }
    }
    if let Some(&port) = ports
        .iter()
        .find(|p| [OUTBOUND_PORT, INBOUND_PORT, HEALTH_PORT, METRICS_PORT].contains(*p))
    {
        return Err(PodError::PortTaken { port });
    }
    Ok(ports)
}

/// An env entry from a field of the pod.
fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

/// `strait-sidecar`'s command line: the app's `ports` (none: 8080).
fn sidecar_command(cfg: &InjectConfig, ports: &[u16]) -> Vec<String> {
    let app = ports.first().copied().unwrap_or(8080);
    let mut args = vec![
        "--workload=$(POD_NAME)".to_string(),
        "--namespace=$(POD_NAMESPACE)".to_string(),
        "--service-account=$(SERVICE_ACCOUNT)".to_string(),
        format!("--control-plane={}", cfg.control_plane),
        "--token=/var/run/secrets/strait/tokens/istio-token".to_string(),
        "--root-cert=/etc/strait/roots/root-cert.pem".to_string(),
        format!("--inbound=0.0.0.0:{INBOUND_PORT}"),
        format!("--app=127.0.0.1:{app}"),
        format!("--outbound=127.0.0.1:{OUTBOUND_PORT}"),
        format!("--health-listen=0.0.0.0:{HEALTH_PORT}"),
        format!("--metrics-listen=0.0.0.0:{METRICS_PORT}"),
        "--log-format=json".to_string(),
    ];
    if ports.len() > 1 {
        let others: Vec<String> = ports[1..].iter().map(u16::to_string).collect();
        args.push(format!("--app-ports={}", others.join(",")));
    }
    args
}

/// The `strait-sidecar` container, running `probers` (the app's probes)
/// when there are any.
fn sidecar_container(cfg: &InjectConfig, ports: &[u16], probers: &AppProbers) -> Value {
    let mut args = sidecar_command(cfg, ports);
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ];
    if !probers.is_empty() {
        // Kubernetes expands $(VAR) in env values; $$ keeps a '$'.
        env.push(json!({"name": probe::ENV, "value": probers.to_json().replace('$', "$$")}));
        // Probed where the kubelet would have: the pod's IP.
        env.push(field_env("POD_IP", "status.podIP"));
        args.push("--app-probe-address=$(POD_IP)".to_string());
    }
    json!({
        "name": CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["strait-sidecar"],
        "args": args,
        "env": env,
        "ports": [
            {"name": "tls-inbound", "containerPort": INBOUND_PORT},
            {"name": "http-health", "containerPort": HEALTH_PORT},
            {"name": "http-metrics", "containerPort": METRICS_PORT},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT},
            "periodSeconds": 5,
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "128Mi"},
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": "/var/run/secrets/strait/tokens", "readOnly": true},
            {"name": ROOTS_VOLUME, "mountPath": "/etc/strait/roots", "readOnly": true},
        ],
    })
}

/// The sidecar's volumes: its projected token (audience `istio-ca`) and
/// the mesh roots' ConfigMap.
fn volumes() -> [Value; 2] {
    let token = json!({
        "name": TOKEN_VOLUME,
        "projected": {
            // Readable by the sidecar's user whatever the pod's fsGroup.
            "defaultMode": 0o444,
            "sources": [{"serviceAccountToken": {
                "audience": crate::ca::service::KUBE_AUDIENCE,
                "expirationSeconds": 3600,
                "path": "istio-token",
            }}],
        },
    });
    let roots = json!({
        "name": ROOTS_VOLUME,
        "configMap": {"name": super::roots::NAME},
    });
    [token, roots]
}

/// Explicit interception: `http_proxy` (and `no_proxy` for loopback) on
/// every app container that does not set it itself.
fn proxy_env_ops(containers: &[Value]) -> Vec<Value> {
    let proxy = format!("http://127.0.0.1:{OUTBOUND_PORT}");
    let mut ops = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let env = c["env"].as_array();
        let sets = |name: &str| env.is_some_and(|e| e.iter().any(|v| v["name"] == name));
        if env.is_none() {
            ops.push(
                json!({"op": "add", "path": format!("/spec/containers/{i}/env"), "value": []}),
            );
        }
        for (name, value) in [
            ("http_proxy", proxy.as_str()),
            ("HTTP_PROXY", proxy.as_str()),
            ("no_proxy", "localhost,127.0.0.1"),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ] {
            if !sets(name) {
                ops.push(json!({
                    "op": "add",
                    "path": format!("/spec/containers/{i}/env/-"),
                    "value": {"name": name, "value": value},
                }));
            }
        }
    }
    ops
}

/// Marks the pod injected ([`STATUS_ANNOTATION`]).
fn status_annotation_ops(annotations: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    if !annotations.is_object() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    ops.push(json!({
        "op": "add",
        "path": format!("/metadata/annotations/{}", STATUS_ANNOTATION.replace('/', "~1")),
        "value": "injected",
    }));
    ops
}

/// `strait-init`: the iptables rules of transparent interception, applied
/// in the pod's network namespace before the app and the sidecar start.
fn init_container(cfg: &InjectConfig) -> Value {
    json!({
        "name": INIT_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["strait"],
        "args": [
            "sidecar",
            "iptables",
            "--apply",
            format!("--proxy-uid={PROXY_UID}"),
            format!("--inbound-port={INBOUND_PORT}"),
            format!("--outbound-port={OUTBOUND_PORT}"),
        ],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"},
        },
        // As istio-init: root in the pod's network namespace with the two
        // capabilities iptables needs, nothing else; iptables may write
        // its lock file.
        "securityContext": {
            "runAsNonRoot": false,
            "runAsUser": 0,
            "runAsGroup": 0,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(super) fn cfg() -> InjectConfig {
        InjectConfig {
            image: "strait:dev".into(),
            control_plane: "controlplane.strait-system.svc:15012".into(),
            interception: Interception::Explicit,
        }
    }

    fn pod(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "demo"}, "spec": spec})
    }

    fn review_of(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "namespace": "demo",
                "object": object,
            },
        }))
        .unwrap()
    }

    /// Applies a JSON Patch of `add` and `replace` operations (all the
    /// injector makes).
    pub(super) fn apply(mut doc: Value, ops: &[Value]) -> Value {
        for op in ops {
            let replace = op["op"] == "replace";
            assert!(replace || op["op"] == "add", "{op}");
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap();
            let last = last.replace("~1", "/").replace("~0", "~");
            let mut target = &mut doc;
            for seg in parent.split('/').skip(1) {
                target = match target {
                    Value::Array(a) => &mut a[seg.parse::<usize>().unwrap()],
                    other => &mut other[seg],
                };
            }
            match target {
                Value::Array(a) if last == "-" && !replace => a.push(op["value"].clone()),
                Value::Object(o) => {
                    let old = o.insert(last, op["value"].clone());
                    assert_eq!(
                        old.is_some(),
                        replace,
                        "{op}: replace needs the member, add must not"
                    );
                }
                other => panic!("cannot add {path} to {other}"),
            }
        }
        doc
    }

    pub(super) fn sidecar_args(patched: &Value) -> Vec<String> {
        patched["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == CONTAINER)
            .unwrap()["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_pod_gets_the_sidecar_its_volumes_the_proxy_and_the_annotation() {
        let p = pod(json!({"containers": [
            {"name": "app", "image": "app", "ports": [{"containerPort": 9080}, {"containerPort": 9090}, {"containerPort": 53, "protocol": "UDP"}]},
        ]}));
        let ops = patch_for(&p, &cfg()).unwrap().unwrap();
        let patched = apply(p, &ops);
        let args = sidecar_args(&patched);
        assert!(
            args.contains(&"--app=127.0.0.1:9080".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"--app-ports=9090".to_string()), "{args:?}");
        assert!(args.contains(&"--control-plane=controlplane.strait-system.svc:15012".to_string()));
        let volumes = patched["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 2);
        assert_eq!(
            volumes[0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "istio-ca"
        );
        assert_eq!(volumes[1]["configMap"]["name"], "strait-ca-root-cert");
        let app_env = patched["spec"]["containers"][0]["env"].as_array().unwrap();
        assert!(
            app_env
                .iter()
                .any(|e| e["name"] == "http_proxy" && e["value"] == "http://127.0.0.1:15001")
        );
        assert_eq!(
            patched["metadata"]["annotations"][STATUS_ANNOTATION],
            "injected"
        );
        // Injecting the injected pod again changes nothing.
        assert_eq!(patch_for(&patched, &cfg()).unwrap(), None);
    }

    #[test]
    fn the_configured_interception_applies_unless_the_pod_says_otherwise() {
        let transparent = InjectConfig {
            interception: Interception::Transparent,
            ..cfg()
        };
        let has_init = |p: &Value, cfg: &InjectConfig| {
            let ops = patch_for(p, cfg).unwrap().unwrap();
            ops.iter().any(|o| o["path"] == "/spec/initContainers/-")
        };
        let plain = pod(json!({"containers": [{"name": "app"}]}));
        assert!(has_init(&plain, &transparent));
        assert!(!has_init(&plain, &cfg()), "explicit is the default");
        let explicit = json!({
            "metadata": {"annotations": {INTERCEPTION_ANNOTATION: "explicit"}},
            "spec": {"containers": [{"name": "app"}]},
        });
        assert!(
            !has_init(&explicit, &transparent),
            "the pod's annotation wins"
        );
    }

    #[test]
    fn a_transparent_pod_gets_the_iptables_init_container_and_no_proxy_setting() {
        let p = json!({
            "metadata": {"annotations": {INTERCEPTION_ANNOTATION: "transparent"}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "db"}],
                "containers": [{"name": "app", "ports": [{"containerPort": 9080}]}],
            },
        });
        let patched = apply(p.clone(), &patch_for(&p, &cfg()).unwrap().unwrap());
        let inits = patched["spec"]["initContainers"].as_array().unwrap();
        // After the pod's own init containers, which reach the network
        // directly.
        assert_eq!(inits.len(), 2);
        assert_eq!(inits[0]["name"], "migrate");
        let init = &inits[1];
        assert_eq!(init["name"], INIT_CONTAINER);
        assert_eq!(init["image"], "strait:dev");
        assert_eq!(init["command"], json!(["strait"]));
        assert_eq!(
            init["args"],
            json!([
                "sidecar",
                "iptables",
                "--apply",
                "--proxy-uid=1337",
                "--inbound-port=15006",
                "--outbound-port=15001"
            ])
        );
        assert_eq!(
            init["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(init["securityContext"]["runAsUser"], 0);
        // The sidecar runs as the uid the rules spare.
        let sidecar = patched["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == CONTAINER)
            .unwrap();
        assert_eq!(sidecar["securityContext"]["runAsUser"], 1337);
        // Redirected, the app needs no proxy setting.
        assert!(
            patched["spec"]["containers"][0]["env"].is_null(),
            "{patched}"
        );
        assert_eq!(patch_for(&patched, &cfg()).unwrap(), None);

        // Without init containers of its own, the list is made.
        let bare = json!({
            "metadata": {"annotations": {INTERCEPTION_ANNOTATION: "transparent"}},
            "spec": {"containers": [{"name": "app"}]},
        });
        let patched = apply(bare.clone(), &patch_for(&bare, &cfg()).unwrap().unwrap());
        assert_eq!(patched["spec"]["initContainers"][0]["name"], INIT_CONTAINER);
        // `explicit` is the default, said out loud.
        let explicit = json!({
            "metadata": {"annotations": {INTERCEPTION_ANNOTATION: "explicit"}},
            "spec": {"containers": [{"name": "app"}]},
        });
        let patched = apply(
            explicit.clone(),
            &patch_for(&explicit, &cfg()).unwrap().unwrap(),
        );
        assert!(patched["spec"]["initContainers"].is_null());
        assert!(patched["spec"]["containers"][0]["env"].is_array());
    }

    #[test]
    fn existing_volumes_env_and_annotations_are_kept() {
        let p = json!({
            "metadata": {"annotations": {"team": "shop"}},
            "spec": {
                "volumes": [{"name": "data", "emptyDir": {}}],
                "containers": [{"name": "app", "env": [{"name": "HTTP_PROXY", "value": "http://corp:3128"}]}],
            },
        });
        let patched = apply(p.clone(), &patch_for(&p, &cfg()).unwrap().unwrap());
        assert_eq!(patched["spec"]["volumes"].as_array().unwrap().len(), 3);
        assert_eq!(patched["metadata"]["annotations"]["team"], "shop");
        let env = patched["spec"]["containers"][0]["env"].as_array().unwrap();
        // The app's own proxy setting stays; the others are added.
        assert_eq!(env.iter().filter(|e| e["name"] == "HTTP_PROXY").count(), 1);
        assert_eq!(env[0]["value"], "http://corp:3128");
        assert!(env.iter().any(|e| e["name"] == "http_proxy"));
        // No ports declared: the app is taken to serve 8080.
        assert!(sidecar_args(&patched).contains(&"--app=127.0.0.1:8080".to_string()));
    }

    #[test]
    fn pods_that_opt_out_or_cannot_have_it_are_left_alone() {
        let c = json!([{"name": "app"}]);
        let out = json!({"metadata": {"annotations": {INJECT_ANNOTATION: "false"}}, "spec": {"containers": c}});
        assert_eq!(patch_for(&out, &cfg()).unwrap(), None);
        let host = json!({"spec": {"hostNetwork": true, "containers": c}});
        assert_eq!(patch_for(&host, &cfg()).unwrap(), None);
        let has = json!({"spec": {"containers": [{"name": "app"}, {"name": CONTAINER}]}});
        assert_eq!(patch_for(&has, &cfg()).unwrap(), None);
    }

    #[test]
    fn malformed_pods_are_refused_with_the_reason() {
        let err = |p: Value| patch_for(&p, &cfg()).unwrap_err().to_string();
        assert!(err(json!({"spec": {}})).contains("spec.containers"));
        assert!(err(json!({"spec": {"containers": []}})).contains("no containers"));
        assert!(
            err(json!({"spec": {"containers": [{"name": "a", "ports": [{"containerPort": 15006}]}]}}))
                .contains("15006")
        );
        assert!(
            err(json!({"spec": {"containers": [{"name": "a"}], "volumes": [{"name": "strait-token"}]}}))
                .contains("strait-token")
        );
        let e = err(json!({
            "metadata": {"annotations": {INTERCEPTION_ANNOTATION: "REDIRECT"}},
            "spec": {"containers": [{"name": "a"}]},
        }));
        assert!(
            e.contains("\"REDIRECT\"") && e.contains(INTERCEPTION_ANNOTATION),
            "{e}"
        );
        let e = err(json!({
            "metadata": {"annotations": {INTERCEPTION_ANNOTATION: "transparent"}},
            "spec": {"containers": [{"name": "a"}], "initContainers": [{"name": INIT_CONTAINER}]},
        }));
        assert!(e.contains(INIT_CONTAINER), "{e}");
    }

    #[test]
    fn a_review_is_answered_with_its_uid_and_a_base64_patch() {
        let body = review_of(pod(json!({"containers": [{"name": "app"}]})));
        let answer = review(&body, &cfg()).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let r = &answer["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        assert!(ops.iter().any(|o| o["path"] == "/spec/containers/-"));
        // Not a pod: allowed, unchanged.
        let mut other: Value = serde_json::from_slice(&body).unwrap();
        other["request"]["kind"]["kind"] = json!("Service");
        let answer = review(&serde_json::to_vec(&other).unwrap(), &cfg()).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    #[test]
    fn bad_reviews_are_refused_and_named() {
        let err = |b: &[u8]| review(b, &cfg()).unwrap_err().to_string();
        assert!(err(b"").contains("not JSON"));
        assert!(err(b"[1,2]").contains("AdmissionReview"));
        assert!(
            err(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#)
                .contains("v1beta1")
        );
        assert!(
            err(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#)
                .contains("uid")
        );
        let mut v: Value = serde_json::from_slice(&review_of(json!("a string"))).unwrap();
        v["request"]["object"] = json!("a string");
        assert!(err(&serde_json::to_vec(&v).unwrap()).contains("not a pod"));
        assert!(err(&vec![b' '; MAX_REVIEW + 1]).contains("more than"));
    }
}
