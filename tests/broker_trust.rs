//! The broker's trust operations end to end: intermediate renewal over
//! Sync, staged root rotation while clusters sync, and peering between
//! meshes of different trust domains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::sync::*;
use common::{Broker, Scratch, all_clusters};
use strait_broker_client::client::{self, SyncSession};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediates_are_renewed_through_sync() {
    use strait_broker_client::agent::{Agent, AgentConfig};
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let east = join(&broker, &s, "east", "net-east").await;
    let before = s.read("east/cacerts/ca-cert.pem");
    let key_before = s.read("east/cacerts/ca-key.pem");
    let (_exports_tx, exports_rx) = tokio::sync::watch::channel(Default::default());
    let (agent, mut status) = Agent::new(
        AgentConfig {
            dir: east.clone(),
            gateways: vec!["127.0.0.1:15443".into()],
            leaf_ttl_max: None,
        },
        exports_rx,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(WAIT, status.wait_for(|s| s.connected && s.exports_acked))
        .await
        .unwrap()
        .unwrap();
    let r = broker.ctl(&["trust", "rotate-intermediate", "east"]).ok();
    assert!(r.stderr.contains("was asked"), "{}", r.stderr);
    // The agent swaps the plug-in CA files when the new chain arrives
    // (one file after the other: wait for the whole set to agree).
    let deadline = Instant::now() + WAIT;
    while s.read("east/cacerts/ca-cert.pem") == before
        || strait_ca::layout::load_plugin_ca(&east.join("cacerts"), None).is_err()
    {
        assert!(
            Instant::now() < deadline,
            "intermediate not renewed in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(
        s.read("east/cacerts/ca-key.pem"),
        key_before,
        "a new key, made in the cluster"
    );
    s.openssl(&[
        "verify",
        "-CAfile",
        "east/cacerts/root-cert.pem",
        "east/cacerts/ca-cert.pem",
    ])
    .ok();
    // The broker records the new intermediate; the cluster keeps syncing
    // with a client certificate issued under it.
    let ca = strait_ca::layout::load_plugin_ca(&east.join("cacerts"), None).unwrap();
    let fp = strait_ca::cert::fingerprint_sha256(ca.certificate_der());
    let show = broker
        .ctl(&["cluster", "show", "east", "-o", "json"])
        .ok()
        .stdout;
    assert!(show.contains(&fp), "{show}");
    let (channel, _) = client::cluster_channel(&east, 0).unwrap();
    SyncSession::open(
        channel,
        with_network(hello(0, "", "127.0.0.1:15443"), "net-east"),
    )
    .await
    .expect("the renewed identity is accepted");
    let _ = stop.send(());
    task.await.unwrap();
}

/// Rotation steps are quick here: agents acknowledge at once.
const ROTATION_STEP: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_in_stages_while_clusters_sync() {
    use strait_broker_client::agent::{Agent, AgentConfig};
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let mut stops = Vec::new();
    let mut statuses = Vec::new();
    let mut export_txs = Vec::new();
    for (name, net, gw) in [
        ("east", "net-east", "127.0.0.1:15443"),
        ("west", "net-west", "127.0.0.2:15443"),
    ] {
        let dir = join(&broker, &s, name, net).await;
        let (tx, rx) = tokio::sync::watch::channel(Default::default());
        let (agent, status) = Agent::new(
            AgentConfig {
                dir,
                gateways: vec![gw.into()],
                leaf_ttl_max: None,
            },
            rx,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(agent.run(async move {
            let _ = stopped.await;
        }));
        stops.push(stop);
        statuses.push(status);
        export_txs.push(tx);
    }
    let export = |name: &str| {
        let svc = strait_broker_client::wire::exported_service(&svc("shop", name)).unwrap();
        (svc.key.clone(), svc)
    };
    export_txs[0].send_replace([export("cart")].into());
    tokio::time::timeout(WAIT, statuses[1].wait_for(|s| s.services.len() == 1))
        .await
        .unwrap()
        .unwrap();

    // Out of order: refused with the next step named.
    broker
        .ctl(&["trust", "rotate-root", "advance"])
        .fails_with(1, "no root rotation is in progress");
    broker
        .ctl(&["trust", "rotate-root", "finish"])
        .fails_with(1, "no root rotation is in progress");

    let old_root = s.read("broker/root/root-cert.pem");
    broker.ctl(&["trust", "rotate-root", "begin"]).ok();
    broker
        .ctl(&["trust", "rotate-root", "begin"])
        .fails_with(1, "already in progress");
    broker
        .ctl(&["trust", "rotate-root", "finish"])
        .fails_with(1, "not possible in stage distributing");
    let v = broker
        .wait_rotation("bundle acknowledged", ROTATION_STEP, |v| {
            all_clusters(v, "bundle_acknowledged")
        })
        .await;
    assert_eq!(v["stage"], "distributing");
    assert_eq!(v["roots"].as_array().unwrap().len(), 2);
    let new_root = v["target_root"].as_str().unwrap().to_string();
    // Every cluster's CA now trusts both roots.
    for c in ["east", "west"] {
        let bundle =
            strait_ca::layout::load_bundle(&s.path(&format!("{c}/cacerts/root-cert.pem")), None)
                .unwrap();
        assert_eq!(bundle.roots().len(), 2, "{c}");
    }

    broker.ctl(&["trust", "rotate-root", "advance"]).ok();
    let v = broker
        .wait_rotation("intermediates re-issued", ROTATION_STEP, |v| {
            all_clusters(v, "on_target")
        })
        .await;
    assert_eq!(v["stage"], "reissuing");
    assert_eq!(v["signing_root"], new_root);
    // The re-issued intermediate verifies under the new root alone.
    let new_root_pem = broker.rotation_root();
    s.openssl(&[
        "verify",
        "-CAfile",
        new_root_pem.to_str().unwrap(),
        "east/cacerts/ca-cert.pem",
    ])
    .ok();
    // The broker's own admin credentials move to the new root now, while
    // both roots are trusted: moved only at `finish`, straitctl's first
    // call after it would present a certificate the broker no longer
    // trusts.
    let deadline = Instant::now() + WAIT;
    while s
        .openssl(&[
            "verify",
            "-CAfile",
            new_root_pem.to_str().unwrap(),
            "broker/admin/cert-chain.pem",
        ])
        .code
        != 0
    {
        assert!(
            Instant::now() < deadline,
            "the admin certificate stayed on the old root after advance"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Old leaves may still live: finish waits unless forced.
    broker
        .ctl(&["trust", "rotate-root", "finish"])
        .fails_with(1, "wait, or finish with --force");

    broker
        .ctl(&["trust", "rotate-root", "finish", "--force"])
        .ok();
    let v = broker
        .wait_rotation("idle on the new root", ROTATION_STEP, |v| {
            v["stage"] == "idle"
        })
        .await;
    assert_eq!(v["roots"].as_array().unwrap().len(), 1);
    assert_eq!(v["roots"][0]["sha256"], new_root);
    // Clusters drop the old root.
    let deadline = Instant::now() + WAIT;
    loop {
        let bundle =
            strait_ca::layout::load_bundle(&s.path("west/cacerts/root-cert.pem"), None).unwrap();
        if bundle.roots().len() == 1 {
            assert!(!bundle.to_pem().contains(old_root.trim()));
            break;
        }
        assert!(Instant::now() < deadline, "west kept the old root");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The admin credentials moved to the new root and still work.
    broker.ctl(&["cluster", "list"]).ok();
    // Services keep flowing after the rotation.
    export_txs[0].send_replace([export("cart"), export("pay")].into());
    tokio::time::timeout(WAIT, statuses[1].wait_for(|s| s.services.len() == 2))
        .await
        .unwrap()
        .unwrap();
    // A cluster that joins now pins the new root.
    join(&broker, &s, "north", "net-north").await;
    for stop in stops {
        let _ = stop.send(());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_abort_returns_to_the_old_root() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let before = broker
        .ctl(&["trust", "rotate-root", "status", "-o", "json"])
        .ok()
        .stdout;
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    broker.ctl(&["trust", "rotate-root", "begin"]).ok();
    broker.ctl(&["trust", "rotate-root", "abort"]).ok();
    let after = broker
        .ctl(&["trust", "rotate-root", "status", "-o", "json"])
        .ok()
        .stdout;
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(after["stage"], "idle");
    assert_eq!(after["signing_root"], before["signing_root"]);
    assert_eq!(after["roots"].as_array().unwrap().len(), 1);
    broker
        .ctl(&["trust", "rotate-root", "abort"])
        .fails_with(1, "no root rotation is in progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshes_peer_and_exchange_services_with_separate_bundles() {
    use strait_broker_client::agent::{Agent, AgentConfig};
    let s = Scratch::new();
    let peer_a = format!("127.0.0.1:{}", common::free_port());
    let peer_b = format!("127.0.0.1:{}", common::free_port());
    let a = Broker::start_with(
        &s.path("a"),
        "a.example",
        &format!("127.0.0.1:{}", common::free_port()),
        &["--peer-listen", &peer_a],
    );
    let b = Broker::start_with(
        &s.path("b"),
        "b.example",
        &format!("127.0.0.1:{}", common::free_port()),
        &["--peer-listen", &peer_b, "--mesh-name", "bee"],
    );
    let east = join(&a, &s, "east", "net-east").await;
    let west = join(&b, &s, "west", "net-west").await;

    let mut agents = Vec::new();
    let mut statuses = Vec::new();
    let mut txs = Vec::new();
    for (dir, gw) in [
        (east.clone(), "127.0.0.1:15443"),
        (west.clone(), "127.0.0.2:15443"),
    ] {
        let (tx, rx) = tokio::sync::watch::channel(Default::default());
        let (agent, status) = Agent::new(
            AgentConfig {
                dir,
                gateways: vec![gw.into()],
                leaf_ttl_max: None,
            },
            rx,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(agent.run(async move {
            let _ = stopped.await;
        }));
        agents.push(stop);
        statuses.push(status);
        txs.push(tx);
    }
    let mut ledger = svc("bank", "ledger");
    ledger.export_to = vec!["mesh:bee".into()];
    let private = svc("bank", "private");
    let exports: strait_broker_client::agent::Exports = [ledger, private]
        .iter()
        .map(|p| {
            let s = strait_broker_client::wire::exported_service(p).unwrap();
            (s.key.clone(), s)
        })
        .collect();
    txs[0].send_replace(exports.clone());
    tokio::time::timeout(WAIT, statuses[0].wait_for(|s| s.exports_acked))
        .await
        .unwrap()
        .unwrap();

    let token = a.ctl(&["peer", "token"]).ok().stdout.trim().to_string();
    assert!(token.starts_with("spt1."), "{token}");
    b.ctl(&["peer", "establish", &token]).ok();
    b.ctl(&["peer", "establish", &token])
        .fails_with(1, "already been used");

    // West (mesh b) imports exactly what east exported to mesh:bee, as a
    // service of trust domain a.example.
    let st = tokio::time::timeout(WAIT, statuses[1].wait_for(|s| !s.services.is_empty()))
        .await
        .expect("peered import in time")
        .unwrap()
        .clone();
    let keys: Vec<String> = st.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["bank/ledger"]);
    let remote = &st.services.values().next().unwrap()[0];
    assert_eq!(remote.from.trust_domain.as_str(), "a.example");
    assert_eq!(remote.from.name.as_str(), "east");
    // West trusts a.example's root for a.example only; its own bundle is untouched.
    let deadline = Instant::now() + WAIT;
    while !s.path("west/federated/a.example.pem").exists() {
        assert!(
            Instant::now() < deadline,
            "no federated bundle for a.example"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.read("west/federated/a.example.pem"),
        s.read("a/root/root-cert.pem")
    );
    assert_eq!(
        s.read("west/cacerts/root-cert.pem"),
        s.read("b/root/root-cert.pem")
    );
    // Mesh a does not import its own service back, and b exported nothing.
    assert!(statuses[0].borrow().services.is_empty());
    let peers = b.ctl(&["peer", "list", "-o", "json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&peers).unwrap();
    assert_eq!(v[0]["mesh"], "a.example");
    assert_eq!(v[0]["services_imported"], 1);
    let peers = a.ctl(&["peer", "list", "-o", "json"]).ok().stdout;
    assert!(peers.contains("\"bee\""), "{peers}");
    // The istio objects of west name a.example's identity.
    let yaml = b.ctl(&["imports", "show", "west"]).ok().stdout;
    assert!(
        yaml.contains("spiffe://a.example/ns/bank/sa/ledger"),
        "{yaml}"
    );

    // Withdrawing the export reaches the other mesh.
    let mut fewer = exports.clone();
    fewer.retain(|k, _| k.name() != "ledger");
    txs[0].send_replace(fewer);
    tokio::time::timeout(WAIT, statuses[1].wait_for(|s| s.services.is_empty()))
        .await
        .expect("peered removal in time")
        .unwrap();

    // Mesh a rotates its root to the end. The peer follows: west ends up
    // trusting a.example's new root alone, and the peering (now between
    // a broker on the new root and one on the old) still carries exports.
    a.ctl(&["trust", "rotate-root", "begin"]).ok();
    a.wait_rotation("a: bundle acknowledged", ROTATION_STEP, |v| {
        all_clusters(v, "bundle_acknowledged")
    })
    .await;
    a.ctl(&["trust", "rotate-root", "advance"]).ok();
    a.wait_rotation("a: intermediates re-issued", ROTATION_STEP, |v| {
        all_clusters(v, "on_target")
    })
    .await;
    a.ctl(&["trust", "rotate-root", "finish", "--force"]).ok();
    let a_new_root = std::fs::read_to_string(a.rotation_root()).unwrap();
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(s.path("west/federated/a.example.pem")).ok()
        != Some(a_new_root.clone())
    {
        assert!(
            Instant::now() < deadline,
            "west never trusted a.example's new root alone:\n{}",
            s.read("west/federated/a.example.pem")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    txs[0].send_replace(exports);
    let st = tokio::time::timeout(WAIT, statuses[1].wait_for(|s| !s.services.is_empty()))
        .await
        .expect("peered import after the rotation in time")
        .unwrap()
        .clone();
    assert_eq!(
        st.services.keys().next().unwrap().to_string(),
        "bank/ledger"
    );
    for stop in agents {
        let _ = stop.send(());
    }
}

/// A sync agent for the joined directory `dir`: what stops it, and its
/// status.
fn agent(
    dir: std::path::PathBuf,
    gateway: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::watch::Receiver<strait_broker_client::agent::Imports>,
) {
    use strait_broker_client::agent::{Agent, AgentConfig};
    let (exports, rx) = tokio::sync::watch::channel(Default::default());
    let (agent, status) = Agent::new(
        AgentConfig {
            dir,
            gateways: vec![gateway.into()],
            leaf_ttl_max: None,
        },
        rx,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(agent.run(async move {
        // The exports' sender lives as long as the agent.
        let _exports = exports;
        let _ = stopped.await;
    }));
    (stop, status)
}

/// `straitctl ARGS` against `broker`, awaited (it may wait on agents this
/// test's runtime drives).
async fn ctl_async(broker: &Broker, args: &[&str]) -> common::Run {
    let out = ctl_command(broker, args).output().await.unwrap();
    common::Run::from(format!("straitctl {}", args.join(" ")), out)
}

fn ctl_command(broker: &Broker, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_straitctl"));
    cmd.args(args)
        .env("STRAIT_BROKER", &broker.addr)
        .env("STRAIT_CREDS", broker.admin_creds())
        .env_remove("STRAIT_LAB");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_root_wait_returns_once_every_cluster_did_its_part() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let mut agents = Vec::new();
    for (name, net, gw) in [
        ("east", "net-east", "127.0.0.1:15443"),
        ("west", "net-west", "127.0.0.2:15443"),
    ] {
        let dir = join(&broker, &s, name, net).await;
        let (stop, mut status) = agent(dir, gw);
        tokio::time::timeout(WAIT, status.wait_for(|s| s.connected && s.exports_acked))
            .await
            .unwrap()
            .unwrap();
        agents.push(stop);
    }
    let wait = ["--wait", "--timeout", "60s", "-o", "json"];
    let step = |step: &'static str| {
        let mut args = vec!["trust", "rotate-root", step];
        args.extend(wait);
        args
    };

    let r = ctl_async(&broker, &step("begin")).await.ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["stage"], "distributing");
    assert!(all_clusters(&v, "bundle_acknowledged"), "{v}");
    assert!(
        r.stderr.contains(
            "stage distributing done: bundle acknowledged by 2/2 clusters: east, west; next: advance"
        ),
        "{}",
        r.stderr
    );

    let r = ctl_async(&broker, &step("advance")).await.ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["stage"], "reissuing");
    assert!(all_clusters(&v, "on_target"), "{v}");
    assert!(
        r.stderr
            .contains("intermediate on the new root in 2/2 clusters"),
        "{}",
        r.stderr
    );

    let mut args = step("finish");
    args.push("--force");
    let r = ctl_async(&broker, &args).await.ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["stage"], "idle");
    assert_eq!(v["roots"].as_array().unwrap().len(), 1);
    assert!(all_clusters(&v, "bundle_acknowledged"), "{v}");
    for stop in agents {
        let _ = stop.send(());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_root_wait_gives_up_naming_the_clusters_behind() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    // Joined, but nothing syncs for it.
    join(&broker, &s, "east", "net-east").await;
    let t = Instant::now();
    let r = ctl_async(
        &broker,
        &["trust", "rotate-root", "begin", "--wait", "--timeout", "2s"],
    )
    .await
    .fails_with(
        1,
        "stage distributing not done within 2s: bundle acknowledged by 0/1 clusters; waiting for east",
    );
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    // The last report still goes to stdout; not a terminal: plain lines.
    assert!(r.stdout.contains("east     no"), "{}", r.stdout);
    let progress = r
        .stderr
        .lines()
        .filter(|l| *l == "bundle acknowledged by 0/1 clusters; waiting for east")
        .count();
    assert_eq!(progress, 1, "one line per change:\n{}", r.stderr);
    // --timeout belongs to --wait.
    ctl_async(
        &broker,
        &["trust", "rotate-root", "status", "--timeout", "1s"],
    )
    .await
    .fails_with(64, "--wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_root_wait_rides_out_a_broker_restart() {
    use tokio::io::AsyncBufReadExt;
    let s = Scratch::new();
    let mut broker = Broker::start(&s.path("broker"), TD);
    let east = join(&broker, &s, "east", "net-east").await;
    broker.ctl(&["trust", "rotate-root", "begin"]).ok();
    let mut child = ctl_command(
        &broker,
        &[
            "trust",
            "rotate-root",
            "status",
            "--wait",
            "--timeout",
            "60s",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut said = String::new();
    // Reads stderr up to a line containing `needle`.
    let mut until = async |needle: &str| {
        while !said.contains(needle) {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} in time; so far:\n{said}"))
                .unwrap()
                .unwrap_or_else(|| panic!("straitctl ended before {needle:?}:\n{said}"));
            said.push_str(&line);
            said.push('\n');
        }
        said.clone()
    };
    until("waiting for east").await;
    let (data, addr) = (broker.data.clone(), broker.addr.clone());
    broker.kill9();
    until("connecting again").await;
    let broker = Broker::start_at(&data, TD, &addr);
    let (stop, _status) = agent(east, "127.0.0.1:15443");
    let said = until("stage distributing done").await;
    let code = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("straitctl exits once done")
        .unwrap();
    assert!(code.success(), "{code}:\n{said}");
    assert!(said.contains(&format!("broker {addr} answers")), "{said}");
    let _ = stop.send(());
    drop(broker);
}
