//! `strait gateway`: the east-west gateway (SNI passthrough).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use prometheus_client::registry::Registry;
use strait_gateway::passthrough::{self, Config, Metrics};
use strait_gateway::route::{RouteTable, RoutesFile};
use strait_runtime::http::{self, Ready};

use super::parse_duration;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum AlpnCheck {
    /// Require one of Istio's ALPN values (istio, istio-peer-exchange,
    /// istio-http/1.0, istio-http/1.1, istio-h2), as Istio sidecars send.
    Istio,
    /// Accept any ALPN (or none).
    Off,
}

/// Run the east-west gateway: TLS passthrough routed by Istio's SNI
/// (`outbound_.<port>_.<subset>_.<host>`) to the local endpoints of
/// exported services. The gateway never terminates TLS: the client's mTLS
/// session reaches the workload.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  strait gateway --cluster east --network net-east --listen 0.0.0.0:15443 \\
      --control-plane 10.0.0.5:15012 --token /var/run/secrets/tokens/istio-token \\
      --root-cert /etc/strait/root-cert.pem \\
      --health-listen 0.0.0.0:15021 --metrics-listen 0.0.0.0:15090
  # a certificate kept current by something else, re-read when it changes
  strait gateway --cluster east --network net-east --control-plane 10.0.0.5:15012 \\
      --identity /etc/strait/gateway
  strait gateway --cluster east --network net-east --listen 0.0.0.0:15443 \\
      --routes /etc/strait/routes.yaml --health-listen 0.0.0.0:15021 --metrics-listen 0.0.0.0:15090
  # primary-remote: the primary's gateway also exposes its control plane on 15012
  strait gateway --cluster primary --network net-primary --control-plane 10.0.0.5:15012 \\
      --token gateway.token --root-cert root-cert.pem --expose-control-plane 10.0.0.5:15012

routes.yaml:
  services:
  - host: reviews.bookinfo.svc.cluster.local
    ports: [9080]
    subsets: {v1: {version: v1}}
    endpoints:
    - {address: 10.1.0.11, labels: {version: v1}}
    - {address: 10.1.0.12, labels: {version: v2}, healthy: false}")]
// Where the routing table comes from: one of the two is required.
#[command(group(clap::ArgGroup::new("routing").args(["routes", "control_plane"]).required(true)))]
pub struct GatewayArgs {
    /// This cluster's name (for logs and metrics).
    #[arg(long, value_name = "NAME")]
    cluster: strait_ca::ClusterName,
    /// This cluster's network.
    #[arg(long, value_name = "NET")]
    network: String,
    /// The passthrough listener.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15443")]
    listen: SocketAddr,
    /// Routing table of exported services (YAML or JSON); re-read when it
    /// changes. For a gateway without a control plane.
    #[arg(long, value_name = "FILE")]
    routes: Option<PathBuf>,
    /// The cluster's control plane (`host:port`, its discovery port 15012):
    /// the routing table comes from it, over mTLS with the gateway's
    /// certificate (--token or --identity).
    #[arg(long, value_name = "ADDR")]
    control_plane: Option<String>,
    /// The gateway gets its certificate from the control plane's CSR API
    /// with this token: a file holding a bootstrap token (`strait
    /// controlplane token --namespace strait-system --service-account
    /// eastwest-gateway`) or, in Kubernetes, the pod's projected service
    /// account token (audience istio-ca), read again whenever it is needed.
    /// The key is made here; the certificate is renewed at about half life,
    /// and the trust follows the bundles the control plane pushes (root
    /// rotations, peered meshes).
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["control_plane", "root_cert"],
        conflicts_with_all = ["identity", "federated"]
    )]
    token: Option<PathBuf>,
    /// The mesh root certificate(s), to verify the control plane (--token).
    #[arg(long, value_name = "FILE", requires = "token")]
    root_cert: Option<PathBuf>,
    /// Certificate lifetime to ask for (--token).
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    cert_ttl: Duration,
    /// Which ALPN values a connection must offer.
    #[arg(long, value_enum, default_value = "istio")]
    alpn_check: AlpnCheck,
    /// Deadline for the whole ClientHello.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    hello_timeout: Duration,
    /// Close a spliced connection after this long without traffic.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    idle_timeout: Duration,
    /// On SIGTERM, let live connections finish for up to this long.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    drain: Duration,
    /// Health endpoint (/healthz/ready: ready once the routing table loaded).
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// Prometheus metrics endpoint (/metrics, strait_gateway_*).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// The egress listener local sidecars hand connections for other
    /// networks to; they travel over QUIC tunnels (needs --token or
    /// --identity).
    #[arg(long, value_name = "ADDR")]
    egress_listen: Option<SocketAddr>,
    /// The gateway's identity as files someone else keeps current
    /// (cert-chain.pem, key.pem, root-cert.pem; SPIFFE ID
    /// spiffe://<td>/ns/strait-system/sa/eastwest-gateway), re-read when
    /// they change. With an identity (this or --token), the gateway also
    /// accepts QUIC tunnels on the --listen address (UDP).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Bundles of peered meshes for tunnels (`<trust-domain>.pem` each, as a
    /// joined cluster's `federated/` directory holds them): their gateways
    /// may open tunnels to this one and be tunnelled to, each verified
    /// against its own trust domain's bundle only.
    #[arg(long, value_name = "DIR")]
    federated: Option<PathBuf>,
    /// Expose this cluster's control plane (`host:port`) to the proxies of
    /// remote clusters (primary-remote), as TLS passthrough on
    /// --expose-listen for the server name controlplane.strait-system.svc.
    #[arg(long, value_name = "ADDR")]
    expose_control_plane: Option<String>,
    /// The listener of the exposed control plane.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15012")]
    expose_listen: SocketAddr,
    /// Data-plane worker threads (default: one per CPU). With 1, everything
    /// runs on one thread with tokio's current-thread scheduler.
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
}

