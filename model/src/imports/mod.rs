//! What an importing cluster gets from the services other clusters export:
//! Istio `ServiceEntry` and `WorkloadEntry` objects and MCS `ServiceImport`s,
//! computed by [`import_objects`] without I/O.
//!
//! # Rules
//!
//! - **Namespace sameness.** `<svc>.<ns>` exported by several clusters is
//!   one service: one `ServiceEntry` and one `ServiceImport`, with endpoints
//!   from every exporter.
//! - **Who is imported.** Exports of the importer itself are skipped. An
//!   export from the importer's own trust domain is imported only if its
//!   `export_to` allows the importer; an export from another trust domain
//!   (a peered mesh) is taken as already admitted by the broker (with
//!   [`ExportTo::allows_mesh`](crate::mesh::ExportTo::allows_mesh)). If one
//!   cluster exports the same key twice, one export is used (the first in
//!   `Ord` order) and a warning says so.
//! - **Ports** are merged by name across exporters, taking clusters in name
//!   order: a port whose name or number clashes with one already taken
//!   (different number or protocol under the same name, or the same number
//!   under another name) is not routed to that exporter, with a warning.
//! - **Endpoints**, one per exporting cluster: the cluster's first east-west
//!   gateway (`address` = its host, every port the cluster serves mapped to
//!   the gateway port, 15443 by default), with `network`, `locality` (the
//!   cluster's, else the one locality all its healthy endpoints share),
//!   `weight` = the cluster's healthy endpoint count and the label
//!   `strait.io/cluster`. A cluster on the importer's own network that
//!   published endpoint addresses gets one endpoint per address instead
//!   (ports mapped to the workload port, weight 1), since its pods are
//!   directly reachable. A cluster with **no healthy endpoints gets no
//!   endpoint**: Istio treats weight 0 as 1, so it would otherwise receive
//!   traffic. The `ServiceEntry` itself stays (possibly without endpoints)
//!   for as long as some cluster exports the service, so that its host keeps
//!   resolving while health changes; callers get "no healthy upstream"
//!   rather than a DNS failure.
//! - **Resolution** is `STATIC`, or `DNS` when some gateway is a DNS name
//!   (Istio rejects host names as `STATIC` endpoint addresses).
//! - **Identities.** `serviceAccount` is set on an endpoint when the cluster
//!   published exactly one service account and shares the importer's trust
//!   domain (Istio derives the SPIFFE ID from it in the importer's own trust
//!   domain). `subjectAltNames` lists `spiffe://<td>/ns/<ns>/sa/<sa>` for
//!   every exporter's trust domain and service accounts when every exporter
//!   published at least one; otherwise it is left out.
//! - **Local services.** When the importer has a Service with the same key,
//!   Istio does not merge the `ServiceEntry` into it, so each remote endpoint
//!   is also written as a `WorkloadEntry` carrying the local Service's
//!   selector labels (plus `strait.io/cluster`), with ports mapped by the
//!   local Service's port names. An exporter serving none of the local
//!   Service's ports gets no `WorkloadEntry`. A gateway with a DNS name
//!   cannot back one and is skipped with a warning; so is a local Service
//!   without a selector.
//! - **ServiceImport** (`multicluster.x-k8s.io/v1beta1`), type
//!   `ClusterSetIP`, with the merged ports (L4 protocol `TCP`, `appProtocol`
//!   from the Istio protocol) and `status.clusters` listing every exporter.
//! - **ClusterSet IPs** (`ServiceEntry.addresses`, `ServiceImport.spec.ips`)
//!   are not set here: they depend on what the importing cluster already
//!   gave out, so its control plane adds them with
//!   [`ImportObjects::assign_clusterset_ips`] (see [`vips`]).
//!
//! # Names
//!
//! All generated names are valid object names and label values (at most 63
//! characters, see [`names::bounded_name`]):
//!
//! | object | namespace | name |
//! |---|---|---|
//! | ServiceEntry | `<ns>` | `strait-<svc>` |
//! | WorkloadEntry via gateway | `<ns>` | `strait-<svc>.<cluster>` |
//! | WorkloadEntry per pod address | `<ns>` | `strait-<svc>.<cluster>.<ip>` (`10-0-0-7`; IPv6: its 8 groups, `fd00-0-0-0-0-0-0-7`) |
//! | ServiceImport | `<ns>` | `<svc>` (MCS requires the service's own name) |
//!
//! Service names and cluster names are DNS labels, so the `.` separators
//! keep names of different (service, cluster) pairs apart. A cluster from
//! another trust domain appears as `<cluster>-<8 hex digits of the trust
//! domain's hash>` in names and in `status.clusters`. Every object carries
//! `app.kubernetes.io/managed-by: strait` and `strait.io/service: <svc>`.
//!
//! Output is sorted (by namespace, then name, per kind) and independent of
//! the order of the inputs.

