//! Live connections under changing trust: every mTLS connection the
//! sidecar holds (inbound from peers, pooled outbound to upstreams) runs
//! under [`guard`], which ends it once a change of the trust (a deny-listed
//! intermediate, a root removed by a rotation's finish, a peered mesh
//! removed) makes the peer's chain fail verification. The decision is
//! [`strait_ca::live::PeerChain::recheck`]; this only wires it to the
//! connection tasks, the log and the metric.

use std::future::Future;

use prometheus_client::metrics::counter::Counter;
use strait_ca::live::{PeerChain, TrustWatch};

/// A live connection's peer chain and what ends the connection when the
/// chain stops verifying.
pub(crate) struct Watched {
    watch: TrustWatch,
    peer: Option<PeerChain>,
    direction: &'static str,
    closed: Counter,
}

impl Watched {
    /// `watch` taken before the handshake that verified `peer`; closes are
    /// counted in `metrics` under `direction`.
    pub(crate) fn new(
        metrics: &crate::metrics::Metrics,
        direction: &'static str,
        watch: TrustWatch,
        peer: Option<PeerChain>,
    ) -> Self {
        let closed = metrics
            .untrusted_closed
            .get_or_create(&crate::metrics::DirectionLabel { direction })
            .clone();
        Watched {
            watch,
            peer,
            direction,
            closed,
        }
    }

    /// Runs `conn` (a connection's task) under `watched` (see [`guard`]),
    /// or plainly without.
    pub(crate) async fn run<T>(
        watched: Option<Watched>,
        conn: impl Future<Output = T>,
    ) -> Option<T> {
        match watched {
            Some(w) => guard(w.watch, w.peer, w.direction, w.closed, conn).await,
            None => Some(conn.await),
        }
    }
}

/// Runs `conn` to its end, or until the trust `watch` follows changes so
/// that `peer` no longer verifies: then `conn` is dropped (which closes the
/// connection and fails what is in flight on it), logged with the peer's
/// identity and the reason, and counted in `closed`. `None` when it was
/// closed so. Without a peer chain (plaintext, anonymous) only `conn`
/// decides.
pub(crate) async fn guard<T>(
    watch: TrustWatch,
    peer: Option<PeerChain>,
    direction: &'static str,
    closed: Counter,
    conn: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        t = conn => Some(t),
        reason = watch.untrusted_opt(peer.as_ref()) => {
            closed.inc();
            tracing::info!(
                direction,
                peer = peer.as_ref().map_or("unknown", PeerChain::identity),
                %reason,
                "closing a live connection: its peer no longer verifies under the new trust"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use strait_ca::testing::TestPki;
    use strait_ca::tls::Trust;

    use super::*;

    #[tokio::test]
    async fn a_revoked_peer_ends_the_connection_and_is_counted() {
        let pki = TestPki::new("td");
        let chain = pki.leaf_chain("spiffe://td/ns/a/sa/b");
        let trust = Trust::new(pki.bundle());
        let peer = PeerChain::new(chain.clone(), time::OffsetDateTime::now_utc());
        let closed = Counter::default();
        let (_keep, never) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(guard(
            TrustWatch::new(&trust),
            Some(peer),
            "inbound",
            closed.clone(),
            never,
        ));
        trust.set_denied([strait_ca::cert::fingerprint_sha256(&chain[1])]);
        let out = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(out.is_none(), "closed by the trust change");
        assert_eq!(closed.get(), 1);
    }

    #[tokio::test]
    async fn a_connection_that_ends_is_not_counted() {
        let pki = TestPki::new("td");
        let trust = Trust::new(pki.bundle());
        let closed = Counter::default();
        let out = guard(
            TrustWatch::new(&trust),
            None,
            "outbound",
            closed.clone(),
            async { 7 },
        )
        .await;
        assert_eq!(out, Some(7));
        assert_eq!(closed.get(), 0);
    }
}
