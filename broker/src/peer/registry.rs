//! The peered meshes and the peer tokens this broker issued, as loaded from
//! the store's meta table: shared (behind their own locks) by the broker
//! state, the peer API's certificate verifier and the pullers.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use strait_ca::tls::Trust;
use strait_ca::{TrustBundle, TrustDomain};
use strait_model::mesh::RemoteService;

use super::token::{PeerTokenRecord, TokenRefusal};
use crate::state::{StateError, corrupt};
use crate::store::{Contents, Table};

/// Meta key prefix of a peer's record (`peer/<mesh>`).
pub(crate) const META_PEER: &str = "peer/";
/// Meta key prefix of a peer token's record (`peer_token/<id>`).
pub(crate) const META_PEER_TOKEN: &str = "peer_token/";

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
                    peers.write_tokens().insert(id.to_string(), r);
                }
            }
        }
        Ok(peers)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, PeerRecord>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn write_tokens(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, PeerTokenRecord>> {
        self.tokens.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the peers and tokens of `other` (another replica stored them),
    /// keeping what this replica knows of connections.
    pub(crate) fn replace_with(&self, other: &Peers) {
        let peers = other
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tokens = other
            .tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        *self.write() = peers;
        *self.write_tokens() = tokens;
    }

    /// Replaces (or adds) a peer; the broker state does this once stored.
    pub(crate) fn insert(&self, record: PeerRecord) {
        self.write().insert(record.mesh.clone(), record);
    }

    /// Adds a token this broker issued (once stored).
    pub(crate) fn add_token(&self, record: PeerTokenRecord) {
        self.write_tokens().insert(record.id.clone(), record);
    }

    /// Spends the token `id` in memory if `secret_sha256` matches and it is
    /// unused and unexpired at `now_unix`.
    pub(crate) fn spend_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now_unix: u64,
    ) -> Result<(), TokenRefusal> {
        let mut tokens = self.write_tokens();
        let rec = tokens.get_mut(id).ok_or(TokenRefusal::Unknown)?;
        rec.admit(secret_sha256, now_unix)?;
        rec.used = true;
        Ok(())
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

    pub(crate) fn by_trust_domain(&self, td: &str) -> Option<PeerRecord> {
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

    pub(crate) fn set_connected(&self, mesh: &str, up: bool) {
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
    pub(crate) fn trust_for(&self, td: &str) -> Option<Trust> {
        let p = self.by_trust_domain(td)?;
        let td = TrustDomain::new(&p.trust_domain).ok()?;
        let b = TrustBundle::from_spiffe_json(p.bundle.as_bytes(), Some(td)).ok()?;
        Some(Trust::new(b))
    }
}
