//! The broker's durable store.
//!
//! The broker keeps its whole state in memory and writes every change
//! through a [`Store`] before it acknowledges it: a change is a [`Batch`] of
//! puts and deletes committed atomically and durably. The model is a few
//! named tables of string keys and byte values, which maps onto redb tables
//! (the default, embedded: [`RedbStore`]) and onto etcd key prefixes with
//! one transaction per batch ([`etcd::EtcdStore`], feature `etcd`) alike.
//!
//! Every commit makes a new store revision (monotonic). A commit may be
//! conditional on the revision its writer last saw ([`Store::commit_if`]):
//! when another writer committed since, it fails with
//! [`StoreError::Conflict`] and changes nothing. That is how several broker
//! replicas share one etcd without a lock: each plans from what it has
//! seen, and a stale plan is refused, re-read and planned again.
//! [`Store::watch`] streams the commits after a revision, whole, in order:
//! how a replica learns what the others wrote. Both stores pass the same
//! conformance suite (`broker/tests/store.rs`).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod migrate;

/// The schema this broker writes and understands.
pub const SCHEMA_VERSION: u32 = 1;
/// The meta key holding the schema version.
pub const SCHEMA_KEY: &str = "schema_version";
/// redb: the meta key holding the store revision (not part of
/// [`Snapshot::contents`]).
const REDB_REVISION_KEY: &str = "store_revision";
/// How many commits the redb store keeps for [`Store::watch`] from an
/// earlier revision (etcd keeps its history until it is compacted).
const REDB_HISTORY: usize = 4096;

/// The tables of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Broker-wide values: schema version, epoch, mesh revision, trust state.
    Meta,
    /// One record per cluster.
    Clusters,
    /// One record per exported service: key `cluster/namespace/name`.
    Exports,
    /// Join tokens by id.
    Tokens,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Meta, Table::Clusters, Table::Exports, Table::Tokens];

    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Clusters => "clusters",
            Table::Exports => "exports",
            Table::Tokens => "tokens",
        }
    }

    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {message}")]
    Backend { path: PathBuf, message: String },
    #[error(
        "store {path} has schema version {found}; this broker understands version {SCHEMA_VERSION}"
    )]
    Schema { path: PathBuf, found: String },
    #[error("--store {url}: {why}")]
    Url { url: String, why: String },
    /// [`Store::commit_if`]: another writer committed after `expected`.
    #[error(
        "store {path}: changed by another writer (at revision {found}, this writer had seen {expected})"
    )]
    Conflict {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// [`Store::watch`] from a revision the store no longer has.
    #[error(
        "store {path}: revision {after} is compacted (the oldest kept is {oldest}); load again"
    )]
    Compacted {
        path: PathBuf,
        after: u64,
        oldest: u64,
    },
}

impl StoreError {
    /// A conflict: re-read and try again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// One put (`Some`) or delete (`None`).
pub type Op = (Table, String, Option<Vec<u8>>);

/// An atomic set of changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    pub fn put(&mut self, table: Table, key: impl Into<String>, value: Vec<u8>) -> &mut Self {
        self.ops.push((table, key.into(), Some(value)));
        self
    }

    pub fn delete(&mut self, table: Table, key: impl Into<String>) -> &mut Self {
        self.ops.push((table, key.into(), None));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

/// Everything in the store, by table and key.
pub type Contents = BTreeMap<Table, BTreeMap<String, Vec<u8>>>;

/// Applies `ops` to `contents` (a replica's copy of the store).
pub fn apply_ops(contents: &mut Contents, ops: &[Op]) {
    for (t, k, v) in ops {
        let rows = contents.entry(*t).or_default();
        match v {
            Some(v) => {
                rows.insert(k.clone(), v.clone());
            }
            None => {
                rows.remove(k);
            }
        }
    }
}

/// The whole store at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub contents: Contents,
    /// The revision of the last commit in `contents` (0: none yet).
    pub revision: u64,
}

/// One commit, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: u64,
    pub ops: Vec<Op>,
}

/// The commits after a revision, in order; ends (or yields an error, such
/// as [`StoreError::Compacted`]) when the store cannot go on, after which
/// the watcher loads again.
#[derive(Debug)]
pub struct Watch(tokio::sync::mpsc::UnboundedReceiver<Result<Change, StoreError>>);

impl Watch {
    pub fn channel() -> (
        tokio::sync::mpsc::UnboundedSender<Result<Change, StoreError>>,
        Self,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, Watch(rx))
    }

    /// The next commit; `None` when the watch ended.
    pub async fn next(&mut self) -> Option<Result<Change, StoreError>> {
        self.0.recv().await
    }
}

/// Durable storage for the broker.
pub trait Store: Send + Sync + 'static {
    /// Reads the whole store at one revision.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// Reads the whole store (at start-up).
    fn load(&self) -> Result<Contents, StoreError> {
        Ok(self.snapshot()?.contents)
    }

    /// Commits `batch` atomically, if no other commit happened after
    /// revision `expected` (`None`: unconditionally); returns the new
    /// revision. When this returns `Ok` the batch survives a crash
    /// (`kill -9`, power loss); on [`StoreError::Conflict`] none of it is
    /// there. An empty batch commits nothing and returns `expected` (or 0).
    fn commit_if(&self, batch: &Batch, expected: Option<u64>) -> Result<u64, StoreError>;

    /// [`Store::commit_if`] without a condition.
    fn commit(&self, batch: &Batch) -> Result<u64, StoreError> {
        self.commit_if(batch, None)
    }

    /// The commits after revision `after`, whole and in order.
    fn watch(&self, after: u64) -> Result<Watch, StoreError>;

    /// Whether other processes write this store too (several broker
    /// replicas on one etcd): then a broker follows its watch.
    fn shared(&self) -> bool {
        false
    }
}

