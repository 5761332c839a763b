//! Peered meshes in the broker state: peer tokens issued and spent, peers
//! stored with the services they export to this mesh (which become imports
//! of every cluster), and what this mesh shows its peers.

use std::time::Duration;

use strait_ca::bundle::BundleError;
use strait_model::mesh::RemoteService;
use time::OffsetDateTime;

use super::{BrokerState, META_REVISION, StateError, json, put_bundle_version, unix};
use crate::peer::{META_PEER, META_PEER_TOKEN, PeerRecord, PeerToken, PeerTokenRecord};
use crate::store::{Batch, Table};

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
        let (token, record) = PeerToken::generate(
            &self.mesh_name,
            &self.trust_domain,
            addresses,
            &self.serving_root(),
            ttl,
            unix(now),
        );
        let mut b = Batch::new();
        b.put(
            Table::Meta,
            format!("{META_PEER_TOKEN}{}", record.id),
            json(&record),
        );
        self.write(|inner| self.commit(inner, &b)).await?;
        self.peers.add_token(record);
        Ok(token)
    }

    /// `Peer.Establish` accepted: stores the spent token `used`, then the
    /// peer (see [`BrokerState::put_peer`]).
    pub async fn record_peering(
        &self,
        used: &PeerTokenRecord,
        record: PeerRecord,
    ) -> Result<(), StateError> {
        let mut b = Batch::new();
        b.put(
            Table::Meta,
            format!("{META_PEER_TOKEN}{}", used.id),
            json(used),
        );
        self.write(|inner| self.commit(inner, &b)).await?;
        self.put_peer(record).await
    }

    /// Stores (or replaces) a peer and its exports, and updates imports.
    pub async fn put_peer(&self, record: PeerRecord) -> Result<(), StateError> {
        self.write(|inner| {
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
                    META_REVISION,
                    plan.mesh_revision.to_string().into_bytes(),
                );
            }
            if bundle_changed {
                put_bundle_version(&mut b, bundle_version);
            }
            self.commit(inner, &b)?;
            self.peers.insert(record.clone());
            let changed = !plan.changed.is_empty();
            inner.mesh.apply_peer(plan);
            inner.bundle_version = bundle_version;
            if changed || bundle_changed {
                let rev = inner.mesh.revision();
                self.revision_tx.send_modify(|r| *r = rev);
            }
            Ok(())
        })
        .await
    }

    /// The SPIFFE bundle (JSON) of this mesh, as its peers get it.
    pub fn spiffe_bundle_json(&self) -> Result<String, BundleError> {
        let mut b = self.trust.bundle().as_ref().clone();
        b.set_trust_domain(self.trust_domain.clone());
        b.to_spiffe_json()
    }

    /// What this mesh shows the peered mesh `mesh`, read together: the
    /// services exported to it, and this mesh's SPIFFE bundle.
    pub async fn peer_view(&self, mesh: &str) -> (Vec<RemoteService>, Result<String, BundleError>) {
        let inner = self.inner.lock().await;
        (inner.mesh.exports_to_mesh(mesh), self.spiffe_bundle_json())
    }
}
