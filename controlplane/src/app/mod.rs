//! The control plane process: joins the mesh (first start), watches the
//! config directory, keeps the broker link up, rebuilds the discovery
//! snapshot when config, imports or trust change, and serves discovery
//! and workload certificates on one mTLS port.
//!
//! - The serving certificate (`spiffe://<td>/ns/strait-system/sa/controlplane`)
//!   is issued here from the cluster intermediate, re-issued at half its
//!   lifetime and when the broker link installs a new intermediate (the
//!   workload CA then signs with the new one too).
//! - Trust (who may call) follows the bundle, peered bundles and
//!   deny-list the broker link installs.
//! - The health listener serves `/healthz/ready`, `/healthz/live`; the
//!   debug listener `/debug/nacks` (the last refusal of every proxy, JSON)
//!   and `/debug/config` (the objects in force and the rejected ones of
//!   every served cluster, JSON; see [`debug`]), on loopback unless told
//!   otherwise ([`DebugListen`]): it has no authentication and names every
//!   proxy and what it refused.
//! - On shutdown the snapshot channel closes first, which ends the
//!   proxies' discovery streams; connections get [`DRAIN`] to close.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::registry::Registry;
use strait_broker_client::agent::{FEDERATED_DIR, Imports};
use strait_broker_client::client::{BROKER_FILE, BrokerInfo, CACERTS_DIR};
use strait_ca::TrustDomain;
use strait_ca::authority::Authority;
use strait_ca::tls::{Accept, SpiffeClientVerifier, Trust};
use strait_runtime::accept;
use strait_runtime::http::{self, Ready};
use tokio::sync::watch;

use crate::resources::ClusterContext;
use crate::source::Config;
use crate::{dirwatch, link};
pub use error::{AppError, RemoteError, ServingError};

pub mod debug;
mod error;
mod inject;
mod inputs;
mod remotes;
mod serving;

pub use inject::InjectServe;
pub use inputs::{Siblings, networks, read_trust, spawn_builder, trust_stamp};
use remotes::{open_remotes, spawn_views, token_reviewers};
pub use serving::{ServingCert, issue_serving, load_authority, renew_serving, server_tls};
use serving::{refresh_trust, reload_authority};

/// How the control plane is set up.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub cluster: String,
    pub network: String,
    /// Where the config comes from (and imports go back to).
    pub source: ConfigSource,
    /// The joined cluster directory (`cacerts/`, `broker-client/`,
    /// `broker.json`, the token key).
    pub state_dir: PathBuf,
    /// A join token file, used when `state_dir` has not joined yet.
    pub join_token: Option<PathBuf>,
    /// Discovery and CSR (mTLS).
    pub listen: SocketAddr,
    pub health_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// Where `/debug/*` is served.
    pub debug_listen: DebugListen,
    /// This cluster's east-west gateway addresses, published with exports.
    pub gateways: Vec<String>,
    /// The local gateway's egress listener: other networks are reached
    /// through QUIC tunnels via it.
    pub quic_egress: Option<String>,
    /// Quiet time before a rebuilt snapshot is pushed.
    pub debounce: Duration,
    /// The longest workload certificate the CA issues (the cap of its
    /// [`crate::ca::TtlPolicy`]), told to the broker.
    pub max_cert_ttl: Duration,
    /// What one config file may cost (directory mode, remotes' too).
    pub config_limits: crate::source::Limits,
    /// Remote clusters this control plane also serves (primary-remote).
    pub remotes: Vec<crate::remote::RemoteSpec>,
    /// Where imported services' ClusterSet IPs come from (`None`: imports
    /// get none).
    pub clusterset_ips: Option<strait_model::imports::vips::VipRange>,
    /// The sidecar injection webhook, if served (Kubernetes mode).
    pub inject: Option<InjectServe>,
    /// How every proxy served normalizes HTTP request paths (pushed to
    /// them as the `MeshSettings` resource).
    pub path_normalization: strait_model::request_path::PathNormalization,
}

/// Where the debug endpoints are served when `--debug-listen` is not
/// given: loopback only, as istiod's plain-text debug port is meant to be
/// (reach it with a port-forward, or from the host or namespace itself).
pub const DEFAULT_DEBUG_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15014);

