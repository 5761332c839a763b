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
//!   `subjectAltNames` are added. Its endpoints are NOT added: the importer
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
//! - **TrustBundle** per trust domain (this one `local: true`), each with
//!   the denied intermediates.
//! - **GatewayRoute** per exported Service: its ports, subsets from the
//!   DestinationRules of its host (`echo`, `echo.demo`, `echo.demo.svc`,
//!   the FQDN and the clusterset name all name the same host, short names
//!   in the rule's namespace; the first rule in (namespace, name) order
//!   wins a subset name, later ones warn) and its local `SIDECAR`
//!   endpoints (every service port → the sidecar's inbound port).
//! - **Network** per [`NetworkInput`].
//!
//! # Determinism
//!
//! The same input gives byte-identical resources and versions. prost
//! encodes `map` fields in hash-map order, so resources are encoded here
//! with map entries sorted by key ([`encode_canonical`]); a protobuf
//! decoder reads the result as the same message. A version is the
//! 16-hex-digit FNV-1a of those bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use serde_json::Value;
use strait_ca::{SpiffeId, TrustDomain};
use strait_model::Protocol;
use strait_model::export::{self, ObjectKind, ObjectRef};
use strait_model::objects::CLUSTER_LABEL;
use strait_proto::strait::mesh::v1 as pb;
use strait_proto::strait::mesh::v1::type_url;

use crate::source::{Config, ObjectKey};

/// The sidecar's inbound mTLS port (Istio's).
pub const SIDECAR_INBOUND_PORT: u32 = 15006;
/// The east-west gateway's passthrough port (Istio's).
pub const GATEWAY_PORT: u32 = 15443;
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

/// One resource as served: its version and its encoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// Hex FNV-1a of the encoded resource.
    pub version: String,
    pub resource: prost_types::Any,
}

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

/// A message with a deterministic encoding (map entries sorted by key).
pub trait Canonical {
    /// The encoded message; decodes as the same message.
    fn canonical_bytes(&self) -> Vec<u8>;
}

fn put_bytes(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

fn put_string_map(tag: u32, map: &HashMap<String, String>, buf: &mut Vec<u8>) {
    let sorted: BTreeMap<&String, &String> = map.iter().collect();
    for (k, v) in sorted {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        prost::encoding::string::encode(2, v, &mut entry);
        put_bytes(tag, &entry, buf);
    }
}

fn put_string_u32_map(tag: u32, map: &HashMap<String, u32>, buf: &mut Vec<u8>) {
    let sorted: BTreeMap<&String, &u32> = map.iter().collect();
    for (k, v) in sorted {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        prost::encoding::uint32::encode(2, v, &mut entry);
        put_bytes(tag, &entry, buf);
    }
}

fn put_u32_map(tag: u32, map: &HashMap<u32, u32>, buf: &mut Vec<u8>) {
    let sorted: BTreeMap<&u32, &u32> = map.iter().collect();
    for (k, v) in sorted {
        let mut entry = Vec::new();
        prost::encoding::uint32::encode(1, k, &mut entry);
        prost::encoding::uint32::encode(2, v, &mut entry);
        put_bytes(tag, &entry, buf);
    }
}

/// Encodes `message` canonically: map fields (emptied by `strip`) are
/// appended by `maps` in key order. Protobuf decoders merge fields that
/// appear after the others, so the bytes decode to the same message.
fn with_maps<M: Message + Clone>(
    message: &M,
    strip: impl FnOnce(&mut M),
    maps: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut head = message.clone();
    strip(&mut head);
    let mut buf = head.encode_to_vec();
    maps(&mut buf);
    buf
}

impl Canonical for pb::Endpoint {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| m.labels.clear(),
            |b| put_string_map(4, &self.labels, b),
        )
    }
}

impl Canonical for pb::Service {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| m.endpoints.clear(),
            |b| {
                for e in &self.endpoints {
                    put_bytes(8, &e.canonical_bytes(), b);
                }
            },
        )
    }
}

impl Canonical for pb::Workload {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| {
                m.labels.clear();
                m.ports.clear();
            },
            |b| {
                put_string_map(4, &self.labels, b);
                put_string_u32_map(10, &self.ports, b);
            },
        )
    }
}

impl Canonical for pb::Labels {
    fn canonical_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string_map(1, &self.labels, &mut b);
        b
    }
}

impl Canonical for pb::GatewayEndpoint {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| {
                m.ports.clear();
                m.labels.clear();
            },
            |b| {
                put_u32_map(2, &self.ports, b);
                put_string_map(3, &self.labels, b);
            },
        )
    }
}

impl Canonical for pb::GatewayRoute {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| {
                m.subsets.clear();
                m.endpoints.clear();
            },
            |b| {
                let sorted: BTreeMap<&String, &pb::Labels> = self.subsets.iter().collect();
                for (name, labels) in sorted {
                    let mut entry = Vec::new();
                    prost::encoding::string::encode(1, name, &mut entry);
                    put_bytes(2, &labels.canonical_bytes(), &mut entry);
                    put_bytes(3, &entry, b);
                }
                for e in &self.endpoints {
                    put_bytes(4, &e.canonical_bytes(), b);
                }
            },
        )
    }
}

/// Messages without map fields encode deterministically as they are.
macro_rules! plain_canonical {
    ($($t:ty),*) => {$(
        impl Canonical for $t {
            fn canonical_bytes(&self) -> Vec<u8> {
                self.encode_to_vec()
            }
        }
    )*};
}
plain_canonical!(pb::Policy, pb::TrustBundle, pb::Network);

// ---------------------------------------------------------------------------
// Reading the config.

fn str_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn port_number(v: &Value) -> Option<u32> {
    v.as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0)
        .map(u32::from)
}

