//! The export signal on Kubernetes objects.
//!
//! A service is exported by:
//! - the annotation `strait.io/export: "true"` on a Kubernetes `Service` or
//!   an Istio `ServiceEntry` (`"false"` or no annotation: not exported; any
//!   other value is an error), or
//! - an MCS `ServiceExport` (`multicluster.x-k8s.io/v1alpha1` or `v1beta1`)
//!   with the same namespace and name as the service.
//!
//! `strait.io/export-to: "west,central,mesh:partner"` limits the importers
//! to the listed clusters of the own mesh and the listed peered meshes (see
//! [`ExportTo`]). Items are trimmed of surrounding whitespace; an empty
//! item, a duplicate or an invalid name is an error. It is read from the
//! service and from its `ServiceExport`; when both carry it, they must agree.
//!
//! Every error names the object, the annotation and the bad value, and means
//! "export nothing": a bad annotation never exports a service wider, or
//! narrower, than its author meant.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::mesh::{ExportTarget, ExportTo, ModelError};

/// The annotation that exports a `Service` or `ServiceEntry`.
pub const EXPORT_ANNOTATION: &str = "strait.io/export";
/// The annotation that limits who may import.
pub const EXPORT_TO_ANNOTATION: &str = "strait.io/export-to";
/// The MCS API group.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
/// The `ServiceExport` versions strait reads.
pub const SERVICE_EXPORT_VERSIONS: [&str; 2] = ["v1alpha1", "v1beta1"];
/// The Istio networking versions whose `ServiceEntry` strait reads.
pub const SERVICE_ENTRY_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// The kinds of object that can carry an export signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// Kubernetes `v1` `Service`.
    Service,
    /// Istio `networking.istio.io` `ServiceEntry`.
    ServiceEntry,
    /// MCS `multicluster.x-k8s.io` `ServiceExport`.
    ServiceExport,
}

impl ObjectKind {
    /// Recognizes an object by its `apiVersion` and `kind`. `Ok(None)` for
    /// kinds that carry no export signal; an error for a `ServiceExport` or
    /// `ServiceEntry` of a version strait does not read.
    pub fn from_type_meta(api_version: &str, kind: &str) -> Result<Option<Self>, ExportError> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let unsupported = |supported: &[&str]| ExportError::UnsupportedApiVersion {
            kind: kind.to_string(),
            api_version: api_version.to_string(),
            supported: supported
                .iter()
                .map(|v| format!("{group}/{v}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        match (group, kind) {
            ("", "Service") if version == "v1" => Ok(Some(ObjectKind::Service)),
            ("networking.istio.io", "ServiceEntry") => {
                if SERVICE_ENTRY_VERSIONS.contains(&version) {
                    Ok(Some(ObjectKind::ServiceEntry))
                } else {
                    Err(unsupported(&SERVICE_ENTRY_VERSIONS))
                }
            }
            (MCS_GROUP, "ServiceExport") => {
                if SERVICE_EXPORT_VERSIONS.contains(&version) {
                    Ok(Some(ObjectKind::ServiceExport))
                } else {
                    Err(unsupported(&SERVICE_EXPORT_VERSIONS))
                }
            }
            _ => Ok(None),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::ServiceEntry => "ServiceEntry",
            ObjectKind::ServiceExport => "ServiceExport",
        }
    }
}

/// Names an object in messages: `Service bookinfo/reviews`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: ObjectKind, namespace: &str, name: &str) -> Self {
        ObjectRef {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// Why an object's export signal was refused. The object exports nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error(
        "{object}: annotation {EXPORT_ANNOTATION} must be \"true\" or \"false\", got {value:?}"
    )]
    BadExportValue {
        object: Box<ObjectRef>,
        value: String,
    },
    #[error(
        "{object}: annotation {EXPORT_ANNOTATION}={value:?} on a ServiceExport; a ServiceExport \
         always exports, delete it to stop exporting"
    )]
    ServiceExportNotTrue {
        object: Box<ObjectRef>,
        value: String,
    },
    #[error(
        "{object}: annotation {EXPORT_ANNOTATION} is \"false\" but {service_export} exists; \
         remove one of the two"
    )]
    Contradiction {
        object: Box<ObjectRef>,
        service_export: Box<ObjectRef>,
    },
    #[error(
        "{object}: annotation {EXPORT_TO_ANNOTATION} is empty; remove it to export to the whole mesh"
    )]
    EmptyExportTo { object: Box<ObjectRef> },
    #[error("{object}: annotation {EXPORT_TO_ANNOTATION}={value:?}: item {position} is empty")]
    EmptyExportToItem {
        object: Box<ObjectRef>,
        value: String,
        position: usize,
    },
    #[error("{object}: annotation {EXPORT_TO_ANNOTATION}={value:?}: item {item:?}: {source}")]
    BadExportToItem {
        object: Box<ObjectRef>,
        value: String,
        item: String,
        #[source]
        source: Box<ModelError>,
    },
    #[error("{object}: annotation {EXPORT_TO_ANNOTATION}={value:?}: item {item:?} is listed twice")]
    DuplicateExportToItem {
        object: Box<ObjectRef>,
        value: String,
        item: String,
    },
    #[error(
        "annotation {EXPORT_TO_ANNOTATION} differs between {service} ({service_value:?}) and \
         {service_export} ({export_value:?}); keep it on one of them"
    )]
    ConflictingExportTo {
        service: Box<ObjectRef>,
        service_value: String,
        service_export: Box<ObjectRef>,
        export_value: String,
    },
    #[error("{service_export} does not belong to {service}: namespace and name must be the same")]
    ServiceExportMismatch {
        service: Box<ObjectRef>,
        service_export: Box<ObjectRef>,
    },
    #[error("{kind} of apiVersion {api_version:?} is not supported; use one of {supported}")]
    UnsupportedApiVersion {
        kind: String,
        api_version: String,
        supported: String,
    },
}

