//! The trust broker end to end: a real `strait broker` process, `straitctl`
//! for administration, and clusters played by the client library over mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::sync::*;
use common::{Broker, Scratch};
use pb::sync_response::Msg as Down;
use strait_broker_client::client::{self, SyncSession};
use strait_proto::strait::broker::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_export_import_remove_resume() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let east = join(&broker, &s, "east", "net-east").await;
    let west = join(&broker, &s, "west", "net-west").await;

    // The joined cluster holds an Istio plug-in CA under the mesh root.
    s.openssl(&[
        "verify",
        "-CAfile",
        east.join("cacerts/root-cert.pem").to_str().unwrap(),
        east.join("cacerts/ca-cert.pem").to_str().unwrap(),
    ])
    .ok();

    let mut e = open(
        &east,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    let mut w = open(
        &west,
        with_network(hello(0, "", "127.0.0.2:15443"), "net-west"),
    )
    .await;
    // Both start with an (empty) snapshot.
    assert!(next_imports(&mut e).await.snapshot);
    assert!(next_imports(&mut w).await.snapshot);

    e.send(snapshot(1, vec![svc("shop", "cart")]))
        .await
        .unwrap();
    expect_ack(&mut e, 1).await;
    let u = next_imports(&mut w).await;
    assert!(!u.snapshot);
    assert_eq!(u.upserts.len(), 1);
    let remote = &u.upserts[0].remotes[0];
    assert_eq!(remote.cluster, "east");
    assert_eq!(
        remote.cluster_info.as_ref().unwrap().gateways,
        ["127.0.0.1:15443"]
    );
    let seen = u.revision;
    let epoch = u.epoch.clone();

    // straitctl shows it, and the Istio objects west gets.
    let list = broker.ctl(&["exports", "list", "-o", "json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["cluster"], "east");
    assert_eq!(v[0]["namespace"], "shop");
    assert_eq!(v[0]["name"], "cart");
    assert!(v[0]["ports"].is_array() && v[0]["export_to"].is_array());
    let yaml = broker.ctl(&["imports", "show", "west"]).ok().stdout;
    assert!(yaml.contains("kind: ServiceEntry"), "{yaml}");
    assert!(yaml.contains("cart.shop.svc.clusterset.local"), "{yaml}");
    assert!(yaml.contains("127.0.0.1"), "{yaml}");
    let table = broker.ctl(&["cluster", "list"]).ok().stdout;
    assert!(
        table.contains("east") && table.contains("joined"),
        "{table}"
    );

    // Removal reaches the importer (well within a second on loopback).
    let t = Instant::now();
    e.send(delta(1, 2, vec![], &[("shop", "cart")]))
        .await
        .unwrap();
    expect_ack(&mut e, 2).await;
    let u = next_imports(&mut w).await;
    assert_eq!(u.removals.len(), 1);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "removal took {:?}",
        t.elapsed()
    );

    // West goes away; east changes twice; west resumes with a delta.
    let resume_from = u.revision;
    drop(w);
    e.send(delta(2, 3, vec![svc("shop", "pay")], &[]))
        .await
        .unwrap();
    expect_ack(&mut e, 3).await;
    e.send(delta(3, 4, vec![svc("shop", "ship")], &[]))
        .await
        .unwrap();
    expect_ack(&mut e, 4).await;
    let mut w = open(
        &west,
        with_network(hello(resume_from, &epoch, "127.0.0.2:15443"), "net-west"),
    )
    .await;
    let u = next_imports(&mut w).await;
    assert!(!u.snapshot, "a known revision resumes with a delta");
    let names: Vec<_> = u.upserts.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["pay", "ship"]);
    assert!(u.revision > seen);
    drop(w);

    // A revision from another epoch (or none) gets a full resync.
    let mut w = open(
        &west,
        with_network(
            hello(resume_from, "not-this-broker", "127.0.0.2:15443"),
            "net-west",
        ),
    )
    .await;
    let u = next_imports(&mut w).await;
    assert!(u.snapshot);
    assert_eq!(u.upserts.len(), 2);

    // A delta on a base the broker does not hold asks for a snapshot.
    e.send(delta(99, 100, vec![svc("shop", "x")], &[]))
        .await
        .unwrap();
    match next(&mut e).await {
        Down::Resync(r) => assert_eq!(r.have_revision, 4),
        other => panic!("expected resync, got {other:?}"),
    }

    // The broker's welcome tells a reconnecting exporter where to resume.
    drop(e);
    let e2 = open(
        &east,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    assert_eq!(e2.broker_export_revision, 4);

    let metrics = common::http_get(&broker.metrics, "/metrics");
    assert!(metrics.contains("strait_broker_exports 2"), "{metrics}");
    assert!(
        metrics.contains("strait_broker_joins_total{result=\"ok\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_and_pinned() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let token = broker
        .ctl(&["cluster", "add", "east", "--network", "n1"])
        .ok()
        .stdout
        .trim()
        .to_string();
    client::join(&token, &s.path("east")).await.unwrap();
    // Reuse: refused, and nothing written.
    let err = client::join(&token, &s.path("east-again"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already been used"), "{err}");
    assert!(!s.path("east-again/cacerts/ca-key.pem").exists());
    // Duplicate name refused by the admin API.
    broker
        .ctl(&["cluster", "add", "east", "--network", "n1"])
        .fails_with(1, "already exists");
    // A token of another broker (another root) is refused by the pin before
    // anything is sent.
    let other = Broker::start(&s.path("other"), TD);
    let foreign = other
        .ctl(&["cluster", "add", "west", "--network", "n1"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let parsed = strait_broker_client::token::JoinToken::parse(&foreign).unwrap();
    let mut forged = parsed.clone();
    forged.addresses = vec![broker.addr.clone()];
    let err = client::join(&forged.encode(), &s.path("west"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no root with SHA-256"), "{err}");
    // Garbage tokens name the problem.
    let err = client::join("hello", &s.path("x")).await.unwrap_err();
    assert!(err.to_string().contains("sjt1."), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identities_and_non_admins_are_refused() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let east = join(&broker, &s, "east", "net-east").await;
    let _west = join(&broker, &s, "west", "net-west").await;

    // East's own CA mints "west"'s broker identity: the broker refuses it.
    let ca = strait_ca::layout::load_plugin_ca(&east.join("cacerts"), None).unwrap();
    let bundle = strait_ca::layout::load_bundle(&east.join("cacerts/root-cert.pem"), None).unwrap();
    let forged_dir = s.path("forged");
    client::issue_client_cert(
        &ca,
        &strait_ca::ClusterName::new("west").unwrap(),
        &bundle,
        &forged_dir,
    )
    .unwrap();
    let channel = client::channel(&broker.addr, &forged_dir).unwrap();
    let err = SyncSession::open(channel, hello(0, "", "127.0.0.9:15443"))
        .await
        .err()
        .expect("forged identity refused");
    assert!(
        err.to_string()
            .contains("must be issued by cluster west's own intermediate"),
        "{err}"
    );

    // A cluster's credentials are not admin credentials.
    broker
        .ctl_with(&east.join("broker-client"), &["cluster", "list"])
        .fails_with(1, "may not use the admin API");
    // Credentials of another mesh's broker do not even get through TLS.
    let other = Broker::start(&s.path("other"), TD);
    broker
        .ctl_with(&other.admin_creds(), &["cluster", "list"])
        .fails_with(1, "broker");
    // No credentials: a usage error that says where they are.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_straitctl"))
        .args(["--broker", &broker.addr, "cluster", "list"])
        .env_remove("STRAIT_CREDS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATA/admin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_withdraws_exports_and_locks_the_cluster_out() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let east = join(&broker, &s, "east", "net-east").await;
    let west = join(&broker, &s, "west", "net-west").await;
    let mut e = open(
        &east,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    let mut w = open(
        &west,
        with_network(hello(0, "", "127.0.0.2:15443"), "net-west"),
    )
    .await;
    next_imports(&mut e).await;
    next_imports(&mut w).await;
    e.send(snapshot(1, vec![svc("shop", "cart")]))
        .await
        .unwrap();
    expect_ack(&mut e, 1).await;
    assert_eq!(next_imports(&mut w).await.upserts.len(), 1);

    broker.ctl(&["cluster", "revoke", "east"]).ok();
    // West: the deny-list, then the removal.
    let mut saw_deny = false;
    let mut saw_removal = false;
    while !(saw_deny && saw_removal) {
        match tokio::time::timeout(WAIT, w.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Down::Trust(t) => saw_deny |= t.denied_intermediates.len() == 1,
            Down::Imports(u) => saw_removal |= u.removals.len() == 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // East's stream ends, and it cannot come back.
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match e.recv().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    assert!(end.is_err() || end.unwrap().is_none());
    // It is told why (not a dropped connection it would retry forever).
    let (channel, _) = client::cluster_channel(&east, 0).unwrap();
    match SyncSession::open(channel, hello(0, "", "127.0.0.1:15443")).await {
        Err(client::ClientError::Refused(why)) => {
            assert!(why.contains("this cluster is revoked"), "{why}");
            assert!(why.contains("CN=east"), "{why}");
        }
        Err(e) => panic!("refused without saying revoked: {e}"),
        Ok(_) => panic!("a revoked cluster opened a sync stream"),
    }
    let list = broker
        .ctl(&["cluster", "show", "east", "-o", "json"])
        .ok()
        .stdout;
    assert!(list.contains("\"revoked\""), "{list}");
    // An unknown cluster is a usage error (64, as in `strait lab`) naming
    // the known ones.
    broker
        .ctl(&["cluster", "show", "north"])
        .fails_with(64, "its clusters: east");
    broker
        .ctl(&["cluster", "revoke", "north"])
        .fails_with(64, "its clusters: east");
}

/// kill -9 during a burst of exports: every acknowledged export survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_exports_survive_kill_9() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    acknowledged_exports_survive_kill_9_of(&s, broker, &[]).await;
}

/// The same with the state in etcd (`--store etcd://...`): nothing of it
/// in the data directory, all of it back after the kill.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_exports_survive_kill_9_with_the_store_in_etcd() {
    let Some(etcd) = common::etcd::Etcd::start() else {
        return;
    };
    let s = Scratch::new();
    let store = format!("--store=etcd://{}", etcd.client);
    Broker::init_root(&s.path("root"), TD);
    let root = format!("--root={}", s.path("root").display());
    let addr = format!("127.0.0.1:{}", common::free_port());
    let broker = Broker::start_with(&s.path("broker"), TD, &addr, &[&store, &root]);
    acknowledged_exports_survive_kill_9_of(&s, broker, &[&store, &root]).await;
    assert!(
        !s.path("broker").join("broker.redb").exists(),
        "the state went to the redb file, not to etcd"
    );
}

/// Exports pipelined to `broker`, killed (SIGKILL) mid-burst, restarted
/// with `extra` arguments: every acknowledged export is there.
async fn acknowledged_exports_survive_kill_9_of(s: &Scratch, mut broker: Broker, extra: &[&str]) {
    let east = join(&broker, s, "east", "net-east").await;
    let mut e = open(
        &east,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    next_imports(&mut e).await;
    e.send(snapshot(1, vec![])).await.unwrap();
    expect_ack(&mut e, 1).await;

    // Pipeline 300 deltas without waiting; kill the broker while acks flow.
    let tx = e.sender();
    let burst = tokio::spawn(async move {
        for i in 0..300u64 {
            let up = delta(i + 1, i + 2, vec![svc("burst", &format!("svc-{i}"))], &[]);
            if tx.send(up).await.is_err() {
                break;
            }
        }
    });
    let mut acked = 0u64;
    loop {
        match tokio::time::timeout(WAIT, e.recv()).await {
            Ok(Ok(Some(Down::ExportsAck(a)))) => {
                acked = a.revision;
                if acked == 60 {
                    broker.kill9();
                }
            }
            Ok(Ok(Some(_))) => {}
            _ => break,
        }
    }
    burst.abort();
    eprintln!("broker killed after ack 60 of 301; last ack received: {acked}");
    assert!(acked >= 60, "the broker acknowledged only up to {acked}");
    assert!(
        acked < 301,
        "the kill came after the whole burst; it proves nothing"
    );
    // Restart on the same address and data; every acknowledged export is there.
    let addr = broker.addr.clone();
    drop(broker);
    let broker = Broker::start_with(&s.path("broker"), TD, &addr, extra);
    let list = broker
        .ctl(&["exports", "list", "--cluster", "east", "-o", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let have: std::collections::BTreeSet<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    // Revision r acknowledges svc-(r-2).
    for r in 2..=acked {
        let name = format!("svc-{}", r - 2);
        assert!(
            have.contains(&name),
            "{name} was acknowledged (revision {r}) but is lost"
        );
    }
    // The exporter resumes where the broker is.
    let e = open(
        &east,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    assert!(e.broker_export_revision >= acked);
}

/// Not a test: export→import propagation over 1000 changes on loopback.
/// `cargo test --test broker propagation -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; prints figures"]
async fn propagation_latency() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let east = join(&broker, &s, "east", "net-east").await;
    let west = join(&broker, &s, "west", "net-west").await;
    let mut e = open(
        &east,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await;
    let mut w = open(
        &west,
        with_network(hello(0, "", "127.0.0.2:15443"), "net-west"),
    )
    .await;
    next_imports(&mut e).await;
    next_imports(&mut w).await;
    e.send(snapshot(1, vec![])).await.unwrap();
    expect_ack(&mut e, 1).await;
    let mut samples = Vec::new();
    for i in 0..1000u64 {
        let t = Instant::now();
        let change = if i % 2 == 0 {
            delta(i + 1, i + 2, vec![svc("bench", "svc")], &[])
        } else {
            delta(i + 1, i + 2, vec![], &[("bench", "svc")])
        };
        e.send(change).await.unwrap();
        next_imports(&mut w).await;
        samples.push(t.elapsed());
        expect_ack(&mut e, i + 2).await;
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "export→import propagation over {} changes: p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        p(0.50),
        p(0.99),
        samples[samples.len() - 1]
    );
}

/// The whole flow from the command line: add, join, sync a static config,
/// and the Istio objects the other cluster imports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_join_sync_and_imports() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    for (name, net) in [("east", "net-east"), ("west", "net-west")] {
        let token = broker
            .ctl(&["cluster", "add", name, "--network", net])
            .ok()
            .stdout;
        s.write(&format!("{name}.token"), &token);
        s.strait(&[
            "cluster",
            "join",
            "--token",
            &format!("{name}.token"),
            "--dir",
            name,
        ])
        .ok();
    }
    s.write(
        "east.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\n  namespace: bookinfo\n  annotations:\n    strait.io/export: \"true\"\nspec:\n  selector: {app: reviews}\n  ports:\n  - {name: http, port: 9080}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: r1, namespace: bookinfo}\nspec: {address: 10.1.0.11, labels: {app: reviews}, serviceAccount: reviews}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: bookinfo\n  annotations:\n    strait.io/export: \"yes\"\nspec:\n  ports:\n  - {name: http, port: 80}\n",
    );
    // West runs reviews too (not exported): its imports get a
    // WorkloadEntry that its own Service selects.
    s.write(
        "west.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  selector: {app: reviews}\n  ports:\n  - {name: http, port: 9080}\n",
    );
    let r = s
        .strait(&[
            "cluster",
            "sync",
            "--dir",
            "east",
            "--config",
            "east.yaml",
            "--gateway",
            "127.0.0.1:15443",
            "--once",
        ])
        .ok();
    assert!(
        r.stderr.contains("Service bookinfo/broken") && r.stderr.contains("\"yes\""),
        "{}",
        r.stderr
    );
    let west_sync = [
        "cluster",
        "sync",
        "--dir",
        "west",
        "--config",
        "west.yaml",
        "--gateway",
        "127.0.0.2:15443",
        "--once",
        "--imports-out",
        "west-imports.yaml",
    ];
    s.strait(&west_sync).ok();
    let written = s.read("west-imports.yaml");
    let shown = broker.ctl(&["imports", "show", "west"]).ok().stdout;
    assert!(
        shown.contains("reviews.bookinfo.svc.clusterset.local"),
        "{shown}"
    );
    assert!(shown.contains("address: \"127.0.0.1\""), "{shown}");
    // The cluster writes what the broker shows, plus a WorkloadEntry for
    // the service it also runs (the broker does not know west's Services).
    let entries: Vec<&str> = written.split("\n---\n").collect();
    let (workload_entries, rest): (Vec<&str>, Vec<&str>) = entries
        .iter()
        .partition(|d| d.contains("kind: WorkloadEntry"));
    assert_eq!(rest.join("\n---\n").trim(), shown.trim(), "{written}");
    assert_eq!(workload_entries.len(), 1, "{written}");
    let we = workload_entries[0];
    assert!(we.contains("name: strait-reviews.east"), "{we}");
    assert!(we.contains("app: reviews"), "{we}");
    assert!(
        we.contains("address: 127.0.0.1") || we.contains("address: \"127.0.0.1\""),
        "{we}"
    );
    // A token that was already spent cannot join again.
    s.strait(&["cluster", "join", "--token", "east.token", "--dir", "east2"])
        .fails_with(1, "already been used");
    // Once revoked, `cluster sync` says so and stops, instead of retrying
    // until its timeout with a guess about reachability.
    broker.ctl(&["cluster", "revoke", "west"]).ok();
    let started = Instant::now();
    s.strait(&west_sync).fails_with(
        1,
        "the broker refuses this cluster: this cluster is revoked",
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn straitctl_reads_a_lab_directory() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    s.write(
        "lab/lab.json",
        &serde_json::json!({
            "broker": {"address": broker.addr, "admin_creds": broker.admin_creds()},
            "brokers": [
                {"mesh": "mesh-a", "address": "127.0.0.1:1", "admin_creds": "/nonexistent"},
                {"mesh": "mesh-b", "address": broker.addr, "admin_creds": broker.admin_creds()},
            ],
        })
        .to_string(),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_straitctl"))
        .args(["--lab", s.path("lab").to_str().unwrap(), "cluster", "list"])
        .env_remove("STRAIT_BROKER")
        .env_remove("STRAIT_CREDS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("NAME"));
    // --mesh picks a broker from `brokers`; an unknown mesh is named.
    let ctl = |mesh: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_straitctl"))
            .args([
                "--lab",
                s.path("lab").to_str().unwrap(),
                "--mesh",
                mesh,
                "cluster",
                "list",
            ])
            .env_remove("STRAIT_BROKER")
            .env_remove("STRAIT_CREDS")
            .output()
            .unwrap()
    };
    assert!(ctl("mesh-b").status.success());
    let out = ctl("mesh-a");
    assert_eq!(out.status.code(), Some(1), "mesh-a's broker does not exist");
    let out = ctl("mesh-c");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mesh-a, mesh-b"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_straitctl"))
        .args([
            "--lab",
            s.path("nolab").to_str().unwrap(),
            "cluster",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no lab.json"));
}

/// West's healthy endpoint count of `east`'s export of `ns/name` in an
/// imports update, if the update names it.
fn healthy_from(u: &pb::ImportsUpdate, cluster: &str, ns: &str, name: &str) -> Option<u32> {
    let s = u
        .upserts
        .iter()
        .find(|s| s.namespace == ns && s.name == name)?;
    let r = s.remotes.iter().find(|r| r.cluster == cluster)?;
    Some(
        r.service
            .as_ref()?
            .endpoints
            .iter()
            .map(|e| e.healthy)
            .sum(),
    )
}

/// The next imports update that names `cluster`'s export of `ns/name`,
/// within `within`; its healthy endpoint count.
async fn next_health(
    s: &mut SyncSession,
    cluster: &str,
    ns: &str,
    name: &str,
    within: Duration,
) -> u32 {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, s.recv())
            .await
            .unwrap_or_else(|_| panic!("no update of {cluster}'s {ns}/{name} within {within:?}"))
            .expect("stream healthy")
            .expect("stream open");
        if let Down::Imports(u) = m
            && let Some(h) = healthy_from(&u, cluster, ns, name)
        {
            return h;
        }
    }
}

/// A cluster whose sync stream ends and does not come back within the
/// grace is withdrawn from every importer (its endpoints published as
/// unhealthy, so importers drop them), and restored when it reconnects.
/// A broker restart gives every cluster the grace from its start: those
/// that reconnect are not withdrawn; one that does not is, a grace later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_a_stream_is_withdrawn_after_the_grace_and_restored() {
    const GRACE: Duration = Duration::from_secs(2);
    let s = Scratch::new();
    let addr = format!("127.0.0.1:{}", common::free_port());
    let args = ["--cluster-grace", "2s"];
    let mut broker = Broker::start_with(&s.path("broker"), TD, &addr, &args);
    let east = join(&broker, &s, "east", "net-east").await;
    let west = join(&broker, &s, "west", "net-west").await;
    let east_hello = || with_network(hello(0, "", "127.0.0.1:15443"), "net-east");
    let mut e = open(&east, east_hello()).await;
    let mut w = open(
        &west,
        with_network(hello(0, "", "127.0.0.2:15443"), "net-west"),
    )
    .await;
    next_imports(&mut e).await;
    next_imports(&mut w).await;
    w.send(snapshot(1, vec![svc("shop", "pay")])).await.unwrap();
    expect_ack(&mut w, 1).await;
    assert_eq!(next_health(&mut e, "west", "shop", "pay", WAIT).await, 2);
    e.send(snapshot(1, vec![svc("shop", "cart")]))
        .await
        .unwrap();
    expect_ack(&mut e, 1).await;
    assert_eq!(next_health(&mut w, "east", "shop", "cart", WAIT).await, 2);

    // East's stream ends (its control plane died).
    let gone = Instant::now();
    drop(e);
    let healthy = next_health(&mut w, "east", "shop", "cart", GRACE + WAIT).await;
    let withdrawn_after = gone.elapsed();
    assert_eq!(healthy, 0, "east's endpoints are withdrawn at west");
    assert!(
        withdrawn_after >= GRACE,
        "withdrawn after {withdrawn_after:?}, before the grace of {GRACE:?}"
    );
    eprintln!(
        "east withdrawn at west {withdrawn_after:?} after its stream ended (grace {GRACE:?})"
    );
    // What west's control plane would write: the ServiceEntry stays, with
    // no endpoint at east's gateway.
    let yaml = broker.ctl(&["imports", "show", "west"]).ok().stdout;
    assert!(yaml.contains("cart.shop.svc.clusterset.local"), "{yaml}");
    assert!(!yaml.contains("127.0.0.1"), "{yaml}");
    let list = broker.ctl(&["cluster", "list", "-o", "json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let status = |name: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(status("east")["withdrawn"], true, "{list}");
    assert_eq!(status("east")["connected"], false, "{list}");
    assert_eq!(status("west")["withdrawn"], false, "{list}");
    let table = broker.ctl(&["cluster", "list"]).ok().stdout;
    assert!(table.contains("no (withdrawn)"), "{table}");

    // East comes back: restored at once.
    let back = Instant::now();
    let e = open(&east, east_hello()).await;
    let healthy = next_health(&mut w, "east", "shop", "cart", WAIT).await;
    assert_eq!(healthy, 2, "east's endpoints are back at west");
    eprintln!(
        "east restored at west {:?} after it reconnected",
        back.elapsed()
    );

    // A broker restart: west reconnects at once and east never does.
    drop(e);
    broker.kill9();
    drop(broker);
    let restarted = Instant::now();
    let broker = Broker::start_with(&s.path("broker"), TD, &addr, &args);
    let mut w = open(
        &west,
        with_network(hello(0, "", "127.0.0.2:15443"), "net-west"),
    )
    .await;
    // West gets a snapshot in which east is still healthy (its stored
    // state), then, a grace after the restart, east withdrawn.
    let first = next_imports(&mut w).await;
    assert_eq!(
        healthy_from(&first, "east", "shop", "cart"),
        Some(2),
        "{first:?}"
    );
    let healthy = next_health(&mut w, "east", "shop", "cart", GRACE + WAIT).await;
    let after = restarted.elapsed();
    assert_eq!(healthy, 0);
    assert!(after >= GRACE, "withdrawn {after:?} after the restart");
    eprintln!("east withdrawn at west {after:?} after the broker restart began");
    // West itself, connected, stays available: east sees it when it returns.
    let mut e = open(&east, east_hello()).await;
    let u = next_imports(&mut e).await;
    assert_eq!(healthy_from(&u, "west", "shop", "pay"), Some(2), "{u:?}");
    assert_eq!(next_health(&mut w, "east", "shop", "cart", WAIT).await, 2);
    drop(broker);
}
