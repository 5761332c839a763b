//! The control plane's link to its mesh broker: publishes what the config
//! exports, writes what the broker says this cluster imports back into the
//! config directory (`imported/strait-imports.yaml`, read again by the
//! directory watcher like any other config), and exposes the broker's
//! imports (trust bundle version, deny-list, remote networks) to the rest
//! of the control plane.
//!
//! The Sync stream itself (reconnect with backoff, resume by revision,
//! intermediate renewal, trust bundle installation) is
//! [`strait_broker::agent::Agent`]; this module feeds it and consumes it.
//! When the broker is away, nothing here changes: the last imports stay
//! written and in force.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use strait_broker::agent::{Agent, AgentConfig, Exports, Imports};
use strait_broker::client::{BROKER_FILE, BrokerInfo};
use strait_model::mesh::{ClusterInfo, GatewayAddress, Locality, Network};
use tokio::sync::watch;

use crate::dirwatch::{IMPORTED_DIR, is_imported};
use crate::source::Config;

/// The file the imports are written to, under `<config-dir>/imported/`.
pub const IMPORTS_FILE: &str = "strait-imports.yaml";

/// How the link is set up.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The joined cluster directory (`cacerts/`, `broker-client/`,
    /// `broker.json`).
    pub state_dir: PathBuf,
    /// The config directory; imports go to its `imported/`.
    pub config_dir: PathBuf,
    /// This cluster's east-west gateway addresses (`host:port`), published
    /// with its exports.
    pub gateways: Vec<String>,
}

/// Reads `broker.json` of a joined cluster directory.
pub fn broker_info(state_dir: &Path) -> Result<BrokerInfo, String> {
    let path = state_dir.join(BROKER_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "{}: {e} (not a joined cluster directory: run with --join-token first)",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// This cluster as an importer sees itself.
pub fn cluster_info(info: &BrokerInfo, gateways: &[String]) -> Result<ClusterInfo, String> {
    Ok(ClusterInfo {
        name: strait_ca::ClusterName::new(&info.cluster).map_err(|e| e.to_string())?,
        network: Network::new(&info.network).map_err(|e| e.to_string())?,
        locality: if info.locality.is_empty() {
            None
        } else {
            Some(Locality::parse(&info.locality).map_err(|e| e.to_string())?)
        },
        gateways: gateways
            .iter()
            .map(|g| GatewayAddress::parse(g).map_err(|e| format!("gateway {g:?}: {e}")))
            .collect::<Result<_, _>>()?,
        trust_domain: strait_ca::TrustDomain::new(&info.trust_domain).map_err(|e| e.to_string())?,
    })
}

/// The cluster's own objects (not the imports written back).
fn own_docs(config_dir: &Path, config: &Config) -> Vec<Value> {
    config
        .objects
        .values()
        .filter(|o| !is_imported(config_dir, &o.file))
        .map(|o| o.value.clone())
        .collect()
}

/// What the config exports, with a log line for every object refused.
pub fn exports_of(config_dir: &Path, config: &Config) -> Exports {
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

/// The import objects for `imports`, as YAML.
pub fn imports_yaml(
    me: &ClusterInfo,
    config_dir: &Path,
    config: &Config,
    imports: &Imports,
) -> Result<String, String> {
    let remotes: Vec<_> = imports.services.values().flatten().cloned().collect();
    let locals = strait_model::local::local_services(&own_docs(config_dir, config));
    let objects = strait_model::imports::import_objects(me, &remotes, &locals);
    for w in &objects.warnings {
        tracing::warn!(warning = %w, "import");
    }
    objects.to_yaml().map_err(|e| e.to_string())
}

/// Starts the link. The returned channel carries the broker's imports (as
/// last received; `connected` says whether the stream is up).
pub fn spawn(
    cfg: LinkConfig,
    mut config: watch::Receiver<Arc<Config>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(watch::Receiver<Imports>, tokio::task::JoinHandle<()>), String> {
    let info = broker_info(&cfg.state_dir)?;
    let me = cluster_info(&info, &cfg.gateways)?;
    let first = exports_of(&cfg.config_dir, &config.borrow_and_update());
    let (exports_tx, exports_rx) = watch::channel(first);
    let (agent, imports) = Agent::new(
        AgentConfig {
            dir: cfg.state_dir.clone(),
            gateways: cfg.gateways.clone(),
        },
        exports_rx,
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    let out_dir = cfg.config_dir.join(IMPORTED_DIR);
    let out = out_dir.join(IMPORTS_FILE);
    let mut imports_rx = imports.clone();
    let task = tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut written: Option<String> = None;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                changed = config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let c = config.borrow_and_update().clone();
                    exports_tx.send_if_modified(|e| {
                        let next = exports_of(&cfg.config_dir, &c);
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
            }
            // Imports are (re)written when they or the local services
            // they attach to changed; a revision 0 means none received yet.
            let now = imports_rx.borrow_and_update().clone();
            if now.revision == 0 {
                continue;
            }
            let yaml = match imports_yaml(&me, &cfg.config_dir, &config.borrow(), &now) {
                Ok(y) => y,
                Err(e) => {
                    tracing::error!(error = %e, "imports not written");
                    continue;
                }
            };
            if written.as_deref() == Some(yaml.as_str()) {
                continue;
            }
            let write = std::fs::create_dir_all(&out_dir)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    strait_ca::layout::write_public(&out, &yaml).map_err(|e| e.to_string())
                });
            match write {
                Ok(()) => {
                    tracing::info!(
                        revision = now.revision,
                        services = now.services.len(),
                        file = %out.display(),
                        "imports written"
                    );
                    written = Some(yaml);
                }
                Err(e) => tracing::error!(file = %out.display(), error = %e, "imports not written"),
            }
        }
        let _ = stop_tx.send(());
        let _ = agent_task.await;
    });
    Ok((imports, task))
}
