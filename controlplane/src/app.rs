//! The control plane process: joins the mesh (first start), watches the
//! config directory, keeps the broker link up, rebuilds the discovery
//! snapshot when config, imports or trust change, and serves discovery
//! and workload certificates on one mTLS port.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::registry::Registry;
use strait_broker::agent::{FEDERATED_DIR, Imports};
use strait_broker::client::{BROKER_FILE, BrokerInfo, CACERTS_DIR};
use strait_broker::http::{self, Ready};
use strait_ca::TrustDomain;
use strait_ca::authority::Authority;
use strait_ca::tls::{Accept, SpiffeClientVerifier, Trust};
use tokio::sync::watch;

use crate::resources::{self, ClusterContext, NetworkInput, NetworkMode, Snapshot, TrustInput};
use crate::source::Config;
use crate::{dirwatch, link};

/// How the control plane is set up.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub cluster: String,
    pub network: String,
    pub config_dir: PathBuf,
    /// The joined cluster directory (`cacerts/`, `broker-client/`,
    /// `broker.json`, the token key).
    pub state_dir: PathBuf,
    /// A join token file, used when `state_dir` has not joined yet.
    pub join_token: Option<PathBuf>,
    /// Discovery and CSR (mTLS).
    pub listen: SocketAddr,
    pub health_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// This cluster's east-west gateway addresses, published with exports.
    pub gateways: Vec<String>,
    /// The local gateway's egress listener: other networks are reached
    /// through QUIC tunnels via it.
    pub quic_egress: Option<String>,
    /// Quiet time before a rebuilt snapshot is pushed.
    pub debounce: Duration,
}

/// Joins the mesh with the token file if `state_dir` has not joined yet;
/// checks that the joined identity is the one configured.
pub async fn ensure_joined(cfg: &AppConfig) -> Result<BrokerInfo, String> {
    if !cfg.state_dir.join(BROKER_FILE).exists() {
        let Some(token_file) = &cfg.join_token else {
            return Err(format!(
                "{} has not joined a mesh: pass --join-token FILE (from `straitctl cluster add {}`)",
                cfg.state_dir.display(),
                cfg.cluster
            ));
        };
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| format!("--join-token {}: {e}", token_file.display()))?;
        let joined = strait_broker::client::join(token.trim(), &cfg.state_dir)
            .await
            .map_err(|e| format!("joining with {}: {e}", token_file.display()))?;
        tracing::info!(
            cluster = %joined.info.cluster,
            trust_domain = %joined.info.trust_domain,
            "joined the mesh; the intermediate key was made here"
        );
    }
    let info = link::broker_info(&cfg.state_dir)?;
    if info.cluster != cfg.cluster || info.network != cfg.network {
        return Err(format!(
            "{} belongs to cluster {} on network {}, not {} on {}",
            cfg.state_dir.display(),
            info.cluster,
            info.network,
            cfg.cluster,
            cfg.network
        ));
    }
    Ok(info)
}

/// PEM certificates of a file, one string each.
fn pem_certs(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    pem::parse_many(text.as_bytes())
        .map(|v| {
            v.into_iter()
                .filter(|p| p.tag() == "CERTIFICATE")
                .map(|p| pem::encode(&p))
                .collect()
        })
        .unwrap_or_default()
}

/// The trust to publish: this mesh's roots (as the broker installed them),
/// peered meshes' bundles, and the deny-list.
pub fn read_trust(state_dir: &Path, imports: &Imports) -> TrustInput {
    let mut federated = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(state_dir.join(FEDERATED_DIR)) {
        for e in rd.flatten() {
            let path = e.path();
            if let Some(td) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
            {
                let certs = pem_certs(&path);
                if !certs.is_empty() {
                    federated.insert(td.to_string(), certs);
                }
            }
        }
    }
    TrustInput {
        local_roots_pem: pem_certs(&state_dir.join(CACERTS_DIR).join("root-cert.pem")),
        federated,
        denied_intermediates: imports.denied_intermediates.clone(),
    }
}

/// The other networks the imports name, with their gateways.
pub fn networks(own: &str, imports: &Imports, quic: bool) -> Vec<NetworkInput> {
    let mut by_name: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for remote in imports.services.values().flatten() {
        let net = remote.from.network.to_string();
        if net == own {
            continue;
        }
        let gws = by_name.entry(net).or_default();
        for g in &remote.from.gateways {
            gws.insert(g.to_string());
        }
    }
    by_name
        .into_iter()
        .map(|(name, gws)| {
            let gateways: Vec<String> = gws.into_iter().collect();
            NetworkInput {
                name,
                tunnels: if quic { gateways.clone() } else { Vec::new() },
                gateways,
                mode: if quic {
                    NetworkMode::Quic
                } else {
                    NetworkMode::Sni
                },
            }
        })
        .collect()
}