/// Istio's protocol of a port: `appProtocol`, else the name's prefix, else
/// TCP. Lowercase Istio names.
fn protocol_of(app_protocol: Option<&str>, name: &str) -> Result<String, String> {
    let p = match app_protocol {
        Some(app) => Protocol::parse(app)
            .ok()
            .or_else(|| Protocol::ALL.into_iter().find(|p| p.app_protocol() == app))
            .ok_or_else(|| format!("appProtocol {app:?} is not a protocol strait knows"))?,
        None => Protocol::from_port_name(name).unwrap_or(Protocol::Tcp),
    };
    Ok(p.as_str().to_ascii_lowercase())
}

/// A `WorkloadEntry` (or a `ServiceEntry` endpoint), read.
#[derive(Debug, Clone)]
struct Entry {
    namespace: String,
    name: String,
    address: String,
    labels: BTreeMap<String, String>,
    ports: BTreeMap<String, u32>,
    network: String,
    locality: String,
    weight: u32,
    service_account: Option<String>,
    inbound_port: u32,
}

fn read_entry(
    namespace: &str,
    name: &str,
    spec: &Value,
    annotations: &BTreeMap<String, String>,
) -> Result<Entry, String> {
    let address = spec["address"]
        .as_str()
        .filter(|a| !a.is_empty())
        .ok_or("address is missing")?
        .to_string();
    let mut ports = BTreeMap::new();
    if let Some(map) = spec["ports"].as_object() {
        for (port_name, v) in map {
            let n = port_number(v)
                .ok_or_else(|| format!("ports.{port_name}: {v} is not a port number"))?;
            ports.insert(port_name.clone(), n);
        }
    }
    let weight = match &spec["weight"] {
        Value::Null => 1,
        v => v
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or_else(|| format!("weight: {v} is not a non-negative integer"))?
            .max(1),
    };
    let inbound_port = match annotations.get(INBOUND_PORT_ANNOTATION) {
        None => SIDECAR_INBOUND_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(u32::from)
            .ok_or_else(|| {
                format!("annotation {INBOUND_PORT_ANNOTATION}: {p:?} is not a port number")
            })?,
    };
    Ok(Entry {
        namespace: namespace.to_string(),
        name: name.to_string(),
        address,
        labels: str_map(spec.get("labels")),
        ports,
        network: spec["network"].as_str().unwrap_or_default().to_string(),
        locality: spec["locality"].as_str().unwrap_or_default().to_string(),
        weight,
        service_account: spec["serviceAccount"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        inbound_port,
    })
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

struct ServiceEntryObj<'a> {
    key: &'a ObjectKey,
    doc: &'a Value,
    hosts: Vec<String>,
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

    let of_kind = |kind: &'static str| {
        config
            .objects
            .iter()
            .filter(move |(k, _)| k.kind == kind)
            .map(|(k, o)| (k, &o.value))
    };

    // WorkloadEntries.
    let mut entries: Vec<Entry> = Vec::new();
    for (key, doc) in of_kind("WorkloadEntry") {
        let annotations = str_map(doc["metadata"].get("annotations"));
        match read_entry(&key.namespace, &key.name, &doc["spec"], &annotations) {
            Ok(e) => entries.push(e),
            Err(reason) => b.warnings.push(format!("{key}: {reason}")),
        }
    }

    // Workloads.
    for e in entries
        .iter()
        .filter(|e| b.is_local(e))
        .cloned()
        .collect::<Vec<_>>()
    {
        let what = format!("WorkloadEntry {}/{}", e.namespace, e.name);
        let sa = e
            .service_account
            .clone()
            .unwrap_or_else(|| "default".into());
        let identity = b.identity(&what, &e.namespace, &sa).unwrap_or_default();
        let w = pb::Workload {
            name: e.name.clone(),
            namespace: e.namespace.clone(),
            address: e.address.clone(),
            labels: e.labels.clone().into_iter().collect(),
            service_account: sa,
            identity,
            locality: if e.locality.is_empty() {
                ctx.locality.clone().unwrap_or_default()
            } else {
                e.locality.clone()
            },
            network: ctx.network.clone(),
            cluster: ctx.cluster.clone(),
            ports: e.ports.clone().into_iter().collect(),
        };
        snap.insert(
            type_url::WORKLOAD,
            &format!("{}/{}", e.namespace, e.name),
            &w,
        );
    }

    // ServiceExports, by (namespace, name).
    let service_exports: BTreeMap<(String, String), BTreeMap<String, String>> =
        of_kind("ServiceExport")
            .map(|(k, doc)| {
                (
                    (k.namespace.clone(), k.name.clone()),
                    str_map(doc["metadata"].get("annotations")),
                )
            })
            .collect();

    // ServiceEntries, split by whether they name a clusterset service.
    let mut clusterset_entries: BTreeMap<(String, String), Vec<ServiceEntryObj<'_>>> =
        BTreeMap::new();
    let mut other_entries = Vec::new();
    for (key, doc) in of_kind("ServiceEntry") {
        let hosts: Vec<String> = doc["spec"]["hosts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| h.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let Some(first) = hosts.first() else {
            b.warnings.push(format!("{key}: spec.hosts is empty"));
            continue;
        };
        let obj = ServiceEntryObj {
            key,
            doc,
            hosts: hosts.clone(),
        };
        match clusterset_key(first) {
            Some(k) => clusterset_entries.entry(k).or_default().push(obj),
            None => other_entries.push(obj),
        }
    }

    let mut services: BTreeMap<String, pb::Service> = BTreeMap::new();

    // Kubernetes Services.
    for (key, doc) in of_kind("Service") {
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        let what = key.to_string();
        let mut ports = Vec::new();
        for (i, p) in doc["spec"]["ports"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let Some(number) = port_number(&p["port"]) else {
                b.warnings.push(format!(
                    "{what}: spec.ports[{i}].port is not a port number; port left out"
                ));
                continue;
            };
            let port_name = p["name"].as_str().unwrap_or_default().to_string();
            let protocol = protocol_of(p["appProtocol"].as_str(), &port_name).unwrap_or_else(|e| {
                b.warnings
                    .push(format!("{what}: spec.ports[{i}]: {e}; served as tcp"));
                "tcp".into()
            });
            ports.push(pb::Port {
                name: port_name,
                port: number,
                protocol,
                target_port: port_number(&p["targetPort"]).unwrap_or_default(),
            });
        }
        let annotations = str_map(doc["metadata"].get("annotations"));
        let svc_ref = ObjectRef::new(ObjectKind::Service, ns, name);
        let se = service_exports
            .get(&(ns.to_string(), name.to_string()))
            .map(|a| (ObjectRef::new(ObjectKind::ServiceExport, ns, name), a));
        let exported = match export::export_decision_with_service_export(
            &svc_ref,
            &annotations,
            se.as_ref().map(|(r, a)| (r, *a)),
        ) {
            Ok(to) => to.is_some(),
            Err(e) => {
                b.warnings.push(format!("{e}; not exported"));
                false
            }
        };
        let selector = str_map(doc["spec"].get("selector"));
        let port_names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
        let mut endpoints = Vec::new();
        let mut identities = BTreeSet::new();
        for e in entries.iter().filter(|e| {
            e.namespace == ns
                && !selector.is_empty()
                && selector.iter().all(|(k, v)| e.labels.get(k) == Some(v))
        }) {
            let ep = b.endpoint(
                &format!("WorkloadEntry {}/{}", e.namespace, e.name),
                e,
                &port_names,
            );
            if !ep.identity.is_empty() {
                identities.insert(ep.identity.clone());
            } else if let Some(sa) = &e.service_account
                && let Some(id) = b.identity(&what, ns, sa)
            {
                identities.insert(id);
            }
            endpoints.push(ep);
        }
        sort_endpoints(&mut endpoints);
        // Namespace sameness: the clusterset entries of this service add
        // their identities (their endpoints are the WorkloadEntries above).
        if let Some(ses) = clusterset_entries.remove(&(name.to_string(), ns.to_string())) {
            for se in ses {
                identities.extend(sans(&se));
            }
        }
        let hostname = format!("{name}.{ns}.{CLUSTER_SUFFIX}");
        services.insert(
            hostname.clone(),
            pb::Service {
                hostname,
                namespace: ns.to_string(),
                name: name.to_string(),
                aliases: vec![
                    format!("{name}.{ns}.{CLUSTERSET_SUFFIX}"),
                    format!("{name}.{ns}"),
                ],
                ports,
                identities: identities.into_iter().collect(),
                exported,
                endpoints,
            },
        );
    }

    // ServiceEntries of clusterset services without a local Service.
    for ((svc, ns), ses) in clusterset_entries {
        let mut ses = ses.into_iter();
        let Some(se) = ses.next() else { continue };
        for dup in ses {
            b.warnings.push(format!(
                "{}: host {} is already served by {}; left out",
                dup.key, dup.hosts[0], se.key
            ));
        }
        let hostname = format!("{svc}.{ns}.{CLUSTER_SUFFIX}");
        let mut aliases = vec![se.hosts[0].clone(), format!("{svc}.{ns}")];
        aliases.extend(se.hosts.iter().skip(1).cloned());
        let s = entry_service(&mut b, &se, hostname.clone(), &ns, &svc, aliases);
        services.insert(hostname, s);
    }

    // Other ServiceEntries.
    for se in other_entries {
        let hostname = se.hosts[0].clone();
        if services.contains_key(&hostname)
            || services.values().any(|s| s.aliases.contains(&hostname))
        {
            b.warnings.push(format!(
                "{}: host {hostname} is already a service; left out",
                se.key
            ));
            continue;
        }
        let aliases = se.hosts[1..].to_vec();
        let (ns, name) = (se.key.namespace.clone(), se.key.name.clone());
        let s = entry_service(&mut b, &se, hostname.clone(), &ns, &name, aliases);
        services.insert(hostname, s);
    }

    // Policies.
    let mut destination_rules = Vec::new();
    for kind in POLICY_KINDS {
        for (key, doc) in of_kind(kind) {
            let spec = &doc["spec"];
            if let Err(problems) = strait_model::istio::parse(kind, spec) {
                b.warnings
                    .push(format!("{key}: {}; left out", problems.join("; ")));
                continue;
            }
            let spec_json = serde_json::to_string(spec).unwrap_or_else(|_| "null".into());
            let generation = doc["metadata"]["generation"]
                .as_u64()
                .unwrap_or_else(|| strait_model::names::fnv1a64(spec_json.as_bytes()));
            snap.insert(
                type_url::POLICY,
                &format!("{kind}/{}/{}", key.namespace, key.name),
                &pb::Policy {
                    kind: kind.to_string(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    spec_json,
                    generation,
                },
            );
            if kind == "DestinationRule" {
                destination_rules.push((key, spec));
            }
        }
    }

    // Gateway routes.
    for s in services.values().filter(|s| s.exported) {
        let mut subsets: BTreeMap<String, (String, pb::Labels)> = BTreeMap::new();
        for (key, spec) in &destination_rules {
            let host = resolve_host(spec["host"].as_str().unwrap_or_default(), &key.namespace);
            if host != s.hostname && !s.aliases.contains(&host) {
                continue;
            }
            for subset in spec["subsets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let name = subset["name"].as_str().unwrap_or_default().to_string();
                let labels = pb::Labels {
                    labels: str_map(subset.get("labels")).into_iter().collect(),
                };
                match subsets.get(&name) {
                    Some((first, _)) => b.warnings.push(format!(
                        "{key}: subset {name:?} of {} is already defined by {first}; left out",
                        s.hostname
                    )),
                    None => {
                        subsets.insert(name, (key.to_string(), labels));
                    }
                }
            }
        }
        let endpoints = s
            .endpoints
            .iter()
            .filter(|e| e.kind == pb::endpoint::Kind::Sidecar as i32)
            .map(|e| pb::GatewayEndpoint {
                address: e.address.clone(),
                ports: s.ports.iter().map(|p| (p.port, e.port)).collect(),
                labels: e.labels.clone(),
                healthy: e.healthy,
            })
            .collect();
        snap.insert(
            type_url::GATEWAY_ROUTE,
            &s.hostname,
            &pb::GatewayRoute {
                hostname: s.hostname.clone(),
                ports: s.ports.iter().map(|p| p.port).collect(),
                subsets: subsets.into_iter().map(|(n, (_, l))| (n, l)).collect(),
                endpoints,
            },
        );
    }

    for (hostname, s) in &services {
        snap.insert(type_url::SERVICE, hostname, s);
    }

    // Trust bundles.
    let denied: Vec<String> = trust.denied_intermediates.iter().cloned().collect();
    let local_td = ctx.trust_domain.to_string();
    snap.insert(
        type_url::TRUST_BUNDLE,
        &local_td,
        &pb::TrustBundle {
            trust_domain: local_td.clone(),
            roots_pem: trust.local_roots_pem.clone(),
            denied_intermediates: denied.clone(),
            local: true,
        },
    );
    for (td, roots) in &trust.federated {
        if *td == local_td {
            b.warnings.push(format!(
                "federated trust domain {td} is this cluster's own; its federated roots are left out"
            ));
            continue;
        }
        snap.insert(
            type_url::TRUST_BUNDLE,
            td,
            &pb::TrustBundle {
                trust_domain: td.clone(),
                roots_pem: roots.clone(),
                denied_intermediates: denied.clone(),
                local: false,
            },
        );
    }

    // Networks.
    for n in networks {
        snap.insert(
            type_url::NETWORK,
            &n.name,
            &pb::Network {
                name: n.name.clone(),
                gateways: n.gateways.clone(),
                mode: match n.mode {
                    NetworkMode::Sni => pb::network::Mode::Sni as i32,
                    NetworkMode::Quic => pb::network::Mode::Quic as i32,
                },
                tunnels: n.tunnels.clone(),
            },
        );
    }

    (snap, b.warnings)
}

fn sans(se: &ServiceEntryObj<'_>) -> Vec<String> {
    se.doc["spec"]["subjectAltNames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A Service resource from a ServiceEntry: its ports, endpoints and SANs.
fn entry_service(
    b: &mut Builder<'_>,
    se: &ServiceEntryObj<'_>,
    hostname: String,
    namespace: &str,
    name: &str,
    aliases: Vec<String>,
) -> pb::Service {
    let what = se.key.to_string();
    let spec = &se.doc["spec"];
    let mut ports = Vec::new();
    for (i, p) in spec["ports"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let Some(number) = port_number(&p["number"]) else {
            b.warnings.push(format!(
                "{what}: spec.ports[{i}].number is not a port number; port left out"
            ));
            continue;
        };
        let port_name = p["name"].as_str().unwrap_or_default().to_string();
        let protocol = match p["protocol"].as_str() {
            Some(proto) => Protocol::parse(proto)
                .ok()
                .map(|p| p.as_str().to_ascii_lowercase()),
            None => protocol_of(None, &port_name).ok(),
        }
        .unwrap_or_else(|| {
            b.warnings.push(format!(
                "{what}: spec.ports[{i}].protocol {:?} is not a protocol strait knows; served as tcp",
                p["protocol"].as_str().unwrap_or_default()
            ));
            "tcp".into()
        });
        ports.push(pb::Port {
            name: port_name,
            port: number,
            protocol,
            target_port: port_number(&p["targetPort"]).unwrap_or_default(),
        });
    }
    let port_names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
    let mut identities: BTreeSet<String> = sans(se).into_iter().collect();
    let mut endpoints = Vec::new();
    for (i, ep) in spec["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let ep_what = format!("{what}: spec.endpoints[{i}]");
        match read_entry(&se.key.namespace, "", ep, &BTreeMap::new()) {
            Ok(mut e) => {
                // An entry's endpoints are not workloads with a name; the
                // namespace of the identity is the service's.
                e.namespace = namespace.to_string();
                let ep = b.endpoint(&ep_what, &e, &port_names);
                if !ep.identity.is_empty() {
                    identities.insert(ep.identity.clone());
                }
                endpoints.push(ep);
            }
            Err(reason) => b.warnings.push(format!("{ep_what}: {reason}; left out")),
        }
    }
    if !spec["workloadSelector"].is_null() {
        b.warnings.push(format!(
            "{what}: spec.workloadSelector is not supported; use spec.endpoints"
        ));
    }
    sort_endpoints(&mut endpoints);
    pb::Service {
        hostname,
        namespace: namespace.to_string(),
        name: name.to_string(),
        aliases,
        ports,
        identities: identities.into_iter().collect(),
        exported: export_flag_of_entry(b, se),
        endpoints,
    }
}

fn export_flag_of_entry(b: &mut Builder<'_>, se: &ServiceEntryObj<'_>) -> bool {
    let annotations = str_map(se.doc["metadata"].get("annotations"));
    let r = ObjectRef::new(ObjectKind::ServiceEntry, &se.key.namespace, &se.key.name);
    match export::export_decision(&r, &annotations) {
        Ok(to) => to.is_some(),
        Err(e) => {
            b.warnings.push(format!("{e}; not exported"));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::source;

    fn ctx() -> ClusterContext {
        ClusterContext {
            cluster: "east".into(),
            network: "net-east".into(),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            locality: Some("eu/a".into()),
            egress: Some("10.0.0.1:15444".into()),
        }
    }

    fn config(yaml: &str) -> Config {
        let read = BTreeMap::from([(PathBuf::from("c.yaml"), source::parse_file(yaml))]);
        let c = Config::default().apply(&read);
        assert!(c.rejections.is_empty(), "{:?}", c.rejections);
        c
    }

    fn run(yaml: &str) -> (Snapshot, Vec<String>) {
        build(&ctx(), &config(yaml), &TrustInput::default(), &[])
    }

    fn decode<M: Message + Default>(snap: &Snapshot, type_url: &str, name: &str) -> M {
        let r = snap
            .resources(type_url)
            .unwrap()
            .get(name)
            .unwrap_or_else(|| panic!("no {type_url} {name}: {:?}", snap.resources(type_url)));
        M::decode(r.resource.value.as_slice()).unwrap()
    }

    fn service(snap: &Snapshot, host: &str) -> pb::Service {
        decode(snap, type_url::SERVICE, host)
    }

    const ECHO: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports:
  - {name: http-web, port: 8080, targetPort: 80}
  - {name: grpc, port: 9090, appProtocol: grpc}
  - {name: plain, port: 7000}
  - {name: h2, port: 7001, appProtocol: kubernetes.io/h2c}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-1, namespace: demo, annotations: {strait.io/inbound-port: "16006"}}
spec: {address: 10.1.0.1, labels: {app: echo, version: v1}, serviceAccount: echo}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-2, namespace: demo}
spec: {address: 10.1.0.2, labels: {app: echo, version: v2}, network: net-east, locality: eu/b}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: demo}
spec: {address: 10.1.0.3, labels: {app: other}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-elsewhere, namespace: prod}
spec: {address: 10.1.0.4, labels: {app: echo}}
"#;

    const IMPORTED_WE: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: strait-echo.west, namespace: demo, labels: {strait.io/cluster: west}}
spec:
  address: 192.0.2.10
  network: net-west
  ports: {http-web: 15443, grpc: 15443}
  weight: 3
  locality: us/x
  serviceAccount: echo
  labels: {app: echo, strait.io/cluster: west}
"#;

    const IMPORTED_SE: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: strait-echo, namespace: demo}
spec:
  hosts: [echo.demo.svc.clusterset.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http-web, protocol: HTTP}]
  subjectAltNames: [spiffe://partner.example/ns/demo/sa/echo]
  endpoints:
  - {address: 192.0.2.10, network: net-west, ports: {http-web: 15443}, weight: 3, labels: {strait.io/cluster: west}}
"#;

    #[test]
    fn a_service_gets_ports_aliases_and_its_selected_endpoints() {
        let (snap, warnings) = run(ECHO);
        assert!(warnings.is_empty(), "{warnings:?}");
        let s = service(&snap, "echo.demo.svc.cluster.local");
        assert_eq!(s.aliases, ["echo.demo.svc.clusterset.local", "echo.demo"]);
        let ports: Vec<(&str, u32, &str, u32)> = s
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol.as_str(), p.target_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http-web", 8080, "http", 80),
                ("grpc", 9090, "grpc", 0),
                ("plain", 7000, "tcp", 0),
                ("h2", 7001, "http2", 0),
            ]
        );
        assert!(!s.exported);
        let eps: Vec<(&str, u32, &str, &str, &str)> = s
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.address.as_str(),
                    e.port,
                    e.identity.as_str(),
                    e.workload.as_str(),
                    e.locality.as_str(),
                )
            })
            .collect();
        assert_eq!(
            eps,
            [
                (
                    "10.1.0.1",
                    16006,
                    "spiffe://cluster.local/ns/demo/sa/echo",
                    "echo-1",
                    "eu/a"
                ),
                (
                    "10.1.0.2",
                    15006,
                    "spiffe://cluster.local/ns/demo/sa/default",
                    "echo-2",
                    "eu/b"
                ),
            ]
        );
        assert!(
            s.endpoints
                .iter()
                .all(|e| e.kind == pb::endpoint::Kind::Sidecar as i32
                    && e.healthy
                    && e.weight == 1
                    && e.cluster == "east"
                    && e.network == "net-east")
        );
        assert_eq!(
            s.identities,
            [
                "spiffe://cluster.local/ns/demo/sa/default",
                "spiffe://cluster.local/ns/demo/sa/echo"
            ]
        );
    }

    #[test]
    fn workloads_are_the_local_workload_entries() {
        let (snap, _) = run(&format!("{ECHO}{IMPORTED_WE}"));
        let names: Vec<&String> = snap.resources(type_url::WORKLOAD).unwrap().keys().collect();
        assert_eq!(
            names,
            [
                "demo/echo-1",
                "demo/echo-2",
                "demo/other",
                "prod/echo-elsewhere"
            ]
        );
        let w: pb::Workload = decode(&snap, type_url::WORKLOAD, "demo/echo-1");
        assert_eq!(w.identity, "spiffe://cluster.local/ns/demo/sa/echo");
        assert_eq!(w.network, "net-east");
        assert_eq!(w.cluster, "east");
        assert_eq!(w.locality, "eu/a");
        assert_eq!(w.labels.get("version").map(String::as_str), Some("v1"));
    }

    #[test]
    fn remote_workload_entries_become_gateway_endpoints() {
        let networks = [NetworkInput {
            name: "net-west".into(),
            gateways: vec!["192.0.2.10:15443".into()],
            mode: NetworkMode::Quic,
            tunnels: vec!["192.0.2.10:15443".into()],
        }];
        let (snap, warnings) = build(
            &ctx(),
            &config(&format!("{ECHO}{IMPORTED_WE}")),
            &TrustInput::default(),
            &networks,
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let s = service(&snap, "echo.demo.svc.cluster.local");
        let gw: Vec<&pb::Endpoint> = s
            .endpoints
            .iter()
            .filter(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
            .collect();
        assert_eq!(gw.len(), 1);
        let g = gw[0];
        assert_eq!(
            (
                g.address.as_str(),
                g.port,
                g.weight,
                g.network.as_str(),
                g.cluster.as_str()
            ),
            ("192.0.2.10", 15443, 3, "net-west", "west")
        );
        assert_eq!(g.locality, "us/x");
        assert_eq!(g.identity, "");
        assert_eq!(
            g.via, "10.0.0.1:15444",
            "QUIC network goes through the egress"
        );
        assert!(
            s.identities
                .contains(&"spiffe://cluster.local/ns/demo/sa/echo".to_string())
        );
        let n: pb::Network = decode(&snap, type_url::NETWORK, "net-west");
        assert_eq!(n.mode, pb::network::Mode::Quic as i32);
        assert!(
            snap.resources(type_url::WORKLOAD)
                .unwrap()
                .get("demo/strait-echo.west")
                .is_none()
        );
    }

    #[test]
    fn namespace_sameness_merges_a_clusterset_entry_into_the_local_service() {
        let (snap, warnings) = run(&format!("{ECHO}{IMPORTED_WE}{IMPORTED_SE}"));
        assert!(warnings.is_empty(), "{warnings:?}");
        let services = snap.resources(type_url::SERVICE).unwrap();
        assert_eq!(
            services.keys().collect::<Vec<_>>(),
            ["echo.demo.svc.cluster.local"],
            "one service, not one per host"
        );
        let s = service(&snap, "echo.demo.svc.cluster.local");
        let gateways = s
            .endpoints
            .iter()
            .filter(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
            .count();
        assert_eq!(gateways, 1, "the entry's endpoint is not counted twice");
        assert!(
            s.identities
                .contains(&"spiffe://partner.example/ns/demo/sa/echo".to_string()),
            "{:?}",
            s.identities
        );
    }

    #[test]
    fn a_clusterset_entry_without_local_service_is_served_under_the_local_name() {
        let (snap, warnings) = run(IMPORTED_SE);
        assert!(warnings.is_empty(), "{warnings:?}");
        let s = service(&snap, "echo.demo.svc.cluster.local");
        assert_eq!((s.name.as_str(), s.namespace.as_str()), ("echo", "demo"));
        assert_eq!(s.aliases, ["echo.demo.svc.clusterset.local", "echo.demo"]);
        assert_eq!(s.ports.len(), 1);
        assert_eq!(s.ports[0].protocol, "http");
        assert_eq!(s.endpoints.len(), 1);
        let e = &s.endpoints[0];
        assert_eq!(e.kind, pb::endpoint::Kind::Gateway as i32);
        assert_eq!((e.port, e.weight, e.cluster.as_str()), (15443, 3, "west"));
        assert_eq!(s.identities, ["spiffe://partner.example/ns/demo/sa/echo"]);
    }

    #[test]
    fn an_entry_endpoint_on_the_local_network_is_a_sidecar() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: strait-db, namespace: data}
spec:
  hosts: [db.data.svc.clusterset.local]
  ports: [{number: 5432, name: tcp-pg}]
  endpoints:
  - {address: 10.9.0.7, network: net-east, serviceAccount: db, ports: {tcp-pg: 5432}}
"#;
        let (snap, warnings) = run(yaml);
        assert!(warnings.is_empty(), "{warnings:?}");
        let s = service(&snap, "db.data.svc.cluster.local");
        let e = &s.endpoints[0];
        assert_eq!(e.kind, pb::endpoint::Kind::Sidecar as i32);
        assert_eq!(e.port, SIDECAR_INBOUND_PORT);
        assert_eq!(e.identity, "spiffe://cluster.local/ns/data/sa/db");
        assert_eq!(s.identities, ["spiffe://cluster.local/ns/data/sa/db"]);
    }

    #[test]
    fn other_service_entries_are_named_by_their_first_host() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: demo}
