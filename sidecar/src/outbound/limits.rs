//! DestinationRule `connectionPool` limits, as Istio makes them Envoy's
//! circuit breakers: requests in flight per destination
//! (`http2MaxRequests`; TCP connections under `maxConnections`), and for
//! HTTP/1.1 the connections in use (`maxConnections`) with a queue of
//! requests waiting for one (`http1MaxPendingRequests`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hyper::StatusCode;

use crate::policy::TrafficPolicy;

/// The counts behind the limits, per destination.
#[derive(Default)]
pub(super) struct Limits {
    // foldhash rather than SipHash: looked up on every request.
    in_flight: Mutex<foldhash::HashMap<String, Arc<AtomicU32>>>,
    /// HTTP/1.1 connections busy per destination and limit, under
    /// `maxConnections` (see [`Limits::connection`]).
    busy: Mutex<foldhash::HashMap<String, Arc<Busy>>>,
}

impl Limits {
    /// Takes one of `limit` in-flight slots of `destination` (named only
    /// when there is a limit); `None` when all are taken (the request
    /// overflows). No limit always admits.
    pub(super) fn admit(
        &self,
        destination: impl FnOnce() -> String,
        limit: Option<u32>,
    ) -> Option<InFlight> {
        let Some(limit) = limit else {
            return Some(InFlight(None));
        };
        let counter = self
            .in_flight
            .lock()
            .ok()?
            .entry(destination())
            .or_default()
            .clone();
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight(Some(counter)))
    }

    /// An HTTP/1.1 request's connection to `host` under `tp` (see
    /// [`Limits::connection`]), waited for no later than `deadline` (the
    /// route's timeout). Err: the status to answer with, and why (a full
    /// queue: 503; the deadline passed: 504).
    pub(super) async fn http1_connection(
        &self,
        destination: impl FnOnce() -> String,
        host: &str,
        tp: &TrafficPolicy,
        deadline: Option<Instant>,
    ) -> Result<Connection, (StatusCode, String)> {
        let wait = self.connection(destination, tp.max_connections, tp.max_pending_requests);
        let waited = match deadline {
            Some(d) => tokio::time::timeout_at(tokio::time::Instant::from_std(d), wait)
                .await
                .ok(),
            None => Some(wait.await),
        };
        match waited {
            Some(Some(c)) => Ok(c),
            Some(None) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "upstream connection pool overflow: {host} allows {} connections and {} waiting",
                    tp.max_connections.unwrap_or(0),
                    tp.max_pending_requests.unwrap_or(0)
                ),
            )),
            None => Err((
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "timed out waiting for a connection to {host} ({} allowed)",
                    tp.max_connections.unwrap_or(0)
                ),
            )),
        }
    }
}

/// The HTTP/1.1 connections of one destination under one
/// `maxConnections`: a permit per connection in use, and the requests
/// waiting for one.
struct Busy {
    permits: Arc<tokio::sync::Semaphore>,
    waiting: AtomicU32,
}

/// A place in a [`Busy`] queue, left on drop (also when the waiting
/// request goes away).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of `maxConnections` HTTP/1.1 connections, given back on drop.
pub(super) struct Connection {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Limits {
    /// Waits for one of `limit` HTTP/1.1 connections to `destination`
    /// (named only when there is a limit): Envoy's `max_connections`
    /// circuit breaker, as Istio's `maxConnections` sets it. A request
    /// that finds them all busy waits in a queue of at most `pending`
    /// (`http1MaxPendingRequests`; `None`: unbounded, Istio's default);
    /// `None` when the queue is full (the request overflows). No limit
    /// never waits.
    pub(super) async fn connection(
        &self,
        destination: impl FnOnce() -> String,
        limit: Option<u32>,
        pending: Option<u32>,
    ) -> Option<Connection> {
        let Some(limit) = limit else {
            return Some(Connection { _permit: None });
        };
        let busy = self
            .busy
            .lock()
            .ok()?
            .entry(format!("{}|{limit}", destination()))
            .or_insert_with(|| {
                Arc::new(Busy {
                    permits: Arc::new(tokio::sync::Semaphore::new(limit as usize)),
                    waiting: AtomicU32::new(0),
                })
            })
            .clone();
        if let Ok(p) = busy.permits.clone().try_acquire_owned() {
            return Some(Connection { _permit: Some(p) });
        }
        busy.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match pending {
                Some(max) if n >= max => None,
                _ => Some(n + 1),
            })
            .ok()?;
        let _waiting = Waiting(&busy.waiting);
        busy.permits
            .clone()
            .acquire_owned()
            .await
            .ok()
            .map(|p| Connection { _permit: Some(p) })
    }
}

