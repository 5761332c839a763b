//! What a cluster exports, computed from its Kubernetes-style objects:
//! `Service`s (with the export annotations or an MCS `ServiceExport`) and the
//! `WorkloadEntry`s their selectors pick (the workloads of a config
//! directory: address, labels, service account, locality).
//!
//! Every object is judged on its own: a bad one is reported with its kind,
//! namespace and name, and the rest still export.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::export::{self, ObjectKind, ObjectRef};
use crate::mesh::{
    ExportTo, ExportedService, LocalService, Locality, LocalityEndpoints, ModelError, Protocol,
    ServiceKey, ServicePort,
};

/// The exports found, and the objects that were refused (one message each).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalExports {
    pub exports: Vec<ExportedService>,
    pub errors: Vec<String>,
}

/// Why a `Service` object does not make an export (reported after the
/// object's kind, namespace and name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ServiceError {
    #[error("spec.ports is missing")]
    NoPorts,
    #[error("spec.ports[{index}].port is not a port number")]
    PortNumber { index: usize },
    #[error("spec.ports[{index}]: {source}")]
    Port {
        index: usize,
        #[source]
        source: ModelError,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

struct Workload {
    namespace: String,
    labels: BTreeMap<String, String>,
    address: String,
    service_account: String,
    locality: Option<Locality>,
}

/// A JSON object's string values by key (`metadata.labels`, a selector);
/// empty when `v` is not an object, values that are not strings left out.
pub fn str_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn meta(doc: &Value) -> (String, String) {
    let m = &doc["metadata"];
    (
        m["namespace"].as_str().unwrap_or("default").to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// The protocol of a Service port, as Istio selects it: `appProtocol`,
/// then the port name's prefix, else TCP.
fn port_protocol(port: &Value) -> Result<Protocol, ModelError> {
    if let Some(app) = port["appProtocol"].as_str() {
        return Protocol::parse(app);
    }
    let name = port["name"].as_str().unwrap_or_default();
    Ok(Protocol::from_port_name(name).unwrap_or(Protocol::Tcp))
}

fn service_ports(doc: &Value) -> Result<Vec<ServicePort>, ServiceError> {
    let ports = doc["spec"]["ports"]
        .as_array()
        .ok_or(ServiceError::NoPorts)?;
    ports
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let number = p["port"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or(ServiceError::PortNumber { index })?;
            let name = p["name"]
                .as_str()
                .map_or_else(|| format!("port-{number}"), str::to_string);
            let target = p["targetPort"].as_u64().and_then(|n| u16::try_from(n).ok());
            port_protocol(p)
                .and_then(|protocol| ServicePort::new(&name, number, protocol, target))
                .map_err(|source| ServiceError::Port { index, source })
        })
        .collect()
}

/// Computes the exports of a set of objects (a config directory's YAML
/// documents, already parsed).
pub fn local_exports(docs: &[Value]) -> LocalExports {
    let mut out = LocalExports::default();
    let mut workloads = Vec::new();
    let mut service_exports: BTreeMap<(String, String), (ObjectRef, BTreeMap<String, String>)> =
        BTreeMap::new();
    let mut services = Vec::new();
    for doc in docs {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let (ns, name) = meta(doc);
        match (api, kind) {
            (a, "WorkloadEntry") if a.starts_with("networking.istio.io/") => {
                let spec = &doc["spec"];
                let Some(address) = spec["address"].as_str() else {
                    out.errors.push(format!(
                        "WorkloadEntry {ns}/{name}: spec.address is missing"
                    ));
                    continue;
                };
                let locality = match spec["locality"].as_str() {
                    Some(l) if !l.is_empty() => match Locality::parse(l) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            out.errors.push(format!("WorkloadEntry {ns}/{name}: {e}"));
                            continue;
                        }
                    },
                    _ => None,
                };
                workloads.push(Workload {
                    namespace: ns,
                    labels: str_map(spec.get("labels")),
                    address: address.to_string(),
                    service_account: spec["serviceAccount"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string(),
                    locality,
                });
            }
            _ => match ObjectKind::from_type_meta(api, kind) {
                Ok(Some(ObjectKind::ServiceExport)) => {
                    let r = ObjectRef::new(ObjectKind::ServiceExport, &ns, &name);
                    service_exports
                        .insert((ns, name), (r, str_map(doc["metadata"].get("annotations"))));
                }
                Ok(Some(ObjectKind::Service)) => services.push(doc),
                Ok(Some(k)) => out.errors.push(format!(
                    "{} {ns}/{name}: exporting a {} is not supported from a static config",
                    k.as_str(),
                    k.as_str()
                )),
                Ok(None) => {}
                Err(e) => out.errors.push(e.to_string()),
            },
        }
    }
    for doc in services {
        let (ns, name) = meta(doc);
        let object = ObjectRef::new(ObjectKind::Service, &ns, &name);
        let annotations = str_map(doc["metadata"].get("annotations"));
        let se = service_exports.remove(&(ns.clone(), name.clone()));
        let export_to = match export::export_decision_with_service_export(
            &object,
            &annotations,
            se.as_ref().map(|(r, a)| (r, a)),
        ) {
            Ok(Some(to)) => to,
            Ok(None) => continue,
            Err(e) => {
                out.errors.push(e.to_string());
                continue;
            }
        };
        match exported_service(doc, &ns, &name, export_to, &workloads) {
            Ok(s) => out.exports.push(s),
            Err(e) => out.errors.push(format!("{object}: {e}")),
        }
    }
    for (_, (r, _)) in service_exports {
        out.errors
            .push(format!("{r}: no Service of that name in its namespace"));
    }
    out
}

/// The export of one `Service` object: its ports and labels, and the
/// endpoints, service accounts and shared labels of the workloads its
/// selector picks in its namespace.
fn exported_service(
    doc: &Value,
    ns: &str,
    name: &str,
    export_to: ExportTo,
    workloads: &[Workload],
) -> Result<ExportedService, ServiceError> {
    let key = ServiceKey::new(ns, name)?;
    let mut s = ExportedService::new(key, service_ports(doc)?);
    s.labels = str_map(doc["metadata"].get("labels"));
    s.export_to = export_to;
    let selector = str_map(doc["spec"].get("selector"));
    let mut by_locality: BTreeMap<Option<Locality>, u32> = BTreeMap::new();
    let mut accounts = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let mut shared: Option<BTreeMap<String, String>> = None;
    for w in workloads.iter().filter(|w| {
        w.namespace == ns
            && !selector.is_empty()
            && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
    }) {
        *by_locality.entry(w.locality.clone()).or_default() += 1;
        accounts.insert(w.service_account.clone());
        shared = Some(match shared.take() {
            None => w.labels.clone(),
            Some(mut s) => {
                s.retain(|k, v| w.labels.get(k) == Some(v));
                s
            }
        });
        addresses.insert(w.address.clone());
    }
    s.endpoints = by_locality
        .into_iter()
        .map(|(locality, n)| LocalityEndpoints {
            locality,
            healthy: n,
            total: n,
        })
        .collect();
    s.service_accounts = accounts;
    // The selector's own labels say nothing an importer's selector
    // does not already say.
    s.endpoint_labels = shared
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !selector.contains_key(k))
        .collect();
    s.addresses = addresses.into_iter().collect();
    s.validate()?;
    Ok(s)
}

