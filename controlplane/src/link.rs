//! The control plane's link to its mesh broker: publishes what the config
//! exports, writes what the broker says this cluster imports back into the
//! config source, and exposes the broker's imports (trust bundle version,
//! deny-list, remote networks) to the rest of the control plane.
//!
//! - Directory mode: `<config-dir>/imported/strait-imports.yaml`, read
//!   again by the directory watcher like any other config.
//! - Kubernetes mode: server-side apply of the objects to the API (see
//!   [`crate::kube::apply_imports`]); the watchers read them back. A
//!   write-back that failed in part is retried, after [`APPLY_RETRY`] at
//!   first, doubling up to [`APPLY_RETRY_MAX`].
//!
//! Either way the objects carry `app.kubernetes.io/managed-by: strait`,
//! which is how they are told apart from the cluster's own config (they
//! are never exported again).
//!
//! The Sync stream itself (reconnect with backoff, resume by revision,
//! intermediate renewal, trust bundle installation) is
//! [`strait_broker_client::agent::Agent`]; this module feeds it and consumes it.
//! When the broker is away, nothing here changes: the last imports stay
//! written and in force.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use strait_broker_client::agent::{Agent, AgentConfig, Exports, Imports};
use strait_broker_client::client::{BROKER_FILE, BrokerInfo};
use strait_ca::spiffe::SpiffeIdError;
use strait_model::mesh::{ClusterInfo, GatewayAddress, Locality, ModelError, Network};
use tokio::sync::watch;

use strait_model::ImportObjects;
use strait_model::imports::vips::VipRange;
use strait_model::objects::{MANAGED_BY, MANAGED_BY_LABEL};

use crate::dirwatch::{IMPORTED_DIR, is_imported};
use crate::source::Config;

/// The file the imports are written to, under `<config-dir>/imported/`.
pub const IMPORTS_FILE: &str = "strait-imports.yaml";
/// The field manager of the objects applied in Kubernetes mode.
pub const FIELD_MANAGER: &str = "strait-controlplane";
/// How soon a Kubernetes write-back that failed in part is tried again.
pub const APPLY_RETRY: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest wait between retries of a failing write-back.
pub const APPLY_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// Where imports are written back to.
#[derive(Clone)]
pub enum ImportSink {
    /// `<config-dir>/imported/`.
    Dir(PathBuf),
    /// The Kubernetes API.
    Kube(::kube::Client),
}

impl std::fmt::Debug for ImportSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImportSink::Dir(d) => f.debug_tuple("Dir").field(d).finish(),
            ImportSink::Kube(_) => f.write_str("Kube"),
        }
    }
}

impl ImportSink {
    /// The config directory, in directory mode.
    fn config_dir(&self) -> Option<&Path> {
        match self {
            ImportSink::Dir(d) => Some(d),
            ImportSink::Kube(_) => None,
        }
    }
}

/// How the link is set up.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The joined cluster directory (`cacerts/`, `broker-client/`,
    /// `broker.json`).
    pub state_dir: PathBuf,
    /// Where imports are written back.
    pub sink: ImportSink,
    /// This cluster's east-west gateway addresses (`host:port`), published
    /// with its exports.
    pub gateways: Vec<String>,
    /// Where imported services' ClusterSet IPs come from (`None`: none).
    pub clusterset_ips: Option<VipRange>,
    /// The longest workload certificate this cluster's CA issues.
    pub leaf_ttl_max: std::time::Duration,
}

/// Why the link could not start: `broker.json` could not be read, or
/// does not describe this cluster validly.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "{}: {source} (not a joined cluster directory: run with --join-token first)",
        path.display()
    )]
    NotJoined {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    BrokerFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    ClusterName(SpiffeIdError),
    #[error(transparent)]
    TrustDomain(SpiffeIdError),
    /// The network or the locality.
    #[error(transparent)]
    Topology(ModelError),
    #[error("gateway {gateway:?}: {source}")]
    Gateway {
        gateway: String,
        #[source]
        source: ModelError,
    },
}

/// Reads `broker.json` of a joined cluster directory.
pub fn broker_info(state_dir: &Path) -> Result<BrokerInfo, LinkError> {
    let path = state_dir.join(BROKER_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(source) => return Err(LinkError::NotJoined { path, source }),
    };
    serde_json::from_slice(&bytes).map_err(|source| LinkError::BrokerFile { path, source })
}

