//! The routing table: from a file (re-read when it changes) or from the
//! control plane's discovery resources (and, with a certificate from the
//! CSR API, the pushed trust bundles too).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust};
use strait_proto::strait::mesh::v1::{self as pb, type_url};
use strait_proxy_client::xds::{self, ClientTls, Resources, Validator, XdsClient, XdsClientConfig};
use strait_runtime::http::Pending;
use tokio::sync::watch;

use super::Config;
use super::identity::{Creds, IdentityError, leaf_id, mtime, read_dir};
use crate::route::{RouteTable, RoutesFile, TableError};

/// A routing table file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("routing table {path}: {reason}")]
pub struct RoutesError {
    pub path: PathBuf,
    #[source]
    pub reason: RoutesFileError,
}

/// What is wrong with a routing table file.
#[derive(Debug, thiserror::Error)]
pub enum RoutesFileError {
    #[error(transparent)]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Boxed: the YAML parser's error is large.
    #[error(transparent)]
    Yaml(#[from] Box<serde_saphyr::DeserializeError>),
    #[error(transparent)]
    Table(#[from] TableError),
}

/// Reads a routing table file (YAML, or JSON when it starts with `{`).
pub fn load_routes(path: &Path) -> Result<RouteTable, RoutesError> {
    read_routes(path).map_err(|reason| RoutesError {
        path: path.to_path_buf(),
        reason,
    })
}

fn read_routes(path: &Path) -> Result<RouteTable, RoutesFileError> {
    let text = std::fs::read_to_string(path)?;
    let file: RoutesFile = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text)?
    } else {
        serde_saphyr::from_str(&text).map_err(Box::new)?
    };
    Ok(RouteTable::new(file)?)
}

/// The routing table from the control plane's resources; the errors name
/// the resources refused.
fn table_from(res: &Resources) -> Result<RouteTable, Vec<(String, String)>> {
    let routes = res
        .decode::<pb::GatewayRoute>(type_url::GATEWAY_ROUTE)
        .map_err(|e| vec![e])?;
    let services = res
        .decode::<pb::Service>(type_url::SERVICE)
        .map_err(|e| vec![e])?;
    let networks = res
        .decode::<pb::Network>(type_url::NETWORK)
        .map_err(|e| vec![e])?;
    let routes: Vec<_> = routes.into_values().collect();
    let services: Vec<_> = services.into_values().collect();
    let networks: Vec<_> = networks.into_values().collect();
    let (file, errors) = RoutesFile::from_resources(&routes, &services, &networks);
    if !errors.is_empty() {
        return Err(errors
            .into_iter()
            .map(|e| ("GatewayRoute".to_string(), e))
            .collect());
    }
    RouteTable::new(file).map_err(|e| vec![("GatewayRoute".to_string(), e.to_string())])
}

/// TLS towards the control plane, taken afresh at every (re)connect: from
/// the identity files (re-read, so that a rotated identity is used), or
/// from the CSR client's current certificate and the followed trust.
fn control_plane_tls(creds: &Creds) -> Result<ClientTls, IdentityError> {
    match creds {
        Creds::Dir { dir, .. } => {
            let (chain, key, bundle) = read_dir(dir)?;
            // The trust domain is the gateway's own (its certificate's).
            let cp_id = strait_ca::control_plane_id(&leaf_id(&chain)?.trust_domain());
            let accept = Accept::Ids([cp_id.clone()].into());
            // Checked once now: a bad identity fails at start.
            let verifier = SpiffeServerVerifier::new(Trust::new(bundle), accept);
            strait_ca::tls::client_config(verifier, Some((&chain, &key)), &[b"h2"])
                .map_err(IdentityError::Tls)?;
            let dir = dir.clone();
            Ok(ClientTls::dynamic(move || {
                let (chain, key, bundle) = read_dir(&dir)?;
                let verifier = SpiffeServerVerifier::new(
                    Trust::new(bundle),
                    Accept::Ids([cp_id.clone()].into()),
                );
                strait_ca::tls::client_config(verifier, Some((&chain, &key)), &[b"h2"])
                    .map(Arc::new)
                    .map_err(Into::into)
            }))
        }
        Creds::Csr {
            manager, trust, td, ..
        } => {
            let identity = manager.subscribe();
            let trust = trust.clone();
            let cp_id = strait_ca::control_plane_id(td);
            Ok(ClientTls::dynamic(move || {
                let id = identity
                    .borrow()
                    .clone()
                    .ok_or("no gateway certificate yet")?;
                let verifier =
                    SpiffeServerVerifier::new(trust.clone(), Accept::Ids([cp_id.clone()].into()));
                strait_ca::tls::client_config(
                    verifier,
                    Some((&id.chain_der, &id.key_pkcs8)),
                    &[b"h2"],
                )
                .map(Arc::new)
                .map_err(Into::into)
            }))
        }
    }
}

