//! `strait broker migrate` end to end (feature `etcd`): a real `strait
//! broker` on redb, its state copied into a real etcd, the broker restarted
//! there with its mesh.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::sync::*;
use common::{Broker, Scratch};

/// `strait broker migrate --from redb:... --to etcd://...`: a broker's
/// state copied and verified; the broker restarted on etcd has its
/// clusters and exports, and the exporter resumes where it was; a second
/// copy into the same prefix is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redb_broker_migrated_to_etcd_keeps_its_mesh() {
    let Some(etcd) = common::etcd::Etcd::start() else {
        return;
    };
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let east = join(&broker, &s, "east", "net-east").await;
    let mut e = open(
        &east,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    next_imports(&mut e).await;
    let services = (0..150).map(|i| svc("shop", &format!("svc-{i}"))).collect();
    e.send(snapshot(1, services)).await.unwrap();
    expect_ack(&mut e, 1).await;
    drop(e);
    let addr = broker.addr.clone();
    drop(broker);

    let from = format!("redb:{}", s.path("broker").join("broker.redb").display());
    let to = format!("etcd://{}", etcd.client);
    let migrate = |from: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
            .args([
                "broker",
                "migrate",
                "--from",
                from,
                "--to",
                &to,
                "--mesh-name",
                TD,
            ])
            .output()
            .unwrap()
    };
    let out = migrate(&from);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("exports 150") && stdout.contains("verified"),
        "{stdout}"
    );
    assert!(stderr.contains("100/155 rows"), "progress lines: {stderr}");
    let again = migrate(&from);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    std::fs::remove_file(s.path("broker").join("broker.redb")).unwrap();
    let store = format!("--store={to}");
    // Replicas on etcd sign with the root they are given: the one this
    // broker made in its data directory.
    let root = format!("--root={}", s.path("broker").join("root").display());
    let broker = Broker::start_with(
        &s.path("broker"),
        TD,
        &addr,
        &[&store, &root, "--mesh-name", TD],
    );
    let list = broker
        .ctl(&["exports", "list", "--cluster", "east", "-o", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 150, "{list}");
    let clusters = broker.ctl(&["cluster", "list"]).ok().stdout;
    assert!(clusters.contains("east"), "{clusters}");
    let e = open(
        &east,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    assert_eq!(
        e.broker_export_revision, 1,
        "the exporter resumes at its revision"
    );
    assert!(!s.path("broker").join("broker.redb").exists());

    // A copy that stopped before it was verified (its marker left) is
    // never served.
    drop(e);
    drop(broker);
    let etcdctl = common::etcd::etcd_binary()
        .unwrap()
        .with_file_name("etcdctl");
    let put = std::process::Command::new(etcdctl)
        .args(["--endpoints", &etcd.client, "put"])
        .arg(format!("/strait/{TD}/meta/migration_in_progress"))
        .arg("copying from redb:...")
        .output()
        .unwrap();
    assert!(put.status.success(), "{put:?}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args([
            "broker",
            "--trust-domain",
            TD,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(s.path("broker"))
        .arg(&store)
        .arg(&root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("unfinished copy"), "{err}");
}
