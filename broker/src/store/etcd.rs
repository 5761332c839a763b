//! The etcd store (`--store etcd://HOST:PORT[,HOST:PORT...]`, feature
//! `etcd`): the same tables and values as redb's, as keys
//! `<prefix><table>/<key>` (prefix `/strait/<mesh>/` by default), the
//! schema version at `<prefix>meta/schema_version`, and each [`Batch`] one
//! etcd transaction, so a batch is all there or not at all.
//!
//! Keys under `<prefix>_` are not tables: `<prefix>_revision` is written
//! by every commit, and its mod revision is the store's revision (a
//! conditional commit compares it), and [`crate::ha`] keeps its leader and
//! replica keys there. A store revision is an etcd revision, so a watch
//! resumes from it exactly.
//!
//! [`Store`] is synchronous (the broker writes through it before it
//! acknowledges a change, as with redb's fsync); the client runs on a
//! runtime of its own, on its own thread, and each call waits for its
//! answer. Every request has a deadline: an etcd that does not answer
//! (no quorum, partitioned) fails the write with an error saying so,
//! never hangs the broker.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;

use super::{
    Batch, Change, Contents, Op, SCHEMA_KEY, SCHEMA_VERSION, Snapshot, Store, StoreError, Table,
    Watch,
};

/// Under the prefix, the keys that are not tables start with this.
pub const COORDINATION: &str = "_";
/// `<prefix>_revision`: written by every commit.
const GUARD: &str = "_revision";

/// How long one request may take before the store reports etcd as
/// unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the etcd store is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// The prefix of every key (ends with `/`).
    pub prefix: String,
    /// TLS: the CA of the members' certificates (PEM).
    pub ca: Option<Vec<u8>>,
    /// TLS client certificate and key (PEM), when the members ask for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdConfig {
    /// The members of `url`, `etcd://HOST:PORT[,HOST:PORT...]`, with the
    /// default prefix for `mesh`.
    pub fn parse(url: &str, mesh: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("expected etcd://HOST:PORT[,HOST:PORT...]"))?;
        let endpoints: Vec<String> = rest.split(',').map(str::to_string).collect();
        for e in &endpoints {
            let (host, port) = e
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("member {e:?} has no :PORT")))?;
            if host.is_empty() || host.contains('/') {
                return Err(bad(&format!("member {e:?} has no host")));
            }
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&format!("member {e:?}: port {port:?} is not 1-65535")))?;
        }
        Ok(EtcdConfig {
            endpoints,
            prefix: format!("/strait/{mesh}/"),
            ca: None,
            identity: None,
        })
    }

    /// `http://` or `https://` member URLs for the client.
    fn urls(&self) -> Vec<String> {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }

    /// How the store names itself in errors.
    pub fn name(&self) -> String {
        format!("etcd://{} {}", self.endpoints.join(","), self.prefix)
    }
}

/// A request to the client thread, with where its answer goes (a std
/// channel: the caller may be a task of the broker's runtime, where
/// tokio's blocking receives panic).
enum Request {
    Load(std_mpsc::Sender<Result<Snapshot, String>>),
    Get(String, std_mpsc::Sender<Result<Option<Vec<u8>>, String>>),
    Commit(
        Vec<TxnOp>,
        Option<u64>,
        std_mpsc::Sender<Result<Committed, String>>,
    ),
    Watch(
        u64,
        tokio::sync::mpsc::UnboundedSender<Result<Change, StoreError>>,
    ),
}

/// What a conditional commit found.
enum Committed {
    At(u64),
    Conflict(u64),
}

/// The broker's store in etcd.
pub struct EtcdStore {
    requests: mpsc::UnboundedSender<Request>,
    config: EtcdConfig,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("store", &self.config.name())
            .finish()
    }
}

