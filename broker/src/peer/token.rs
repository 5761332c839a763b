//! Peer tokens (pure but for the random secret): what one broker's operator
//! hands the other's, how it parses, and what the issuing broker keeps of it
//! and checks when the token comes back.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use strait_ca::TrustDomain;
use strait_ca::spiffe::SpiffeIdError;

pub const PEER_TOKEN_PREFIX: &str = "spt1.";
/// Upper bound on a peer token's length (it is pasted by hand).
pub const MAX_PEER_TOKEN_LEN: usize = 4096;

/// Why a text is not a peer token.
#[derive(Debug, thiserror::Error)]
pub enum PeerTokenError {
    #[error("peer token is {0} bytes long; at most {MAX_PEER_TOKEN_LEN} are accepted")]
    TooLong(usize),
    #[error("a peer token starts with {PEER_TOKEN_PREFIX:?}")]
    Prefix,
    #[error("peer token is not base64url: {0}")]
    Encoding(#[source] base64::DecodeError),
    #[error("peer token payload: {0}")]
    Payload(#[source] serde_json::Error),
    #[error("peer token trust domain {value:?}: {source}")]
    TrustDomain {
        value: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("peer token has no address")]
    NoAddress,
    #[error("peer token is malformed (root hash or id)")]
    Malformed,
}

/// Why the broker that issued a peer token refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("peer token is unknown to this broker")]
    Unknown,
    #[error("peer token secret does not match")]
    BadSecret,
    #[error("peer token has already been used")]
    Used,
    #[error("peer token expired")]
    Expired,
}

/// A peer token as pasted between operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerToken {
    /// Token id (16 hex).
    pub i: String,
    /// Issuing mesh name and trust domain.
    pub m: String,
    pub t: String,
    /// Its peer API addresses.
    pub a: Vec<String>,
    /// SHA-256 (lowercase hex) of its serving root.
    pub h: String,
    /// Secret (base64url, 32 bytes).
    pub s: String,
    /// Expiry (unix seconds).
    pub e: u64,
}

/// What a broker keeps of a token it issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTokenRecord {
    pub(crate) id: String,
    pub(crate) secret_sha256: String,
    pub(crate) expires_unix: u64,
    pub(crate) used: bool,
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    strait_ca::tls::sha256_hex(data)
}

fn random(bytes: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b
}

impl PeerToken {
    /// A new token of the mesh `mesh` (trust domain `td`) reachable at
    /// `addresses`, pinning `serving_root`, and the record its issuer keeps.
    pub fn generate(
        mesh: &str,
        td: &TrustDomain,
        addresses: Vec<String>,
        serving_root: &[u8],
        ttl: Duration,
        now_unix: u64,
    ) -> (PeerToken, PeerTokenRecord) {
        let id: String = random(8).iter().map(|b| format!("{b:02x}")).collect();
        let secret = random(32);
        let token = PeerToken {
            i: id.clone(),
            m: mesh.to_string(),
            t: td.to_string(),
            a: addresses,
            h: sha256_hex(serving_root),
            s: URL_SAFE_NO_PAD.encode(&secret),
            e: now_unix.saturating_add(ttl.as_secs()),
        };
        let record = PeerTokenRecord {
            id,
            secret_sha256: sha256_hex(&secret),
            expires_unix: token.e,
            used: false,
        };
        (token, record)
    }

    pub fn encode(&self) -> String {
        format!(
            "{PEER_TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
        )
    }

    /// Parses a token from untrusted text.
    pub fn parse(text: &str) -> Result<Self, PeerTokenError> {
        let text = text.trim();
        if text.len() > MAX_PEER_TOKEN_LEN {
            return Err(PeerTokenError::TooLong(text.len()));
        }
        let body = text
            .strip_prefix(PEER_TOKEN_PREFIX)
            .ok_or(PeerTokenError::Prefix)?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(PeerTokenError::Encoding)?;
        let t: PeerToken = serde_json::from_slice(&raw).map_err(PeerTokenError::Payload)?;
        TrustDomain::new(&t.t).map_err(|source| PeerTokenError::TrustDomain {
            value: t.t.clone(),
            source,
        })?;
        if t.a.is_empty() {
            return Err(PeerTokenError::NoAddress);
        }
        if t.h.len() != 64 || t.i.len() != 16 {
            return Err(PeerTokenError::Malformed);
        }
        Ok(t)
    }
}

impl PeerTokenRecord {
    /// The record of `token` once spent: secret `secret`, presented.
    pub fn spent(token: &PeerToken, secret: &[u8]) -> Self {
        PeerTokenRecord {
            id: token.i.clone(),
            secret_sha256: sha256_hex(secret),
            expires_unix: token.e,
            used: true,
        }
    }

    /// Whether a token with secret digest `secret_sha256` may be spent at
    /// `now_unix`.
    pub fn admit(&self, secret_sha256: &str, now_unix: u64) -> Result<(), TokenRefusal> {
        if self.secret_sha256 != secret_sha256 {
            return Err(TokenRefusal::BadSecret);
        }
        if self.used {
            return Err(TokenRefusal::Used);
        }
        if now_unix >= self.expires_unix {
            return Err(TokenRefusal::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("a.example").unwrap()
    }

    #[test]
    fn a_generated_token_parses_back_and_its_record_admits_it_once() {
        let (token, record) = PeerToken::generate(
            "mesh-a",
            &td(),
            vec!["127.0.0.1:15012".into()],
            b"root",
            Duration::from_secs(60),
            1000,
        );
        let parsed = PeerToken::parse(&format!("  {}\n", token.encode())).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.e, 1060);
        let secret = URL_SAFE_NO_PAD.decode(&parsed.s).unwrap();
        assert_eq!(record.admit(&sha256_hex(&secret), 1059), Ok(()));
        assert_eq!(
            record.admit(&sha256_hex(b"other"), 1059),
            Err(TokenRefusal::BadSecret)
        );
        assert_eq!(
            record.admit(&sha256_hex(&secret), 1060),
            Err(TokenRefusal::Expired)
        );
        let spent = PeerTokenRecord::spent(&parsed, &secret);
        assert!(spent.used);
        assert_eq!(
            spent.admit(&sha256_hex(&secret), 1000),
            Err(TokenRefusal::Used)
        );
    }

    #[test]
    fn parse_names_what_is_wrong() {
        let (token, _) =
            PeerToken::generate("m", &td(), vec!["a:1".into()], b"r", Duration::ZERO, 0);
        let with = |f: &dyn Fn(&mut PeerToken)| {
            let mut t = token.clone();
            f(&mut t);
            PeerToken::parse(&t.encode())
        };
        assert!(matches!(
            PeerToken::parse("sjt1.abc"),
            Err(PeerTokenError::Prefix)
        ));
        assert!(matches!(
            PeerToken::parse(&"x".repeat(5000)),
            Err(PeerTokenError::TooLong(5000))
        ));
        assert!(matches!(
            PeerToken::parse("spt1.!!"),
            Err(PeerTokenError::Encoding(_))
        ));
        assert!(matches!(
            PeerToken::parse("spt1.e30"),
            Err(PeerTokenError::Payload(_))
        ));
        let bad_td = with(&|t| t.t = "Not A Domain".into()).unwrap_err();
        assert!(bad_td.to_string().contains("\"Not A Domain\""), "{bad_td}");
        assert!(matches!(
            with(&|t| t.a.clear()),
            Err(PeerTokenError::NoAddress)
        ));
        assert!(matches!(
            with(&|t| t.h.truncate(10)),
            Err(PeerTokenError::Malformed)
        ));
    }
}