/// An in-flight slot, given back on drop.
pub(super) struct InFlight(Option<Arc<AtomicU32>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// How many requests may be in flight to one destination under `tp`:
/// `http2MaxRequests`, which Istio makes Envoy's `max_requests` circuit
/// breaker, for HTTP/1.1 and HTTP/2 alike; beyond it a request overflows
/// at once. A request counts until its response body has gone through. (`maxConnections` and `http1MaxPendingRequests` bound the
/// HTTP/1.1 connections and the queue for them: [`Limits::connection`].)
pub fn concurrency_limit(tp: &TrafficPolicy) -> Option<u32> {
    tp.max_requests
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_request_limit_is_http2_max_requests_alone() {
        let tp = |c, p, r| TrafficPolicy {
            max_connections: c,
            max_pending_requests: p,
            max_requests: r,
            ..TrafficPolicy::default()
        };
        assert_eq!(concurrency_limit(&tp(None, None, None)), None);
        // maxConnections and the pending queue are the connection limit's.
        assert_eq!(concurrency_limit(&tp(Some(1), Some(1), None)), None);
        assert_eq!(concurrency_limit(&tp(Some(10), Some(10), Some(5))), Some(5));
        assert_eq!(concurrency_limit(&tp(None, None, Some(3))), Some(3));
    }

    #[tokio::test]
    async fn connections_queue_up_to_the_pending_limit_then_overflow() {
        use std::future::Future;
        let pool = Limits::default();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let dest = || "echo|".to_string();
        // Two connections allowed, one request may wait.
        let a = pool.connection(dest, Some(2), Some(1)).await.unwrap();
        let b = pool.connection(dest, Some(2), Some(1)).await.unwrap();
        let mut queued = Box::pin(pool.connection(dest, Some(2), Some(1)));
        assert!(queued.as_mut().poll(&mut cx).is_pending(), "waits");
        assert!(
            pool.connection(dest, Some(2), Some(1)).await.is_none(),
            "the queue is full: overflow"
        );
        // A connection freed goes to the waiting request.
        drop(a);
        let c = match queued.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(c) => c.unwrap(),
            std::task::Poll::Pending => panic!("the freed connection was not handed on"),
        };
        // A request that stops waiting leaves the queue.
        let mut gone = Box::pin(pool.connection(dest, Some(2), Some(1)));
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        drop(gone);
        let mut next = Box::pin(pool.connection(dest, Some(2), Some(1)));
        assert!(
            next.as_mut().poll(&mut cx).is_pending(),
            "room in the queue again"
        );
        drop((b, c, next));
        // No pending limit: any number waits; no connection limit: none do.
        let only = pool
            .connection(|| "x|".into(), Some(1), None)
            .await
            .unwrap();
        let waiters: Vec<_> = (0..50)
            .map(|_| Box::pin(pool.connection(|| "x|".into(), Some(1), None)))
            .collect();
        for mut w in waiters {
            assert!(w.as_mut().poll(&mut cx).is_pending());
        }
        drop(only);
        for _ in 0..100 {
            assert!(
                pool.connection(|| "y|".into(), None, Some(0))
                    .await
                    .is_some()
            );
        }
    }

    #[test]
    fn admission_overflows_at_the_limit_and_frees_slots_on_drop() {
        let pool = Limits::default();
        let a = pool.admit(|| "echo|".into(), Some(2)).unwrap();
        let b = pool.admit(|| "echo|".into(), Some(2)).unwrap();
        assert!(pool.admit(|| "echo|".into(), Some(2)).is_none());
        // Other destinations have their own count.
        assert!(pool.admit(|| "other|".into(), Some(1)).is_some());
        drop(a);
        let c = pool.admit(|| "echo|".into(), Some(2)).unwrap();
        drop((b, c));
        for _ in 0..100 {
            assert!(pool.admit(|| "echo|".into(), None).is_some());
        }
        assert!(pool.admit(|| "echo|".into(), Some(0)).is_none());
    }
}
