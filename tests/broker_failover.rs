//! Clients of a broker with several addresses (its replicas) end to end:
//! `straitctl --broker A,B,...` and the sync agent use the first address
//! that answers, past one that is down (connection refused) and one that
//! accepts connections and never answers (a connect timeout).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::sync::*;
use common::{Broker, Run, Scratch};
use strait_broker_client::agent::{Agent, AgentConfig};
use strait_broker_client::client;

/// An address nothing listens on.
fn closed() -> String {
    format!("127.0.0.1:{}", common::free_port())
}

/// A listener that accepts connections (the kernel's backlog) and never
/// answers; its address.
fn silent() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

/// `straitctl ARGS` with `STRAIT_BROKER=brokers` and the broker's admin
/// credentials.
fn ctl(broker: &Broker, brokers: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_straitctl"))
        .args(args)
        .env("STRAIT_BROKER", brokers)
        .env("STRAIT_CREDS", broker.admin_creds())
        .env_remove("STRAIT_LAB")
        .output()
        .unwrap();
    Run::from(format!("straitctl {} ({brokers})", args.join(" ")), out)
}

#[test]
fn straitctl_uses_the_first_broker_address_that_answers() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let down = closed();
    let (_listener, hung) = silent();

    let list = ctl(
        &broker,
        &format!("{down},{}", broker.addr),
        &["cluster", "list"],
    )
    .ok();
    assert!(list.stdout.contains("NAME"), "{}", list.stdout);

    // A replica that does not answer costs one connect timeout (3 s), once.
    let t = Instant::now();
    ctl(
        &broker,
        &format!("{hung}, {down}, {}", broker.addr),
        &["cluster", "list"],
    )
    .ok();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );

    // None answers: every address is named, with why.
    let r = ctl(&broker, &format!("{down},{hung}"), &["cluster", "list"])
        .fails_with(1, "no broker address answered");
    assert!(
        r.stderr.contains(&format!("{down}: transport error"))
            && r.stderr.contains(&format!("{hung}: no answer within 3s")),
        "{}",
        r.stderr
    );
    // A list with a bad address is a usage error naming it.
    ctl(
        &broker,
        &format!("{},nowhere", broker.addr),
        &["cluster", "list"],
    )
    .fails_with(64, "address 2 \"nowhere\" is not HOST:PORT");

    // lab.json may list the addresses too.
    s.write(
        "lab/lab.json",
        &serde_json::json!({
            "broker": {"addresses": [down, broker.addr], "admin_creds": broker.admin_creds()},
        })
        .to_string(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_straitctl"))
        .args(["--lab", s.path("lab").to_str().unwrap(), "cluster", "list"])
        .env_remove("STRAIT_BROKER")
        .env_remove("STRAIT_CREDS")
        .output()
        .unwrap();
    Run::from("straitctl --lab (addresses)".into(), out).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_agent_moves_on_to_the_broker_address_that_answers() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let east = join(&broker, &s, "east", "net-east").await;
    let (_listener, hung) = silent();
    let mut info = client::read_broker_info(&east).unwrap();
    info.addresses = vec![hung, closed(), broker.addr.clone()];
    std::fs::write(
        east.join(client::BROKER_FILE),
        serde_json::to_string(&info).unwrap(),
    )
    .unwrap();

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
    // The hung address costs one connect timeout, the closed one nothing.
    tokio::time::timeout(
        strait_runtime::transport::CONNECT_TIMEOUT + WAIT,
        status.wait_for(|s| s.connected && s.exports_acked),
    )
    .await
    .expect("synced through the third address in time")
    .unwrap();
    let show = broker
        .ctl(&["cluster", "show", "east", "-o", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["connected"], true, "{v}");
    let _ = stop.send(());
    task.await.unwrap();
}