pub mod vips;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Serialize;
use strait_ca::{ClusterName, SpiffeId};

use crate::mesh::{
    ClusterInfo, GatewayAddress, LocalService, Network, RemoteService, ServiceKey, ServicePort,
};
use crate::names;
use crate::objects::{
    CLUSTER_LABEL, ClusterStatus, Location, MANAGED_BY, MANAGED_BY_LABEL, ObjectMeta, Resolution,
    SERVICE_LABEL, ServiceEntry, ServiceEntryPort, ServiceEntrySpec, ServiceImport,
    ServiceImportPort, ServiceImportSpec, ServiceImportStatus, ServiceImportType, WorkloadEntry,
    WorkloadEntrySpec,
};

/// Set on endpoints and WorkloadEntries of clusters from another trust
/// domain (when the trust domain is a valid label value).
pub const TRUST_DOMAIN_LABEL: &str = "strait.io/trust-domain";

/// Everything an importing cluster should hold, and what was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportObjects {
    pub service_entries: Vec<ServiceEntry>,
    pub workload_entries: Vec<WorkloadEntry>,
    pub service_imports: Vec<ServiceImport>,
    /// Exports (or parts of them) that could not be imported, and why.
    pub warnings: Vec<ImportWarning>,
}

/// Something in the exports that was skipped. The rest is imported.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum ImportWarning {
    #[error("service {service}: cluster {cluster} exports it more than once; one export is used")]
    DuplicateExport {
        service: ServiceKey,
        cluster: ClusterName,
    },
    #[error(
        "service {service}: cluster {cluster} exports port {port} as {theirs}, which clashes \
         with {ours} taken first; port {port} is not routed to {cluster}"
    )]
    PortConflict {
        service: ServiceKey,
        cluster: ClusterName,
        port: String,
        theirs: String,
        ours: String,
    },
    #[error(
        "service {service}: cluster {cluster} (network {network}) has no east-west gateway and \
         no endpoint addresses on the importer's network; its endpoints are not imported"
    )]
    NoRoute {
        service: ServiceKey,
        cluster: ClusterName,
        network: Network,
    },
    #[error(
        "service {service}: gateway {host} of cluster {cluster} is a DNS name, which a \
         WorkloadEntry selected by a Kubernetes Service cannot use; only the ServiceEntry \
         routes to it"
    )]
    DnsGatewayForWorkloadEntry {
        service: ServiceKey,
        cluster: ClusterName,
        host: String,
    },
    #[error(
        "service {service}: address {address:?} of cluster {cluster} is not an IP address; skipped"
    )]
    BadAddress {
        service: ServiceKey,
        cluster: ClusterName,
        address: String,
    },
    #[error(
        "service {service}: the local Service has no selector, so no WorkloadEntries join it \
         (the ServiceEntry for the clusterset host is still written)"
    )]
    LocalServiceWithoutSelector { service: ServiceKey },
    #[error(
        "{host}: no ClusterSet IP is free in {range}; the service is imported without one \
         (captured traffic cannot reach it by address)"
    )]
    NoClusterSetIp { host: String, range: String },
}

/// Serializing the generated objects failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot serialize {kind} {namespace}/{name}: {source}")]
pub struct ImportError {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: EncodeError,
}

/// Why one object did not serialize.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Yaml(#[from] serde_saphyr::SerializeError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl ImportObjects {
    /// Number of objects (warnings not counted).
    pub fn len(&self) -> usize {
        self.service_entries.len() + self.workload_entries.len() + self.service_imports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All objects as one multi-document YAML stream, `---` between
    /// documents: ServiceEntries, then WorkloadEntries, then ServiceImports,
    /// each sorted by namespace and name.
    pub fn to_yaml(&self) -> Result<String, ImportError> {
        Ok(self.serialize_all(&YamlSink)?.join("---\n"))
    }

    /// All objects as JSON values, in the order of [`to_yaml`](Self::to_yaml).
    pub fn to_json_values(&self) -> Result<Vec<serde_json::Value>, ImportError> {
        self.serialize_all(&JsonSink)
    }

    fn serialize_all<S: Sink>(&self, sink: &S) -> Result<Vec<S::Out>, ImportError> {
        let mut out = Vec::with_capacity(self.len());
        push_all(&self.service_entries, sink, &mut out)?;
        push_all(&self.workload_entries, sink, &mut out)?;
        push_all(&self.service_imports, sink, &mut out)?;
        Ok(out)
    }
}