/// Where the control plane serves `/debug/*` (no authentication there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DebugListen {
    /// [`DEFAULT_DEBUG_LISTEN`]; when its port is taken (another control
    /// plane on this host), not served, with a warning.
    #[default]
    Default,
    /// This address (an error when it cannot be bound).
    At(SocketAddr),
    /// Not served.
    Off,
}

impl DebugListen {
    /// `off`, or an address.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(DebugListen::Off);
        }
        s.parse().map(DebugListen::At).map_err(|e| {
            format!("{s:?} is neither an address (e.g. 127.0.0.1:15014) nor \"off\": {e}")
        })
    }

    /// Binds the debug listener, if one is to be served.
    pub async fn bind(self) -> Result<Option<tokio::net::TcpListener>, AppError> {
        match self {
            DebugListen::Off => Ok(None),
            DebugListen::At(addr) => {
                if !addr.ip().is_loopback() {
                    tracing::warn!(
                        %addr,
                        "debug endpoints served on a non-loopback address, without authentication"
                    );
                }
                Ok(Some(accept::bind(addr, "debug").await?))
            }
            DebugListen::Default => match tokio::net::TcpListener::bind(DEFAULT_DEBUG_LISTEN).await
            {
                Ok(l) => Ok(Some(l)),
                Err(e) => {
                    tracing::warn!(
                        addr = %DEFAULT_DEBUG_LISTEN,
                        error = %e,
                        "debug endpoints not served (give --debug-listen another loopback address)"
                    );
                    Ok(None)
                }
            },
        }
    }
}

/// Where a control plane reads its cluster's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A watched directory of YAML; imports are written to its `imported/`.
    Dir(PathBuf),
    /// The Kubernetes API (kubeconfig from `KUBECONFIG`, `~/.kube/config`
    /// or the in-cluster service account); imports are applied to it, and
    /// workloads may bootstrap with service-account tokens (TokenReview).
    Kube,
}

impl ConfigSource {
    /// How it is named in logs and errors.
    pub fn describe(&self) -> String {
        match self {
            ConfigSource::Dir(d) => format!("--config-dir {}", d.display()),
            ConfigSource::Kube => "--kube".to_string(),
        }
    }
}

/// The config channel and the import sink of a config source, and the
/// Kubernetes client in Kubernetes mode.
async fn open_source(
    cfg: &AppConfig,
) -> Result<
    (
        watch::Receiver<Arc<Config>>,
        link::ImportSink,
        Option<::kube::Client>,
    ),
    AppError,
> {
    match &cfg.source {
        ConfigSource::Dir(dir) => {
            let config = dirwatch::watch_dir(dir.clone(), cfg.config_limits).map_err(|source| {
                AppError::ConfigDir {
                    path: dir.clone(),
                    source,
                }
            })?;
            Ok((config, link::ImportSink::Dir(dir.clone()), None))
        }
        ConfigSource::Kube => {
            let client = ::kube::Client::try_default()
                .await
                .map_err(AppError::NoKubeApi)?;
            tracing::info!("reading config from the Kubernetes API");
            let config = crate::kube::watch_kube(
                client.clone(),
                crate::kube::KubeOptions {
                    cluster: cfg.cluster.clone(),
                    network: cfg.network.clone(),
                },
            )
            .await
            .map_err(AppError::Kube)?;
            Ok((config, link::ImportSink::Kube(client.clone()), Some(client)))
        }
    }
}

/// Joins the mesh with the token file if `state_dir` has not joined yet;
/// checks that the joined identity is the one configured.
pub async fn ensure_joined(cfg: &AppConfig) -> Result<BrokerInfo, AppError> {
    if !cfg.state_dir.join(BROKER_FILE).exists() {
        let Some(token_file) = &cfg.join_token else {
            return Err(AppError::NotJoined {
                state_dir: cfg.state_dir.clone(),
                cluster: cfg.cluster.clone(),
            });
        };
        let token = std::fs::read_to_string(token_file).map_err(|source| AppError::ReadToken {
            path: token_file.clone(),
            source,
        })?;
        let joined = strait_broker_client::client::join(token.trim(), &cfg.state_dir)
            .await
            .map_err(|source| AppError::Join {
                path: token_file.clone(),
                source: Box::new(source),
            })?;
        tracing::info!(
            cluster = %joined.info.cluster,
            trust_domain = %joined.info.trust_domain,
            "joined the mesh; the intermediate key was made here"
        );
    }
    let info = link::broker_info(&cfg.state_dir)?;
    if info.cluster != cfg.cluster || info.network != cfg.network {
        return Err(AppError::OtherCluster {
            state_dir: cfg.state_dir.clone(),
            joined: info.cluster,
            joined_network: info.network,
            cluster: cfg.cluster.clone(),
            network: cfg.network.clone(),
        });
    }
    Ok(info)
}

