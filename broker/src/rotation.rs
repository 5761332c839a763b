//! Root rotation as a state machine, free of I/O (time is an argument).
//!
//! ```text
//!  Idle ──begin──▶ Distributing ──advance──▶ Reissuing ──finish──▶ Idle
//!                     │                          │
//!                     └──abort──▶ Idle           └──abort──▶ Reissuing (back to the old root)
//! ```
//!
//! - `begin`: a new root joins the bundle; clusters receive {old, new}.
//! - `advance`: only once every joined cluster acknowledged that bundle;
//!   the broker signs with the new root and asks every cluster for a new
//!   intermediate.
//! - `finish`: only once every cluster's intermediate chains to the new
//!   root and the leaves issued under old intermediates have expired (or
//!   with `force`); the old root leaves the bundle.
//! - `abort`: before `advance` the new root is simply dropped; after it, the
//!   rotation reverses (re-issue under the old root, then `finish` drops the
//!   new one), so no certificate in use ever loses its root.
//!
//! Roots are named by their SHA-256 fingerprint.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Idle,
    Distributing,
    Reissuing,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Distributing => "distributing",
            Stage::Reissuing => "reissuing",
        }
    }
}

/// The persisted rotation state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub stage: Stage,
    /// Roots in the bundle, by fingerprint.
    pub bundle: Vec<String>,
    /// The root that signs intermediates now.
    pub signing: String,
    /// The root being rotated to.
    pub target: Option<String>,
    /// The root being retired.
    pub retiring: Option<String>,
    /// The rotation is running backwards after an abort.
    pub aborting: bool,
    /// When intermediates started to be re-issued (unix seconds).
    pub reissue_started_unix: i64,
}

/// What the state machine needs to know of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub name: String,
    pub bundle_version_acked: u64,
    /// Fingerprint of the root its current intermediate was issued by.
    pub intermediate_root: String,
    /// When it started signing with that intermediate (unix seconds; 0:
    /// not recorded).
    pub installed_unix: i64,
    /// The longest workload certificate its CA issues.
    pub leaf_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    #[error("a root rotation is already in progress (stage {0}); finish or abort it first")]
    InProgress(&'static str),
    #[error("no root rotation is in progress; start one with `begin`")]
    NotInProgress,
    #[error("`{step}` is not possible in stage {stage}; next: {next}")]
    WrongStage {
        step: &'static str,
        stage: &'static str,
        next: &'static str,
    },
    #[error("the new root is already in the bundle")]
    SameRoot,
    #[error("clusters have not acknowledged the bundle with the new root yet: {}", .0.join(", "))]
    NotAcknowledged(Vec<String>),
    #[error("clusters still have intermediates from the old root: {}", .0.join(", "))]
    NotReissued(Vec<String>),
    #[error(
        "leaves issued under cluster {cluster}'s old intermediate may live until {} \
         (it switched intermediates at {} and issues leaves of up to {}); \
         wait, or finish with --force",
        rfc3339(*.until),
        rfc3339(*.switched),
        short_duration(*.leaf_ttl)
    )]
    LeavesMayLive {
        cluster: String,
        until: i64,
        switched: i64,
        leaf_ttl: Duration,
    },
}

