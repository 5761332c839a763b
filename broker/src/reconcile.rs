//! Export/import reconciliation: the broker's state machine, free of I/O.
//!
//! Each cluster publishes its exports as revisioned snapshots and deltas;
//! the broker keeps one revisioned snapshot per cluster. Every change that
//! can alter any cluster's imports bumps the mesh revision and is logged
//! (revision, service key). An importer that reconnects with the revision it
//! last applied gets a delta of the keys changed since then, or a snapshot
//! when its revision is unknown (another broker epoch, a future revision) or
//! older than the log.
//!
//! Changes are planned (pure, on `&self`), then persisted by the caller,
//! then applied: nothing is acknowledged or made visible before it is stored.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use strait_ca::ClusterName;
use strait_model::mesh::{ClusterInfo, ExportedService, RemoteService, ServiceKey};

/// How many changed keys the log keeps before old revisions need a snapshot.
pub const DEFAULT_LOG_CAPACITY: usize = 10_000;

/// A cluster as the broker knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterState {
    pub info: ClusterInfo,
    pub export_revision: u64,
    pub exports: BTreeMap<ServiceKey, ExportedService>,
    /// Its exports reach importers with no healthy endpoints (and no
    /// endpoint addresses): the cluster has been without a sync stream for
    /// longer than the grace (see [`crate::liveness`]). Its own exports, as
    /// it published them, are kept for when it returns.
    pub withdrawn: bool,
}

impl ClusterState {
    /// `s` as importers see it: unchanged, or, while the cluster is
    /// withdrawn, with every endpoint unhealthy and no addresses.
    fn visible(&self, s: &ExportedService) -> ExportedService {
        let mut s = s.clone();
        if self.withdrawn {
            for e in &mut s.endpoints {
                e.healthy = 0;
            }
            s.addresses.clear();
        }
        s
    }
}

/// An exports update from a cluster (after conversion from the wire).
#[derive(Debug, Clone, PartialEq)]
pub enum ExportsChange {
    Snapshot {
        revision: u64,
        services: Vec<ExportedService>,
    },
    Delta {
        base: u64,
        revision: u64,
        upserts: Vec<ExportedService>,
        removals: Vec<ServiceKey>,
    },
}

/// Why an update was refused. Nothing of a refused update is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("cluster {0} is not a member of this mesh")]
    UnknownCluster(String),
    #[error(
        "delta applies on revision {base} but the broker holds revision {have}: send a snapshot"
    )]
    BaseMismatch { have: u64, base: u64 },
    #[error("delta revision {revision} is not after its base revision {base}")]
    NotNewer { base: u64, revision: u64 },
    #[error("service {0} appears twice in one update")]
    Duplicate(String),
    #[error("revision 0 is reserved for \"nothing exported yet\"")]
    ZeroRevision,
}

/// A planned change: what to persist, then apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub cluster: ClusterName,
    /// The cluster's new state (`None`: the cluster is removed).
    pub state: Option<ClusterState>,
    /// Keys whose imports may change for some importer.
    pub changed: BTreeSet<ServiceKey>,
    /// The mesh revision after this plan (unchanged when `changed` is empty).
    pub mesh_revision: u64,
}

impl Plan {
    /// Service keys this plan writes (upserts) and deletes for its cluster,
    /// relative to `before`.
    pub fn export_diff(
        &self,
        before: Option<&ClusterState>,
    ) -> (Vec<ExportedService>, Vec<ServiceKey>) {
        let empty = BTreeMap::new();
        let old = before.map_or(&empty, |s| &s.exports);
        let new = self.state.as_ref().map_or(&empty, |s| &s.exports);
        let upserts = new
            .iter()
            .filter(|(k, v)| old.get(k) != Some(v))
            .map(|(_, v)| v.clone())
            .collect();
        let removals = old
            .keys()
            .filter(|k| !new.contains_key(k))
            .cloned()
            .collect();
        (upserts, removals)
    }
}

/// A peered mesh's new snapshot, planned.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerPlan {
    pub mesh: String,
    pub services: Vec<RemoteService>,
    pub changed: BTreeSet<ServiceKey>,
    pub mesh_revision: u64,
}

/// What an importer must apply to catch up.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportUpdate {
    pub revision: u64,
    /// True: `upserts` replaces everything imported before.
    pub snapshot: bool,
    pub upserts: BTreeMap<ServiceKey, Vec<RemoteService>>,
    pub removals: BTreeSet<ServiceKey>,
}

