//! Pure conversions from Kubernetes API objects to the documents of a
//! [`Config`](crate::source::Config): no client, no clock.
//!
//! - [`document`]: an object as served (list items lack `apiVersion` and
//!   `kind`) → the Kubernetes-style JSON document the config model reads.
//! - [`pod_workload`]: a pod (with its node and what the EndpointSlices
//!   say of its address) → the `WorkloadEntry` it stands for, or why it is
//!   not a workload.
//! - [`object_file`]: the synthetic "file" an object is read from
//!   (`kube://<kind>/<namespace>/<name>`), so that rejections name it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Map, Value, json};
use strait_model::objects::{CLUSTER_LABEL, ISTIO_NETWORKING_V1};

use crate::resources::INBOUND_PORT_ANNOTATION;

/// The node label giving the node's region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The node label giving the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The pod label naming the pod's network (Istio's); the cluster's network
/// when absent.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

/// The synthetic file an object is read from: `kube://<kind>/<namespace>/<name>`
/// (`kube://<kind>/<name>` for a cluster-scoped object).
pub fn object_file(kind: &str, namespace: &str, name: &str) -> PathBuf {
    if namespace.is_empty() {
        PathBuf::from(format!("kube://{kind}/{name}"))
    } else {
        PathBuf::from(format!("kube://{kind}/{namespace}/{name}"))
    }
}

/// An object the API served that is not a JSON mapping ([`document`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{api_version} {kind}: the object is not a JSON mapping")]
pub struct NotAMapping {
    pub api_version: String,
    pub kind: String,
}

/// An object as the API served it → its config document: `apiVersion` and
/// `kind` set from the watched resource (items of a list carry neither),
/// and the bookkeeping that changes on every write (`managedFields`,
/// `resourceVersion`) dropped so that a no-op update is not a config change.
/// Fails when the object is not a JSON mapping.
pub fn document(api_version: &str, kind: &str, mut object: Value) -> Result<Value, NotAMapping> {
    let Some(map) = object.as_object_mut() else {
        return Err(NotAMapping {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
        });
    };
    map.insert("apiVersion".into(), Value::String(api_version.into()));
    map.insert("kind".into(), Value::String(kind.into()));
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    Ok(object)
}

/// `region/zone` of a node from its topology labels (`region` alone when
/// it has no zone); `None` when it has no region.
pub fn node_locality(node: &Node) -> Option<String> {
    let labels = node.metadata.labels.as_ref()?;
    let region = labels.get(REGION_LABEL).filter(|r| !r.is_empty())?;
    match labels.get(ZONE_LABEL).filter(|z| !z.is_empty()) {
        Some(zone) => Some(format!("{region}/{zone}")),
        None => Some(region.clone()),
    }
}

/// What the EndpointSlices say of each address's readiness, by
/// `(namespace, address)`. An address listed by several slices is ready
/// only if none of them says it is not; endpoints without a `ready`
/// condition say nothing.
pub fn slice_readiness<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<(String, String), bool> {
    let mut out: BTreeMap<(String, String), bool> = BTreeMap::new();
    for slice in slices {
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        for endpoint in &slice.endpoints {
            let Some(ready) = endpoint.conditions.as_ref().and_then(|c| c.ready) else {
                continue;
            };
            for address in &endpoint.addresses {
                out.entry((namespace.clone(), address.clone()))
                    .and_modify(|r| *r &= ready)
                    .or_insert(ready);
            }
        }
    }
    out
}

/// Why a pod is not a workload (not an error: most of these are passing
/// states of a pod's life).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotWorkload {
    #[error("{0} is missing")]
    MissingField(&'static str),
    #[error("the pod is terminating")]
    Terminating,
    #[error("the pod uses the host network")]
    HostNetwork,
    #[error("the pod is {0}, not Running")]
    NotRunning(String),
    #[error("the pod has no IP address yet")]
    NoAddress,
    #[error("the pod is not ready")]
    NotReady,
}

