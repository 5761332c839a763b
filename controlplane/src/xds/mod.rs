//! The discovery server: Envoy's Aggregated Discovery Service (ADS) over
//! gRPC with mTLS, both state-of-the-world and delta, serving the current
//! [`Snapshot`] from a `watch` channel.
//!
//! # Semantics
//!
//! Per stream and per type the server tracks the subscription, what it
//! last sent and the nonce of each response:
//!
//! - **State of the world.** An empty `resource_names` is a wildcard (every
//!   resource of the type). A request with an empty nonce (a new
//!   subscription, or a reconnect) is always answered. A request carrying
//!   the nonce of the last response is an ACK, or a NACK when it has
//!   `error_detail`; it is answered only when it changes the subscription.
//!   A request with an older nonce is stale and ignored, as the xDS
//!   protocol says. A new snapshot is pushed to a subscriber only when its
//!   view (names and versions of the resources it subscribes to) changed.
//! - **Delta.** The first request of a type with no names (or `*`)
//!   subscribes to everything; `*` in `resource_names_unsubscribe` ends
//!   that. `initial_resource_versions` says what a resuming client holds,
//!   so it receives only what changed (and removals of what is gone). The
//!   first request of each type is always answered, even with nothing, so
//!   a client knows it is in sync. A NACK undoes the server's record of
//!   that response, so that the refused resources (and the others of the
//!   same response, which the client did not apply either) are sent again
//!   when the snapshot next changes.
//! - A NACK is logged with the node id and the error, counted
//!   (`strait_xds_nacks_total{type}`) and kept per node
//!   ([`XdsServer::nacks`]) for the debug endpoint.
//!
//! Streams are refused (`UNAUTHENTICATED`) without a client certificate
//! that verifies as an SVID of this trust domain. The node id a proxy gives
//! (Istio's `<kind>~<ip>~<name>.<namespace>~<domain>`) must name the
//! namespace of that SVID (`spiffe://<td>/ns/<namespace>/sa/…`): a
//! workload cannot ask for another namespace's view, nor pose as a gateway
//! (`strait-system`). A stream whose first request names no node, or a
//! node that does not match, ends with `INVALID_ARGUMENT` or
//! `PERMISSION_DENIED` ([`check_node`]).
//!
//! Each stream serves the snapshot as scoped for its node: a sidecar sees
//! the Services its namespace's Istio `Sidecar` resource lets it reach
//! (egress `hosts`), see [`scope`].
//!
//! Snapshot rebuilds are debounced by the caller with [`debounce`].
//!
//! Both variants run the same stream (`stream`: node authorization, the
//! per-type bookkeeping, pushes on new snapshots), parameterised by the
//! wire format (`sotw`, `delta`); the protocol state is pure and fed
//! requests and snapshots.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use strait_ca::tls::Trust;
use strait_ca::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::resources::Snapshot;

mod delta;
mod sotw;
mod stream;

use delta::Delta;
use sotw::Sotw;
use stream::{Ask, Reply};
#[cfg(test)]
use {delta::DeltaStream, sotw::SotwStream};

/// The label of per-type metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The type URL without `type.googleapis.com/`.
    pub r#type: String,
}

impl TypeLabel {
    fn of(type_url: &str) -> Self {
        TypeLabel {
            r#type: type_url
                .rsplit_once('/')
                .map_or(type_url, |(_, t)| t)
                .to_string(),
        }
    }
}