impl ImportUpdate {
    pub fn is_empty(&self) -> bool {
        !self.snapshot && self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// The whole mesh as the broker sees it.
#[derive(Debug, Clone)]
pub struct Mesh {
    clusters: BTreeMap<ClusterName, ClusterState>,
    /// Services peered meshes export to this mesh, by mesh name.
    peers: BTreeMap<String, Vec<RemoteService>>,
    revision: u64,
    log: VecDeque<(u64, ServiceKey)>,
    /// Every change after this revision is in `log`.
    log_floor: u64,
    log_capacity: usize,
}

impl Mesh {
    /// A mesh loaded from the store at `revision`. The change log starts
    /// empty: importers behind `revision` get a snapshot.
    /// Revisions start at 1: 0 always means "nothing applied yet".
    pub fn new(clusters: BTreeMap<ClusterName, ClusterState>, revision: u64) -> Self {
        let revision = revision.max(1);
        Mesh {
            clusters,
            peers: BTreeMap::new(),
            revision,
            log: VecDeque::new(),
            log_floor: revision,
            log_capacity: DEFAULT_LOG_CAPACITY,
        }
    }

    pub fn with_log_capacity(mut self, capacity: usize) -> Self {
        self.log_capacity = capacity.max(1);
        self
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn cluster(&self, name: &ClusterName) -> Option<&ClusterState> {
        self.clusters.get(name)
    }

    pub fn clusters(&self) -> impl Iterator<Item = (&ClusterName, &ClusterState)> {
        self.clusters.iter()
    }

    /// Takes the mesh another broker replica committed (its clusters and
    /// peers as stored, at `revision`), logging every service whose imports
    /// may differ at `revision`, so that importers behind get only what
    /// changed, as after a commit of this replica's own.
    pub fn follow(
        &mut self,
        clusters: BTreeMap<ClusterName, ClusterState>,
        peers: BTreeMap<String, Vec<RemoteService>>,
        revision: u64,
    ) {
        let mut changed = BTreeSet::new();
        let names: BTreeSet<ClusterName> = self
            .clusters
            .keys()
            .chain(clusters.keys())
            .cloned()
            .collect();
        for name in &names {
            changed.extend(self.plan(name, clusters.get(name).cloned()).changed);
        }
        let meshes: BTreeSet<String> = self.peers.keys().chain(peers.keys()).cloned().collect();
        for mesh in &meshes {
            let services = peers.get(mesh).cloned().unwrap_or_default();
            changed.extend(self.plan_peer(mesh, services).changed);
        }
        self.clusters = clusters;
        self.peers = peers;
        // Revisions start at 1 (a store that never changed says 0).
        let revision = revision.max(1);
        if revision < self.revision {
            // Not a history this one knows: every importer gets a snapshot.
            self.log.clear();
            self.revision = revision;
            self.log_floor = self.revision;
            return;
        }
        if changed.is_empty() {
            self.revision = revision.max(self.revision);
        } else {
            self.record(changed, revision);
        }
    }

    fn plan(&self, cluster: &ClusterName, state: Option<ClusterState>) -> Plan {
        let before = self.clusters.get(cluster);
        let mut changed = BTreeSet::new();
        let info_changed = match (before, &state) {
            (Some(b), Some(s)) => b.info != s.info || b.withdrawn != s.withdrawn,
            _ => true,
        };
        let empty = BTreeMap::new();
        let old = before.map_or(&empty, |s| &s.exports);
        let new = state.as_ref().map_or(&empty, |s| &s.exports);
        for (k, v) in new {
            if info_changed || old.get(k) != Some(v) {
                changed.insert(k.clone());
            }
        }
        for k in old.keys() {
            if info_changed || !new.contains_key(k) {
                changed.insert(k.clone());
            }
        }
        let mesh_revision = if changed.is_empty() {
            self.revision
        } else {
            self.revision + 1
        };
        Plan {
            cluster: cluster.clone(),
            state,
            changed,
            mesh_revision,
        }
    }

    /// Adds a cluster that just joined (or replaces its info on rejoin,
    /// keeping its exports).
    pub fn plan_join(&self, info: ClusterInfo) -> Plan {
        let name = info.name.clone();
        let state = match self.clusters.get(&name) {
            Some(existing) => ClusterState {
                info,
                ..existing.clone()
            },
            None => ClusterState {
                info,
                export_revision: 0,
                exports: BTreeMap::new(),
                withdrawn: false,
            },
        };
        self.plan(&name, Some(state))
    }

    /// A cluster's new network, locality or gateway addresses.
    pub fn plan_info(&self, cluster: &ClusterName, info: ClusterInfo) -> Result<Plan, SyncError> {
        let existing = self
            .clusters
            .get(cluster)
            .ok_or_else(|| SyncError::UnknownCluster(cluster.to_string()))?;
        // The name in the info is the authenticated one, whatever was sent.
        let info = ClusterInfo {
            name: cluster.clone(),
            ..info
        };
        Ok(self.plan(
            cluster,
            Some(ClusterState {
                info,
                ..existing.clone()
            }),
        ))
    }

    /// Withdraws a cluster's exports from every importer (`true`: they are
    /// published with no healthy endpoints) or restores them (`false`).
    pub fn plan_withdrawn(
        &self,
        cluster: &ClusterName,
        withdrawn: bool,
    ) -> Result<Plan, SyncError> {
        let existing = self
            .clusters
            .get(cluster)
            .ok_or_else(|| SyncError::UnknownCluster(cluster.to_string()))?;
        Ok(self.plan(
            cluster,
            Some(ClusterState {
                withdrawn,
                ..existing.clone()
            }),
        ))
    }

    /// Removes a cluster (revocation): its exports leave every importer.
    pub fn plan_remove(&self, cluster: &ClusterName) -> Result<Plan, SyncError> {
        if !self.clusters.contains_key(cluster) {
            return Err(SyncError::UnknownCluster(cluster.to_string()));
        }
        Ok(self.plan(cluster, None))
    }

    /// An exports update from `cluster` (the identity its certificate names:
    /// an update can only ever touch the sender's own exports).
    pub fn plan_exports(
        &self,
        cluster: &ClusterName,
        change: ExportsChange,
    ) -> Result<Plan, SyncError> {
        let existing = self
            .clusters
            .get(cluster)
            .ok_or_else(|| SyncError::UnknownCluster(cluster.to_string()))?;
        let (revision, exports) = match change {
            ExportsChange::Snapshot { revision, services } => {
                if revision == 0 {
                    return Err(SyncError::ZeroRevision);
                }
                let mut exports = BTreeMap::new();
                for s in services {
                    let key = s.key.clone();
                    if exports.insert(key.clone(), s).is_some() {
                        return Err(SyncError::Duplicate(key.to_string()));
                    }
                }
                (revision, exports)
            }
            ExportsChange::Delta {
                base,
                revision,
                upserts,
                removals,
            } => {
                if base != existing.export_revision {
                    return Err(SyncError::BaseMismatch {
                        have: existing.export_revision,
                        base,
                    });
                }
                if revision <= base {
                    return Err(SyncError::NotNewer { base, revision });
                }
                let mut seen = BTreeSet::new();
                for key in upserts.iter().map(|s| &s.key).chain(removals.iter()) {
                    if !seen.insert(key.clone()) {
                        return Err(SyncError::Duplicate(key.to_string()));
                    }
                }
                let mut exports = existing.exports.clone();
                for key in removals {
                    exports.remove(&key);
                }
                for s in upserts {
                    exports.insert(s.key.clone(), s);
                }
                (revision, exports)
            }
        };
        Ok(self.plan(
            cluster,
            Some(ClusterState {
                info: existing.info.clone(),
                export_revision: revision,
                exports,
                withdrawn: existing.withdrawn,
            }),
        ))
    }

    /// Applies a plan that was persisted.
    pub fn apply(&mut self, plan: Plan) {
        match plan.state {
            Some(state) => {
                self.clusters.insert(plan.cluster, state);
            }
            None => {
                self.clusters.remove(&plan.cluster);
            }
        }
        self.record(plan.changed, plan.mesh_revision);
    }

    /// The services a peered mesh exports to this mesh now (a snapshot);
    /// an empty list forgets the peer.
    pub fn plan_peer(&self, mesh: &str, services: Vec<RemoteService>) -> PeerPlan {
        let empty = Vec::new();
        let old = self.peers.get(mesh).unwrap_or(&empty);
        let index = |list: &[RemoteService]| -> BTreeMap<(ServiceKey, String), RemoteService> {
            list.iter()
                .map(|r| ((r.service.key.clone(), r.from.name.to_string()), r.clone()))
                .collect()
        };
        let (old_i, new_i) = (index(old), index(&services));
        let mut changed = BTreeSet::new();
        for (k, v) in &new_i {
            if old_i.get(k) != Some(v) {
                changed.insert(k.0.clone());
            }
        }
        for k in old_i.keys() {
            if !new_i.contains_key(k) {
                changed.insert(k.0.clone());
            }
        }
        let mesh_revision = if changed.is_empty() {
            self.revision
        } else {
            self.revision + 1
        };
        PeerPlan {
            mesh: mesh.to_string(),
            services,
            changed,
            mesh_revision,
        }
    }

    /// Restores a peer's services at start-up (already counted in the
    /// stored revision: no bump, no log).
    pub fn load_peer(&mut self, mesh: &str, services: Vec<RemoteService>) {
        if !services.is_empty() {
            self.peers.insert(mesh.to_string(), services);
        }
    }

    pub fn apply_peer(&mut self, plan: PeerPlan) {
        if plan.services.is_empty() {
            self.peers.remove(&plan.mesh);
        } else {
            self.peers.insert(plan.mesh, plan.services);
        }
        self.record(plan.changed, plan.mesh_revision);
    }

    /// What this mesh exports to the peered mesh `mesh`: every cluster's
    /// exports whose export-to names it.
    pub fn exports_to_mesh(&self, mesh: &str) -> Vec<RemoteService> {
        self.clusters
            .values()
            .flat_map(|c| {
                c.exports
                    .values()
                    .filter(|s| s.export_to.allows_mesh(mesh))
                    .map(|s| RemoteService {
                        from: c.info.clone(),
                        service: c.visible(s),
                    })
            })
            .collect()
    }

    fn record(&mut self, changed: BTreeSet<ServiceKey>, mesh_revision: u64) {
        if changed.is_empty() {
            return;
        }
        self.revision = mesh_revision;
        for key in changed {
            self.log.push_back((self.revision, key));
        }
        while self.log.len() > self.log_capacity {
            if let Some((rev, _)) = self.log.pop_front() {
                // Everything up to and including `rev` may be partly gone.
                self.log_floor = self.log_floor.max(rev);
            }
        }
    }

    /// Every exporter of `key` visible to `importer` (never itself), sorted
    /// by cluster name.
    pub fn remotes_for(&self, importer: &ClusterName, key: &ServiceKey) -> Vec<RemoteService> {
        let own = self
            .clusters
            .iter()
            .filter(|(name, _)| *name != importer)
            .filter_map(|(_, c)| {
                let s = c.exports.get(key)?;
                s.export_to.allows_cluster(importer).then(|| RemoteService {
                    from: c.info.clone(),
                    service: c.visible(s),
                })
            });
        // A peered mesh exported these to this whole mesh.
        let peered = self
            .peers
            .values()
            .flatten()
            .filter(|r| &r.service.key == key)
            .cloned();
        own.chain(peered).collect()
    }

    /// Everything `importer` imports now.
    pub fn imports_for(&self, importer: &ClusterName) -> BTreeMap<ServiceKey, Vec<RemoteService>> {
        let keys: BTreeSet<&ServiceKey> = self
            .clusters
            .iter()
            .filter(|(name, _)| *name != importer)
            .flat_map(|(_, c)| c.exports.keys())
            .chain(self.peers.values().flatten().map(|r| &r.service.key))
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                let remotes = self.remotes_for(importer, k);
                (!remotes.is_empty()).then(|| (k.clone(), remotes))
            })
            .collect()
    }

    /// What `importer`, which applied revision `since` of this broker's
    /// history (`same_epoch` false: of another history), needs now.
    pub fn import_update(
        &self,
        importer: &ClusterName,
        since: u64,
        same_epoch: bool,
    ) -> ImportUpdate {
        let snapshot = || ImportUpdate {
            revision: self.revision,
            snapshot: true,
            upserts: self.imports_for(importer),
            removals: BTreeSet::new(),
        };
        if !same_epoch || since > self.revision || since < self.log_floor || since == 0 {
            return snapshot();
        }
        let keys: BTreeSet<&ServiceKey> = self
            .log
            .iter()
            .filter(|(rev, _)| *rev > since)
            .map(|(_, k)| k)
            .collect();
        let mut update = ImportUpdate {
            revision: self.revision,
            snapshot: false,
            upserts: BTreeMap::new(),
            removals: BTreeSet::new(),
        };
        for key in keys {
            let remotes = self.remotes_for(importer, key);
            if remotes.is_empty() {
                update.removals.insert(key.clone());
            } else {
                update.upserts.insert(key.clone(), remotes);
            }
        }
        update
    }
}

#[cfg(test)]
mod tests;
