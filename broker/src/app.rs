//! Wiring of a broker process: data directory, root, store, identities,
//! listeners, graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use strait_runtime::tls::ServingCert;

use prometheus_client::registry::Registry;
use strait_ca::authority::{self, Authority, KeyAlgorithm, RootOptions};
use strait_ca::bundle::BundleError;
use strait_ca::csr::CsrError;
use strait_ca::layout;
use strait_ca::spiffe::SpiffeIdError;
use strait_ca::tls::{Accept, Revocation, SpiffeClientVerifier};
use strait_ca::{AnyIdentityInTrustDomain, Csr, IssueError, SpiffeId, TrustDomain};
use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;

use crate::client::ClientError;
use crate::metrics::Metrics;
use crate::server::{AdminService, FederationService};
use crate::state::BrokerState;
use crate::store::RedbStore;
use strait_runtime::http::{self, Ready};
use strait_runtime::{accept, transport};

/// The file name of the embedded store inside the data directory.
pub const STORE_FILE: &str = "broker.redb";
/// Admin credentials inside the data directory.
pub const ADMIN_DIR: &str = "admin";
/// The broker's root inside the data directory (when `--root` is not given).
pub const ROOT_DIR: &str = "root";
/// How long admin credentials are valid; re-issued at start when less than
/// a week remains.
pub const ADMIN_TTL: Duration = Duration::from_secs(90 * 86400);
const ADMIN_RENEW_BEFORE: Duration = Duration::from_secs(7 * 86400);
/// Lifetime of the broker's own serving certificate (its key lives only in
/// memory and is made anew at every start).
const SERVER_CERT_TTL: Duration = Duration::from_secs(30 * 86400);

/// Everything `strait broker` is configured with, validated as a whole.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: TrustDomain,
    pub root_dir: Option<PathBuf>,
    pub health_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// Addresses clusters reach the broker at (put into join tokens);
    /// default: the listen address.
    pub advertise: Vec<String>,
    pub intermediate_validity: Duration,
    /// The peer API for federated meshes (none: this mesh does not peer).
    pub peer_listen: Option<SocketAddr>,
    /// Addresses peers reach the peer API at (default: the peer listen address).
    pub peer_advertise: Vec<String>,
    /// This mesh's name for its peers (`mesh:<name>` in export-to);
    /// default: the trust domain.
    pub mesh_name: Option<String>,
    /// How long a cluster may be without a sync stream before its exports
    /// are withdrawn from importers (`None`: never); see [`crate::liveness`].
    pub cluster_grace: Option<Duration>,
    /// Bind identities to clusters: a leaf issued by cluster X's
    /// intermediate is accepted mesh-wide only if X runs that identity
    /// (see `strait_ca::tls::ClusterIdentities`).
    pub bind_identities: bool,
    /// Where the state is kept.
    pub store: StoreSpec,
    /// With etcd: this replica's name among the mesh's brokers (default:
    /// the host name).
    pub replica: Option<String>,
    /// With etcd: where clusters and admins reach this replica (default:
    /// the listen address).
    pub replica_address: Option<String>,
    /// With etcd: the leader's lease; a dead leader is replaced within it.
    pub lease_ttl: Duration,
}

