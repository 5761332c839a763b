//! The gateway's identity: where its certificate comes from, the QUIC
//! tunnels' TLS built from it, and the reload of both when the certificate
//! is renewed, the files change or the pushed bundles change.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use strait_ca::cert::CertError;
use strait_ca::layout::LayoutError;
use strait_ca::spiffe::SpiffeIdError;
use strait_ca::tls::{Accept, SpiffeClientVerifier, SpiffeServerVerifier, Trust};
use strait_ca::{SpiffeId, TrustBundle, TrustDomain};
use strait_proto::strait::mesh::v1 as pb;
use strait_proxy_client::identity::{IdentityConfig, IdentityManager};
use tokio::sync::watch;

use super::IdentitySource;
use crate::tunnel::TunnelError;

/// Why the gateway's identity is unusable.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity directory {dir}: {source}")]
    Files {
        dir: PathBuf,
        #[source]
        source: Box<LayoutError>,
    },
    #[error("federated bundles {path}: {reason}")]
    Federated {
        path: PathBuf,
        #[source]
        reason: FederatedError,
    },
    /// The east-west gateway identity of the trust domain cannot be named.
    #[error("gateway certificate: {0}")]
    GatewayId(#[source] SpiffeIdError),
    #[error("gateway certificate: no certificate")]
    NoCertificate,
    #[error("gateway certificate: {0}")]
    Certificate(#[source] CertError),
    #[error("gateway certificate: the certificate has no SPIFFE ID")]
    NoSpiffeId,
    #[error("gateway certificate: no gateway certificate (yet)")]
    NoCertificateYet,
    /// A trust domain of the trust is not a valid name.
    #[error("gateway TLS: {0}")]
    TrustDomain(#[source] SpiffeIdError),
    #[error("gateway TLS: {0}")]
    Tls(#[source] rustls::Error),
    #[error("gateway TLS: {0}")]
    Tunnel(#[source] TunnelError),
    #[error("a certificate from the CSR API needs the control plane's address")]
    NoControlPlane,
    #[error("the certificate task stopped")]
    TaskStopped,
}

/// What is wrong with a federated bundles directory or one of its files.
#[derive(Debug, thiserror::Error)]
pub enum FederatedError {
    #[error(transparent)]
    Read(#[from] std::io::Error),
    #[error("the file name must be a trust domain: {0}")]
    FileName(#[source] SpiffeIdError),
    #[error(transparent)]
    Bundle(Box<LayoutError>),
}

/// The east-west gateway identity of trust domain `td`:
/// `spiffe://<td>/ns/strait-system/sa/eastwest-gateway`.
pub fn gateway_id(td: &TrustDomain) -> Result<SpiffeId, IdentityError> {
    SpiffeId::from_segments(td, &["ns", "strait-system", "sa", "eastwest-gateway"])
        .map_err(IdentityError::GatewayId)
}

/// The SPIFFE ID of a chain's leaf.
pub(super) fn leaf_id(chain: &[Vec<u8>]) -> Result<SpiffeId, IdentityError> {
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    strait_ca::cert::CertSummary::from_der(leaf)
        .map_err(IdentityError::Certificate)?
        .spiffe_id
        .as_deref()
        .and_then(|i| SpiffeId::parse(i).ok())
        .ok_or(IdentityError::NoSpiffeId)
}

/// The QUIC server and client configs of the gateway's tunnels: mutual TLS
/// with `chain` and `key`, towards the east-west gateways of every trust
/// domain `trust` holds (each verified against its own bundle only).
fn tunnel_configs(
    chain: &[Vec<u8>],
    key: &[u8],
    trust: &Trust,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), IdentityError> {
    let id = leaf_id(chain)?;
    let own = gateway_id(&id.trust_domain())?;
    if id != own {
        tracing::warn!(%id, expected = %own, "the gateway identity is not the east-west gateway's");
    }
    let mut gateways: BTreeSet<SpiffeId> = [own].into();
    for td in trust.trust_domains() {
        let td = TrustDomain::new(&td).map_err(IdentityError::TrustDomain)?;
        gateways.insert(gateway_id(&td)?);
    }
    let peers = Accept::Ids(gateways);
    let server = strait_ca::tls::server_config(
        chain,
        key,
        SpiffeClientVerifier::new(trust.clone(), peers.clone(), true),
        &[],
    )
    .map_err(IdentityError::Tls)?;
    let client = strait_ca::tls::client_config(
        SpiffeServerVerifier::new(trust.clone(), peers),
        Some((chain, key)),
        &[],
    )
    .map_err(IdentityError::Tls)?;
    Ok((
        crate::tunnel::server_config(server).map_err(IdentityError::Tunnel)?,
        crate::tunnel::client_config(client).map_err(IdentityError::Tunnel)?,
    ))
}

/// The gateway's credentials at run time.
pub(super) enum Creds {
    /// Files kept current by someone else, read again when they change;
    /// `trust` follows their bundles.
    Dir {
        dir: PathBuf,
        federated: Option<PathBuf>,
        trust: Trust,
    },
    /// A key made here and certificates from the control plane's CSR API,
    /// renewed by the manager's task; `trust` follows the bundles the
    /// control plane pushes, and `bundles` ticks when they change (the
    /// tunnels' accepted peers are rebuilt then).
    Csr {
        manager: IdentityManager,
        trust: Trust,
        td: TrustDomain,
        bundles: watch::Sender<Vec<pb::TrustBundle>>,
    },
}

impl Creds {
    /// Starts what `source` needs (for a CSR, the certificate task asking
    /// `control_plane`).
    pub(super) fn new(
        source: &IdentitySource,
        control_plane: Option<&str>,
    ) -> Result<Self, IdentityError> {
        Ok(match source {
            IdentitySource::Dir { dir, federated } => Creds::Dir {
                dir: dir.clone(),
                federated: federated.clone(),
                trust: Trust::default(),
            },
            IdentitySource::Csr {
                token,
                token_file,
                td,
                root,
                cert_ttl,
            } => {
                let control_plane = control_plane.ok_or(IdentityError::NoControlPlane)?;
                let trust = Trust::new(root.clone());
                let config = IdentityConfig {
                    ttl: Some(*cert_ttl),
                    token_file: Some(token_file.clone()),
                    ..IdentityConfig::new(
                        control_plane,
                        gateway_id(td)?,
                        trust.clone(),
                        Some(token.trim().to_string()),
                    )
                };
                Creds::Csr {
                    manager: IdentityManager::spawn(config),
                    trust,
                    td: td.clone(),
                    bundles: watch::Sender::new(Vec::new()),
                }
            }
        })
    }

    /// The trust live connections are checked against.
    pub(super) fn trust(&self) -> &Trust {
        match self {
            Creds::Dir { trust, .. } | Creds::Csr { trust, .. } => trust,
        }
    }

    /// The tunnels' configs with the current certificate and trust.
    pub(super) fn tunnel_configs(
        &self,
    ) -> Result<(quinn::ServerConfig, quinn::ClientConfig), IdentityError> {
        match self {
            Creds::Dir {
                dir,
                federated,
                trust,
            } => {
                let (chain, key, bundle) = read_dir(dir)?;
                let federated = match federated {
                    Some(fdir) => read_federated(fdir)?,
                    None => Vec::new(),
                };
                // Checked with a trust of its own first: a bad new set of
                // files changes nothing.
                let fresh = Trust::new(bundle.clone());
                fresh.set_federated(federated.clone());
                tunnel_configs(&chain, &key, &fresh)?;
                // The shared trust (live tunnels are checked against it).
                trust.set_bundle(bundle);
                trust.set_federated(federated);
                tunnel_configs(&chain, &key, trust)
            }
            Creds::Csr { manager, trust, .. } => {
                let id = manager.current().ok_or(IdentityError::NoCertificateYet)?;
                tunnel_configs(&id.chain_der, &id.key_pkcs8, trust)
            }
        }
    }
}

/// The credentials in an identity directory, naming it in the error.
pub(super) fn read_dir(dir: &Path) -> Result<strait_ca::layout::Credentials, IdentityError> {
    strait_ca::layout::read_credentials(dir).map_err(|source| IdentityError::Files {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    })
}

/// The `<trust-domain>.pem` bundles of a federated directory.
fn read_federated(dir: &Path) -> Result<Vec<(String, TrustBundle)>, IdentityError> {
    let bad = |path: &Path, reason: FederatedError| IdentityError::Federated {
        path: path.to_path_buf(),
        reason,
    };
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| bad(dir, e.into()))?;
    for entry in entries {
        let path = entry.map_err(|e| bad(dir, e.into()))?.path();
        let Some(td) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pem"))
        else {
            continue;
        };
        let td = TrustDomain::new(td).map_err(|e| bad(&path, FederatedError::FileName(e)))?;
        let bundle = strait_ca::layout::load_bundle(&path, Some(td.clone()))
            .map_err(|e| bad(&path, FederatedError::Bundle(Box::new(e))))?;
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

pub(super) fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Keeps the tunnels' TLS current: rebuilt when the identity files change
/// (directory), or when the CSR client renews the certificate or the
/// pushed bundles change. New tunnels use it; live ones keep theirs. A bad
/// new identity is refused and the last good one kept.
pub(super) fn spawn_tunnel_reload(
    creds: Arc<Creds>,
    endpoint: quinn::Endpoint,
    pool: Arc<crate::tunnel::Pool>,
) {
    tokio::spawn(async move {
        let apply = |why: &str| match creds.tunnel_configs() {
            Ok((server, client)) => {
                endpoint.set_server_config(Some(server));
                pool.set_client_config(client);
                tracing::info!(why, "gateway identity reloaded");
            }
            Err(e) => tracing::warn!(
                error = %e,
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