/// A serialization target for [`ImportObjects::serialize_all`].
trait Sink {
    type Out;
    fn convert<T: Serialize>(&self, value: &T) -> Result<Self::Out, EncodeError>;
}

struct YamlSink;

impl Sink for YamlSink {
    type Out = String;
    fn convert<T: Serialize>(&self, value: &T) -> Result<String, EncodeError> {
        Ok(serde_saphyr::to_string(value)?)
    }
}

struct JsonSink;

impl Sink for JsonSink {
    type Out = serde_json::Value;
    fn convert<T: Serialize>(&self, value: &T) -> Result<serde_json::Value, EncodeError> {
        Ok(serde_json::to_value(value)?)
    }
}

/// The three generated kinds, for error messages.
trait Object: Serialize {
    fn kind(&self) -> &str;
    fn meta(&self) -> &ObjectMeta;
}

macro_rules! impl_object {
    ($($t:ty),*) => {$(
        impl Object for $t {
            fn kind(&self) -> &str {
                &self.kind
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
        }
    )*};
}

impl_object!(ServiceEntry, WorkloadEntry, ServiceImport);

fn push_all<T: Object, S: Sink>(
    items: &[T],
    sink: &S,
    out: &mut Vec<S::Out>,
) -> Result<(), ImportError> {
    for item in items {
        let converted = sink.convert(item).map_err(|source| ImportError {
            kind: item.kind().to_string(),
            namespace: item.meta().namespace.clone(),
            name: item.meta().name.clone(),
            source,
        })?;
        out.push(converted);
    }
    Ok(())
}

/// Computes the objects `importer` should hold for the `remote` exports it
/// may see, given its own `local` Services. Pure and deterministic: see the
/// module documentation for the rules and names.
pub fn import_objects(
    importer: &ClusterInfo,
    remote: &[RemoteService],
    local: &[LocalService],
) -> ImportObjects {
    let mut out = ImportObjects::default();

    let mut by_key: BTreeMap<&ServiceKey, Vec<&RemoteService>> = BTreeMap::new();
    for r in remote {
        let own_domain = r.from.trust_domain == importer.trust_domain;
        if own_domain && r.from.name == importer.name {
            continue;
        }
        if own_domain && !r.service.export_to.allows_cluster(&importer.name) {
            continue;
        }
        by_key.entry(&r.service.key).or_default().push(r);
    }

    let mut locals: Vec<&LocalService> = local.iter().collect();
    locals.sort();
    let mut local_by_key: BTreeMap<&ServiceKey, &LocalService> = BTreeMap::new();
    for l in locals {
        local_by_key.entry(&l.key).or_insert(l);
    }

    for (key, mut exporters) in by_key {
        // Own trust domain first, then by trust domain and cluster name; the
        // full value breaks ties so that duplicates resolve the same way
        // whatever the input order.
        exporters.sort_by(|a, b| {
            exporter_order(importer, a)
                .cmp(&exporter_order(importer, b))
                .then_with(|| a.cmp(b))
        });
        exporters.dedup_by(|later, kept| {
            let dup = later.from.name == kept.from.name
                && later.from.trust_domain == kept.from.trust_domain;
            if dup {
                out.warnings.push(ImportWarning::DuplicateExport {
                    service: key.clone(),
                    cluster: later.from.name.clone(),
                });
            }
            dup
        });
        let service = ServiceImportInput::build(importer, key, &exporters, &mut out.warnings);
        service.emit(local_by_key.get(key).copied(), &mut out);
    }

    out.service_entries
        .sort_by(|a, b| meta_order(&a.metadata).cmp(&meta_order(&b.metadata)));
    out.workload_entries
        .sort_by(|a, b| meta_order(&a.metadata).cmp(&meta_order(&b.metadata)));
    out.service_imports
        .sort_by(|a, b| meta_order(&a.metadata).cmp(&meta_order(&b.metadata)));
    out.warnings.sort();
    out.warnings.dedup();
    out
}

fn exporter_order<'a>(
    importer: &ClusterInfo,
    r: &'a RemoteService,
) -> (bool, &'a str, &'a ClusterName) {
    (
        r.from.trust_domain != importer.trust_domain,
        r.from.trust_domain.as_str(),
        &r.from.name,
    )
}

