//! The gateway role: one validated [`Config`], and [`run`], which wires the
//! listeners, the routing table (from the control plane or a file), the
//! gateway's identity and the QUIC tunnels, health and metrics, and drains
//! on shutdown. `strait gateway` parses its flags into a [`Config`] and
//! calls [`run`]; nothing else lives in the CLI.

mod identity;
mod routing;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use strait_ca::{ClusterName, TrustBundle, TrustDomain};
use strait_runtime::accept::{self, BindError};
use strait_runtime::drain::Drained;
use strait_runtime::http::{self, Ready};

use crate::passthrough::{self, Metrics};
use crate::route::RouteTable;

pub use identity::gateway_id;
pub use routing::load_routes;

/// Where the routing table comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// A file of exported services (YAML or JSON), re-read when it changes.
    File(PathBuf),
    /// The cluster's control plane (`host:port`), over mTLS with the
    /// gateway's certificate.
    ControlPlane(String),
}

/// Where the gateway's certificate comes from.
#[derive(Clone)]
pub enum IdentitySource {
    /// Files someone else keeps current (`cert-chain.pem`, `key.pem`,
    /// `root-cert.pem`), and optionally a directory of peered meshes'
    /// bundles (`<trust-domain>.pem`); both re-read when they change.
    Dir {
        dir: PathBuf,
        federated: Option<PathBuf>,
    },
    /// A key made here and certificates from the control plane's CSR API
    /// (the [`Routing::ControlPlane`] address), asked for with `token`
    /// (read again from `token_file` whenever needed) and verified against
    /// `root` of trust domain `td`.
    Csr {
        token: String,
        token_file: PathBuf,
        td: TrustDomain,
        root: TrustBundle,
        cert_ttl: Duration,
    },
}

impl std::fmt::Debug for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentitySource::Dir { dir, federated } => f
                .debug_struct("Dir")
                .field("dir", dir)
                .field("federated", federated)
                .finish(),
            IdentitySource::Csr {
                token_file,
                td,
                cert_ttl,
                ..
            } => f
                .debug_struct("Csr")
                .field("token_file", token_file)
                .field("trust_domain", &td.to_string())
                .field("cert_ttl", cert_ttl)
                .finish_non_exhaustive(),
        }
    }
}

/// The control plane exposed to remote clusters' proxies (primary-remote).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    /// The control plane, `host:port`.
    pub upstream: String,
    pub listen: SocketAddr,
}

/// Everything a gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: ClusterName,
    pub network: String,
    /// The passthrough listener (TCP) and, with an identity, the tunnels
    /// (UDP).
    pub listen: SocketAddr,
    pub routing: Routing,
    pub identity: Option<IdentitySource>,
    /// Deadlines and the ALPN check of passthrough connections.
    pub passthrough: passthrough::Config,
    /// How long live connections may finish after shutdown begins.
    pub drain: Duration,
    pub health_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// Where local sidecars hand connections for other networks (tunnels).
    pub egress_listen: Option<SocketAddr>,
    pub expose: Option<Expose>,
}

/// A [`Config`] that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "the egress listener needs the gateway's identity (a token or an identity directory): tunnels are mutual TLS between gateways"
    )]
    EgressWithoutIdentity,
    #[error(
        "routes from the control plane need the gateway's certificate: a token and a root certificate, or an identity directory"
    )]
    ControlPlaneWithoutIdentity,
    #[error("a certificate from the CSR API needs the control plane's address")]
    CsrWithoutControlPlane,
}

