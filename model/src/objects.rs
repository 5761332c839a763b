//! The Istio and MCS API objects strait writes (and reads back), as typed
//! serde structs with the field names of the CRDs: `ServiceEntry` and
//! `WorkloadEntry` (`networking.istio.io/v1`) and `ServiceImport`
//! (`multicluster.x-k8s.io/v1beta1`).
//!
//! Only the fields strait uses are modelled. Optional fields are left out of
//! the output when unset, maps are sorted, so serialization is stable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::mesh::Protocol;

pub const ISTIO_NETWORKING_V1: &str = "networking.istio.io/v1";
pub const MCS_V1BETA1: &str = "multicluster.x-k8s.io/v1beta1";

/// `app.kubernetes.io/managed-by`, set to [`MANAGED_BY`] on every object
/// strait generates so that it can find (and prune) them.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "strait";
/// The exporting cluster, on endpoints and WorkloadEntries.
pub const CLUSTER_LABEL: &str = "strait.io/cluster";
/// The imported service's name, on every generated object.
pub const SERVICE_LABEL: &str = "strait.io/service";

/// The part of Kubernetes `ObjectMeta` strait sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Istio `ServiceEntry`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceEntrySpec,
}

impl ServiceEntry {
    pub fn new(metadata: ObjectMeta, spec: ServiceEntrySpec) -> Self {
        ServiceEntry {
            api_version: ISTIO_NETWORKING_V1.to_string(),
            kind: "ServiceEntry".to_string(),
            metadata,
            spec,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

/// A `ServiceEntry` port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    pub number: u32,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
    DynamicDns,
}

/// Istio `WorkloadEntry`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: WorkloadEntrySpec,
}

impl WorkloadEntry {
    pub fn new(metadata: ObjectMeta, spec: WorkloadEntrySpec) -> Self {
        WorkloadEntry {
            api_version: ISTIO_NETWORKING_V1.to_string(),
            kind: "WorkloadEntry".to_string(),
            metadata,
            spec,
        }
    }
}

/// A `WorkloadEntry` spec, which is also a `ServiceEntry` endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    pub address: String,
    /// Port name → the port to send that service port's traffic to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// MCS `ServiceImport` (v1beta1: ports and type in `spec`, exporting
/// clusters in `status.clusters`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImport {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceImportSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceImportStatus>,
}

impl ServiceImport {
    pub fn new(
        metadata: ObjectMeta,
        spec: ServiceImportSpec,
        status: Option<ServiceImportStatus>,
    ) -> Self {
        ServiceImport {
            api_version: MCS_V1BETA1.to_string(),
            kind: "ServiceImport".to_string(),
            metadata,
            spec,
            status,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    #[serde(rename = "type")]
    pub type_: ServiceImportType,
    pub ports: Vec<ServiceImportPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceImportType {
    ClusterSetIP,
    Headless,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// The L4 protocol: `TCP`, `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_entry_serializes_with_crd_field_names() {
        let se = ServiceEntry::new(
            ObjectMeta {
                name: "x".into(),
                namespace: "ns".into(),
                ..Default::default()
            },
            ServiceEntrySpec {
                hosts: vec!["x.ns.svc.clusterset.local".into()],
                addresses: vec![],
                ports: vec![ServiceEntryPort {
                    number: 80,
                    name: "http".into(),
                    protocol: Some(Protocol::Http),
                    target_port: None,
                }],
                location: Some(Location::MeshInternal),
                resolution: Some(Resolution::DnsRoundRobin),
                endpoints: vec![WorkloadEntrySpec {
                    address: "1.2.3.4".into(),
                    service_account: Some("sa".into()),
                    ..Default::default()
                }],
                export_to: vec![],
                subject_alt_names: vec!["spiffe://td/ns/ns/sa/sa".into()],
            },
        );
        let v = serde_json::to_value(&se).unwrap();
        assert_eq!(v["apiVersion"], "networking.istio.io/v1");
        assert_eq!(v["spec"]["location"], "MESH_INTERNAL");
        assert_eq!(v["spec"]["resolution"], "DNS_ROUND_ROBIN");
        assert_eq!(v["spec"]["endpoints"][0]["serviceAccount"], "sa");
        assert!(v["spec"]["subjectAltNames"].is_array());
        assert!(v["metadata"].get("labels").is_none());
        let back: ServiceEntry = serde_json::from_value(v).unwrap();
        assert_eq!(back, se);
    }

    #[test]
    fn service_import_type_field() {
        let si = ServiceImport::new(
            ObjectMeta::default(),
            ServiceImportSpec {
                type_: ServiceImportType::ClusterSetIP,
                ports: vec![],
                ips: vec![],
            },
            None,
        );
        let v = serde_json::to_value(&si).unwrap();
        assert_eq!(v["spec"]["type"], "ClusterSetIP");
        assert_eq!(v["kind"], "ServiceImport");
        assert!(v.get("status").is_none());
    }
}