/// Modification times of the trust files, to notice the broker agent
/// installing a new bundle or intermediate.
pub fn trust_stamp(state_dir: &Path) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut files: Vec<PathBuf> = ["root-cert.pem", "ca-cert.pem", "cert-chain.pem"]
        .iter()
        .map(|f| state_dir.join(CACERTS_DIR).join(f))
        .collect();
    if let Ok(rd) = std::fs::read_dir(state_dir.join(FEDERATED_DIR)) {
        files.extend(rd.flatten().map(|e| e.path()));
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            (p, m)
        })
        .collect()
}

/// Keeps a snapshot channel current: rebuilds on config, imports and trust
/// changes (trust files are polled every second) and publishes a snapshot
/// only when it differs from the last one.
pub fn spawn_builder(
    ctx: ClusterContext,
    state_dir: PathBuf,
    quic: bool,
    mut config: watch::Receiver<Arc<Config>>,
    mut imports: watch::Receiver<Imports>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> watch::Receiver<Arc<Snapshot>> {
    let trust_dir = state_dir.clone();
    let build = move |config: &Config, imports: &Imports| {
        let trust = read_trust(&state_dir, imports);
        let nets = networks(&ctx.network, imports, quic);
        let (snap, warnings) = resources::build(&ctx, config, &trust, &nets);
        (snap.with_created(Instant::now()), warnings)
    };
    let (first, warnings) = build(&config.borrow_and_update(), &imports.borrow_and_update());
    for w in &warnings {
        tracing::warn!(warning = %w, "left out of discovery");
    }
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut last_warnings = warnings;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut stamp = trust_stamp(&trust_dir);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                r = config.changed() => if r.is_err() { return },
                r = imports.changed() => if r.is_err() { return },
                _ = tick.tick() => {
                    let now = trust_stamp(&trust_dir);
                    if now == stamp {
                        continue;
                    }
                    stamp = now;
                }
            }
            let (snap, warnings) = build(&config.borrow_and_update(), &imports.borrow_and_update());
            for w in &warnings {
                if !last_warnings.contains(w) {
                    tracing::warn!(warning = %w, "left out of discovery");
                }
            }
            last_warnings = warnings;
            tx.send_if_modified(|cur| {
                if **cur == snap {
                    false
                } else {
                    *cur = Arc::new(snap);
                    true
                }
            });
        }
    });
    rx
}