impl EtcdStore {
    /// Connects to the members of `config` and checks (or, on an empty
    /// prefix, writes) the schema version.
    pub fn open(config: EtcdConfig) -> Result<Self, StoreError> {
        let name = config.name();
        let backend = |message: String| StoreError::Backend {
            path: name.clone().into(),
            message,
        };
        let (requests, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_config = config.clone();
        std::thread::Builder::new()
            .name("etcd-store".into())
            .spawn(move || serve(thread_config, rx, ready_tx))
            .map_err(|e| backend(format!("cannot start the client thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| backend("the client thread ended".into()))?
            .map_err(backend)?;
        let store = EtcdStore { requests, config };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let key = self.key(Table::Meta, SCHEMA_KEY);
        let found = self
            .call(|tx| Request::Get(key, tx))?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        match found {
            None => {
                let mut b = Batch::new();
                b.put(
                    Table::Meta,
                    SCHEMA_KEY,
                    SCHEMA_VERSION.to_string().into_bytes(),
                );
                self.commit(&b).map(drop)
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => Ok(()),
            Some(found) => Err(StoreError::Schema {
                path: self.config.name().into(),
                found,
            }),
        }
    }

    fn key(&self, table: Table, key: &str) -> String {
        format!("{}{}/{key}", self.config.prefix, table.name())
    }

    fn err(&self, message: String) -> StoreError {
        StoreError::Backend {
            path: self.config.name().into(),
            message,
        }
    }

    /// Sends `request` to the client thread and waits for its answer.
    fn call<T>(
        &self,
        make: impl FnOnce(std_mpsc::Sender<Result<T, String>>) -> Request,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std_mpsc::channel();
        self.requests
            .send(make(tx))
            .map_err(|_| self.err("the client thread ended".into()))?;
        // The thread answers within its own deadline; this one only
        // guards against the thread being stuck.
        rx.recv_timeout(REQUEST_TIMEOUT * 2)
            .map_err(|e| self.err(format!("no answer from the client thread: {e}")))?
            .map_err(|m| self.err(m))
    }
}

impl Store for EtcdStore {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut out = self.call(Request::Load)?;
        for t in Table::ALL {
            out.contents.entry(t).or_default();
        }
        Ok(out)
    }

    fn commit_if(&self, batch: &Batch, expected: Option<u64>) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(expected.unwrap_or(0));
        }
        let mut ops: Vec<TxnOp> = batch
            .ops
            .iter()
            .map(|(t, k, v)| match v {
                Some(v) => TxnOp::put(self.key(*t, k), v.clone(), None),
                None => TxnOp::delete(self.key(*t, k), None),
            })
            .collect();
        ops.push(TxnOp::put(self.guard(), Vec::new(), None));
        match self.call(|tx| Request::Commit(ops, expected, tx))? {
            Committed::At(revision) => Ok(revision),
            Committed::Conflict(found) => Err(StoreError::Conflict {
                path: self.config.name().into(),
                expected: expected.unwrap_or(0),
                found,
            }),
        }
    }

    fn watch(&self, after: u64) -> Result<Watch, StoreError> {
        let (tx, watch) = Watch::channel();
        self.requests
            .send(Request::Watch(after, tx))
            .map_err(|_| self.err("the client thread ended".into()))?;
        Ok(watch)
    }

    fn shared(&self) -> bool {
        true
    }
}

impl EtcdStore {
    fn guard(&self) -> String {
        format!("{}{GUARD}", self.config.prefix)
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }
}

/// The client thread: connects, reports, then answers requests until the
/// store is dropped.
fn serve(
    config: EtcdConfig,
    mut rx: mpsc::UnboundedReceiver<Request>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start the client's runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let client = match connect(&config).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        while let Some(request) = rx.recv().await {
            let mut client = client.clone();
            match request {
                Request::Load(tx) => {
                    let _ = tx.send(load(&mut client, &config.prefix).await);
                }
                Request::Get(key, tx) => {
                    let got = within(client.get(key, None)).await;
                    let _ = tx.send(got.map(|r| r.kvs().first().map(|kv| kv.value().to_vec())));
                }
                Request::Commit(ops, expected, tx) => {
                    let guard = format!("{}{GUARD}", config.prefix);
                    let _ = tx.send(commit(&mut client, ops, &guard, expected).await);
                }
                Request::Watch(after, tx) => {
                    tokio::spawn(watch(client, config.clone(), after, tx));
                }
            }
        }
    });
}