/// Whether the pod's `Ready` condition is `True`.
fn pod_condition_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The `WorkloadEntry` document a pod stands for.
///
/// A pod is a workload when it is not terminating, not on the host network,
/// `Running`, has an IP and is ready. Readiness is what the EndpointSlices
/// say of the pod's address (`slice_ready`, from [`slice_readiness`]) when
/// they say anything, as that is what Kubernetes' own service routing
/// follows; otherwise the pod's `Ready` condition.
///
/// The entry: name and namespace of the pod, `address` = pod IP, `labels`
/// = pod labels, `serviceAccount` (`default` when unset), `network` = the
/// pod's `topology.istio.io/network` label or `network`, `locality` =
/// `region/zone` of its node when known. The pod's
/// `strait.io/inbound-port` annotation is carried over.
pub fn pod_workload(
    pod: &Pod,
    node: Option<&Node>,
    slice_ready: Option<bool>,
    cluster: &str,
    network: &str,
) -> Result<Value, NotWorkload> {
    let meta = &pod.metadata;
    let name = meta
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(NotWorkload::MissingField("metadata.name"))?;
    let namespace = meta
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(NotWorkload::MissingField("metadata.namespace"))?;
    if meta.deletion_timestamp.is_some() {
        return Err(NotWorkload::Terminating);
    }
    let spec = pod.spec.as_ref().ok_or(NotWorkload::MissingField("spec"))?;
    if spec.host_network == Some(true) {
        return Err(NotWorkload::HostNetwork);
    }
    let status = pod
        .status
        .as_ref()
        .ok_or(NotWorkload::MissingField("status"))?;
    match status.phase.as_deref() {
        Some("Running") => {}
        Some(phase) => return Err(NotWorkload::NotRunning(phase.to_string())),
        None => return Err(NotWorkload::NotRunning("in no phase".into())),
    }
    let address = status
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
        .ok_or(NotWorkload::NoAddress)?;
    if !slice_ready.unwrap_or_else(|| pod_condition_ready(pod)) {
        return Err(NotWorkload::NotReady);
    }

    let labels = meta.labels.clone().unwrap_or_default();
    let network = labels
        .get(NETWORK_LABEL)
        .filter(|n| !n.is_empty())
        .map_or(network, String::as_str);
    let service_account = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");

    let mut spec_doc = Map::new();
    spec_doc.insert("address".into(), json!(address));
    if !labels.is_empty() {
        spec_doc.insert("labels".into(), json!(labels));
    }
    spec_doc.insert("serviceAccount".into(), json!(service_account));
    if !network.is_empty() {
        spec_doc.insert("network".into(), json!(network));
    }
    if let Some(locality) = node.and_then(node_locality) {
        spec_doc.insert("locality".into(), json!(locality));
    }

    let mut meta_labels = labels;
    if !cluster.is_empty() {
        meta_labels.insert(CLUSTER_LABEL.into(), cluster.into());
    }
    let mut meta_doc = Map::new();
    meta_doc.insert("name".into(), json!(name));
    meta_doc.insert("namespace".into(), json!(namespace));
    if !meta_labels.is_empty() {
        meta_doc.insert("labels".into(), json!(meta_labels));
    }
    if let Some(port) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(INBOUND_PORT_ANNOTATION))
    {
        meta_doc.insert(
            "annotations".into(),
            json!({ INBOUND_PORT_ANNOTATION: port }),
        );
    }
    Ok(json!({
        "apiVersion": ISTIO_NETWORKING_V1,
        "kind": "WorkloadEntry",
        "metadata": meta_doc,
        "spec": spec_doc,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::source::check;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).expect("a pod")
    }

    fn node(labels: Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n1", "labels": labels}})).unwrap()
    }

    /// A running, ready pod; `patch` is merged over it (a JSON merge patch:
    /// `null` removes a field).
    fn running(patch: Value) -> Pod {
        let mut base = json!({
            "metadata": {"name": "reviews-v1-abc", "namespace": "bookinfo",
                         "labels": {"app": "reviews", "version": "v1"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "bookinfo-reviews",
                     "containers": [{"name": "reviews", "image": "reviews:1"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.7",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        });
        merge(&mut base, patch);
        pod(base)
    }

    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(b), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        b.remove(&k);
                    } else {
                        merge(b.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
            (b, p) => *b = p,
        }
    }

    #[test]
    fn a_running_ready_pod_is_a_workload_entry() {
        let n = node(json!({REGION_LABEL: "eu-west1", ZONE_LABEL: "eu-west1-b"}));
        let we = pod_workload(&running(json!({})), Some(&n), None, "east", "net-east").unwrap();
        assert_eq!(
            we,
            json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "WorkloadEntry",
                "metadata": {"name": "reviews-v1-abc", "namespace": "bookinfo",
                             "labels": {"app": "reviews", "version": "v1", CLUSTER_LABEL: "east"}},
                "spec": {"address": "10.244.1.7",
                         "labels": {"app": "reviews", "version": "v1"},
                         "serviceAccount": "bookinfo-reviews",
                         "network": "net-east",
                         "locality": "eu-west1/eu-west1-b"},
            })
        );
        let key = check(&we).expect("a valid WorkloadEntry");
        assert_eq!(key.to_string(), "WorkloadEntry bookinfo/reviews-v1-abc");
    }

    #[test]
    fn optional_parts_of_the_entry() {
        type Case = (&'static str, Value, Option<Node>, &'static str, Value);
        let cases: Vec<Case> = vec![
            (
                "network label wins over the cluster's network",
                json!({"metadata": {"labels": {NETWORK_LABEL: "net-b"}}}),
                None,
                "/spec/network",
                json!("net-b"),
            ),
            (
                "no service account means default",
                json!({"spec": {"serviceAccountName": null}}),
                None,
                "/spec/serviceAccount",
                json!("default"),
            ),
            (
                "region without zone",
                json!({}),
                Some(node(json!({REGION_LABEL: "us"}))),
                "/spec/locality",
                json!("us"),
            ),
            (
                "zone without region gives no locality",
                json!({}),
                Some(node(json!({ZONE_LABEL: "us-a"}))),
                "/spec/locality",
                Value::Null,
            ),
            (
                "unknown node gives no locality",
                json!({}),
                None,
                "/spec/locality",
                Value::Null,
            ),
            (
                "inbound port annotation is carried over",
                json!({"metadata": {"annotations": {INBOUND_PORT_ANNOTATION: "15007", "other": "x"}}}),
                None,
                "/metadata/annotations",
                json!({INBOUND_PORT_ANNOTATION: "15007"}),
            ),
            (
                "no labels",
                json!({"metadata": {"labels": null}}),
                None,
                "/spec/labels",
                Value::Null,
            ),
        ];
        for (what, patch, n, pointer, want) in cases {
            let we = pod_workload(&running(patch), n.as_ref(), None, "east", "net-a")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = we.pointer(pointer).cloned().unwrap_or(Value::Null);
            assert_eq!(got, want, "{what}");
            check(&we).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        }
    }

    #[test]
    fn pods_that_are_not_workloads() {
        let cases: Vec<(&str, Value, Option<bool>, NotWorkload)> = vec![
            (
                "no IP",
                json!({"status": {"podIP": null}}),
                None,
                NotWorkload::NoAddress,
            ),
            (
                "empty IP",
                json!({"status": {"podIP": ""}}),
                None,
                NotWorkload::NoAddress,
            ),
            (
                "pending",
                json!({"status": {"phase": "Pending"}}),
                None,
                NotWorkload::NotRunning("Pending".into()),
            ),
            (
                "no phase",
                json!({"status": {"phase": null}}),
                None,
                NotWorkload::NotRunning("in no phase".into()),
            ),
            (
                "Ready condition False",
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
                None,
                NotWorkload::NotReady,
            ),
            (
                "no conditions",
                json!({"status": {"conditions": null}}),
                None,
                NotWorkload::NotReady,
            ),
            (
                "slice says not ready although the pod condition is True",
                json!({}),
                Some(false),
                NotWorkload::NotReady,
            ),
            (
                "host network",
                json!({"spec": {"hostNetwork": true}}),
                None,
                NotWorkload::HostNetwork,
            ),
            (
                "terminating",
                json!({"metadata": {"deletionTimestamp": "2025-01-01T00:00:00Z"}}),
                None,
                NotWorkload::Terminating,
            ),
            (
                "no name",
                json!({"metadata": {"name": null}}),
                None,
                NotWorkload::MissingField("metadata.name"),
            ),
            (
                "no namespace",
                json!({"metadata": {"namespace": null}}),
                None,
                NotWorkload::MissingField("metadata.namespace"),
            ),
            (
                "no spec",
                json!({"spec": null}),
                None,
                NotWorkload::MissingField("spec"),
            ),
            (
                "no status",
                json!({"status": null}),
                None,
                NotWorkload::MissingField("status"),
            ),
        ];
        for (what, patch, slice_ready, want) in cases {
            let got = pod_workload(&running(patch), None, slice_ready, "c", "n");
            assert_eq!(got, Err(want), "{what}");
        }
    }

    #[test]
    fn the_slice_can_make_a_pod_ready() {
        let not_ready =
            running(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}));
        assert!(pod_workload(&not_ready, None, Some(true), "c", "n").is_ok());
    }

    #[test]
    fn slice_readiness_by_namespace_and_address() {
        let slices: Vec<EndpointSlice> = serde_json::from_value(json!([
            {"metadata": {"name": "a-1", "namespace": "ns"}, "addressType": "IPv4", "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
            ]},
            {"metadata": {"name": "b-1", "namespace": "ns"}, "addressType": "IPv4", "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": false}},
            ]},
            {"metadata": {"name": "c-1", "namespace": "other"}, "addressType": "IPv4", "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
            ]},
        ]))
        .unwrap();
        let r = slice_readiness(&slices);
        let at = |ns: &str, a: &str| r.get(&(ns.to_string(), a.to_string())).copied();
        assert_eq!(
            at("ns", "10.0.0.1"),
            Some(false),
            "one slice says not ready"
        );
        assert_eq!(at("ns", "10.0.0.2"), Some(false));
        assert_eq!(at("ns", "10.0.0.3"), None, "no condition says nothing");
        assert_eq!(at("other", "10.0.0.2"), Some(true));
    }

    #[test]
    fn documents_get_their_type_and_lose_bookkeeping() {
        let doc = document(
            "networking.istio.io/v1",
            "DestinationRule",
            json!({"metadata": {"name": "r", "namespace": "ns", "resourceVersion": "7",
                                "managedFields": [{"manager": "kubectl"}]},
                   "spec": {"host": "r"}}),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                   "metadata": {"name": "r", "namespace": "ns"}, "spec": {"host": "r"}})
        );
        let err = document("v1", "Service", json!([1]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("v1 Service"), "{err}");
    }

    #[test]
    fn object_files_name_the_object() {
        assert_eq!(
            object_file("Service", "bookinfo", "reviews"),
            PathBuf::from("kube://Service/bookinfo/reviews")
        );
        assert_eq!(
            object_file("Namespace", "", "bookinfo"),
            PathBuf::from("kube://Namespace/bookinfo")
        );
    }
}
