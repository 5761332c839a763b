//! Loading the broker state from the store at start, step by step: the
//! broker-wide meta values (creating the epoch on first start), the cluster
//! records and join tokens, the mesh with its stored exports, and the roots
//! the rotation state names, from which the trust is built.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use strait_ca::authority::Authority;
use strait_ca::cert::fingerprint_sha256;
use strait_ca::tls::Trust;
use strait_ca::{ClusterName, TrustBundle, TrustDomain};
use strait_model::mesh::ExportedService;
use tokio::sync::{Mutex, watch};

use super::{
    BrokerState, ClusterRecord, Inner, META_BIND_IDENTITIES, META_BUNDLE_VERSION, META_DENIED,
    META_EPOCH, META_REVISION, META_ROOT_DIRS, META_ROTATION, Membership, Roots, StateError,
    corrupt, random_hex,
};
use crate::liveness::Liveness;
use crate::reconcile::{ClusterState, Mesh};
use crate::rotation::Rotation;
use crate::store::{Batch, Contents, Store, Table};
use crate::token::TokenRecord;

/// The rows of one table, as loaded.
type Rows = BTreeMap<String, Vec<u8>>;

/// The broker-wide values of the meta table.
pub(super) struct MetaValues {
    pub revision: u64,
    pub bundle_version: u64,
    pub bind_identities: bool,
    pub denied: BTreeSet<String>,
    pub epoch: String,
}

/// The roots the rotation state names, loaded, and where they live.
pub(super) struct LoadedRoots {
    pub rotation: Rotation,
    pub root_dirs: BTreeMap<String, PathBuf>,
    pub by_fp: BTreeMap<String, Arc<Authority>>,
    pub trust_domain: TrustDomain,
}

fn text(meta: &Rows, key: &str) -> Option<String> {
    meta.get(key)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn number(meta: &Rows, key: &str) -> Result<u64, StateError> {
    match text(meta, key) {
        None => Ok(0),
        Some(v) => v.parse().map_err(|e| corrupt(Table::Meta, key, e)),
    }
}

pub(super) fn rows<T: DeserializeOwned>(
    contents: &Contents,
    table: Table,
) -> Result<Vec<(String, T)>, StateError> {
    contents
        .get(&table)
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let t = serde_json::from_slice(v).map_err(|e| corrupt(table, k, e))?;
            Ok((k.clone(), t))
        })
        .collect()
}

/// Reads the meta values; on first start, makes and stores the epoch.
/// Two replicas starting on an empty store race for the epoch: the
/// commit is conditional on `revision`, and the loser loads again.
fn meta_values(meta: &Rows, store: &dyn Store, revision: u64) -> Result<MetaValues, StateError> {
    let mut values = read_meta(meta)?;
    if values.epoch.is_empty() {
        let e = random_hex(8);
        let mut b = Batch::new();
        b.put(Table::Meta, META_EPOCH, e.clone().into_bytes());
        b.put(Table::Meta, META_BUNDLE_VERSION, b"1".to_vec());
        store.commit_if(&b, Some(revision))?;
        values.epoch = e;
    }
    Ok(values)
}

/// Reads the meta values as they are (epoch empty when there is none).
pub(super) fn read_meta(meta: &Rows) -> Result<MetaValues, StateError> {
    let revision = number(meta, META_REVISION)?;
    let bundle_version = number(meta, META_BUNDLE_VERSION)?.max(1);
    let bind_identities = number(meta, META_BIND_IDENTITIES)? == 1;
    let denied = match meta.get(META_DENIED) {
        Some(v) => serde_json::from_slice(v).map_err(|e| corrupt(Table::Meta, META_DENIED, e))?,
        None => BTreeSet::new(),
    };
    let epoch = text(meta, META_EPOCH).unwrap_or_default();
    Ok(MetaValues {
        revision,
        bundle_version,
        bind_identities,
        denied,
        epoch,
    })
}

