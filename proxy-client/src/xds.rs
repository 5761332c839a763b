//! The proxies' side of the discovery protocol: delta ADS over mTLS.
//!
//! [`spawn`] subscribes to every configured type (wildcard), hands each
//! received update, applied to a copy of the current resources, to the
//! proxy's validator, and then either ACKs and publishes the new
//! [`Resources`] on a `watch` channel, or NACKs with an error naming each
//! refused resource and keeps the last good set. When the stream breaks it
//! reconnects with exponential backoff (200 ms doubling to 10 s, reset once
//! a connection delivers a response) and resumes: the initial request of
//! each type carries the versions held (`initial_resource_versions`), so the
//! server sends only what changed. The last good resources stay published
//! while the control plane is away.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use strait_proto::xds::Versioned;

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// gRPC status code `INVALID_ARGUMENT`, sent in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// Where and as whom to subscribe.
#[derive(Clone)]
pub struct XdsClientConfig {
    /// The control plane's discovery address, `host:port`.
    pub address: String,
    /// mTLS: the proxy's identity and the control plane's verifier, asked
    /// for at every (re)connect, so that a renewed certificate is used.
    pub tls: ClientTls,
    /// `<sidecar|gateway>~<address>~<workload>.<namespace>~<namespace>.svc.cluster.local`.
    pub node_id: String,
    pub cluster: String,
    pub network: String,
    /// Type URLs to subscribe to (wildcard each).
    pub types: Vec<&'static str>,
}

/// Why a TLS config source gave no config: whatever error its source has
/// (no certificate yet, unreadable files, a rustls refusal).
pub type TlsConfigError = Box<dyn std::error::Error + Send + Sync>;

/// Where a discovery client's TLS config comes from at each connect.
#[derive(Clone)]
pub struct ClientTls(
    Arc<dyn Fn() -> Result<Arc<rustls::ClientConfig>, TlsConfigError> + Send + Sync>,
);

impl ClientTls {
    /// The same config at every connect.
    pub fn fixed(config: Arc<rustls::ClientConfig>) -> Self {
        ClientTls(Arc::new(move || Ok(config.clone())))
    }

    /// A config made at each connect (from the current certificate).
    pub fn dynamic(
        f: impl Fn() -> Result<Arc<rustls::ClientConfig>, TlsConfigError> + Send + Sync + 'static,
    ) -> Self {
        ClientTls(Arc::new(f))
    }

    /// The config for a connect now.
    pub fn current(&self) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
        (self.0)()
    }
}

impl From<Arc<rustls::ClientConfig>> for ClientTls {
    fn from(config: Arc<rustls::ClientConfig>) -> Self {
        ClientTls::fixed(config)
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl std::fmt::Debug for XdsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClientConfig")
            .field("address", &self.address)
            .field("node_id", &self.node_id)
            .field("cluster", &self.cluster)
            .field("network", &self.network)
            .field("types", &self.types)
            .finish_non_exhaustive()
    }
}

/// The resources a proxy holds: type URL → name → resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    types: BTreeMap<String, BTreeMap<String, Versioned>>,
}

impl Resources {
    /// The resources of one type, by name.
    pub fn of_type(&self, type_url: &str) -> impl Iterator<Item = (&str, &Versioned)> {
        self.types
            .get(type_url)
            .into_iter()
            .flatten()
            .map(|(n, v)| (n.as_str(), v))
    }