fn load(path: &Path) -> Result<RouteTable> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let file: RoutesFile = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).with_context(|| path.display().to_string())?
    } else {
        serde_saphyr::from_str(&text).with_context(|| path.display().to_string())?
    };
    RouteTable::new(file).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The east-west gateway identity of trust domain `td`.
fn gateway_id(td: &strait_ca::TrustDomain) -> Result<strait_ca::SpiffeId> {
    Ok(strait_ca::SpiffeId::from_segments(
        td,
        &["ns", "strait-system", "sa", "eastwest-gateway"],
    )?)
}

/// The QUIC server and client configs of the gateway's tunnels: mutual TLS
/// with `chain` and `key`, towards the east-west gateways of every trust
/// domain `trust` holds (each verified against its own bundle only).
fn tunnel_configs(
    chain: &[Vec<u8>],
    key: &[u8],
    trust: &strait_ca::tls::Trust,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    use strait_ca::tls::{Accept, SpiffeClientVerifier, SpiffeServerVerifier};
    let leaf = chain
        .first()
        .ok_or_else(|| anyhow::anyhow!("no certificate"))
        .and_then(|der| strait_ca::cert::CertSummary::from_der(der).map_err(anyhow::Error::msg))?;
    let id = leaf
        .spiffe_id
        .as_deref()
        .and_then(|i| strait_ca::SpiffeId::parse(i).ok())
        .ok_or_else(|| anyhow::anyhow!("the certificate has no SPIFFE ID"))?;
    let own = gateway_id(&id.trust_domain())?;
    if id != own {
        tracing::warn!(%id, expected = %own, "the gateway identity is not the east-west gateway's");
    }
    let mut gateways: std::collections::BTreeSet<strait_ca::SpiffeId> = [own].into();
    for td in trust.trust_domains() {
        gateways.insert(gateway_id(&strait_ca::TrustDomain::new(&td)?)?);
    }
    let peers = Accept::Ids(gateways);
    let server = strait_ca::tls::server_config(
        chain,
        key,
        SpiffeClientVerifier::new(trust.clone(), peers.clone(), true),
        &[],
    )?;
    let client = strait_ca::tls::client_config(
        SpiffeServerVerifier::new(trust.clone(), peers),
        Some((chain, key)),
        &[],
    )?;
    Ok((
        strait_gateway::tunnel::server_config(server).map_err(anyhow::Error::msg)?,
        strait_gateway::tunnel::client_config(client).map_err(anyhow::Error::msg)?,
    ))
}

