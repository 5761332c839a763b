//! Workload bootstrap tokens: how a proxy without a certificate proves which
//! service account it runs as, once, to get its first certificate.
//!
//! Wire form: `swt1.<claims>.<mac>`, where `<claims>` is unpadded base64url
//! of a JSON object `{"ns","sa","workload","exp","iat"}` and `<mac>` is
//! unpadded base64url of HMAC-SHA256 over `swt1.<claims>` under a 32-byte
//! key that only the control plane holds. The MAC is checked before the
//! claims are parsed, so JSON from an unauthenticated caller is never looked
//! at. A token is good until `exp` (a restarted proxy presents it again), so
//! its TTL is the operator's bound on how long a leaked token is useful.
//!
//! Everything but [`TokenIssuer::load_or_create`] is pure: time is an
//! argument.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use strait_ca::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

/// The prefix that marks a strait workload token, versioned.
pub const PREFIX: &str = "swt1.";
/// Upper bound on a token's length; real ones are under 300 bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// The name of the token key file in the control plane's state directory.
pub const TOKEN_KEY_FILE: &str = "workload-token.key";
/// Length of the HMAC key.
pub const KEY_LEN: usize = 32;
/// How long after issuance a token may still be used by default.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

const MAC_LEN: usize = 32;

/// Why a token was refused (or could not be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("workload token must start with {PREFIX:?}")]
    Prefix,
    #[error("workload token is {0} bytes long; at most {MAX_TOKEN_LEN} are accepted")]
    TooLong(usize),
    #[error("workload token must have two '.'-separated parts after {PREFIX:?} (claims and MAC)")]
    Shape,
    #[error("workload token {part} is not valid unpadded base64url: {error}")]
    Base64 { part: &'static str, error: String },
    #[error("workload token MAC is {0} bytes; {MAC_LEN} expected")]
    MacLength(usize),
    #[error("workload token signature does not verify (forged, or made with another key)")]
    BadSignature,
    #[error("workload token claims are not valid JSON: {0}")]
    Json(String),
    #[error("workload token namespace {0:?} is not a Kubernetes namespace name (DNS label)")]
    Namespace(String),
    #[error(
        "workload token service account {0:?} is not a Kubernetes service account name (DNS subdomain)"
    )]
    ServiceAccount(String),
    #[error("workload token workload name {0:?} is not a Kubernetes object name (DNS subdomain)")]
    Workload(String),
    #[error("workload token was issued at unix time {iat} but expires at {exp}, before it")]
    Window { iat: u64, exp: u64 },
    #[error("workload token expired at unix time {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("workload token TTL must be longer than zero")]
    ZeroTtl,
}

/// What a token says: who the workload is and until when the token is good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Kubernetes namespace.
    pub ns: String,
    /// Kubernetes service account.
    pub sa: String,
    /// The workload (pod or deployment) the token was made for; for logs.
    pub workload: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issuance, unix seconds.
    pub iat: u64,
}

impl Claims {
    /// Parses and validates claims from JSON (only after the MAC verified).
    pub fn from_json(json: &[u8]) -> Result<Self, TokenError> {
        let claims: Claims =
            serde_json::from_slice(json).map_err(|e| TokenError::Json(e.to_string()))?;
        claims.validate()?;
        Ok(claims)
    }

    /// Checks the names and the time window.
    pub fn validate(&self) -> Result<(), TokenError> {
        if !is_dns_label(&self.ns) {
            return Err(TokenError::Namespace(self.ns.clone()));
        }
        if !is_dns_subdomain(&self.sa) {
            return Err(TokenError::ServiceAccount(self.sa.clone()));
        }
        if !is_dns_subdomain(&self.workload) {
            return Err(TokenError::Workload(self.workload.clone()));
        }
        if self.exp <= self.iat {
            return Err(TokenError::Window {
                iat: self.iat,
                exp: self.exp,
            });
        }
        Ok(())
    }

    /// The identity the token entitles to: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, td: &TrustDomain) -> Result<SpiffeId, TokenError> {
        // Validated names are valid SPIFFE path segments, so this only fails
        // on claims that skipped `validate`.
        SpiffeId::workload(td, &self.ns, &self.sa)
            .map_err(|_| TokenError::ServiceAccount(self.sa.clone()))
    }
}

