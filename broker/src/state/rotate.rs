//! Root rotation steps on the broker state: each step is planned by the
//! pure state machine in [`crate::rotation`], stored, then applied (signing
//! root, bundle, renewal requests) and pushed to every cluster.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strait_ca::TrustBundle;
use strait_ca::authority::Authority;
use strait_ca::cert::fingerprint_sha256;
use time::OffsetDateTime;

use super::{
    BrokerState, ClusterRecord, Inner, LEAF_MAX_TTL, META_ROOT_DIRS, META_ROTATION, Membership,
    ROTATION_ROOTS_DIR, StateError, json, put_bundle_version,
};
use crate::rotation::{ClusterView, Rotation, RotationError, Stage};
use crate::store::{Batch, Table};

/// A step of `straitctl trust rotate-root`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateStep {
    Begin,
    Advance,
    Finish,
    Abort,
    Status,
}

impl RotateStep {
    pub fn parse(s: &str) -> Result<Self, StateError> {
        Ok(match s {
            "begin" => RotateStep::Begin,
            "advance" => RotateStep::Advance,
            "finish" => RotateStep::Finish,
            "abort" => RotateStep::Abort,
            "status" => RotateStep::Status,
            other => {
                return Err(StateError::Invalid(format!(
                    "rotate-root step {other:?}: expected begin, advance, finish, abort or status"
                )));
            }
        })
    }
}

/// Where a rotation stands, per cluster.
#[derive(Debug, Clone)]
pub struct RotationReport {
    pub rotation: Rotation,
    pub bundle_version: u64,
    pub clusters: Vec<ClusterView>,
    /// Subject and expiry by root fingerprint.
    pub roots: Vec<(String, String, i64)>,
}

impl BrokerState {
    fn views(inner: &Inner) -> Vec<ClusterView> {
        inner
            .records
            .values()
            .filter(|r| r.membership == Membership::Joined)
            .map(|r| ClusterView {
                name: r.name.clone(),
                bundle_version_acked: r.bundle_version_acked,
                // Only an intermediate the cluster installed counts.
                intermediate_root: if r.intermediate_installed_sha256 == r.intermediate_sha256 {
                    r.intermediate_root_sha256.clone()
                } else {
                    String::new()
                },
                installed_unix: r.intermediate_installed_unix,
                leaf_ttl: match r.leaf_ttl_max_secs {
                    0 => LEAF_MAX_TTL,
                    secs => Duration::from_secs(secs),
                },
            })
            .collect()
    }

    fn report(&self, inner: &Inner) -> RotationReport {
        let roots = self.roots.read().unwrap_or_else(|p| p.into_inner());
        RotationReport {
            rotation: inner.rotation.clone(),
            bundle_version: inner.bundle_version,
            clusters: Self::views(inner),
            roots: inner
                .rotation
                .bundle
                .iter()
                .filter_map(|fp| {
                    let a = roots.by_fp.get(fp)?;
                    let s = strait_ca::cert::CertSummary::from_der(a.root_der()).ok()?;
                    Some((fp.clone(), s.subject, a.not_after().unix_timestamp()))
                })
                .collect(),
        }
    }

