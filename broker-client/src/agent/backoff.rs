//! When to reconnect to the broker (pure; times come in as arguments).

use std::time::{Duration, Instant};

use super::{BACKOFF_MAX, BACKOFF_MIN};

/// When to reconnect to the broker, free of I/O and of the clock (times
/// come in as arguments): exponential back-off from [`BACKOFF_MIN`] to
/// [`BACKOFF_MAX`] while attempts fail, back to the minimum once a stream
/// synced (the broker acknowledged the exports or pushed imports, or the
/// exports were already in sync) or lived longer than the maximum. So a
/// cluster resyncs within [`BACKOFF_MIN`] of the broker's return after
/// each of several short outages, not after the back-off those outages
/// built up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    started: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            started: None,
        }
    }
}

impl Backoff {
    /// A connection attempt begins at `now`.
    pub fn attempt(&mut self, now: Instant) {
        self.started = Some(now);
    }

    /// The stream reached a successful exchange with the broker.
    pub fn synced(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The attempt begun last ended at `now` (failed, or the stream
    /// closed): how long to wait before the next one.
    pub fn ended(&mut self, now: Instant) -> Duration {
        if self
            .started
            .take()
            .is_some_and(|s| now.saturating_duration_since(s) > BACKOFF_MAX)
        {
            self.next = BACKOFF_MIN;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waits of `n` attempts that each fail at once (broker down).
    fn refused(b: &mut Backoff, t: &mut Instant, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                b.attempt(*t);
                let d = b.ended(*t);
                *t += d;
                d
            })
            .collect()
    }

    #[test]
    fn refused_attempts_back_off_exponentially_up_to_the_max() {
        let (mut b, mut t) = (Backoff::default(), Instant::now());
        let waits = refused(&mut b, &mut t, 8);
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
    }

    #[test]
    fn a_short_stream_that_synced_resets_the_backoff() {
        let (mut b, mut t) = (Backoff::default(), Instant::now());
        // Repeated short broker outages: each time a few refused attempts,
        // then a stream that syncs and lives one second.
        for outage in 0..5 {
            refused(&mut b, &mut t, 4);
            b.attempt(t);
            b.synced();
            t += Duration::from_secs(1);
            assert_eq!(
                b.ended(t),
                BACKOFF_MIN,
                "outage {outage}: the first retry after a synced stream"
            );
        }
    }

    #[test]
    fn a_stream_that_never_synced_keeps_backing_off() {
        let (mut b, mut t) = (Backoff::default(), Instant::now());
        refused(&mut b, &mut t, 3);
        // Opened, but the broker ended it before any exchange completed.
        b.attempt(t);
        t += Duration::from_millis(50);
        assert_eq!(b.ended(t), Duration::from_millis(1600));
    }

    #[test]
    fn a_long_lived_stream_resets_the_backoff_too() {
        let (mut b, mut t) = (Backoff::default(), Instant::now());
        refused(&mut b, &mut t, 6);
        b.attempt(t);
        t += BACKOFF_MAX + Duration::from_secs(1);
        assert_eq!(b.ended(t), BACKOFF_MIN);
    }
}