/// Subscribes to the control plane; the table channel follows every
/// accepted update; `routes` (a pending readiness task) is done at the
/// first full set. With a
/// certificate from the CSR API, the pushed trust bundles are followed too.
pub(super) fn subscribe(
    config: &Config,
    address: &str,
    creds: &Arc<Creds>,
    table_tx: watch::Sender<Arc<RouteTable>>,
    routes: Pending,
) -> Result<XdsClient, IdentityError> {
    let mut types = vec![
        type_url::NETWORK,
        type_url::SERVICE,
        type_url::GATEWAY_ROUTE,
    ];
    if matches!(**creds, Creds::Csr { .. }) {
        types.push(type_url::TRUST_BUNDLE);
    }
    let cfg = XdsClientConfig {
        address: address.to_string(),
        tls: control_plane_tls(creds)?,
        node_id: format!(
            "gateway~{}~eastwest-gateway.strait-system~strait-system.svc.cluster.local",
            config.listen.ip()
        ),
        cluster: config.cluster.to_string(),
        network: config.network.clone(),
        types,
    };
    let validator: Validator = Arc::new(|res| table_from(res).map(|_| ()));
    let client = xds::spawn(cfg, validator);
    let mut resources = client.resources();
    let mut state = client.state();
    let creds = creds.clone();
    tokio::spawn(async move {
        let mut routes = Some(routes);
        loop {
            tokio::select! {
                r = resources.changed() => {
                    if r.is_err() { return; }
                    let res = resources.borrow_and_update().clone();
                    follow_trust(&creds, &res);
                    match table_from(&res) {
                        Ok(t) => {
                            tracing::info!(services = t.len(), "routing table from the control plane");
                            table_tx.send_replace(Arc::new(t));
                        }
                        Err(e) => tracing::error!(?e, "routing table refused; keeping the last good one"),
                    }
                }
                r = state.changed() => {
                    if r.is_err() { return; }
                    if state.borrow_and_update().synced {
                        routes.take();
                    }
                }
            }
        }
    });
    Ok(client)
}

/// With a certificate from the CSR API, the trust follows the pushed
/// bundles (and the tunnels are told when they change).
fn follow_trust(creds: &Creds, res: &Resources) {
    let Creds::Csr { trust, bundles, .. } = creds else {
        return;
    };
    match res.decode::<pb::TrustBundle>(type_url::TRUST_BUNDLE) {
        Ok(b) => {
            let b: Vec<_> = b.into_values().collect();
            strait_proxy_client::trust::apply_trust(trust, &b);
            bundles.send_if_modified(|old| {
                let changed = *old != b;
                *old = b;
                changed
            });
        }
        Err((name, e)) => {
            tracing::error!(resource = %name, error = %e, "trust bundles refused; keeping the last good ones")
        }
    }
}

/// Reloads the routing table when the file changes; the last good one
/// stays when the new one is bad.
pub(super) fn spawn_file_reload(routes: PathBuf, table_tx: watch::Sender<Arc<RouteTable>>) {
    tokio::spawn(async move {
        let mut last = mtime(&routes);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = mtime(&routes);
            if now == last {
                continue;
            }
            last = now;
            match load_routes(&routes) {
                Ok(t) => {
                    tracing::info!(services = t.len(), "routing table reloaded");
                    table_tx.send_replace(Arc::new(t));
                }
                Err(e) => {
                    tracing::error!(error = %e, "routing table refused; keeping the last good one")
                }
            }
        }
    });
}