/// Loads the cluster's intermediate (the plug-in CA directory the broker
/// link keeps current).
pub fn load_authority(state_dir: &Path, td: &TrustDomain) -> Result<Authority, String> {
    let dir = state_dir.join(CACERTS_DIR);
    strait_ca::layout::load_plugin_ca(&dir, Some(td)).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Keeps `trust` (who may call the control plane) current with the roots,
/// peered bundles and deny-list the broker link installs.
fn refresh_trust(trust: &Trust, state_dir: &Path, td: &TrustDomain, imports: &Imports) {
    let root = state_dir.join(CACERTS_DIR).join("root-cert.pem");
    match strait_ca::layout::load_bundle(&root, Some(td.clone())) {
        Ok(b) => trust.set_bundle(b),
        Err(e) => tracing::warn!(error = %e, "trust bundle not reloaded"),
    }
    let mut fed = Vec::new();
    if let Ok(rd) = std::fs::read_dir(state_dir.join(FEDERATED_DIR)) {
        for e in rd.flatten() {
            let path = e.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
            else {
                continue;
            };
            if let Ok(ftd) = TrustDomain::new(name)
                && let Ok(b) = strait_ca::layout::load_bundle(&path, Some(ftd))
            {
                fed.push((name.to_string(), b));
            }
        }
    }
    trust.set_federated(fed);
    trust.set_denied(imports.denied_intermediates.iter().cloned());
}

/// Runs the control plane until `shutdown`.
pub async fn run(
    cfg: AppConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let info = ensure_joined(&cfg).await?;
    let td = TrustDomain::new(&info.trust_domain).map_err(|e| e.to_string())?;
    let config = dirwatch::watch_dir(cfg.config_dir.clone())
        .map_err(|e| format!("--config-dir {}: {e}", cfg.config_dir.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let (imports, link_task) = link::spawn(
        link::LinkConfig {
            state_dir: cfg.state_dir.clone(),
            config_dir: cfg.config_dir.clone(),
            gateways: cfg.gateways.clone(),
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
    };
    let snapshots = spawn_builder(
        ctx,
        cfg.state_dir.clone(),
        cfg.quic_egress.is_some(),
        config,
        imports.clone(),
        stopped(),
    );
    let snapshots = crate::xds::debounce(snapshots, cfg.debounce, cfg.debounce * 10);

    // Who may call: SVIDs of this mesh (and peered meshes' are refused by
    // the xDS server's trust-domain check); kept current as the broker
    // link installs bundles and deny-lists.
    let root = cfg.state_dir.join(CACERTS_DIR).join("root-cert.pem");
    let bundle =
        strait_ca::layout::load_bundle(&root, Some(td.clone())).map_err(|e| e.to_string())?;
    let trust = Trust::new(bundle);
    refresh_trust(&trust, &cfg.state_dir, &td, &imports.borrow());
    let authority = load_authority(&cfg.state_dir, &td)?;
    let (chain, key) =
        crate::ca::serving_identity(&authority, &td, Duration::from_secs(7 * 24 * 3600))
            .map_err(|e| format!("serving certificate: {e}"))?;

    let mut registry = Registry::default();
    let xds = crate::xds::XdsServer::new(
        snapshots,
        trust.clone(),
        td.clone(),
        crate::xds::Metrics::new(&mut registry),
    );
    let tokens =
        crate::ca::TokenIssuer::load_or_create(&cfg.state_dir.join(crate::ca::TOKEN_KEY_FILE))
            .map_err(|e| e.to_string())?;
    let ca = crate::ca::WorkloadCa::new(
        authority,
        trust.clone(),
        Some(tokens),
        crate::ca::TtlPolicy::default(),
        &mut registry,
    )
    .map_err(|e| e.to_string())?;

    // The serving certificate (re-issued, with the whole TLS config, when
    // the intermediate changes) and client certificates optional at the
    // TLS layer: a proxy's first CSR comes with a token instead.
    let verifier = SpiffeClientVerifier::new(trust.clone(), Accept::Any, false);
    let tls = strait_ca::tls::server_config(&chain, &key, verifier, &[b"h2"])
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let incoming = strait_broker::transport::tls_incoming(listener, Arc::new(tls));

    let registry = Arc::new(registry);
    let ready = Ready::default();
    if let Some(addr) = cfg.health_listen {
        let l = http::bind(addr, "health").await?;
        tokio::spawn(http::serve(l, ready.clone(), None));
    }
    if let Some(addr) = cfg.metrics_listen {
        let l = http::bind(addr, "metrics").await?;
        tokio::spawn(http::serve(l, ready.clone(), Some(registry.clone())));
    }

    // Trust follows what the broker link installs.
    {
        let trust = trust.clone();
        let state_dir = cfg.state_dir.clone();
        let td = td.clone();
        let mut imports = imports.clone();
        let ca = ca.clone();
        let stop = stopped();
        tokio::spawn(async move {
            tokio::pin!(stop);
            let mut stamp = trust_stamp(&state_dir);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    r = imports.changed() => if r.is_err() { return },
                    _ = tick.tick() => {
                        let now = trust_stamp(&state_dir);
                        if now == stamp {
                            continue;
                        }
                        stamp = now;
                        match load_authority(&state_dir, &td) {
                            Ok(a) => {
                                tracing::info!("the cluster intermediate changed; signing with the new one");
                                if let Err(e) = ca.set_authority(a) {
                                    tracing::error!(error = %e, "new intermediate refused");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "intermediate not reloaded"),
                        }
                    }
                }
                refresh_trust(&trust, &state_dir, &td, &imports.borrow_and_update());
            }
        });
    }

    tracing::info!(listen = %cfg.listen, cluster = %cfg.cluster, trust_domain = %td, "control plane serving discovery and certificates");
    ready.set(true);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(xds.service())
        .add_service(ca.service())
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutting down");
        })
        .await;
    ready.set(false);
    let _ = stop_tx.send(true);
    let _ = link_task.await;
    server.map_err(|e| format!("discovery server: {e}"))
}
