//! The write-back of imports to the Kubernetes API: server-side apply of
//! every imported `ServiceEntry`, `WorkloadEntry` and `ServiceImport`, and
//! deletion of the objects strait applied before (labelled
//! `app.kubernetes.io/managed-by: strait`) that are no longer imported.
//!
//! What to apply and what to delete is decided by pure functions
//! ([`desired`], [`stale`]); [`apply_imports`] only does the requests.

use std::collections::BTreeSet;

use ::kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde::Serialize;
use serde_json::Value;
use strait_model::ImportObjects;
use strait_model::objects::{ISTIO_NETWORKING_V1, MANAGED_BY, MANAGED_BY_LABEL, MCS_V1BETA1};

use super::KubeError;

/// A kind strait writes (and prunes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagedKind {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

/// The kinds of the imports, in the order they are applied.
pub const MANAGED: [ManagedKind; 3] = [
    ManagedKind {
        api_version: ISTIO_NETWORKING_V1,
        kind: "ServiceEntry",
        plural: "serviceentries",
    },
    ManagedKind {
        api_version: ISTIO_NETWORKING_V1,
        kind: "WorkloadEntry",
        plural: "workloadentries",
    },
    ManagedKind {
        api_version: MCS_V1BETA1,
        kind: "ServiceImport",
        plural: "serviceimports",
    },
];

impl ManagedKind {
    fn resource(&self) -> Result<ApiResource, KubeError> {
        let (group, version) =
            self.api_version
                .split_once('/')
                .ok_or_else(|| KubeError::ApiVersion {
                    object: self.kind.to_string(),
                    api_version: self.api_version.to_string(),
                })?;
        let gvk = GroupVersionKind::gvk(group, version, self.kind);
        Ok(ApiResource::from_gvk_with_plural(&gvk, self.plural))
    }
}

/// One object to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub kind: ManagedKind,
    pub namespace: String,
    pub name: String,
    /// The whole object, as sent in the apply patch.
    pub body: Value,
}

impl Desired {
    fn describe(&self) -> String {
        describe(self.kind.kind, &self.namespace, &self.name)
    }
}

fn describe(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind} {namespace}/{name}")
}

fn desired_of<T: Serialize>(
    kind: ManagedKind,
    objects: &[T],
    meta: impl Fn(&T) -> &strait_model::objects::ObjectMeta,
    out: &mut Vec<Desired>,
) -> Result<(), KubeError> {
    for o in objects {
        let m = meta(o);
        let body = serde_json::to_value(o).map_err(|source| KubeError::Serialize {
            object: describe(kind.kind, &m.namespace, &m.name),
            source,
        })?;
        out.push(Desired {
            kind,
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            body,
        });
    }
    Ok(())
}

/// Every object of the imports, as it is to be applied.
pub fn desired(objects: &ImportObjects) -> Result<Vec<Desired>, KubeError> {
    let mut out = Vec::new();
    desired_of(
        MANAGED[0],
        &objects.service_entries,
        |o| &o.metadata,
        &mut out,
    )?;
    desired_of(
        MANAGED[1],
        &objects.workload_entries,
        |o| &o.metadata,
        &mut out,
    )?;
    desired_of(
        MANAGED[2],
        &objects.service_imports,
        |o| &o.metadata,
        &mut out,
    )?;
    Ok(out)
}

/// The live objects of one kind to delete: those labelled as strait's that
/// are not in `keep` (namespace, name). Objects without the label are
/// never deleted, whatever the list returned.
pub fn stale(keep: &BTreeSet<(String, String)>, live: &[DynamicObject]) -> Vec<(String, String)> {
    live.iter()
        .filter(|o| {
            o.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY_LABEL))
                .is_some_and(|v| v == MANAGED_BY)
        })
        .map(|o| {
            (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        })
        .filter(|k| !keep.contains(k))
        .collect()
}

/// One object that could not be applied or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyFailure {
    /// `<Kind> <namespace>/<name>`, or `<Kind>` when listing failed.
    pub object: String,
    pub error: String,
}

impl std::fmt::Display for ApplyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.error)
    }
}

/// What [`apply_imports`] did: the objects applied and deleted
/// (`<Kind> <namespace>/<name>`), the objects of kinds the API does not
/// serve (CRD not installed: e.g. `ServiceImport` without the MCS API),
/// and what failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub applied: Vec<String>,
    pub deleted: Vec<String>,
    pub not_served: Vec<String>,
    pub failed: Vec<ApplyFailure>,
}

