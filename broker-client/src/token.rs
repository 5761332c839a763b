//! Join tokens: how a new cluster proves it may join, and how it knows it
//! is talking to the right broker.
//!
//! A token names the cluster, carries the broker's address(es), the SHA-256
//! of the broker's root certificate (the joiner pins it, as kubeadm pins its
//! discovery hash) and a secret. The broker stores only the secret's SHA-256;
//! a token is single-use and expires (one hour by default).
//!
//! Wire form: `sjt1.` followed by unpadded base64url of a small JSON object.
//! Everything here is pure (time is an argument) and fuzzable.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use strait_ca::ClusterName;
use strait_ca::spiffe::SpiffeIdError;

/// The prefix that marks a strait join token, versioned.
pub const PREFIX: &str = "sjt1.";
/// Default token lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Upper bound on a token's length (it is pasted by hand).
pub const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token must start with {PREFIX:?}")]
    Prefix,
    #[error("join token is {0} bytes long; at most {MAX_TOKEN_LEN} are accepted")]
    TooLong(usize),
    #[error("join token is not valid base64url: {0}")]
    Encoding(#[source] base64::DecodeError),
    #[error("join token payload is malformed: {0}")]
    Payload(String),
    #[error("join token names an invalid cluster {value:?}: {source}")]
    Cluster {
        value: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("join token has no broker address")]
    NoAddress,
    #[error("join token root hash must be 64 hex digits")]
    RootHash,
    #[error("join token secret must be 32 bytes of base64url")]
    Secret,
    #[error("join token is unknown to this broker")]
    Unknown,
    #[error("join token has already been used")]
    Reused,
    #[error("join token expired at unix time {0}")]
    Expired(u64),
    #[error("join token secret does not match")]
    BadSecret,
    #[error("join token is for cluster {token:?}, but the CSR is for {csr:?}")]
    WrongCluster { token: String, csr: String },
    #[error(
        "the broker's root does not match the token's pinned hash (expected {expected}, got {actual})"
    )]
    RootMismatch { expected: String, actual: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Payload {
    /// Token id (public, 16 hex chars): the store key.
    i: String,
    /// Cluster name.
    c: String,
    /// Broker addresses, `host:port`.
    a: Vec<String>,
    /// SHA-256 of the broker root's DER, lowercase hex.
    h: String,
    /// Secret, base64url of 32 random bytes.
    s: String,
    /// Expiry, unix seconds.
    e: u64,
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub cluster: ClusterName,
    pub addresses: Vec<String>,
    pub root_sha256: String,
    secret: Vec<u8>,
    pub expires_unix: u64,
}

/// What the broker keeps of a token it issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub cluster: String,
    pub network: String,
    pub locality: String,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_sha256: String,
    pub expires_unix: u64,
    pub used: bool,
}

/// Compares without an early exit. (Both sides are digests of the secret, so
/// a timing difference would leak little anyway.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a root certificate as the token pins it.
pub fn root_pin(root_der: &[u8]) -> String {
    sha256_hex(root_der)
}

impl JoinToken {
    /// Makes a new token and the record the broker stores for it.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        cluster: &ClusterName,
        network: &str,
        locality: &str,
        addresses: Vec<String>,
        root_der: &[u8],
        ttl: Duration,
        now_unix: u64,
        rng: &dyn ring::rand::SecureRandom,
    ) -> Result<(JoinToken, TokenRecord), TokenError> {
        if addresses.is_empty() {
            return Err(TokenError::NoAddress);
        }
        let mut id = [0u8; 8];
        let mut secret = vec![0u8; 32];
        rng.fill(&mut id).map_err(|_| TokenError::Secret)?;
        rng.fill(&mut secret).map_err(|_| TokenError::Secret)?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let token = JoinToken {
            id: id.clone(),
            cluster: cluster.clone(),
            addresses,
            root_sha256: root_pin(root_der),
            secret: secret.clone(),
            expires_unix: now_unix.saturating_add(ttl.as_secs()),
        };
        let record = TokenRecord {
            id,
            cluster: cluster.to_string(),
            network: network.to_string(),
            locality: locality.to_string(),
            secret_sha256: sha256_hex(&secret),
            expires_unix: token.expires_unix,
            used: false,
        };
        Ok((token, record))
    }

    /// Parses a token from untrusted text.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(text.len()));
        }
        let body = text.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(TokenError::Encoding)?;
        let p: Payload =
            serde_json::from_slice(&json).map_err(|e| TokenError::Payload(e.to_string()))?;
        if p.i.len() != 16 || !p.i.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Payload("token id must be 16 hex digits".into()));
        }
        let cluster = ClusterName::new(&p.c).map_err(|source| TokenError::Cluster {
            value: p.c.clone(),
            source,
        })?;
        if p.a.is_empty() || p.a.iter().any(|a| a.is_empty() || a.len() > 255) {
            return Err(TokenError::NoAddress);
        }
        if p.h.len() != 64 || !p.h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::RootHash);
        }
        let secret = URL_SAFE_NO_PAD
            .decode(&p.s)
            .map_err(|_| TokenError::Secret)?;
        if secret.len() != 32 {
            return Err(TokenError::Secret);
        }
        Ok(JoinToken {
            id: p.i.to_ascii_lowercase(),
            cluster,
            addresses: p.a,
            root_sha256: p.h.to_ascii_lowercase(),
            secret,
            expires_unix: p.e,
        })
    }

    /// The token as the operator pastes it.
    pub fn encode(&self) -> String {
        let p = Payload {
            i: self.id.clone(),
            c: self.cluster.to_string(),
            a: self.addresses.clone(),
            h: self.root_sha256.clone(),
            s: URL_SAFE_NO_PAD.encode(&self.secret),
            e: self.expires_unix,
        };
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&p).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// The joiner's check of the broker: its root must hash to the pin.
    pub fn check_root(&self, root_der: &[u8]) -> Result<(), TokenError> {
        let actual = root_pin(root_der);
        if actual == self.root_sha256 {
            Ok(())
        } else {
            Err(TokenError::RootMismatch {
                expected: self.root_sha256.clone(),
                actual,
            })
        }
    }
}

