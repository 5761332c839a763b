//! Idle HTTP/1.1 keep-alive connections waiting for their next request:
//! the outbound side's, per upstream destination, and the inbound side's
//! to its own app. A connection carries one exchange at a time; it comes
//! back to its list once that exchange is over.

use std::time::{Duration, Instant};

use hyper::client::conn::http1;

/// A pooled HTTP/1.1 connection and what its pool keeps with it.
pub(crate) struct Conn<B, T> {
    pub(crate) sender: http1::SendRequest<B>,
    pub(crate) meta: T,
    /// When it last became idle.
    since: Instant,
}

impl<B, T> Conn<B, T> {
    pub(crate) fn new(sender: http1::SendRequest<B>, meta: T) -> Self {
        Conn {
            sender,
            meta,
            since: Instant::now(),
        }
    }
}

/// Idle connections to one destination, most recently used last.
pub(crate) struct IdleList<B, T> {
    conns: Vec<Conn<B, T>>,
    /// How long a connection may stay idle.
    max_idle: Duration,
    /// How many are kept; more are closed as they come back.
    max: usize,
}

impl<B, T> IdleList<B, T> {
    pub(crate) fn new(max_idle: Duration, max: usize) -> Self {
        IdleList {
            conns: Vec::new(),
            max_idle,
            max,
        }
    }

    /// The most recently used connection that is still open, forgetting
    /// closed and expired ones on the way.
    pub(crate) fn take(&mut self) -> Option<Conn<B, T>> {
        let now = Instant::now();
        while let Some(c) = self.conns.pop() {
            if !c.sender.is_closed()
                && c.sender.is_ready()
                && now.duration_since(c.since) < self.max_idle
            {
                return Some(c);
            }
        }
        None
    }

    /// Keeps `c` as idle (closed and expired ones go first); dropped, and
    /// so closed, when the list is full.
    pub(crate) fn put(&mut self, mut c: Conn<B, T>) {
        let now = Instant::now();
        self.conns
            .retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < self.max_idle);
        if self.conns.len() < self.max {
            c.since = now;
            self.conns.push(c);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// Waits, in a task of its own, until `c` has finished its exchange (the
/// response body read, the request body sent), then hands it to `keep`; a
/// connection that closed meanwhile (or switched protocols) is dropped.
pub(crate) fn when_idle<B, T>(mut c: Conn<B, T>, keep: impl FnOnce(Conn<B, T>) + Send + 'static)
where
    B: hyper::body::Body + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(async move {
        if c.sender.ready().await.is_ok() {
            keep(c);
        }
    });
}
