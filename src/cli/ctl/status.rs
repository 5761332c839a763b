//! `straitctl status`: the broker replica that answered, its store, and
//! every replica of the mesh (those with a live lease in etcd) with the
//! leader, each asked in turn for its own role and store revision.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use strait_broker_client::client;
use strait_proto::strait::broker::v1 as pb;

use super::conn::Conn;
use super::{Output, print, time_str};

/// How long one replica may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// What one replica says of itself, or why it did not.
async fn ask(address: &str, creds: &std::path::Path) -> Result<pb::BrokerStatusResponse, String> {
    let channel = client::channel(address, creds).map_err(|e| e.to_string())?;
    let mut admin = pb::admin_client::AdminClient::new(channel);
    match tokio::time::timeout(ASK_TIMEOUT, admin.broker_status(pb::BrokerStatusRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
    }
}

pub(super) async fn status_cmd(conn: &mut Conn, out: Output) -> Result<()> {
    let r = conn
        .admin
        .broker_status(pb::BrokerStatusRequest {})
        .await
        .map_err(|s| conn.fail(s))?
        .into_inner();
    let mut rows = Vec::new();
    let mut replicas = Vec::new();
    for x in &r.replicas {
        let own = if x.id == r.replica {
            Ok(r.clone())
        } else {
            ask(&x.address, conn.creds()).await
        };
        let (role, revision, health) = match &own {
            Ok(s) if s.detached.is_empty() => (
                s.role.clone(),
                s.store_revision.to_string(),
                "ok".to_string(),
            ),
            Ok(s) => (
                s.role.clone(),
                s.store_revision.to_string(),
                s.detached.clone(),
            ),
            Err(e) => ("?".into(), "-".into(), e.clone()),
        };
        rows.push(vec![
            x.id.clone(),
            x.address.clone(),
            if x.leader { "yes".into() } else { "no".into() },
            role.clone(),
            revision.clone(),
            time_str(u64::try_from(x.since_unix).unwrap_or(0)),
            health.clone(),
        ]);
        replicas.push(json!({
            "id": x.id,
            "address": x.address,
            "leader": x.leader,
            "role": role,
            "store_revision": own.as_ref().map(|s| s.store_revision).ok(),
            "since": time_str(u64::try_from(x.since_unix).unwrap_or(0)),
            "health": health,
        }));
    }
    let value = json!({
        "store": r.store,
        "replica": r.replica,
        "role": r.role,
        "detached": r.detached,
        "store_revision": r.store_revision,
        "mesh_revision": r.mesh_revision,
        "replicas": replicas,
    });
    if out == Output::Table {
        println!(
            "store {}  answered by {} ({}{})  store revision {}  mesh revision {}",
            r.store,
            if r.replica.is_empty() {
                conn.broker.as_str()
            } else {
                r.replica.as_str()
            },
            r.role,
            if r.detached.is_empty() {
                String::new()
            } else {
                format!(": {}", r.detached)
            },
            r.store_revision,
            r.mesh_revision
        );
        if r.replicas.is_empty() {
            return Ok(());
        }
        println!();
    }
    print(
        out,
        &value,
        &[
            "REPLICA", "ADDRESS", "LEADER", "ROLE", "REVISION", "SINCE", "HEALTH",
        ],
        rows,
    )
}
