//! Which clusters are withdrawn for want of a sync stream: a state machine
//! free of I/O and of the clock (it takes `Instant`s).
//!
//! A cluster whose last sync stream ended, and that opened no new one within
//! the grace period, is *withdrawn*: the broker publishes its exports to every
//! importer with no healthy endpoints (see
//! [`Mesh::plan_withdrawn`](crate::reconcile::Mesh::plan_withdrawn)), so
//! traffic fails over to other clusters instead of going to a gateway that
//! may be gone. It is restored as soon as it opens a stream again.
//!
//! - A broker that starts counts every joined cluster as without a stream
//!   since its start, so a broker restart withdraws only the clusters that
//!   do not reconnect within the grace, not all of them at once.
//! - A cluster withdrawn before a restart stays withdrawn until it connects.
//! - Several streams of one cluster (a reconnect that overlaps the old
//!   stream) count as one: the cluster is down only when the last one ends.
//! - No grace (`None`): nobody is ever withdrawn; withdrawn clusters are
//!   still restored when they connect.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use strait_ca::ClusterName;

/// The default grace: how long a cluster may be without a sync stream
/// before its exports are withdrawn.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    streams: usize,
    /// Since when the cluster has had no stream (`None`: it has one).
    down_since: Option<Instant>,
    withdrawn: bool,
}

/// The liveness of every cluster the broker tracks.
#[derive(Debug, Clone)]
pub struct Liveness {
    grace: Option<Duration>,
    clusters: BTreeMap<ClusterName, Entry>,
}

impl Liveness {
    /// `grace`: `None` never withdraws anyone.
    pub fn new(grace: Option<Duration>) -> Self {
        Liveness {
            grace,
            clusters: BTreeMap::new(),
        }
    }

    pub fn grace(&self) -> Option<Duration> {
        self.grace
    }

    /// Changes the grace; running graces are measured with the new one.
    pub fn set_grace(&mut self, grace: Option<Duration>) {
        self.grace = grace;
    }

    /// A joined cluster, as loaded at start (`now`): no stream yet;
    /// `withdrawn` as stored.
    pub fn track(&mut self, cluster: ClusterName, withdrawn: bool, now: Instant) {
        self.clusters.insert(
            cluster,
            Entry {
                streams: 0,
                down_since: Some(now),
                withdrawn,
            },
        );
    }

    /// A sync stream of `cluster` opened. True: the cluster was withdrawn
    /// and must be restored.
    pub fn opened(&mut self, cluster: &ClusterName) -> bool {
        let e = self.clusters.entry(cluster.clone()).or_insert(Entry {
            streams: 0,
            down_since: None,
            withdrawn: false,
        });
        e.streams += 1;
        e.down_since = None;
        std::mem::replace(&mut e.withdrawn, false)
    }

    /// A sync stream of `cluster` ended at `now`.
    pub fn closed(&mut self, cluster: &ClusterName, now: Instant) {
        let e = self.clusters.entry(cluster.clone()).or_insert(Entry {
            streams: 1,
            down_since: None,
            withdrawn: false,
        });
        e.streams = e.streams.saturating_sub(1);
        if e.streams == 0 {
            e.down_since = Some(now);
        }
    }

    /// The cluster left the mesh (revoked): no longer tracked.
    pub fn forget(&mut self, cluster: &ClusterName) {
        self.clusters.remove(cluster);
    }

    /// Whether the cluster's exports should be withdrawn now.
    pub fn is_withdrawn(&self, cluster: &ClusterName) -> bool {
        self.clusters.get(cluster).is_some_and(|e| e.withdrawn)
    }

    /// Marks withdrawn the clusters whose grace ran out by `now`, and
    /// returns them.
    pub fn due(&mut self, now: Instant) -> Vec<ClusterName> {
        let Some(grace) = self.grace else {
            return Vec::new();
        };
        let mut due = Vec::new();
        for (name, e) in &mut self.clusters {
            if let Some(since) = e.down_since
                && !e.withdrawn
                && now.saturating_duration_since(since) >= grace
            {
                e.withdrawn = true;
                due.push(name.clone());
            }
        }
        due
    }