/// How long the control plane's serving certificate is valid; it is
/// re-issued at half of that, and at once when the intermediate changes.
pub const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long open connections (proxies' discovery streams) get to close
/// after shutdown begins.
pub const DRAIN: Duration = Duration::from_secs(5);

/// The body of `/debug/nacks`: the last refusal of every node that sent
/// one, by node id (time as Unix seconds).
pub fn nacks_json(nacks: &BTreeMap<String, crate::xds::NackRecord>) -> serde_json::Value {
    let by_node: serde_json::Map<String, serde_json::Value> = nacks
        .iter()
        .map(|(node, n)| {
            let at =
                n.at.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
            (
                node.clone(),
                serde_json::json!({
                    "type_url": n.type_url,
                    "nonce": n.nonce,
                    "version_info": n.version_info,
                    "error": n.error,
                    "at_unix_seconds": at,
                }),
            )
        })
        .collect();
    serde_json::Value::Object(by_node)
}

/// Keeps `strait_config_rejections` equal to the current rejections of
/// the config in force.
fn spawn_rejection_gauge(registry: &mut Registry, mut config: watch::Receiver<Arc<Config>>) {
    let gauge: prometheus_client::metrics::gauge::Gauge = Default::default();
    registry.sub_registry_with_prefix("strait_config").register(
        "rejections",
        "Config files and objects rejected now; a rejected object's last good version stays in force",
        gauge.clone(),
    );
    tokio::spawn(async move {
        loop {
            let n = config.borrow_and_update().rejections.len();
            gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
            if config.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The answer of the debug listener: `/debug/nacks`, `/debug/config`.
fn debug_routes(xds: crate::xds::XdsServer, configs: debug::Configs) -> http::Routes {
    use ::http::StatusCode;
    Arc::new(move |path: &str| {
        let r = match path {
            "/debug/nacks" => http::respond(
                StatusCode::OK,
                "application/json",
                format!("{:#}\n", nacks_json(&xds.nacks())),
            ),
            "/debug/config" => http::respond(
                StatusCode::OK,
                "application/json",
                format!("{:#}\n", debug::configs_json(&configs)),
            ),
            _ => return None,
        };
        Some(Box::pin(std::future::ready(r)) as http::RouteFuture)
    })
}

/// Serves discovery and certificates on `incoming` until `shutdown`; then
/// the drain starts: the background tasks stop, which closes the proxies'
/// discovery streams, and the server drains for up to [`DRAIN`].
async fn serve_discovery(
    xds: &crate::xds::XdsServer,
    ca: &crate::ca::WorkloadCa,
    incoming: tokio_stream::wrappers::ReceiverStream<
        Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
    >,
    shutdown: impl Future<Output = ()> + Send + 'static,
    not_ready: Ready,
    drain: &strait_runtime::drain::Trigger,
) -> Result<(), AppError> {
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(xds.service())
        .add_service(ca.service())
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutting down: closing discovery streams");
            not_ready.set(false);
            drain.start();
        });
    // tonic does not count its connections: the drain is bounded instead.
    let bound = drain.watch();
    tokio::select! {
        r = server => r.map_err(AppError::Serve),
        () = bound.deadline(DRAIN) => {
            tracing::warn!(drain = ?DRAIN, "connections still open after the drain time; closing them");
            Ok(())
        }
    }
}

/// Kubernetes mode: where the mesh roots are published (this cluster's
/// API and the remote clusters' it serves).
fn roots_targets(
    own: Option<&::kube::Client>,
    config: &watch::Receiver<Arc<Config>>,
    remotes: &[remotes::OpenedRemote],
) -> Vec<(::kube::Client, watch::Receiver<Arc<Config>>)> {
    own.map(|c| (c.clone(), config.clone()))
        .into_iter()
        .chain(
            remotes
                .iter()
                .filter_map(|r| r.api.clone().map(|c| (c, r.config.clone()))),
        )
        .collect()
}

/// Kubernetes mode: the mesh roots in a ConfigMap of every namespace of
/// each cluster in `targets`, republished when the trust changes (the
/// snapshot changes with it).
fn spawn_root_publishers<F, Fut>(
    cfg: &AppConfig,
    targets: Vec<(::kube::Client, watch::Receiver<Arc<Config>>)>,
    snapshots: &watch::Receiver<Arc<crate::resources::Snapshot>>,
    stopped: &F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    for (i, (client, namespaces)) in targets.into_iter().enumerate() {
        crate::kube::roots::spawn_publisher(
            crate::kube::roots::Publisher {
                client,
                field_manager: link::FIELD_MANAGER.to_string(),
                roots_file: cfg.state_dir.join(CACERTS_DIR).join("root-cert.pem"),
                resync: crate::kube::roots::RESYNC,
                // The injection webhook runs in this cluster (the first).
                webhook: (i == 0 && cfg.inject.is_some())
                    .then(|| crate::kube::inject::WEBHOOK_CONFIGURATION.to_string()),
            },
            namespaces,
            snapshots.clone(),
            stopped(),
        );
    }
}

/// The snapshots of the remote clusters this control plane serves
/// (primary-remote), debounced as the own cluster's.
fn remote_snapshots<F, Fut>(
    cfg: &AppConfig,
    td: &TrustDomain,
    served: impl Iterator<
        Item = (
            String,
            String,
            watch::Receiver<Arc<Config>>,
            watch::Receiver<Siblings>,
        ),
    >,
    imports: &watch::Receiver<strait_broker_client::agent::Imports>,
    stopped: &F,
) -> BTreeMap<String, watch::Receiver<Arc<crate::resources::Snapshot>>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut remote_snapshots = BTreeMap::new();
    for (name, network, view, siblings) in served {
        let ctx = ClusterContext {
            cluster: name.clone(),
            network,
            trust_domain: td.clone(),
            locality: None,
            egress: None,
            path_normalization: cfg.path_normalization,
        };
        let snaps = spawn_builder(
            ctx,
            cfg.state_dir.clone(),
            false,
            view,
            imports.clone(),
            siblings,
            stopped(),
        );
        tracing::info!(cluster = %name, "serving remote cluster");
        remote_snapshots.insert(
            name,
            crate::xds::debounce(snaps, cfg.debounce, cfg.debounce * 10),
        );
    }
    remote_snapshots
}

/// The workload CA: the cluster intermediate, bootstrap tokens, and
/// lifetimes capped at `--max-cert-ttl`.
fn workload_ca(
    cfg: &AppConfig,
    authority: strait_ca::Authority,
    trust: Trust,
    registry: &mut Registry,
) -> Result<crate::ca::WorkloadCa, AppError> {
    let tokens =
        crate::ca::TokenIssuer::load_or_create(&cfg.state_dir.join(crate::ca::TOKEN_KEY_FILE))
            .map_err(AppError::TokenKey)?;
    crate::ca::WorkloadCa::new(
        authority,
        trust,
        Some(tokens),
        crate::ca::TtlPolicy {
            default: crate::ca::TtlPolicy::default()
                .default
                .min(cfg.max_cert_ttl),
            max: cfg.max_cert_ttl,
        },
        registry,
    )
    .map_err(AppError::WorkloadCa)
}

/// The health, debug and metrics listeners, those that are asked for.
async fn serve_endpoints(
    cfg: &AppConfig,
    ready: &Ready,
    registry: &Arc<Registry>,
    debug: http::Routes,
) -> Result<(), AppError> {
    if let Some(addr) = cfg.health_listen {
        let l = accept::bind(addr, "health").await?;
        tokio::spawn(http::serve(l, ready.clone(), None));
    }
    if let Some(l) = cfg.debug_listen.bind().await? {
        let addr = l
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        tokio::spawn(http::serve_routes(l, "debug", debug));
        tracing::info!(%addr, "debug endpoints serving (/debug/nacks, /debug/config)");
    }
    if let Some(addr) = cfg.metrics_listen {
        let l = accept::bind(addr, "metrics").await?;
        tokio::spawn(http::serve(l, ready.clone(), Some(registry.clone())));
    }
    Ok(())
}

/// Keeps the trust and the serving certificate current: the trust follows
/// what the broker link installs (bundles, deny-lists); the serving
/// certificate is reissued when the cluster's CA files change and renewed
/// at half its life.
fn spawn_trust_follower(
    trust: Trust,
    state_dir: PathBuf,
    td: TrustDomain,
    mut imports: watch::Receiver<strait_broker_client::agent::Imports>,
    ca: crate::ca::WorkloadCa,
    serving: Arc<ServingCert>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::pin!(stop);
        let mut stamp = trust_stamp(&state_dir);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let renew_every = SERVING_TTL / 2;
        let mut renew_at = Instant::now() + renew_every;
        loop {
            tokio::select! {
                () = &mut stop => return,
                r = imports.changed() => if r.is_err() { return },
                _ = tick.tick() => {
                    let now = trust_stamp(&state_dir);
                    if now != stamp {
                        stamp = now;
                        reload_authority(&ca, &serving, &state_dir, &td, &mut renew_at, renew_every);
                    } else if Instant::now() >= renew_at {
                        match renew_serving(&serving, &ca.authority(), &td) {
                            Ok(()) => {
                                tracing::info!("serving certificate renewed");
                                renew_at = Instant::now() + renew_every;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "serving certificate not renewed; retrying in a minute");
                                renew_at = Instant::now() + Duration::from_secs(60);
                            }
                        }
                        continue;
                    } else {
                        continue;
                    }
                }
            }
            refresh_trust(&trust, &state_dir, &td, &imports.borrow_and_update());
        }
    });
}

