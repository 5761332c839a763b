//! The broker's side of [`crate::liveness`]: sync sessions report their
//! start and end, a timer withdraws clusters whose grace ran out, and both
//! bring the mesh in line with what the liveness says, as ordinary
//! (persisted, revisioned) mesh changes that every importer receives.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use strait_ca::ClusterName;

use super::{BrokerState, StateError};
use crate::liveness::Liveness;
use crate::store::Batch;

/// How soon a failed withdrawal or restoration is tried again.
const RETRY: Duration = Duration::from_secs(1);

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// A live sync stream of a cluster; its end starts the cluster's grace.
pub struct LiveStream {
    state: Arc<BrokerState>,
    cluster: ClusterName,
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.state.liveness().closed(&self.cluster, now());
        self.state.stream_event(&self.cluster, false);
        self.state.liveness_changed.notify_one();
    }
}

impl BrokerState {
    pub(crate) fn liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a cluster may be without a sync stream before its exports
    /// are withdrawn (`None`: never).
    pub fn set_cluster_grace(&self, grace: Option<Duration>) {
        self.liveness().set_grace(grace);
        self.liveness_changed.notify_one();
    }

    /// Whether `cluster`'s exports are withdrawn from importers now.
    pub async fn is_withdrawn(&self, cluster: &ClusterName) -> bool {
        let inner = self.inner.lock().await;
        inner.mesh.cluster(cluster).is_some_and(|c| c.withdrawn)
    }

    /// A sync stream of `cluster` is up (it said Hello): restores the
    /// cluster if it was withdrawn. Hold the guard while the stream lives.
    pub async fn stream_opened(
        self: &Arc<Self>,
        cluster: &ClusterName,
    ) -> Result<LiveStream, StateError> {
        let restore = self.liveness().opened(cluster);
        self.stream_event(cluster, true);
        let guard = LiveStream {
            state: self.clone(),
            cluster: cluster.clone(),
        };
        if restore {
            self.apply_liveness(cluster).await?;
        }
        Ok(guard)
    }

    /// Brings the mesh in line with the liveness of `cluster` (whichever
    /// caller comes last reads the latest liveness, so that a return racing
    /// a withdrawal cannot leave a connected cluster withdrawn).
    pub(crate) async fn apply_liveness(&self, cluster: &ClusterName) -> Result<(), StateError> {
        self.write(|inner| {
        let want = self.liveness().is_withdrawn(cluster);
        let Some(current) = inner.mesh.cluster(cluster) else {
            // Revoked meanwhile.
            self.liveness().forget(cluster);
            return Ok(());
        };
        if current.withdrawn == want {
            return Ok(());
        }
        let exports = current.exports.len();
        let plan = inner.mesh.plan_withdrawn(cluster, want)?;
        let revision = self.commit_plan(inner, plan, Batch::new(), None)?;
        if want {
            tracing::warn!(
                %cluster,
                exports,
                revision,
                grace_seconds = self.liveness().grace().map_or(0.0, |g| g.as_secs_f64()),
                "no sync stream from the cluster within the grace: its exports are withdrawn from importers"
            );
        } else {
            tracing::info!(%cluster, exports, revision, "cluster is back: its exports are restored");
        }
        Ok(())
        })
        .await
    }
}

/// Withdraws clusters whose grace runs out, until the task is dropped.
pub async fn watch_liveness(state: Arc<BrokerState>) {
    let mut failed: BTreeSet<ClusterName> = BTreeSet::new();
    loop {
        let woken = state.liveness_changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let mut deadline = state
            .liveness()
            .next_deadline()
            .map(tokio::time::Instant::from_std);
        if !failed.is_empty() {
            let retry = tokio::time::Instant::now() + RETRY;
            deadline = Some(deadline.map_or(retry, |d| d.min(retry)));
        }
        match deadline {
            Some(d) => tokio::select! {
                () = tokio::time::sleep_until(d) => {}
                () = &mut woken => {}
            },
            None => woken.await,
        }
        let due = state.liveness().due(now());
        failed.extend(due);
        let todo = std::mem::take(&mut failed);
        for cluster in todo {
            if let Err(e) = state.apply_liveness(&cluster).await {
                tracing::error!(%cluster, error = %e, "withdrawing the cluster's exports failed; retrying");
                failed.insert(cluster);
            }
        }
    }
}
