//! Wiring of a broker process: data directory, root, store, identities,
//! listeners, graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use strait_ca::authority::{self, Authority, KeyAlgorithm, RootOptions};
use strait_ca::layout;
use strait_ca::tls::{Accept, SpiffeClientVerifier};
use strait_ca::{AnyIdentityInTrustDomain, Csr, SpiffeId, TrustDomain};
use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;

use crate::http::{self, Ready};
use crate::metrics::Metrics;
use crate::server::{AdminService, FederationService};
use crate::state::BrokerState;
use crate::store::RedbStore;

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
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("serving: {0}")]
    Serve(String),
}

fn setup(e: impl std::fmt::Display) -> AppError {
    AppError::Setup(e.to_string())
}

/// The root this broker signs with: `--root DIR`, or `DATA/root` (created
/// on first start).
fn load_or_create_root(config: &BrokerConfig) -> Result<Authority, AppError> {
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
        )
        .map_err(setup)?;
        layout::write_root(&dir, &root, false)?;
        tracing::info!(dir = %dir.display(), "created the mesh root");
    }
    let root = layout::load_root(&dir, Some(&config.trust_domain))?;
    if root.trust_domain() != &config.trust_domain {
        return Err(AppError::Setup(format!(
            "root in {} is for trust domain {}, not {}",
            dir.display(),
            root.trust_domain(),
            config.trust_domain
        )));
    }
    Ok(root)
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
    let key = authority::generate_key(KeyAlgorithm::EcdsaP256).map_err(setup)?;
    let csr = Csr::from_pem(
        authority::leaf_csr(id, dns, &key)
            .map_err(setup)?
            .as_bytes(),
    )
    .map_err(setup)?;
    let leaf = root
        .issue_leaf(
            &csr,
            ttl,
            &AnyIdentityInTrustDomain,
            OffsetDateTime::now_utc(),
        )
        .map_err(setup)?;
    Ok((
        vec![leaf.der, root.root_der().to_vec()],
        key.serialize_der(),
        key.serialize_pem(),
    ))
}

/// Writes `DATA/admin/` (cert-chain.pem, key.pem, root-cert.pem) unless
/// valid credentials are already there.
fn ensure_admin_credentials(data_dir: &Path, root: &Authority) -> Result<PathBuf, AppError> {
    let dir = data_dir.join(ADMIN_DIR);
    let chain_path = dir.join(layout::CERT_CHAIN);
    if let Ok(pem) = std::fs::read(&chain_path)
        && let Ok(certs) = strait_ca::pemfile::parse_certificates(&pem)
        && let Some(first) = certs.first()
        && let Ok(summary) = strait_ca::cert::CertSummary::from_der(first)
        && let Ok(not_after) = OffsetDateTime::parse(
            &summary.not_after,
            &time::format_description::well_known::Rfc3339,
        )
        && not_after - OffsetDateTime::now_utc() > ADMIN_RENEW_BEFORE
        && certs.last().map(Vec::as_slice) == Some(root.root_der())
    {
        return Ok(dir);
    }
    let id = SpiffeId::admin(root.trust_domain(), "admin").map_err(setup)?;
    let (chain, _, key_pem) = issue_from_root(root, &id, &[], ADMIN_TTL)?;
    let bundle = strait_ca::TrustBundle::new(
        Some(root.trust_domain().clone()),
        vec![root.root_der().to_vec()],
    )
    .map_err(setup)?;
    // The admin credentials are the broker's to re-issue: replace the key.
    layout::write_workload(&dir, &chain[0], &[], &key_pem, &bundle, true)?;
    tracing::info!(dir = %dir.display(), identity = %id, "wrote admin credentials");
    Ok(dir)
}

/// Runs the broker until `shutdown` resolves, then drains.
pub async fn run(
    config: BrokerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| AppError::Setup(format!("{}: {e}", config.data_dir.display())))?;
    let root = load_or_create_root(&config)?;
    ensure_admin_credentials(&config.data_dir, &root)?;
    let store = Arc::new(RedbStore::open(&config.data_dir.join(STORE_FILE))?);
    let state = Arc::new(BrokerState::load(
        store,
        root,
        config.intermediate_validity,
    )?);

    let broker_id = SpiffeId::from_segments(
        &state.trust_domain,
        &["ns", "strait-system", "sa", "broker"],
    )
    .map_err(setup)?;
    let (chain, key, _) = issue_from_root(
        &state.root,
        &broker_id,
        &[crate::transport::SERVER_NAME.to_string()],
        SERVER_CERT_TTL,
    )?;
    let verifier = SpiffeClientVerifier::new(state.trust.clone(), Accept::Any, false);
    let tls = strait_ca::tls::server_config(&chain, &key, verifier, &[b"h2"]).map_err(setup)?;

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let registry = Arc::new(registry);
    let ready = Ready::default();

    let listener = http::bind(config.listen, "broker API")
        .await
        .map_err(AppError::Setup)?;
    let local = listener.local_addr().map_err(setup)?;
    let advertise = if config.advertise.is_empty() {
        vec![local.to_string()]
    } else {
        config.advertise.clone()
    };
    let mut side_tasks = Vec::new();
    if let Some(addr) = config.health_listen {
        let l = http::bind(addr, "health").await.map_err(AppError::Setup)?;
        side_tasks.push(tokio::spawn(http::serve(l, ready.clone(), None)));
    }
    if let Some(addr) = config.metrics_listen {
        let l = http::bind(addr, "metrics").await.map_err(AppError::Setup)?;
        side_tasks.push(tokio::spawn(http::serve(
            l,
            ready.clone(),
            Some(registry.clone()),
        )));
    }
    {
        let inner = state.lock().await;
        metrics.set_exports(inner.mesh.clusters().map(|(_, c)| c.exports.len()).sum());
    }

    let federation = FederationService {
        state: state.clone(),
        metrics: metrics.clone(),
    };
    let admin = AdminService {
        state: state.clone(),
        metrics: metrics.clone(),
        advertise,
    };
    tracing::info!(
        listen = %local,
        trust_domain = %state.trust_domain,
        data_dir = %config.data_dir.display(),
        epoch = %state.epoch,
        "broker serving"
    );
    ready.set(true);
    let incoming = crate::transport::tls_incoming(listener, Arc::new(tls));
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(pb::federation_server::FederationServer::new(federation))
        .add_service(pb::admin_server::AdminServer::new(admin))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutting down: draining streams");
        })
        .await
        .map_err(|e| AppError::Serve(e.to_string()));
    ready.set(false);
    for t in side_tasks {
        t.abort();
    }
    result
}