/// The sidecar injection webhook (HTTPS with the serving certificate).
async fn serve_injection(
    inject: &InjectServe,
    serving: &Arc<ServingCert>,
    registry: &mut Registry,
) -> Result<(), AppError> {
    let tls = inject::server_tls(serving.clone()).map_err(|source| AppError::Tls {
        what: "injection webhook",
        source,
    })?;
    let l = tokio::net::TcpListener::bind(inject.listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: inject.listen,
            flag: Some("--inject-listen"),
            source,
        })?;
    tokio::spawn(inject::serve(
        l,
        Arc::new(tls),
        Arc::new(inject.config.clone()),
        inject::InjectMetrics::new(registry),
    ));
    tracing::info!(listen = %inject.listen, image = %inject.config.image, "sidecar injection webhook serving");
    Ok(())
}

/// Runs the control plane until `shutdown`.
pub async fn run(
    cfg: AppConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let info = ensure_joined(&cfg).await?;
    let td = TrustDomain::new(&info.trust_domain).map_err(|source| AppError::TrustDomain {
        trust_domain: info.trust_domain.clone(),
        source,
    })?;
    let (config, sink, kube_client) = open_source(&cfg).await?;
    let config_view = config.clone();
    // The background tasks end when the drain starts.
    let (drain, watch) = strait_runtime::drain::channel();
    let stopped = move || {
        let watch = watch.clone();
        async move { watch.draining().await }
    };
    let (imports, link_task) = link::spawn(
        link::LinkConfig {
            state_dir: cfg.state_dir.clone(),
            sink,
            gateways: cfg.gateways.clone(),
            clusterset_ips: cfg.clusterset_ips,
            leaf_ttl_max: cfg.max_cert_ttl,
        },
        config.clone(),
        stopped(),
    )?;
    let ctx = ClusterContext {
        cluster: cfg.cluster.clone(),
        network: cfg.network.clone(),
        trust_domain: td.clone(),
        locality: (!info.locality.is_empty()).then(|| info.locality.clone()),
        egress: cfg.quic_egress.clone(),
        path_normalization: cfg.path_normalization,
    };
    let me = link::cluster_info(&info, &cfg.gateways)?;
    let remotes = open_remotes(&cfg).await?;
    let roots_targets = roots_targets(kube_client.as_ref(), &config, &remotes);
    let reviewers = token_reviewers(&cfg.cluster, kube_client.as_ref(), &remotes);
    let remotes: Vec<_> = remotes.into_iter().map(|r| (r.name, r.config)).collect();
    let debug_configs: debug::Configs = std::iter::once((cfg.cluster.clone(), config.clone()))
        .chain(remotes.iter().map(|(n, rx)| (n.to_string(), rx.clone())))
        .collect();
    let served = spawn_views(me, cfg.clusterset_ips, remotes, config, stopped());
    let mut served = served.into_iter();
    let (own_view, own_siblings) = served
        .next()
        .map(|(_, _, v, s)| (v, s))
        .expect("spawn_views serves this cluster first");
    let snapshots = spawn_builder(
        ctx,
        cfg.state_dir.clone(),
        cfg.quic_egress.is_some(),
        own_view,
        imports.clone(),
        own_siblings,
        stopped(),
    );
    spawn_root_publishers(&cfg, roots_targets, &snapshots, &stopped);
    let remote_snapshots = remote_snapshots(&cfg, &td, served, &imports, &stopped);
    let snapshots = crate::xds::debounce(snapshots, cfg.debounce, cfg.debounce * 10);

    // Who may call: SVIDs of this mesh (and peered meshes' are refused by
    // the xDS server's trust-domain check); kept current as the broker
    // link installs bundles and deny-lists.
    let root = cfg.state_dir.join(CACERTS_DIR).join("root-cert.pem");
    let bundle = strait_ca::layout::load_bundle(&root, Some(td.clone()))
        .map_err(|e| AppError::Bundle(Box::new(e)))?;
    let trust = Trust::new(bundle);
    refresh_trust(&trust, &cfg.state_dir, &td, &imports.borrow());
    let authority = load_authority(&cfg.state_dir, &td)?;
    let serving = Arc::new(issue_serving(&authority, &td)?);

    let mut registry = Registry::default();
    spawn_rejection_gauge(&mut registry, config_view.clone());
    let xds = crate::xds::XdsServer::new(
        snapshots,
        trust.clone(),
        td.clone(),
        crate::xds::Metrics::new(&mut registry),
    )
    .with_clusters(&cfg.cluster, remote_snapshots);
    let ca = workload_ca(&cfg, authority, trust.clone(), &mut registry)?;
    let ca = match reviewers {
        Some(reviewers) => ca.with_token_review(reviewers),
        None => ca,
    };

    if let Some(inject) = &cfg.inject {
        serve_injection(inject, &serving, &mut registry).await?;
    }
    let tls = server_tls(serving.clone(), trust.clone()).map_err(|source| AppError::Tls {
        what: "discovery",
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: cfg.listen,
            flag: None,
            source,
        })?;
    let incoming = strait_runtime::transport::tls_incoming(listener, Arc::new(tls));

    let registry = Arc::new(registry);
    let ready = Ready::default();
    serve_endpoints(
        &cfg,
        &ready,
        &registry,
        debug_routes(xds.clone(), debug_configs),
    )
    .await?;

    // Trust follows what the broker link installs.
    spawn_trust_follower(
        trust.clone(),
        cfg.state_dir.clone(),
        td.clone(),
        imports.clone(),
        ca.clone(),
        serving.clone(),
        stopped(),
    );

    tracing::info!(listen = %cfg.listen, cluster = %cfg.cluster, trust_domain = %td, "control plane serving discovery and certificates");
    ready.set(true);
    // On shutdown, the background tasks stop first: the snapshot channel
    // closes, which ends the proxies' discovery streams, so the server can
    // drain (bounded by DRAIN for connections that linger).
    let served = serve_discovery(&xds, &ca, incoming, shutdown, ready.clone(), &drain).await;
    ready.set(false);
    let _ = link_task.await;
    served
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use prometheus_client::registry::Registry;
    use strait_ca::testing::TestPki;

    use super::*;
    use crate::resources::Snapshot;
    use crate::xds::{Metrics, NackRecord, XdsServer};

    fn xds() -> XdsServer {
        let pki = TestPki::new("cluster.local");
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::empty(Instant::now())));
        XdsServer::new(
            rx,
            Trust::new(pki.bundle()),
            TrustDomain::new("cluster.local").unwrap(),
            Metrics::new(&mut Registry::default()),
        )
    }

    #[test]
    fn nacks_are_listed_by_node_as_json() {
        let mut nacks = BTreeMap::new();
        assert_eq!(nacks_json(&nacks), serde_json::json!({}));
        nacks.insert(
            "sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local".to_string(),
            NackRecord {
                type_url: "type.googleapis.com/strait.mesh.v1.Service".into(),
                nonce: "7".into(),
                version_info: String::new(),
                error: "echo.demo.svc.cluster.local: bad port".into(),
                at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_500),
            },
        );
        assert_eq!(
            nacks_json(&nacks),
            serde_json::json!({
                "sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local": {
                    "type_url": "type.googleapis.com/strait.mesh.v1.Service",
                    "nonce": "7",
                    "version_info": "",
                    "error": "echo.demo.svc.cluster.local: bad port",
                    "at_unix_seconds": 1.5,
                }
            })
        );
    }

    #[tokio::test]
    async fn the_debug_listener_routes() {
        use http_body_util::BodyExt;
        let xds = xds();
        let (_tx, rx) = watch::channel(Arc::new(Config::default()));
        let configs: debug::Configs = vec![("east".to_string(), rx)];
        let routes = debug_routes(xds, configs);
        let answer = |path: &str| routes(path);
        let body = |r: ::http::Response<http_body_util::Full<hyper::body::Bytes>>| async move {
            let b = r.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(b.to_vec()).unwrap()
        };
        let r = answer("/debug/nacks").unwrap().await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            r.headers()[::http::header::CONTENT_TYPE],
            "application/json"
        );
        let b = body(r).await;
        assert!(b.contains("{}"), "{b:?}");
        let r = answer("/debug/config").unwrap().await;
        assert_eq!(r.status().as_u16(), 200);
        let b = body(r).await;
        assert!(b.contains("\"east\""), "{b}");
        // Health is not on the debug listener (404 from the server).
        assert!(answer("/healthz/ready").is_none());
    }

    #[tokio::test]
    async fn the_debug_listener_binds_loopback_only_by_default() {
        assert!(DEFAULT_DEBUG_LISTEN.ip().is_loopback());
        assert_eq!(DebugListen::default(), DebugListen::Default);
        // Bound on loopback, or (port taken by another control plane on
        // this host) not at all: never elsewhere, never an error.
        if let Some(l) = DebugListen::Default.bind().await.unwrap() {
            assert_eq!(l.local_addr().unwrap(), DEFAULT_DEBUG_LISTEN);
        }
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let e = DebugListen::At(addr).bind().await.unwrap_err().to_string();
        assert!(e.contains(&addr.to_string()), "{e}");
        assert!(DebugListen::Off.bind().await.unwrap().is_none());
        assert_eq!(DebugListen::parse("off"), Ok(DebugListen::Off));
        assert_eq!(
            DebugListen::parse("127.0.0.2:9"),
            Ok(DebugListen::At("127.0.0.2:9".parse().unwrap()))
        );
        assert!(
            DebugListen::parse("localhost")
                .unwrap_err()
                .contains("\"localhost\"")
        );
    }

    #[test]
    fn debug_config_lists_rejections_and_whether_the_last_good_version_stays() {
        use crate::source::{Object, ObjectKey, Rejection};
        let key = ObjectKey {
            kind: "Service".into(),
            namespace: "demo".into(),
            name: "echo".into(),
        };
        let config = Config {
            objects: BTreeMap::from([(
                key.clone(),
                Object {
                    file: "/c/echo.yaml".into(),
                    value: serde_json::json!({}),
                },
            )]),
            rejections: vec![
                Rejection {
                    file: "/c/echo.yaml".into(),
                    object: Some(key),
                    reason: "invalid: spec.ports[0].port: Invalid value: 99999".into(),
                },
                Rejection {
                    file: "/c/big.yaml".into(),
                    object: None,
                    reason: "too large".into(),
                },
            ],
        };
        let j = debug::config_json(&config);
        assert_eq!(j["objects"].as_array().unwrap().len(), 1, "{j}");
        let rejected = j["rejected"].as_array().unwrap();
        assert_eq!(rejected[0]["name"], "echo", "{j}");
        assert_eq!(rejected[0]["last_good_in_force"], true, "{j}");
        assert_eq!(rejected[1]["file"], "/c/big.yaml", "{j}");
        assert_eq!(rejected[1]["last_good_in_force"], false, "{j}");
    }

    #[test]
    fn the_serving_certificate_is_the_control_planes_and_renews() {
        let pki = TestPki::new("cluster.local");
        let td = TrustDomain::new("cluster.local").unwrap();
        let cert = issue_serving(&pki.intermediate, &td).unwrap();
        let first = cert.chain();
        let trust = Trust::new(pki.bundle());
        let svid = trust
            .verify(&first, time::OffsetDateTime::now_utc())
            .unwrap();
        assert_eq!(
            svid.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/strait-system/sa/controlplane"
        );
        renew_serving(&cert, &pki.intermediate, &td).unwrap();
        assert_ne!(cert.chain()[0], first[0], "a new leaf");
        server_tls(Arc::new(cert), trust).unwrap();
    }
}
