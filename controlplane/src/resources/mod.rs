//! The discovery resources (`strait.mesh.v1.*`) the control plane serves to
//! its proxies, built from the config in force alone. Pure: no I/O; the
//! snapshot is stamped with the time it was built, which a caller that
//! read the config earlier may restamp ([`Snapshot::with_created`]) so
//! that push latency counts from the read.
//!
//! Imports from the broker are written back into the config as Istio
//! `ServiceEntry` and `WorkloadEntry` objects, so the same rules serve local
//! and imported services, in directory and Kubernetes mode alike.
//!
//! # Rules
//!
//! - **Service** per Kubernetes `Service` `<name>` in `<ns>`: hostname
//!   `<name>.<ns>.svc.cluster.local`, aliases
//!   `<name>.<ns>.svc.clusterset.local` and `<name>.<ns>`. Ports from
//!   `spec.ports`; the protocol is Istio's choice: `appProtocol`, else the
//!   port name's prefix (`http-web`), else `tcp` (an unknown protocol is a
//!   warning and `tcp`). `exported` follows [`strait_model::export`]
//!   (`strait.io/export` or an MCS `ServiceExport` of the same name; a bad
//!   signal is a warning and exports nothing).
//! - **Endpoints** of a Service: every `WorkloadEntry` of its namespace
//!   whose labels match its (non-empty) selector. On this cluster's network
//!   (`network` empty or equal): kind `SIDECAR`, address = the entry's,
//!   port = its `strait.io/inbound-port` annotation or 15006, identity
//!   `spiffe://<td>/ns/<ns>/sa/<serviceAccount or default>`, workload = its
//!   name. On another network: kind `GATEWAY`, address = the entry's (the
//!   remote gateway), port = the entry's `ports` value for the first
//!   service port whose name it maps (else 15443), weight = `weight`
//!   (default and minimum 1), cluster = its `strait.io/cluster` label; when
//!   that network is in QUIC mode and the context names a local egress,
//!   `via` = that egress. Every endpoint is healthy (static config has no
//!   health).
//! - **identities** of a Service: the SPIFFE IDs of its endpoints' service
//!   accounts (a gateway endpoint's `serviceAccount`, when set, in this
//!   trust domain) plus the `subjectAltNames` of the ServiceEntries for
//!   the same service.
//! - **Namespace sameness.** A `ServiceEntry` whose first host is
//!   `<svc>.<ns>.svc.clusterset.local` stands for the service `<svc>.<ns>`
//!   of the whole clusterset. When a local Service `<svc>` exists in
//!   `<ns>`, the entry merges into that Service's resource: only its
//!   `subjectAltNames` and its single-IP `addresses` (the ClusterSet IP,
//!   next to the cluster IP) are added. Its endpoints are NOT added: the importer
//!   wrote each remote endpoint a second time as a `WorkloadEntry` that the
//!   local selector picks, so they are already there (an exporter serving
//!   none of the local ports, or behind a DNS-named gateway, has no such
//!   `WorkloadEntry` and is therefore not reachable under the local name,
//!   as in Istio). Without a local Service, the entry becomes its own
//!   Service resource with hostname `<svc>.<ns>.svc.cluster.local` and
//!   aliases (the clusterset name, `<svc>.<ns>`), so the local name
//!   resolves to the remote endpoints; ports from `spec.ports`, endpoints
//!   from `spec.endpoints` (kinds as above; a `SIDECAR` endpoint of an
//!   entry connects to 15006).
//! - Other `ServiceEntry` objects become a Service resource named by their
//!   first host (the other hosts are aliases); one whose name is already
//!   taken is a warning and skipped.
//! - **Workload** per local `WorkloadEntry`, named `<ns>/<name>`.
//! - **Policy** per `VirtualService`, `DestinationRule`,
//!   `PeerAuthentication`, `AuthorizationPolicy`, `Sidecar`, named
//!   `<kind>/<ns>/<name>`: the spec as JSON, generation =
//!   `metadata.generation` or a hash of the spec JSON. A spec that
//!   [`strait_model::istio::parse`] refuses is left out with a warning
//!   that names the object and every problem, as an admission webhook
//!   would refuse it.
//!
//! The config boundary ([`crate::source::check`]) already refuses every
//! object that breaks its kind's rules ([`strait_model::validation`]), so
//! that its last good version stays; the warnings above for bad ports,
//! addresses and specs are a safeguard for what passes it.
//! - **TrustBundle** per trust domain (this one `local: true`), each with
//!   the denied intermediates.
//! - **GatewayRoute** per exported Service: its ports, subsets from the
//!   DestinationRules of its host (`echo`, `echo.demo`, `echo.demo.svc`,
//!   the FQDN and the clusterset name all name the same host, short names
//!   in the rule's namespace; the first rule in (namespace, name) order
//!   wins a subset name, later ones warn) and its local `SIDECAR`
//!   endpoints (every service port → the sidecar's inbound port).
//! - **Network** per [`NetworkInput`].
//! - **MeshSettings** `mesh`, always one: the mesh-wide proxy settings of
//!   the [`ClusterContext`] (`path_normalization`).
//!
//! # Determinism
//!
//! The same input gives byte-identical resources and versions. prost
//! encodes `map` fields in hash-map order, so resources are encoded here
//! with map entries sorted by key ([`encode_canonical`]); a protobuf
//! decoder reads the result as the same message. A version is the
//! 16-hex-digit FNV-1a of those bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde_json::Value;
use strait_ca::{SpiffeId, TrustDomain};
use strait_model::Protocol;
use strait_model::export::{self, ObjectKind, ObjectRef};
use strait_model::objects::CLUSTER_LABEL;
use strait_model::request_path::PathNormalization;
use strait_proto::strait::mesh::v1 as pb;
use strait_proto::strait::mesh::v1::type_url;

