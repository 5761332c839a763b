//! The upstream connection pool: one shared HTTP/2 connection per
//! destination (a burst of requests waits for the one connect under way),
//! idle HTTP/1.1 keep-alive connections, the passthrough client, and the
//! DestinationRule `connectionPool` limits. A connection is reused only
//! for the same address, SNI, accepted identities, client identity and
//! trust; dialing a new one is `upstream`'s.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::Shared;
use crate::identity::Identity;
use crate::idle::{self, IdleList};

use super::limits::Limits;
use super::upstream::{
    ALPN_H1, ALPN_H2, SendBody, SendError, Target, h1_handshake, h2_handshake, open,
};

/// Pooled connections to upstreams (HTTP/2: one shared per destination;
/// HTTP/1.1: idle keep-alive connections, one request at a time each), and
/// the in-flight count per destination that enforces DestinationRule
/// `connectionPool` limits.
#[derive(Default)]
pub struct Pool {
    // foldhash rather than SipHash: looked up on every request.
    pub(super) conns: Mutex<foldhash::HashMap<PoolKey, Pooled>>,
    /// Idle HTTP/1.1 connections, most recently used last.
    idle: Arc<Mutex<foldhash::HashMap<PoolKey, IdleList<SendBody, Http1Meta>>>>,
    /// HTTP/2 connects under way, and where their outcome will be told.
    connecting: Mutex<foldhash::HashMap<PoolKey, watch::Receiver<Option<Connected2>>>>,
    /// DestinationRule `connectionPool` limits.
    pub(super) limits: Limits,
    /// HTTP/1.1 to destinations outside the mesh (passthrough), made on
    /// first use.
    passthrough: std::sync::OnceLock<PassthroughClient>,
}

/// The pooled HTTP/1.1 client for passthrough requests.
pub(super) type PassthroughClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    SendBody,
>;

/// What a pooled connection was opened for: a connection is reused only
/// for the same address, SNI, accepted identities and client identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct PoolKey {
    pub(super) target: String,
    pub(super) sni: String,
    pub(super) identities: String,
    pub(super) tls: bool,
    /// The client identity's allocation (kept alive by [`Pooled`], so it
    /// cannot be reused by a newer identity while the entry exists).
    pub(super) generation: usize,
    /// The trust (bundles, deny-list) the server was verified under.
    pub(super) trust_version: u64,
}

/// How a shared HTTP/2 connect ended.
type Connected2 = Result<Pooled, SendError>;

/// What a pooled HTTP/1.1 connection keeps with it.
pub(super) struct Http1Meta {
    /// The verified server identity (`unknown` without TLS).
    pub(super) peer: String,
    /// Holds the client identity alive while pooled (see [`PoolKey`]).
    _identity: Arc<Identity>,
    /// Requests it carried.
    pub(super) used: u32,
}

/// A pooled HTTP/1.1 connection to an upstream.
pub(super) type Http1Conn = idle::Conn<SendBody, Http1Meta>;

/// How long an HTTP/1.1 connection may wait in the pool (hyper's and
/// Go's default for idle keep-alive connections).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per destination; more are closed as
/// they come back (a burst's connections do not all stay open).
const MAX_IDLE: usize = 64;

#[derive(Clone)]
pub(super) struct Pooled {
    pub(super) sender: SendRequest<SendBody>,
    /// The verified server identity (`unknown` without TLS).
    pub(super) peer: String,
    /// Holds the client identity alive while pooled (see [`PoolKey`]).
    pub(super) _identity: Arc<Identity>,
}

impl Pool {
    pub(super) fn get(&self, key: &PoolKey) -> Option<Pooled> {
        let mut m = self.conns.lock().ok()?;
        match m.get(key) {
            Some(p) if !p.sender.is_closed() => Some(p.clone()),
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        }
    }

    /// Pools `p`, forgetting closed connections and those of older client
    /// identities (dropping a sender lets its connection finish the
    /// requests in flight, then close).
    pub(super) fn put(&self, key: PoolKey, p: Pooled) {
        if let Ok(mut m) = self.conns.lock() {
            m.retain(|k, v| {
                !v.sender.is_closed()
                    && k.generation == key.generation
                    && k.trust_version == key.trust_version
            });
            m.insert(key, p);
        }
    }

    pub(super) fn forget(&self, key: &PoolKey) {
        if let Ok(mut m) = self.conns.lock() {
            m.remove(key);
        }
    }

    /// An idle HTTP/1.1 connection for `key` (the most recently used one
    /// that is still open).
    fn take_idle(&self, key: &PoolKey) -> Option<Http1Conn> {
        let mut m = self.idle.lock().ok()?;
        let list = m.get_mut(key)?;
        let found = list.take();
        if list.is_empty() {
            m.remove(key);
        }
        found
    }