/// The discovery server's metrics (`strait_xds_*`).
#[derive(Debug, Clone)]
pub struct Metrics {
    pushes: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
    connected: Gauge,
    push_latency: Histogram,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            pushes: Family::default(),
            nacks: Family::default(),
            connected: Gauge::default(),
            push_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        };
        let r = registry.sub_registry_with_prefix("strait_xds");
        r.register("pushes", "Discovery responses sent", m.pushes.clone());
        r.register(
            "nacks",
            "Discovery responses refused by proxies",
            m.nacks.clone(),
        );
        r.register(
            "connected_proxies",
            "Proxies with a live discovery stream",
            m.connected.clone(),
        );
        r.register(
            "push_latency_seconds",
            "Time from a snapshot's creation (the config read) to a push of its changes being sent",
            m.push_latency.clone(),
        );
        m
    }

    /// Pushes sent for a type (for tests and the debug endpoint).
    pub fn pushes(&self, type_url: &str) -> u64 {
        self.pushes.get_or_create(&TypeLabel::of(type_url)).get()
    }

    /// NACKs received for a type.
    pub fn nacks(&self, type_url: &str) -> u64 {
        self.nacks.get_or_create(&TypeLabel::of(type_url)).get()
    }

    /// Live streams.
    pub fn connected(&self) -> i64 {
        self.connected.get()
    }
}

/// The last response a proxy refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackRecord {
    pub type_url: String,
    /// The nonce of the refused response.
    pub nonce: String,
    /// The version the proxy still runs (state of the world), or empty.
    pub version_info: String,
    /// The proxy's `error_detail.message`.
    pub error: String,
    pub at: SystemTime,
}

struct Inner {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// This control plane's cluster, and the snapshots of the remote
    /// clusters it also serves (primary-remote), by cluster name.
    cluster: String,
    remotes: BTreeMap<String, watch::Receiver<Arc<Snapshot>>>,
    trust: Trust,
    trust_domain: TrustDomain,
    metrics: Metrics,
    nacks: Mutex<BTreeMap<String, NackRecord>>,
}

/// The ADS server. Cheap to clone: clones share state (keep one to read
/// [`XdsServer::nacks`]).
#[derive(Clone)]
pub struct XdsServer {
    inner: Arc<Inner>,
}

/// Decrements the connected gauge when a stream ends, however it ends.
struct Connected(Gauge);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl XdsServer {
    /// A server of `snapshots` to proxies whose client certificates verify
    /// under `trust` as SVIDs of `trust_domain`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        trust: Trust,
        trust_domain: TrustDomain,
        metrics: Metrics,
    ) -> Self {
        XdsServer {
            inner: Arc::new(Inner {
                snapshots,
                cluster: String::new(),
                remotes: BTreeMap::new(),
                trust,
                trust_domain,
                metrics,
                nacks: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Also serves the proxies of remote clusters (primary-remote): a
    /// proxy whose node metadata `CLUSTER_ID` names one of `remotes` gets
    /// that cluster's snapshots; one naming `cluster` (this control
    /// plane's), or none, gets the own ones; any other cluster is refused.
    /// Call before the server is shared.
    pub fn with_clusters(
        mut self,
        cluster: &str,
        remotes: BTreeMap<String, watch::Receiver<Arc<Snapshot>>>,
    ) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.cluster = cluster.to_string();
            inner.remotes = remotes;
        }
        self
    }

    /// The snapshots for a proxy of `cluster` (empty: this control
    /// plane's own).
    fn snapshots_of(&self, cluster: &str) -> Result<watch::Receiver<Arc<Snapshot>>, Status> {
        let inner = &self.inner;
        if cluster.is_empty() || inner.cluster.is_empty() || cluster == inner.cluster {
            return Ok(inner.snapshots.clone());
        }
        inner.remotes.get(cluster).cloned().ok_or_else(|| {
            let mut served = vec![inner.cluster.clone()];
            served.extend(inner.remotes.keys().cloned());
            Status::permission_denied(format!(
                "node names cluster {cluster:?} (CLUSTER_ID); this control plane serves {}",
                served.join(", ")
            ))
        })
    }

    /// The tonic service.
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<XdsServer> {
        AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The last NACK of every node that sent one.
    pub fn nacks(&self) -> BTreeMap<String, NackRecord> {
        self.inner
            .nacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    fn authenticate<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated("discovery requires a client certificate (mTLS)")
        })?;
        let svid = strait_ca::tls::peer_identity(
            &self.inner.trust,
            &certs,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|e| Status::unauthenticated(format!("client certificate refused: {e}")))?;
        let td = svid.spiffe_id.trust_domain();
        if td != self.inner.trust_domain {
            return Err(Status::permission_denied(format!(
                "{} is not of trust domain {}",
                svid.spiffe_id, self.inner.trust_domain
            )));
        }
        Ok(svid.spiffe_id)
    }

    /// Logs what a request of `node` said (`ask`, `reply`); a NACK is
    /// also counted and kept as the node's last.
    fn record(&self, node: &str, peer: &str, ask: &Ask<'_>, reply: &Reply) {
        let Ask {
            type_url,
            nonce,
            version,
            ..
        } = *ask;
        match reply {
            Reply::Nack(error) => {
                tracing::warn!(node, peer, type_url, nonce, error = %error, "proxy refused config (NACK)");
                self.inner
                    .metrics
                    .nacks
                    .get_or_create(&TypeLabel::of(type_url))
                    .inc();
                self.inner
                    .nacks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        node.to_string(),
                        NackRecord {
                            type_url: type_url.to_string(),
                            nonce: nonce.to_string(),
                            version_info: version.to_string(),
                            error: error.clone(),
                            at: SystemTime::now(),
                        },
                    );
            }
            Reply::Ack => tracing::debug!(node, type_url, nonce, "ACK"),
            Reply::Stale => tracing::debug!(node, type_url, nonce, "stale nonce ignored"),
            Reply::Initial => tracing::debug!(node, type_url, "subscribed"),
        }
    }

    /// Counts a response; `change` is the snapshot whose change it pushes
    /// (its latency is observed), `None` for an answer to a request (a
    /// proxy connecting long after the last change is no push latency).
    fn pushed(&self, type_url: &str, change: Option<&Snapshot>) {
        let m = &self.inner.metrics;
        m.pushes.get_or_create(&TypeLabel::of(type_url)).inc();
        if let Some(snap) = change {
            m.push_latency
                .observe(snap.created().elapsed().as_secs_f64());
        }
    }

    fn connected(&self) -> Connected {
        self.inner.metrics.connected.inc();
        Connected(self.inner.metrics.connected.clone())
    }
}

