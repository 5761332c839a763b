//! Peering between meshes (federation across trust domains).
//!
//! One broker issues a peer token; the other presents it to the first's
//! peer API (`Establish`, no client certificate; the token's secret and
//! pinned root authenticate both sides). The two SPIFFE bundles are
//! exchanged and kept per trust domain, never merged. From then on each
//! broker pulls the other's `Sync` stream with its own broker identity,
//! verified against its own trust domain's bundle, and receives the services
//! the other mesh exports to `mesh:<its name>`. Those reach every cluster
//! of the importing mesh, with the foreign bundle in their trust updates.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust};
use strait_ca::{SpiffeId, TrustBundle, TrustDomain};
use strait_model::mesh::RemoteService;
use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::state::{BrokerState, StateError, corrupt, json, unix};
use crate::store::{Batch, Contents, Table};
use crate::wire;

pub const PEER_TOKEN_PREFIX: &str = "spt1.";
const META_PEER: &str = "peer/";
const META_PEER_TOKEN: &str = "peer_token/";
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A peer token as pasted between operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerToken {
    /// Token id (16 hex).
    pub i: String,
    /// Issuing mesh name and trust domain.
    pub m: String,
    pub t: String,
    /// Its peer API addresses.
    pub a: Vec<String>,
    /// SHA-256 (lowercase hex) of its serving root.
    pub h: String,
    /// Secret (base64url, 32 bytes).
    pub s: String,
    /// Expiry (unix seconds).
    pub e: u64,
}

impl PeerToken {
    pub fn encode(&self) -> String {
        format!(
            "{PEER_TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
        )
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() > 4096 {
            return Err("peer token is too long".into());
        }
        let body = text
            .strip_prefix(PEER_TOKEN_PREFIX)
            .ok_or_else(|| format!("a peer token starts with {PEER_TOKEN_PREFIX:?}"))?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| format!("peer token is not base64url: {e}"))?;
        let t: PeerToken =
            serde_json::from_slice(&raw).map_err(|e| format!("peer token payload: {e}"))?;
        TrustDomain::new(&t.t).map_err(|e| format!("peer token trust domain: {e}"))?;
        if t.a.is_empty() {
            return Err("peer token has no address".into());
        }
        if t.h.len() != 64 || t.i.len() != 16 {
            return Err("peer token is malformed (root hash or id)".into());
        }
        Ok(t)
    }
}

/// What a broker keeps of a token it issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PeerTokenRecord {
    id: String,
    secret_sha256: String,
    expires_unix: u64,
    used: bool,
}

/// A peered mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub mesh: String,
    pub trust_domain: String,
    /// Its SPIFFE bundle (JWKS JSON).
    pub bundle: String,
    pub addresses: Vec<String>,
    pub direction: String,
    /// What it exports to this mesh (last snapshot).
    #[serde(default)]
    pub services: Vec<RemoteService>,
}

/// The peered meshes, shared with the peer API's verifier.
#[derive(Clone, Default)]
pub struct Peers {
    inner: Arc<RwLock<BTreeMap<String, PeerRecord>>>,
    tokens: Arc<RwLock<BTreeMap<String, PeerTokenRecord>>>,
    connected: Arc<RwLock<BTreeMap<String, bool>>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peers")
    }
}

fn sha256_hex(data: &[u8]) -> String {
    strait_ca::tls::sha256_hex(data)
}

fn random(bytes: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b
}