/// This cluster as an importer sees itself.
pub fn cluster_info(info: &BrokerInfo, gateways: &[String]) -> Result<ClusterInfo, LinkError> {
    Ok(ClusterInfo {
        name: strait_ca::ClusterName::new(&info.cluster).map_err(LinkError::ClusterName)?,
        network: Network::new(&info.network).map_err(LinkError::Topology)?,
        locality: if info.locality.is_empty() {
            None
        } else {
            Some(Locality::parse(&info.locality).map_err(LinkError::Topology)?)
        },
        gateways: gateways
            .iter()
            .map(|g| {
                GatewayAddress::parse(g).map_err(|source| LinkError::Gateway {
                    gateway: g.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?,
        trust_domain: strait_ca::TrustDomain::new(&info.trust_domain)
            .map_err(LinkError::TrustDomain)?,
    })
}

/// Whether an object is one strait wrote (an import), by its
/// `app.kubernetes.io/managed-by` label.
pub fn is_managed(doc: &Value) -> bool {
    doc["metadata"]["labels"][MANAGED_BY_LABEL].as_str() == Some(MANAGED_BY)
}

/// The cluster's own objects (not the imports written back: not under the
/// config directory's `imported/`, not labelled as strait's).
pub fn own_docs(config_dir: Option<&Path>, config: &Config) -> Vec<Value> {
    config
        .objects
        .values()
        .filter(|o| !config_dir.is_some_and(|d| is_imported(d, &o.file)) && !is_managed(&o.value))
        .map(|o| o.value.clone())
        .collect()
}

/// The workload identities the config runs, `<ns>/<sa>`: each
/// WorkloadEntry's (a Pod is one in Kubernetes mode; `default` when it
/// names none, as Kubernetes does) and each of its `exports`' service
/// accounts. Told to the broker, which binds identities to clusters when
/// the mesh asks for it.
pub fn identities_of(
    config_dir: Option<&Path>,
    config: &Config,
    exports: &Exports,
) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = own_docs(config_dir, config)
        .iter()
        .filter(|d| d["kind"] == "WorkloadEntry")
        .filter_map(|d| {
            let ns = d["metadata"]["namespace"].as_str().unwrap_or("default");
            let sa = d["spec"]["serviceAccount"].as_str().unwrap_or("default");
            (!ns.is_empty() && !sa.is_empty()).then(|| format!("{ns}/{sa}"))
        })
        .collect();
    for e in exports.values() {
        for sa in &e.service_accounts {
            out.insert(format!("{}/{sa}", e.key.namespace()));
        }
    }
    out
}

/// What the config exports, with a log line for every object refused.
pub fn exports_of(config_dir: Option<&Path>, config: &Config) -> Exports {
    let found = strait_model::local::local_exports(&own_docs(config_dir, config));
    for e in &found.errors {
        tracing::warn!(error = %e, "not exported");
    }
    found
        .exports
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect::<BTreeMap<_, _>>()
}

/// The import objects for `imports`, given the cluster's own services, with
/// ClusterSet IPs from `clusterset_ips` (none when `None`); a service keeps
/// the address the config's imported ServiceEntry already carries.
pub fn import_objects(
    me: &ClusterInfo,
    config_dir: Option<&Path>,
    config: &Config,
    imports: &Imports,
    clusterset_ips: Option<&VipRange>,
) -> ImportObjects {
    let remotes: Vec<_> = imports.services.values().flatten().cloned().collect();
    let locals = strait_model::local::local_services(&own_docs(config_dir, config));
    let mut objects = strait_model::imports::import_objects(me, &remotes, &locals);
    if let Some(range) = clusterset_ips {
        objects.assign_clusterset_ips(range, &clusterset_ips_held(config));
    }
    for w in &objects.warnings {
        tracing::warn!(warning = %w, "import");
    }
    objects
}

/// The ClusterSet IPs the config's imported ServiceEntries (strait's, by
/// their managed-by label) carry, by host: written before, by this control
/// plane or by the one before a restart.
pub fn clusterset_ips_held(config: &Config) -> BTreeMap<String, Ipv4Addr> {
    config
        .objects
        .iter()
        .filter(|(key, o)| key.kind == "ServiceEntry" && is_managed(&o.value))
        .filter_map(|(_, o)| {
            let spec = &o.value["spec"];
            let host = spec["hosts"][0].as_str()?;
            let ip = spec["addresses"][0].as_str()?.parse().ok()?;
            Some((host.to_string(), ip))
        })
        .collect()
}

/// Starts the link. The returned channel carries the broker's imports (as
/// last received; `connected` says whether the stream is up).
pub fn spawn(
    cfg: LinkConfig,
    mut config: watch::Receiver<Arc<Config>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(watch::Receiver<Imports>, tokio::task::JoinHandle<()>), LinkError> {
    let info = broker_info(&cfg.state_dir)?;
    let me = cluster_info(&info, &cfg.gateways)?;
    let config_dir = cfg.sink.config_dir().map(Path::to_path_buf);
    let first = exports_of(config_dir.as_deref(), &config.borrow_and_update());
    let (identities_tx, identities_rx) = watch::channel(identities_of(
        config_dir.as_deref(),
        &config.borrow(),
        &first,
    ));
    let (exports_tx, exports_rx) = watch::channel(first);
    let (agent, imports) = Agent::new(
        AgentConfig {
            dir: cfg.state_dir.clone(),
            gateways: cfg.gateways.clone(),
            leaf_ttl_max: Some(cfg.leaf_ttl_max),
        },
        exports_rx,
    );
    let agent = agent.with_identities(identities_rx);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    let mut imports_rx = imports.clone();
    let task = tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut writer = Writer::new(cfg.sink.clone());
        let retry = tokio::time::sleep(APPLY_RETRY);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                changed = config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let c = config.borrow_and_update().clone();
                    let next = exports_of(config_dir.as_deref(), &c);
                    identities_tx.send_if_modified(|i| {
                        let ids = identities_of(config_dir.as_deref(), &c, &next);
                        let changed = *i != ids;
                        *i = ids;
                        changed
                    });
                    exports_tx.send_if_modified(|e| {
                        if *e == next {
                            false
                        } else {
                            tracing::info!(exports = next.len(), "exports changed");
                            *e = next;
                            true
                        }
                    });
                }
                changed = imports_rx.changed() => {
                    if changed.is_err() {
                        tracing::error!("the broker agent stopped");
                        break;
                    }
                }
                () = &mut retry, if writer.incomplete => {}
            }
            // Imports are (re)written when they or the local services
            // they attach to changed; a revision 0 means none received yet.
            let now = imports_rx.borrow_and_update().clone();
            if now.revision == 0 {
                continue;
            }
            let objects = import_objects(
                &me,
                config_dir.as_deref(),
                &config.borrow(),
                &now,
                cfg.clusterset_ips.as_ref(),
            );
            writer.write(&objects, &now).await;
            if writer.incomplete {
                retry
                    .as_mut()
                    .reset(tokio::time::Instant::now() + writer.retry_delay());
            }
        }
        let _ = stop_tx.send(());
        let _ = agent_task.await;
    });
    Ok((imports, task))
}