/// The mesh state of every joined cluster, with the exports stored for it.
pub(super) fn clusters(
    records: &BTreeMap<String, ClusterRecord>,
    contents: &Contents,
) -> Result<BTreeMap<ClusterName, ClusterState>, StateError> {
    let mut clusters: BTreeMap<ClusterName, ClusterState> = BTreeMap::new();
    for r in records.values() {
        if r.membership != Membership::Joined {
            continue;
        }
        let Some(info) = r.info.clone() else {
            return Err(corrupt(Table::Clusters, &r.name, "joined without info"));
        };
        clusters.insert(
            info.name.clone(),
            ClusterState {
                info,
                export_revision: r.export_revision,
                exports: BTreeMap::new(),
                withdrawn: r.withdrawn,
            },
        );
    }
    for (k, s) in rows::<ExportedService>(contents, Table::Exports)? {
        let cluster = k.split('/').next().unwrap_or_default();
        let Some(c) = ClusterName::new(cluster)
            .ok()
            .and_then(|n| clusters.get_mut(&n))
        else {
            // Exports of a revoked cluster are deleted with it; a stray
            // row is not worth refusing to start over.
            tracing::warn!(row = %k, "export row of an unknown cluster ignored");
            continue;
        };
        c.exports.insert(s.key.clone(), s);
    }
    Ok(clusters)
}

/// The rotation state and every root it names: those of `by_fp` (loaded
/// already; the configured one, `configured_fp` in `root_dir`, among them)
/// and the others from their stored directories.
pub(super) fn roots(
    meta: &Rows,
    mut by_fp: BTreeMap<String, Arc<Authority>>,
    configured_fp: &str,
    root_dir: &Path,
) -> Result<LoadedRoots, StateError> {
    let td = by_fp
        .get(configured_fp)
        .map(|a| a.trust_domain().clone())
        .ok_or_else(|| {
            corrupt(
                Table::Meta,
                META_ROTATION,
                "the configured root is not loaded",
            )
        })?;
    let (rotation, root_dirs): (Rotation, BTreeMap<String, PathBuf>) =
        match (meta.get(META_ROTATION), meta.get(META_ROOT_DIRS)) {
            (Some(r), Some(d)) => (
                serde_json::from_slice(r).map_err(|e| corrupt(Table::Meta, META_ROTATION, e))?,
                serde_json::from_slice(d).map_err(|e| corrupt(Table::Meta, META_ROOT_DIRS, e))?,
            ),
            _ => (
                Rotation::idle(configured_fp),
                [(configured_fp.to_string(), root_dir.to_path_buf())].into(),
            ),
        };
    for fp in rotation
        .bundle
        .iter()
        .chain(std::iter::once(&rotation.signing))
    {
        if by_fp.contains_key(fp) {
            continue;
        }
        let dir = root_dirs.get(fp).ok_or_else(|| {
            corrupt(
                Table::Meta,
                META_ROOT_DIRS,
                format!("no directory for root {fp}"),
            )
        })?;
        let a = strait_ca::layout::load_root(dir, Some(&td)).map_err(|source| {
            StateError::RootLoad {
                fingerprint: fp.clone(),
                source: Box::new(source),
            }
        })?;
        by_fp.insert(fp.clone(), Arc::new(a));
    }
    if !rotation.bundle.iter().any(|fp| fp == configured_fp) {
        tracing::warn!(
            root = %configured_fp,
            "the configured root is no longer in the bundle (rotated out); the stored rotation state decides"
        );
    }
    Ok(LoadedRoots {
        rotation,
        root_dirs,
        by_fp,
        trust_domain: td,
    })
}

/// The bundle the rotation state names.
pub(super) fn bundle(roots: &LoadedRoots) -> Result<TrustBundle, StateError> {
    let bundle_roots = roots
        .rotation
        .bundle
        .iter()
        .filter_map(|fp| roots.by_fp.get(fp).map(|a| a.root_der().to_vec()))
        .collect();
    TrustBundle::new(Some(roots.trust_domain.clone()), bundle_roots).map_err(StateError::Bundle)
}

/// The trust in the bundle the rotation state names, with the deny-list.
fn trust(roots: &LoadedRoots, denied: &BTreeSet<String>) -> Result<Trust, StateError> {
    let trust = Trust::new(bundle(roots)?);
    trust.set_denied(denied.iter().cloned());
    Ok(trust)
}