use crate::source::{Config, ObjectKey};

mod build;
mod canonical;
mod read;
mod service_entry;

use build::*;
pub use canonical::Canonical;
use read::*;
use service_entry::{ServiceEntryObj, entry_service, sans};

/// The sidecar's inbound mTLS port (Istio's).
pub const SIDECAR_INBOUND_PORT: u32 = 15006;
/// The east-west gateway's passthrough port (Istio's).
pub const GATEWAY_PORT: u32 = strait_model::mesh::DEFAULT_GATEWAY_PORT as u32;
/// A `WorkloadEntry` annotation naming its sidecar's inbound port.
pub const INBOUND_PORT_ANNOTATION: &str = "strait.io/inbound-port";
/// The Kubernetes DNS suffix of this cluster's services.
pub const CLUSTER_SUFFIX: &str = "svc.cluster.local";
/// The MCS DNS suffix of clusterset services.
pub const CLUSTERSET_SUFFIX: &str = "svc.clusterset.local";

/// The Istio policy kinds served as [`pb::Policy`].
pub const POLICY_KINDS: [&str; 5] = [
    "VirtualService",
    "DestinationRule",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "Sidecar",
];

/// Who this control plane serves: its cluster, network and trust domain.
#[derive(Debug, Clone)]
pub struct ClusterContext {
    pub cluster: String,
    pub network: String,
    pub trust_domain: TrustDomain,
    /// `region/zone/subzone` of this cluster, the default locality of its
    /// workloads.
    pub locality: Option<String>,
    /// The local east-west gateway's egress listener (`host:port`), which
    /// sidecars use to reach QUIC-mode networks.
    pub egress: Option<String>,
    /// How proxies normalize HTTP request paths (mesh-wide, Istio's
    /// `meshConfig.pathNormalization`).
    pub path_normalization: PathNormalization,
}

/// The wire form of a path normalization mode (Istio's numbers).
pub fn path_normalization_to_wire(mode: PathNormalization) -> pb::mesh_settings::PathNormalization {
    use pb::mesh_settings::PathNormalization as W;
    match mode {
        PathNormalization::None => W::None,
        PathNormalization::Base => W::Base,
        PathNormalization::MergeSlashes => W::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes => W::DecodeAndMergeSlashes,
    }
}

/// The trust material to publish.
#[derive(Debug, Clone, Default)]
pub struct TrustInput {
    /// PEM roots of this trust domain.
    pub local_roots_pem: Vec<String>,
    /// Peered trust domain → its PEM roots.
    pub federated: BTreeMap<String, Vec<String>>,
    /// SHA-256 (hex) of intermediates that must be refused.
    pub denied_intermediates: BTreeSet<String>,
    /// When the mesh binds identities to clusters: what each cluster runs.
    pub cluster_identities: Option<BTreeMap<String, BTreeSet<String>>>,
}