/// The `Service`s of a set of objects as an importer needs them (key,
/// selector, ports), so that imported endpoints can join local services of
/// the same name (namespace sameness). Objects that do not make a valid
/// service are skipped: [`local_exports`] reports them.
pub fn local_services(docs: &[Value]) -> Vec<LocalService> {
    docs.iter()
        .filter(|d| d["apiVersion"] == "v1" && d["kind"] == "Service")
        .filter_map(|doc| {
            let (ns, name) = meta(doc);
            let s = LocalService {
                key: ServiceKey::new(&ns, &name).ok()?,
                selector: str_map(doc["spec"].get("selector")),
                ports: service_ports(doc).ok()?,
            };
            s.validate().ok()?;
            Some(s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(name: &str, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations, "labels": {"app": name}},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8080, "targetPort": 80}]}
        })
    }

    fn workload(name: &str, app: &str, locality: &str, sa: &str) -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"address": format!("10.0.0.{}", name.len()), "labels": {"app": app},
                     "locality": locality, "serviceAccount": sa}
        })
    }

    #[test]
    fn exported_services_count_their_workloads() {
        let docs = vec![
            service("cart", json!({"strait.io/export": "true"})),
            service("private", json!({})),
            workload("a", "cart", "us-east/a", "cart"),
            workload("bb", "cart", "us-east/b", "cart"),
            workload("ccc", "other", "us-east/a", "other"),
        ];
        let out = local_exports(&docs);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.exports.len(), 1);
        let s = &out.exports[0];
        assert_eq!(s.key.to_string(), "shop/cart");
        assert_eq!(s.healthy(), 2);
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.service_accounts, ["cart".to_string()].into());
        assert_eq!(s.ports[0].protocol(), Protocol::Http);
        assert_eq!(s.addresses.len(), 2);
    }

    #[test]
    fn local_services_keep_selector_and_ports_and_skip_bad_ones() {
        let mut bad = service("bad", json!({}));
        bad["spec"]["ports"][0]["port"] = json!("x");
        let out = local_services(&[
            service("cart", json!({})),
            bad,
            workload("a", "cart", "r/z", "cart"),
        ]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key.to_string(), "shop/cart");
        assert_eq!(out[0].selector["app"], "cart");
        assert_eq!(out[0].ports[0].number(), 8080);
    }

    #[test]
    fn endpoint_labels_are_those_every_workload_shares_beyond_the_selector() {
        let mut a = workload("a", "cart", "us-east/a", "cart");
        a["spec"]["labels"] = json!({"app": "cart", "version": "v2", "track": "stable"});
        let mut b = workload("bb", "cart", "us-east/a", "cart");
        b["spec"]["labels"] = json!({"app": "cart", "version": "v2", "track": "canary"});
        let docs = vec![service("cart", json!({"strait.io/export": "true"})), a, b];
        let out = local_exports(&docs);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(
            out.exports[0].endpoint_labels,
            BTreeMap::from([("version".to_string(), "v2".to_string())])
        );
        // No workloads: no shared labels.
        let out = local_exports(&[service("cart", json!({"strait.io/export": "true"}))]);
        assert!(out.exports[0].endpoint_labels.is_empty());
    }

    #[test]
    fn service_export_exports_and_bad_objects_are_named() {
        let docs = vec![
            service("cart", json!({})),
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                   "metadata": {"name": "cart", "namespace": "shop",
                                "annotations": {"strait.io/export-to": "west"}}}),
            service("bad", json!({"strait.io/export": "yes"})),
            service(
                "badto",
                json!({"strait.io/export": "true", "strait.io/export-to": "West"}),
            ),
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                   "metadata": {"name": "ghost", "namespace": "shop"}}),
        ];
        let out = local_exports(&docs);
        assert_eq!(out.exports.len(), 1);
        assert_eq!(out.exports[0].key.name(), "cart");
        assert!(!out.exports[0].export_to.is_whole_mesh());
        assert_eq!(out.errors.len(), 3, "{:?}", out.errors);
        assert!(
            out.errors
                .iter()
                .any(|e| e.contains("shop/bad") && e.contains("\"yes\""))
        );
        assert!(out.errors.iter().any(|e| e.contains("shop/badto")));
        assert!(out.errors.iter().any(|e| e.contains("shop/ghost")));
    }

    #[test]
    fn bad_ports_are_refused_with_the_object() {
        let mut s = service("cart", json!({"strait.io/export": "true"}));
        s["spec"]["ports"][0]["port"] = json!(70000);
        let out = local_exports(&[s]);
        assert!(out.exports.is_empty());
        assert!(
            out.errors[0].contains("Service shop/cart") && out.errors[0].contains("ports[0]"),
            "{:?}",
            out.errors
        );
    }
}