fn meta_order(m: &ObjectMeta) -> (&str, &str) {
    (&m.namespace, &m.name)
}

/// How an importer reaches one exporting cluster's endpoints.
enum Route<'a> {
    /// Pod addresses on the shared network.
    Pods(Vec<IpAddr>),
    /// The cluster's first east-west gateway.
    Gateway(&'a GatewayAddress),
    /// No way in (no gateway, no usable addresses).
    None,
}

/// One exporter, prepared.
struct Exporter<'a> {
    remote: &'a RemoteService,
    /// How the cluster appears in names and `status.clusters`.
    slug: String,
    foreign: bool,
    /// The exporter's ports that were merged into the service, by name.
    served: BTreeMap<&'a str, &'a ServicePort>,
    route: Route<'a>,
    healthy: u32,
}

/// Everything needed to write the objects of one imported service.
struct ServiceImportInput<'a> {
    key: &'a ServiceKey,
    ports: Vec<&'a ServicePort>,
    exporters: Vec<Exporter<'a>>,
    subject_alt_names: Vec<String>,
}

impl<'a> ServiceImportInput<'a> {
    fn build(
        importer: &'a ClusterInfo,
        key: &'a ServiceKey,
        exporters: &[&'a RemoteService],
        warnings: &mut Vec<ImportWarning>,
    ) -> Self {
        let mut by_name: BTreeMap<&str, &ServicePort> = BTreeMap::new();
        let mut by_number: BTreeMap<u16, &ServicePort> = BTreeMap::new();
        let mut prepared = Vec::with_capacity(exporters.len());
        for r in exporters.iter().copied() {
            let mut own: Vec<&ServicePort> = r.service.ports.iter().collect();
            own.sort_by_key(|p| (p.number(), p.name()));
            let mut served = BTreeMap::new();
            for p in own {
                let clash = match (by_name.get(p.name()), by_number.get(&p.number())) {
                    (Some(q), _) if q.number() == p.number() && q.protocol() == p.protocol() => {
                        None
                    }
                    (Some(q), _) | (None, Some(q)) => Some(*q),
                    (None, None) => {
                        by_name.insert(p.name(), p);
                        by_number.insert(p.number(), p);
                        None
                    }
                };
                match clash {
                    None => {
                        served.insert(p.name(), p);
                    }
                    Some(q) => warnings.push(ImportWarning::PortConflict {
                        service: key.clone(),
                        cluster: r.from.name.clone(),
                        port: p.name().to_string(),
                        theirs: format!("{}/{}", p.number(), p.protocol()),
                        ours: format!("port {} {}/{}", q.name(), q.number(), q.protocol()),
                    }),
                }
            }
            let route = route(importer, r, warnings);
            if matches!(route, Route::None) && r.service.healthy() > 0 {
                warnings.push(ImportWarning::NoRoute {
                    service: key.clone(),
                    cluster: r.from.name.clone(),
                    network: r.from.network.clone(),
                });
            }
            let foreign = r.from.trust_domain != importer.trust_domain;
            prepared.push(Exporter {
                remote: r,
                slug: cluster_slug(r, foreign),
                foreign,
                served,
                route,
                healthy: r.service.healthy(),
            });
        }
        let mut ports: Vec<&ServicePort> = by_name.into_values().collect();
        ports.sort_by_key(|p| p.number());
        ServiceImportInput {
            key,
            ports,
            subject_alt_names: subject_alt_names(key, exporters),
            exporters: prepared,
        }
    }

    fn meta(&self, name: String, extra: &[(&str, &str)]) -> ObjectMeta {
        let mut labels = BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            (SERVICE_LABEL.to_string(), self.key.name().to_string()),
        ]);
        for (k, v) in extra {
            labels.insert(k.to_string(), v.to_string());
        }
        ObjectMeta {
            name: names::bounded_name(&name),
            namespace: self.key.namespace().to_string(),
            labels,
            annotations: BTreeMap::new(),
        }
    }

    fn emit(&self, local: Option<&LocalService>, out: &mut ImportObjects) {
        let svc = self.key.name();
        // ServiceEntry.
        let mut endpoints = Vec::new();
        for e in self.live_exporters() {
            match &e.route {
                Route::Pods(ips) => {
                    for ip in ips {
                        let ports = e
                            .served
                            .iter()
                            .map(|(n, p)| (n.to_string(), u32::from(p.workload_port())))
                            .collect();
                        endpoints.push(self.endpoint(e, ip.to_string(), ports, 1, BTreeMap::new()));
                    }
                }
                Route::Gateway(gw) => {
                    let ports = e
                        .served
                        .keys()
                        .map(|n| (n.to_string(), u32::from(gw.port())))
                        .collect();
                    endpoints.push(self.endpoint(
                        e,
                        gw.host().to_string(),
                        ports,
                        e.healthy,
                        BTreeMap::new(),
                    ));
                }
                Route::None => {}
            }
        }
        let all_ips = endpoints
            .iter()
            .all(|ep| ep.address.parse::<IpAddr>().is_ok());
        let spec = ServiceEntrySpec {
            hosts: vec![self.key.hostname_clusterset()],
            addresses: Vec::new(),
            ports: self
                .ports
                .iter()
                .map(|p| ServiceEntryPort {
                    number: u32::from(p.number()),
                    name: p.name().to_string(),
                    protocol: Some(p.protocol()),
                    target_port: None,
                })
                .collect(),
            location: Some(Location::MeshInternal),
            resolution: Some(if all_ips {
                Resolution::Static
            } else {
                Resolution::Dns
            }),
            endpoints,
            export_to: Vec::new(),
            subject_alt_names: self.subject_alt_names.clone(),
        };
        out.service_entries.push(ServiceEntry::new(
            self.meta(format!("strait-{svc}"), &[]),
            spec,
        ));

        // WorkloadEntries joining the local Service.
        if let Some(local) = local {
            self.emit_workload_entries(local, out);
        }

        // ServiceImport.
        let mut clusters: Vec<String> = self
            .exporters
            .iter()
            .map(|e| names::bounded_name(&e.slug))
            .collect();
        clusters.sort();
        clusters.dedup();
        let spec = ServiceImportSpec {
            type_: ServiceImportType::ClusterSetIP,
            ports: self
                .ports
                .iter()
                .map(|p| ServiceImportPort {
                    name: Some(p.name().to_string()),
                    port: p.number(),
                    protocol: Some("TCP".to_string()),
                    app_protocol: Some(p.protocol().app_protocol().to_string()),
                })
                .collect(),
            ips: Vec::new(),
        };
        let status = ServiceImportStatus {
            clusters: clusters
                .into_iter()
                .map(|cluster| ClusterStatus { cluster })
                .collect(),
        };
        out.service_imports.push(ServiceImport::new(
            self.meta(svc.to_string(), &[]),
            spec,
            Some(status),
        ));
    }

    fn emit_workload_entries(&self, local: &LocalService, out: &mut ImportObjects) {
        if local.selector.is_empty() {
            if self.live_exporters().next().is_some() {
                out.warnings
                    .push(ImportWarning::LocalServiceWithoutSelector {
                        service: self.key.clone(),
                    });
            }
            return;
        }
        let svc = self.key.name();
        for e in self.live_exporters() {
            let cluster = e.remote.from.name.as_str();
            let meta_labels = [(CLUSTER_LABEL, cluster)];
            // Local port names this exporter also serves, and the port to
            // use for each.
            let mapped = |port_of: &dyn Fn(&ServicePort) -> u16| -> BTreeMap<String, u32> {
                local
                    .ports
                    .iter()
                    .filter_map(|lp| {
                        e.served
                            .get(lp.name())
                            .map(|rp| (lp.name().to_string(), u32::from(port_of(rp))))
                    })
                    .collect()
            };
            // A WorkloadEntry serving none of the local Service's ports
            // would only attract traffic it cannot take.
            if mapped(&|p| p.number()).is_empty() {
                continue;
            }
            match &e.route {
                Route::Pods(ips) => {
                    for ip in ips {
                        let ports = mapped(&|p| p.workload_port());
                        let spec =
                            self.endpoint(e, ip.to_string(), ports, 1, local.selector.clone());
                        let name = format!("strait-{svc}.{}.{}", e.slug, ip_slug(ip));
                        out.workload_entries
                            .push(WorkloadEntry::new(self.meta(name, &meta_labels), spec));
                    }
                }
                Route::Gateway(gw) if gw.is_ip() => {
                    let ports = mapped(&|_| gw.port());
                    let spec = self.endpoint(
                        e,
                        gw.host().to_string(),
                        ports,
                        e.healthy,
                        local.selector.clone(),
                    );
                    let name = format!("strait-{svc}.{}", e.slug);
                    out.workload_entries
                        .push(WorkloadEntry::new(self.meta(name, &meta_labels), spec));
                }
                Route::Gateway(gw) => {
                    out.warnings
                        .push(ImportWarning::DnsGatewayForWorkloadEntry {
                            service: self.key.clone(),
                            cluster: e.remote.from.name.clone(),
                            host: gw.host().to_string(),
                        });
                }
                Route::None => {}
            }
        }
    }

    /// Exporters that get endpoints: some healthy endpoints and a route.
    fn live_exporters(&self) -> impl Iterator<Item = &Exporter<'a>> {
        self.exporters
            .iter()
            .filter(|e| e.healthy > 0 && !matches!(e.route, Route::None))
    }

    /// An endpoint (ServiceEntry) or WorkloadEntry spec for exporter `e`;
    /// `labels` are the base labels (a local selector, or none).
    fn endpoint(
        &self,
        e: &Exporter<'_>,
        address: String,
        ports: BTreeMap<String, u32>,
        weight: u32,
        mut labels: BTreeMap<String, String>,
    ) -> WorkloadEntrySpec {
        let from = &e.remote.from;
        // The selector wins a clash: the local Service must select this.
        for (k, v) in &e.remote.service.endpoint_labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        labels
            .entry(CLUSTER_LABEL.to_string())
            .or_insert_with(|| from.name.to_string());
        if e.foreign && names::is_label_value(from.trust_domain.as_str()) {
            labels
                .entry(TRUST_DOMAIN_LABEL.to_string())
                .or_insert_with(|| from.trust_domain.to_string());
        }
        let sas = &e.remote.service.service_accounts;
        let service_account = match (e.foreign, sas.len()) {
            (false, 1) => sas.first().cloned(),
            _ => None,
        };
        WorkloadEntrySpec {
            address,
            ports,
            labels,
            network: Some(from.network.to_string()),
            locality: endpoint_locality(e.remote).map(|l| l.to_string()),
            weight: Some(weight),
            service_account,
        }
    }
}

