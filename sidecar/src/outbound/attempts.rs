//! The retry and deadline state of one outbound request, without I/O or a
//! clock (the caller passes `Instant`s in), so that it is unit-tested
//! without sockets.
//!
//! As Envoy does, the weighted destination (the cluster: service, subset,
//! port) is chosen once per request, before the first attempt; retries
//! only choose another endpoint of that destination (avoiding those
//! already tried, Envoy's `previous_hosts` predicate). Rolling the
//! weights again on every retry would move a failing canary's share onto
//! the other destinations and hide its failure: an 80/20 split whose 20 %
//! always fails would answer 100 % from the 80 % side with no error.

use std::time::{Duration, Instant};

use crate::policy::RetryPolicy;

/// How one attempt ended, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tried {
    /// An answer with this status.
    Answered(u16),
    /// No connection (TCP, TLS or HTTP/2 set-up).
    ConnectFailure,
    /// The connection broke before a response.
    Reset,
    /// The per-try or the route timeout passed.
    Timeout,
}

/// Why the request loop stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The outcome is final: a success, or a failure the policy does not
    /// retry.
    Final,
    /// Every attempt the route allows was made.
    Exhausted,
    /// The route's timeout has passed.
    Deadline,
    /// The request body streamed and cannot be sent again.
    BodySpent,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Try again, on another endpoint of the same destination.
    Retry,
    Stop(Stop),
}

/// The attempts of one request: how many are left, and the time each may
/// take under the route's timeout and `perTryTimeout`.
#[derive(Debug, Clone)]
pub(super) struct Attempts {
    policy: RetryPolicy,
    /// The first try and the retries.
    tries: u32,
    /// Attempts started so far.
    started: u32,
    /// When the route's timeout ends every attempt.
    deadline: Option<Instant>,
}

impl Attempts {
    /// The attempts of a request that starts at `now` under a route with
    /// `policy` and `timeout`.
    pub(super) fn new(policy: &RetryPolicy, timeout: Option<Duration>, now: Instant) -> Attempts {
        Attempts {
            policy: policy.clone(),
            tries: policy.attempts.saturating_add(1),
            started: 0,
            deadline: timeout.map(|t| now + t),
        }
    }