/// The kinds of proxy a node id may name.
const NODE_KINDS: [&str; 3] = ["sidecar", "gateway", "router"];

/// Why a node id is refused ([`check_node`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("node id {node_id:?} is not <kind>~<ip>~<name>.<namespace>~<domain>")]
    Shape { node_id: String },
    #[error("node id {node_id:?}: kind {kind:?} is not one of {}", NODE_KINDS.join(", "))]
    Kind { node_id: String, kind: String },
    #[error("node id {node_id:?} has no IP address")]
    NoAddress { node_id: String },
    #[error("node id {node_id:?}: {name_namespace:?} is not <name>.<namespace>")]
    NameNamespace {
        node_id: String,
        name_namespace: String,
    },
    #[error("{peer} is not a workload identity (spiffe://<td>/ns/<namespace>/sa/<sa>)")]
    NotWorkload { peer: SpiffeId },
    #[error(
        "node id {node_id:?} names namespace {namespace:?} but the client certificate is {peer} (namespace {peer_namespace:?})"
    )]
    OtherNamespace {
        node_id: String,
        namespace: String,
        peer: SpiffeId,
        peer_namespace: String,
    },
}

/// Checks the node id a proxy gives against its certificate's SPIFFE ID.
///
/// The node id is Istio's `<kind>~<ip>~<name>.<namespace>~<domain>`
/// (`sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local`); `kind` is
/// `sidecar`, `gateway` or `router`. The namespace (after the last `.` of
/// the third field: namespaces are DNS labels, names may hold dots) must be
/// the one of `peer` (`spiffe://<td>/ns/<namespace>/sa/<sa>`). Errors name
/// the node id and the peer.
pub fn check_node(node_id: &str, peer: &SpiffeId) -> Result<(), NodeError> {
    let fields: Vec<&str> = node_id.split('~').collect();
    let [kind, ip, name_ns, _domain] = fields.as_slice() else {
        return Err(NodeError::Shape {
            node_id: node_id.to_string(),
        });
    };
    if !NODE_KINDS.contains(kind) {
        return Err(NodeError::Kind {
            node_id: node_id.to_string(),
            kind: (*kind).to_string(),
        });
    }
    if ip.is_empty() {
        return Err(NodeError::NoAddress {
            node_id: node_id.to_string(),
        });
    }
    let ns = match name_ns.rsplit_once('.') {
        Some((name, ns)) if !name.is_empty() && !ns.is_empty() => ns,
        _ => {
            return Err(NodeError::NameNamespace {
                node_id: node_id.to_string(),
                name_namespace: (*name_ns).to_string(),
            });
        }
    };
    let Some((peer_ns, _sa)) = peer.workload_parts() else {
        return Err(NodeError::NotWorkload { peer: peer.clone() });
    };
    if ns != peer_ns {
        return Err(NodeError::OtherNamespace {
            node_id: node_id.to_string(),
            namespace: ns.to_string(),
            peer: peer.clone(),
            peer_namespace: peer_ns.to_string(),
        });
    }
    Ok(())
}