spec:
  hosts: [api.example.com, api2.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext2, namespace: demo}
spec:
  hosts: [api.example.com]
"#;
        let (snap, warnings) = run(yaml);
        let s = service(&snap, "api.example.com");
        assert_eq!(s.aliases, ["api2.example.com"]);
        assert_eq!(s.ports[0].protocol, "tls");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0]
                .contains("ServiceEntry demo/ext2: host api.example.com is already a service"),
            "{warnings:?}"
        );
    }

    #[test]
    fn export_signals() {
        let cases: &[(&str, &str, bool, Option<&str>)] = &[
            (
                "annotation",
                "metadata: {name: a, namespace: ns, annotations: {strait.io/export: \"true\"}}",
                true,
                None,
            ),
            (
                "false",
                "metadata: {name: a, namespace: ns, annotations: {strait.io/export: \"false\"}}",
                false,
                None,
            ),
            ("none", "metadata: {name: a, namespace: ns}", false, None),
            (
                "bad value",
                "metadata: {name: a, namespace: ns, annotations: {strait.io/export: \"yes\"}}",
                false,
                Some("strait.io/export"),
            ),
        ];
        for (label, meta, exported, warning) in cases {
            let yaml =
                format!("apiVersion: v1\nkind: Service\n{meta}\nspec: {{ports: [{{port: 80}}]}}\n");
            let (snap, warnings) = run(&yaml);
            assert_eq!(
                service(&snap, "a.ns.svc.cluster.local").exported,
                *exported,
                "{label}"
            );
            match warning {
                Some(w) => assert!(
                    warnings.iter().any(|x| x.contains(w)),
                    "{label}: {warnings:?}"
                ),
                None => assert!(warnings.is_empty(), "{label}: {warnings:?}"),
            }
        }
        let with_export = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {ports: [{port: 80}]}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: a, namespace: ns}\n";
        assert!(service(&run(with_export).0, "a.ns.svc.cluster.local").exported);
    }

    #[test]
    fn bad_objects_are_warned_about_by_name() {
        let cases: &[(&str, &str)] = &[
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {labels: {a: b}}\n",
                "WorkloadEntry ns/w: address is missing",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns, annotations: {strait.io/inbound-port: \"0\"}}\nspec: {address: 10.0.0.1}\n",
                "WorkloadEntry ns/w: annotation strait.io/inbound-port: \"0\" is not a port number",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {address: 10.0.0.1, ports: {http: 70000}}\n",
                "WorkloadEntry ns/w: ports.http: 70000 is not a port number",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {address: 10.0.0.1, weight: -1}\n",
                "WorkloadEntry ns/w: weight: -1",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {ports: [{port: 0}]}\n",
                "Service ns/s: spec.ports[0].port is not a port number",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {ports: [{port: 80, appProtocol: carrier-pigeon}]}\n",
                "Service ns/s: spec.ports[0]: appProtocol \"carrier-pigeon\"",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec: {hosts: []}\n",
                "ServiceEntry ns/e: spec.hosts is empty",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec: {hosts: [x.example], endpoints: [{network: x}]}\n",
                "ServiceEntry ns/e: spec.endpoints[0]: address is missing",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec: {hosts: [x.example], ports: [{number: 1, name: a, protocol: UDP}]}\n",
                "ServiceEntry ns/e: spec.ports[0].protocol \"UDP\"",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {address: 10.0.0.1, serviceAccount: \"a/b\"}\n",
                "WorkloadEntry ns/w: service account \"a/b\"",
            ),
        ];
        for (yaml, expected) in cases {
            let (_, warnings) = run(yaml);
            assert!(
                warnings.iter().any(|w| w.contains(expected)),
                "expected {expected:?} in {warnings:?}"
            );
        }
    }

    const POLICIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo, generation: 7}
