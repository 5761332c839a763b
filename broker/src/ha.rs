//! Broker replicas on one etcd (feature `etcd`, `--store etcd://...`).
//!
//! Every replica serves the cluster and admin APIs and streams imports;
//! their state stays one because every commit is conditional on the store
//! revision the replica holds and each follows the others' commits from
//! its watch (`state::follow`). What must happen once is done by one
//! leader, elected with an etcd lease:
//!
//! - each replica holds a lease of [`HaConfig::lease_ttl`] (kept alive
//!   every third of it) and under `<prefix>_replicas/<id>` says who it is
//!   and where it serves, bound to the lease, so that a dead replica's
//!   record goes with its lease;
//! - the leader is whoever created `<prefix>_leader` (a transaction that
//!   puts it, bound to the lease, only if it does not exist); the others
//!   watch it and campaign again when it is deleted (the leader's lease
//!   expired, or it resigned at shutdown). A new leader is elected at most
//!   one lease TTL after the old one died, at once after a clean stop;
//! - the leader withdraws clusters that have had no sync stream for the
//!   grace (`crate::liveness`), counting every replica's streams: each
//!   replica puts `<prefix>_streams/<cluster>/<id>` for each open stream,
//!   bound to its lease;
//! - a replica that cannot keep its lease alive (cut off from etcd, or etcd
//!   without quorum) is *detached*: it steps down, ends its sync streams
//!   and refuses new ones, so that clusters move to a replica that can
//!   write, and reports not ready; its writes fail with the store's error.
//!
//! Leaders are not fenced beyond that: a change is still a conditional
//! commit, so a deposed leader that has not noticed yet cannot overwrite
//! what the new one wrote, only repeat work that is idempotent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use strait_ca::ClusterName;
use tokio::sync::{mpsc, watch};

use crate::state::BrokerState;
use crate::store::etcd::{EtcdConfig, within};

/// The default lease: a leader that died is replaced within this.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);
/// How soon a detached replica tries etcd again.
const RETRY: Duration = Duration::from_secs(1);

/// How a replica takes part.
#[derive(Debug, Clone)]
pub struct HaConfig {
    pub etcd: EtcdConfig,
    /// This replica's name (`--replica`, default the host name).
    pub replica: String,
    /// Where clusters and admins reach this replica.
    pub address: String,
    pub lease_ttl: Duration,
}

/// What this replica is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Starting,
    Leader,
    Follower {
        leader: String,
    },
    /// Cut off from etcd: no lease, no writes, no streams.
    Detached(String),
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Leader => "leader",
            Role::Follower { .. } => "follower",
            Role::Detached(_) => "detached",
        }
    }
}

/// A replica as `<prefix>_replicas/<id>` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    pub address: String,
    pub since_unix: i64,
}

/// The replicas etcd knows (those whose lease is alive) and the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicas {
    pub replicas: Vec<ReplicaRecord>,
    pub leader: Option<String>,
}

/// A running replica's handle.
#[derive(Clone)]
pub struct Replication {
    config: Arc<HaConfig>,
    client: Client,
    role: watch::Receiver<Role>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("replica", &self.config.replica)
            .finish()
    }
}

fn key(config: &HaConfig, rest: &str) -> String {
    format!(
        "{}{}{rest}",
        config.etcd.prefix,
        crate::store::etcd::COORDINATION
    )
}

impl Replication {
    /// Connects and starts taking part (campaigning, keeping the lease,
    /// publishing this replica's streams) on a task of its own.
    pub async fn start(config: HaConfig, state: Arc<BrokerState>) -> Result<Self, String> {
        let client = crate::store::etcd::connect(&config.etcd).await?;
        let (role_tx, role) = watch::channel(Role::Starting);
        let (streams_tx, streams) = mpsc::unbounded_channel();
        state.set_stream_events(streams_tx);
        let config = Arc::new(config);
        tokio::spawn(run(
            config.clone(),
            client.clone(),
            state.clone(),
            role_tx,
            streams,
        ));
        Ok(Replication {
            config,
            client,
            role,
        })
    }