    /// When the next cluster's grace runs out, if any is running.
    pub fn next_deadline(&self) -> Option<Instant> {
        let grace = self.grace?;
        self.clusters
            .values()
            .filter(|e| !e.withdrawn)
            .filter_map(|e| e.down_since)
            .min()
            .map(|since| since + grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_cluster_is_withdrawn_after_the_grace_and_restored_on_return() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Some(10 * S));
        assert!(!l.opened(&name("west")));
        assert_eq!(l.next_deadline(), None);
        l.closed(&name("west"), t0);
        assert_eq!(l.next_deadline(), Some(t0 + 10 * S));
        assert!(l.due(t0 + 9 * S).is_empty());
        assert!(!l.is_withdrawn(&name("west")));
        assert_eq!(l.due(t0 + 10 * S), [name("west")]);
        assert!(l.is_withdrawn(&name("west")));
        // Reported once; no deadline left.
        assert!(l.due(t0 + 20 * S).is_empty());
        assert_eq!(l.next_deadline(), None);
        assert!(l.opened(&name("west")), "returning restores it");
        assert!(!l.is_withdrawn(&name("west")));
        assert!(!l.opened(&name("west")), "a second stream restores nothing");
    }

    #[test]
    fn a_return_within_the_grace_withdraws_nothing() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Some(10 * S));
        l.opened(&name("west"));
        l.closed(&name("west"), t0);
        assert!(!l.opened(&name("west")));
        assert!(l.due(t0 + 60 * S).is_empty());
        // The grace starts again at the next close.
        l.closed(&name("west"), t0 + 60 * S);
        assert!(l.due(t0 + 69 * S).is_empty());
        assert_eq!(l.due(t0 + 70 * S), [name("west")]);
    }

    #[test]
    fn overlapping_streams_count_as_one() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Some(10 * S));
        l.opened(&name("west"));
        l.opened(&name("west"));
        l.closed(&name("west"), t0);
        assert_eq!(l.next_deadline(), None, "one stream is still up");
        assert!(l.due(t0 + 60 * S).is_empty());
        l.closed(&name("west"), t0 + 60 * S);
        assert_eq!(l.due(t0 + 70 * S), [name("west")]);
    }

    #[test]
    fn a_broker_start_gives_every_cluster_the_grace() {
        let start = Instant::now();
        let mut l = Liveness::new(Some(10 * S));
        for n in ["east", "west", "north"] {
            l.track(name(n), false, start);
        }
        // east and west reconnect after the restart; north does not.
        l.opened(&name("east"));
        assert!(l.due(start + 5 * S).is_empty());
        l.opened(&name("west"));
        assert_eq!(l.due(start + 10 * S), [name("north")]);
    }

    #[test]
    fn a_cluster_withdrawn_before_a_restart_stays_so_until_it_connects() {
        let start = Instant::now();
        let mut l = Liveness::new(Some(10 * S));
        l.track(name("west"), true, start);
        assert!(l.is_withdrawn(&name("west")));
        assert_eq!(l.next_deadline(), None);
        assert!(l.due(start + 60 * S).is_empty(), "not reported twice");
        assert!(l.opened(&name("west")));
    }

    #[test]
    fn no_grace_never_withdraws_but_still_restores() {
        let t0 = Instant::now();
        let mut l = Liveness::new(None);
        l.track(name("east"), false, t0);
        l.track(name("west"), true, t0);
        assert_eq!(l.next_deadline(), None);
        assert!(l.due(t0 + 3600 * S).is_empty());
        assert!(l.opened(&name("west")));
    }

    #[test]
    fn the_earliest_deadline_comes_first_and_forgotten_clusters_have_none() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Some(10 * S));
        l.closed(&name("east"), t0 + 3 * S);
        l.closed(&name("west"), t0);
        assert_eq!(l.next_deadline(), Some(t0 + 10 * S));
        l.forget(&name("west"));
        assert_eq!(l.next_deadline(), Some(t0 + 13 * S));
        assert!(!l.is_withdrawn(&name("west")));
    }
}