    /// One step of a root rotation (see [`crate::rotation`]); every step is
    /// stored before it takes effect, and pushed to every cluster.
    pub async fn rotate_root(
        &self,
        step: RotateStep,
        force: bool,
        now: OffsetDateTime,
    ) -> Result<RotationReport, StateError> {
        self.write(|inner| {
        let current = inner.rotation.clone();
        let mut new_root: Option<(String, Arc<Authority>, PathBuf)> = None;
        let (next, bump_bundle, renew_all) = match step {
            RotateStep::Status => return Ok(self.report(inner)),
            RotateStep::Begin => {
                if current.stage != Stage::Idle {
                    return Err(RotationError::InProgress(current.stage.as_str()).into());
                }
                let root = Authority::create_root(
                    &strait_ca::authority::RootOptions {
                        trust_domain: self.trust_domain.clone(),
                        common_name: Some(format!(
                            "{} {}",
                            strait_ca::authority::DEFAULT_ROOT_COMMON_NAME,
                            now.date()
                        )),
                        validity: strait_ca::authority::DEFAULT_ROOT_VALIDITY,
                        key_algorithm: strait_ca::KeyAlgorithm::EcdsaP256,
                    },
                    now,
                )
                .map_err(StateError::RootCreate)?;
                let fp = fingerprint_sha256(root.root_der());
                let dir = self.data_dir.join(ROTATION_ROOTS_DIR).join(
                    fp.replace(':', "")
                        .to_ascii_lowercase()
                        .chars()
                        .take(16)
                        .collect::<String>(),
                );
                strait_ca::layout::write_root(&dir, &root, false)
                    .map_err(|e| StateError::RootWrite(Box::new(e)))?;
                let next = current.begin(&fp)?;
                new_root = Some((fp, Arc::new(root), dir));
                (next, true, false)
            }
            RotateStep::Advance => {
                let next = current.advance(
                    &Self::views(inner),
                    inner.bundle_version,
                    now.unix_timestamp(),
                )?;
                (next, false, true)
            }
            RotateStep::Finish => {
                let next = current.finish(&Self::views(inner), now.unix_timestamp(), force)?;
                (next, true, false)
            }
            RotateStep::Abort => {
                let next = current.abort(now.unix_timestamp())?;
                let reverse = next.stage == Stage::Reissuing;
                (next, !reverse, reverse)
            }
        };
        let mut root_dirs = inner.root_dirs.clone();
        if let Some((fp, _, dir)) = &new_root {
            root_dirs.insert(fp.clone(), dir.clone());
        }
        root_dirs.retain(|fp, _| next.bundle.contains(fp) || *fp == next.signing);
        let bundle_version = inner.bundle_version + u64::from(bump_bundle);
        let mut b = Batch::new();
        b.put(Table::Meta, META_ROTATION, json(&next));
        b.put(Table::Meta, META_ROOT_DIRS, json(&root_dirs));
        put_bundle_version(&mut b, bundle_version);
        let mut records = Vec::new();
        if renew_all {
            for r in inner
                .records
                .values()
                .filter(|r| r.membership == Membership::Joined)
            {
                let r = ClusterRecord {
                    renew_requested: true,
                    ..r.clone()
                };
                b.put(Table::Clusters, r.name.clone(), json(&r));
                records.push(r);
            }
        }
        self.commit(inner, &b)?;

        // Stored: now take effect.
        {
            let mut roots = self.roots.write().unwrap_or_else(|p| p.into_inner());
            if let Some((fp, a, _)) = new_root {
                roots.by_fp.insert(fp, a);
            }
            if let Some(signing) = roots.by_fp.get(&next.signing).cloned() {
                roots.signing = signing;
            }
            let bundle_roots: Vec<Vec<u8>> = next
                .bundle
                .iter()
                .filter_map(|fp| roots.by_fp.get(fp).map(|a| a.root_der().to_vec()))
                .collect();
            if let Ok(bundle) = TrustBundle::new(Some(self.trust_domain.clone()), bundle_roots) {
                self.trust.set_bundle(bundle);
            }
            let keep: BTreeSet<String> = next
                .bundle
                .iter()
                .cloned()
                .chain([next.signing.clone()])
                .collect();
            roots.by_fp.retain(|fp, _| keep.contains(fp));
        }
        for r in records {
            inner.records.insert(r.name.clone(), r);
        }
        inner.rotation = next.clone();
        inner.root_dirs = root_dirs;
        inner.bundle_version = bundle_version;
        tracing::info!(step = ?step, stage = next.stage.as_str(), bundle_version, "root rotation step");
        self.rotation_tx.send_replace(next);
        self.revision_tx.send_modify(|_| {});
        Ok(self.report(inner))
        })
        .await
    }
}