    pub fn id(&self) -> &str {
        &self.config.replica
    }

    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// The replicas alive now and which leads.
    pub async fn replicas(&self) -> Result<Replicas, String> {
        let mut client = self.client.clone();
        let prefix = key(&self.config, "replicas/");
        let resp = within(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
        let mut replicas = Vec::new();
        for kv in resp.kvs() {
            let r: ReplicaRecord = serde_json::from_slice(kv.value()).map_err(|e| {
                format!("replica record {}: {e}", String::from_utf8_lossy(kv.key()))
            })?;
            replicas.push(r);
        }
        let leader = within(client.get(key(&self.config, "leader"), None))
            .await?
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        Ok(Replicas { replicas, leader })
    }

    /// Gives up leadership and the lease at shutdown, so that another
    /// replica leads at once rather than after the TTL.
    pub async fn resign(&self) {
        let mut client = self.client.clone();
        let leader_key = key(&self.config, "leader");
        let me = self.config.replica.clone();
        let _ = within(
            client.txn(
                Txn::new()
                    .when([Compare::value(leader_key.clone(), CompareOp::Equal, me)])
                    .and_then([TxnOp::delete(leader_key, None)]),
            ),
        )
        .await;
    }
}

/// Takes part until the process ends: one [`session`] per lease; between
/// them the replica is detached.
async fn run(
    config: Arc<HaConfig>,
    client: Client,
    state: Arc<BrokerState>,
    role: watch::Sender<Role>,
    mut streams: mpsc::UnboundedReceiver<(ClusterName, bool)>,
) {
    let mut open: BTreeMap<ClusterName, usize> = BTreeMap::new();
    loop {
        let why = session(
            &config,
            client.clone(),
            &state,
            &role,
            &mut streams,
            &mut open,
        )
        .await;
        tracing::error!(replica = %config.replica, error = %why, "this broker replica lost etcd: stepping down, ending its sync streams");
        role.send_replace(Role::Detached(why.clone()));
        state.set_detached(Some(why));
        tokio::time::sleep(RETRY).await;
    }
}

/// What the leader counts of other replicas' streams.
#[derive(Default)]
struct RemoteStreams(BTreeSet<String>);

impl RemoteStreams {
    fn opened(&mut self, state: &BrokerState, key: &str, cluster: &str) {
        if let Ok(c) = ClusterName::new(cluster)
            && self.0.insert(key.to_string())
        {
            let _ = state.liveness().opened(&c);
        }
    }

    fn closed(&mut self, state: &BrokerState, key: &str, cluster: &str) {
        if let Ok(c) = ClusterName::new(cluster)
            && self.0.remove(key)
        {
            state
                .liveness()
                .closed(&c, tokio::time::Instant::now().into_std());
            state.liveness_changed.notify_one();
        }
    }

    /// Leadership lost: what the next leader counts is its own business.
    fn clear(&mut self, state: &BrokerState) {
        for k in std::mem::take(&mut self.0) {
            if let Some(cluster) = k.rsplit('/').nth(1)
                && let Ok(c) = ClusterName::new(cluster)
            {
                state
                    .liveness()
                    .closed(&c, tokio::time::Instant::now().into_std());
            }
        }
    }
}

/// `<prefix>_streams/<cluster>/<replica>` → (cluster, replica).
fn stream_key_parts<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    key.strip_prefix(prefix)?.split_once('/')
}

