//! Following the store: another broker replica's commits, read back into
//! this replica's state.
//!
//! With a shared store (etcd), every replica serves clusters and admins
//! and commits conditionally on the revision it holds (see
//! [`BrokerState::write`]). A replica learns the others' commits from its
//! watch of the store ([`follow_store`]): a commit newer than what it
//! holds makes it read the store again and [`BrokerState::rebuild`] its
//! state, which logs what changed for its importers (their streams get a
//! delta, as for its own commits), takes the bundle, deny-list and
//! rotation stage the others set, and wakes every stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::load::{self, LoadedRoots};
use super::{BrokerState, ClusterRecord, Inner, Roots, StateError, corrupt};
use crate::store::{Snapshot, StoreError, Table};
use crate::token::TokenRecord;

/// How long a replica waits before watching again after its watch failed.
const REWATCH: Duration = Duration::from_secs(1);

impl BrokerState {
    /// Replaces what `inner` holds with `snapshot`, the store as another
    /// replica left it.
    pub(super) fn rebuild(&self, inner: &mut Inner, snapshot: &Snapshot) -> Result<(), StateError> {
        if snapshot.revision <= inner.store_revision {
            return Ok(());
        }
        let contents = &snapshot.contents;
        let empty = BTreeMap::new();
        let meta = contents.get(&Table::Meta).unwrap_or(&empty);
        let values = load::read_meta(meta)?;
        let records: BTreeMap<String, ClusterRecord> =
            load::rows(contents, Table::Clusters)?.into_iter().collect();
        let tokens: BTreeMap<String, TokenRecord> =
            load::rows(contents, Table::Tokens)?.into_iter().collect();
        let clusters = load::clusters(&records, contents)?;
        let known = self
            .roots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_fp
            .clone();
        let (configured_fp, root_dir) = &self.configured_root;
        let roots: LoadedRoots = load::roots(meta, known, configured_fp, root_dir)?;
        let bundle = load::bundle(&roots)?;
        let signing = roots
            .by_fp
            .get(&roots.rotation.signing)
            .cloned()
            .ok_or_else(|| {
                corrupt(
                    Table::Meta,
                    super::META_ROTATION,
                    "the signing root is not loaded",
                )
            })?;
        let peers = crate::peer::Peers::load(contents)?;

        // Everything parsed: take effect.
        if self.trust.bundle().as_ref() != &bundle {
            self.trust.set_bundle(bundle);
        }
        self.trust.set_denied(values.denied.iter().cloned());
        *self.roots.write().unwrap_or_else(|p| p.into_inner()) = Roots {
            by_fp: roots.by_fp,
            signing,
        };
        self.peers.replace_with(&peers);
        let peer_services = peers
            .list()
            .into_iter()
            .filter(|p| !p.services.is_empty())
            .map(|p| (p.mesh, p.services))
            .collect();
        {
            let start = tokio::time::Instant::now().into_std();
            let mut liveness = self.liveness();
            for (name, c) in &clusters {
                if inner.mesh.cluster(name).is_none() {
                    liveness.track(name.clone(), c.withdrawn, start);
                }
            }
        }
        inner.mesh.follow(clusters, peer_services, values.revision);
        inner.records = records;
        inner.tokens = tokens;
        inner.bundle_version = values.bundle_version;
        inner.denied = values.denied;
        inner.bind_identities = values.bind_identities;
        let rotated = inner.rotation != roots.rotation;
        inner.rotation = roots.rotation;
        inner.root_dirs = roots.root_dirs;
        inner.store_revision = snapshot.revision;
        if rotated {
            self.rotation_tx.send_replace(inner.rotation.clone());
        }
        // Every stream looks again: imports, bundle, deny-list, renewals.
        self.revision_tx.send_replace(inner.mesh.revision());
        Ok(())
    }

    /// Reads the store again if it is past what this replica holds.
    async fn catch_up(self: &Arc<Self>, seen: u64) -> Result<(), StateError> {
        let mut inner = self.inner.lock().await;
        if seen <= inner.store_revision {
            return Ok(());
        }
        self.reread(&mut inner).await
    }

    /// Reads the whole store (off the async workers) into `inner`.
    pub(super) async fn reread(&self, inner: &mut Inner) -> Result<(), StateError> {
        let store = self.store.clone();
        let snapshot = tokio::task::spawn_blocking(move || store.snapshot())
            .await
            .map_err(|e| StoreError::Backend {
                path: "store".into(),
                message: e.to_string(),
            })??;
        self.rebuild(inner, &snapshot)
    }

    /// The store revision this replica's state is at.
    pub async fn store_revision(&self) -> u64 {
        self.inner.lock().await.store_revision
    }

    /// Whether other replicas write the same store.
    pub fn shared_store(&self) -> bool {
        self.store.shared()
    }
}

/// Follows the store's commits for as long as the task runs (a shared
/// store only; a store of one writer has nothing to follow).
pub async fn follow_store(state: Arc<BrokerState>) {
    if !state.store.shared() {
        return;
    }
    loop {
        let after = state.store_revision().await;
        let mut watch = match state.store.watch(after) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "watching the store failed; trying again");
                tokio::time::sleep(REWATCH).await;
                continue;
            }
        };
        loop {
            match watch.next().await {
                Some(Ok(change)) => {
                    // Whatever else is queued is read by the same catch-up.
                    let mut newest = change.revision;
                    while let Ok(Some(Ok(c))) =
                        tokio::time::timeout(Duration::ZERO, watch.next()).await
                    {
                        newest = newest.max(c.revision);
                    }
                    if let Err(e) = state.catch_up(newest).await {
                        tracing::error!(error = %e, revision = newest, "reading another replica's commit failed");
                        break;
                    }
                }
                Some(Err(StoreError::Compacted { oldest, .. })) => {
                    // Too far behind for the watch: read everything.
                    if let Err(e) = state.catch_up(oldest.max(after + 1)).await {
                        tracing::error!(error = %e, "reading the store after a compaction failed");
                    }
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the store's watch ended; watching again");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(REWATCH).await;
    }
}
