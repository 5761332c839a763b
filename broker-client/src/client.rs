//! The client side of the broker: joining with a token, and channels for
//! clusters (Sync) and administrators (Admin).
//!
//! A joined cluster's directory holds:
//! - `cacerts/`: its intermediate in Istio's plug-in CA layout (the key was
//!   made here and never left);
//! - `broker-client/`: its broker identity `spiffe://<td>/strait/cluster/<name>`,
//!   issued locally under that intermediate;
//! - `broker.json`: the broker addresses, trust domain and cluster name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_ca::authority::{self, Authority, KeyAlgorithm};
use strait_ca::bundle::BundleError;
use strait_ca::cert::CertError;
use strait_ca::csr::CsrError;
use strait_ca::pemfile::PemError;
use strait_ca::spiffe::SpiffeIdError;
use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust};
use strait_ca::{
    AnyIdentityInTrustDomain, ClusterName, Csr, IssueError, SpiffeId, TrustBundle, TrustDomain,
    layout, pemfile,
};
use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;
use tonic::transport::Channel;

use crate::token::JoinToken;
use crate::wire::WireError;
use strait_runtime::transport;

pub const CACERTS_DIR: &str = "cacerts";
pub const CLIENT_DIR: &str = "broker-client";
pub const BROKER_FILE: &str = "broker.json";
/// Lifetime of a cluster's broker client certificate.
pub const CLIENT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("join token: {0}")]
    Token(#[from] crate::token::TokenError),
    #[error("broker {address}: {status}")]
    Rpc { address: String, status: String },
    /// The broker refuses this cluster for good (revoked, or not a
    /// cluster identity): retrying cannot help; an operator must act.
    #[error("the broker refuses this cluster: {0}")]
    Refused(String),
    /// Making a key or a CSR, or issuing the broker client certificate.
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The broker identity of a trust domain does not form.
    #[error("the broker identity: {0}")]
    BrokerId(#[source] SpiffeIdError),
    /// PEM certificates from the broker (`what`) do not parse.
    #[error("{what}: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: PemError,
    },
    /// An intermediate from the broker (`what`) does not fit its key.
    #[error("{what}: {source}")]
    Intermediate {
        what: &'static str,
        #[source]
        source: IssueError,
    },
    #[error("the intermediate from the broker does not chain to its trust bundle")]
    NotChained,
    /// A name the broker or `broker.json` gives (`field`) does not parse.
    #[error("{field} {value:?}: {source}")]
    Name {
        field: &'static str,
        value: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("federated bundle {value:?}: {source}")]
    FederatedTrustDomain {
        value: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("federated bundle {trust_domain}: {source}")]
    FederatedBundle {
        trust_domain: TrustDomain,
        #[source]
        source: BundleError,
    },
    #[error("imports from the broker: {0}")]
    Imports(#[source] WireError),
    /// `broker.json` does not read or write as JSON.
    #[error("{path}: {source}")]
    BrokerFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The join token or `broker.json` (`0`) names no broker.
    #[error("{0} lists no broker address")]
    NoBrokerAddress(&'static str),
    #[error("{path}: {source}")]
    Certificate {
        path: PathBuf,
        #[source]
        source: CertError,
    },
    #[error("{0}: the certificate carries no SPIFFE ID")]
    NoSpiffeId(PathBuf),
    /// The broker did not answer `Hello` in time (the limit).
    #[error("no Welcome from the broker within {0:?}")]
    NoWelcomeInTime(Duration),
    #[error("sync stream closed before Hello")]
    ClosedBeforeHello,
    #[error("sync stream closed")]
    Closed,
    /// The broker's first answer was not `Welcome` (the answer, as debug).
    #[error("expected Welcome from the broker, got {0}")]
    NoWelcome(String),
    #[error(transparent)]
    Address(#[from] transport::BadAddress),
    /// A broker address did not answer ([`connect`]).
    #[error(transparent)]
    Connect(#[from] transport::ConnectError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
}

/// The first certificate of each PEM text (`what`: whence, for errors).
pub(crate) fn parse_pems(pems: &[String], what: &'static str) -> Result<Vec<Vec<u8>>, ClientError> {
    pems.iter()
        .map(|p| pemfile::parse_certificates(p.as_bytes()).map(|mut v| v.remove(0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ClientError::Pem { what, source })
}

/// What a joined cluster remembers about its broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub addresses: Vec<String>,
    pub trust_domain: String,
    pub cluster: String,
    pub network: String,
    pub locality: String,
}

impl BrokerInfo {
    /// Broker address number `which`, counted round the list (`which`
    /// past the end starts again from the first); `None` when there is
    /// none.
    pub fn address(&self, which: usize) -> Option<&str> {
        match self.addresses.len() {
            0 => None,
            n => self.addresses.get(which % n).map(String::as_str),
        }
    }

    /// The cluster's name and trust domain, parsed.
    pub fn identity(&self) -> Result<(ClusterName, TrustDomain), ClientError> {
        let cluster = ClusterName::new(&self.cluster).map_err(|source| ClientError::Name {
            field: "broker.json cluster",
            value: self.cluster.clone(),
            source,
        })?;
        let td = TrustDomain::new(&self.trust_domain).map_err(|source| ClientError::Name {
            field: "broker.json trust_domain",
            value: self.trust_domain.clone(),
            source,
        })?;
        Ok((cluster, td))
    }
}

/// A cluster that joined.
#[derive(Debug, Clone)]
pub struct JoinedCluster {
    pub dir: PathBuf,
    pub info: BrokerInfo,
}

/// The broker's own identity, which clients require of it.
pub fn broker_id(td: &TrustDomain) -> Result<SpiffeId, ClientError> {
    SpiffeId::from_segments(td, &["ns", "strait-system", "sa", "broker"])
        .map_err(ClientError::BrokerId)
}

/// Joins a mesh with `token`: makes the intermediate key here, sends only
/// its CSR, checks the broker against the token's pinned root, and writes
/// the cluster directory `out`. Refuses to overwrite an existing CA key.
pub async fn join(token: &str, out: &Path) -> Result<JoinedCluster, ClientError> {
    let token = JoinToken::parse(token)?;
    let cacerts = out.join(CACERTS_DIR);
    layout::check_key_absent(&cacerts, layout::CA_KEY, false)?;
    let key = authority::generate_key(KeyAlgorithm::EcdsaP256)?;
    let csr = authority::intermediate_csr(&token.cluster, &key)?;
    let verifier = SpiffeServerVerifier::pinned(&token.root_sha256);
    let config = Arc::new(strait_ca::tls::client_config(verifier, None, &[b"h2"])?);

    let mut last = None;
    let mut response = None;
    for address in &token.addresses {
        let channel = transport::channel(address, config.clone())?;
        let mut client = pb::federation_client::FederationClient::new(channel);
        match client
            .join(pb::JoinRequest {
                token: token.encode(),
                csr: csr.clone(),
            })
            .await
        {
            Ok(r) => {
                response = Some(r.into_inner());
                break;
            }
            Err(status) => {
                let permanent = status.code() == tonic::Code::PermissionDenied
                    || status.code() == tonic::Code::InvalidArgument;
                last = Some(ClientError::Rpc {
                    address: address.clone(),
                    status: status.message().to_string(),
                });
                if permanent {
                    break;
                }
            }
        }
    }
    let Some(r) = response else {
        return Err(last.unwrap_or(ClientError::NoBrokerAddress("the token")));
    };

    // Check what came back before writing anything.
    let chain = parse_pems(&r.intermediate_chain, "intermediate chain from the broker")?;
    let td = TrustDomain::new(&r.trust_domain).map_err(|source| ClientError::Name {
        field: "the broker's trust domain",
        value: r.trust_domain.clone(),
        source,
    })?;
    let ca = Authority::from_der(chain.clone(), key, Some(&td)).map_err(|source| {
        ClientError::Intermediate {
            what: "the intermediate from the broker",
            source,
        }
    })?;
    let roots = parse_pems(&r.trust_bundle, "trust bundle from the broker")?;
    let bundle = TrustBundle::new(Some(td.clone()), roots)?;
    // The pinned root must be one the mesh trusts, and the intermediate
    // must chain to a root of that bundle (during a root rotation it may be
    // the new one).
    if !bundle.roots().iter().any(|r| token.check_root(r).is_ok()) {
        token.check_root(chain.last().map(Vec::as_slice).unwrap_or_default())?;
    }
    if !bundle.roots().iter().any(|r| r.as_slice() == ca.root_der()) {
        return Err(ClientError::NotChained);
    }

    layout::write_plugin_ca(&cacerts, &chain, Some(&ca.key_pem()), &bundle, false)?;
    issue_client_cert(&ca, &token.cluster, &bundle, &out.join(CLIENT_DIR))?;
    let info = BrokerInfo {
        addresses: token.addresses.clone(),
        trust_domain: td.to_string(),
        cluster: token.cluster.to_string(),
        network: r.network,
        locality: r.locality,
    };
    let path = out.join(BROKER_FILE);
    let text = serde_json::to_string_pretty(&info).map_err(|source| ClientError::BrokerFile {
        path: path.clone(),
        source,
    })?;
    layout::write_public(&path, &text)?;
    Ok(JoinedCluster {
        dir: out.to_path_buf(),
        info,
    })
}

/// Issues (or renews) the cluster's broker client certificate under its own
/// intermediate.
pub fn issue_client_cert(
    ca: &Authority,
    cluster: &ClusterName,
    bundle: &TrustBundle,
    dir: &Path,
) -> Result<(), ClientError> {
    let id = SpiffeId::cluster(ca.trust_domain(), cluster);
    let key = authority::generate_key(KeyAlgorithm::EcdsaP256)?;
    let csr = Csr::from_pem(authority::leaf_csr(&id, &[], &key)?.as_bytes())?;
    let leaf = ca.issue_leaf(
        &csr,
        CLIENT_CERT_TTL,
        &AnyIdentityInTrustDomain,
        OffsetDateTime::now_utc(),
    )?;
    let intermediates = &ca.chain()[..ca.chain().len() - 1];
    layout::write_workload(
        dir,
        &leaf.der,
        intermediates,
        &key.serialize_pem(),
        bundle,
        true,
    )?;
    Ok(())
}

pub use strait_ca::layout::{Credentials, read_credentials};

/// An mTLS channel to the broker with the credentials in `creds_dir`; the
/// broker must present the broker identity of the bundle's trust domain.
/// It connects lazily, at its first call.
pub fn channel(address: &str, creds_dir: &Path) -> Result<Channel, ClientError> {
    Ok(transport::channel(address, client_tls(creds_dir)?)?)
}

/// [`channel`], connected before it returns (TCP and the TLS handshake,
/// within [`transport::CONNECT_TIMEOUT`]): for trying a broker's addresses
/// in turn.
pub async fn connect(address: &str, creds_dir: &Path) -> Result<Channel, ClientError> {
    Ok(transport::connect(address, client_tls(creds_dir)?).await?)
}

/// The TLS client config of the credentials in `creds_dir`, requiring the
/// broker identity of their trust domain.
fn client_tls(creds_dir: &Path) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let (chain, key, bundle) = read_credentials(creds_dir)?;
    let leaf = strait_ca::cert::CertSummary::from_der(&chain[0]).map_err(|source| {
        ClientError::Certificate {
            path: creds_dir.to_path_buf(),
            source,
        }
    })?;
    let td = leaf
        .spiffe_id
        .as_deref()
        .and_then(|id| SpiffeId::parse(id).ok())
        .map(|id| id.trust_domain())
        .ok_or_else(|| ClientError::NoSpiffeId(creds_dir.to_path_buf()))?;
    let verifier =
        SpiffeServerVerifier::new(Trust::new(bundle), Accept::Ids([broker_id(&td)?].into()));
    let config = strait_ca::tls::client_config(verifier, Some((&chain, &key)), &[b"h2"])?;
    Ok(Arc::new(config))
}

/// The `broker.json` of a joined cluster directory.
pub fn read_broker_info(joined_dir: &Path) -> Result<BrokerInfo, ClientError> {
    let path = joined_dir.join(BROKER_FILE);
    serde_json::from_slice(&layout::read(&path)?)
        .map_err(|source| ClientError::BrokerFile { path, source })
}

/// A channel for a joined cluster directory to broker address number
/// `which` of its `broker.json` ([`BrokerInfo::address`]: counted round
/// the list, so a caller failing over just counts up), and that
/// `broker.json`.
pub fn cluster_channel(
    joined_dir: &Path,
    which: usize,
) -> Result<(Channel, BrokerInfo), ClientError> {
    let info = read_broker_info(joined_dir)?;
    let address = info
        .address(which)
        .ok_or(ClientError::NoBrokerAddress("broker.json"))?;
    Ok((channel(address, &joined_dir.join(CLIENT_DIR))?, info))
}

/// One Sync stream, from the cluster's side: `open` sends Hello and waits
/// for the broker's Welcome; then messages flow both ways.
pub struct SyncSession {
    tx: tokio::sync::mpsc::Sender<pb::SyncRequest>,
    inbound: tonic::Streaming<pb::SyncResponse>,
    /// The export revision the broker holds for this cluster.
    pub broker_export_revision: u64,
}

impl SyncSession {
    pub async fn open(channel: Channel, hello: pb::Hello) -> Result<Self, ClientError> {
        let rpc = |status: tonic::Status| match status.code() {
            tonic::Code::PermissionDenied => ClientError::Refused(status.message().to_string()),
            _ => ClientError::Rpc {
                address: "broker".into(),
                status: format!("{}: {}", status.code(), status.message()),
            },
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(pb::SyncRequest {
            msg: Some(pb::sync_request::Msg::Hello(hello)),
        })
        .await
        .map_err(|_| ClientError::ClosedBeforeHello)?;
        let mut client = pb::federation_client::FederationClient::new(channel);
        let mut inbound = client
            .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(rpc)?
            .into_inner();
        match inbound.message().await.map_err(rpc)? {
            Some(pb::SyncResponse {
                msg: Some(pb::sync_response::Msg::Welcome(w)),
            }) => Ok(SyncSession {
                tx,
                inbound,
                broker_export_revision: w.export_revision,
            }),
            other => Err(ClientError::NoWelcome(format!("{other:?}"))),
        }
    }

    /// A handle to send on this stream from another task.
    pub fn sender(&self) -> SyncSender {
        SyncSender(self.tx.clone())
    }

    pub async fn send(&self, msg: pb::sync_request::Msg) -> Result<(), ClientError> {
        self.tx
            .send(pb::SyncRequest { msg: Some(msg) })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The next message from the broker; `None` when the stream ended.
    pub async fn recv(&mut self) -> Result<Option<pb::sync_response::Msg>, ClientError> {
        match self.inbound.message().await {
            Ok(Some(r)) => Ok(r.msg),
            Ok(None) => Ok(None),
            Err(status) => Err(ClientError::Rpc {
                address: "broker".into(),
                status: format!("{}: {}", status.code(), status.message()),
            }),
        }
    }
}

/// Sends on a [`SyncSession`] from another task.
#[derive(Clone)]
pub struct SyncSender(tokio::sync::mpsc::Sender<pb::SyncRequest>);

impl SyncSender {
    pub async fn send(&self, msg: pb::sync_request::Msg) -> Result<(), ClientError> {
        self.0
            .send(pb::SyncRequest { msg: Some(msg) })
            .await
            .map_err(|_| ClientError::Closed)
    }
}