/// The broker's store: the embedded redb file in the data directory, or
/// etcd (feature `etcd`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreSpec {
    #[default]
    Redb,
    #[cfg(feature = "etcd")]
    Etcd(crate::store::etcd::EtcdConfig),
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("root in {dir} is for trust domain {found}, not {expected}")]
    RootTrustDomain {
        dir: PathBuf,
        found: TrustDomain,
        expected: TrustDomain,
    },
    /// Making a key, a CSR or a certificate for the broker's own identities.
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Identity(#[from] SpiffeIdError),
    #[error(transparent)]
    BrokerId(#[from] ClientError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error("the address {what} listens on: {source}")]
    LocalAddr {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bind(#[from] accept::BindError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("serving: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// Replicas must sign with one root; each making its own would split
    /// the mesh.
    #[error(
        "--store {0}: give every replica the same --root DIR (made once with `strait ca init-root`, \
         or the root-cert.pem/root-key.pem of an existing broker); a replica does not make a \
         root of its own"
    )]
    HaRoot(String),
    #[error("joining the broker replicas in etcd: {0}")]
    Replication(String),
}

/// The root this broker signs with: `--root DIR`, or `DATA/root` (created
/// on first start).
fn load_or_create_root(config: &BrokerConfig) -> Result<(Authority, PathBuf), AppError> {
    let (dir, create) = match &config.root_dir {
        Some(d) => (d.clone(), false),
        None => (config.data_dir.join(ROOT_DIR), true),
    };
    if create && !dir.join(layout::ROOT_KEY).exists() {
        let root = Authority::create_root(
            &RootOptions {
                trust_domain: config.trust_domain.clone(),
                common_name: None,
                validity: authority::DEFAULT_ROOT_VALIDITY,
                key_algorithm: KeyAlgorithm::EcdsaP256,
            },
            OffsetDateTime::now_utc(),
        )?;
        layout::write_root(&dir, &root, false)?;
        tracing::info!(dir = %dir.display(), "created the mesh root");
    }
    let root = layout::load_root(&dir, Some(&config.trust_domain))?;
    if root.trust_domain() != &config.trust_domain {
        return Err(AppError::RootTrustDomain {
            dir,
            found: root.trust_domain().clone(),
            expected: config.trust_domain.clone(),
        });
    }
    Ok((root, dir))
}

/// A certificate chain, its key as PKCS#8 DER, and the key as PEM.
type Credentials = (Vec<Vec<u8>>, Vec<u8>, String);

/// A leaf issued straight from the root, key made here.
fn issue_from_root(
    root: &Authority,
    id: &SpiffeId,
    dns: &[String],
    ttl: Duration,
) -> Result<Credentials, AppError> {
    let key = authority::generate_key(KeyAlgorithm::EcdsaP256)?;
    let csr = Csr::from_pem(authority::leaf_csr(id, dns, &key)?.as_bytes())?;
    let leaf = root.issue_leaf(
        &csr,
        ttl,
        &AnyIdentityInTrustDomain,
        OffsetDateTime::now_utc(),
    )?;
    Ok((
        vec![leaf.der, root.root_der().to_vec()],
        key.serialize_der(),
        key.serialize_pem(),
    ))
}

/// Keeps `DATA/admin/` (cert-chain.pem, key.pem, root-cert.pem) usable:
/// re-issues the certificate when it does not chain to the signing root
/// `root` or nears expiry, and rewrites root-cert.pem when the bundle
/// changed. Following the signing root, not merely the bundle, moves the
/// certificate at a rotation's `advance`, while the old root is still
/// trusted; kept until `finish` dropped the old root, straitctl's next
/// call could present it before this ran again, and be refused. The admin
/// key is kept across re-issues, so that a reader never sees a certificate
/// and a key that do not belong together.
fn ensure_admin_credentials(
    data_dir: &Path,
    root: &Authority,
    bundle: &strait_ca::TrustBundle,
) -> Result<PathBuf, AppError> {
    let dir = data_dir.join(ADMIN_DIR);
    let now = OffsetDateTime::now_utc();
    let signing = strait_ca::TrustBundle::new(
        Some(root.trust_domain().clone()),
        vec![root.root_der().to_vec()],
    )?;
    let key = std::fs::read(dir.join(layout::WORKLOAD_KEY))
        .ok()
        .and_then(|k| strait_ca::pemfile::parse_private_key(&k).ok());
    let cert_ok = std::fs::read(dir.join(layout::CERT_CHAIN))
        .ok()
        .and_then(|pem| strait_ca::pemfile::parse_certificates(&pem).ok())
        .and_then(|certs| strait_ca::verify_svid(&certs, &signing, now).ok())
        .is_some_and(|svid| svid.path_len == 2 && svid.expires - now > ADMIN_RENEW_BEFORE);
    if key.is_none() || !cert_ok {
        let id = SpiffeId::admin(root.trust_domain(), "admin")?;
        let (key, key_is_new) = match key {
            Some(k) => (k, false),
            None => (authority::generate_key(KeyAlgorithm::EcdsaP256)?, true),
        };
        let csr = Csr::from_pem(authority::leaf_csr(&id, &[], &key)?.as_bytes())?;
        let leaf = root.issue_leaf(&csr, ADMIN_TTL, &AnyIdentityInTrustDomain, now)?;
        layout::ensure_dir(&dir)?;
        if key_is_new {
            layout::write_key(&dir.join(layout::WORKLOAD_KEY), &key.serialize_pem(), true)?;
        }
        layout::write_public(
            &dir.join(layout::CERT_CHAIN),
            &strait_ca::pemfile::encode(strait_ca::pemfile::CERTIFICATE, &leaf.der),
        )?;
        tracing::info!(dir = %dir.display(), identity = %id, "wrote admin credentials");
    }
    let bundle_pem = bundle.to_pem();
    if std::fs::read(dir.join(layout::ROOT_CERT)).ok() != Some(bundle_pem.clone().into_bytes()) {
        layout::write_public(&dir.join(layout::ROOT_CERT), &bundle_pem)?;
    }
    Ok(dir)
}

/// Issues the broker's serving certificate and the admin credentials from
/// the signing root, when they are missing or chain to another root.
fn refresh_own_certificates(
    state: &BrokerState,
    serving: &ServingCert,
    data_dir: &Path,
) -> Result<(), AppError> {
    let signer = state.signer();
    let missing = serving.current().is_none();
    if missing || state.serving_root() != signer.root_der() {
        let broker_id = crate::client::broker_id(&state.trust_domain)?;
        let (chain, key, _) = issue_from_root(
            &signer,
            &broker_id,
            &[transport::SERVER_NAME.to_string()],
            SERVER_CERT_TTL,
        )?;
        let (certs, key) = strait_ca::tls::identity(&chain, &key);
        let key = strait_ca::tls::provider()
            .key_provider
            .load_private_key(key)?;
        serving.set(rustls::sign::CertifiedKey::new(certs, key));
        state.set_serving_root(signer.root_der().to_vec());
        tracing::info!(
            root = %strait_ca::cert::fingerprint_sha256(signer.root_der()),
            "serving certificate issued"
        );
    }
    ensure_admin_credentials(data_dir, &signer, &state.trust.bundle())?;
    Ok(())
}

/// Opens the data directory, the root and the store, and loads the state
/// with the settings of `config`.
async fn open_state(config: &BrokerConfig) -> Result<Arc<BrokerState>, AppError> {
    #[cfg(feature = "etcd")]
    if let StoreSpec::Etcd(etcd) = &config.store
        && config.root_dir.is_none()
    {
        return Err(AppError::HaRoot(etcd.name()));
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AppError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let (root, root_dir) = load_or_create_root(config)?;
    let store: Arc<dyn crate::store::Store> = match &config.store {
        StoreSpec::Redb => Arc::new(RedbStore::open(&config.data_dir.join(STORE_FILE))?),
        #[cfg(feature = "etcd")]
        StoreSpec::Etcd(etcd) => {
            let etcd = etcd.clone();
            // Connecting waits for an answer: off the async workers.
            Arc::new(
                tokio::task::spawn_blocking(move || crate::store::etcd::EtcdStore::open(etcd))
                    .await
                    .map_err(|e| crate::store::StoreError::Backend {
                        path: "etcd".into(),
                        message: e.to_string(),
                    })??,
            )
        }
    };
    let state = Arc::new(BrokerState::load(
        store,
        root,
        &root_dir,
        &config.data_dir,
        config.intermediate_validity,
        config
            .mesh_name
            .clone()
            .unwrap_or_else(|| config.trust_domain.to_string()),
    )?);
    state.set_cluster_grace(config.cluster_grace);
    state.set_bind_identities(config.bind_identities).await?;
    Ok(state)
}

/// The TLS config of the broker API: any client certificate of the mesh
/// (or none, for `Join`), the broker's serving certificate.
fn api_tls(
    state: &BrokerState,
    serving: Arc<ServingCert>,
) -> Result<rustls::ServerConfig, AppError> {
    // Revocation is checked per call (`server::authenticate`), so that a
    // revoked cluster is told so instead of seeing its connection drop.
    let verifier = SpiffeClientVerifier::with_revocation(
        state.trust.clone(),
        Accept::Any,
        false,
        Revocation::PerCall,
    );
    let mut tls = rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tls)
}

/// Moves the broker's own certificates to the new root at each rotation.
fn follow_rotations(state: Arc<BrokerState>, serving: Arc<ServingCert>, data_dir: PathBuf) {
    let mut rotations = state.subscribe_rotation();
    tokio::spawn(async move {
        while rotations.changed().await.is_ok() {
            if let Err(e) = refresh_own_certificates(&state, &serving, &data_dir) {
                tracing::error!(error = %e, "re-issuing the broker's own certificates failed");
            }
        }
    });
}

/// Binds and serves the health and metrics endpoints that are configured.
async fn serve_side_endpoints(
    config: &BrokerConfig,
    ready: &Ready,
    registry: Arc<Registry>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, AppError> {
    let mut tasks = Vec::new();
    if let Some(addr) = config.health_listen {
        let l = accept::bind(addr, "health").await?;
        tasks.push(tokio::spawn(http::serve(l, ready.clone(), None)));
    }
    if let Some(addr) = config.metrics_listen {
        let l = accept::bind(addr, "metrics").await?;
        tasks.push(tokio::spawn(http::serve(l, ready.clone(), Some(registry))));
    }
    Ok(tasks)
}

/// The peer API, when this mesh federates with others (`--peer-listen`):
/// binds it, serves the `Peer` service and starts pulling every stored
/// peer. Returns the addresses for peer tokens and the serving task.
async fn serve_peer_api(
    config: &BrokerConfig,
    state: &Arc<BrokerState>,
    serving: &Arc<ServingCert>,
) -> Result<(Vec<String>, Option<tokio::task::JoinHandle<()>>), AppError> {
    let Some(addr) = config.peer_listen else {
        return Ok((Vec::new(), None));
    };
    let l = accept::bind(addr, "peer API").await?;
    let local = l.local_addr().map_err(|source| AppError::LocalAddr {
        what: "the peer API",
        source,
    })?;
    let peer_advertise = if config.peer_advertise.is_empty() {
        vec![local.to_string()]
    } else {
        config.peer_advertise.clone()
    };
    let verifier = Arc::new(crate::peer::PeerClientVerifier {
        peers: state.peers.clone(),
    });
    let mut peer_tls = rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving.clone());
    peer_tls.alpn_protocols = vec![b"h2".to_vec()];
    crate::peer::set_client_identity(serving.clone());
    let incoming = transport::tls_incoming(l, Arc::new(peer_tls));
    let service = crate::peer::PeerService {
        state: state.clone(),
    };
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(pb::peer_server::PeerServer::new(service))
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "peer API stopped");
        }
    });
    crate::peer::start_all(state);
    tracing::info!(listen = %local, mesh = %state.mesh_name, "peer API serving");
    Ok((peer_advertise, Some(task)))
}

