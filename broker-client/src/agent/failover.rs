//! Which broker address to try next (pure): round robin over the addresses
//! of `broker.json`, each round starting from the one that last worked.

/// Which of a cluster's broker addresses (replicas of one broker) the agent
/// tries next, free of I/O: addresses are indexes into the list of
/// `broker.json`, whose length comes in as an argument.
///
/// An attempt that fails (the stream does not open, or ends with an error)
/// moves on to the next address at once; once every address failed since
/// the round began, the round is over: the caller backs off
/// ([`super::Backoff`]) and the next round starts again from the address
/// that last opened a stream. So a dead first replica costs one failed
/// attempt (one connect timeout at most) when the agent first meets it,
/// not one per reconnection: later rounds start at the replica that
/// answered.
///
/// A stream the broker closed cleanly, or a broker refusing this cluster
/// (revoked: every replica says the same), is no reason to move: the round
/// ends and the same address is tried again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failover {
    /// The address that last opened a stream: where rounds start.
    home: usize,
    /// The address tried now.
    current: usize,
    /// How many attempts failed since the round began.
    failed: usize,
}

impl Failover {
    /// The address to try now, of `len`.
    pub fn current(&self, len: usize) -> usize {
        self.current.checked_rem(len).unwrap_or(0)
    }

    /// Whether the next attempt begins a round (nothing failed since the
    /// last one ended): the caller starts its back-off clock then.
    pub fn round_begins(&self) -> bool {
        self.failed == 0
    }

    /// A stream opened on the current address: rounds start from it now.
    pub fn opened(&mut self, len: usize) {
        self.home = self.current(len);
        self.current = self.home;
        self.failed = 0;
    }

    /// The attempt on the current address ended with no reason to move
    /// (the broker closed the stream cleanly, or refuses this cluster):
    /// the round is over; the next one starts at the same address.
    pub fn ended(&mut self, len: usize) {
        self.current = self.current(len);
        self.failed = 0;
    }

    /// The attempt on the current address of `len` failed (the stream did
    /// not open, or ended with an error). Returns whether that ends the
    /// round (every address failed since it began: back off, then start
    /// again from the one that last worked); otherwise the next address is
    /// to be tried at once.
    pub fn failed(&mut self, len: usize) -> bool {
        self.failed += 1;
        if self.failed >= len {
            self.failed = 0;
            self.current = self.home.checked_rem(len).unwrap_or(0);
            true
        } else {
            self.current = (self.current(len) + 1) % len;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The addresses tried, and whether each failure ended a round, for
    /// attempts that all fail.
    fn fail_all(f: &mut Failover, len: usize, n: usize) -> Vec<(usize, bool)> {
        (0..n)
            .map(|_| {
                let at = f.current(len);
                (at, f.failed(len))
            })
            .collect()
    }

    #[test]
    fn one_address_backs_off_after_every_failure() {
        let mut f = Failover::default();
        assert_eq!(fail_all(&mut f, 1, 3), [(0, true), (0, true), (0, true)]);
    }

    #[test]
    fn a_round_tries_every_address_once_then_backs_off() {
        let mut f = Failover::default();
        assert!(f.round_begins());
        assert_eq!(
            fail_all(&mut f, 3, 6),
            [
                (0, false),
                (1, false),
                (2, true),
                (0, false),
                (1, false),
                (2, true)
            ]
        );
        assert!(f.round_begins());
    }

    #[test]
    fn a_dead_first_replica_is_tried_once_not_at_every_reconnection() {
        let mut f = Failover::default();
        // 0 is dead; 1 answers.
        assert_eq!(fail_all(&mut f, 3, 1), [(0, false)]);
        assert!(!f.round_begins(), "1 is tried at once, no back-off");
        assert_eq!(f.current(3), 1);
        f.opened(3);
        // The stream on 1 is closed by the broker (a restart): 1 again.
        f.ended(3);
        assert_eq!(f.current(3), 1);
        f.opened(3);
        // Then it ends with an error: 2, then 0, then the round is over
        // and the next starts at 1, the one that last worked.
        assert_eq!(fail_all(&mut f, 3, 3), [(1, false), (2, false), (0, true)]);
        assert_eq!(f.current(3), 1);
    }

    #[test]
    fn a_refusal_stays_on_the_address() {
        let mut f = Failover::default();
        fail_all(&mut f, 2, 1);
        assert_eq!(f.current(2), 1);
        // 1 refuses this cluster (revoked): no move, the round is over.
        f.ended(2);
        assert!(f.round_begins());
        assert_eq!(f.current(2), 1);
    }

    #[test]
    fn a_shorter_list_keeps_the_index_in_range() {
        let mut f = Failover::default();
        fail_all(&mut f, 3, 2);
        assert_eq!(f.current(3), 2);
        assert_eq!(f.current(2), 0);
        assert_eq!(f.current(0), 0);
        assert!(f.failed(2), "two of two failed in this round");
        assert!(f.failed(0));
    }
}