/// A client of `config`'s members that has had one answer.
pub async fn connect(config: &EtcdConfig) -> Result<Client, String> {
    // require_leader: a member cut off from the others answers at once
    // that it has no leader, instead of leaving the request to time out.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_require_leader(true);
    if let Some(ca) = &config.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &config.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    let mut client = Client::connect(config.urls(), Some(options))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    // Connecting is lazy: one read proves a member answers.
    within(client.get("/", None))
        .await
        .map_err(|e| format!("no member answers: {e}"))?;
    Ok(client)
}

/// `fut` with [`REQUEST_TIMEOUT`]; a timeout says what it likely means.
pub async fn within<T>(
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| explain(&e.to_string())),
        Err(_) => Err(format!(
            "no answer within {REQUEST_TIMEOUT:?} (members down, or etcd has no quorum)"
        )),
    }
}

/// etcd's own words, with what they mean for the broker.
fn explain(e: &str) -> String {
    if e.contains("no leader") {
        format!("etcd has no quorum (the member answering has no leader): {e}")
    } else {
        e.to_string()
    }
}

async fn load(client: &mut Client, prefix: &str) -> Result<Snapshot, String> {
    let resp = within(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let mut out = Contents::new();
    for kv in resp.kvs() {
        let key = kv
            .key_str()
            .map_err(|_| format!("a key under {prefix} is not UTF-8"))?;
        let Some((table, row)) = split_key(prefix, key)? else {
            continue;
        };
        out.entry(table)
            .or_default()
            .insert(row.to_string(), kv.value().to_vec());
    }
    let revision = resp.header().map_or(0, |h| h.revision());
    Ok(Snapshot {
        contents: out,
        revision: u64::try_from(revision).unwrap_or(0),
    })
}

/// Streams the commits under the prefix after `after` into `tx`, each
/// revision's events as one [`Change`], until the stream or the receiver
/// ends; an error (compaction, a member lost) is the last thing sent.
async fn watch(
    mut client: Client,
    config: EtcdConfig,
    after: u64,
    tx: tokio::sync::mpsc::UnboundedSender<Result<Change, StoreError>>,
) {
    let prefix = config.prefix.clone();
    let fail = |message: String| StoreError::Backend {
        path: config.name().into(),
        message,
    };
    let start = i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX);
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut stream = match within(client.watch(prefix.clone(), Some(options))).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Err(fail(format!("watch: {e}"))));
            return;
        }
    };
    loop {
        let resp = tokio::select! {
            r = stream.message() => r,
            () = tx.closed() => return,
        };
        let resp = match resp {
            Ok(Some(r)) => r,
            Ok(None) => {
                let _ = tx.send(Err(fail("watch: the stream ended".into())));
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(fail(format!("watch: {}", explain(&e.to_string())))));
                return;
            }
        };
        if resp.compact_revision() > 0 {
            let _ = tx.send(Err(StoreError::Compacted {
                path: config.name().into(),
                after,
                oldest: u64::try_from(resp.compact_revision()).unwrap_or(0),
            }));
            return;
        }
        if resp.canceled() {
            let _ = tx.send(Err(fail(format!(
                "watch cancelled: {}",
                explain(resp.cancel_reason())
            ))));
            return;
        }
        match changes(&prefix, resp.events()) {
            Ok(changes) => {
                for c in changes {
                    if tx.send(Ok(c)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(Err(fail(e)));
                return;
            }
        }
    }
}

/// The events of one watch response as commits: grouped by revision (etcd
/// never splits a revision across responses), keys outside the tables left
/// out, and revisions that changed only those dropped.
fn changes(prefix: &str, events: &[etcd_client::Event]) -> Result<Vec<Change>, String> {
    let mut out: Vec<Change> = Vec::new();
    for ev in events {
        let Some(kv) = ev.kv() else { continue };
        let key = kv
            .key_str()
            .map_err(|_| format!("a key under {prefix} is not UTF-8"))?;
        let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
        let op: Option<Op> = split_key(prefix, key)?.map(|(t, row)| {
            let value = match ev.event_type() {
                EventType::Put => Some(kv.value().to_vec()),
                EventType::Delete => None,
            };
            (t, row.to_string(), value)
        });
        match out.last_mut() {
            Some(c) if c.revision == revision => c.ops.extend(op),
            _ => out.push(Change {
                revision,
                ops: op.into_iter().collect(),
            }),
        }
    }
    out.retain(|c| !c.ops.is_empty());
    Ok(out)
}