/// How another network is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// Straight to its gateways, SNI passthrough.
    #[default]
    Sni,
    /// Through the local gateway's pooled QUIC tunnel.
    Quic,
}

/// A remote network and its gateways.
#[derive(Debug, Clone, Default)]
pub struct NetworkInput {
    pub name: String,
    /// Passthrough addresses, `host:port`.
    pub gateways: Vec<String>,
    pub mode: NetworkMode,
    /// QUIC tunnel addresses (UDP `host:port`).
    pub tunnels: Vec<String>,
}

pub use strait_proto::xds::Versioned;

/// Every resource of every type, as one consistent view of the config.
#[derive(Debug, Clone)]
pub struct Snapshot {
    created: Instant,
    types: BTreeMap<String, BTreeMap<String, Versioned>>,
}

impl PartialEq for Snapshot {
    /// Equal when the resources are (the creation time is not compared).
    fn eq(&self, other: &Self) -> bool {
        self.types == other.types
    }
}

impl Snapshot {
    /// An empty snapshot that knows every strait type (each with no
    /// resources), created at `created`.
    pub fn empty(created: Instant) -> Self {
        Snapshot {
            created,
            types: type_url::ALL
                .iter()
                .map(|t| ((*t).to_string(), BTreeMap::new()))
                .collect(),
        }
    }

    /// When the config this snapshot was built from was read (for push
    /// latency).
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Sets the creation time (the caller owns the clock).
    pub fn with_created(mut self, created: Instant) -> Self {
        self.created = created;
        self
    }

    /// Adds (or replaces) a resource, encoding it canonically.
    pub fn insert(&mut self, type_url: &str, name: &str, message: &impl Canonical) {
        let bytes = message.canonical_bytes();
        let version = format!("{:016x}", strait_model::names::fnv1a64(&bytes));
        self.types.entry(type_url.to_string()).or_default().insert(
            name.to_string(),
            Versioned {
                version,
                resource: prost_types::Any {
                    type_url: type_url.to_string(),
                    value: bytes,
                },
            },
        );
    }

    /// The resources of one type, by name (`None` for a type this
    /// snapshot does not serve).
    pub fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, Versioned>> {
        self.types.get(type_url)
    }

    /// A copy keeping only the resources `keep(type_url, name)` accepts
    /// (a proxy's scoped view); same creation time, same types.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) -> Snapshot {
        Snapshot {
            created: self.created,
            types: self
                .types
                .iter()
                .map(|(t, items)| {
                    let kept = items
                        .iter()
                        .filter(|(name, _)| keep(t, name))
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect();
                    (t.clone(), kept)
                })
                .collect(),
        }
    }

    /// The type URLs served.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// A version for a set of (name, version) pairs: changes when any
    /// resource of the set changes, appears or goes.
    pub fn set_version<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
        let mut bytes = Vec::new();
        for (name, version) in items {
            bytes.extend_from_slice(name.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(version.as_bytes());
            bytes.push(0);
        }
        format!("{:016x}", strait_model::names::fnv1a64(&bytes))
    }
}

struct Builder<'a> {
    ctx: &'a ClusterContext,
    quic_networks: BTreeSet<&'a str>,
    warnings: Vec<String>,
}