impl TokenRecord {
    /// The broker's check of a presented token for a CSR naming `csr_cluster`.
    pub fn admit(
        &self,
        presented: &JoinToken,
        csr_cluster: &str,
        now_unix: u64,
    ) -> Result<(), TokenError> {
        if presented.id != self.id {
            return Err(TokenError::Unknown);
        }
        let presented_hash = sha256_hex(&presented.secret);
        if !constant_time_eq(presented_hash.as_bytes(), self.secret_sha256.as_bytes()) {
            return Err(TokenError::BadSecret);
        }
        if self.used {
            return Err(TokenError::Reused);
        }
        if now_unix >= self.expires_unix {
            return Err(TokenError::Expired(self.expires_unix));
        }
        if csr_cluster != self.cluster || presented.cluster.as_str() != self.cluster {
            return Err(TokenError::WrongCluster {
                token: self.cluster.clone(),
                csr: csr_cluster.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn make(cluster: &str) -> (JoinToken, TokenRecord) {
        JoinToken::generate(
            &ClusterName::new(cluster).unwrap(),
            "net-east",
            "us-east/a",
            vec!["127.0.0.1:15011".into()],
            b"root der",
            DEFAULT_TTL,
            NOW,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let (token, record) = make("east");
        let text = token.encode();
        assert!(text.starts_with(PREFIX));
        let parsed = JoinToken::parse(&format!("  {text}\n")).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(record.expires_unix, NOW + 3600);
        assert!(record.admit(&parsed, "east", NOW).is_ok());
        assert!(parsed.check_root(b"root der").is_ok());
    }

    #[test]
    fn refusals() {
        let (token, record) = make("east");
        assert_eq!(
            record.admit(&token, "west", NOW),
            Err(TokenError::WrongCluster {
                token: "east".into(),
                csr: "west".into()
            })
        );
        assert_eq!(
            record.admit(&token, "east", NOW + 3600),
            Err(TokenError::Expired(NOW + 3600))
        );
        let used = TokenRecord {
            used: true,
            ..record.clone()
        };
        assert_eq!(used.admit(&token, "east", NOW), Err(TokenError::Reused));
        let (other, _) = make("east");
        assert_eq!(record.admit(&other, "east", NOW), Err(TokenError::Unknown));
        let forged = JoinToken {
            secret: vec![0; 32],
            ..token.clone()
        };
        assert_eq!(
            record.admit(&forged, "east", NOW),
            Err(TokenError::BadSecret)
        );
        assert!(matches!(
            token.check_root(b"another root"),
            Err(TokenError::RootMismatch { .. })
        ));
    }

    #[test]
    fn parse_rejects_bad_shapes() {
        let (token, _) = make("east");
        let good = token.encode();
        let body = |json: &str| format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let secret = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let hash = "a".repeat(64);
        let cases: Vec<(String, TokenError)> = vec![
            (good.replacen("sjt1.", "sjt2.", 1), TokenError::Prefix),
            ("".into(), TokenError::Prefix),
            (
                format!("{PREFIX}!!!"),
                TokenError::Encoding(base64::DecodeError::InvalidLength(0)),
            ),
            (body("{}"), TokenError::Payload(String::new())),
            (body("[1,2]"), TokenError::Payload(String::new())),
            (
                body(&format!(
                    r#"{{"i":"xyz","c":"east","a":["b:1"],"h":"{hash}","s":"{secret}","e":1}}"#
                )),
                TokenError::Payload(String::new()),
            ),
            (
                body(&format!(
                    r#"{{"i":"0011223344556677","c":"East","a":["b:1"],"h":"{hash}","s":"{secret}","e":1}}"#
                )),
                TokenError::Cluster {
                    value: String::new(),
                    source: SpiffeIdError::Empty,
                },
            ),
            (
                body(&format!(
                    r#"{{"i":"0011223344556677","c":"east","a":[],"h":"{hash}","s":"{secret}","e":1}}"#
                )),
                TokenError::NoAddress,
            ),
            (
                body(&format!(
                    r#"{{"i":"0011223344556677","c":"east","a":["b:1"],"h":"abc","s":"{secret}","e":1}}"#
                )),
                TokenError::RootHash,
            ),
            (
                body(&format!(
                    r#"{{"i":"0011223344556677","c":"east","a":["b:1"],"h":"{hash}","s":"AAAA","e":1}}"#
                )),
                TokenError::Secret,
            ),
            (
                "x".repeat(MAX_TOKEN_LEN + 1),
                TokenError::TooLong(MAX_TOKEN_LEN + 1),
            ),
        ];
        for (text, want) in cases {
            let got = JoinToken::parse(&text).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{text}: {got}"
            );
        }
    }
}