    /// One resource.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Versioned> {
        self.types.get(type_url)?.get(name)
    }

    /// Every resource of a type, decoded; the first that does not decode
    /// is returned as `(name, reason)`.
    pub fn decode<M: prost::Message + Default>(
        &self,
        type_url: &str,
    ) -> Result<BTreeMap<String, M>, (String, String)> {
        self.of_type(type_url)
            .map(|(name, v)| {
                M::decode(v.resource.value.as_slice())
                    .map(|m| (name.to_string(), m))
                    .map_err(|e| (name.to_string(), format!("does not decode: {e}")))
            })
            .collect()
    }

    /// How many resources of every type.
    pub fn len(&self) -> usize {
        self.types.values().map(BTreeMap::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The versions held of a type (for resuming).
    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.of_type(type_url)
            .map(|(n, v)| (n.to_string(), v.version.clone()))
            .collect()
    }

    /// This set with one delta response applied; errors name each
    /// resource that cannot be taken.
    fn apply(&self, resp: &DeltaDiscoveryResponse) -> Result<Resources, Vec<(String, String)>> {
        let mut next = self.clone();
        let mut errors = Vec::new();
        let of_type = next.types.entry(resp.type_url.clone()).or_default();
        for r in &resp.resources {
            match &r.resource {
                Some(any) if any.type_url == resp.type_url => {
                    of_type.insert(
                        r.name.clone(),
                        Versioned {
                            version: r.version.clone(),
                            resource: prost_types::Any {
                                type_url: any.type_url.clone(),
                                value: any.value.clone(),
                            },
                        },
                    );
                }
                Some(any) => errors.push((
                    r.name.clone(),
                    format!(
                        "has type {} in a response for {}",
                        any.type_url, resp.type_url
                    ),
                )),
                None => errors.push((r.name.clone(), "carries no resource".to_string())),
            }
        }
        for name in &resp.removed_resources {
            of_type.remove(name);
        }
        if errors.is_empty() {
            Ok(next)
        } else {
            Err(errors)
        }
    }
}

/// The proxy's check of a candidate set: `Err` names each refused
/// resource and why.
pub type Validator = Arc<dyn Fn(&Resources) -> Result<(), Vec<(String, String)>> + Send + Sync>;

/// How the subscription is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientState {
    /// A stream is open.
    pub connected: bool,
    /// A first response for every type has been accepted (stays true
    /// while disconnected: the last good set is kept). Readiness.
    pub synced: bool,
    /// The last NACK sent: the type and the error.
    pub last_nack: Option<(String, String)>,
    /// Responses accepted so far.
    pub accepted: u64,
    /// Why the last stream failed (a refusal names its reason), until a
    /// stream opens again.
    pub last_error: Option<String>,
}

/// A running subscription. Dropping it stops the task.
#[derive(Debug)]
pub struct XdsClient {
    resources: watch::Receiver<Arc<Resources>>,
    state: watch::Receiver<ClientState>,
    task: JoinHandle<()>,
}

impl XdsClient {
    /// The last good resources, updated on every accepted response.
    pub fn resources(&self) -> watch::Receiver<Arc<Resources>> {
        self.resources.clone()
    }

    /// The subscription's state.
    pub fn state(&self) -> watch::Receiver<ClientState> {
        self.state.clone()
    }

    /// Whether a first full set has been accepted.
    pub fn synced(&self) -> bool {
        self.state.borrow().synced
    }
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts subscribing; see the module documentation.
pub fn spawn(cfg: XdsClientConfig, validator: Validator) -> XdsClient {
    let (res_tx, resources) = watch::channel(Arc::new(Resources::default()));
    let (state_tx, state) = watch::channel(ClientState::default());
    let task = tokio::spawn(run(cfg, validator, res_tx, state_tx));
    XdsClient {
        resources,
        state,
        task,
    }
}

fn node(cfg: &XdsClientConfig) -> Node {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    Node {
        id: cfg.node_id.clone(),
        cluster: cfg.cluster.clone(),
        metadata: Some(Struct {
            fields: HashMap::from([
                ("CLUSTER_ID".to_string(), string(&cfg.cluster)),
                ("NETWORK".to_string(), string(&cfg.network)),
            ]),
        }),
        ..Default::default()
    }
}

/// The next reconnect delay after `current`.
fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(BACKOFF_MAX)
}

