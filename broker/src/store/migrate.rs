//! Copying a mesh's state from one store to another
//! (`strait broker migrate --from redb:PATH --to etcd://...`), verified.
//!
//! The target must be empty, or hold an unfinished migration: the copy
//! first writes a marker ([`MIGRATION_KEY`]), then the rows in
//! transactions of at most [`CHUNK`] changes (etcd refuses more than 128
//! by default), then reads the target back and compares it with the
//! source row by row, and only then removes the marker. A broker refuses
//! to start on a store with the marker, so a copy that stopped half way
//! is never served; running the migration again finishes it.

use std::collections::BTreeMap;

use super::{Batch, Contents, SCHEMA_KEY, Store, StoreError, Table};

/// The meta key that marks a store a migration is copying into.
pub const MIGRATION_KEY: &str = "migration_in_progress";
/// Changes per transaction.
pub const CHUNK: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the target already holds {rows} rows (e.g. {table} {key:?}): migrate copies into an \
         empty store; point --to (or --etcd-prefix) elsewhere, or remove them"
    )]
    TargetNotEmpty {
        rows: usize,
        table: &'static str,
        key: String,
    },
    #[error(
        "the copy differs from the source at {table} {key:?}: {why}; the target keeps the migration marker and is not served"
    )]
    Verify {
        table: &'static str,
        key: String,
        why: &'static str,
    },
}

/// What was copied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Copied {
    /// Rows per table.
    pub tables: BTreeMap<Table, usize>,
    /// Whether an unfinished earlier copy was finished.
    pub resumed: bool,
}

impl Copied {
    pub fn rows(&self) -> usize {
        self.tables.values().sum()
    }
}

/// The rows a migration copies: everything but the schema version (each
/// store writes its own) and the marker.
fn rows(c: &Contents) -> impl Iterator<Item = (Table, &String, &Vec<u8>)> {
    c.iter().flat_map(|(t, rows)| {
        rows.iter()
            .filter(move |(k, _)| {
                *t != Table::Meta || (k.as_str() != SCHEMA_KEY && k.as_str() != MIGRATION_KEY)
            })
            .map(move |(k, v)| (*t, k, v))
    })
}

/// Copies every row of `from` into `to` and verifies the copy;
/// `progress(done, total)` after each transaction.
pub fn migrate(
    from: &dyn Store,
    to: &dyn Store,
    source_name: &str,
    mut progress: impl FnMut(usize, usize),
) -> Result<Copied, MigrateError> {
    let source = from.load()?;
    let target = to.load()?;
    let resumed = target
        .get(&Table::Meta)
        .is_some_and(|m| m.contains_key(MIGRATION_KEY));
    if !resumed && let Some((t, k, _)) = rows(&target).next() {
        return Err(MigrateError::TargetNotEmpty {
            rows: rows(&target).count(),
            table: t.name(),
            key: k.clone(),
        });
    }
    let mut marker = Batch::new();
    marker.put(
        Table::Meta,
        MIGRATION_KEY,
        format!("copying from {source_name}").into_bytes(),
    );
    to.commit(&marker)?;

    // Rows of an earlier attempt the source no longer has go too.
    let mut changes: Vec<(Table, String, Option<Vec<u8>>)> = rows(&source)
        .map(|(t, k, v)| (t, k.clone(), Some(v.clone())))
        .collect();
    for (t, k, _) in rows(&target) {
        if !source.get(&t).is_some_and(|r| r.contains_key(k)) {
            changes.push((t, k.clone(), None));
        }
    }
    let total = changes.len();
    let mut done = 0;
    for chunk in changes.chunks(CHUNK) {
        let mut b = Batch::new();
        for (t, k, v) in chunk {
            match v {
                Some(v) => b.put(*t, k.clone(), v.clone()),
                None => b.delete(*t, k.clone()),
            };
        }
        to.commit(&b)?;
        done += chunk.len();
        progress(done, total);
    }

    let copy = to.load()?;
    for (t, k, v) in rows(&source) {
        match copy.get(&t).and_then(|r| r.get(k)) {
            None => return Err(verify(t, k, "missing")),
            Some(got) if got != v => return Err(verify(t, k, "another value")),
            Some(_) => {}
        }
    }
    if let Some((t, k, _)) =
        rows(&copy).find(|(t, k, _)| !source.get(t).is_some_and(|r| r.contains_key(*k)))
    {
        return Err(verify(t, k, "not in the source"));
    }
    let mut done = Batch::new();
    done.delete(Table::Meta, MIGRATION_KEY);
    to.commit(&done)?;

    let mut tables = BTreeMap::new();
    for (t, _, _) in rows(&source) {
        *tables.entry(t).or_insert(0) += 1;
    }
    Ok(Copied { tables, resumed })
}

