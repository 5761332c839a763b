//! The broker's state: the mesh, cluster records, join tokens and trust, kept
//! in memory and written through the store before anything is acknowledged.
//!
//! One async mutex serialises changes (plan → commit → apply → notify), so
//! the order of revisions is the order of commits. Readers of imports are
//! woken through a `watch` channel carrying the mesh revision. The mutex
//! and what it guards stay inside this module: the services read it
//! through its views and change it through its methods.
//!
//! - this file: the records, cluster join and exports/info updates;
//! - `load`: loading everything from the store at start, step by step;
//! - `views`: consistent read-only views (cluster statuses, exports,
//!   imports, what a sync stream pushes);
//! - `trust`, `rotate`, `liveness`: acknowledgements, renewal and
//!   revocation; root rotation; withdrawal of silent clusters;
//! - `peers`: peered meshes and peer tokens in the store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_ca::authority::{Authority, Issued};
use strait_ca::bundle::BundleError;
use strait_ca::cert::fingerprint_sha256;
use strait_ca::csr::CsrError;
use strait_ca::layout::LayoutError;
use strait_ca::tls::Trust;
use strait_ca::{ClusterName, Csr, IssueError, TrustBundle, TrustDomain};
use strait_model::mesh::{ClusterInfo, Locality, ModelError, Network, ServiceKey};
use time::OffsetDateTime;
use tokio::sync::{Mutex, watch};

use crate::reconcile::{ExportsChange, Mesh, Plan, SyncError};
use crate::rotation::{Rotation, RotationError};

mod follow;
mod liveness;
mod load;
mod peers;
mod rotate;
mod trust;
mod views;
use crate::liveness::Liveness;
use crate::store::{Batch, Store, StoreError, Table};
use crate::token::{JoinToken, TokenError, TokenRecord};
pub use follow::follow_store;
pub use liveness::{LiveStream, watch_liveness};
pub use rotate::{RotateStep, RotationReport};
pub use views::{ClusterImports, PushView, TrustView};

/// How often a change planned on a stale state is planned again before the
/// caller is told (each retry reads the store first).
const CONFLICT_RETRIES: u32 = 32;

/// Default lifetime of a cluster intermediate.
pub const DEFAULT_INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(7 * 86400);

const META_EPOCH: &str = "epoch";
const META_REVISION: &str = "mesh_revision";
const META_BUNDLE_VERSION: &str = "bundle_version";
/// "1" while the mesh binds identities to clusters.
const META_BIND_IDENTITIES: &str = "bind_identities";
const META_DENIED: &str = "denied_intermediates";
const META_ROTATION: &str = "rotation";
const META_ROOT_DIRS: &str = "root_dirs";
/// Where roots made by a rotation are kept, inside the data directory.
pub const ROTATION_ROOTS_DIR: &str = "roots";
/// How long leaves issued under a retiring root's intermediates are
/// assumed to live for a cluster that does not say what its CA issues
/// (Istio's default workload certificate TTL, and strait's control plane's
/// default `--max-cert-ttl`).
pub const LEAF_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Lifecycle of a cluster record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// A join token was issued; the cluster has not joined yet.
    Pending,
    Joined,
    Revoked,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Pending => "pending",
            Membership::Joined => "joined",
            Membership::Revoked => "revoked",
        }
    }
}