impl Peers {
    /// Loads peers and peer tokens from the store's meta table.
    pub fn load(contents: &Contents) -> Result<Self, StateError> {
        let peers = Peers::default();
        if let Some(meta) = contents.get(&Table::Meta) {
            for (k, v) in meta {
                if let Some(mesh) = k.strip_prefix(META_PEER) {
                    let r: PeerRecord =
                        serde_json::from_slice(v).map_err(|e| corrupt(Table::Meta, k, e))?;
                    peers.write().insert(mesh.to_string(), r);
                } else if let Some(id) = k.strip_prefix(META_PEER_TOKEN) {
                    let r: PeerTokenRecord =
                        serde_json::from_slice(v).map_err(|e| corrupt(Table::Meta, k, e))?;
                    peers
                        .tokens
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.to_string(), r);
                }
            }
        }
        Ok(peers)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, PeerRecord>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<PeerRecord> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, mesh: &str) -> Option<PeerRecord> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(mesh)
            .cloned()
    }

    fn by_trust_domain(&self, td: &str) -> Option<PeerRecord> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|p| p.trust_domain == td)
            .cloned()
    }

    pub fn is_connected(&self, mesh: &str) -> bool {
        self.connected
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(mesh)
            .copied()
            .unwrap_or(false)
    }

    fn set_connected(&self, mesh: &str, up: bool) {
        self.connected
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mesh.to_string(), up);
    }

    /// PEM roots of every peer, by trust domain (for clusters' trust updates).
    pub fn federated_bundles(&self) -> BTreeMap<String, String> {
        self.list()
            .into_iter()
            .filter_map(|p| {
                let b = TrustBundle::from_spiffe_json(p.bundle.as_bytes(), None).ok()?;
                Some((p.trust_domain, b.to_pem()))
            })
            .collect()
    }

    /// The trust for a peer's identities: its own bundle only.
    fn trust_for(&self, td: &str) -> Option<Trust> {
        let p = self.by_trust_domain(td)?;
        let td = TrustDomain::new(&p.trust_domain).ok()?;
        let b = TrustBundle::from_spiffe_json(p.bundle.as_bytes(), Some(td)).ok()?;
        Some(Trust::new(b))
    }
}

/// The broker identity of a trust domain.
fn broker_id(td: &TrustDomain) -> Result<SpiffeId, Status> {
    crate::client::broker_id(td).map_err(|e| Status::internal(e.to_string()))
}

/// The SPIFFE bundle (JSON) of this mesh.
fn own_bundle_json(state: &BrokerState) -> Result<String, Status> {
    let mut b = state.trust.bundle().as_ref().clone();
    b.set_trust_domain(state.trust_domain.clone());
    b.to_spiffe_json()
        .map_err(|e| Status::internal(e.to_string()))
}

impl BrokerState {
    /// `straitctl peer token`.
    pub async fn peer_token(
        &self,
        addresses: Vec<String>,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<PeerToken, StateError> {
        if addresses.is_empty() {
            return Err(StateError::Invalid(
                "this broker has no peer API: start it with --peer-listen".into(),
            ));
        }
        let id: String = random(8).iter().map(|b| format!("{b:02x}")).collect();
        let secret = random(32);
        let token = PeerToken {
            i: id.clone(),
            m: self.mesh_name.clone(),
            t: self.trust_domain.to_string(),
            a: addresses,
            h: sha256_hex(&self.serving_root()),
            s: URL_SAFE_NO_PAD.encode(&secret),
            e: unix(now).saturating_add(ttl.as_secs()),
        };
        let record = PeerTokenRecord {
            id: id.clone(),
            secret_sha256: sha256_hex(&secret),
            expires_unix: token.e,
            used: false,
        };
        let _guard = self.inner.lock().await;
        let mut b = Batch::new();
        b.put(Table::Meta, format!("{META_PEER_TOKEN}{id}"), json(&record));
        self.store.commit(&b)?;
        self.peers
            .tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, record);
        Ok(token)
    }

    /// Stores (or replaces) a peer and its exports, and updates imports.
    pub async fn put_peer(&self, record: PeerRecord) -> Result<(), StateError> {
        let mut inner = self.inner.lock().await;
        let plan = inner.mesh.plan_peer(&record.mesh, record.services.clone());
        let bundle_changed =
            self.peers.get(&record.mesh).map(|p| p.bundle) != Some(record.bundle.clone());
        let bundle_version = inner.bundle_version + u64::from(bundle_changed);
        let mut b = Batch::new();
        b.put(
            Table::Meta,
            format!("{META_PEER}{}", record.mesh),
            json(&record),
        );
        if !plan.changed.is_empty() {
            b.put(
                Table::Meta,
                "mesh_revision",
                plan.mesh_revision.to_string().into_bytes(),
            );
        }
        if bundle_changed {
            b.put(
                Table::Meta,
                "bundle_version",
                bundle_version.to_string().into_bytes(),
            );
        }
        self.store.commit(&b)?;
        self.peers.write().insert(record.mesh.clone(), record);
        let changed = !plan.changed.is_empty();
        inner.mesh.apply_peer(plan);
        inner.bundle_version = bundle_version;
        if changed || bundle_changed {
            let rev = inner.mesh.revision();
            self.revision_tx.send_modify(|r| *r = rev);
        }
        Ok(())
    }

