//! Graceful shutdown, one way for every listener.
//!
//! A process makes one [`channel`]: the [`Trigger`] stays with whoever
//! handles the shutdown signal, a [`Watch`] goes to every listener and
//! connection. The life of a process has three phases ([`Phase`]):
//! serving; draining (listeners stop accepting, open connections finish
//! what is in flight: HTTP/2 sends GOAWAY, HTTP/1.1 closes after the
//! current request, byte copies go on); killed (the drain deadline passed:
//! what is still open is dropped).
//!
//! Connections hold a [`Guard`] from [`Watch::guard`] while they are open,
//! so [`Trigger::drain`] returns as soon as the last one ends rather than
//! at the deadline. A server that cannot count its connections (tonic's)
//! is bounded with [`Watch::deadline`] instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Where a process is in its life; connections follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Run,
    /// No new connections; open ones finish what is in flight.
    Drain,
    /// The drain deadline passed: close everything.
    Kill,
}

/// A new drain: the trigger and the first watch.
pub fn channel() -> (Trigger, Watch) {
    let (phase, rx) = watch::channel(Phase::Run);
    let open = Arc::new(watch::Sender::new(0usize));
    let watch = Watch {
        phase: rx,
        open: open.clone(),
    };
    (Trigger { phase, open }, watch)
}

/// Moves the process through its phases.
pub struct Trigger {
    phase: watch::Sender<Phase>,
    open: Arc<watch::Sender<usize>>,
}

/// What [`Trigger::drain`] found at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection ended within the deadline.
    Idle,
    /// The deadline passed with this many connections open; they were
    /// told to close.
    Deadline { open: usize },
}

impl Trigger {
    /// Another watch, for a listener made after the channel.
    pub fn watch(&self) -> Watch {
        Watch {
            phase: self.phase.subscribe(),
            open: self.open.clone(),
        }
    }

    /// How many guards are alive.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Starts the drain: listeners stop accepting, connections finish.
    pub fn start(&self) {
        self.phase.send_if_modified(|p| {
            let was = *p;
            if was == Phase::Run {
                *p = Phase::Drain;
            }
            was == Phase::Run
        });
    }

    /// Starts the drain, waits until no guard is alive or `deadline`
    /// passed, then kills what is left.
    pub async fn drain(self, deadline: Duration) -> Drained {
        self.start();
        let mut open = self.open.subscribe();
        let idle = tokio::time::timeout(deadline, open.wait_for(|n| *n == 0)).await;
        let drained = match idle {
            Ok(_) => Drained::Idle,
            Err(_) => Drained::Deadline { open: self.open() },
        };
        self.phase.send_replace(Phase::Kill);
        drained
    }
}

impl Drop for Trigger {
    /// A trigger dropped without a drain kills: watches see [`Phase::Kill`]
    /// (their sender is gone).
    fn drop(&mut self) {
        self.phase.send_replace(Phase::Kill);
    }
}

/// What a listener or connection holds to follow the process's life.
#[derive(Clone)]
pub struct Watch {
    phase: watch::Receiver<Phase>,
    open: Arc<watch::Sender<usize>>,
}

impl Watch {
    /// Counts a connection as open until the guard is dropped.
    pub fn guard(&self) -> Guard {
        self.open.send_modify(|n| *n += 1);
        Guard(self.open.clone())
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Resolves once the drain has started (or the process is killed).
    pub async fn draining(&self) {
        self.reached(Phase::Drain).await;
    }

    /// Resolves once the drain deadline passed (or the trigger is gone).
    pub async fn killed(&self) {
        self.reached(Phase::Kill).await;
    }

    /// Resolves `bound` after the drain started: how a server that does
    /// not count its connections bounds its own graceful shutdown.
    pub async fn deadline(&self, bound: Duration) {
        self.draining().await;
        tokio::time::sleep(bound).await;
    }

    async fn reached(&self, at_least: Phase) {
        let mut rx = self.phase.clone();
        let rank = |p: Phase| p as u8;
        // A closed channel means the trigger is gone: as good as killed.
        let _ = rx.wait_for(|p| rank(*p) >= rank(at_least)).await;
    }

    /// Runs `fut` until it ends, or `None` once the process is killed.
    pub async fn until_killed<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            r = fut => Some(r),
            () = self.killed() => None,
        }
    }

    /// Drives `conn` (a hyper connection) to its end: once the drain
    /// starts `graceful` asks it to finish (HTTP/2 GOAWAY, HTTP/1.1 close
    /// after the current request); once killed it is dropped.
    pub async fn drive<C, F>(&self, conn: C, graceful: F)
    where
        C: Future,
        F: FnOnce(Pin<&mut C>),
    {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            () = self.draining() => {}
        }
        graceful(conn.as_mut());
        tokio::select! {
            _ = conn.as_mut() => {}
            () = self.killed() => {}
        }
    }
}

/// Counts a connection as open while alive.
pub struct Guard(Arc<watch::Sender<usize>>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_returns_when_the_last_guard_drops() {
        let (trigger, watch) = channel();
        let guard = watch.guard();
        let w = watch.clone();
        let conn = tokio::spawn(async move {
            w.draining().await;
            drop(guard);
        });
        assert_eq!(trigger.drain(Duration::from_secs(30)).await, Drained::Idle);
        conn.await.unwrap();
        assert_eq!(watch.phase(), Phase::Kill);
    }

    #[tokio::test]
    async fn drain_kills_at_the_deadline() {
        let (trigger, watch) = channel();
        let _guard = watch.guard();
        let w = watch.clone();
        let copy = tokio::spawn(async move { w.until_killed(std::future::pending::<()>()).await });
        // The guard is never dropped: only the deadline ends the drain.
        let drained = trigger.drain(Duration::from_millis(100)).await;
        assert_eq!(drained, Drained::Deadline { open: 1 });
        assert_eq!(copy.await.unwrap(), None);
    }

    #[tokio::test]
    async fn drive_asks_gracefully_once_the_drain_starts() {
        let (trigger, watch) = channel();
        // The connection ends only when asked to (as hyper's does after
        // GOAWAY): the drive must ask once the drain starts.
        let (asked_tx, asked_rx) = tokio::sync::oneshot::channel::<()>();
        let w = watch.clone();
        let driven = tokio::spawn(async move {
            w.drive(async { asked_rx.await.is_ok() }, move |_| {
                let _ = asked_tx.send(());
            })
            .await;
        });
        trigger.start();
        driven.await.unwrap();
        assert_eq!(watch.phase(), Phase::Drain, "ended by the ask, not a kill");
        drop(trigger);
    }

    #[tokio::test]
    async fn a_dropped_trigger_kills() {
        let (trigger, watch) = channel();
        drop(trigger);
        assert_eq!(watch.until_killed(std::future::pending::<()>()).await, None);
    }

    #[tokio::test]
    async fn start_is_idempotent_and_never_goes_back() {
        let (trigger, watch) = channel();
        trigger.start();
        trigger.start();
        assert_eq!(watch.phase(), Phase::Drain);
        let w2 = trigger.watch();
        assert_eq!(w2.phase(), Phase::Drain);
        assert_eq!(trigger.drain(Duration::from_secs(1)).await, Drained::Idle);
        assert_eq!(watch.phase(), Phase::Kill);
    }
}
