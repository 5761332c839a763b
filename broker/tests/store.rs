//! One conformance suite for the broker's stores: the embedded redb file
//! and, with feature `etcd`, a real etcd (built by `bash scripts/tools.sh
//! etcd`; skipped with one line without it, a failure under `CI=true`).
//!
//! What every store must do: start with the schema version and empty
//! tables; keep committed batches across a reopen; overwrite and delete;
//! number commits with monotonic revisions; refuse a commit conditional on
//! a revision another commit followed, leaving none of it; stream the
//! commits after a revision, whole and in order; commit a batch whole or
//! not at all (a batch too large for the backend fails leaving none of
//! it); keep keys and binary values exactly; keep two meshes apart; refuse
//! a store of another schema version by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use strait_broker::store::{Batch, Change, RedbStore, SCHEMA_KEY, Store, StoreError, Table, Watch};

/// A place stores are opened on: the same one again (a reopen), or another
/// mesh's beside it.
trait Backing {
    fn open(&self) -> Result<Box<dyn Store>, StoreError>;
    fn open_other(&self) -> Box<dyn Store>;
}

fn conformance(b: &dyn Backing) {
    let store = b.open().unwrap();
    let c = store.load().unwrap();
    for t in Table::ALL {
        let rows = c
            .get(&t)
            .unwrap_or_else(|| panic!("table {} missing", t.name()));
        if t == Table::Meta {
            assert_eq!(rows.len(), 1, "a fresh store's meta: {rows:?}");
            assert_eq!(rows[SCHEMA_KEY], b"1");
        } else {
            assert!(rows.is_empty(), "a fresh store's {}: {rows:?}", t.name());
        }
    }

    // Batches across tables, overwrite, delete; an empty batch is a no-op.
    let binary = vec![0u8, 255, 10, 0, 7];
    let mut first = Batch::new();
    first
        .put(Table::Clusters, "east", b"one".to_vec())
        .put(Table::Exports, "east/ns-ü/svc", binary.clone())
        .put(Table::Tokens, "t1", b"tok".to_vec());
    store.commit(&first).unwrap();
    let mut second = Batch::new();
    second
        .delete(Table::Tokens, "t1")
        .put(Table::Clusters, "east", b"two".to_vec())
        .put(Table::Meta, "revision", b"7".to_vec())
        .delete(Table::Exports, "never/there");
    store.commit(&second).unwrap();
    store.commit(&Batch::new()).unwrap();
    drop(store);

    let store = b.open().unwrap();
    let c = store.load().unwrap();
    assert_eq!(c[&Table::Clusters]["east"], b"two", "overwritten");
    assert_eq!(c[&Table::Exports]["east/ns-ü/svc"], binary, "key and bytes");
    assert!(
        c[&Table::Tokens].is_empty(),
        "deleted: {:?}",
        c[&Table::Tokens]
    );
    assert_eq!(c[&Table::Meta]["revision"], b"7");

    revisions_and_watches(store.as_ref());

    // All or nothing: a batch the backend cannot take in one transaction
    // fails leaving none of it (etcd's --max-txn-ops, 128 by default),
    // or is there whole.
    let mut big = Batch::new();
    for i in 0..200 {
        big.put(Table::Exports, format!("west/ns/svc-{i}"), vec![1]);
    }
    big.delete(Table::Clusters, "east");
    let result = store.commit(&big);
    let c = store.load().unwrap();
    let west = c[&Table::Exports]
        .keys()
        .filter(|k| k.starts_with("west/"))
        .count();
    match result {
        Ok(_) => {
            assert_eq!(west, 200, "a committed batch is there whole");
            assert!(!c[&Table::Clusters].contains_key("east"));
        }
        Err(e) => {
            assert_eq!(west, 0, "a failed batch left part of itself: {e}");
            assert!(c[&Table::Clusters].contains_key("east"), "{e}");
            assert!(e.to_string().contains("201 operations"), "{e}");
        }
    }

    // Another mesh's store does not see this one's rows, nor this its.
    let other = b.open_other();
    let mut b2 = Batch::new();
    b2.put(Table::Clusters, "elsewhere", b"x".to_vec());
    other.commit(&b2).unwrap();
    assert!(!other.load().unwrap()[&Table::Exports].contains_key("east/ns-ü/svc"));
    assert!(!store.load().unwrap()[&Table::Clusters].contains_key("elsewhere"));

    // A store of another schema version is refused, naming it.
    let mut future = Batch::new();
    future.put(Table::Meta, SCHEMA_KEY, b"99".to_vec());
    store.commit(&future).unwrap();
    drop(store);
    let e = b.open().err().expect("a store of schema version 99 opened");
    assert!(e.to_string().contains("schema version 99"), "{e}");
}

