//! The broker's durable store.
//!
//! The broker keeps its whole state in memory and writes every change
//! through a [`Store`] before it acknowledges it: a change is a [`Batch`] of
//! puts and deletes committed atomically and durably. The model is a few
//! named tables of string keys and byte values, which maps onto redb tables
//! (the default, embedded: [`RedbStore`]) and onto etcd key prefixes with
//! one transaction per batch ([`etcd::EtcdStore`], feature `etcd`) alike.
//! Both pass the same conformance suite (`broker/tests/store.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod migrate;

/// The schema this broker writes and understands.
pub const SCHEMA_VERSION: u32 = 1;
/// The meta key holding the schema version.
pub const SCHEMA_KEY: &str = "schema_version";

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
}

/// An atomic set of changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<(Table, String, Option<Vec<u8>>)>,
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
}

/// Everything in the store, by table and key.
pub type Contents = BTreeMap<Table, BTreeMap<String, Vec<u8>>>;

/// Durable storage for the broker.
pub trait Store: Send + Sync + 'static {
    /// Reads the whole store (at start-up).
    fn load(&self) -> Result<Contents, StoreError>;
    /// Commits `batch` atomically; when this returns `Ok` the batch survives
    /// a crash (`kill -9`, power loss).
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
}

/// The embedded store: one redb file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
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
        }
        txn.commit().map_err(|e| err(&e))?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Contents, StoreError> {
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
        Ok(out)
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // redb's default durability is Immediate: commit() returns only
        // after the data is on stable storage.
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut tables = BTreeMap::new();
            for (t, _, _) in &batch.ops {
                if !tables.contains_key(t) {
                    tables.insert(*t, txn.open_table(t.def()).map_err(|e| self.err(e))?);
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
        }
        txn.commit().map_err(|e| self.err(e))
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