    /// Pools `c` as idle once its exchange is over, unless it carried
    /// `max_requests` requests.
    pub(super) fn park(&self, key: PoolKey, c: Http1Conn, max_requests: Option<u32>) {
        if max_requests.is_some_and(|max| max > 0 && c.meta.used >= max) {
            return;
        }
        let idle = self.idle.clone();
        idle::when_idle(c, move |c| {
            let Ok(mut m) = idle.lock() else { return };
            // Connections of an older client identity or trust go.
            m.retain(|k, _| k.generation == key.generation && k.trust_version == key.trust_version);
            m.entry(key)
                .or_insert_with(|| IdleList::new(IDLE_TIMEOUT, MAX_IDLE))
                .put(c);
        });
    }

    /// Idle pooled HTTP/1.1 connections.
    pub fn idle_http1(&self) -> usize {
        self.idle
            .lock()
            .map_or(0, |m| m.values().map(IdleList::len).sum())
    }

    /// The client for passthrough HTTP/1.1 requests.
    pub(super) fn passthrough_http1(&self) -> &PassthroughClient {
        self.passthrough.get_or_init(|| {
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
        })
    }

    /// Pooled HTTP/2 connections (open or not yet noticed closed).
    pub fn len(&self) -> usize {
        self.conns.lock().map_or(0, |m| m.len())
    }

    /// Whether no connection is pooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a connection to `t` as `id` is pooled under.
fn pool_key(shared: &Shared, id: &Arc<Identity>, t: &Target<'_>) -> PoolKey {
    PoolKey {
        target: t.address.clone(),
        sni: t.sni(),
        identities: t.service.identities.join(","),
        tls: t.tls,
        generation: Arc::as_ptr(id) as usize,
        trust_version: shared.config.borrow().trust_version,
    }
}

/// A pooled (or new) HTTP/2 connection to `t`.
pub(super) async fn h2_connection(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
) -> Result<(PoolKey, Pooled), SendError> {
    let key = pool_key(shared, id, t);
    loop {
        if let Some(p) = shared.pool.get(&key) {
            return Ok((key, p));
        }
        // One connect per destination at a time: the requests of a burst
        // wait for it and share its outcome, rather than each opening a
        // connection of its own (of which the pool would keep one).
        let joined = {
            let Ok(mut m) = shared.pool.connecting.lock() else {
                break;
            };
            match m.get(&key) {
                Some(rx) => Ok(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    m.insert(key.clone(), rx);
                    Err(tx)
                }
            }
        };
        let mut waiting = match joined {
            Ok(rx) => rx,
            Err(tx) => {
                let guard = Connecting {
                    pool: &shared.pool,
                    key: &key,
                };
                let made = h2_connect(shared, id, t, &key).await;
                if let Ok(p) = &made {
                    shared.pool.put(key.clone(), p.clone());
                }
                let _ = tx.send(Some(made.clone()));
                drop(guard);
                return made.map(|p| (key, p));
            }
        };
        match waiting.wait_for(Option::is_some).await.as_deref() {
            Ok(Some(Ok(p))) => return Ok((key, p.clone())),
            Ok(Some(Err(e))) => return Err(e.clone()),
            // The request that was connecting went away: try again.
            _ => continue,
        }
    }
    let p = h2_connect(shared, id, t, &key).await?;
    Ok((key, p))
}

/// Forgets an in-progress connect when it ends (or is abandoned).
struct Connecting<'a> {
    pool: &'a Pool,
    key: &'a PoolKey,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.pool.connecting.lock() {
            m.remove(self.key);
        }
    }
}

/// A new HTTP/2 connection to `t`.
async fn h2_connect(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
    key: &PoolKey,
) -> Result<Pooled, SendError> {
    let c = open(shared, id, t, ALPN_H2).await?;
    let sender = h2_handshake(c.stream, &key.target, c.watched).await?;
    Ok(Pooled {
        sender,
        peer: c.peer,
        _identity: id.clone(),
    })
}

/// An idle pooled HTTP/1.1 connection to `t`, or a new one (`fresh`:
/// only a new one).
pub(super) async fn h1_connection(
    shared: &Shared,
    id: &Arc<Identity>,
    t: &Target<'_>,
    fresh: bool,
) -> Result<(PoolKey, Http1Conn, bool), SendError> {
    let key = pool_key(shared, id, t);
    if !fresh && let Some(c) = shared.pool.take_idle(&key) {
        return Ok((key, c, false));
    }
    let c = open(shared, id, t, ALPN_H1).await?;
    let sender = h1_handshake(c.stream, &key.target, c.watched).await?;
    let meta = Http1Meta {
        peer: c.peer,
        _identity: id.clone(),
        used: 0,
    };
    Ok((key, idle::Conn::new(sender, meta), true))
}