fn put(table: Table, key: &str, value: &[u8]) -> Batch {
    let mut b = Batch::new();
    b.put(table, key, value.to_vec());
    b
}

/// The next commit of `w`, within 5 s.
fn next(rt: &tokio::runtime::Runtime, w: &mut Watch) -> Change {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), w.next()).await })
        .expect("no commit from the watch within 5 s")
        .expect("the watch ended")
        .expect("the watch failed")
}

/// Revisions, conditional commits and watches.
fn revisions_and_watches(store: &dyn Store) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = store.snapshot().unwrap();
    let r1 = store
        .commit_if(&put(Table::Clusters, "cas-a", b"1"), Some(seen.revision))
        .unwrap();
    assert!(r1 > seen.revision, "{r1} after {}", seen.revision);
    assert_eq!(store.snapshot().unwrap().revision, r1);
    let mut from_r1 = store.watch(r1).unwrap();
    let mut second = put(Table::Clusters, "cas-b", b"2");
    second.delete(Table::Clusters, "cas-a");
    let r2 = store.commit(&second).unwrap();
    assert!(r2 > r1, "{r2} after {r1}");

    // A writer that saw only r1 is refused, and none of its batch is there.
    let mut stale = put(Table::Exports, "stale/ns/svc", b"x");
    stale.put(Table::Clusters, "cas-b", b"stale".to_vec());
    let e = store.commit_if(&stale, Some(r1)).unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert!(e.to_string().contains(&format!("revision {r2}")), "{e}");
    let now = store.snapshot().unwrap();
    assert_eq!(now.revision, r2, "a refused commit made a revision");
    assert!(!now.contents[&Table::Exports].contains_key("stale/ns/svc"));
    assert_eq!(now.contents[&Table::Clusters]["cas-b"], b"2");
    assert!(!now.contents[&Table::Clusters].contains_key("cas-a"));

    // The watch from r1 gets r2 whole, then what follows, in order.
    let c = next(&rt, &mut from_r1);
    assert_eq!(c.revision, r2);
    assert_eq!(c.ops, second.ops(), "the commit after r1, whole");
    let mut from_now = store.watch(r2).unwrap();
    let r3 = store
        .commit_if(&put(Table::Tokens, "t9", b"3"), Some(r2))
        .unwrap();
    for w in [&mut from_r1, &mut from_now] {
        let c = next(&rt, w);
        assert_eq!((c.revision, c.ops.len()), (r3, 1), "{c:?}");
    }
    let mut cleanup = Batch::new();
    cleanup
        .delete(Table::Clusters, "cas-b")
        .delete(Table::Tokens, "t9");
    store.commit(&cleanup).unwrap();
}

struct Redb(tempfile::TempDir);

impl Backing for Redb {
    fn open(&self) -> Result<Box<dyn Store>, StoreError> {
        Ok(Box::new(RedbStore::open(
            &self.0.path().join("broker.redb"),
        )?))
    }
    fn open_other(&self) -> Box<dyn Store> {
        Box::new(RedbStore::open(&self.0.path().join("other.redb")).unwrap())
    }
}

#[test]
fn redb_store_conforms() {
    conformance(&Redb(tempfile::tempdir().unwrap()));
}

#[cfg(feature = "etcd")]
#[path = "../../tests/common/etcd.rs"]
mod harness;

#[cfg(feature = "etcd")]
mod etcd {
    use std::time::Instant;

    use strait_broker::store::etcd::{EtcdConfig, EtcdStore};

    use super::*;

    use super::harness::Etcd;

