//! The sidecar role: one validated [`Config`], and [`run`], which gets the
//! workload certificate (CSR, renewal), subscribes to the control plane,
//! serves the inbound and outbound listeners, health, probes and metrics,
//! and drains on shutdown. `strait sidecar` and `strait-sidecar` parse
//! their flags into a [`Config`] (see [`crate::cli`]) and call [`run`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use strait_ca::{SpiffeId, TrustBundle, TrustDomain};
use strait_model::probe::AppProbers;
use strait_proto::strait::mesh::v1::{self as pb, type_url};
use strait_proxy_client::identity::{IdentityConfig, IdentityManager};
use strait_proxy_client::xds::{self, Resources, Validator, XdsClient, XdsClientConfig};
use strait_runtime::accept::{self, BindError};
use strait_runtime::http::{self, Ready};
use tokio::sync::watch;

use crate::config::{MeshConfig, WorkloadRef};
use crate::identity::{self, Identity};
use crate::{OutboundPolicy, metrics};

/// Everything a sidecar runs with.
#[derive(Clone)]
pub struct Config {
    pub workload: WorkloadRef,
    /// The workload's identity, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub spiffe_id: SpiffeId,
    /// The control plane, `host:port` (discovery and CSR).
    pub control_plane: String,
    /// The bootstrap token, and the file to read it again from.
    pub token: String,
    pub token_file: PathBuf,
    /// The mesh roots and their trust domain.
    pub td: TrustDomain,
    pub root: TrustBundle,
    /// Sent to the control plane as node metadata `CLUSTER_ID`.
    pub cluster: Option<String>,
    pub inbound: SocketAddr,
    pub app: SocketAddr,
    pub app_ports: Vec<u16>,
    pub outbound: SocketAddr,
    pub outbound_policy: OutboundPolicy,
    /// The JSON access log on stdout.
    pub access_log: bool,
    pub health_listen: Option<SocketAddr>,
    /// The app's probes, answered on the health listener.
    pub app_probers: Option<Arc<AppProbers>>,
    pub app_probe_address: IpAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub cert_ttl: Duration,
    pub drain: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("workload", &self.workload)
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("control_plane", &self.control_plane)
            .field("token_file", &self.token_file)
            .field("cluster", &self.cluster)
            .field("inbound", &self.inbound)
            .field("app", &self.app)
            .field("app_ports", &self.app_ports)
            .field("outbound", &self.outbound)
            .field("outbound_policy", &self.outbound_policy)
            .field("access_log", &self.access_log)
            .field("health_listen", &self.health_listen)
            .field("app_probers", &self.app_probers.is_some())
            .field("metrics_listen", &self.metrics_listen)
            .field("cert_ttl", &self.cert_ttl)
            .field("drain", &self.drain)
            .finish_non_exhaustive()
    }
}

/// A [`Config`] that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the app's probes are answered on the health listener: give it an address")]
    ProbersWithoutHealth,
    #[error("the identity {id} is not in the roots' trust domain {td}")]
    ForeignIdentity { id: String, td: String },
}

impl Config {
    /// Checks that the parts fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.app_probers.is_some() && self.health_listen.is_none() {
            return Err(ConfigError::ProbersWithoutHealth);
        }
        if self.spiffe_id.trust_domain() != self.td {
            return Err(ConfigError::ForeignIdentity {
                id: self.spiffe_id.to_string(),
                td: self.td.to_string(),
            });
        }
        Ok(())
    }
}

/// Why a sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("TLS towards the control plane: {0}")]
    Tls(String),
    #[error("the certificate task stopped")]
    CertificateTask,
}

/// The mesh config from the control plane's resources, for `me`; the
/// errors name the resources refused.
pub fn mesh_config(res: &Resources, me: &WorkloadRef) -> Result<MeshConfig, Vec<(String, String)>> {
    let decode_err = |e: (String, String)| vec![e];
    let services = res
        .decode::<pb::Service>(type_url::SERVICE)
        .map_err(decode_err)?;
    let workloads = res
        .decode::<pb::Workload>(type_url::WORKLOAD)
        .map_err(decode_err)?;
    let policies = res
        .decode::<pb::Policy>(type_url::POLICY)
        .map_err(decode_err)?;
    let bundles = res
        .decode::<pb::TrustBundle>(type_url::TRUST_BUNDLE)
        .map_err(decode_err)?;
    let networks = res
        .decode::<pb::Network>(type_url::NETWORK)
        .map_err(decode_err)?;
    let settings = res
        .decode::<pb::MeshSettings>(type_url::MESH_SETTINGS)
        .map_err(decode_err)?;
    let (cfg, errors) = MeshConfig::from_resources(
        services.into_values().collect(),
        workloads.into_values().collect(),
        policies.into_values().collect(),
        bundles.into_values().collect(),
        networks.into_values().collect(),
        settings.into_values().collect(),
        me,
    );
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(errors)
    }
}