    /// When the route's timeout passes (for the connection-pool queue).
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Starts an attempt at `now`: its index (0 for the first try) and
    /// how long it may take (`perTryTimeout`, capped by what is left of
    /// the route's timeout; `None`: no limit).
    pub(super) fn start(&mut self, now: Instant) -> (u32, Option<Duration>) {
        let index = self.started;
        self.started = self.started.saturating_add(1);
        let remaining = self.deadline.map(|d| d.saturating_duration_since(now));
        let limit = match (self.policy.per_try_timeout, remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (index, limit)
    }

    /// Whether the policy retries an attempt that ended as `tried`.
    fn retries(&self, tried: Tried) -> bool {
        match tried {
            Tried::Answered(code) => self.policy.retries_status(code),
            Tried::ConnectFailure => self.policy.retries_connect_failure(),
            Tried::Reset => self.policy.retries_reset(),
            Tried::Timeout => self.policy.retries_per_try_timeout(),
        }
    }

    /// What to do after the attempt that ended as `tried` at `now`;
    /// `replayable`: whether the body can still be sent again.
    pub(super) fn after(&self, tried: Tried, now: Instant, replayable: bool) -> Next {
        if !self.retries(tried) {
            Next::Stop(Stop::Final)
        } else if self.started >= self.tries {
            Next::Stop(Stop::Exhausted)
        } else if self.deadline.is_some_and(|d| now >= d) {
            Next::Stop(Stop::Deadline)
        } else if !replayable {
            Next::Stop(Stop::BodySpent)
        } else {
            Next::Retry
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;

    fn policy(attempts: u32, per_try: Option<u64>, on: &[&str]) -> RetryPolicy {
        RetryPolicy {
            attempts,
            per_try_timeout: per_try.map(Duration::from_millis),
            retry_on: Arc::new(on.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>()),
        }
    }

    #[test]
    fn retries_as_often_as_the_route_allows_then_stops() {
        let t0 = Instant::now();
        let mut a = Attempts::new(&policy(2, None, &["connect-failure"]), None, t0);
        assert_eq!(a.start(t0), (0, None));
        assert_eq!(a.after(Tried::ConnectFailure, t0, true), Next::Retry);
        assert_eq!(a.start(t0).0, 1);
        assert_eq!(a.after(Tried::ConnectFailure, t0, true), Next::Retry);
        assert_eq!(a.start(t0).0, 2);
        assert_eq!(
            a.after(Tried::ConnectFailure, t0, true),
            Next::Stop(Stop::Exhausted)
        );
    }

    #[test]
    fn no_retries_means_one_try() {
        let t0 = Instant::now();
        let mut a = Attempts::new(&policy(0, None, &["5xx"]), None, t0);
        a.start(t0);
        assert_eq!(
            a.after(Tried::Answered(503), t0, true),
            Next::Stop(Stop::Exhausted)
        );
    }

    #[test]
    fn only_the_outcomes_the_policy_names_are_retried() {
        let t0 = Instant::now();
        let mut a = Attempts::new(&RetryPolicy::default(), None, t0);
        a.start(t0);
        // Istio's default: connect failures and 503, not 500 or resets.
        assert_eq!(a.after(Tried::ConnectFailure, t0, true), Next::Retry);
        assert_eq!(a.after(Tried::Answered(503), t0, true), Next::Retry);
        for final_ in [
            Tried::Answered(200),
            Tried::Answered(500),
            Tried::Reset,
            Tried::Timeout,
        ] {
            assert_eq!(
                a.after(final_, t0, true),
                Next::Stop(Stop::Final),
                "{final_:?}"
            );
        }
        let g = Attempts::new(&policy(3, None, &["gateway-error"]), None, t0);
        assert_eq!(g.after(Tried::Timeout, t0, true), Next::Retry);
        assert_eq!(g.after(Tried::Answered(502), t0, true), Next::Retry);
        assert_eq!(g.after(Tried::Reset, t0, true), Next::Stop(Stop::Final));
    }

    #[test]
    fn the_route_timeout_caps_every_try_and_ends_retries() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut a = Attempts::new(&policy(5, Some(300), &["gateway-error"]), Some(ms(500)), t0);
        assert_eq!(a.deadline(), Some(t0 + ms(500)));
        // The per-try timeout while the route has more left ...
        assert_eq!(a.start(t0), (0, Some(ms(300))));
        assert_eq!(a.after(Tried::Timeout, t0 + ms(300), true), Next::Retry);
        // ... then what is left of the route's.
        assert_eq!(a.start(t0 + ms(300)), (1, Some(ms(200))));
        assert_eq!(
            a.after(Tried::Timeout, t0 + ms(500), true),
            Next::Stop(Stop::Deadline)
        );
        // Past the deadline, a try gets no time at all.
        assert_eq!(a.start(t0 + ms(600)).1, Some(Duration::ZERO));
        // The route's timeout alone bounds a try when no per-try is set.
        let mut b = Attempts::new(&policy(1, None, &["5xx"]), Some(ms(100)), t0);
        assert_eq!(b.start(t0 + ms(40)).1, Some(ms(60)));
    }

    #[test]
    fn retry_on_5xx_covers_every_5xx_connect_failures_resets_and_timeouts() {
        let t0 = Instant::now();
        let mut a = Attempts::new(&policy(3, None, &["5xx"]), None, t0);
        a.start(t0);
        for retried in [
            Tried::Answered(500),
            Tried::Answered(502),
            Tried::Answered(503),
            Tried::Answered(599),
            Tried::ConnectFailure,
            Tried::Reset,
            Tried::Timeout,
        ] {
            assert_eq!(a.after(retried, t0, true), Next::Retry, "{retried:?}");
        }
        for final_ in [
            Tried::Answered(200),
            Tried::Answered(404),
            Tried::Answered(409),
        ] {
            assert_eq!(
                a.after(final_, t0, true),
                Next::Stop(Stop::Final),
                "{final_:?}"
            );
        }
    }

    #[test]
    fn connect_failure_and_reset_retry_only_what_they_name() {
        let t0 = Instant::now();
        let mut c = Attempts::new(&policy(3, None, &["connect-failure"]), None, t0);
        c.start(t0);
        assert_eq!(c.after(Tried::ConnectFailure, t0, true), Next::Retry);
        for final_ in [Tried::Reset, Tried::Timeout, Tried::Answered(503)] {
            assert_eq!(
                c.after(final_, t0, true),
                Next::Stop(Stop::Final),
                "{final_:?}"
            );
        }
        let mut r = Attempts::new(&policy(3, None, &["reset"]), None, t0);
        r.start(t0);
        assert_eq!(r.after(Tried::Reset, t0, true), Next::Retry);
        for final_ in [Tried::ConnectFailure, Tried::Timeout, Tried::Answered(502)] {
            assert_eq!(
                r.after(final_, t0, true),
                Next::Stop(Stop::Final),
                "{final_:?}"
            );
        }
        // A status named by its code.
        let mut s = Attempts::new(&policy(3, None, &["429"]), None, t0);
        s.start(t0);
        assert_eq!(s.after(Tried::Answered(429), t0, true), Next::Retry);
        assert_eq!(
            s.after(Tried::Answered(503), t0, true),
            Next::Stop(Stop::Final)
        );
    }

    #[test]
    fn no_retry_once_the_route_timeout_passed_even_with_tries_left() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut a = Attempts::new(&policy(10, None, &["5xx"]), Some(ms(100)), t0);
        assert_eq!(a.start(t0), (0, Some(ms(100))));
        // Just before the deadline: another try, with what is left.
        assert_eq!(
            a.after(Tried::Answered(503), t0 + ms(99), true),
            Next::Retry
        );
        assert_eq!(a.start(t0 + ms(99)), (1, Some(ms(1))));
        // At it and after it: none.
        for at in [ms(100), ms(250)] {
            assert_eq!(
                a.after(Tried::Answered(503), t0 + at, true),
                Next::Stop(Stop::Deadline),
                "{at:?}"
            );
        }
        // An outcome the policy does not retry is final whatever the time.
        assert_eq!(
            a.after(Tried::Answered(200), t0 + ms(250), true),
            Next::Stop(Stop::Final)
        );
        // Without a route timeout, a try is bounded by its per-try timeout
        // alone, and time never ends the retries.
        let mut b = Attempts::new(&policy(1, Some(300), &["5xx"]), None, t0);
        assert_eq!(b.deadline(), None);
        assert_eq!(b.start(t0), (0, Some(ms(300))));
        assert_eq!(
            b.after(Tried::Timeout, t0 + Duration::from_secs(3600), true),
            Next::Retry
        );
    }

    #[test]
    fn a_streamed_body_is_not_sent_twice() {
        let t0 = Instant::now();
        let mut a = Attempts::new(&policy(2, None, &["5xx"]), None, t0);
        a.start(t0);
        assert_eq!(
            a.after(Tried::Answered(503), t0, false),
            Next::Stop(Stop::BodySpent)
        );
    }
}
