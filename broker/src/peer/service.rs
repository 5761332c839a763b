//! The peer API's server side: the `Peer` gRPC service (`Establish` spends
//! a peer token this broker issued; `Sync` streams what this mesh exports
//! to the calling peer) and the verifier of peer brokers' client
//! certificates.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use strait_ca::bundle::BundleError;
use strait_ca::spiffe::SpiffeIdError;
use strait_ca::{SpiffeId, TrustBundle, TrustDomain};
use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::registry::{PeerRecord, Peers};
use super::token::{PeerToken, PeerTokenError, PeerTokenRecord, TokenRefusal, sha256_hex};
use super::{broker_id, client::spawn_puller};
use crate::state::{BrokerState, StateError, unix};
use crate::wire;

/// Why `Peer.Establish` was refused on the issuing side.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Token(#[from] PeerTokenError),
    #[error("peer token secret is not base64url")]
    Secret,
    #[error(transparent)]
    Refused(#[from] TokenRefusal),
    #[error("trust_domain: {0}")]
    TrustDomain(#[source] SpiffeIdError),
    #[error("a mesh cannot peer with its own trust domain")]
    OwnTrustDomain,
    #[error("bundle: {0}")]
    Bundle(#[source] BundleError),
    #[error("mesh name and peer addresses are required")]
    Incomplete,
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<AcceptError> for Status {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::Refused(_) => Status::permission_denied(e.to_string()),
            AcceptError::State(e) => e.into(),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

/// `Peer.Establish` on the issuing side: spends the token, stores the peer.
async fn accept(
    state: &BrokerState,
    req: &pb::EstablishRequest,
    now: OffsetDateTime,
) -> Result<PeerRecord, AcceptError> {
    let token = PeerToken::parse(&req.token)?;
    let secret = URL_SAFE_NO_PAD
        .decode(&token.s)
        .map_err(|_| AcceptError::Secret)?;
    state
        .peers
        .spend_token(&token.i, &sha256_hex(&secret), unix(now))?;
    let td = TrustDomain::new(&req.trust_domain).map_err(AcceptError::TrustDomain)?;
    if td == state.trust_domain {
        return Err(AcceptError::OwnTrustDomain);
    }
    TrustBundle::from_spiffe_json(req.bundle.as_bytes(), Some(td.clone()))
        .map_err(AcceptError::Bundle)?;
    if req.mesh.is_empty() || req.addresses.is_empty() {
        return Err(AcceptError::Incomplete);
    }
    let record = PeerRecord {
        mesh: req.mesh.clone(),
        trust_domain: td.to_string(),
        bundle: req.bundle.clone(),
        addresses: req.addresses.clone(),
        direction: "inbound".into(),
        services: state
            .peers
            .get(&req.mesh)
            .map(|p| p.services)
            .unwrap_or_default(),
    };
    state
        .record_peering(&PeerTokenRecord::spent(&token, &secret), record.clone())
        .await?;
    Ok(record)
}

/// The `Peer` gRPC service.
pub struct PeerService {
    pub state: Arc<BrokerState>,
}

impl PeerService {
    /// The calling broker's mesh, from its client certificate.
    fn caller(&self, req: &Request<pb::PeerHello>) -> Result<PeerRecord, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a peer broker certificate is required"))?;
        let leaf = strait_ca::cert::CertSummary::from_der(certs[0].as_ref())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let id = leaf
            .spiffe_id
            .as_deref()
            .and_then(|i| SpiffeId::parse(i).ok())
            .ok_or_else(|| Status::unauthenticated("the certificate carries no SPIFFE ID"))?;
        let peer = self
            .state
            .peers
            .by_trust_domain(id.trust_domain_str())
            .ok_or_else(|| Status::permission_denied(format!("{id} is not of a peered mesh")))?;
        // Verified against that trust domain's own bundle (already done by
        // the TLS verifier; again here to bind the identity to the peer).
        let trust = self
            .state
            .peers
            .trust_for(&peer.trust_domain)
            .ok_or_else(|| Status::internal("peer bundle unreadable"))?;
        let svid = strait_ca::tls::peer_identity(&trust, &certs, OffsetDateTime::now_utc())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let td =
            TrustDomain::new(&peer.trust_domain).map_err(|e| Status::internal(e.to_string()))?;
        let broker = broker_id(&td).map_err(|e| Status::internal(e.to_string()))?;
        if svid.spiffe_id != broker {
            return Err(Status::permission_denied(format!(
                "{} is not the peer's broker",
                svid.spiffe_id
            )));
        }
        if req.get_ref().mesh != peer.mesh {
            return Err(Status::permission_denied(format!(
                "the caller is mesh {}, not {}",
                peer.mesh,
                req.get_ref().mesh
            )));
        }
        Ok(peer)
    }
}

/// What this mesh shows `mesh` now.
async fn peer_update(state: &BrokerState, mesh: &str) -> pb::PeerUpdate {
    let (services, bundle) = state.peer_view(mesh).await;
    pb::PeerUpdate {
        services: services
            .iter()
            .map(|r| pb::PeerService {
                cluster: r.from.name.to_string(),
                cluster_info: Some(wire::cluster_info_pb(&r.from)),
                service: Some(wire::exported_service_pb(&r.service)),
            })
            .collect(),
        bundle: bundle.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn establish(
        &self,
        req: Request<pb::EstablishRequest>,
    ) -> Result<Response<pb::EstablishResponse>, Status> {
        let record = accept(&self.state, req.get_ref(), OffsetDateTime::now_utc()).await?;
        tracing::info!(mesh = %record.mesh, trust_domain = %record.trust_domain, "mesh peered (inbound)");
        spawn_puller(self.state.clone(), record.mesh.clone());
        Ok(Response::new(pb::EstablishResponse {
            mesh: self.state.mesh_name.clone(),
            trust_domain: self.state.trust_domain.to_string(),
            bundle: self
                .state
                .spiffe_bundle_json()
                .map_err(|e| Status::internal(e.to_string()))?,
        }))
    }

    type SyncStream = tokio_stream::wrappers::ReceiverStream<Result<pb::PeerUpdate, Status>>;

    async fn sync(
        &self,
        req: Request<pb::PeerHello>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let peer = self.caller(&req)?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut revisions = state.subscribe();
            let mut last: Option<pb::PeerUpdate> = None;
            loop {
                let update = peer_update(&state, &peer.mesh).await;
                if last.as_ref() != Some(&update) {
                    if tx.send(Ok(update.clone())).await.is_err() {
                        return;
                    }
                    last = Some(update);
                }
                tokio::select! {
                    r = revisions.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// Verifies peer brokers' client certificates against their own trust
/// domain's bundle (the one the certificate names); no certificate is
/// allowed through the handshake for `Establish`.
#[derive(Debug)]
pub struct PeerClientVerifier {
    pub peers: Peers,
}

impl rustls::server::danger::ClientCertVerifier for PeerClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let leaf = strait_ca::cert::CertSummary::from_der(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let td = leaf
            .spiffe_id
            .as_deref()
            .and_then(|i| SpiffeId::parse(i).ok())
            .map(|i| i.trust_domain_str().to_string())
            .ok_or_else(|| rustls::Error::General("no SPIFFE ID".into()))?;
        let trust = self
            .peers
            .trust_for(&td)
            .ok_or_else(|| rustls::Error::General(format!("{td} is not a peered trust domain")))?;
        let chain: Vec<Vec<u8>> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.as_ref().to_vec())
            .collect();
        let when = OffsetDateTime::from_unix_timestamp(now.as_secs() as i64)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        trust
            .verify(&chain, when)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        strait_ca::tls::verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        strait_ca::tls::verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        strait_ca::tls::verify_schemes()
    }
}