/// Where the gateway's certificate comes from.
enum Creds {
    /// `--identity DIR` (and `--federated DIR`): files kept current by
    /// someone else, read again when they change; `trust` follows their
    /// bundles.
    Dir {
        dir: PathBuf,
        federated: Option<PathBuf>,
        trust: strait_ca::tls::Trust,
    },
    /// `--token FILE`: a key made here and certificates from the control
    /// plane's CSR API, renewed by the manager's task; `trust` follows the
    /// bundles the control plane pushes, and `bundles` ticks when they
    /// change (the tunnels' accepted peers are rebuilt then).
    Csr {
        manager: strait_proxy_client::identity::IdentityManager,
        trust: strait_ca::tls::Trust,
        td: strait_ca::TrustDomain,
        bundles: tokio::sync::watch::Sender<Vec<strait_proto::strait::mesh::v1::TrustBundle>>,
    },
}

impl Creds {
    /// The tunnels' configs with the current certificate and trust.
    fn tunnel_configs(&self) -> Result<(quinn::ServerConfig, quinn::ClientConfig)> {
        match self {
            Creds::Dir {
                dir,
                federated,
                trust,
            } => {
                let (chain, key, bundle) = strait_broker_client::client::read_credentials(dir)
                    .with_context(|| format!("--identity {}", dir.display()))?;
                let federated = match federated {
                    Some(fdir) => read_federated(fdir)?,
                    None => Vec::new(),
                };
                // Checked with a trust of its own first: a bad new set of
                // files changes nothing.
                let fresh = strait_ca::tls::Trust::new(bundle.clone());
                fresh.set_federated(federated.clone());
                tunnel_configs(&chain, &key, &fresh)
                    .with_context(|| format!("--identity {}", dir.display()))?;
                // The shared trust (live tunnels are checked against it).
                trust.set_bundle(bundle);
                trust.set_federated(federated);
                tunnel_configs(&chain, &key, trust)
                    .with_context(|| format!("--identity {}", dir.display()))
            }
            Creds::Csr { manager, trust, .. } => {
                let id = manager
                    .current()
                    .ok_or_else(|| anyhow::anyhow!("no gateway certificate (yet)"))?;
                tunnel_configs(&id.chain_der, &id.key_pkcs8, trust)
            }
        }
    }
}

/// The `<trust-domain>.pem` bundles of a federated directory.
fn read_federated(dir: &Path) -> Result<Vec<(String, strait_ca::TrustBundle)>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("--federated {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(td) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pem"))
        else {
            continue;
        };
        let td = strait_ca::TrustDomain::new(td)
            .with_context(|| format!("{}: the file name must be a trust domain", path.display()))?;
        let bundle = strait_ca::layout::load_bundle(&path, Some(td.clone()))?;
        out.push((td.to_string(), bundle));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Modification times of a federated directory's bundles (for reloads).
