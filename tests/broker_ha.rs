//! Broker replicas on one etcd (`--store etcd://...`, feature `etcd`): a
//! real etcd (`bash scripts/tools.sh etcd`) and two `strait broker`
//! processes on it.
//!
//! What replicas must do: each serves clusters and admins, and what a
//! cluster exports through one reaches importers on the other; exports
//! churning through both at once are all acknowledged and all kept (each
//! replica's commits are conditional on what it has seen); one leads, and
//! when it is killed with SIGKILL the other leads within the lease; the
//! clusters of the dead one carry on through the survivor.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::sync::*;
use common::{Broker, Scratch, free_port};
use strait_broker_client::client::SyncSession;
use strait_proto::strait::broker::v1 as pb;

const TD: &str = "cluster.local";
const LEASE: &str = "2s";

fn status(b: &Broker) -> serde_json::Value {
    serde_json::from_str(&b.ctl(&["status", "-o", "json"]).ok().stdout).unwrap()
}

/// Polls `b`'s status until `check` holds, for up to `within`.
async fn wait_status(
    b: &Broker,
    what: &str,
    within: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let v = status(b);
        if check(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The service names of an imports update.
fn names(u: &pb::ImportsUpdate) -> Vec<String> {
    u.upserts.iter().map(|i| i.name.clone()).collect()
}

/// Reads imports from `s` until `name` is among them.
async fn until_imported(s: &mut SyncSession, name: &str) {
    for _ in 0..20 {
        let u = next_imports(s).await;
        if names(&u).iter().any(|n| n == name) {
            return;
        }
    }
    panic!("{name} never imported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_etcd_serve_one_mesh_and_fail_over() {
    let Some(etcd) = common::etcd::Etcd::start() else {
        return;
    };
    let s = Scratch::new();
    let dbg = s.dir.path().to_path_buf();
    std::panic::set_hook(Box::new(move |i| {
        let _ = std::process::Command::new("cp")
            .arg("-r")
            .arg(&dbg)
            .arg("/tmp/ha-debug")
            .status();
        eprintln!("{i}");
    }));
    Broker::init_root(&s.path("root"), TD);
    let addrs = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let store = format!("--store=etcd://{}", etcd.client);
    let root = format!("--root={}", s.path("root").display());
    let start = |i: usize| {
        let name = format!("broker-{i}");
        Broker::start_with(
            &s.path(&name),
            TD,
            &addrs[i],
            &[
                &store,
                &root,
                "--replica",
                &name,
                "--lease-ttl",
                LEASE,
                "--advertise",
                &addrs[0],
                "--advertise",
                &addrs[1],
            ],
        )
    };
    let mut brokers = vec![start(0), start(1)];

    // Both replicas registered, one leads; each says what it is.
    let v = wait_status(
        &brokers[1],
        "two replicas and a leader",
        Duration::from_secs(10),
        |v| {
            let r = v["replicas"].as_array().map_or(0, Vec::len);
            r == 2
                && v["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["leader"] == true)
        },
    )
    .await;
    assert!(v["store"].as_str().unwrap().starts_with("etcd://"), "{v}");
    assert_eq!(v["replica"], "broker-1", "{v}");
    let leader = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["leader"] == true)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let roles: Vec<String> = brokers
        .iter()
        .map(|b| status(b)["role"].as_str().unwrap().to_string())
        .collect();
    assert!(
        roles.iter().filter(|r| *r == "leader").count() == 1
            && roles.iter().filter(|r| *r == "follower").count() == 1,
        "{roles:?}"
    );

    // A cluster added on one replica joins, and is listed on the other.
    let east = join(&brokers[0], &s, "east", "net-east").await;
    let west = join(&brokers[1], &s, "west", "net-west").await;
    let listed = brokers[0].ctl(&["cluster", "list"]).ok().stdout;
    assert!(
        listed.contains("east") && listed.contains("west"),
        "{listed}"
    );

    // east on broker-0, west on broker-1: each imports what the other
    // exports through the other replica.
    let mut e = open_at(
        &east,
        0,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    let mut w = open_at(
        &west,
        1,
        with_network(hello(0, "", "127.0.0.2:15443"), "net-west"),
    )
    .await;
    next_imports(&mut e).await;
    next_imports(&mut w).await;
    e.send(snapshot(1, vec![svc("shop", "cart")]))
        .await
        .unwrap();
    expect_ack(&mut e, 1).await;
    until_imported(&mut w, "cart").await;
    w.send(snapshot(1, vec![svc("shop", "pay")])).await.unwrap();
    expect_ack(&mut w, 1).await;
    until_imported(&mut e, "pay").await;

    // Churn through both replicas at once: every change is acknowledged
    // (a commit that lost the race is planned again, not refused), and
    // both replicas end with all of them.
    const N: u64 = 40;
    let churn = |mut s: SyncSession, prefix: &'static str| async move {
        for r in 2..=N + 1 {
            let up = vec![svc("shop", &format!("{prefix}-{r}"))];
            s.send(delta(r - 1, r, up, &[])).await.unwrap();
            until_ack(&mut s, r).await;
        }
        s
    };
    let (e, w) = tokio::join!(churn(e, "e"), churn(w, "w"));
    for b in &brokers {
        for (cluster, n) in [("east", N + 1), ("west", N + 1)] {
            let list = b
                .ctl(&["exports", "list", "--cluster", cluster, "-o", "json"])
                .ok()
                .stdout;
            let v: serde_json::Value = serde_json::from_str(&list).unwrap();
            assert_eq!(
                v.as_array().unwrap().len() as u64,
                n,
                "{cluster}'s exports on {}: {list}",
                b.addr
            );
        }
    }

    // SIGKILL the leader: the other leads within the lease (and a bit).
    let (dead, alive) = if leader == "broker-0" { (0, 1) } else { (1, 0) };
    let killed = Instant::now();
    brokers[dead].kill9();
    let v = wait_status(
        &brokers[alive],
        "a new leader",
        Duration::from_secs(15),
        |v| v["role"] == "leader",
    )
    .await;
    let failover = killed.elapsed();
    eprintln!("failover after SIGKILL of the leader: {failover:?} (lease {LEASE})");
    let replicas = v["replicas"].as_array().unwrap();
    assert_eq!(
        replicas.len(),
        1,
        "the dead replica's record outlived its lease: {v}"
    );

    // The dead replica's cluster carries on through the survivor.
    drop((e, w));
    let (moved, stayed) = if dead == 0 {
        (&east, &west)
    } else {
        (&west, &east)
    };
    let mut m = open_at(
        moved,
        alive,
        with_network(
            hello(0, "", "127.0.0.9:15443"),
            if dead == 0 { "net-east" } else { "net-west" },
        ),
    )
    .await;
    let mut st = open_at(
        stayed,
        alive,
        with_network(
            hello(0, "", "127.0.0.8:15443"),
            if dead == 0 { "net-west" } else { "net-east" },
        ),
    )
    .await;
    next_imports(&mut m).await;
    next_imports(&mut st).await;
    m.send(snapshot(100, vec![svc("shop", "after-failover")]))
        .await
        .unwrap();
    until_ack(&mut m, 100).await;
    until_imported(&mut st, "after-failover").await;
}
