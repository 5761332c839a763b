//! The outbound side of peering: presenting a peer token to the other
//! broker (`straitctl peer establish`), and pulling every peer's `Sync`
//! stream (one task per peer, reconnecting) into the broker state.

use std::sync::Arc;
use std::time::Duration;

use strait_ca::bundle::BundleError;
use strait_ca::spiffe::SpiffeIdError;
use strait_ca::tls::{Accept, SpiffeServerVerifier};
use strait_ca::{ClusterName, TrustBundle, TrustDomain};
use strait_model::mesh::RemoteService;
use strait_proto::strait::broker::v1 as pb;
use strait_runtime::transport::BadAddress;
use tonic::Status;

use super::broker_id;
use super::registry::PeerRecord;
use super::token::{PeerToken, PeerTokenError};
use crate::client::ClientError;
use crate::state::{BrokerState, StateError};
use crate::wire::{self, WireError};

const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why `straitctl peer establish` failed.
#[derive(Debug, thiserror::Error)]
pub enum PeeringError {
    #[error("this broker has no peer API: start it with --peer-listen")]
    NoPeerApi,
    #[error(transparent)]
    Token(#[from] PeerTokenError),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Address(#[from] BadAddress),
    /// This mesh's own bundle does not serialize.
    #[error("{0}")]
    OwnBundle(#[source] BundleError),
    #[error("the peer's trust domain {value:?}: {source}")]
    PeerTrustDomain {
        value: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error(
        "the peer answered as mesh {mesh} ({trust_domain}), but the token is for {token_mesh} ({token_trust_domain})"
    )]
    WrongPeer {
        mesh: String,
        trust_domain: String,
        token_mesh: String,
        token_trust_domain: String,
    },
    #[error("the peer's bundle: {0}")]
    PeerBundle(#[source] BundleError),
    /// Every address of the token failed; the last one's answer.
    #[error("peering failed: {address}: {}", status.message())]
    Failed { address: String, status: Status },
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<PeeringError> for Status {
    fn from(e: PeeringError) -> Self {
        match e {
            PeeringError::State(e) => e.into(),
            e => Status::invalid_argument(format!("bad request: {e}")),
        }
    }
}

/// Why pulling a peer's `Sync` stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("the peer's trust domain {value:?}: {source}")]
    TrustDomain {
        value: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("peer bundle unreadable")]
    Bundle,
    #[error(transparent)]
    BrokerId(#[from] ClientError),
    #[error("the broker identity is not ready")]
    NoIdentity,
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error("the peer has no address")]
    NoAddress,
    #[error(transparent)]
    Address(#[from] BadAddress),
    #[error("{address}: {}", status.message())]
    Connect { address: String, status: Status },
    #[error("{}", .0.message())]
    Stream(Status),
    #[error("cluster {value:?}: {source}")]
    Cluster {
        value: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("missing cluster info")]
    MissingInfo,
    #[error("missing service")]
    MissingService,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the peer's bundle: {0}")]
    PeerBundle(#[source] BundleError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// `straitctl peer establish`: presents a peer token to the other broker,
/// and stores it as a peer (outbound) when it answers as the token said.
pub async fn establish(
    state: &BrokerState,
    token_text: &str,
    own_addresses: Vec<String>,
) -> Result<PeerRecord, PeeringError> {
    if own_addresses.is_empty() {
        return Err(PeeringError::NoPeerApi);
    }
    let token = PeerToken::parse(token_text)?;
    let verifier = SpiffeServerVerifier::pinned(&token.h);
    let config = Arc::new(strait_ca::tls::client_config(verifier, None, &[b"h2"])?);
    let mut last = None;
    for address in &token.a {
        let channel = strait_runtime::transport::channel(address, config.clone())?;
        let mut client = pb::peer_client::PeerClient::new(channel);
        match client
            .establish(pb::EstablishRequest {
                token: token_text.trim().to_string(),
                mesh: state.mesh_name.clone(),
                trust_domain: state.trust_domain.to_string(),
                bundle: state
                    .spiffe_bundle_json()
                    .map_err(PeeringError::OwnBundle)?,
                addresses: own_addresses.clone(),
            })
            .await
        {
            Ok(r) => {
                let record = answered(&token, r.into_inner())?;
                state.put_peer(record.clone()).await?;
                return Ok(record);
            }
            Err(status) => {
                last = Some(PeeringError::Failed {
                    address: address.clone(),
                    status,
                });
            }
        }
    }
    // A parsed token has at least one address.
    Err(last.unwrap_or(PeeringError::Token(PeerTokenError::NoAddress)))
}

/// The peer record of the broker that answered `token` with `r`, once it
/// is the mesh the token is for and its bundle reads.
fn answered(token: &PeerToken, r: pb::EstablishResponse) -> Result<PeerRecord, PeeringError> {
    let td = TrustDomain::new(&r.trust_domain).map_err(|source| PeeringError::PeerTrustDomain {
        value: r.trust_domain.clone(),
        source,
    })?;
    if td.as_str() != token.t || r.mesh != token.m {
        return Err(PeeringError::WrongPeer {
            mesh: r.mesh,
            trust_domain: r.trust_domain,
            token_mesh: token.m.clone(),
            token_trust_domain: token.t.clone(),
        });
    }
    TrustBundle::from_spiffe_json(r.bundle.as_bytes(), Some(td.clone()))
        .map_err(PeeringError::PeerBundle)?;
    Ok(PeerRecord {
        mesh: r.mesh,
        trust_domain: td.to_string(),
        bundle: r.bundle,
        addresses: token.a.clone(),
        direction: "outbound".into(),
        services: vec![],
    })
}

/// The client identity a broker presents to its peers: set by the app,
/// which owns the broker's certificate.
pub type ClientIdentity = Arc<dyn rustls::client::ResolvesClientCert>;

static CLIENT_IDENTITY: std::sync::OnceLock<ClientIdentity> = std::sync::OnceLock::new();

/// Registers the broker's own identity for outbound peer connections.
pub fn set_client_identity(id: ClientIdentity) {
    let _ = CLIENT_IDENTITY.set(id);
}

/// Starts pulling a peer's exports (one task per peer, reconnecting).
pub fn spawn_puller(state: Arc<BrokerState>, mesh: String) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            let Some(peer) = state.peers.get(&mesh) else {
                return;
            };
            match pull(&state, &peer).await {
                Ok(()) => tracing::info!(%mesh, "peer sync stream ended"),
                Err(e) => tracing::warn!(%mesh, error = %e, "peer sync failed"),
            }
            state.peers.set_connected(&mesh, false);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
}

/// Starts pullers for every stored peer (at broker start).
pub fn start_all(state: &Arc<BrokerState>) {
    for p in state.peers.list() {
        spawn_puller(state.clone(), p.mesh);
    }
}

/// A TLS client config for `peer`'s broker: its own bundle, its broker
/// identity, and this broker's identity as the client certificate.
fn peer_tls(
    state: &BrokerState,
    peer: &PeerRecord,
    td: &TrustDomain,
) -> Result<rustls::ClientConfig, PullError> {
    let trust = state
        .peers
        .trust_for(&peer.trust_domain)
        .ok_or(PullError::Bundle)?;
    let verifier = SpiffeServerVerifier::new(trust, Accept::Ids([broker_id(td)?].into()));
    let identity = CLIENT_IDENTITY
        .get()
        .cloned()
        .ok_or(PullError::NoIdentity)?;
    let mut config = rustls::ClientConfig::builder_with_provider(strait_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The services of one update, each from a cluster of the peer's own
/// trust domain `td` (the peer speaks only for it).
fn services(td: &TrustDomain, update: &pb::PeerUpdate) -> Result<Vec<RemoteService>, PullError> {
    update
        .services
        .iter()
        .map(|s| {
            let name = ClusterName::new(&s.cluster).map_err(|source| PullError::Cluster {
                value: s.cluster.clone(),
                source,
            })?;
            let info = wire::cluster_info(
                &name,
                td,
                s.cluster_info.as_ref().ok_or(PullError::MissingInfo)?,
            )?;
            let service =
                wire::exported_service(s.service.as_ref().ok_or(PullError::MissingService)?)?;
            Ok(RemoteService {
                from: info,
                service,
            })
        })
        .collect()
}

async fn pull(state: &Arc<BrokerState>, peer: &PeerRecord) -> Result<(), PullError> {
    let td = TrustDomain::new(&peer.trust_domain).map_err(|source| PullError::TrustDomain {
        value: peer.trust_domain.clone(),
        source,
    })?;
    let config = peer_tls(state, peer, &td)?;
    let address = peer.addresses.first().ok_or(PullError::NoAddress)?;
    let channel = strait_runtime::transport::channel(address, Arc::new(config))?;
    let mut client = pb::peer_client::PeerClient::new(channel);
    let mut stream = client
        .sync(pb::PeerHello {
            mesh: state.mesh_name.clone(),
        })
        .await
        .map_err(|status| PullError::Connect {
            address: address.clone(),
            status,
        })?
        .into_inner();
    state.peers.set_connected(&peer.mesh, true);
    while let Some(update) = stream.message().await.map_err(PullError::Stream)? {
        let services = services(&td, &update)?;
        let bundle = if update.bundle.is_empty() {
            peer.bundle.clone()
        } else {
            TrustBundle::from_spiffe_json(update.bundle.as_bytes(), Some(td.clone()))
                .map_err(PullError::PeerBundle)?;
            update.bundle.clone()
        };
        let current = state.peers.get(&peer.mesh).unwrap_or_else(|| peer.clone());
        state
            .put_peer(PeerRecord {
                services,
                bundle,
                ..current
            })
            .await?;
        tracing::info!(mesh = %peer.mesh, services = update.services.len(), "peer exports updated");
    }
    Ok(())
}