/// Which Service resources a sidecar sees, from the Istio `Sidecar`
/// resources of its namespace (Istio's egress `hosts`).
///
/// The Sidecar applying to workload `name` in `namespace` is the first (by
/// name) whose `workloadSelector` labels the workload (its `Workload`
/// resource) all carries, else the first without a selector; with none,
/// or one without `egress`, the sidecar sees every Service. Otherwise a
/// Service is seen when an `egress[].hosts` entry `ns/host` matches it:
/// `ns` is `*` (any), `.` (the Sidecar's namespace), `~` (none) or a
/// namespace name; `host` is `*`, `*.suffix` or a name, matched against
/// the hostname and aliases. Resources of other types are not scoped;
/// gateways (any kind but `sidecar`) see everything. A Sidecar whose spec
/// does not parse was already left out of the snapshot with a warning.
pub fn scope(snap: &Snapshot, kind: &str, namespace: &str, name: &str) -> Option<Snapshot> {
    use strait_proto::strait::mesh::v1 as pb;
    use strait_proto::strait::mesh::v1::type_url;

    if kind != "sidecar" {
        return None;
    }
    let decode = |type_url: &str, name: &str| {
        snap.resources(type_url)
            .and_then(|r| r.get(name))
            .map(|v| v.resource.value.clone())
    };
    let labels = decode(type_url::WORKLOAD, &format!("{namespace}/{name}"))
        .and_then(|b| <pb::Workload as prost::Message>::decode(b.as_slice()).ok())
        .map(|w| w.labels)
        .unwrap_or_default();
    let prefix = format!("Sidecar/{namespace}/");
    let sidecars: Vec<strait_model::istio::Sidecar> = snap
        .resources(type_url::POLICY)
        .into_iter()
        .flat_map(|r| r.range(prefix.clone()..))
        .take_while(|(n, _)| n.starts_with(&prefix))
        .filter_map(|(_, v)| {
            let p = <pb::Policy as prost::Message>::decode(v.resource.value.as_slice()).ok()?;
            let spec: serde_json::Value = serde_json::from_str(&p.spec_json).ok()?;
            match strait_model::istio::parse("Sidecar", &spec).ok()? {
                strait_model::istio::IstioSpec::Sidecar(s) => Some(s),
                _ => None,
            }
        })
        .collect();
    let applies = sidecars
        .iter()
        .find(|s| {
            s.workload_selector.as_ref().is_some_and(|sel| {
                sel.labels
                    .iter()
                    .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
            })
        })
        .or_else(|| sidecars.iter().find(|s| s.workload_selector.is_none()))?;
    if applies.egress.is_empty() {
        return None;
    }
    let hosts: Vec<strait_model::istio::sidecar::EgressHost<'_>> = applies
        .egress
        .iter()
        .flat_map(|e| e.hosts.iter())
        .filter_map(|h| strait_model::istio::sidecar::parse_egress_host(h).ok())
        .collect();
    let host_matches = |pattern: &str, host: &str| {
        pattern == "*"
            || pattern == host
            || pattern
                .strip_prefix('*')
                .is_some_and(|suffix| host.ends_with(suffix))
    };
    let visible = |svc: &pb::Service| {
        hosts.iter().any(|h| {
            let ns_ok = match h.namespace {
                "*" => true,
                "." => svc.namespace == namespace,
                "~" => false,
                ns => svc.namespace == ns,
            };
            ns_ok
                && std::iter::once(&svc.hostname)
                    .chain(&svc.aliases)
                    .any(|n| host_matches(h.host, n))
        })
    };
    Some(snap.retain(|t, n| {
        t != type_url::SERVICE
            || decode(t, n)
                .and_then(|b| <pb::Service as prost::Message>::decode(b.as_slice()).ok())
                .is_some_and(|svc| visible(&svc))
    }))
}