impl BrokerState {
    /// Loads everything from the store (creating the epoch on first start).
    /// `root` and `root_dir`: the root configured for this broker, used
    /// when the store has no rotation state yet.
    pub fn load(
        store: Arc<dyn Store>,
        root: Authority,
        root_dir: &Path,
        data_dir: &Path,
        intermediate_validity: Duration,
        mesh_name: String,
    ) -> Result<Self, StateError> {
        let root = Arc::new(root);
        let mut attempt = 0;
        loop {
            match Self::load_once(
                store.clone(),
                root.clone(),
                root_dir,
                data_dir,
                intermediate_validity,
                mesh_name.clone(),
            ) {
                Err(StateError::Store(e)) if e.is_conflict() && attempt < 3 => attempt += 1,
                r => return r,
            }
        }
    }

    fn load_once(
        store: Arc<dyn Store>,
        root: Arc<Authority>,
        root_dir: &Path,
        data_dir: &Path,
        intermediate_validity: Duration,
        mesh_name: String,
    ) -> Result<Self, StateError> {
        let snapshot = store.snapshot()?;
        let contents = snapshot.contents;
        let empty = BTreeMap::new();
        let meta = contents.get(&Table::Meta).unwrap_or(&empty);
        if meta.contains_key(crate::store::migrate::MIGRATION_KEY) {
            return Err(StateError::UnfinishedMigration);
        }
        let values = meta_values(meta, store.as_ref(), snapshot.revision)?;
        // Writing the epoch (first start) made a revision.
        let store_revision = if values.epoch == text(meta, META_EPOCH).unwrap_or_default() {
            snapshot.revision
        } else {
            store.snapshot()?.revision
        };
        let records: BTreeMap<String, ClusterRecord> =
            rows(&contents, Table::Clusters)?.into_iter().collect();
        let tokens: BTreeMap<String, TokenRecord> =
            rows(&contents, Table::Tokens)?.into_iter().collect();
        let clusters = clusters(&records, &contents)?;
        let configured_fp = fingerprint_sha256(root.root_der());
        let roots = roots(
            meta,
            [(configured_fp.clone(), root)].into(),
            &configured_fp,
            root_dir,
        )?;
        let trust = trust(&roots, &values.denied)?;
        let signing = roots
            .by_fp
            .get(&roots.rotation.signing)
            .cloned()
            .ok_or_else(|| corrupt(Table::Meta, META_ROTATION, "the signing root is not loaded"))?;
        let serving = signing.root_der().to_vec();
        let (revision_tx, _) = watch::channel(values.revision);
        let (rotation_tx, _) = watch::channel(roots.rotation.clone());
        let peers = crate::peer::Peers::load(&contents)?;
        // Every joined cluster gets the grace from this start.
        let mut liveness = Liveness::new(Some(crate::liveness::DEFAULT_GRACE));
        let start = tokio::time::Instant::now().into_std();
        for (name, c) in &clusters {
            liveness.track(name.clone(), c.withdrawn, start);
        }
        let mut mesh = Mesh::new(clusters, values.revision);
        for p in peers.list() {
            mesh.load_peer(&p.mesh, p.services.clone());
        }
        Ok(BrokerState {
            trust_domain: roots.trust_domain,
            roots: std::sync::RwLock::new(Roots {
                by_fp: roots.by_fp,
                signing,
            }),
            serving_root: std::sync::RwLock::new(serving),
            data_dir: data_dir.to_path_buf(),
            configured_root: (configured_fp, root_dir.to_path_buf()),
            rotation_tx,
            trust,
            epoch: values.epoch,
            intermediate_validity,
            store,
            inner: Mutex::new(Inner {
                mesh,
                records,
                tokens,
                bundle_version: values.bundle_version,
                denied: values.denied,
                bind_identities: values.bind_identities,
                rotation: roots.rotation,
                root_dirs: roots.root_dirs,
                store_revision,
            }),
            revision_tx,
            peers,
            mesh_name,
            liveness: std::sync::Mutex::new(liveness),
            liveness_changed: tokio::sync::Notify::new(),
            stream_events: std::sync::OnceLock::new(),
            detached: watch::channel(None).0,
        })
    }
}