impl ApplyReport {
    /// Whether everything the API serves was applied and pruned (a kind it
    /// does not serve is not retried until it does: the next change).
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Whether an API error says the resource type itself is not served (a
/// CRD not installed), not that one object or its namespace is missing.
fn kind_not_served(e: &::kube::Error) -> bool {
    match e {
        ::kube::Error::Api(s) => {
            s.code == 404 && s.message.contains("could not find the requested resource")
        }
        _ => false,
    }
}

/// Server-side applies (forced, as `field_manager`) every object of the
/// imports, then deletes the objects labelled
/// `app.kubernetes.io/managed-by: strait` of the imported kinds that are no
/// longer imported. Failures of single objects are reported, not fatal; a
/// kind whose CRD is not installed has nothing to prune. Fails only when an
/// object cannot be serialized.
pub async fn apply_imports(
    client: ::kube::Client,
    field_manager: &str,
    objects: &ImportObjects,
) -> Result<ApplyReport, KubeError> {
    let wanted = desired(objects)?;
    let mut report = ApplyReport::default();
    let params = PatchParams::apply(field_manager).force();
    for d in &wanted {
        let resource = d.kind.resource()?;
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &d.namespace, &resource);
        match api.patch(&d.name, &params, &Patch::Apply(&d.body)).await {
            Ok(_) => report.applied.push(d.describe()),
            Err(e) if kind_not_served(&e) => report.not_served.push(d.describe()),
            Err(e) => report.failed.push(ApplyFailure {
                object: d.describe(),
                error: e.to_string(),
            }),
        }
    }

    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
    for kind in MANAGED {
        let resource = kind.resource()?;
        let keep: BTreeSet<(String, String)> = wanted
            .iter()
            .filter(|d| d.kind == kind)
            .map(|d| (d.namespace.clone(), d.name.clone()))
            .collect();
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let live = match list_all(&all, &selector).await {
            Ok(l) => l,
            Err(::kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => {
                report.failed.push(ApplyFailure {
                    object: kind.kind.to_string(),
                    error: format!("listing the objects managed by strait: {e}"),
                });
                continue;
            }
        };
        for (namespace, name) in stale(&keep, &live) {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &namespace, &resource);
            let object = describe(kind.kind, &namespace, &name);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => report.deleted.push(object),
                // Gone already: nothing to do.
                Err(::kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => report.failed.push(ApplyFailure {
                    object,
                    error: e.to_string(),
                }),
            }
        }
    }
    Ok(report)
}

/// Lists every object matching `selector`, following continue tokens.
async fn list_all(
    api: &Api<DynamicObject>,
    selector: &str,
) -> Result<Vec<DynamicObject>, ::kube::Error> {
    let mut out = Vec::new();
    let mut params = ListParams::default().labels(selector).limit(500);
    loop {
        let page = api.list(&params).await?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::BTreeMap;

    use serde_json::json;
    use strait_model::objects::{
        ObjectMeta, ServiceEntry, ServiceEntrySpec, ServiceImport, ServiceImportSpec,
        ServiceImportType, WorkloadEntry, WorkloadEntrySpec,
    };

    use super::*;

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            namespace: ns.into(),
            labels: BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())]),
            ..Default::default()
        }
    }

    #[test]
    fn every_import_is_desired_with_its_kind() {
        let objects = ImportObjects {
            service_entries: vec![ServiceEntry::new(
                meta("ns", "se"),
                ServiceEntrySpec {
                    hosts: vec!["a.ns.svc.clusterset.local".into()],
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
                meta("ns", "we"),
                WorkloadEntrySpec {
                    address: "10.0.0.1".into(),
                    ..Default::default()
                },
            )],
            service_imports: vec![ServiceImport::new(
                meta("ns", "si"),
                ServiceImportSpec {
                    type_: ServiceImportType::ClusterSetIP,
                    ports: vec![],
                    ips: vec![],
                },
                None,
            )],
            warnings: vec![],
        };
        let d = desired(&objects).unwrap();
        let got: Vec<String> = d.iter().map(Desired::describe).collect();
        assert_eq!(
            got,
            vec![
                "ServiceEntry ns/se",
                "WorkloadEntry ns/we",
                "ServiceImport ns/si"
            ]
        );
        assert_eq!(d[0].body["kind"], "ServiceEntry");
        assert_eq!(d[0].body["apiVersion"], "networking.istio.io/v1");
        assert_eq!(d[2].body["apiVersion"], MCS_V1BETA1);
        for k in MANAGED {
            let r = k.resource().unwrap();
            assert_eq!(r.api_version, k.api_version);
        }
    }

    #[test]
    fn only_unwanted_objects_labelled_as_strait_are_stale() {
        let live: Vec<DynamicObject> = serde_json::from_value(json!([
            {"metadata": {"name": "kept", "namespace": "ns", "labels": {MANAGED_BY_LABEL: MANAGED_BY}}},
            {"metadata": {"name": "gone", "namespace": "ns", "labels": {MANAGED_BY_LABEL: MANAGED_BY}}},
            {"metadata": {"name": "gone", "namespace": "other", "labels": {MANAGED_BY_LABEL: MANAGED_BY}}},
            {"metadata": {"name": "theirs", "namespace": "ns", "labels": {MANAGED_BY_LABEL: "helm"}}},
            {"metadata": {"name": "unlabelled", "namespace": "ns"}},
        ]))
        .unwrap();
        let keep = BTreeSet::from([("ns".to_string(), "kept".to_string())]);
        assert_eq!(
            stale(&keep, &live),
            vec![
                ("ns".to_string(), "gone".to_string()),
                ("other".to_string(), "gone".to_string())
            ]
        );
    }
}