fn verify(t: Table, k: &str, why: &'static str) -> MigrateError {
    MigrateError::Verify {
        table: t.name(),
        key: k.to_string(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    /// Whether `store` holds an unfinished migration.
    fn unfinished(store: &dyn Store) -> Result<bool, StoreError> {
        Ok(store
            .load()?
            .get(&Table::Meta)
            .is_some_and(|m| m.contains_key(MIGRATION_KEY)))
    }

    fn filled(path: &std::path::Path, n: usize) -> RedbStore {
        let s = RedbStore::open(path).unwrap();
        let mut b = Batch::new();
        b.put(Table::Clusters, "east", b"c".to_vec())
            .put(Table::Meta, "epoch", b"e".to_vec())
            .put(Table::Tokens, "t", b"tok".to_vec());
        for i in 0..n {
            b.put(Table::Exports, format!("east/ns/svc-{i}"), vec![i as u8]);
        }
        s.commit(&b).unwrap();
        s
    }

    #[test]
    fn copies_in_chunks_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let from = filled(&dir.path().join("a.redb"), 250);
        let to = RedbStore::open(&dir.path().join("b.redb")).unwrap();
        let mut seen = Vec::new();
        let copied = migrate(&from, &to, "a", |d, t| seen.push((d, t))).unwrap();
        assert_eq!(copied.rows(), 253);
        assert_eq!(copied.tables[&Table::Exports], 250);
        assert!(!copied.resumed);
        assert_eq!(seen, [(100, 253), (200, 253), (253, 253)]);
        assert!(!unfinished(&to).unwrap());
        let (a, b) = (from.load().unwrap(), to.load().unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn a_target_with_rows_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let from = filled(&dir.path().join("a.redb"), 3);
        let to = filled(&dir.path().join("b.redb"), 1);
        let e = migrate(&from, &to, "a", |_, _| {}).unwrap_err().to_string();
        assert!(
            e.contains("already holds 4 rows") && e.contains("meta \"epoch\""),
            "{e}"
        );
        assert!(!unfinished(&to).unwrap(), "a refusal writes nothing");
    }

    #[test]
    fn an_unfinished_copy_is_marked_then_finished_by_a_second_run() {
        let dir = tempfile::tempdir().unwrap();
        let from = filled(&dir.path().join("a.redb"), 5);
        let to = RedbStore::open(&dir.path().join("b.redb")).unwrap();
        // As a copy that stopped after its marker and a stray row.
        let mut b = Batch::new();
        b.put(Table::Meta, MIGRATION_KEY, b"copying".to_vec()).put(
            Table::Exports,
            "gone/ns/svc",
            b"x".to_vec(),
        );
        to.commit(&b).unwrap();
        assert!(unfinished(&to).unwrap());
        let copied = migrate(&from, &to, "a", |_, _| {}).unwrap();
        assert!(copied.resumed);
        assert!(!unfinished(&to).unwrap());
        assert_eq!(
            from.load().unwrap(),
            to.load().unwrap(),
            "the stray row went"
        );
    }
}