fn route<'a>(
    importer: &ClusterInfo,
    r: &'a RemoteService,
    warnings: &mut Vec<ImportWarning>,
) -> Route<'a> {
    if r.from.network == importer.network && !r.service.addresses.is_empty() {
        let mut ips = BTreeSet::new();
        for a in &r.service.addresses {
            match a.parse::<IpAddr>() {
                Ok(ip) => {
                    ips.insert(ip);
                }
                Err(_) => warnings.push(ImportWarning::BadAddress {
                    service: r.service.key.clone(),
                    cluster: r.from.name.clone(),
                    address: a.clone(),
                }),
            }
        }
        if !ips.is_empty() {
            return Route::Pods(ips.into_iter().collect());
        }
    }
    match r.from.gateways.first() {
        Some(gw) => Route::Gateway(gw),
        None => Route::None,
    }
}

/// The cluster's locality, else the one locality all its healthy endpoints
/// share.
fn endpoint_locality(r: &RemoteService) -> Option<crate::mesh::Locality> {
    if let Some(l) = &r.from.locality {
        return Some(l.clone());
    }
    let mut seen = r
        .service
        .endpoints
        .iter()
        .filter(|e| e.healthy > 0)
        .map(|e| e.locality.as_ref());
    let first = seen.next()??;
    seen.all(|l| l == Some(first)).then(|| first.clone())
}

fn cluster_slug(r: &RemoteService, foreign: bool) -> String {
    if foreign {
        let hash = format!(
            "{:016x}",
            names::fnv1a64(r.from.trust_domain.as_str().as_bytes())
        );
        format!("{}-{}", r.from.name, &hash[..8])
    } else {
        r.from.name.to_string()
    }
}

fn ip_slug(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4
            .octets()
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join("-"),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join("-"),
    }
}

/// Every exporter's workload identities, when every exporter published at
/// least one service account; otherwise none (Istio then derives them from
/// the endpoints).
fn subject_alt_names(key: &ServiceKey, exporters: &[&RemoteService]) -> Vec<String> {
    let mut sans = BTreeSet::new();
    for r in exporters {
        if r.service.service_accounts.is_empty() {
            return Vec::new();
        }
        for sa in &r.service.service_accounts {
            match SpiffeId::workload(&r.from.trust_domain, key.namespace(), sa) {
                Ok(id) => {
                    sans.insert(id.to_string());
                }
                Err(_) => return Vec::new(),
            }
        }
    }
    sans.into_iter().collect()
}

#[cfg(test)]
mod tests;