/// How long connections get to close once shutdown begins (sync streams
/// are ended at once; admin calls in flight finish).
pub const DRAIN: Duration = Duration::from_secs(5);

/// Runs the broker until `shutdown` resolves, then drains for up to
/// [`DRAIN`].
pub async fn run(
    config: BrokerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let state = open_state(&config).await?;
    let serving = Arc::new(ServingCert::default());
    refresh_own_certificates(&state, &serving, &config.data_dir)?;
    let tls = api_tls(&state, serving.clone())?;
    // A root rotation moves the broker's own certificates to the new root.
    follow_rotations(state.clone(), serving.clone(), config.data_dir.clone());

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let registry = Arc::new(registry);
    let ready = Ready::default();

    let listener = accept::bind(config.listen, "broker API").await?;
    let local = listener
        .local_addr()
        .map_err(|source| AppError::LocalAddr {
            what: "the broker API",
            source,
        })?;
    let advertise = if config.advertise.is_empty() {
        vec![local.to_string()]
    } else {
        config.advertise.clone()
    };
    let mut side_tasks = serve_side_endpoints(&config, &ready, registry).await?;
    side_tasks.push(tokio::spawn(crate::state::follow_store(state.clone())));
    #[cfg(feature = "etcd")]
    let replication = match &config.store {
        StoreSpec::Etcd(etcd) => {
            let r = crate::ha::Replication::start(
                crate::ha::HaConfig {
                    etcd: etcd.clone(),
                    replica: replica_name(&config),
                    address: config
                        .replica_address
                        .clone()
                        .unwrap_or_else(|| local.to_string()),
                    lease_ttl: config.lease_ttl,
                },
                state.clone(),
            )
            .await
            .map_err(AppError::Replication)?;
            side_tasks.push(tokio::spawn(crate::ha::lead_liveness(
                state.clone(),
                r.role(),
            )));
            Some(r)
        }
        StoreSpec::Redb => None,
    };
    #[cfg(feature = "etcd")]
    let single = replication.is_none();
    #[cfg(not(feature = "etcd"))]
    let single = true;
    if single {
        side_tasks.push(tokio::spawn(crate::state::watch_liveness(state.clone())));
    }
    // Ready while the replica can write (always, with the embedded store).
    {
        let ready = ready.clone();
        let mut detached = state.detached();
        side_tasks.push(tokio::spawn(async move {
            while detached.changed().await.is_ok() {
                let up = detached.borrow_and_update().is_none();
                ready.set(up);
            }
        }));
    }
    metrics.set_exports(state.export_count().await);

    let (drain, watch) = strait_runtime::drain::channel();
    let federation = FederationService {
        state: state.clone(),
        metrics: metrics.clone(),
        drain: watch.clone(),
    };
    let (peer_advertise, peer_task) = serve_peer_api(&config, &state, &serving).await?;
    side_tasks.extend(peer_task);
    let admin = AdminService {
        state: state.clone(),
        metrics: metrics.clone(),
        advertise,
        peer_advertise,
        store: store_name(&config),
        #[cfg(feature = "etcd")]
        replication: replication.clone(),
    };
    // Target `strait::ready`: the one line `strait broker` shows at its
    // default log level.
    tracing::info!(
        target: "strait::ready",
        listen = %local,
        health = %config.health_listen.map_or_else(|| "-".to_string(), |a| a.to_string()),
        metrics = %config.metrics_listen.map_or_else(|| "-".to_string(), |a| a.to_string()),
        trust_domain = %state.trust_domain,
        data_dir = %config.data_dir.display(),
        epoch = %state.epoch,
        "broker serving"
    );
    ready.set(true);
    let incoming = transport::tls_incoming(listener, Arc::new(tls));
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(pb::federation_server::FederationServer::new(federation))
        .add_service(pb::admin_server::AdminServer::new(admin))
        .serve_with_incoming_shutdown(incoming, async {
            shutdown.await;
            tracing::info!("shutting down: ending sync streams");
            ready.set(false);
            drain.start();
        });
    // tonic does not count its connections: the drain is bounded instead.
    let result = tokio::select! {
        r = server => r.map_err(AppError::Serve),
        () = watch.deadline(DRAIN) => {
            tracing::warn!(drain = ?DRAIN, "connections still open after the drain time; closing them");
            Ok(())
        }
    };
    ready.set(false);
    #[cfg(feature = "etcd")]
    if let Some(r) = &replication {
        // Another replica leads at once, not after the lease.
        r.resign().await;
    }
    for t in side_tasks {
        t.abort();
    }
    result
}

/// How `BrokerStatus` names the store.
fn store_name(config: &BrokerConfig) -> String {
    match &config.store {
        StoreSpec::Redb => format!("redb {}", config.data_dir.join(STORE_FILE).display()),
        #[cfg(feature = "etcd")]
        StoreSpec::Etcd(e) => e.name(),
    }
}

/// `--replica`, or the host name.
#[cfg(feature = "etcd")]
fn replica_name(config: &BrokerConfig) -> String {
    config.replica.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "broker".into())
    })
}
