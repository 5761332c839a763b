//! The accept loop's error policy, shared by every listener.
//!
//! `accept(2)` fails for reasons that pass (a connection reset before it
//! was taken, `ECONNABORTED`) and for reasons that persist while the
//! process is overloaded (`EMFILE`, `ENFILE`, `ENOBUFS`). Retrying the
//! latter at once spins a core and starves the connections that are open;
//! giving up stops the listener for good. [`Acceptor`] logs every failure
//! and pauses before the next try, 5 ms at first, doubling to 1 s while the
//! failures go on, back to none after a success.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// The first pause after a failed accept.
pub const PAUSE_MIN: Duration = Duration::from_millis(5);
/// The longest pause between two failed accepts.
pub const PAUSE_MAX: Duration = Duration::from_secs(1);

/// A listener with the shared error policy.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    what: &'static str,
    pause: Duration,
}

impl Acceptor {
    /// `what` names the listener in logs ("inbound", "passthrough", ...).
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Self {
            listener,
            what,
            pause: Duration::ZERO,
        }
    }

    /// The next connection. Never fails: a failed accept is logged and
    /// retried after a pause (see the module docs). Cancel-safe: dropping
    /// the future loses no connection.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(c) => {
                    self.pause = Duration::ZERO;
                    return c;
                }
                Err(e) => {
                    self.pause = next_pause(self.pause);
                    tracing::warn!(
                        listener = self.what,
                        error = %e,
                        pause = ?self.pause,
                        "accept failed; pausing before the next one"
                    );
                    tokio::time::sleep(self.pause).await;
                }
            }
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// The pause after one more failure, given the last one.
fn next_pause(last: Duration) -> Duration {
    if last.is_zero() {
        PAUSE_MIN
    } else {
        (last * 2).min(PAUSE_MAX)
    }
}

/// Binds `addr`, naming it and what it is for in the error.
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, what, source })
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_grows_to_its_cap_and_starts_small() {
        let mut p = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..12 {
            p = next_pause(p);
            seen.push(p);
        }
        assert_eq!(seen[0], PAUSE_MIN);
        assert_eq!(seen[1], PAUSE_MIN * 2);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*seen.last().unwrap(), PAUSE_MAX);
    }

    #[tokio::test]
    async fn accepts_and_names_the_address_it_cannot_bind() {
        let l = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = l.local_addr().unwrap();
        let err = bind(addr, "second").await.unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(err.to_string().contains("second"), "{err}");
        let mut a = Acceptor::new(l, "test");
        let (c, (s, peer)) = tokio::join!(TcpStream::connect(addr), a.accept());
        assert_eq!(c.unwrap().local_addr().unwrap(), peer);
        assert_eq!(s.peer_addr().unwrap(), peer);
    }
}