fn federated_stamp(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .map(|p| {
                    let m = mtime(&p);
                    (p, m)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The routing table from the control plane's resources; the errors name
/// the resources refused.
fn table_from(
    res: &strait_proxy_client::xds::Resources,
) -> Result<RouteTable, Vec<(String, String)>> {
    use strait_proto::strait::mesh::v1::{self as pb, type_url};
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
    RouteTable::new(file).map_err(|e| vec![("GatewayRoute".to_string(), e)])
}

/// Subscribes to the control plane; the table channel follows every
/// accepted update, `ready` turns true at the first full set. With a
/// certificate from the CSR API, the pushed trust bundles are followed too.
fn subscribe(
    args: &GatewayArgs,
    address: &str,
    creds: &Arc<Creds>,
    table_tx: tokio::sync::watch::Sender<Arc<RouteTable>>,
    ready: Ready,
) -> Result<strait_proxy_client::xds::XdsClient> {
    use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust};
    use strait_proto::strait::mesh::v1::{self as pb, type_url};
    let mut types = vec![
        type_url::NETWORK,
        type_url::SERVICE,
        type_url::GATEWAY_ROUTE,
    ];
    let tls = match &**creds {
        Creds::Dir { dir, .. } => {
            let (chain, key, bundle) = strait_broker_client::client::read_credentials(dir)
                .with_context(|| format!("--identity {}", dir.display()))?;
            // The trust domain is the gateway's own (its certificate's).
            let td = strait_ca::cert::CertSummary::from_der(&chain[0])
                .ok()
                .and_then(|c| c.spiffe_id)
                .and_then(|i| strait_ca::SpiffeId::parse(&i).ok())
                .map(|i| i.trust_domain())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--identity {}: the certificate has no SPIFFE ID",
                        dir.display()
                    )
                })?;
            let verifier = SpiffeServerVerifier::new(
                Trust::new(bundle),
                Accept::Ids([strait_ca::control_plane_id(&td)].into()),
            );
            // Checked once now (a bad identity fails at start); then read
            // again at every (re)connect, so that a rotated identity is used.
            strait_ca::tls::client_config(verifier, Some((&chain, &key)), &[b"h2"])?;
            let dir = dir.clone();
            let cp_id = strait_ca::control_plane_id(&td);
            strait_proxy_client::xds::ClientTls::dynamic(move || {
                let (chain, key, bundle) = strait_broker_client::client::read_credentials(&dir)
                    .map_err(|e| format!("--identity {}: {e}", dir.display()))?;
                let verifier = SpiffeServerVerifier::new(
                    Trust::new(bundle),
                    Accept::Ids([cp_id.clone()].into()),
                );
                strait_ca::tls::client_config(verifier, Some((&chain, &key)), &[b"h2"])
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
        }
        Creds::Csr {
            manager, trust, td, ..
        } => {
            types.push(type_url::TRUST_BUNDLE);
            // Every (re)connect takes the current certificate and trust.
            let identity = manager.subscribe();
            let trust = trust.clone();
            let cp_id = strait_ca::control_plane_id(td);
            strait_proxy_client::xds::ClientTls::dynamic(move || {
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
                .map_err(|e| e.to_string())
            })
        }
    };
    let cfg = strait_proxy_client::xds::XdsClientConfig {
        address: address.to_string(),
        tls,
        node_id: format!(
            "gateway~{}~eastwest-gateway.strait-system~strait-system.svc.cluster.local",
            args.listen.ip()
        ),
        cluster: args.cluster.to_string(),
        network: args.network.clone(),
        types,
    };
    let validator: strait_proxy_client::xds::Validator =
        Arc::new(|res| table_from(res).map(|_| ()));
    let client = strait_proxy_client::xds::spawn(cfg, validator);
    let mut resources = client.resources();
    let mut state = client.state();
    let creds = creds.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = resources.changed() => {
                    if r.is_err() { return; }
                    let res = resources.borrow_and_update().clone();
                    if let Creds::Csr { trust, bundles, .. } = &*creds {
                        match res.decode::<pb::TrustBundle>(type_url::TRUST_BUNDLE) {
                            Ok(b) => {
                                let b: Vec<_> = b.into_values().collect();
                                strait_sidecar::config::apply_trust(trust, &b);
                                bundles.send_if_modified(|old| {
                                    let changed = *old != b;
                                    *old = b;
                                    changed
                                });
                            }
                            Err((name, e)) => tracing::error!(resource = %name, error = %e, "trust bundles refused; keeping the last good ones"),
                        }
                    }
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
                        ready.set(true);
                    }
                }
            }
        }
    });
    Ok(client)
}

/// Reloads the routing table when the file changes; the last good one
/// stays when the new one is bad.
fn spawn_file_reload(routes: PathBuf, table_tx: tokio::sync::watch::Sender<Arc<RouteTable>>) {
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
            match load(&routes) {
                Ok(t) => {
                    tracing::info!(services = t.len(), "routing table reloaded");
                    table_tx.send_replace(Arc::new(t));
                }
                Err(e) => {
                    tracing::error!(error = %super::describe(&e), "routing table refused; keeping the last good one")
                }
            }
        }
    });
}

/// `--token`: the CSR client for the gateway's identity, with the trust of
/// `--root-cert` (followed by pushed bundles afterwards).
fn csr_creds(args: &GatewayArgs, token_file: &Path) -> Result<Creds> {
    let root_cert = args
        .root_cert
        .as_deref()
        .ok_or_else(|| super::UsageError("--token needs --root-cert".into()))?;
    let control_plane = args
        .control_plane
        .clone()
        .ok_or_else(|| super::UsageError("--token needs --control-plane".into()))?;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("--token {}", token_file.display()))?;
    let (td, bundle) = super::load_root_cert(root_cert)?;
    let trust = strait_ca::tls::Trust::new(bundle);
    let config = strait_proxy_client::identity::IdentityConfig {
        ttl: Some(args.cert_ttl),
        token_file: Some(token_file.to_path_buf()),
        ..strait_proxy_client::identity::IdentityConfig::new(
            &control_plane,
            gateway_id(&td)?,
            trust.clone(),
            Some(token.trim().to_string()),
        )
    };
    Ok(Creds::Csr {
        manager: strait_proxy_client::identity::IdentityManager::spawn(config),
        trust,
        td,
        bundles: tokio::sync::watch::Sender::new(Vec::new()),
    })
}