    struct OnEtcd(Etcd);

    impl OnEtcd {
        fn store(&self, mesh: &str) -> Result<Box<dyn Store>, StoreError> {
            let config = EtcdConfig::parse(&format!("etcd://{}", self.0.client), mesh)?;
            Ok(Box::new(EtcdStore::open(config)?))
        }
    }

    impl Backing for OnEtcd {
        fn open(&self) -> Result<Box<dyn Store>, StoreError> {
            self.store("mesh-a")
        }
        fn open_other(&self) -> Box<dyn Store> {
            self.store("mesh-a2").unwrap()
        }
    }

    #[test]
    fn etcd_store_conforms() {
        let Some(etcd) = Etcd::start() else { return };
        conformance(&OnEtcd(etcd));
    }

    /// Two replicas on one prefix: each sees the other's commits through
    /// its watch, and a plan made before the other's commit is refused.
    #[test]
    fn two_writers_on_one_etcd_see_each_other_and_never_both_win() {
        let Some(etcd) = Etcd::start() else { return };
        let on = OnEtcd(etcd);
        let (a, b) = (on.store("mesh-a").unwrap(), on.store("mesh-a").unwrap());
        assert!(a.shared());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen = a.snapshot().unwrap().revision;
        let mut a_watch = a.watch(seen).unwrap();
        let rb = b
            .commit_if(&put(Table::Exports, "west/ns/svc", b"b"), Some(seen))
            .unwrap();
        let e = a
            .commit_if(&put(Table::Exports, "west/ns/svc", b"a"), Some(seen))
            .unwrap_err();
        assert!(e.is_conflict(), "{e}");
        let c = next(&rt, &mut a_watch);
        assert_eq!(c.revision, rb);
        assert_eq!(
            c.ops,
            [(
                Table::Exports,
                "west/ns/svc".to_string(),
                Some(b"b".to_vec())
            )]
        );
        let ra = a
            .commit_if(&put(Table::Exports, "west/ns/svc", b"a"), Some(c.revision))
            .unwrap();
        assert!(ra > rb);
        assert_eq!(b.load().unwrap()[&Table::Exports]["west/ns/svc"], b"a");
    }

    /// A watch from a compacted revision says so (the replica then loads
    /// the whole store again).
    #[test]
    fn a_watch_from_a_compacted_revision_is_refused_by_name() {
        let Some(etcd) = Etcd::start() else { return };
        let on = OnEtcd(etcd);
        let store = on.store("mesh-a").unwrap();
        let first = store.commit(&put(Table::Tokens, "t", b"1")).unwrap();
        let last = store.commit(&put(Table::Tokens, "t", b"2")).unwrap();
        on.0.etcdctl(&["compact", &last.to_string()]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut w = store.watch(first - 1).unwrap();
        let got = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), w.next()).await })
            .expect("no answer from the watch");
        match got {
            Some(Err(StoreError::Compacted { oldest, .. })) => assert_eq!(oldest, last),
            other => panic!("a watch from a compacted revision: {other:?}"),
        }
    }

    /// etcd gone: a write fails within the request deadline with an error
    /// naming the store, and opening one names why.
    #[test]
    fn an_unreachable_etcd_fails_writes_by_name_and_in_bounded_time() {
        let Some(etcd) = Etcd::start() else { return };
        let on = OnEtcd(etcd);
        let store = on.store("mesh-a").unwrap();
        let client = on.0.client.clone();
        drop(on);
        let started = Instant::now();
        let mut b = Batch::new();
        b.put(Table::Clusters, "east", b"x".to_vec());
        let e = store.commit(&b).unwrap_err().to_string();
        assert!(e.contains(&client) && e.contains("/strait/mesh-a/"), "{e}");
        assert!(
            started.elapsed() < strait_broker::store::etcd::REQUEST_TIMEOUT * 3,
            "a write to a dead etcd took {:?}",
            started.elapsed()
        );
        let config = EtcdConfig::parse(&format!("etcd://{client}"), "mesh-a").unwrap();
        let e = EtcdStore::open(config).unwrap_err().to_string();
        assert!(e.contains(&client), "{e}");
    }
}