    /// `Peer.Establish` on the issuing side: spends the token.
    async fn accept_peer(
        &self,
        req: &pb::EstablishRequest,
        now: OffsetDateTime,
    ) -> Result<PeerRecord, Status> {
        let token = PeerToken::parse(&req.token).map_err(Status::invalid_argument)?;
        let secret = URL_SAFE_NO_PAD
            .decode(&token.s)
            .map_err(|_| Status::invalid_argument("peer token secret is not base64url"))?;
        {
            let mut tokens = self.peers.tokens.write().unwrap_or_else(|p| p.into_inner());
            let rec = tokens
                .get_mut(&token.i)
                .ok_or_else(|| Status::permission_denied("peer token is unknown to this broker"))?;
            if rec.secret_sha256 != sha256_hex(&secret) {
                return Err(Status::permission_denied(
                    "peer token secret does not match",
                ));
            }
            if rec.used {
                return Err(Status::permission_denied(
                    "peer token has already been used",
                ));
            }
            if unix(now) >= rec.expires_unix {
                return Err(Status::permission_denied("peer token expired"));
            }
            rec.used = true;
        }
        let td = TrustDomain::new(&req.trust_domain)
            .map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))?;
        if td == self.trust_domain {
            return Err(Status::invalid_argument(
                "a mesh cannot peer with its own trust domain",
            ));
        }
        TrustBundle::from_spiffe_json(req.bundle.as_bytes(), Some(td.clone()))
            .map_err(|e| Status::invalid_argument(format!("bundle: {e}")))?;
        if req.mesh.is_empty() || req.addresses.is_empty() {
            return Err(Status::invalid_argument(
                "mesh name and peer addresses are required",
            ));
        }
        let used = PeerTokenRecord {
            id: token.i.clone(),
            secret_sha256: sha256_hex(&secret),
            expires_unix: token.e,
            used: true,
        };
        let mut b = Batch::new();
        b.put(
            Table::Meta,
            format!("{META_PEER_TOKEN}{}", token.i),
            json(&used),
        );
        self.store
            .commit(&b)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let record = PeerRecord {
            mesh: req.mesh.clone(),
            trust_domain: td.to_string(),
            bundle: req.bundle.clone(),
            addresses: req.addresses.clone(),
            direction: "inbound".into(),
            services: self
                .peers
                .get(&req.mesh)
                .map(|p| p.services)
                .unwrap_or_default(),
        };
        self.put_peer(record.clone()).await.map_err(Status::from)?;
        Ok(record)
    }

    /// `straitctl peer establish`: presents a peer token to the other broker.
    pub async fn establish_peer(
        &self,
        token_text: &str,
        own_addresses: Vec<String>,
    ) -> Result<PeerRecord, StateError> {
        if own_addresses.is_empty() {
            return Err(StateError::Invalid(
                "this broker has no peer API: start it with --peer-listen".into(),
            ));
        }
        let token = PeerToken::parse(token_text).map_err(StateError::Invalid)?;
        let verifier = SpiffeServerVerifier::pinned(&token.h);
        let config = strait_ca::tls::client_config(verifier, None, &[b"h2"])
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        let config = Arc::new(config);
        let mut last = String::new();
        for address in &token.a {
            let channel = strait_runtime::transport::channel(address, config.clone())
                .map_err(|e| StateError::Invalid(e.to_string()))?;
            let mut client = pb::peer_client::PeerClient::new(channel);
            match client
                .establish(pb::EstablishRequest {
                    token: token_text.trim().to_string(),
                    mesh: self.mesh_name.clone(),
                    trust_domain: self.trust_domain.to_string(),
                    bundle: own_bundle_json(self)
                        .map_err(|s| StateError::Invalid(s.message().to_string()))?,
                    addresses: own_addresses.clone(),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    let td = TrustDomain::new(&r.trust_domain)
                        .map_err(|e| StateError::Invalid(e.to_string()))?;
                    if td.as_str() != token.t || r.mesh != token.m {
                        return Err(StateError::Invalid(format!(
                            "the peer answered as mesh {} ({}), but the token is for {} ({})",
                            r.mesh, r.trust_domain, token.m, token.t
                        )));
                    }
                    TrustBundle::from_spiffe_json(r.bundle.as_bytes(), Some(td.clone()))
                        .map_err(|e| StateError::Invalid(format!("the peer's bundle: {e}")))?;
                    let record = PeerRecord {
                        mesh: r.mesh,
                        trust_domain: td.to_string(),
                        bundle: r.bundle,
                        addresses: token.a.clone(),
                        direction: "outbound".into(),
                        services: vec![],
                    };
                    self.put_peer(record.clone()).await?;
                    return Ok(record);
                }
                Err(s) => last = format!("{address}: {}", s.message()),
            }
        }
        Err(StateError::Invalid(format!("peering failed: {last}")))
    }
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
        if svid.spiffe_id != broker_id(&td)? {
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

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn establish(
        &self,
        req: Request<pb::EstablishRequest>,
    ) -> Result<Response<pb::EstablishResponse>, Status> {
        let record = self
            .state
            .accept_peer(req.get_ref(), OffsetDateTime::now_utc())
            .await?;
        tracing::info!(mesh = %record.mesh, trust_domain = %record.trust_domain, "mesh peered (inbound)");
        spawn_puller(self.state.clone(), record.mesh.clone());
        Ok(Response::new(pb::EstablishResponse {
            mesh: self.state.mesh_name.clone(),
            trust_domain: self.state.trust_domain.to_string(),
            bundle: own_bundle_json(&self.state)?,
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
                let update = {
                    let inner = state.lock().await;
                    pb::PeerUpdate {
                        services: inner
                            .mesh
                            .exports_to_mesh(&peer.mesh)
                            .iter()
                            .map(|r| pb::PeerService {
                                cluster: r.from.name.to_string(),
                                cluster_info: Some(wire::cluster_info_pb(&r.from)),
                                service: Some(wire::exported_service_pb(&r.service)),
                            })
                            .collect(),
                        bundle: own_bundle_json(&state).unwrap_or_default(),
                    }
                };
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
            .map_err(rustls::Error::General)?;
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

async fn pull(state: &Arc<BrokerState>, peer: &PeerRecord) -> Result<(), String> {
    let td = TrustDomain::new(&peer.trust_domain).map_err(|e| e.to_string())?;
    let trust = state
        .peers
        .trust_for(&peer.trust_domain)
        .ok_or("peer bundle unreadable")?;
    let verifier = SpiffeServerVerifier::new(
        trust,
        Accept::Ids([broker_id(&td).map_err(|s| s.message().to_string())?].into()),
    );
    let identity = CLIENT_IDENTITY
        .get()
        .cloned()
        .ok_or("the broker identity is not ready")?;
    let mut config = rustls::ClientConfig::builder_with_provider(strait_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let address = peer.addresses.first().ok_or("the peer has no address")?;
    let channel =
        strait_runtime::transport::channel(address, Arc::new(config)).map_err(|e| e.to_string())?;
    let mut client = pb::peer_client::PeerClient::new(channel);
    let mut stream = client
        .sync(pb::PeerHello {
            mesh: state.mesh_name.clone(),
        })
        .await
        .map_err(|s| format!("{address}: {}", s.message()))?
        .into_inner();
    state.peers.set_connected(&peer.mesh, true);
    while let Some(update) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        // The peer speaks only for its own trust domain.
        let mut services = Vec::new();
        for s in &update.services {
            let name = strait_ca::ClusterName::new(&s.cluster).map_err(|e| e.to_string())?;
            let info = wire::cluster_info(
                &name,
                &td,
                s.cluster_info.as_ref().ok_or("missing cluster info")?,
            )
            .map_err(|e| e.to_string())?;
            let service = wire::exported_service(s.service.as_ref().ok_or("missing service")?)
                .map_err(|e| e.to_string())?;
            services.push(RemoteService {
                from: info,
                service,
            });
        }
        let bundle = if update.bundle.is_empty() {
            peer.bundle.clone()
        } else {
            TrustBundle::from_spiffe_json(update.bundle.as_bytes(), Some(td.clone()))
                .map_err(|e| format!("the peer's bundle: {e}"))?;
            update.bundle.clone()
        };
        let current = state.peers.get(&peer.mesh).unwrap_or_else(|| peer.clone());
        state
            .put_peer(PeerRecord {
                services,
                bundle,
                ..current
            })
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(mesh = %peer.mesh, services = update.services.len(), "peer exports updated");
    }
    Ok(())
}

/// Starts pullers for every stored peer (at broker start).
pub fn start_all(state: &Arc<BrokerState>) {
    for p in state.peers.list() {
        spawn_puller(state.clone(), p.mesh);
    }
}