async fn run(
    cfg: XdsClientConfig,
    validator: Validator,
    res_tx: watch::Sender<Arc<Resources>>,
    state_tx: watch::Sender<ClientState>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut progressed = false;
        let result = session(&cfg, &validator, &res_tx, &state_tx, &mut progressed).await;
        state_tx.send_modify(|s| s.connected = false);
        match result {
            Ok(()) => {
                tracing::info!(address = %cfg.address, "discovery stream closed by the control plane")
            }
            Err(e) => {
                tracing::warn!(address = %cfg.address, error = %e, "discovery stream failed");
                state_tx.send_modify(|s| s.last_error = Some(e.to_string()));
            }
        }
        if progressed {
            backoff = BACKOFF_MIN;
        }
        tracing::debug!(delay = ?backoff, "reconnecting to the control plane");
        tokio::time::sleep(backoff).await;
        backoff = next_backoff(backoff);
    }
}

/// Why a discovery stream ended (published as [`ClientState::last_error`]).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The TLS config source failed; its message as is.
    #[error("{0}")]
    Tls(#[source] TlsConfigError),
    #[error(transparent)]
    Address(#[from] strait_runtime::transport::BadAddress),
    /// The server's gRPC status, as `<code>: <message>`.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[source] tonic::Status),
    #[error("request queue closed")]
    QueueClosed,
    #[error("request stream closed")]
    StreamClosed,
}

async fn session(
    cfg: &XdsClientConfig,
    validator: &Validator,
    res_tx: &watch::Sender<Arc<Resources>>,
    state_tx: &watch::Sender<ClientState>,
    progressed: &mut bool,
) -> Result<(), SessionError> {
    let channel = strait_runtime::transport::channel_to(
        &cfg.address,
        strait_ca::tls::CONTROL_PLANE_SERVER_NAME,
        cfg.tls.current().map_err(SessionError::Tls)?,
    )?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (req_tx, req_rx) = mpsc::channel(cfg.types.len() + 16);
    let held = res_tx.borrow().clone();
    for type_url in &cfg.types {
        let initial = DeltaDiscoveryRequest {
            node: Some(node(cfg)),
            type_url: (*type_url).to_string(),
            resource_names_subscribe: vec!["*".to_string()],
            initial_resource_versions: held.versions(type_url),
            ..Default::default()
        };
        req_tx
            .send(initial)
            .await
            .map_err(|_| SessionError::QueueClosed)?;
    }
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(req_rx))
        .await
        .map_err(SessionError::Status)?
        .into_inner();
    state_tx.send_modify(|s| {
        s.connected = true;
        s.last_error = None;
    });
    tracing::info!(address = %cfg.address, node = %cfg.node_id, "discovery stream open");
    let mut waiting: BTreeSet<String> = cfg.types.iter().map(|t| (*t).to_string()).collect();
    loop {
        let resp = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(SessionError::Status(s)),
        };
        *progressed = true;
        let current = res_tx.borrow().clone();
        let verdict = current
            .apply(&resp)
            .and_then(|next| validator(&next).map(|()| next));
        let reply = match verdict {
            Ok(next) => {
                res_tx.send_replace(Arc::new(next));
                waiting.remove(&resp.type_url);
                let synced = waiting.is_empty();
                state_tx.send_modify(|s| {
                    s.accepted += 1;
                    s.synced |= synced;
                });
                tracing::debug!(type_url = %resp.type_url, nonce = %resp.nonce, updated = resp.resources.len(), removed = resp.removed_resources.len(), "ACK");
                DeltaDiscoveryRequest {
                    type_url: resp.type_url.clone(),
                    response_nonce: resp.nonce.clone(),
                    ..Default::default()
                }
            }
            Err(errors) => {
                let message = errors
                    .iter()
                    .map(|(name, e)| format!("{name}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %message, "refusing config (NACK); keeping the last good");
                state_tx
                    .send_modify(|s| s.last_nack = Some((resp.type_url.clone(), message.clone())));
                DeltaDiscoveryRequest {
                    type_url: resp.type_url.clone(),
                    response_nonce: resp.nonce.clone(),
                    error_detail: Some(RpcStatus {
                        code: INVALID_ARGUMENT,
                        message,
                        details: Vec::new(),
                    }),
                    ..Default::default()
                }
            }
        };
        req_tx
            .send(reply)
            .await
            .map_err(|_| SessionError::StreamClosed)?;
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::google::protobuf::Any;

    use super::*;

    const T: &str = "type.googleapis.com/strait.mesh.v1.Network";

    #[tokio::test(start_paused = true)]
    async fn every_connect_asks_for_the_current_tls_config() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // Nothing listens there: each attempt fails, and the client
        // reconnects with backoff, asking for the TLS config each time
        // (where a renewed certificate comes in); a failing provider is a
        // failed attempt with its reason.
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let cfg = XdsClientConfig {
            address: "127.0.0.1:9".into(),
            tls: ClientTls::dynamic(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                Err("no certificate yet".into())
            }),
            node_id: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".into(),
            cluster: String::new(),
            network: String::new(),
            types: vec![T],
        };
        let validator: Validator = Arc::new(|_| Ok(()));
        let client = spawn(cfg, validator);
        let mut state = client.state();
        let failed = state
            .wait_for(|s| s.last_error.is_some())
            .await
            .unwrap()
            .clone();
        assert_eq!(failed.last_error.as_deref(), Some("no certificate yet"));
        tokio::time::sleep(BACKOFF_MIN * 8).await;
        assert!(
            asked.load(Ordering::SeqCst) >= 3,
            "{}",
            asked.load(Ordering::SeqCst)
        );
    }

    fn res(name: &str, version: &str, type_url: Option<&str>) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: type_url.map(|t| Any {
                type_url: t.into(),
                value: version.as_bytes().to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn responses_apply_updates_and_removals() {
        let empty = Resources::default();
        let one = empty
            .apply(&DeltaDiscoveryResponse {
                type_url: T.into(),
                resources: vec![res("a", "1", Some(T)), res("b", "1", Some(T))],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(one.len(), 2);
        let two = one
            .apply(&DeltaDiscoveryResponse {
                type_url: T.into(),
                resources: vec![res("a", "2", Some(T))],
                removed_resources: vec!["b".into(), "never-had".into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(two.get(T, "a").unwrap().version, "2");
        assert!(two.get(T, "b").is_none());
        assert_eq!(
            two.versions(T),
            HashMap::from([("a".to_string(), "2".to_string())])
        );
    }

    #[test]
    fn malformed_responses_name_the_resource() {
        let cases = [
            (res("x", "1", None), "x", "carries no resource"),
            (
                res("y", "1", Some("type.googleapis.com/other.Type")),
                "y",
                "has type type.googleapis.com/other.Type",
            ),
        ];
        for (r, name, reason) in cases {
            let errors = Resources::default()
                .apply(&DeltaDiscoveryResponse {
                    type_url: T.into(),
                    resources: vec![res("ok", "1", Some(T)), r],
                    ..Default::default()
                })
                .unwrap_err();
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].0, name);
            assert!(errors[0].1.contains(reason), "{errors:?}");
        }
    }

    #[test]
    fn decode_names_the_bad_resource() {
        let r = Resources::default()
            .apply(&DeltaDiscoveryResponse {
                type_url: T.into(),
                resources: vec![Resource {
                    name: "garbage".into(),
                    resource: Some(Any {
                        type_url: T.into(),
                        value: vec![0xff, 0xff, 0xff],
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .unwrap();
        let err = r
            .decode::<strait_proto::strait::mesh::v1::Network>(T)
            .unwrap_err();
        assert_eq!(err.0, "garbage");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut d = BACKOFF_MIN;
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_backoff(d);
            seen.push(d);
        }
        assert_eq!(seen[1], Duration::from_millis(400));
        assert_eq!(seen[5], Duration::from_millis(6400));
        assert!(seen[6..].iter().all(|d| *d == BACKOFF_MAX));
    }
}
