//! Read-only views of the broker state for the gRPC services: each is read
//! under the state's lock, so at one revision, and returned as owned values
//! (the protobuf conversions stay with the services).

use std::collections::{BTreeMap, BTreeSet};

use strait_ca::ClusterName;
use strait_model::mesh::{ClusterInfo, ExportedService, RemoteService, ServiceKey};
use time::OffsetDateTime;

use super::{BrokerState, ClusterRecord, Membership};
use crate::reconcile::ImportUpdate;

/// What a joined cluster imports now (`straitctl cluster imports`).
#[derive(Debug, Clone)]
pub struct ClusterImports {
    /// The importing cluster as the mesh knows it.
    pub info: ClusterInfo,
    pub services: BTreeMap<ServiceKey, Vec<RemoteService>>,
    /// The mesh revision these imports are at.
    pub revision: u64,
}

/// The trust a cluster must hold, as a sync stream pushes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustView {
    pub bundle_version: u64,
    /// DER roots of the mesh's bundle.
    pub roots: Vec<Vec<u8>>,
    /// Fingerprints of deny-listed intermediates.
    pub denied: BTreeSet<String>,
    /// PEM roots of peered meshes, by trust domain.
    pub federated_bundles: BTreeMap<String, String>,
    pub bind_identities: bool,
    /// What each joined cluster runs (empty unless identities are bound).
    pub cluster_identities: BTreeMap<String, BTreeSet<String>>,
}

/// What a cluster's sync stream has to push, from what the cluster has.
#[derive(Debug, Clone)]
pub struct PushView {
    /// Why the cluster should renew its intermediate now, if it should.
    pub renew: Option<&'static str>,
    /// The trust, when the cluster's bundle version is not the current one.
    pub trust: Option<TrustView>,
    /// The imports the cluster lacks (possibly nothing).
    pub imports: ImportUpdate,
}

impl BrokerState {
    /// The export revision the broker holds for `cluster` (0: none).
    pub async fn export_revision(&self, cluster: &ClusterName) -> u64 {
        let inner = self.inner.lock().await;
        inner.mesh.cluster(cluster).map_or(0, |c| c.export_revision)
    }

    /// How many services the clusters export, all together.
    pub async fn export_count(&self) -> usize {
        let inner = self.inner.lock().await;
        inner.mesh.clusters().map(|(_, c)| c.exports.len()).sum()
    }

    /// Every cluster record, by name, with how many services it exports.
    pub async fn cluster_records(&self) -> Vec<(ClusterRecord, usize)> {
        let inner = self.inner.lock().await;
        inner
            .records
            .values()
            .map(|r| {
                let exports = ClusterName::new(&r.name)
                    .ok()
                    .and_then(|n| inner.mesh.cluster(&n).map(|c| c.exports.len()))
                    .unwrap_or(0);
                (r.clone(), exports)
            })
            .collect()
    }

    /// The exports of every cluster, or of the cluster named `cluster`
    /// only (empty: every cluster).
    pub async fn exports(&self, cluster: &str) -> Vec<(ClusterName, ExportedService)> {
        let inner = self.inner.lock().await;
        inner
            .mesh
            .clusters()
            .filter(|(n, _)| cluster.is_empty() || n.as_str() == cluster)
            .flat_map(|(n, c)| c.exports.values().map(move |s| (n.clone(), s.clone())))
            .collect()
    }

    /// What `cluster` imports now; `None` when it has not joined.
    pub async fn imports_of(&self, cluster: &ClusterName) -> Option<ClusterImports> {
        let inner = self.inner.lock().await;
        let importer = inner.mesh.cluster(cluster)?;
        Some(ClusterImports {
            info: importer.info.clone(),
            services: inner.mesh.imports_for(cluster),
            revision: inner.mesh.revision(),
        })
    }

    /// What `cluster`'s sync stream must push to a cluster that applied
    /// imports up to `import_revision` (`same_epoch`: of this broker's
    /// history) and holds bundle version `bundle_version`; `None` when the
    /// cluster is not joined (any more).
    pub async fn push_view(
        &self,
        cluster: &ClusterName,
        import_revision: u64,
        same_epoch: bool,
        bundle_version: u64,
        now: OffsetDateTime,
    ) -> Option<PushView> {
        let inner = self.inner.lock().await;
        let renew = match inner.records.get(cluster.as_str()) {
            Some(r) if r.membership == Membership::Joined => r.renewal_due(now),
            _ => return None,
        };
        let trust = (inner.bundle_version != bundle_version).then(|| TrustView {
            bundle_version: inner.bundle_version,
            roots: self.trust.bundle().roots().to_vec(),
            denied: inner.denied.clone(),
            federated_bundles: self.peers.federated_bundles(),
            bind_identities: inner.bind_identities,
            cluster_identities: inner.cluster_identities().unwrap_or_default(),
        });
        let imports = inner
            .mesh
            .import_update(cluster, import_revision, same_epoch);
        Some(PushView {
            renew,
            trust,
            imports,
        })
    }
}