/// Writes import objects to the sink, skipping a write of what was last
/// written in full.
struct Writer {
    sink: ImportSink,
    written: Option<ImportObjects>,
    /// The last write failed (in part): retry even without a change.
    incomplete: bool,
    /// Writes failed in a row.
    failures: u32,
}

impl Writer {
    fn new(sink: ImportSink) -> Self {
        Writer {
            sink,
            written: None,
            incomplete: false,
            failures: 0,
        }
    }

    /// How long to wait before retrying: doubling from [`APPLY_RETRY`]
    /// with each failure in a row, up to [`APPLY_RETRY_MAX`].
    fn retry_delay(&self) -> std::time::Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        APPLY_RETRY
            .saturating_mul(1 << doublings)
            .min(APPLY_RETRY_MAX)
    }

    async fn write(&mut self, objects: &ImportObjects, imports: &Imports) {
        if !self.incomplete && self.written.as_ref() == Some(objects) {
            return;
        }
        let done = match &self.sink {
            ImportSink::Dir(config_dir) => write_file(config_dir, objects, imports),
            ImportSink::Kube(client) => apply(client, objects, imports).await,
        };
        self.incomplete = !done;
        self.failures = if done {
            0
        } else {
            self.failures.saturating_add(1)
        };
        self.written = done.then(|| objects.clone());
    }
}

/// Why the imports file could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Yaml(#[from] strait_model::imports::ImportError),
    #[error("{}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] strait_ca::layout::LayoutError),
}