/// Runs the sidecar until `shutdown` resolves, then drains for up to
/// [`Config::drain`]. `ready` is true while it has a certificate and a
/// first config, and false once shutdown begins.
pub async fn run(
    config: Config,
    ready: Ready,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RoleError> {
    config.validate()?;
    tracing::info!(?config, "sidecar starting");
    let inbound = accept::bind(config.inbound, "inbound").await?;
    let outbound = accept::bind(config.outbound, "outbound").await?;
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let routes = config
        .app_probers
        .clone()
        .map(|p| crate::probe::routes(p, config.app_probe_address, &mut registry));
    let registry = Arc::new(registry);
    if let Some(addr) = config.health_listen {
        let l = accept::bind(addr, "health").await?;
        tokio::spawn(http::serve_with(l, ready.clone(), None, routes));
    }
    if let Some(addr) = config.metrics_listen {
        let l = accept::bind(addr, "metrics").await?;
        tokio::spawn(http::serve(l, ready.clone(), Some(registry.clone())));
    }

    // The mesh trust: verifies the control plane (its CA answers and
    // discovery) and peers; it follows the pushed bundles, so that a root
    // rotation moves it along.
    let trust = strait_ca::tls::Trust::new(config.root.clone());
    // Identity first: discovery needs a client certificate. The key is made
    // here; one task renews the certificate at about half life.
    let manager = IdentityManager::spawn(IdentityConfig {
        ttl: Some(config.cert_ttl),
        token_file: Some(config.token_file.clone()),
        ..IdentityConfig::new(
            &config.control_plane,
            config.spiffe_id.clone(),
            trust.clone(),
            Some(config.token.trim().to_string()),
        )
    });
    let mut identity = manager.subscribe();
    let waiting = ready.pending("certificate");
    let first = identity
        .wait_for(Option::is_some)
        .await
        .map_err(|_| RoleError::CertificateTask)?
        .clone()
        .ok_or(RoleError::CertificateTask)?;
    tracing::info!(id = %first.spiffe_id, "workload certificate ready");

    let (xds, config_rx) = subscribe(&config, &trust, &identity, &first)?;
    // Ready means a certificate and a first config, whatever the control
    // plane's stream is doing now.
    crate::follow_readiness(identity.clone(), config_rx.clone(), ready.clone());
    drop(waiting);
    metrics::set_access_log(config.access_log);
    let shared = Arc::new(crate::Shared::new(
        crate::Options {
            workload: config.workload.clone(),
            inbound: config.inbound,
            app: config.app,
            app_ports: config.app_ports.clone(),
            outbound: config.outbound,
            drain: config.drain,
            outbound_policy: config.outbound_policy,
        },
        config_rx,
        identity,
        trust,
        metrics,
    ));
    tracing::info!(inbound = %config.inbound, outbound = %config.outbound, app = %config.app, "sidecar serving");
    crate::run(shared, inbound, outbound, async {
        shutdown.await;
        ready.set(false);
    })
    .await;
    drop(xds);
    drop(manager);
    tracing::info!("sidecar stopped");
    metrics::flush_log();
    Ok(())
}

/// Subscribes to the control plane over mTLS (every (re)connect takes the
/// current certificate and trust); the returned channel follows every
/// accepted config.
fn subscribe(
    config: &Config,
    trust: &strait_ca::tls::Trust,
    identity: &watch::Receiver<Option<Arc<Identity>>>,
    first: &Identity,
) -> Result<(XdsClient, watch::Receiver<Arc<MeshConfig>>), RoleError> {
    identity::control_plane_tls_with(trust, &config.td, Some(first))
        .map_err(|e| RoleError::Tls(e.to_string()))?;
    let tls = {
        let identity = identity.clone();
        let trust = trust.clone();
        let td = config.td.clone();
        xds::ClientTls::dynamic(move || {
            let current = identity.borrow().clone().ok_or("no certificate yet")?;
            identity::control_plane_tls_with(&trust, &td, Some(&current))
                .map(Arc::new)
                .map_err(Into::into)
        })
    };
    let me = config.workload.clone();
    let validator: Validator = {
        let me = me.clone();
        Arc::new(move |res| mesh_config(res, &me).map(|_| ()))
    };
    let xds = xds::spawn(
        XdsClientConfig {
            address: config.control_plane.clone(),
            tls,
            node_id: format!(
                "sidecar~{}~{}.{}~{}.svc.cluster.local",
                config.inbound.ip(),
                me.name,
                me.namespace,
                me.namespace
            ),
            cluster: config.cluster.clone().unwrap_or_default(),
            network: String::new(),
            types: type_url::ALL.to_vec(),
        },
        validator,
    );
    let (config_tx, config_rx) = watch::channel(Arc::new(MeshConfig::default()));
    let mut resources = xds.resources();
    let mut state = xds.state();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = resources.changed() => {
                    if r.is_err() { return; }
                    let res = resources.borrow_and_update().clone();
                    match mesh_config(&res, &me) {
                        Ok(c) => {
                            let policies: Vec<&str> =
                                res.of_type(type_url::POLICY).map(|(n, _)| n).collect();
                            tracing::info!(
                                services = res.of_type(type_url::SERVICE).count(),
                                policies = %policies.join(","),
                                "config applied"
                            );
                            config_tx.send_replace(Arc::new(c));
                        }
                        Err(e) => tracing::error!(?e, "config refused; keeping the last good one"),
                    }
                }
                r = state.changed() => {
                    if r.is_err() { return; }
                    let st = state.borrow_and_update().clone();
                    if let Some((type_url, error)) = st.last_nack {
                        tracing::warn!(%type_url, %error, "the last update was refused (NACK)");
                    }
                }
            }
        }
    });
    Ok((xds, config_rx))
}
