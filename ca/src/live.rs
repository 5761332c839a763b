//! Live connections under changing trust. A TLS handshake verifies the
//! peer's chain once; a deny-listed intermediate, a root removed at the end
//! of a rotation or a peered mesh removed must also end the connections
//! that were verified before. Each connection keeps its peer's chain
//! ([`PeerChain`]) and a [`TrustWatch`] taken before its handshake; when the
//! [`Trust`] changes, the chain is verified again ([`PeerChain::recheck`],
//! pure) and the connection ends itself once it no longer verifies.
//!
//! The chain is checked again as of the handshake's time: only a change of
//! trust ends a connection here, not the leaf's expiry while it is open
//! (TLS peers do not present certificates again either).
//!
//! ```ignore
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use strait_ca::live::{PeerChain, TrustWatch};
//! use strait_ca::tls::Trust;
//! # let pki = strait_ca::testing::TestPki::new("td");
//! # let chain = pki.leaf_chain("spiffe://td/ns/a/sa/b");
//! let trust = Trust::new(pki.bundle());
//! let watch = TrustWatch::new(&trust); // before the handshake
//! // ... the handshake verified `chain` ...
//! let peer = PeerChain::new(chain.clone(), time::OffsetDateTime::now_utc());
//! trust.set_denied([strait_ca::cert::fingerprint_sha256(&chain[1])]);
//! let reason = watch.untrusted(&peer).await;
//! assert!(reason.contains("revoked"));
//! # });
//! ```

use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::tls::Trust;

/// The chain a peer presented in its handshake, kept to be verified again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChain {
    chain: Vec<Vec<u8>>,
    identity: String,
    verified_at: OffsetDateTime,
}

impl PeerChain {
    /// `chain` (leaf first) as verified at `verified_at`.
    pub fn new(chain: Vec<Vec<u8>>, verified_at: OffsetDateTime) -> Self {
        let identity = chain
            .first()
            .and_then(|leaf| crate::cert::CertSummary::from_der(leaf).ok())
            .and_then(|s| s.spiffe_id)
            .unwrap_or_else(|| "unknown".to_string());
        PeerChain {
            chain,
            identity,
            verified_at,
        }
    }

    /// The chain a TLS session saw, verified now; `None` without one.
    pub fn from_certs(certs: &[CertificateDer<'_>]) -> Option<Self> {
        if certs.is_empty() {
            return None;
        }
        let chain = certs.iter().map(|c| c.as_ref().to_vec()).collect();
        Some(PeerChain::new(chain, OffsetDateTime::now_utc()))
    }

    /// The SPIFFE ID in the leaf (`unknown` when it has none), for logs.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether the chain still verifies under `trust` (as of its
    /// handshake); `Err` says why not.
    pub fn recheck(&self, trust: &Trust) -> Result<(), crate::tls::TrustError> {
        trust.verify(&self.chain, self.verified_at).map(|_| ())
    }
}

/// Changes of one [`Trust`], seen from before a handshake so that a change
/// during it is not missed.
#[derive(Debug)]
pub struct TrustWatch {
    trust: Trust,
    changes: watch::Receiver<u64>,
}

impl TrustWatch {
    /// Watches `trust` from now on: take it before the handshake whose peer
    /// is to be watched.
    pub fn new(trust: &Trust) -> Self {
        TrustWatch {
            trust: trust.clone(),
            changes: trust.changes(),
        }
    }

    /// Resolves, with the reason, once a change of the trust makes `peer`
    /// fail verification; pending for as long as it verifies.
    pub async fn untrusted(mut self, peer: &PeerChain) -> String {
        loop {
            if self.changes.changed().await.is_err() {
                // The trust is gone (it cannot be while `self.trust` holds
                // it); nothing will change any more.
                return std::future::pending().await;
            }
            self.changes.borrow_and_update();
            if let Err(reason) = peer.recheck(&self.trust) {
                return reason.to_string();
            }
        }
    }