/// Why the token key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("token key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token key {path}: {source}")]
    Write {
        path: PathBuf,
        source: Box<strait_ca::layout::LayoutError>,
    },
    #[error("token key {path} must hold {KEY_LEN} bytes of base64url; {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("no system randomness for the token key")]
    Random,
}

/// Makes and checks workload tokens with the control plane's key.
pub struct TokenIssuer {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenIssuer")
    }
}

impl TokenIssuer {
    /// An issuer with a given key (tests, fuzzing; production uses
    /// [`TokenIssuer::load_or_create`]).
    pub fn from_key(key: &[u8; KEY_LEN]) -> Self {
        TokenIssuer {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// Loads the key from `path` (base64url text), or creates it (mode
    /// 0600, parent directories too) with fresh randomness when missing.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenKeyError> {
        match std::fs::read(path) {
            Ok(data) => return Self::from_file_contents(path, &data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TokenKeyError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        let mut key = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| TokenKeyError::Random)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            strait_ca::layout::ensure_dir(dir).map_err(|source| TokenKeyError::Write {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        }
        let text = format!("{}\n", URL_SAFE_NO_PAD.encode(key));
        match strait_ca::layout::write_key(path, &text, false) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "created the workload token key");
                Ok(Self::from_key(&key))
            }
            // Another process created it first: use theirs.
            Err(strait_ca::layout::LayoutError::KeyExists(_)) => {
                let data = std::fs::read(path).map_err(|source| TokenKeyError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::from_file_contents(path, &data)
            }
            Err(source) => Err(TokenKeyError::Write {
                path: path.to_path_buf(),
                source: Box::new(source),
            }),
        }
    }

    fn from_file_contents(path: &Path, data: &[u8]) -> Result<Self, TokenKeyError> {
        let malformed = |reason: String| TokenKeyError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::str::from_utf8(data).map_err(|_| malformed("it is not text".into()))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|e| malformed(e.to_string()))?;
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed(format!("it holds {} bytes", bytes.len())))?;
        Ok(Self::from_key(&key))
    }

    /// Issues a token for `ns`/`sa` (workload `workload`) good for `ttl`.
    pub fn issue(
        &self,
        ns: &str,
        sa: &str,
        workload: &str,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        self.issue_at(ns, sa, workload, ttl, OffsetDateTime::now_utc())
    }

    /// [`TokenIssuer::issue`] at a given time.
    pub fn issue_at(
        &self,
        ns: &str,
        sa: &str,
        workload: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<String, TokenError> {
        if ttl.is_zero() {
            return Err(TokenError::ZeroTtl);
        }
        let iat = unix(now);
        let claims = Claims {
            ns: ns.to_string(),
            sa: sa.to_string(),
            workload: workload.to_string(),
            iat,
            exp: iat.saturating_add(ttl.as_secs().max(1)),
        };
        claims.validate()?;
        let json = serde_json::to_vec(&claims).map_err(|e| TokenError::Json(e.to_string()))?;
        Ok(self.sign_payload(&json))
    }

    /// Signs arbitrary claim bytes into a token. Public for fuzzing and for
    /// tests that need well-signed tokens with bad claims; production code
    /// uses [`TokenIssuer::issue`].
    pub fn sign_payload(&self, json: &[u8]) -> String {
        let mut token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let tag = hmac::sign(&self.key, token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(tag.as_ref()));
        token
    }

    /// Checks a token's shape, MAC, claims and expiry at `now`.
    pub fn verify(&self, token: &str, now: OffsetDateTime) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(token.len()));
        }
        let token = token.trim();
        let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let (claims_b64, mac_b64) = match rest.split('.').collect::<Vec<_>>().as_slice() {
            [c, m] => (*c, *m),
            _ => return Err(TokenError::Shape),
        };
        let json = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|e| TokenError::Base64 {
                part: "claims",
                error: e.to_string(),
            })?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac_b64)
            .map_err(|e| TokenError::Base64 {
                part: "MAC",
                error: e.to_string(),
            })?;
        if mac.len() != MAC_LEN {
            return Err(TokenError::MacLength(mac.len()));
        }
        let signed = &token[..PREFIX.len() + claims_b64.len()];
        hmac::verify(&self.key, signed.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let claims = Claims::from_json(&json)?;
        let now = unix(now);
        if now >= claims.exp {
            return Err(TokenError::Expired {
                exp: claims.exp,
                now,
            });
        }
        Ok(claims)
    }
}