/// What the broker keeps per cluster besides its exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: String,
    pub network: String,
    pub locality: String,
    pub membership: Membership,
    /// Set once joined: what importers see of the cluster.
    pub info: Option<ClusterInfo>,
    pub export_revision: u64,
    pub intermediate_sha256: String,
    pub intermediate_expires_unix: i64,
    pub import_revision_acked: u64,
    pub bundle_version_acked: u64,
    /// When the current intermediate became valid.
    #[serde(default)]
    pub intermediate_not_before_unix: i64,
    /// An operator (or a root rotation) asked for a new intermediate.
    #[serde(default)]
    pub renew_requested: bool,
    /// Fingerprint of the root the current intermediate was issued by.
    #[serde(default)]
    pub intermediate_root_sha256: String,
    /// The intermediate the cluster reports it signs with.
    #[serde(default)]
    pub intermediate_installed_sha256: String,
    /// When the cluster first reported signing with that intermediate
    /// (unix seconds; 0: before this was recorded). Leaves under the one
    /// before it were issued no later than this.
    #[serde(default)]
    pub intermediate_installed_unix: i64,
    /// The longest workload certificate the cluster's CA issues, as it
    /// says in its `Hello` (seconds; 0: not known, [`LEAF_MAX_TTL`]
    /// assumed).
    #[serde(default)]
    pub leaf_ttl_max_secs: u64,
    /// The identities the cluster runs (`<ns>/<sa>`), as it says in its
    /// `ClusterInfo`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub service_accounts: BTreeSet<String>,
    /// Its exports are withdrawn from importers (no sync stream for longer
    /// than the grace; see [`crate::liveness`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withdrawn: bool,
}

