//! The etcd store (`--store etcd://HOST:PORT[,HOST:PORT...]`, feature
//! `etcd`): the same tables and values as redb's, as keys
//! `<prefix><table>/<key>` (prefix `/strait/<mesh>/` by default), the
//! schema version at `<prefix>meta/schema_version`, and each [`Batch`] one
//! etcd transaction, so a batch is all there or not at all.
//!
//! [`Store`] is synchronous (the broker writes through it before it
//! acknowledges a change, as with redb's fsync); the client runs on a
//! runtime of its own, on its own thread, and each call waits for its
//! answer. Every request has a deadline: an etcd that does not answer
//! (no quorum, partitioned) fails the write with an error saying so,
//! never hangs the broker.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp,
};
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;

use super::{Batch, Contents, SCHEMA_KEY, SCHEMA_VERSION, Store, StoreError, Table};

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
    fn name(&self) -> String {
        format!("etcd://{} {}", self.endpoints.join(","), self.prefix)
    }
}

/// A request to the client thread, with where its answer goes (a std
/// channel: the caller may be a task of the broker's runtime, where
/// tokio's blocking receives panic).
enum Request {
    Load(std_mpsc::Sender<Result<Contents, String>>),
    Get(String, std_mpsc::Sender<Result<Option<Vec<u8>>, String>>),
    Commit(Vec<TxnOp>, std_mpsc::Sender<Result<(), String>>),
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
                self.commit(&b)
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
    fn load(&self) -> Result<Contents, StoreError> {
        let mut out = self.call(Request::Load)?;
        for t in Table::ALL {
            out.entry(t).or_default();
        }
        Ok(out)
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let ops: Vec<TxnOp> = batch
            .ops
            .iter()
            .map(|(t, k, v)| match v {
                Some(v) => TxnOp::put(self.key(*t, k), v.clone(), None),
                None => TxnOp::delete(self.key(*t, k), None),
            })
            .collect();
        self.call(|tx| Request::Commit(ops, tx))
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
                Request::Commit(ops, tx) => {
                    let _ = tx.send(commit(&mut client, ops).await);
                }
            }
        }
    });
}

async fn connect(config: &EtcdConfig) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT);
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
async fn within<T>(fut: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer within {REQUEST_TIMEOUT:?} (members down, or no quorum)"
        )),
    }
}

async fn load(client: &mut Client, prefix: &str) -> Result<Contents, String> {
    let resp = within(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let mut out = Contents::new();
    for kv in resp.kvs() {
        let key = kv
            .key_str()
            .map_err(|_| format!("a key under {prefix} is not UTF-8"))?;
        let (table, row) = split_key(prefix, key)?;
        out.entry(table)
            .or_default()
            .insert(row.to_string(), kv.value().to_vec());
    }
    Ok(out)
}

/// `<prefix><table>/<row>` → (table, row); a key of no table is an error
/// naming it.
fn split_key<'a>(prefix: &str, key: &'a str) -> Result<(Table, &'a str), String> {
    let rest = key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("key {key:?} is outside {prefix}"))?;
    let (name, row) = rest
        .split_once('/')
        .ok_or_else(|| format!("key {key:?} names no table"))?;
    let table = Table::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| format!("key {key:?}: {name:?} is not a table of this broker"))?;
    Ok((table, row))
}

async fn commit(client: &mut Client, ops: Vec<TxnOp>) -> Result<(), String> {
    let n = ops.len();
    let resp = within(client.txn(Txn::new().and_then(ops)))
        .await
        .map_err(|e| {
            if e.contains("too many operations") {
                format!(
                    "{e}: this batch has {n} operations, more than the members' \
                     --max-txn-ops (default 128); raise it"
                )
            } else {
                e
            }
        })?;
    if resp.succeeded() {
        Ok(())
    } else {
        Err("the transaction did not succeed".into())
    }
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
            (Table::Exports, "east/ns/svc")
        );
        assert_eq!(
            split_key(p, "/strait/m/meta/schema_version").unwrap(),
            (Table::Meta, "schema_version")
        );
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