/// Whether one object exports its service, and to whom.
///
/// `Ok(None)`: not exported. For a `Service` or `ServiceEntry` that is
/// `strait.io/export` absent or `"false"`; a `ServiceExport` always exports.
/// `strait.io/export-to` is checked only when the object exports.
pub fn export_decision(
    object: &ObjectRef,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<ExportTo>, ExportError> {
    if !export_flag(object, annotations)?.unwrap_or(object.kind == ObjectKind::ServiceExport) {
        return Ok(None);
    }
    Ok(Some(
        parse_export_to(object, annotations)?.unwrap_or_default(),
    ))
}

/// Whether a `Service` or `ServiceEntry` is exported, taking its
/// `ServiceExport` (same namespace and name) into account.
///
/// Exported when the annotation says `"true"` or the `ServiceExport` exists.
/// `export-to` may sit on either object; if both carry it, the two must have
/// the same targets. `"false"` together with a `ServiceExport` is an error,
/// since the two signals contradict each other.
pub fn export_decision_with_service_export(
    service: &ObjectRef,
    service_annotations: &BTreeMap<String, String>,
    service_export: Option<(&ObjectRef, &BTreeMap<String, String>)>,
) -> Result<Option<ExportTo>, ExportError> {
    let Some((export_obj, export_annotations)) = service_export else {
        return export_decision(service, service_annotations);
    };
    if export_obj.namespace != service.namespace || export_obj.name != service.name {
        return Err(ExportError::ServiceExportMismatch {
            service: Box::new(service.clone()),
            service_export: Box::new(export_obj.clone()),
        });
    }
    if export_flag(service, service_annotations)? == Some(false) {
        return Err(ExportError::Contradiction {
            object: Box::new(service.clone()),
            service_export: Box::new(export_obj.clone()),
        });
    }
    // Validates the ServiceExport's own annotations (it always exports).
    export_flag(export_obj, export_annotations)?;
    let on_service = parse_export_to(service, service_annotations)?;
    let on_export = parse_export_to(export_obj, export_annotations)?;
    let export_to = match (on_service, on_export) {
        (Some(a), Some(b)) if a != b => {
            return Err(ExportError::ConflictingExportTo {
                service: Box::new(service.clone()),
                service_value: annotation(service_annotations, EXPORT_TO_ANNOTATION),
                service_export: Box::new(export_obj.clone()),
                export_value: annotation(export_annotations, EXPORT_TO_ANNOTATION),
            });
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => ExportTo::whole_mesh(),
    };
    Ok(Some(export_to))
}

fn annotation(annotations: &BTreeMap<String, String>, key: &str) -> String {
    annotations.get(key).cloned().unwrap_or_default()
}

/// `strait.io/export`: `Some(true)`, `Some(false)`, or `None` when absent.
fn export_flag(
    object: &ObjectRef,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<bool>, ExportError> {
    let flag = match annotations.get(EXPORT_ANNOTATION).map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(value) => {
            return Err(ExportError::BadExportValue {
                object: Box::new(object.clone()),
                value: value.to_string(),
            });
        }
    };
    if object.kind == ObjectKind::ServiceExport && flag == Some(false) {
        return Err(ExportError::ServiceExportNotTrue {
            object: Box::new(object.clone()),
            value: "false".to_string(),
        });
    }
    Ok(flag)
}

/// `strait.io/export-to`, or `None` when absent.
fn parse_export_to(
    object: &ObjectRef,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<ExportTo>, ExportError> {
    let Some(value) = annotations.get(EXPORT_TO_ANNOTATION) else {
        return Ok(None);
    };
    if value.trim().is_empty() {
        return Err(ExportError::EmptyExportTo {
            object: Box::new(object.clone()),
        });
    }
    let mut targets = BTreeSet::new();
    for (i, item) in value.split(',').enumerate() {
        let item = item.trim();
        if item.is_empty() {
            return Err(ExportError::EmptyExportToItem {
                object: Box::new(object.clone()),
                value: value.clone(),
                position: i + 1,
            });
        }
        let target = ExportTarget::parse(item).map_err(|source| ExportError::BadExportToItem {
            object: Box::new(object.clone()),
            value: value.clone(),
            item: item.to_string(),
            source: Box::new(source),
        })?;
        if !targets.insert(target) {
            return Err(ExportError::DuplicateExportToItem {
                object: Box::new(object.clone()),
                value: value.clone(),
                item: item.to_string(),
            });
        }
    }
    Ok(Some(ExportTo::only(targets)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_ca::ClusterName;

    fn svc() -> ObjectRef {
        ObjectRef::new(ObjectKind::Service, "bookinfo", "reviews")
    }

    fn svc_export() -> ObjectRef {
        ObjectRef::new(ObjectKind::ServiceExport, "bookinfo", "reviews")
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cluster(name: &str) -> ClusterName {
        ClusterName::new(name).unwrap()
    }

    #[test]
    fn export_annotation_values() {
        let d = |pairs: &[(&str, &str)]| export_decision(&svc(), &ann(pairs));
        assert_eq!(d(&[]).unwrap(), None);
        assert_eq!(d(&[(EXPORT_ANNOTATION, "false")]).unwrap(), None);
        assert_eq!(
            d(&[(EXPORT_ANNOTATION, "true")]).unwrap(),
            Some(ExportTo::whole_mesh())
        );
        assert_eq!(d(&[("other", "true")]).unwrap(), None);
        for bad in ["True", "yes", "1", "", " true", "true "] {
            let e = d(&[(EXPORT_ANNOTATION, bad)]).unwrap_err();
            assert_eq!(
                e,
                ExportError::BadExportValue {
                    object: Box::new(svc()),
                    value: bad.into()
                }
            );
            let msg = e.to_string();
            assert!(msg.starts_with("Service bookinfo/reviews: "), "{msg}");
            assert!(msg.contains("strait.io/export"), "{msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        }
    }

    #[test]
    fn export_to_parsing() {
        let d = |value: &str| {
            export_decision(
                &svc(),
                &ann(&[(EXPORT_ANNOTATION, "true"), (EXPORT_TO_ANNOTATION, value)]),
            )
        };
        let e = d(" west , central,mesh:partner ").unwrap().unwrap();
        assert!(e.allows_cluster(&cluster("west")) && e.allows_cluster(&cluster("central")));
        assert!(!e.allows_cluster(&cluster("east")));
        assert!(e.allows_mesh("partner") && !e.allows_mesh("other"));
        assert_eq!(e.to_string(), "central,west,mesh:partner");
        let e = d("mesh:partner").unwrap().unwrap();
        assert!(!e.allows_cluster(&cluster("west")) && e.allows_mesh("partner"));
    }

    #[test]
    fn export_to_bad_shapes() {
        let d = |value: &str| {
            export_decision(
                &svc(),
                &ann(&[(EXPORT_ANNOTATION, "true"), (EXPORT_TO_ANNOTATION, value)]),
            )
            .unwrap_err()
        };
        assert_eq!(
            d(""),
            ExportError::EmptyExportTo {
                object: Box::new(svc())
            }
        );
        assert_eq!(
            d("  "),
            ExportError::EmptyExportTo {
                object: Box::new(svc())
            }
        );
        for (value, position) in [("west,,east", 2), ("west,", 2), (",west", 1), ("a, ,b", 2)] {
            assert_eq!(
                d(value),
                ExportError::EmptyExportToItem {
                    object: Box::new(svc()),
                    value: value.into(),
                    position
                },
                "{value}"
            );
        }
        for (value, item) in [
            ("west,west", "west"),
            ("west, west", "west"),
            ("mesh:p,mesh:p", "mesh:p"),
        ] {
            assert_eq!(
                d(value),
                ExportError::DuplicateExportToItem {
                    object: Box::new(svc()),
                    value: value.into(),
                    item: item.into()
                }
            );
        }
        for (value, item) in [
            ("West", "West"),
            ("west,ea_st", "ea_st"),
            ("mesh:", "mesh:"),
            ("mesh:Partner", "mesh:Partner"),
            ("west;east", "west;east"),
            ("west east", "west east"),
            ("*", "*"),
        ] {
            let e = d(value);
            assert!(
                matches!(&e, ExportError::BadExportToItem { item: i, .. } if i == item),
                "{value}: {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.starts_with("Service bookinfo/reviews: "), "{msg}");
            assert!(msg.contains("strait.io/export-to"), "{msg}");
            assert!(msg.contains(&format!("item {item:?}")), "{msg}");
        }
    }

    #[test]
    fn export_to_without_export_is_ignored() {
        let a = ann(&[(EXPORT_TO_ANNOTATION, "not valid!")]);
        assert_eq!(export_decision(&svc(), &a).unwrap(), None);
    }

    #[test]
    fn service_export_objects() {
        assert_eq!(
            export_decision(&svc_export(), &ann(&[])).unwrap(),
            Some(ExportTo::whole_mesh())
        );
        let e = export_decision(&svc_export(), &ann(&[(EXPORT_TO_ANNOTATION, "west")]))
            .unwrap()
            .unwrap();
        assert!(!e.is_whole_mesh());
        assert!(export_decision(&svc_export(), &ann(&[(EXPORT_ANNOTATION, "true")])).is_ok());
        let e = export_decision(&svc_export(), &ann(&[(EXPORT_ANNOTATION, "false")])).unwrap_err();
        assert!(e.to_string().contains("delete it"), "{e}");
        assert!(matches!(
            export_decision(&svc_export(), &ann(&[(EXPORT_ANNOTATION, "no")])),
            Err(ExportError::BadExportValue { .. })
        ));
    }

    #[test]
    fn service_with_service_export() {
        let d = |s: &[(&str, &str)], e: &[(&str, &str)]| {
            export_decision_with_service_export(&svc(), &ann(s), Some((&svc_export(), &ann(e))))
        };
        assert_eq!(d(&[], &[]).unwrap(), Some(ExportTo::whole_mesh()));
        // export-to on the Service applies to the ServiceExport's export.
        let only_west = d(&[(EXPORT_TO_ANNOTATION, "west")], &[]).unwrap().unwrap();
        assert!(!only_west.allows_cluster(&cluster("east")));
        let only_west2 = d(&[], &[(EXPORT_TO_ANNOTATION, "west")]).unwrap().unwrap();
        assert_eq!(only_west, only_west2);
        // Both, same targets in another spelling: fine.
        let both = d(
            &[(EXPORT_TO_ANNOTATION, "west,mesh:p")],
            &[(EXPORT_TO_ANNOTATION, "mesh:p, west")],
        )
        .unwrap();
        assert!(both.is_some());
        let e = d(
            &[(EXPORT_TO_ANNOTATION, "west")],
            &[(EXPORT_TO_ANNOTATION, "east")],
        )
        .unwrap_err();
        assert!(matches!(e, ExportError::ConflictingExportTo { .. }));
        assert!(e.to_string().contains("\"west\"") && e.to_string().contains("\"east\""));
        let e = d(&[(EXPORT_ANNOTATION, "false")], &[]).unwrap_err();
        assert!(matches!(e, ExportError::Contradiction { .. }), "{e:?}");
        assert!(matches!(
            d(&[(EXPORT_TO_ANNOTATION, "")], &[]),
            Err(ExportError::EmptyExportTo { .. })
        ));
        assert!(matches!(
            d(&[(EXPORT_ANNOTATION, "maybe")], &[]),
            Err(ExportError::BadExportValue { .. })
        ));
        // Without a ServiceExport it is the plain decision.
        assert_eq!(
            export_decision_with_service_export(&svc(), &ann(&[]), None).unwrap(),
            None
        );
        let other = ObjectRef::new(ObjectKind::ServiceExport, "bookinfo", "ratings");
        assert!(matches!(
            export_decision_with_service_export(&svc(), &ann(&[]), Some((&other, &ann(&[])))),
            Err(ExportError::ServiceExportMismatch { .. })
        ));
    }

    #[test]
    fn kinds_from_type_meta() {
        let k = ObjectKind::from_type_meta;
        assert_eq!(k("v1", "Service").unwrap(), Some(ObjectKind::Service));
        assert_eq!(
            k("networking.istio.io/v1", "ServiceEntry").unwrap(),
            Some(ObjectKind::ServiceEntry)
        );
        assert_eq!(
            k("networking.istio.io/v1alpha3", "ServiceEntry").unwrap(),
            Some(ObjectKind::ServiceEntry)
        );
        for v in ["v1alpha1", "v1beta1"] {
            assert_eq!(
                k(&format!("multicluster.x-k8s.io/{v}"), "ServiceExport").unwrap(),
                Some(ObjectKind::ServiceExport)
            );
        }
        assert_eq!(k("apps/v1", "Deployment").unwrap(), None);
        assert_eq!(k("v1", "ConfigMap").unwrap(), None);
        let e = k("multicluster.x-k8s.io/v2", "ServiceExport").unwrap_err();
        assert!(
            e.to_string().contains("multicluster.x-k8s.io/v1beta1"),
            "{e}"
        );
        assert!(k("networking.istio.io/v2", "ServiceEntry").is_err());
    }
}