fn unix(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp()).unwrap_or(0)
}

/// RFC 1123 label, as Kubernetes namespaces are: 1–63 of `[a-z0-9-]`,
/// starting and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain, as most Kubernetes object names are: up to 253
/// bytes of dot-separated labels.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; KEY_LEN] = [7; KEY_LEN];

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(secs).unwrap()
    }

    fn issuer() -> TokenIssuer {
        TokenIssuer::from_key(&KEY)
    }

    fn good() -> String {
        issuer()
            .issue_at(
                "shop",
                "cart",
                "cart-v1",
                Duration::from_secs(600),
                at(1000),
            )
            .unwrap()
    }

    #[test]
    fn round_trip() {
        let claims = issuer().verify(&good(), at(1500)).unwrap();
        assert_eq!(
            claims,
            Claims {
                ns: "shop".into(),
                sa: "cart".into(),
                workload: "cart-v1".into(),
                exp: 1600,
                iat: 1000,
            }
        );
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(
            claims.spiffe_id(&td).unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        // Surrounding whitespace (a token file's newline) is fine.
        assert!(issuer().verify(&format!("{}\n", good()), at(1500)).is_ok());
    }

    #[test]
    fn expiry_is_exclusive() {
        assert!(issuer().verify(&good(), at(1599)).is_ok());
        assert_eq!(
            issuer().verify(&good(), at(1600)),
            Err(TokenError::Expired {
                exp: 1600,
                now: 1600
            })
        );
    }

    #[test]
    fn bad_shapes() {
        let good = good();
        let body = good.strip_prefix(PREFIX).unwrap();
        let (claims, mac) = body.split_once('.').unwrap();
        let flipped_mac = {
            let mut m = URL_SAFE_NO_PAD.decode(mac).unwrap();
            m[0] ^= 1;
            URL_SAFE_NO_PAD.encode(m)
        };
        let other_key = TokenIssuer::from_key(&[8; KEY_LEN])
            .issue_at(
                "shop",
                "cart",
                "cart-v1",
                Duration::from_secs(600),
                at(1000),
            )
            .unwrap();
        let tampered_claims = {
            let json = br#"{"ns":"shop","sa":"admin","workload":"cart-v1","exp":1600,"iat":1000}"#;
            format!("{PREFIX}{}.{mac}", URL_SAFE_NO_PAD.encode(json))
        };
        let long = format!("{PREFIX}{}", "A".repeat(MAX_TOKEN_LEN));
        let cases: Vec<(&str, String, TokenError)> = vec![
            ("empty", String::new(), TokenError::Prefix),
            ("join token", format!("sjt1.{body}"), TokenError::Prefix),
            ("no prefix", body.to_string(), TokenError::Prefix),
            ("too long", long.clone(), TokenError::TooLong(long.len())),
            ("one part", format!("{PREFIX}{claims}"), TokenError::Shape),
            ("three parts", format!("{good}.x"), TokenError::Shape),
            (
                "claims not base64",
                format!("{PREFIX}!!.{mac}"),
                TokenError::Base64 {
                    part: "claims",
                    error: String::new(),
                },
            ),
            (
                "padded MAC",
                format!("{good}="),
                TokenError::Base64 {
                    part: "MAC",
                    error: String::new(),
                },
            ),
            (
                "short MAC",
                format!("{PREFIX}{claims}.AAAA"),
                TokenError::MacLength(3),
            ),
            (
                "flipped MAC",
                format!("{PREFIX}{claims}.{flipped_mac}"),
                TokenError::BadSignature,
            ),
            ("other key", other_key, TokenError::BadSignature),
            ("tampered claims", tampered_claims, TokenError::BadSignature),
        ];
        for (name, token, want) in cases {
            let got = issuer().verify(&token, at(1500));
            match (&got, &want) {
                (Err(TokenError::Base64 { part: a, .. }), TokenError::Base64 { part: b, .. }) => {
                    assert_eq!(a, b, "{name}")
                }
                _ => assert_eq!(got, Err(want), "{name}"),
            }
        }
    }

    #[test]
    fn bad_claims_behind_a_good_mac() {
        let sign = |json: &str| issuer().sign_payload(json.as_bytes());
        type Check = fn(&TokenError) -> bool;
        let cases: &[(&str, &str, Check)] = &[
            ("not json", "nope", |e| matches!(e, TokenError::Json(_))),
            ("array", "[1]", |e| matches!(e, TokenError::Json(_))),
            (
                "missing exp",
                r#"{"ns":"a","sa":"b","workload":"c","iat":1}"#,
                |e| matches!(e, TokenError::Json(m) if m.contains("exp")),
            ),
            (
                "unknown field",
                r#"{"ns":"a","sa":"b","workload":"c","exp":2000,"iat":1,"admin":true}"#,
                |e| matches!(e, TokenError::Json(m) if m.contains("admin")),
            ),
            (
                "negative exp",
                r#"{"ns":"a","sa":"b","workload":"c","exp":-1,"iat":1}"#,
                |e| matches!(e, TokenError::Json(_)),
            ),
            (
                "namespace with slash",
                r#"{"ns":"a/sa/x","sa":"b","workload":"c","exp":2000,"iat":1}"#,
                |e| matches!(e, TokenError::Namespace(n) if n == "a/sa/x"),
            ),
            (
                "uppercase namespace",
                r#"{"ns":"Shop","sa":"b","workload":"c","exp":2000,"iat":1}"#,
                |e| matches!(e, TokenError::Namespace(_)),
            ),
            (
                "empty service account",
                r#"{"ns":"a","sa":"","workload":"c","exp":2000,"iat":1}"#,
                |e| matches!(e, TokenError::ServiceAccount(_)),
            ),
            (
                "service account dot segment",
                r#"{"ns":"a","sa":"..","workload":"c","exp":2000,"iat":1}"#,
                |e| matches!(e, TokenError::ServiceAccount(_)),
            ),
            (
                "bad workload",
                r#"{"ns":"a","sa":"b","workload":"c d","exp":2000,"iat":1}"#,
                |e| matches!(e, TokenError::Workload(_)),
            ),
            (
                "expires before issued",
                r#"{"ns":"a","sa":"b","workload":"c","exp":5,"iat":9}"#,
                |e| matches!(e, TokenError::Window { iat: 9, exp: 5 }),
            ),
        ];
        for (name, json, check) in cases {
            let err = issuer().verify(&sign(json), at(1500)).unwrap_err();
            assert!(check(&err), "{name}: {err}");
        }
    }

    #[test]
    fn issue_refuses_bad_input() {
        let i = issuer();
        let ttl = Duration::from_secs(60);
        assert_eq!(
            i.issue_at("a", "b", "c", Duration::ZERO, at(1)),
            Err(TokenError::ZeroTtl)
        );
        assert_eq!(
            i.issue_at("A", "b", "c", ttl, at(1)),
            Err(TokenError::Namespace("A".into()))
        );
        assert_eq!(
            i.issue_at("a", "b_c", "c", ttl, at(1)),
            Err(TokenError::ServiceAccount("b_c".into()))
        );
        assert_eq!(
            i.issue_at("a", "b", "", ttl, at(1)),
            Err(TokenError::Workload(String::new()))
        );
    }

    #[test]
    fn error_messages_name_the_input() {
        let err = TokenError::Namespace("Bad NS".into()).to_string();
        assert!(err.contains("\"Bad NS\""), "{err}");
        let err = TokenError::Expired { exp: 5, now: 9 }.to_string();
        assert!(err.contains('5') && err.contains('9'), "{err}");
    }

    #[test]
    fn names() {
        for ok in ["a", "default", "kube-system", "a1"] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        for ok in ["a", "a.b", "bookinfo-reviews", "x.y-z.w"] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in ["", ".", "a..b", ".a", "a.", "a/b", &"a.".repeat(127)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(TOKEN_KEY_FILE);
        let first = TokenIssuer::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let token = first.issue("a", "b", "c", Duration::from_secs(60)).unwrap();
        let second = TokenIssuer::load_or_create(&path).unwrap();
        assert!(second.verify(&token, OffsetDateTime::now_utc()).is_ok());
    }

    #[test]
    fn malformed_key_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("short", b"AAAA\n".as_slice()),
            ("binary", &[0xff, 0xfe][..]),
            ("not base64", b"!!!!".as_slice()),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let err = TokenIssuer::load_or_create(&path).unwrap_err().to_string();
            assert!(err.contains(name), "{name}: {err}");
        }
    }
}