impl Builder<'_> {
    fn is_local(&self, e: &Entry) -> bool {
        e.network.is_empty() || e.network == self.ctx.network
    }

    fn identity(&mut self, what: &str, namespace: &str, sa: &str) -> Option<String> {
        match SpiffeId::workload(&self.ctx.trust_domain, namespace, sa) {
            Ok(id) => Some(id.to_string()),
            Err(e) => {
                self.warnings
                    .push(format!("{what}: service account {sa:?}: {e}"));
                None
            }
        }
    }

    /// The endpoint an entry stands for, for a service whose ports are
    /// `port_names` (in order).
    fn endpoint(&mut self, what: &str, e: &Entry, port_names: &[&str]) -> pb::Endpoint {
        if self.is_local(e) {
            let sa = e.service_account.as_deref().unwrap_or("default");
            let identity = self.identity(what, &e.namespace, sa).unwrap_or_default();
            pb::Endpoint {
                kind: pb::endpoint::Kind::Sidecar as i32,
                address: e.address.clone(),
                port: e.inbound_port,
                labels: e.labels.clone().into_iter().collect(),
                locality: if e.locality.is_empty() {
                    self.ctx.locality.clone().unwrap_or_default()
                } else {
                    e.locality.clone()
                },
                network: self.ctx.network.clone(),
                cluster: self.ctx.cluster.clone(),
                identity,
                healthy: true,
                weight: 1,
                workload: e.name.clone(),
                via: String::new(),
            }
        } else {
            let port = port_names
                .iter()
                .find_map(|n| e.ports.get(*n).copied())
                .unwrap_or(GATEWAY_PORT);
            let via = if self.quic_networks.contains(e.network.as_str()) {
                self.ctx.egress.clone().unwrap_or_default()
            } else {
                String::new()
            };
            pb::Endpoint {
                kind: pb::endpoint::Kind::Gateway as i32,
                address: e.address.clone(),
                port,
                labels: e.labels.clone().into_iter().collect(),
                locality: e.locality.clone(),
                network: e.network.clone(),
                cluster: e.labels.get(CLUSTER_LABEL).cloned().unwrap_or_default(),
                identity: String::new(),
                healthy: true,
                weight: e.weight,
                workload: String::new(),
                via,
            }
        }
    }
}

fn sort_endpoints(eps: &mut [pb::Endpoint]) {
    eps.sort_by(|a, b| {
        (
            a.kind,
            &a.network,
            &a.cluster,
            &a.address,
            a.port,
            &a.workload,
        )
            .cmp(&(
                b.kind,
                &b.network,
                &b.cluster,
                &b.address,
                b.port,
                &b.workload,
            ))
    });
}

/// `<svc>.<ns>` of a clusterset host name, when it is one.
fn clusterset_key(host: &str) -> Option<(String, String)> {
    let rest = host.strip_suffix(CLUSTERSET_SUFFIX)?.strip_suffix('.')?;
    let (svc, ns) = rest.split_once('.')?;
    (!svc.is_empty() && !ns.is_empty() && !ns.contains('.'))
        .then(|| (svc.to_string(), ns.to_string()))
}

/// The FQDN a DestinationRule's `host` names, resolved in `namespace` as
/// short names are: `echo`, `echo.demo` and `echo.demo.svc` mean
/// `echo.demo.svc.cluster.local` (the first in the rule's namespace).
pub fn resolve_host(host: &str, namespace: &str) -> String {
    let dots = host.matches('.').count();
    match dots {
        0 => format!("{host}.{namespace}.{CLUSTER_SUFFIX}"),
        1 => format!("{host}.{CLUSTER_SUFFIX}"),
        2 if host.ends_with(".svc") => format!("{host}.cluster.local"),
        _ => host.to_string(),
    }
}

/// Builds every resource from the config, with a warning (naming the
/// object) for each thing left out.
pub fn build(
    ctx: &ClusterContext,
    config: &Config,
    trust: &TrustInput,
    networks: &[NetworkInput],
) -> (Snapshot, Vec<String>) {
    let mut b = Builder {
        ctx,
        quic_networks: networks
            .iter()
            .filter(|n| n.mode == NetworkMode::Quic)
            .map(|n| n.name.as_str())
            .collect(),
        warnings: Vec::new(),
    };
    let mut snap = Snapshot::empty(Instant::now());
    let entries = workload_entries(&mut b, config);
    insert_workloads(&mut b, &mut snap, &entries);
    let services = services(&mut b, config, &entries);
    let destination_rules = insert_policies(&mut b, &mut snap, config);
    insert_gateway_routes(&mut b, &mut snap, &services, &destination_rules);
    for (hostname, s) in &services {
        snap.insert(type_url::SERVICE, hostname, s);
    }
    snap.insert(
        type_url::MESH_SETTINGS,
        "mesh",
        &pb::MeshSettings {
            path_normalization: path_normalization_to_wire(ctx.path_normalization) as i32,
        },
    );
    insert_trust_bundles(&mut b, &mut snap, trust);
    insert_networks(&mut snap, networks);
    (snap, b.warnings)
}

#[cfg(test)]
mod tests;