impl ClusterRecord {
    /// Why the cluster should renew its intermediate now, if it should.
    pub fn renewal_due(&self, now: OffsetDateTime) -> Option<&'static str> {
        if self.membership != Membership::Joined {
            return None;
        }
        if self.renew_requested {
            return Some("a new intermediate was requested");
        }
        let (nb, na) = (
            self.intermediate_not_before_unix,
            self.intermediate_expires_unix,
        );
        if na > nb && now.unix_timestamp() >= nb + (na - nb) / 2 {
            return Some("the intermediate passed half of its lifetime");
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the store holds an unfinished copy (`strait broker migrate` stopped before it \
         verified it): run the same migration again"
    )]
    UnfinishedMigration,
    #[error("stored record {table}/{key} is corrupt: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cluster {0:?} already exists ({1}); revoke it first to add it again")]
    Duplicate(String, &'static str),
    #[error("cluster {0:?} is not known to this broker")]
    UnknownCluster(String),
    #[error("cluster {0:?} is revoked")]
    Revoked(String),
    #[error("bad request: {0}")]
    Invalid(String),
    #[error("bad request: {0}")]
    Csr(#[from] CsrError),
    /// A join token record holds a value that does not parse.
    #[error("bad request: join token record {field} {value:?}: {source}")]
    TokenField {
        field: &'static str,
        value: String,
        #[source]
        source: ModelError,
    },
    #[error("issuing the intermediate failed: {0}")]
    Issue(#[from] IssueError),
    #[error("creating the new root failed: {0}")]
    RootCreate(#[source] IssueError),
    #[error("bad request: writing the new root: {0}")]
    RootWrite(#[source] Box<LayoutError>),
    /// A root the rotation state names does not load from its directory.
    #[error("root {fingerprint}: {source}")]
    RootLoad {
        fingerprint: String,
        #[source]
        source: Box<LayoutError>,
    },
    #[error("the trust bundle: {0}")]
    Bundle(#[source] BundleError),
    #[error(transparent)]
    Rotation(#[from] RotationError),
}

pub(crate) fn corrupt(table: Table, key: &str, reason: impl ToString) -> StateError {
    StateError::Corrupt {
        table: table.name(),
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

pub(crate) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // The broker's own plain data types always serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Puts the bundle version into `b`, stored with the change that made it.
fn put_bundle_version(b: &mut Batch, version: u64) {
    b.put(
        Table::Meta,
        META_BUNDLE_VERSION,
        version.to_string().into_bytes(),
    );
}

fn token_field(field: &'static str, value: &str, source: ModelError) -> StateError {
    StateError::TokenField {
        field,
        value: value.to_string(),
        source,
    }
}

fn export_row_key(cluster: &ClusterName, key: &ServiceKey) -> String {
    format!("{cluster}/{}/{}", key.namespace(), key.name())
}

/// The mutable part, behind the mutex.
struct Inner {
    mesh: Mesh,
    records: BTreeMap<String, ClusterRecord>,
    tokens: BTreeMap<String, TokenRecord>,
    bundle_version: u64,
    denied: BTreeSet<String>,
    /// `--bind-identities-to-clusters` (stored, so that turning it on or
    /// off bumps the bundle version once).
    bind_identities: bool,
    rotation: Rotation,
    /// Where each root of the bundle lives on disk, by fingerprint.
    root_dirs: BTreeMap<String, PathBuf>,
    /// The store revision all of the above is at; a commit is conditional
    /// on it (another replica's commit since refuses it).
    store_revision: u64,
}

/// The roots the broker holds keys for, by fingerprint, and which signs.
struct Roots {
    by_fp: BTreeMap<String, Arc<Authority>>,
    signing: Arc<Authority>,
}

/// The broker core.
pub struct BrokerState {
    pub trust_domain: TrustDomain,
    roots: std::sync::RwLock<Roots>,
    /// The root the broker's serving certificate chains to (join tokens pin it).
    serving_root: std::sync::RwLock<Vec<u8>>,
    data_dir: PathBuf,
    /// The configured root's fingerprint and directory (`--root`).
    configured_root: (String, PathBuf),
    rotation_tx: watch::Sender<Rotation>,
    pub trust: Trust,
    pub epoch: String,
    pub intermediate_validity: Duration,
    store: Arc<dyn Store>,
    inner: Mutex<Inner>,
    revision_tx: watch::Sender<u64>,
    /// Peered meshes (by mesh name) and their trust, loaded from the store.
    pub(crate) peers: crate::peer::Peers,
    /// This mesh's name for peers (`mesh:<name>` in export-to).
    pub mesh_name: String,
    /// Which clusters have a sync stream, and which are withdrawn.
    liveness: std::sync::Mutex<Liveness>,
    /// Woken when a stream ends, so that the grace timer looks again.
    pub(crate) liveness_changed: tokio::sync::Notify,
    /// Where stream starts and ends go for the other replicas to count
    /// ([`crate::ha`]; unset with a store of one writer).
    stream_events: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(ClusterName, bool)>>,
    /// Why this replica cannot write now (cut off from etcd), if it cannot.
    detached: watch::Sender<Option<String>>,
}

/// What a successful join returns.
#[derive(Debug, Clone)]
pub struct Joined {
    pub record: ClusterRecord,
    pub chain: Vec<Vec<u8>>,
    pub bundle: TrustBundle,
    pub bundle_version: u64,
}

impl BrokerState {
    /// The root that signs intermediates now.
    pub fn signer(&self) -> Arc<Authority> {
        self.roots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .signing
            .clone()
    }

    /// The root join tokens pin: the one the serving certificate chains to.
    pub fn serving_root(&self) -> Vec<u8> {
        self.serving_root
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_serving_root(&self, der: Vec<u8>) {
        *self.serving_root.write().unwrap_or_else(|p| p.into_inner()) = der;
    }

    /// Rotation changes, for whoever re-issues the broker's own certificates.
    pub fn subscribe_rotation(&self) -> watch::Receiver<Rotation> {
        self.rotation_tx.subscribe()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    /// Sends stream starts and ends to `tx` (the replica's etcd records).
    pub fn set_stream_events(&self, tx: tokio::sync::mpsc::UnboundedSender<(ClusterName, bool)>) {
        let _ = self.stream_events.set(tx);
    }

    fn stream_event(&self, cluster: &ClusterName, up: bool) {
        if let Some(tx) = self.stream_events.get() {
            let _ = tx.send((cluster.clone(), up));
        }
    }

    /// This replica is cut off from its store (`Some(why)`) or back (`None`):
    /// sync streams end and new ones are refused while it is.
    pub fn set_detached(&self, why: Option<String>) {
        self.detached.send_if_modified(|d| {
            let changed = *d != why;
            *d = why;
            changed
        });
    }

    /// Why this replica cannot serve streams now, if it cannot.
    pub fn detached(&self) -> watch::Receiver<Option<String>> {
        self.detached.subscribe()
    }

    /// Commits `batch` if the store is still at the revision `inner` holds
    /// (see [`BrokerState::write`]).
    fn commit(&self, inner: &mut Inner, batch: &Batch) -> Result<(), StateError> {
        if batch.is_empty() {
            return Ok(());
        }
        inner.store_revision = self.store.commit_if(batch, Some(inner.store_revision))?;
        Ok(())
    }

    /// Runs a change `f` under the state's lock. `f` plans from `inner`,
    /// commits through [`BrokerState::commit`] and only then changes
    /// `inner`. When another replica committed first (the store refuses
    /// the commit as a conflict), `inner` is read again from the store and
    /// `f` planned again, up to [`CONFLICT_RETRIES`] times.
    async fn write<T>(
        &self,
        mut f: impl FnMut(&mut Inner) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut inner = self.inner.lock().await;
        let mut attempt = 0;
        loop {
            match f(&mut inner) {
                Err(StateError::Store(e)) if e.is_conflict() && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "another replica committed first; planning again");
                    if attempt > 2 {
                        // Busy: let the other replica's burst pass.
                        let jitter = u64::from(
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap_or_default()
                                .subsec_nanos()
                                % 5,
                        );
                        tokio::time::sleep(Duration::from_millis(u64::from(attempt) + jitter))
                            .await;
                    }
                    self.reread(&mut inner).await?;
                }
                r => return r,
            }
        }
    }

    /// Persists a plan together with `extra` rows, then applies it.
    ///
    /// `record` replaces the cluster's stored record (default: the current
    /// one); memory changes only after the commit succeeded.
    fn commit_plan(
        &self,
        inner: &mut Inner,
        plan: Plan,
        mut batch: Batch,
        record: Option<ClusterRecord>,
    ) -> Result<u64, StateError> {
        let before = inner.mesh.cluster(&plan.cluster).cloned();
        let (upserts, removals) = plan.export_diff(before.as_ref());
        for s in &upserts {
            batch.put(
                Table::Exports,
                export_row_key(&plan.cluster, &s.key),
                json(s),
            );
        }
        for k in &removals {
            batch.delete(Table::Exports, export_row_key(&plan.cluster, k));
        }
        let record = record.or_else(|| inner.records.get(plan.cluster.as_str()).cloned());
        let record = record.map(|mut r| {
            if let Some(state) = &plan.state {
                r.export_revision = state.export_revision;
                r.info = Some(state.info.clone());
                r.withdrawn = state.withdrawn;
            }
            batch.put(Table::Clusters, r.name.clone(), json(&r));
            r
        });
        let changed = !plan.changed.is_empty();
        if changed {
            batch.put(
                Table::Meta,
                META_REVISION,
                plan.mesh_revision.to_string().into_bytes(),
            );
        }
        self.commit(inner, &batch)?;
        if let Some(r) = record {
            inner.records.insert(r.name.clone(), r);
        }
        inner.mesh.apply(plan);
        let rev = inner.mesh.revision();
        if changed {
            self.revision_tx.send_replace(rev);
        }
        Ok(rev)
    }

    /// `straitctl cluster add`: a pending record and a join token.
    pub async fn add_cluster(
        &self,
        name: &ClusterName,
        network: &Network,
        locality: Option<&Locality>,
        ttl: Duration,
        addresses: Vec<String>,
        now: OffsetDateTime,
    ) -> Result<JoinToken, StateError> {
        self.write(|inner| {
            if let Some(r) = inner.records.get(name.as_str())
                && r.membership != Membership::Revoked
            {
                return Err(StateError::Duplicate(
                    name.to_string(),
                    r.membership.as_str(),
                ));
            }
            let locality = locality.map(|l| l.to_string()).unwrap_or_default();
            let (token, record) = JoinToken::generate(
                name,
                network.as_str(),
                &locality,
                addresses.clone(),
                &self.serving_root(),
                ttl,
                unix(now),
                &ring::rand::SystemRandom::new(),
            )?;
            let cluster = ClusterRecord {
                name: name.to_string(),
                network: network.to_string(),
                locality,
                membership: Membership::Pending,
                info: None,
                export_revision: 0,
                intermediate_sha256: String::new(),
                intermediate_expires_unix: 0,
                import_revision_acked: 0,
                bundle_version_acked: 0,
                intermediate_not_before_unix: 0,
                renew_requested: false,
                intermediate_root_sha256: String::new(),
                intermediate_installed_sha256: String::new(),
                intermediate_installed_unix: 0,
                leaf_ttl_max_secs: 0,
                service_accounts: BTreeSet::new(),
                withdrawn: false,
            };
            let mut b = Batch::new();
            b.put(Table::Tokens, record.id.clone(), json(&record));
            b.put(Table::Clusters, cluster.name.clone(), json(&cluster));
            self.commit(inner, &b)?;
            inner.tokens.insert(record.id.clone(), record);
            inner.records.insert(cluster.name.clone(), cluster);
            Ok(token)
        })
        .await
    }

    /// `Federation.Join`: spends the token, issues the intermediate.
    pub async fn join(
        &self,
        token_text: &str,
        csr_pem: &str,
        now: OffsetDateTime,
    ) -> Result<Joined, StateError> {
        let token = JoinToken::parse(token_text)?;
        let csr = Csr::from_pem(csr_pem.as_bytes())?;
        let csr_cluster = csr.common_name().unwrap_or_default().to_string();
        self.write(|inner| {
            let record = inner
                .tokens
                .get(&token.id)
                .cloned()
                .ok_or(TokenError::Unknown)?;
            record.admit(&token, &csr_cluster, unix(now))?;
            let name = token.cluster.clone();
            let network = Network::new(&record.network)
                .map_err(|source| token_field("network", &record.network, source))?;
            let locality = if record.locality.is_empty() {
                None
            } else {
                Some(
                    Locality::parse(&record.locality)
                        .map_err(|source| token_field("locality", &record.locality, source))?,
                )
            };
            let signer = self.signer();
            let issued: Issued =
                signer.issue_intermediate(&csr, &name, self.intermediate_validity, now)?;
            let mut chain = vec![issued.der.clone()];
            chain.extend(signer.chain().iter().cloned());

            let used = TokenRecord {
                used: true,
                ..record
            };
            let existing = inner.records.get(name.as_str()).cloned();
            let info = ClusterInfo {
                name: name.clone(),
                network: network.clone(),
                locality,
                gateways: existing
                    .as_ref()
                    .and_then(|r| r.info.as_ref())
                    .map(|i| i.gateways.clone())
                    .unwrap_or_default(),
                trust_domain: self.trust_domain.clone(),
            };
            let cluster = ClusterRecord {
                name: name.to_string(),
                network: network.to_string(),
                locality: used.locality.clone(),
                membership: Membership::Joined,
                info: Some(info.clone()),
                export_revision: existing.as_ref().map_or(0, |r| r.export_revision),
                intermediate_sha256: fingerprint_sha256(&issued.der),
                intermediate_expires_unix: issued.not_after.unix_timestamp(),
                import_revision_acked: 0,
                bundle_version_acked: 0,
                intermediate_not_before_unix: issued.not_before.unix_timestamp(),
                renew_requested: false,
                intermediate_root_sha256: fingerprint_sha256(signer.root_der()),
                intermediate_installed_sha256: String::new(),
                intermediate_installed_unix: 0,
                leaf_ttl_max_secs: existing.as_ref().map_or(0, |r| r.leaf_ttl_max_secs),
                service_accounts: existing
                    .as_ref()
                    .map(|r| r.service_accounts.clone())
                    .unwrap_or_default(),
                withdrawn: existing.as_ref().is_some_and(|r| r.withdrawn),
            };
            let plan = inner.mesh.plan_join(info);
            let mut b = Batch::new();
            b.put(Table::Tokens, used.id.clone(), json(&used));
            self.commit_plan(inner, plan, b, Some(cluster.clone()))?;
            inner.tokens.insert(used.id.clone(), used);
            Ok(Joined {
                record: cluster,
                chain,
                bundle: self.trust.bundle().as_ref().clone(),
                bundle_version: inner.bundle_version,
            })
        })
        .await
    }

    /// Checks a cluster may sync now (joined, not revoked).
    pub async fn check_member(&self, name: &ClusterName) -> Result<ClusterRecord, StateError> {
        let inner = self.inner.lock().await;
        match inner.records.get(name.as_str()) {
            Some(r) if r.membership == Membership::Joined => Ok(r.clone()),
            Some(r) if r.membership == Membership::Revoked => {
                Err(StateError::Revoked(name.to_string()))
            }
            _ => Err(StateError::UnknownCluster(name.to_string())),
        }
    }

    /// An exports update from an authenticated cluster; returns the mesh
    /// revision after it. Durable when this returns.
    pub async fn apply_exports(
        &self,
        cluster: &ClusterName,
        change: ExportsChange,
    ) -> Result<u64, StateError> {
        self.write(|inner| {
            let plan = inner.mesh.plan_exports(cluster, change.clone())?;
            self.commit_plan(inner, plan, Batch::new(), None)
        })
        .await
    }

    pub async fn apply_info(
        &self,
        cluster: &ClusterName,
        info: ClusterInfo,
        leaf_ttl_max: Option<Duration>,
        service_accounts: BTreeSet<String>,
    ) -> Result<u64, StateError> {
        self.write(|inner| {
            let ttl_secs = leaf_ttl_max.map_or(0, |t| t.as_secs());
            if let Some(r) = inner.records.get(cluster.as_str())
                && (r.leaf_ttl_max_secs != ttl_secs || r.service_accounts != service_accounts)
            {
                let identities_changed = r.service_accounts != service_accounts;
                let r = ClusterRecord {
                    leaf_ttl_max_secs: ttl_secs,
                    service_accounts: service_accounts.clone(),
                    ..r.clone()
                };
                let mut b = Batch::new();
                b.put(Table::Clusters, r.name.clone(), json(&r));
                // Bound identities travel with the trust bundle: a change is
                // a new bundle version, pushed to every cluster.
                let bump = identities_changed && inner.bind_identities;
                if bump {
                    put_bundle_version(&mut b, inner.bundle_version + 1);
                }
                self.commit(inner, &b)?;
                inner.records.insert(r.name.clone(), r);
                if bump {
                    inner.bundle_version += 1;
                    self.revision_tx.send_modify(|_| {});
                }
            }
            let plan = inner.mesh.plan_info(cluster, info.clone())?;
            self.commit_plan(inner, plan, Batch::new(), None)
        })
        .await
    }
}

pub fn unix(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp()).unwrap_or(0)
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    // A failing system RNG leaves zeros; the epoch only needs to differ
    // between stores, and ring's SystemRandom does not fail on Linux.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(nb: i64, na: i64) -> ClusterRecord {
        ClusterRecord {
            name: "east".into(),
            network: "n".into(),
            locality: String::new(),
            membership: Membership::Joined,
            info: None,
            export_revision: 0,
            intermediate_sha256: String::new(),
            intermediate_expires_unix: na,
            import_revision_acked: 0,
            bundle_version_acked: 0,
            intermediate_not_before_unix: nb,
            renew_requested: false,
            intermediate_root_sha256: String::new(),
            intermediate_installed_sha256: String::new(),
            intermediate_installed_unix: 0,
            leaf_ttl_max_secs: 0,
            service_accounts: BTreeSet::new(),
            withdrawn: false,
        }
    }

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }

    #[test]
    fn renewal_is_due_at_half_life_or_on_request() {
        let r = record(1000, 1000 + 7 * 86400);
        assert_eq!(r.renewal_due(at(1000 + 3 * 86400)), None);
        assert!(r.renewal_due(at(1000 + 7 * 86400 / 2)).is_some());
        let asked = ClusterRecord {
            renew_requested: true,
            ..r.clone()
        };
        assert_eq!(
            asked.renewal_due(at(1000)),
            Some("a new intermediate was requested")
        );
        let revoked = ClusterRecord {
            membership: Membership::Revoked,
            renew_requested: true,
            ..r
        };
        assert_eq!(revoked.renewal_due(at(1000 + 7 * 86400)), None);
    }

    #[test]
    fn old_records_without_new_fields_still_load() {
        let old = r#"{"name":"east","network":"n","locality":"","membership":"joined","info":null,
            "export_revision":3,"intermediate_sha256":"AB","intermediate_expires_unix":5,
            "import_revision_acked":1,"bundle_version_acked":1}"#;
        let r: ClusterRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.export_revision, 3);
        assert!(!r.renew_requested);
    }
}
