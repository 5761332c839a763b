//! Helpers for the broker tests: exports, Hello messages, sync sessions.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

pub use pb::sync_request::Msg as Up;
pub use pb::sync_response::Msg as Down;
use strait_broker_client::client::{self, SyncSession};
use strait_proto::strait::broker::v1 as pb;

use super::{Broker, Scratch};

pub const TD: &str = "example.org";
pub const WAIT: Duration = Duration::from_secs(5);

pub fn svc(ns: &str, name: &str) -> pb::ExportedService {
    pb::ExportedService {
        namespace: ns.into(),
        name: name.into(),
        ports: vec![pb::ServicePort {
            name: "http".into(),
            number: 8080,
            protocol: "HTTP".into(),
            target_port: 0,
        }],
        service_accounts: vec![name.into()],
        endpoints: vec![pb::LocalityEndpoints {
            locality: "us-east/a".into(),
            healthy: 2,
            total: 2,
        }],
        ..Default::default()
    }
}

pub fn snapshot(revision: u64, services: Vec<pb::ExportedService>) -> Up {
    Up::Exports(pb::ExportsUpdate {
        revision,
        snapshot: true,
        upserts: services,
        ..Default::default()
    })
}

pub fn delta(base: u64, revision: u64, up: Vec<pb::ExportedService>, rm: &[(&str, &str)]) -> Up {
    Up::Exports(pb::ExportsUpdate {
        revision,
        base_revision: base,
        snapshot: false,
        upserts: up,
        removals: rm
            .iter()
            .map(|(ns, n)| pb::ServiceRef {
                namespace: (*ns).into(),
                name: (*n).into(),
            })
            .collect(),
    })
}

/// Adds a cluster with straitctl and joins it with the client library.
pub async fn join(
    broker: &Broker,
    scratch: &Scratch,
    name: &str,
    network: &str,
) -> std::path::PathBuf {
    let r = broker
        .ctl(&[
            "cluster",
            "add",
            name,
            "--network",
            network,
            "--locality",
            "us-east/a",
        ])
        .ok();
    let token = r.stdout.trim().to_string();
    assert!(
        token.starts_with("sjt1."),
        "stdout must be only the token: {:?}",
        r.stdout
    );
    let dir = scratch.path(name);
    client::join(&token, &dir).await.expect("join");
    dir
}

pub fn hello(import_revision: u64, epoch: &str, gateway: &str) -> pb::Hello {
    pb::Hello {
        export_revision: 0,
        import_revision,
        import_epoch: epoch.into(),
        bundle_version: 0,
        info: Some(pb::ClusterInfo {
            network: String::new(),
            locality: "us-east/a".into(),
            gateways: vec![gateway.into()],
            leaf_ttl_max_seconds: 0,
            service_accounts: vec![],
        }),
    }
}

pub async fn open(dir: &Path, hello: pb::Hello) -> SyncSession {
    open_at(dir, 0, hello).await
}

/// A sync stream to the broker address number `which` of `broker.json`
/// (one replica of several).
pub async fn open_at(dir: &Path, which: usize, hello: pb::Hello) -> SyncSession {
    let (channel, _) = client::cluster_channel(dir, which).unwrap();
    SyncSession::open(channel, hello).await.expect("open sync")
}

/// Reads from `s` (imports may come first) until the ack of `revision`.
pub async fn until_ack(s: &mut SyncSession, revision: u64) {
    loop {
        match next(s).await {
            Down::ExportsAck(a) => {
                assert_eq!(a.revision, revision);
                return;
            }
            Down::Imports(_) => {}
            other => panic!("expected the ack of {revision}, got {other:?}"),
        }
    }
}

/// The next message that is not a trust update, within `WAIT`.
pub async fn next(s: &mut SyncSession) -> Down {
    loop {
        let m = tokio::time::timeout(WAIT, s.recv())
            .await
            .expect("a message from the broker in time")
            .expect("stream healthy")
            .expect("stream open");
        if !matches!(m, Down::Trust(_)) {
            return m;
        }
    }
}

pub async fn next_imports(s: &mut SyncSession) -> pb::ImportsUpdate {
    match next(s).await {
        Down::Imports(u) => u,
        other => panic!("expected imports, got {other:?}"),
    }
}

pub async fn expect_ack(s: &mut SyncSession, revision: u64) {
    match next(s).await {
        Down::ExportsAck(a) => assert_eq!(a.revision, revision),
        other => panic!("expected ack {revision}, got {other:?}"),
    }
}

/// Network names in Hello info must be valid; clusters send their own.
pub fn with_network(mut h: pb::Hello, net: &str) -> pb::Hello {
    if let Some(i) = h.info.as_mut() {
        i.network = net.into();
    }
    h
}