/// Keeps the tunnels' TLS current: rebuilt when the identity files change
/// (`--identity`), or when the CSR client renews the certificate or the
/// pushed bundles change (`--token`). New tunnels use it; live ones keep
/// theirs. A bad new identity is refused and the last good one kept.
fn spawn_tunnel_reload(
    creds: Arc<Creds>,
    endpoint: quinn::Endpoint,
    pool: Arc<strait_gateway::tunnel::Pool>,
) {
    tokio::spawn(async move {
        let apply = |why: &str| match creds.tunnel_configs() {
            Ok((server, client)) => {
                endpoint.set_server_config(Some(server));
                pool.set_client_config(client);
                tracing::info!(why, "gateway identity reloaded");
            }
            Err(e) => tracing::warn!(
                error = %super::describe(&e),
                "gateway identity not reloaded; keeping the last good one"
            ),
        };
        match &*creds {
            Creds::Dir { dir, federated, .. } => {
                let stamp = |d: &Path, f: Option<&Path>| {
                    (
                        ["cert-chain.pem", "key.pem", "root-cert.pem"].map(|x| mtime(&d.join(x))),
                        f.map(federated_stamp),
                    )
                };
                let mut last = stamp(dir, federated.as_deref());
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let now = stamp(dir, federated.as_deref());
                    if now != last {
                        last = now;
                        apply("files changed");
                    }
                }
            }
            Creds::Csr {
                manager, bundles, ..
            } => {
                let mut identity = manager.subscribe();
                let mut bundles = bundles.subscribe();
                identity.borrow_and_update();
                bundles.borrow_and_update();
                loop {
                    tokio::select! {
                        r = identity.changed() => {
                            if r.is_err() { return; }
                            if identity.borrow_and_update().is_some() {
                                apply("certificate renewed");
                            }
                        }
                        r = bundles.changed() => {
                            if r.is_err() { return; }
                            bundles.borrow_and_update();
                            apply("trust bundles changed");
                        }
                    }
                }
            }
        }
    });
}