/// The kind, namespace and name a checked node id names.
fn node_parts(node_id: &str) -> Option<(&str, &str, &str)> {
    let mut fields = node_id.split('~');
    let kind = fields.next()?;
    let (name, ns) = fields.nth(1)?.rsplit_once('.')?;
    Some((kind, ns, name))
}

/// What the stream of `node` (None before the first request) serves of
/// `snap`.
fn scoped_view(snap: &Arc<Snapshot>, node: Option<&str>) -> Arc<Snapshot> {
    node.and_then(node_parts)
        .and_then(|(kind, ns, name)| scope(snap, kind, ns, name))
        .map_or_else(|| snap.clone(), Arc::new)
}

/// The cluster a node names: its metadata `CLUSTER_ID` (as Istio's
/// proxies send it), else `node.cluster`.
pub fn node_cluster(node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(node) = node else {
        return String::new();
    };
    let from_metadata = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("CLUSTER_ID"))
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .filter(|s| !s.is_empty());
    from_metadata.unwrap_or_else(|| node.cluster.clone())
}

/// Follows the node id of a stream's requests: Envoy names the node on the
/// first request and may leave it out afterwards. Each node id given is
/// checked against the peer's SPIFFE ID.
fn node_of(
    node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    peer: &SpiffeId,
    current: &mut Option<String>,
) -> Result<(), Status> {
    match node.map(|n| n.id.as_str()).filter(|id| !id.is_empty()) {
        Some(id) => {
            if current.as_deref() != Some(id) {
                check_node(id, peer).map_err(|e| Status::permission_denied(e.to_string()))?;
                *current = Some(id.to_string());
            }
            Ok(())
        }
        None if current.is_some() => Ok(()),
        None => Err(Status::invalid_argument(
            "the first discovery request of a stream must name its node (node.id)",
        )),
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = self.authenticate(&request)?;
        let responses = stream::serve::<Sotw>(self.clone(), peer, request.into_inner());
        Ok(Response::new(responses))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = self.authenticate(&request)?;
        let responses = stream::serve::<Delta>(self.clone(), peer, request.into_inner());
        Ok(Response::new(responses))
    }
}

/// Follows `rx`, publishing its latest value once it has been quiet for
/// `quiet`, and at the latest `max_delay` after the first change of a
/// burst. The current value is published at once. The returned receiver
/// ends (its sender drops) after `rx`'s sender drops and the last change
/// is published; the task also ends when every returned receiver is gone.
pub fn debounce<T: Clone + Send + Sync + 'static>(
    mut rx: watch::Receiver<T>,
    quiet: Duration,
    max_delay: Duration,
) -> watch::Receiver<T> {
    let (tx, out) = watch::channel(rx.borrow_and_update().clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return; },
                () = tx.closed() => return,
            }
            let burst_end = tokio::time::Instant::now() + max_delay;
            let mut open = true;
            loop {
                let deadline = (tokio::time::Instant::now() + quiet).min(burst_end);
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() { open = false; break; }
                    }
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let value = rx.borrow_and_update().clone();
            if tx.send(value).is_err() || !open {
                return;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests;