/// `<prefix><table>/<row>` → (table, row); `None` for the keys that are
/// not tables (`<prefix>_...`); a key of no table is an error naming it.
fn split_key<'a>(prefix: &str, key: &'a str) -> Result<Option<(Table, &'a str)>, String> {
    let rest = key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("key {key:?} is outside {prefix}"))?;
    if rest.starts_with(COORDINATION) {
        return Ok(None);
    }
    let (name, row) = rest
        .split_once('/')
        .ok_or_else(|| format!("key {key:?} names no table"))?;
    let table = Table::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| format!("key {key:?}: {name:?} is not a table of this broker"))?;
    Ok(Some((table, row)))
}

/// One transaction: `ops` (the guard's put among them), if the guard was
/// not written after `expected`.
async fn commit(
    client: &mut Client,
    ops: Vec<TxnOp>,
    guard: &str,
    expected: Option<u64>,
) -> Result<Committed, String> {
    // The guard's put is the batch's own; count only the batch's.
    let n = ops.len() - 1;
    let txn = match expected {
        None => Txn::new().and_then(ops),
        Some(e) => {
            let e = i64::try_from(e).map_err(|_| format!("revision {e} is out of range"))?;
            Txn::new()
                .when([Compare::mod_revision(guard, CompareOp::Less, e + 1)])
                .and_then(ops)
                .or_else([TxnOp::get(guard, None)])
        }
    };
    let resp = within(client.txn(txn))
        .await
        .map_err(|e| {
            if e.contains("too many operations") {
                format!(
                    "{e}: this batch has {n} operations (and the store's revision key), more than the members' \
                     --max-txn-ops (default 128); raise it"
                )
            } else {
                e
            }
        })?;
    if resp.succeeded() {
        let revision = resp.header().map_or(0, |h| h.revision());
        return Ok(Committed::At(u64::try_from(revision).unwrap_or(0)));
    }
    let found = resp
        .op_responses()
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
            _ => None,
        })
        .unwrap_or(0);
    Ok(Committed::Conflict(u64::try_from(found).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_bad_ones_named() {
        let c = EtcdConfig::parse("etcd://127.0.0.1:2379,10.0.0.2:2379", "mesh-a").unwrap();
        assert_eq!(c.endpoints, ["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(c.prefix, "/strait/mesh-a/");
        assert_eq!(c.urls(), ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]);
        for (bad, why) in [
            ("http://127.0.0.1:2379", "expected etcd://"),
            ("etcd://127.0.0.1", "has no :PORT"),
            ("etcd://:2379", "has no host"),
            ("etcd://a:0", "is not 1-65535"),
            ("etcd://a:70000", "is not 1-65535"),
            ("etcd://a:2379,", "has no :PORT"),
            ("etcd://a/b:2379", "has no host"),
        ] {
            let e = EtcdConfig::parse(bad, "m").unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn keys_map_to_tables_and_strangers_are_named() {
        let p = "/strait/m/";
        assert_eq!(
            split_key(p, "/strait/m/exports/east/ns/svc").unwrap(),
            Some((Table::Exports, "east/ns/svc"))
        );
        assert_eq!(
            split_key(p, "/strait/m/meta/schema_version").unwrap(),
            Some((Table::Meta, "schema_version"))
        );
        assert_eq!(split_key(p, "/strait/m/_revision").unwrap(), None);
        assert_eq!(split_key(p, "/strait/m/_replicas/broker-0").unwrap(), None);
        for (bad, why) in [
            ("/strait/m/stuff/x", "not a table"),
            ("/strait/m/clusters", "names no table"),
            ("/other/clusters/x", "outside"),
        ] {
            let e = split_key(p, bad).unwrap_err();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
    }
}