pub fn run(args: GatewayArgs) -> Result<()> {
    let table = match &args.routes {
        Some(path) => {
            let t = load(path)?;
            tracing::info!(cluster = %args.cluster, network = %args.network, services = t.len(), "routing table loaded");
            t
        }
        None => RouteTable::default(),
    };
    if args.worker_threads == Some(0) {
        return Err(super::UsageError("--worker-threads must be at least 1".into()).into());
    }
    // One worker: a current-thread runtime (see `strait_runtime::rt::build`).
    let runtime = strait_runtime::rt::build(args.worker_threads)?;
    runtime.block_on(async move {
        let (table_tx, table_rx) = tokio::sync::watch::channel(Arc::new(table));
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let expose_metrics = strait_gateway::expose::ExposeMetrics::new(&mut registry);
        let registry = Arc::new(registry);
        let ready = Ready::default();
        super::announce_when_ready(
            ready.clone(),
            "gateway",
            vec![
                ("passthrough", Some(args.listen.to_string())),
                ("egress (QUIC tunnels)", args.egress_listen.map(|a| a.to_string())),
                ("health", args.health_listen.map(|a| a.to_string())),
                ("metrics", args.metrics_listen.map(|a| a.to_string())),
                ("control plane exposed on", args.expose_control_plane.as_ref().map(|_| args.expose_listen.to_string())),
            ],
        );
        if let Some(addr) = args.health_listen {
            let l = strait_runtime::accept::bind(addr, "health")
                .await?;
            tokio::spawn(http::serve(l, ready.clone(), None));
        }
        if let Some(addr) = args.metrics_listen {
            let l = strait_runtime::accept::bind(addr, "metrics")
                .await?;
            tokio::spawn(http::serve(l, ready.clone(), Some(registry.clone())));
        }
        let listener = strait_runtime::accept::bind(args.listen, "passthrough")
            .await?;
        let config = Config {
            hello_timeout: args.hello_timeout,
            idle_timeout: args.idle_timeout,
            require_istio_alpn: args.alpn_check == AlpnCheck::Istio,
            ..Config::default()
        };
        let creds = match (&args.token, &args.identity) {
            (Some(token), _) => {
                let creds = csr_creds(&args, token)?;
                let mut identity = match &creds {
                    Creds::Csr { manager, .. } => manager.subscribe(),
                    Creds::Dir { .. } => unreachable!("csr_creds makes CSR credentials"),
                };
                tracing::info!(control_plane = args.control_plane.as_deref().unwrap_or_default(), "asking the control plane for the gateway certificate");
                tokio::select! {
                    r = identity.wait_for(Option::is_some) => {
                        r.map_err(|_| anyhow::anyhow!("the certificate task stopped"))?;
                    }
                    () = super::broker::shutdown_signal() => {
                        tracing::info!("stopped before the first certificate");
                        return Ok(());
                    }
                }
                Some(Arc::new(creds))
            }
            (None, Some(dir)) => Some(Arc::new(Creds::Dir {
                dir: dir.clone(),
                federated: args.federated.clone(),
                trust: strait_ca::tls::Trust::default(),
            })),
            (None, None) => None,
        };
        if let Some(creds) = &creds {
            let (server, client) = creds.tunnel_configs()?;
            let endpoint = quinn::Endpoint::server(server, args.listen)
                .with_context(|| format!("cannot listen on {} (UDP, tunnels)", args.listen))?;
            let trust = match &**creds {
                Creds::Dir { trust, .. } | Creds::Csr { trust, .. } => trust.clone(),
            };
            let pool = Arc::new(strait_gateway::tunnel::Pool::new(
                endpoint.clone(),
                client,
                trust.clone(),
                metrics.clone(),
            ));
            // A renewed identity applies to new tunnels; live ones keep theirs.
            spawn_tunnel_reload(creds.clone(), endpoint.clone(), pool.clone());
            tokio::spawn(strait_gateway::tunnel::serve(
                endpoint.clone(),
                table_rx.clone(),
                config.clone(),
                metrics.clone(),
                trust,
            ));
            tracing::info!(listen = %args.listen, "QUIC tunnels accepted (UDP)");
            if let Some(addr) = args.egress_listen {
                let l = strait_runtime::accept::bind(addr, "egress")
                    .await?;
                tokio::spawn(strait_gateway::tunnel::serve_egress(
                    l,
                    table_rx.clone(),
                    pool,
                    config.clone(),
                    metrics.clone(),
                ));
                tracing::info!(listen = %addr, "egress listener serving");
            }
        } else if args.egress_listen.is_some() {
            return Err(super::UsageError(
                "--egress-listen needs --token or --identity: tunnels are mutual TLS between gateways"
                    .into(),
            )
            .into());
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some(upstream) = &args.expose_control_plane {
            let l = strait_runtime::accept::bind(args.expose_listen, "exposed control plane")
                .await?;
            tokio::spawn(strait_gateway::expose::serve(
                l,
                strait_gateway::expose::ExposeConfig {
                    upstream: upstream.clone(),
                    hello_timeout: args.hello_timeout,
                    connect_timeout: Duration::from_secs(5),
                    idle_timeout: args.idle_timeout,
                },
                expose_metrics,
                stop_rx.clone(),
            ));
            tracing::info!(listen = %args.expose_listen, control_plane = %upstream, "control plane exposed to remote clusters");
        }
        let server = tokio::spawn(passthrough::serve(
            listener,
            table_rx,
            config,
            metrics.clone(),
            stop_rx,
        ));
        tracing::info!(listen = %args.listen, "gateway serving");

        // The routing table: from the control plane (ready at its first
        // full set), or from the file (reloaded when it changes; the last
        // good one stays when the new one is bad).
        let _subscription = match (&args.control_plane, args.routes.clone()) {
            (Some(cp), _) => {
                let creds = creds.as_ref().ok_or_else(|| {
                    super::UsageError(
                        "--control-plane needs the gateway's certificate: --token FILE --root-cert FILE, or --identity DIR"
                            .into(),
                    )
                })?;
                Some(subscribe(&args, cp, creds, table_tx, ready.clone())?)
            }
            (None, Some(routes)) => {
                ready.set(true);
                spawn_file_reload(routes, table_tx);
                None
            }
            (None, None) => {
                return Err(
                    super::UsageError("pass --routes FILE or --control-plane ADDR".into()).into(),
                );
            }
        };

        super::broker::shutdown_signal().await;
        tracing::info!("draining: no new connections");
        ready.set(false);
        let _ = stop_tx.send(true);
        let _ = server.await;
        let deadline = tokio::time::Instant::now() + args.drain;
        while metrics.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(left = metrics.active(), "gateway stopped");
        Ok(())
    })
}