/// The commits a redb store made since it was opened, for watches.
#[derive(Default)]
struct History {
    /// The store's revision.
    revision: u64,
    recent: VecDeque<Change>,
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<Result<Change, StoreError>>>,
}

/// The embedded store: one redb file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    /// Held across each commit, so that watchers see commits in order.
    history: Mutex<History>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens (or creates) the store file, creating its tables and checking
    /// the schema version.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError::Backend {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        let store = RedbStore {
            db,
            path: path.to_path_buf(),
            history: Mutex::default(),
        };
        let txn = store.db.begin_write().map_err(|e| err(&e))?;
        {
            for t in Table::ALL {
                txn.open_table(t.def()).map_err(|e| err(&e))?;
            }
            let mut meta = txn.open_table(Table::Meta.def()).map_err(|e| err(&e))?;
            let found = meta
                .get(SCHEMA_KEY)
                .map_err(|e| err(&e))?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match found {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_string().as_bytes())
                        .map_err(|e| err(&e))?;
                }
                Some(v) if v == SCHEMA_VERSION.to_string() => {}
                Some(found) => {
                    return Err(StoreError::Schema {
                        path: path.to_path_buf(),
                        found,
                    });
                }
            }
            let revision = match meta.get(REDB_REVISION_KEY).map_err(|e| err(&e))? {
                None => 0,
                Some(v) => String::from_utf8_lossy(v.value())
                    .parse()
                    .map_err(|e| err(&format!("meta/{REDB_REVISION_KEY}: {e}")))?,
            };
            store.lock_history().revision = revision;
        }
        txn.commit().map_err(|e| err(&e))?;
        Ok(store)
    }

    fn lock_history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

impl Store for RedbStore {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // Under the history lock: the revision is that of these contents.
        let history = self.lock_history();
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut out = Contents::new();
        for t in Table::ALL {
            let table = txn.open_table(t.def()).map_err(|e| self.err(e))?;
            let entries = out.entry(t).or_default();
            for item in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                entries.insert(k.value().to_string(), v.value().to_vec());
            }
        }
        if let Some(meta) = out.get_mut(&Table::Meta) {
            meta.remove(REDB_REVISION_KEY);
        }
        Ok(Snapshot {
            contents: out,
            revision: history.revision,
        })
    }

    fn commit_if(&self, batch: &Batch, expected: Option<u64>) -> Result<u64, StoreError> {
        let mut history = self.lock_history();
        if let Some(expected) = expected
            && history.revision > expected
        {
            return Err(StoreError::Conflict {
                path: self.path.clone(),
                expected,
                found: history.revision,
            });
        }
        if batch.is_empty() {
            return Ok(expected.unwrap_or(0));
        }
        let revision = history.revision + 1;
        // redb's default durability is Immediate: commit() returns only
        // after the data is on stable storage.
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut tables = BTreeMap::new();
            for t in batch.ops.iter().map(|(t, _, _)| *t).chain([Table::Meta]) {
                if let std::collections::btree_map::Entry::Vacant(v) = tables.entry(t) {
                    v.insert(txn.open_table(t.def()).map_err(|e| self.err(e))?);
                }
            }
            for (t, key, value) in &batch.ops {
                let Some(table) = tables.get_mut(t) else {
                    continue;
                };
                match value {
                    Some(v) => {
                        table
                            .insert(key.as_str(), v.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    None => {
                        table.remove(key.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
            if let Some(meta) = tables.get_mut(&Table::Meta) {
                meta.insert(REDB_REVISION_KEY, revision.to_string().as_bytes())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        history.revision = revision;
        let change = Change {
            revision,
            ops: batch.ops.clone(),
        };
        history
            .watchers
            .retain(|w| w.send(Ok(change.clone())).is_ok());
        if history.recent.len() == REDB_HISTORY {
            history.recent.pop_front();
        }
        history.recent.push_back(change);
        Ok(revision)
    }

    fn watch(&self, after: u64) -> Result<Watch, StoreError> {
        let mut history = self.lock_history();
        let oldest = history
            .recent
            .front()
            .map_or(history.revision, |c| c.revision - 1);
        if after < oldest {
            return Err(StoreError::Compacted {
                path: self.path.clone(),
                after,
                oldest,
            });
        }
        let (tx, watch) = Watch::channel();
        for c in history.recent.iter().filter(|c| c.revision > after) {
            let _ = tx.send(Ok(c.clone()));
        }
        history.watchers.push(tx);
        Ok(watch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            let mut b = Batch::new();
            b.put(Table::Clusters, "east", b"one".to_vec()).put(
                Table::Exports,
                "east/ns/svc",
                b"two".to_vec(),
            );
            store.commit(&b).unwrap();
            let mut b = Batch::new();
            b.delete(Table::Exports, "east/ns/svc")
                .put(Table::Meta, "revision", b"7".to_vec());
            store.commit(&b).unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let c = store.load().unwrap();
        assert_eq!(c[&Table::Clusters]["east"], b"one");
        assert!(c[&Table::Exports].is_empty());
        assert_eq!(c[&Table::Meta]["revision"], b"7");
        assert_eq!(c[&Table::Meta][SCHEMA_KEY], b"1");
    }

    #[test]
    fn refuses_an_unknown_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            let mut b = Batch::new();
            b.put(Table::Meta, SCHEMA_KEY, b"99".to_vec());
            store.commit(&b).unwrap();
        }
        let err = RedbStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    #[test]
    fn garbage_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.redb");
        std::fs::write(&path, b"this is not a redb file at all, just text").unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("broker.redb"), "{err}");
    }
}