impl Config {
    /// Checks that the parts fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.egress_listen.is_some() && self.identity.is_none() {
            return Err(ConfigError::EgressWithoutIdentity);
        }
        match (&self.routing, &self.identity) {
            (Routing::ControlPlane(_), None) => Err(ConfigError::ControlPlaneWithoutIdentity),
            (Routing::File(_), Some(IdentitySource::Csr { .. })) => {
                Err(ConfigError::CsrWithoutControlPlane)
            }
            _ => Ok(()),
        }
    }
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Routes(#[from] routing::RoutesError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("cannot listen on {addr} (UDP, tunnels): {source}")]
    Tunnels {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the gateway until `shutdown` resolves, then stops accepting and
/// lets live connections finish for up to [`Config::drain`]. `ready` turns
/// true once it has its certificate (pending task `certificate`) and the
/// routing table is loaded (`routes`: the control plane's first full set,
/// or the file), and false when shutdown begins.
pub async fn run(
    config: Config,
    ready: Ready,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    config.validate()?;
    tracing::info!(?config, "gateway starting");
    let routes_pending = ready.pending("routes");
    let certificate_pending = ready.pending("certificate");
    let table = match &config.routing {
        Routing::File(path) => {
            let t = load_routes(path)?;
            tracing::info!(cluster = %config.cluster, network = %config.network, services = t.len(), "routing table loaded");
            t
        }
        Routing::ControlPlane(_) => RouteTable::default(),
    };
    let (table_tx, table_rx) = tokio::sync::watch::channel(Arc::new(table));
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let expose_metrics = crate::expose::ExposeMetrics::new(&mut registry);
    let registry = Arc::new(registry);
    if let Some(addr) = config.health_listen {
        let l = accept::bind(addr, "health").await?;
        tokio::spawn(http::serve(l, ready.clone(), None));
    }
    if let Some(addr) = config.metrics_listen {
        let l = accept::bind(addr, "metrics").await?;
        tokio::spawn(http::serve(l, ready.clone(), Some(registry.clone())));
    }
    let listener = accept::bind(config.listen, "passthrough").await?;
    tokio::pin!(shutdown);

    let creds = match &config.identity {
        None => None,
        Some(source) => {
            let control_plane = match &config.routing {
                Routing::ControlPlane(cp) => Some(cp.as_str()),
                Routing::File(_) => None,
            };
            let creds = identity::Creds::new(source, control_plane)?;
            if let identity::Creds::Csr { manager, .. } = &creds {
                tracing::info!("asking the control plane for the gateway certificate");
                let mut id = manager.subscribe();
                tokio::select! {
                    r = id.wait_for(Option::is_some) => {
                        r.map_err(|_| identity::IdentityError::TaskStopped)?;
                    }
                    () = &mut shutdown => {
                        tracing::info!("stopped before the first certificate");
                        return Ok(());
                    }
                }
            }
            Some(Arc::new(creds))
        }
    };
    certificate_pending.done();
    if let Some(creds) = &creds {
        serve_tunnels(&config, creds, &table_rx, &metrics).await?;
    }
    let (drain, watch) = strait_runtime::drain::channel();
    if let Some(expose) = &config.expose {
        let l = accept::bind(expose.listen, "exposed control plane").await?;
        tokio::spawn(crate::expose::serve(
            l,
            crate::expose::ExposeConfig {
                upstream: expose.upstream.clone(),
                hello_timeout: config.passthrough.hello_timeout,
                connect_timeout: Duration::from_secs(5),
                idle_timeout: config.passthrough.idle_timeout,
            },
            expose_metrics,
            watch.clone(),
        ));
        tracing::info!(listen = %expose.listen, control_plane = %expose.upstream, "control plane exposed to remote clusters");
    }
    let server = tokio::spawn(passthrough::serve(
        listener,
        table_rx,
        config.passthrough.clone(),
        metrics.clone(),
        watch,
    ));
    tracing::info!(listen = %config.listen, "gateway serving");
    ready.set(true);

    // The routing table: from the control plane (ready at its first full
    // set), or from the file (reloaded when it changes; the last good one
    // stays when the new one is bad).
    let _subscription = match (&config.routing, &creds) {
        (Routing::ControlPlane(cp), Some(creds)) => Some(routing::subscribe(
            &config,
            cp,
            creds,
            table_tx,
            routes_pending,
        )?),
        (Routing::ControlPlane(_), None) => unreachable!("validate() checked"),
        (Routing::File(path), _) => {
            routes_pending.done();
            routing::spawn_file_reload(path.clone(), table_tx);
            None
        }
    };

    shutdown.await;
    tracing::info!("draining: no new connections");
    ready.set(false);
    drain.start();
    let _ = server.await;
    match drain.drain(config.drain).await {
        Drained::Idle => tracing::info!("gateway stopped"),
        Drained::Deadline { open } => {
            tracing::info!(open, drain = ?config.drain, "drain deadline passed; closing the remaining connections");
        }
    }
    Ok(())
}

/// The QUIC tunnels: accepted on the listen address (UDP), pooled towards
/// remote gateways, and the egress listener local sidecars hand their
/// connections to.
async fn serve_tunnels(
    config: &Config,
    creds: &Arc<identity::Creds>,
    table: &tokio::sync::watch::Receiver<Arc<RouteTable>>,
    metrics: &Metrics,
) -> Result<(), AppError> {
    let (server, client) = creds.tunnel_configs()?;
    let endpoint =
        quinn::Endpoint::server(server, config.listen).map_err(|source| AppError::Tunnels {
            addr: config.listen,
            source,
        })?;
    let trust = creds.trust().clone();
    let pool = Arc::new(crate::tunnel::Pool::new(
        endpoint.clone(),
        client,
        trust.clone(),
        metrics.clone(),
    ));
    // A renewed identity applies to new tunnels; live ones keep theirs.
    identity::spawn_tunnel_reload(creds.clone(), endpoint.clone(), pool.clone());
    tokio::spawn(crate::tunnel::serve(
        endpoint,
        table.clone(),
        config.passthrough.clone(),
        metrics.clone(),
        trust,
    ));
    tracing::info!(listen = %config.listen, "QUIC tunnels accepted (UDP)");
    if let Some(addr) = config.egress_listen {
        let l = accept::bind(addr, "egress").await?;
        tokio::spawn(crate::tunnel::serve_egress(
            l,
            table.clone(),
            pool,
            config.passthrough.clone(),
            metrics.clone(),
        ));
        tracing::info!(listen = %addr, "egress listener serving");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            cluster: ClusterName::new("east").unwrap(),
            network: "net-east".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            routing: Routing::File("routes.yaml".into()),
            identity: None,
            passthrough: passthrough::Config::default(),
            drain: Duration::from_secs(1),
            health_listen: None,
            metrics_listen: None,
            egress_listen: None,
            expose: None,
        }
    }

    #[test]
    fn parts_that_cannot_work_together_are_refused() {
        assert_eq!(config().validate(), Ok(()));
        let egress = Config {
            egress_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..config()
        };
        assert_eq!(egress.validate(), Err(ConfigError::EgressWithoutIdentity));
        let cp = Config {
            routing: Routing::ControlPlane("127.0.0.1:15012".into()),
            ..config()
        };
        assert_eq!(cp.validate(), Err(ConfigError::ControlPlaneWithoutIdentity));
        let dir = Some(IdentitySource::Dir {
            dir: "id".into(),
            federated: None,
        });
        let with_dir = Config {
            identity: dir.clone(),
            ..egress
        };
        assert_eq!(with_dir.validate(), Ok(()));
        let cp = Config {
            identity: dir,
            ..cp
        };
        assert_eq!(cp.validate(), Ok(()));
    }
}