/// Writes `objects` to `out` (in `out_dir`, created if need be).
fn write_yaml(out_dir: &Path, out: &Path, objects: &ImportObjects) -> Result<(), WriteError> {
    let yaml = objects.to_yaml()?;
    std::fs::create_dir_all(out_dir).map_err(|source| WriteError::Dir {
        dir: out_dir.to_path_buf(),
        source,
    })?;
    strait_ca::layout::write_public(out, &yaml)?;
    Ok(())
}

fn write_file(config_dir: &Path, objects: &ImportObjects, imports: &Imports) -> bool {
    let out_dir = config_dir.join(IMPORTED_DIR);
    let out = out_dir.join(IMPORTS_FILE);
    match write_yaml(&out_dir, &out, objects) {
        Ok(()) => {
            tracing::info!(
                revision = imports.revision,
                services = imports.services.len(),
                file = %out.display(),
                "imports written"
            );
            true
        }
        Err(e) => {
            tracing::error!(file = %out.display(), error = %e, "imports not written");
            false
        }
    }
}

async fn apply(client: &::kube::Client, objects: &ImportObjects, imports: &Imports) -> bool {
    match crate::kube::apply_imports(client.clone(), FIELD_MANAGER, objects).await {
        Ok(report) => {
            for f in &report.failed {
                tracing::warn!(object = %f.object, error = %f.error, "import not applied; retrying");
            }
            for o in &report.not_served {
                tracing::info!(object = %o, "import not applied: the API does not serve its kind (CRD not installed)");
            }
            tracing::info!(
                revision = imports.revision,
                services = imports.services.len(),
                applied = report.applied.len(),
                not_served = report.not_served.len(),
                deleted = report.deleted.len(),
                failed = report.failed.len(),
                "imports applied to the Kubernetes API"
            );
            report.is_complete()
        }
        Err(e) => {
            tracing::error!(error = %e, "imports not applied");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_the_maximum() {
        let mut w = Writer::new(ImportSink::Dir(PathBuf::from("/nonexistent")));
        let delays: Vec<u64> = (1..=9)
            .map(|n| {
                w.failures = n;
                w.retry_delay().as_secs()
            })
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        w.failures = u32::MAX;
        assert_eq!(w.retry_delay(), APPLY_RETRY_MAX);
    }

    #[test]
    fn strait_objects_are_not_the_clusters_own() {
        let own = serde_json::json!({"metadata": {"labels": {"app": "echo"}}});
        let managed = serde_json::json!({"metadata": {"labels": {MANAGED_BY_LABEL: MANAGED_BY}}});
        let other = serde_json::json!({"metadata": {"labels": {MANAGED_BY_LABEL: "helm"}}});
        assert!(!is_managed(&own));
        assert!(is_managed(&managed));
        assert!(!is_managed(&other));
        assert!(!is_managed(&serde_json::json!({})));
    }

    #[test]
    fn held_clusterset_ips_are_read_from_straits_entries_only() {
        let entry = |name: &str, managed: bool, address: &str| {
            let labels = if managed {
                format!("{{{MANAGED_BY_LABEL}: {MANAGED_BY}}}")
            } else {
                "{app: x}".to_string()
            };
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {labels}\nspec:\n  hosts: [{name}.demo.svc.clusterset.local]\n  addresses: [\"{address}\"]\n  ports: [{{number: 80, name: http}}]\n"
            )
        };
        let files = [
            ("a.yaml", entry("a", true, "240.241.0.7")),
            ("b.yaml", entry("b", false, "240.241.0.8")),
            ("c.yaml", entry("c", true, "240.241.0.0/24")),
            ("d.yaml", entry("d", true, "fd00::1")),
        ];
        let read = files
            .iter()
            .map(|(f, text)| (PathBuf::from(f), crate::source::parse_file(text)))
            .collect::<BTreeMap<_, _>>();
        let config = Config::default().apply(&read);
        assert!(config.rejections.is_empty(), "{:?}", config.rejections);
        let held = clusterset_ips_held(&config);
        assert_eq!(
            held,
            BTreeMap::from([(
                "a.demo.svc.clusterset.local".to_string(),
                "240.241.0.7".parse().unwrap()
            )]),
            "not strait's (b), not one IPv4 address (c, d): not held"
        );
    }
}