/// A duration as `24h`, `90m` or `30s`.
fn short_duration(d: Duration) -> String {
    match d.as_secs() {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A unix time as an RFC 3339 UTC time (the number itself when out of
/// range).
fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {unix}"))
}

impl Rotation {
    /// No rotation: one root that signs.
    pub fn idle(root: &str) -> Self {
        Rotation {
            stage: Stage::Idle,
            bundle: vec![root.to_string()],
            signing: root.to_string(),
            target: None,
            retiring: None,
            aborting: false,
            reissue_started_unix: 0,
        }
    }

    /// What an operator should run next.
    pub fn next_step(&self) -> &'static str {
        match self.stage {
            Stage::Idle => "begin",
            Stage::Distributing => "advance (once every cluster acknowledged the bundle)",
            Stage::Reissuing => {
                "finish (once every intermediate is re-issued and old leaves expired)"
            }
        }
    }

    fn wrong(&self, step: &'static str) -> RotationError {
        RotationError::WrongStage {
            step,
            stage: self.stage.as_str(),
            next: self.next_step(),
        }
    }

    /// Adds `new_root` to the bundle. The caller bumps the bundle version.
    pub fn begin(&self, new_root: &str) -> Result<Rotation, RotationError> {
        if self.stage != Stage::Idle {
            return Err(RotationError::InProgress(self.stage.as_str()));
        }
        if self.bundle.iter().any(|r| r == new_root) {
            return Err(RotationError::SameRoot);
        }
        let mut bundle = self.bundle.clone();
        bundle.push(new_root.to_string());
        Ok(Rotation {
            stage: Stage::Distributing,
            bundle,
            target: Some(new_root.to_string()),
            retiring: Some(self.signing.clone()),
            ..self.clone()
        })
    }

    /// Switches signing to the new root once every cluster holds a bundle
    /// of at least `bundle_version`. The caller asks every cluster for a
    /// new intermediate.
    pub fn advance(
        &self,
        clusters: &[ClusterView],
        bundle_version: u64,
        now_unix: i64,
    ) -> Result<Rotation, RotationError> {
        match self.stage {
            Stage::Distributing => {}
            Stage::Idle => return Err(RotationError::NotInProgress),
            Stage::Reissuing => return Err(self.wrong("advance")),
        }
        let lagging: Vec<String> = clusters
            .iter()
            .filter(|c| c.bundle_version_acked < bundle_version)
            .map(|c| c.name.clone())
            .collect();
        if !lagging.is_empty() {
            return Err(RotationError::NotAcknowledged(lagging));
        }
        let target = self.target.clone().ok_or(RotationError::NotInProgress)?;
        Ok(Rotation {
            stage: Stage::Reissuing,
            signing: target,
            reissue_started_unix: now_unix,
            ..self.clone()
        })
    }

    /// Drops the retiring root from the bundle, once every cluster signs
    /// under the new root and the last leaf any of them issued under the
    /// old one has expired: a cluster's old leaves were issued no later
    /// than it switched intermediates (or than re-issuing began, if that
    /// is later or not recorded), and live at most its CA's leaf TTL cap.
    /// The caller bumps the bundle version.
    pub fn finish(
        &self,
        clusters: &[ClusterView],
        now_unix: i64,
        force: bool,
    ) -> Result<Rotation, RotationError> {
        match self.stage {
            Stage::Reissuing => {}
            Stage::Idle => return Err(RotationError::NotInProgress),
            Stage::Distributing => return Err(self.wrong("finish")),
        }
        let target = self.target.clone().ok_or(RotationError::NotInProgress)?;
        let behind: Vec<String> = clusters
            .iter()
            .filter(|c| c.intermediate_root != target)
            .map(|c| c.name.clone())
            .collect();
        if !behind.is_empty() && !force {
            return Err(RotationError::NotReissued(behind));
        }
        let last = clusters
            .iter()
            .map(|c| {
                let switched = c.installed_unix.max(self.reissue_started_unix);
                let until = switched
                    .saturating_add(i64::try_from(c.leaf_ttl.as_secs()).unwrap_or(i64::MAX));
                (until, switched, c)
            })
            .max_by_key(|(until, _, _)| *until);
        if let Some((until, switched, c)) = last
            && now_unix < until
            && !force
        {
            return Err(RotationError::LeavesMayLive {
                cluster: c.name.clone(),
                until,
                switched,
                leaf_ttl: c.leaf_ttl,
            });
        }
        Ok(Rotation::idle(&target))
    }

    /// Abandons the rotation: before `advance` the new root is dropped at
    /// once (the caller bumps the bundle version); after it, the rotation
    /// reverses towards the old root (the caller asks every cluster for a
    /// new intermediate again).
    pub fn abort(&self, now_unix: i64) -> Result<Rotation, RotationError> {
        match self.stage {
            Stage::Idle => Err(RotationError::NotInProgress),
            Stage::Distributing => {
                let old = self.retiring.clone().ok_or(RotationError::NotInProgress)?;
                Ok(Rotation::idle(&old))
            }
            Stage::Reissuing => {
                let (old, new) = (
                    self.retiring.clone().ok_or(RotationError::NotInProgress)?,
                    self.target.clone().ok_or(RotationError::NotInProgress)?,
                );
                Ok(Rotation {
                    stage: Stage::Reissuing,
                    bundle: self.bundle.clone(),
                    signing: old.clone(),
                    target: Some(old),
                    retiring: Some(new),
                    aborting: !self.aborting,
                    reissue_started_unix: now_unix,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    fn view(name: &str, acked: u64, root: &str) -> ClusterView {
        ClusterView {
            name: name.into(),
            bundle_version_acked: acked,
            intermediate_root: root.into(),
            installed_unix: 0,
            leaf_ttl: DAY,
        }
    }

    #[test]
    fn the_full_rotation() {
        let r = Rotation::idle("old");
        let r = r.begin("new").unwrap();
        assert_eq!(r.stage, Stage::Distributing);
        assert_eq!(r.bundle, ["old", "new"]);
        assert_eq!(
            r.signing, "old",
            "nothing signs with the new root before everyone trusts it"
        );
        let r = r
            .advance(&[view("east", 2, "old"), view("west", 3, "old")], 2, 1000)
            .unwrap();
        assert_eq!(r.stage, Stage::Reissuing);
        assert_eq!(r.signing, "new");
        assert_eq!(
            r.bundle,
            ["old", "new"],
            "the old root stays while old leaves live"
        );
        let done = r
            .finish(
                &[view("east", 2, "new"), view("west", 3, "new")],
                1000 + 86400,
                false,
            )
            .unwrap();
        assert_eq!(done, Rotation::idle("new"));
    }

    #[test]
    fn out_of_order_steps_are_refused() {
        let idle = Rotation::idle("old");
        assert_eq!(idle.advance(&[], 1, 0), Err(RotationError::NotInProgress));
        assert_eq!(idle.finish(&[], 0, true), Err(RotationError::NotInProgress));
        assert_eq!(idle.abort(0), Err(RotationError::NotInProgress));
        assert_eq!(idle.begin("old"), Err(RotationError::SameRoot));
        let d = idle.begin("new").unwrap();
        assert_eq!(
            d.begin("newer"),
            Err(RotationError::InProgress("distributing"))
        );
        assert!(matches!(
            d.finish(&[], 0, true),
            Err(RotationError::WrongStage { step: "finish", .. })
        ));
        let r = d.advance(&[], 2, 0).unwrap();
        assert!(matches!(
            r.advance(&[], 2, 0),
            Err(RotationError::WrongStage {
                step: "advance",
                ..
            })
        ));
        assert_eq!(r.begin("x"), Err(RotationError::InProgress("reissuing")));
    }

    #[test]
    fn advance_waits_for_every_acknowledgement() {
        let d = Rotation::idle("old").begin("new").unwrap();
        let err = d
            .advance(&[view("east", 2, "old"), view("west", 1, "old")], 2, 0)
            .unwrap_err();
        assert_eq!(err, RotationError::NotAcknowledged(vec!["west".into()]));
        assert!(err.to_string().contains("west"));
    }

    #[test]
    fn finish_waits_for_reissue_and_old_leaves() {
        let r = Rotation::idle("old")
            .begin("new")
            .unwrap()
            .advance(&[], 2, 1000)
            .unwrap();
        let err = r.finish(
            &[view("east", 2, "new"), view("west", 2, "old")],
            1000 + 86400,
            false,
        );
        assert_eq!(err, Err(RotationError::NotReissued(vec!["west".into()])));
        let err = r
            .finish(&[view("east", 2, "new")], 1000 + 60, false)
            .unwrap_err();
        let RotationError::LeavesMayLive { cluster, until, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!((cluster.as_str(), *until), ("east", 1000 + 86400));
        // Said as a time, not a raw unix number.
        let text = err.to_string();
        assert!(text.contains("until 1970-01-02T00:16:40Z "), "{text}");
        assert!(text.contains("up to 24h"), "{text}");
        assert!(r.finish(&[view("west", 2, "old")], 1000, true).is_ok());
        assert!(
            r.finish(&[view("east", 2, "new")], 1000 + 86400, false)
                .is_ok()
        );
        // No cluster, no leaves to wait for.
        assert!(r.finish(&[], 1000, false).is_ok());
    }

    #[test]
    fn finish_waits_for_the_cluster_that_switched_last_and_its_own_ttl() {
        let r = Rotation::idle("old")
            .begin("new")
            .unwrap()
            .advance(&[], 2, 1000)
            .unwrap();
        let short = |name: &str, installed: i64, ttl: u64| ClusterView {
            installed_unix: installed,
            leaf_ttl: Duration::from_secs(ttl),
            ..view(name, 2, "new")
        };
        // east switched at 1005 with 30 s leaves; west at 1040 with 10 s:
        // the last old leaf (east's) lives until 1035, west's until 1050.
        let both = [short("east", 1005, 30), short("west", 1040, 10)];
        let err = r.finish(&both, 1049, false).unwrap_err();
        assert!(
            matches!(&err, RotationError::LeavesMayLive { cluster, until: 1050, switched: 1040, .. } if cluster == "west"),
            "{err:?}"
        );
        assert!(r.finish(&both, 1050, false).is_ok());
        // A switch recorded before re-issuing began counts from its start.
        let early = [short("east", 10, 30)];
        assert!(r.finish(&early, 1029, false).is_err());
        assert!(r.finish(&early, 1030, false).is_ok());
    }

    #[test]
    fn abort_before_advance_drops_the_new_root() {
        let d = Rotation::idle("old").begin("new").unwrap();
        assert_eq!(d.abort(5).unwrap(), Rotation::idle("old"));
    }

    #[test]
    fn abort_after_advance_reverses_without_dropping_a_root_in_use() {
        let r = Rotation::idle("old")
            .begin("new")
            .unwrap()
            .advance(&[], 2, 1000)
            .unwrap();
        let back = r.abort(2000).unwrap();
        assert_eq!(back.stage, Stage::Reissuing);
        assert!(back.aborting);
        assert_eq!(back.signing, "old");
        assert_eq!(back.target.as_deref(), Some("old"));
        assert_eq!(
            back.bundle,
            ["old", "new"],
            "both roots stay until the reversal finishes"
        );
        let err = back.finish(&[view("east", 2, "new")], 2000 + 86400, false);
        assert_eq!(err, Err(RotationError::NotReissued(vec!["east".into()])));
        let done = back
            .finish(&[view("east", 2, "old")], 2000 + 86400, false)
            .unwrap();
        assert_eq!(done, Rotation::idle("old"));
    }
}