    /// [`TrustWatch::untrusted`] when there is a peer chain; pending forever
    /// without one (a plaintext or anonymous peer has nothing to revoke).
    pub async fn untrusted_opt(self, peer: Option<&PeerChain>) -> String {
        match peer {
            Some(p) => self.untrusted(p).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use crate::cert::fingerprint_sha256;
    use crate::testing::TestPki;

    fn peer(pki: &TestPki, id: &str) -> (PeerChain, Vec<Vec<u8>>) {
        let chain = pki.leaf_chain(id);
        (
            PeerChain::new(chain.clone(), OffsetDateTime::now_utc()),
            chain,
        )
    }

    #[test]
    fn verified_under_a_and_not_under_b() {
        let a = TestPki::new("td");
        let (p, chain) = peer(&a, "spiffe://td/ns/a/sa/b");
        assert_eq!(p.identity(), "spiffe://td/ns/a/sa/b");
        let trust = Trust::new(a.bundle());
        assert_eq!(p.recheck(&trust), Ok(()));
        // The intermediate deny-listed.
        trust.set_denied([fingerprint_sha256(&chain[1])]);
        assert!(matches!(
            p.recheck(&trust),
            Err(crate::tls::TrustError::Revoked { .. })
        ));
        trust.set_denied([]);
        assert_eq!(p.recheck(&trust), Ok(()));
        // Another intermediate deny-listed: still fine.
        let other = TestPki::new("td");
        trust.set_denied([fingerprint_sha256(&other.leaf_chain("spiffe://td/x")[1])]);
        assert_eq!(p.recheck(&trust), Ok(()));
        // The root removed (a rotation's finish): refused.
        trust.set_bundle(other.bundle());
        assert!(p.recheck(&trust).is_err());
    }

    #[test]
    fn a_removed_peer_mesh_is_refused() {
        let own = TestPki::new("own.example");
        let remote = TestPki::new("peer.example");
        let (p, _) = peer(&remote, "spiffe://peer.example/ns/a/sa/b");
        let trust = Trust::new(own.bundle());
        trust.set_federated([("peer.example".to_string(), remote.bundle())]);
        assert_eq!(p.recheck(&trust), Ok(()));
        trust.set_federated([]);
        assert!(p.recheck(&trust).is_err());
    }

    #[test]
    fn rechecked_as_of_the_handshake() {
        let a = TestPki::new("td");
        let chain = a.leaf_chain("spiffe://td/ns/a/sa/b");
        let trust = Trust::new(a.bundle());
        // Verified long after the leaf expired: refused, so the time of the
        // check is the handshake's, not the clock's.
        let later = PeerChain::new(
            chain.clone(),
            OffsetDateTime::now_utc() + time::Duration::days(3650),
        );
        assert!(later.recheck(&trust).is_err());
        let now = PeerChain::new(chain, OffsetDateTime::now_utc());
        assert_eq!(now.recheck(&trust), Ok(()));
    }

    #[test]
    fn no_chain_no_peer() {
        assert!(PeerChain::from_certs(&[]).is_none());
        let p = PeerChain::new(
            vec![b"not a certificate".to_vec()],
            OffsetDateTime::now_utc(),
        );
        assert_eq!(p.identity(), "unknown");
        assert!(p.recheck(&Trust::default()).is_err());
    }

    #[tokio::test]
    async fn untrusted_waits_for_a_change_that_matters() {
        let a = TestPki::new("td");
        let (p, chain) = peer(&a, "spiffe://td/ns/a/sa/b");
        let trust = Trust::new(a.bundle());
        let watch = TrustWatch::new(&trust);
        let task = tokio::spawn(async move { watch.untrusted(&p).await });
        // A change that leaves the chain valid: still waiting.
        trust.set_denied(["00".to_string()]);
        tokio::task::yield_now().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), async {
                while !task.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_err()
        );
        trust.set_denied([fingerprint_sha256(&chain[1])]);
        let reason = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(reason.contains("revoked"), "{reason}");
    }

    #[tokio::test]
    async fn a_change_during_the_handshake_is_seen() {
        let a = TestPki::new("td");
        let (p, chain) = peer(&a, "spiffe://td/ns/a/sa/b");
        let trust = Trust::new(a.bundle());
        let watch = TrustWatch::new(&trust);
        // Changed after the watch was taken, before anyone waits on it.
        trust.set_denied([fingerprint_sha256(&chain[1])]);
        let reason = tokio::time::timeout(Duration::from_secs(5), watch.untrusted(&p))
            .await
            .unwrap();
        assert!(reason.contains("revoked"));
        // Without a chain nothing ends.
        let watch = TrustWatch::new(&trust);
        trust.set_denied([]);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), watch.untrusted_opt(None))
                .await
                .is_err()
        );
    }
}