spec:
  host: echo
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-fqdn, namespace: other}
spec:
  host: echo.demo.svc.cluster.local
  subsets: [{name: v1, labels: {version: other}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: unrelated, namespace: other}
spec:
  host: echo
  subsets: [{name: v3, labels: {version: v3}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: demo}
spec:
  hosts: [echo]
  http: [{route: [{destination: {host: echo}, weight: -5}]}]
"#;

    #[test]
    fn policies_carry_their_spec_and_generation() {
        let (snap, warnings) = run(POLICIES);
        let names: Vec<&String> = snap.resources(type_url::POLICY).unwrap().keys().collect();
        assert_eq!(
            names,
            [
                "DestinationRule/demo/echo",
                "DestinationRule/other/echo-fqdn",
                "DestinationRule/other/unrelated",
                "PeerAuthentication/demo/strict"
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("VirtualService demo/broken: "),
            "{warnings:?}"
        );
        let dr: pb::Policy = decode(&snap, type_url::POLICY, "DestinationRule/demo/echo");
        assert_eq!(dr.generation, 7);
        let spec: Value = serde_json::from_str(&dr.spec_json).unwrap();
        assert_eq!(spec["host"], "echo");
        let pa: pb::Policy = decode(&snap, type_url::POLICY, "PeerAuthentication/demo/strict");
        assert_eq!(
            pa.generation,
            strait_model::names::fnv1a64(pa.spec_json.as_bytes())
        );
    }

    #[test]
    fn host_resolution() {
        let cases = [
            ("echo", "demo", "echo.demo.svc.cluster.local"),
            ("echo.demo", "x", "echo.demo.svc.cluster.local"),
            ("echo.demo.svc", "x", "echo.demo.svc.cluster.local"),
            (
                "echo.demo.svc.cluster.local",
                "x",
                "echo.demo.svc.cluster.local",
            ),
            (
                "echo.demo.svc.clusterset.local",
                "x",
                "echo.demo.svc.clusterset.local",
            ),
            ("api.example.com", "x", "api.example.com"),
        ];
        for (host, ns, want) in cases {
            assert_eq!(resolve_host(host, ns), want, "{host} in {ns}");
        }
        let keys = [
            ("echo.demo.svc.clusterset.local", Some(("echo", "demo"))),
            ("echo.svc.clusterset.local", None),
            ("a.b.c.svc.clusterset.local", None),
            ("echo.demo.svc.cluster.local", None),
            ("xsvc.clusterset.local", None),
        ];
        for (host, want) in keys {
            assert_eq!(
                clusterset_key(host),
                want.map(|(a, b)| (a.to_string(), b.to_string())),
                "{host}"
            );
        }
    }

    #[test]
    fn gateway_routes_for_exported_services_with_subsets_and_sidecars() {
        let yaml = format!(
            "{}{IMPORTED_WE}\n---\n{POLICIES}",
            ECHO.replace(
                "metadata: {name: echo, namespace: demo}",
                "metadata: {name: echo, namespace: demo, annotations: {strait.io/export: \"true\"}}"
            )
        );
        let (snap, warnings) = run(&yaml);
        let routes = snap.resources(type_url::GATEWAY_ROUTE).unwrap();
        assert_eq!(
            routes.keys().collect::<Vec<_>>(),
            ["echo.demo.svc.cluster.local"]
        );
        let r: pb::GatewayRoute = decode(
            &snap,
            type_url::GATEWAY_ROUTE,
            "echo.demo.svc.cluster.local",
        );
        assert_eq!(r.ports, [8080, 9090, 7000, 7001]);
        let subsets: BTreeMap<&str, BTreeMap<&str, &str>> = r
            .subsets
            .iter()
            .map(|(n, l)| {
                (
                    n.as_str(),
                    l.labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            subsets,
            BTreeMap::from([
                ("v1", BTreeMap::from([("version", "v1")])),
                ("v2", BTreeMap::from([("version", "v2")])),
            ]),
            "short name in the rule's namespace; the first rule wins v1; `echo` in `other` is another host"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("DestinationRule other/echo-fqdn: subset \"v1\"")),
            "{warnings:?}"
        );
        let eps: Vec<(&str, Vec<(u32, u32)>)> = r
            .endpoints
            .iter()
            .map(|e| {
                let mut p: Vec<(u32, u32)> = e.ports.iter().map(|(a, b)| (*a, *b)).collect();
                p.sort_unstable();
                (e.address.as_str(), p)
            })
            .collect();
        assert_eq!(
            eps,
            [
                (
                    "10.1.0.1",
                    vec![(7000, 16006), (7001, 16006), (8080, 16006), (9090, 16006)]
                ),
                (
                    "10.1.0.2",
                    vec![(7000, 15006), (7001, 15006), (8080, 15006), (9090, 15006)]
                ),
            ],
            "local sidecars only, not the remote gateway"
        );
    }

    #[test]
    fn trust_bundles_and_networks() {
        let trust = TrustInput {
            local_roots_pem: vec!["LOCAL".into()],
            federated: BTreeMap::from([
                ("partner.example".to_string(), vec!["PARTNER".to_string()]),
                ("cluster.local".to_string(), vec!["SELF".to_string()]),
            ]),
            denied_intermediates: BTreeSet::from(["ab12".to_string()]),
        };
        let (snap, warnings) = build(
            &ctx(),
            &Config::default(),
            &trust,
            &[NetworkInput {
                name: "net-west".into(),
                gateways: vec!["gw.west:15443".into()],
                ..Default::default()
            }],
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let local: pb::TrustBundle = decode(&snap, type_url::TRUST_BUNDLE, "cluster.local");
        assert!(local.local);
        assert_eq!(local.roots_pem, ["LOCAL"]);
        assert_eq!(local.denied_intermediates, ["ab12"]);
        let partner: pb::TrustBundle = decode(&snap, type_url::TRUST_BUNDLE, "partner.example");
        assert!(!partner.local);
        assert_eq!(partner.denied_intermediates, ["ab12"]);
        let n: pb::Network = decode(&snap, type_url::NETWORK, "net-west");
        assert_eq!(
            (n.mode, n.gateways.as_slice()),
            (
                pb::network::Mode::Sni as i32,
                ["gw.west:15443".to_string()].as_slice()
            )
        );
    }

    #[test]
    fn builds_are_deterministic_and_versions_follow_content() {
        let yaml = format!("{ECHO}{IMPORTED_WE}{IMPORTED_SE}\n---\n{POLICIES}");
        let (a, _) = run(&yaml);
        for _ in 0..5 {
            let (b, _) = run(&yaml);
            assert_eq!(a, b, "same input, same bytes and versions");
        }
        let changed = yaml.replace("10.1.0.2", "10.1.0.9");
        let (c, _) = run(&changed);
        let v = |s: &Snapshot, t: &str, n: &str| s.resources(t).unwrap()[n].version.clone();
        assert_ne!(
            v(&a, type_url::SERVICE, "echo.demo.svc.cluster.local"),
            v(&c, type_url::SERVICE, "echo.demo.svc.cluster.local")
        );
        assert_eq!(
            v(&a, type_url::POLICY, "DestinationRule/demo/echo"),
            v(&c, type_url::POLICY, "DestinationRule/demo/echo")
        );
    }

    #[test]
    fn canonical_encoding_sorts_maps_and_decodes_to_the_same_message() {
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let pairs: Vec<(String, String)> = (0..40)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .collect();
        let forward: HashMap<String, String> = pairs.iter().cloned().collect();
        let backward: HashMap<String, String> = pairs.iter().rev().cloned().collect();
        let route = |l: HashMap<String, String>| pb::GatewayRoute {
            hostname: "h".into(),
            ports: vec![1, 2],
            subsets: HashMap::from([
                ("a".to_string(), pb::Labels { labels: l.clone() }),
                (
                    "b".to_string(),
                    pb::Labels {
                        labels: labels(&[("x", "y")]),
                    },
                ),
            ]),
            endpoints: vec![pb::GatewayEndpoint {
                address: "10.0.0.1".into(),
                ports: (1..30).map(|p| (p, p + 1000)).collect(),
                labels: l,
                healthy: true,
            }],
        };
        let (r1, r2) = (route(forward.clone()), route(backward));
        assert_eq!(r1.canonical_bytes(), r2.canonical_bytes());
        assert_eq!(
            pb::GatewayRoute::decode(r1.canonical_bytes().as_slice()).unwrap(),
            r1
        );
        let w = pb::Workload {
            name: "w".into(),
            labels: forward.clone(),
            ports: (0..20).map(|i| (format!("p{i}"), i)).collect(),
            ..Default::default()
        };
        assert_eq!(
            pb::Workload::decode(w.canonical_bytes().as_slice()).unwrap(),
            w
        );
        let s = pb::Service {
            hostname: "s".into(),
            endpoints: vec![
                pb::Endpoint {
                    labels: forward,
                    ..Default::default()
                },
                pb::Endpoint {
                    address: "x".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            pb::Service::decode(s.canonical_bytes().as_slice()).unwrap(),
            s
        );
    }
}