/// `f` up to three times, 200 ms apart: the client sends each try to the
/// next member, so one member down is not a reason to give up.
async fn retry<T, F, Fut>(mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A new lease of [`HaConfig::lease_ttl`] and its keep-alive stream.
async fn grant(
    config: &HaConfig,
    client: &Client,
) -> Result<
    (
        i64,
        etcd_client::LeaseKeeper,
        etcd_client::LeaseKeepAliveStream,
    ),
    String,
> {
    let ttl = config.lease_ttl.as_secs().max(1);
    let lease = retry(|| {
        let mut c = client.clone();
        async move { within(c.lease_grant(ttl as i64, None)).await }
    })
    .await
    .map_err(|e| format!("granting a lease: {e}"))?
    .id();
    let (keeper, acks) = retry(|| {
        let mut c = client.clone();
        async move { within(c.lease_keep_alive(lease)).await }
    })
    .await
    .map_err(|e| format!("keeping the lease alive: {e}"))?;
    Ok((lease, keeper, acks))
}

/// One lease: registers, campaigns, keeps the lease alive; returns why it
/// ended.
async fn session(
    config: &HaConfig,
    mut client: Client,
    state: &Arc<BrokerState>,
    role: &watch::Sender<Role>,
    streams: &mut mpsc::UnboundedReceiver<(ClusterName, bool)>,
    open: &mut BTreeMap<ClusterName, usize>,
) -> String {
    let (lease, mut keeper, mut acks) = match grant(config, &client).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let with_lease = || Some(PutOptions::new().with_lease(lease));
    let record = ReplicaRecord {
        id: config.replica.clone(),
        address: config.address.clone(),
        since_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let record = serde_json::to_vec(&record).unwrap_or_default();
    let replica_key = key(config, &format!("replicas/{}", config.replica));
    if let Err(e) = retry(|| {
        let mut c = client.clone();
        let (k, v) = (replica_key.clone(), record.clone());
        async move { within(c.put(k, v, Some(PutOptions::new().with_lease(lease)))).await }
    })
    .await
    {
        return format!("registering the replica: {e}");
    }
    let stream_key = |c: &ClusterName| key(config, &format!("streams/{c}/{}", config.replica));
    for c in open.keys() {
        if let Err(e) = within(client.put(stream_key(c), "", with_lease())).await {
            return format!("publishing a stream: {e}");
        }
    }
    state.set_detached(None);

    let leader_key = key(config, "leader");
    let streams_prefix = key(config, "streams/");
    let mut remote = RemoteStreams::default();
    let mut leader_watch: Option<etcd_client::WatchStream> = None;
    let mut streams_watch: Option<etcd_client::WatchStream> = None;
    let mut leading = false;
    let mut tick = tokio::time::interval(config.lease_ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alive_until = tokio::time::Instant::now() + config.lease_ttl;
    let why = loop {
        if !leading && leader_watch.is_none() {
            match campaign(&mut client, &leader_key, &config.replica, lease).await {
                Ok(Campaign::Won) => {
                    leading = true;
                    tracing::info!(replica = %config.replica, "this broker replica leads");
                    role.send_replace(Role::Leader);
                    match count_streams(
                        &mut client,
                        &streams_prefix,
                        &config.replica,
                        state,
                        &mut remote,
                    )
                    .await
                    {
                        Ok(w) => streams_watch = Some(w),
                        Err(e) => break format!("reading other replicas' streams: {e}"),
                    }
                }
                Ok(Campaign::Lost { leader, watch }) => {
                    tracing::info!(replica = %config.replica, %leader, "another broker replica leads");
                    role.send_replace(Role::Follower { leader });
                    leader_watch = Some(*watch);
                }
                Err(e) => break format!("campaigning: {e}"),
            }
        }
        tokio::select! {
            _ = tick.tick() => {
                if tokio::time::Instant::now() > alive_until {
                    break format!("the lease was not renewed within {:?}", config.lease_ttl);
                }
                // A renewal that fails (the member it went to is down) is
                // tried again on a new keep-alive stream, which the client
                // sends to another member; only the lease's deadline
                // detaches the replica.
                let renewed = match keeper.keep_alive().await {
                    Ok(()) => tokio::time::timeout(config.lease_ttl / 3, acks.message()).await,
                    Err(e) => Ok(Err(e)),
                };
                match renewed {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        alive_until = tokio::time::Instant::now() + Duration::from_secs(r.ttl() as u64);
                    }
                    Ok(Ok(Some(_))) => break "the lease expired".to_string(),
                    Ok(Ok(None) | Err(_)) => {
                        if let Ok((k, a)) = within(client.lease_keep_alive(lease)).await {
                            (keeper, acks) = (k, a);
                        }
                    }
                    // No answer this time: the deadline above decides.
                    Err(_) => {}
                }
            }
            m = next(&mut leader_watch) => match m {
                Ok(deleted) => if deleted {
                    leader_watch = None;
                },
                Err(e) => break format!("watching the leader: {e}"),
            },
            m = next_streams(&mut streams_watch, &streams_prefix, &config.replica, state, &mut remote) => {
                if let Err(e) = m {
                    break format!("watching other replicas' streams: {e}");
                }
            }
            s = streams.recv() => {
                let Some((cluster, up)) = s else { break "the broker stopped".into() };
                let n = open.entry(cluster.clone()).or_default();
                let r = if up {
                    *n += 1;
                    within(client.put(stream_key(&cluster), "", with_lease())).await.map(drop)
                } else {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        open.remove(&cluster);
                        within(client.delete(stream_key(&cluster), None)).await.map(drop)
                    } else {
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    break format!("publishing a stream: {e}");
                }
            }
        }
    };
    remote.clear(state);
    let _ = within(client.lease_revoke(lease)).await;
    why
}

enum Campaign {
    Won,
    Lost {
        leader: String,
        watch: Box<etcd_client::WatchStream>,
    },
}

/// Puts the leader key if nobody holds it; else watches it from now.
async fn campaign(
    client: &mut Client,
    leader_key: &str,
    me: &str,
    lease: i64,
) -> Result<Campaign, String> {
    let txn = Txn::new()
        .when([Compare::create_revision(leader_key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            leader_key,
            me,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(leader_key, None)]);
    let resp = within(client.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(Campaign::Won);
    }
    let revision = resp.header().map_or(0, |h| h.revision());
    let leader = resp
        .op_responses()
        .into_iter()
        .find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        })
        .unwrap_or_default();
    let options = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
    let watch = within(client.watch(leader_key, Some(options))).await?;
    Ok(Campaign::Lost {
        leader,
        watch: Box::new(watch),
    })
}

/// The next event of the leader watch: `true` when the key was deleted.
async fn next(w: &mut Option<etcd_client::WatchStream>) -> Result<bool, String> {
    let Some(w) = w else {
        return std::future::pending().await;
    };
    match w.message().await {
        Ok(Some(r)) => {
            if r.canceled() {
                return Err(format!("cancelled: {}", r.cancel_reason()));
            }
            Ok(r.events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete))
        }
        Ok(None) => Err("the watch ended".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// As leader: counts the streams other replicas hold now, and watches for
/// more.
async fn count_streams(
    client: &mut Client,
    prefix: &str,
    me: &str,
    state: &BrokerState,
    remote: &mut RemoteStreams,
) -> Result<etcd_client::WatchStream, String> {
    let resp = within(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    for kv in resp.kvs() {
        let k = String::from_utf8_lossy(kv.key()).into_owned();
        if let Some((cluster, replica)) = stream_key_parts(prefix, &k)
            && replica != me
        {
            remote.opened(state, &k, cluster);
        }
    }
    let revision = resp.header().map_or(0, |h| h.revision());
    let options = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    within(client.watch(prefix, Some(options))).await
}

async fn next_streams(
    w: &mut Option<etcd_client::WatchStream>,
    prefix: &str,
    me: &str,
    state: &BrokerState,
    remote: &mut RemoteStreams,
) -> Result<(), String> {
    let Some(w) = w else {
        return std::future::pending().await;
    };
    let r = match w.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return Err("the watch ended".into()),
        Err(e) => return Err(e.to_string()),
    };
    for ev in r.events() {
        let Some(kv) = ev.kv() else { continue };
        let k = String::from_utf8_lossy(kv.key()).into_owned();
        let Some((cluster, replica)) = stream_key_parts(prefix, &k) else {
            continue;
        };
        if replica == me {
            continue;
        }
        match ev.event_type() {
            EventType::Put => remote.opened(state, &k, cluster),
            EventType::Delete => remote.closed(state, &k, cluster),
        }
    }
    Ok(())
}

/// Runs the withdrawal of silent clusters while this replica leads.
pub async fn lead_liveness(state: Arc<BrokerState>, mut role: watch::Receiver<Role>) {
    loop {
        if role.wait_for(|r| *r == Role::Leader).await.is_err() {
            return;
        }
        tokio::select! {
            () = crate::state::watch_liveness(state.clone()) => {}
            r = role.wait_for(|r| *r != Role::Leader) => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_name_cluster_and_replica() {
        let p = "/strait/m/_streams/";
        assert_eq!(
            stream_key_parts(p, "/strait/m/_streams/east/broker-1"),
            Some(("east", "broker-1"))
        );
        assert_eq!(stream_key_parts(p, "/strait/m/_streams/east"), None);
        assert_eq!(stream_key_parts(p, "/other/_streams/east/b"), None);
    }
}
