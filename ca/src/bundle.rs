//! Trust bundles: the set of roots a trust domain trusts, several at once
//! during a rotation. Read and written as PEM (Istio's `root-cert.pem`) and as
//! a SPIFFE bundle (JWKS with `use: "x509-svid"`, `spiffe_sequence`,
//! `spiffe_refresh_hint`), the format federated meshes exchange.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use x509_parser::error::X509Error;
use x509_parser::public_key::PublicKey;

use crate::cert::{self, CertError};
use crate::pemfile::{self, PemError};
use crate::spiffe::TrustDomain;

/// The largest bundle document accepted (a few hundred roots).
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
const X509_SVID: &str = "x509-svid";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is {0} bytes; at most {MAX_BUNDLE_BYTES} are accepted")]
    TooLarge(usize),
    #[error("bundle PEM: {0}")]
    Pem(#[from] PemError),
    #[error("SPIFFE bundle is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("SPIFFE bundle key #{index}: {reason}")]
    Key {
        index: usize,
        #[source]
        reason: KeyError,
    },
    #[error("SPIFFE bundle has no x509-svid keys")]
    NoX509Authorities,
    #[error("bundle has no roots")]
    Empty,
    #[error("root #{index} cannot be described as a JWK: {reason}")]
    Unrepresentable {
        index: usize,
        #[source]
        reason: JwkError,
    },
}

/// What is wrong with one key of a SPIFFE bundle (or one root given to
/// [`TrustBundle::new`]).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a JSON object")]
    NotAnObject,
    #[error("\"x5c\" is not an array")]
    X5cNotAnArray,
    #[error("x509-svid key has no \"x5c\"")]
    NoX5c,
    #[error("\"x5c\" must hold exactly one certificate, it holds {0}")]
    X5cCount(usize),
    #[error("\"x5c\" entry is not a string")]
    X5cNotAString,
    #[error("\"x5c\" is not base64: {0}")]
    Base64(#[source] base64::DecodeError),
    /// The JWK parameter of this name differs from the certificate's key.
    #[error("\"{0}\" does not match the certificate's public key")]
    Mismatch(&'static str),
    #[error("missing \"kty\"")]
    NoKty,
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error(transparent)]
    Jwk(#[from] JwkError),
}

/// Why a certificate's public key has no JWK form here.
#[derive(Debug, thiserror::Error)]
pub enum JwkError {
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error("{0}")]
    PublicKey(#[source] X509Error),
    #[error("unsupported EC point of {0} bytes")]
    EcPointLength(usize),
    #[error("compressed EC points are not supported")]
    CompressedEcPoint,
    /// The OID of the key's algorithm.
    #[error("unsupported key algorithm {0}")]
    Algorithm(String),
}

/// The roots of one trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: Option<TrustDomain>,
    roots: Vec<Vec<u8>>,
    sequence: Option<u64>,
    refresh_hint: Option<Duration>,
}

impl TrustBundle {
    /// A bundle of the given DER roots (duplicates dropped, order kept).
    pub fn new(
        trust_domain: Option<TrustDomain>,
        roots: Vec<Vec<u8>>,
    ) -> Result<Self, BundleError> {
        let mut bundle = TrustBundle {
            trust_domain,
            ..TrustBundle::default()
        };
        for (i, der) in roots.into_iter().enumerate() {
            pemfile::check_certificate_der(&der).map_err(|e| BundleError::Key {
                index: i + 1,
                reason: e.into(),
            })?;
            bundle.add(der);
        }
        if bundle.roots.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(bundle)
    }

    /// Reads PEM (`root-cert.pem`) or SPIFFE bundle JSON, by content.
    pub fn parse(input: &[u8], trust_domain: Option<TrustDomain>) -> Result<Self, BundleError> {
        if input.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(input.len()));
        }
        let first = input.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{') {
            Self::from_spiffe_json(input, trust_domain)
        } else {
            Self::from_pem(input, trust_domain)
        }
    }

    pub fn from_pem(input: &[u8], trust_domain: Option<TrustDomain>) -> Result<Self, BundleError> {
        if input.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(input.len()));
        }
        Self::new(trust_domain, pemfile::parse_certificates(input)?)
    }

    pub fn to_pem(&self) -> String {
        pemfile::encode_certificates(self.roots.iter().map(Vec::as_slice))
    }

    pub fn trust_domain(&self) -> Option<&TrustDomain> {
        self.trust_domain.as_ref()
    }

    pub fn set_trust_domain(&mut self, td: TrustDomain) {
        self.trust_domain = Some(td);
    }

    /// The roots, DER, in order.
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots
    }

    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    pub fn set_sequence(&mut self, sequence: u64) {
        self.sequence = Some(sequence);
    }

    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    pub fn set_refresh_hint(&mut self, hint: Duration) {
        self.refresh_hint = Some(hint);
    }

    /// Adds a root unless already present; returns whether it was added.
    pub fn add(&mut self, der: Vec<u8>) -> bool {
        if self.roots.contains(&der) {
            return false;
        }
        self.roots.push(der);
        true
    }

    /// Removes the root with this DER; returns whether it was there.
    pub fn remove(&mut self, der: &[u8]) -> bool {
        let before = self.roots.len();
        self.roots.retain(|r| r != der);
        before != self.roots.len()
    }

    /// The SPIFFE bundle document (pretty JSON).
    pub fn to_spiffe_json(&self) -> Result<String, BundleError> {
        let keys = self
            .roots
            .iter()
            .enumerate()
            .map(|(i, der)| {
                jwk_for(der).map_err(|reason| BundleError::Unrepresentable {
                    index: i + 1,
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let doc = SpiffeBundleOut {
            keys,
            spiffe_sequence: self.sequence,
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs()),
        };
        serde_json::to_string_pretty(&doc).map_err(BundleError::Json)
    }

    /// Reads a SPIFFE bundle document. Keys of other uses (`jwt-svid`) are
    /// skipped; every `x509-svid` key must hold exactly one certificate whose
    /// public key matches the JWK's parameters.
    pub fn from_spiffe_json(
        input: &[u8],
        trust_domain: Option<TrustDomain>,
    ) -> Result<Self, BundleError> {
        if input.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(input.len()));
        }
        let doc: SpiffeBundleIn = serde_json::from_slice(input).map_err(BundleError::Json)?;
        let mut roots = Vec::new();
        for (i, key) in doc.keys.iter().enumerate() {
            let root = x509_svid_root(key).map_err(|reason| BundleError::Key {
                index: i + 1,
                reason,
            })?;
            roots.extend(root);
        }
        if roots.is_empty() {
            return Err(BundleError::NoX509Authorities);
        }
        let mut bundle = Self::new(trust_domain, roots)?;
        bundle.sequence = doc.spiffe_sequence;
        bundle.refresh_hint = doc.spiffe_refresh_hint.map(Duration::from_secs);
        Ok(bundle)
    }
}

/// The root DER of one key of a SPIFFE bundle: `None` for keys of other
/// uses (`jwt-svid`); an `x509-svid` key must hold exactly one certificate
/// in `x5c` whose public key matches the JWK's parameters.
fn x509_svid_root(key: &Value) -> Result<Option<Vec<u8>>, KeyError> {
    let obj = key.as_object().ok_or(KeyError::NotAnObject)?;
    if obj.get("use").and_then(Value::as_str) != Some(X509_SVID) {
        return Ok(None);
    }
    let x5c = match obj.get("x5c") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(KeyError::X5cNotAnArray),
        None => return Err(KeyError::NoX5c),
    };
    let [only] = x5c.as_slice() else {
        return Err(KeyError::X5cCount(x5c.len()));
    };
    let b64 = only.as_str().ok_or(KeyError::X5cNotAString)?;
    let der = STANDARD.decode(b64).map_err(KeyError::Base64)?;
    let expected = jwk_for(&der)?;
    for field in ["kty", "crv", "x", "y", "n", "e"] {
        if let Some(given) = obj.get(field)
            && expected.get(field) != Some(given)
        {
            return Err(KeyError::Mismatch(field));
        }
    }
    if obj.get("kty").is_none() {
        return Err(KeyError::NoKty);
    }
    Ok(Some(der))
}

#[derive(Serialize)]
struct SpiffeBundleOut {
    keys: Vec<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Deserialize)]
struct SpiffeBundleIn {
    keys: Vec<Value>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

/// The JWK (RFC 7517/7518/8037) of a certificate's public key, with the
/// certificate in `x5c` and `use: "x509-svid"`.
fn jwk_for(der: &[u8]) -> Result<Map<String, Value>, JwkError> {
    let c = cert::parse(der)?;
    let spki = c.public_key();
    let mut jwk = Map::new();
    jwk.insert("use".into(), X509_SVID.into());
    let b64u = |b: &[u8]| Value::String(URL_SAFE_NO_PAD.encode(b));
    match spki.parsed().map_err(JwkError::PublicKey)? {
        PublicKey::EC(point) => {
            let data = point.data();
            let (crv, len) = match data.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                133 => ("P-521", 66),
                n => return Err(JwkError::EcPointLength(n)),
            };
            if data[0] != 4 {
                return Err(JwkError::CompressedEcPoint);
            }
            jwk.insert("kty".into(), "EC".into());
            jwk.insert("crv".into(), crv.into());
            jwk.insert("x".into(), b64u(&data[1..1 + len]));
            jwk.insert("y".into(), b64u(&data[1 + len..]));
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| {
                let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                b[i..].to_vec()
            };
            jwk.insert("kty".into(), "RSA".into());
            jwk.insert("n".into(), b64u(&strip(rsa.modulus)));
            jwk.insert("e".into(), b64u(&strip(rsa.exponent)));
        }
        PublicKey::Unknown(raw) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            jwk.insert("kty".into(), "OKP".into());
            jwk.insert("crv".into(), "Ed25519".into());
            jwk.insert("x".into(), b64u(raw));
        }
        _ => {
            return Err(JwkError::Algorithm(spki.algorithm.algorithm.to_id_string()));
        }
    }
    jwk.insert(
        "x5c".into(),
        Value::Array(vec![STANDARD.encode(der).into()]),
    );
    Ok(jwk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    fn bundle_of(n: usize) -> TrustBundle {
        let roots = (0..n)
            .map(|_| TestPki::new("td").root.root_der().to_vec())
            .collect();
        TrustBundle::new(Some(TrustDomain::new("td").unwrap()), roots).unwrap()
    }

    #[test]
    fn pem_round_trip_keeps_every_root() {
        let b = bundle_of(2);
        let back = TrustBundle::parse(b.to_pem().as_bytes(), None).unwrap();
        assert_eq!(back.roots(), b.roots());
    }

    #[test]
    fn spiffe_json_round_trip() {
        let mut b = bundle_of(2);
        b.set_sequence(42);
        b.set_refresh_hint(Duration::from_secs(300));
        let json = b.to_spiffe_json().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["spiffe_sequence"], 42);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][0]["kty"], "EC");
        assert_eq!(v["keys"][0]["crv"], "P-256");
        assert_eq!(v["keys"][0]["x5c"].as_array().unwrap().len(), 1);
        let back = TrustBundle::parse(json.as_bytes(), None).unwrap();
        assert_eq!(back.roots(), b.roots());
        assert_eq!(back.sequence(), Some(42));
        assert_eq!(back.refresh_hint(), Some(Duration::from_secs(300)));
    }

    #[test]
    fn skips_jwt_keys_and_checks_parameters() {
        let b = bundle_of(1);
        let mut v: Value = serde_json::from_str(&b.to_spiffe_json().unwrap()).unwrap();
        let keys = v["keys"].as_array_mut().unwrap();
        keys.push(
            serde_json::json!({"use": "jwt-svid", "kty": "EC", "kid": "k1",
            "crv": "P-256", "x": "AA", "y": "AA"}),
        );
        let doc = serde_json::to_vec(&v).unwrap();
        assert_eq!(TrustBundle::parse(&doc, None).unwrap().roots().len(), 1);

        let mut tampered = v.clone();
        tampered["keys"][0]["x"] = "AAAA".into();
        let err = TrustBundle::parse(&serde_json::to_vec(&tampered).unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("\"x\" does not match"), "{err}");

        let mut two = v.clone();
        let x5c = two["keys"][0]["x5c"][0].clone();
        two["keys"][0]["x5c"] = Value::Array(vec![x5c.clone(), x5c]);
        let err = TrustBundle::parse(&serde_json::to_vec(&two).unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
    }

    #[test]
    fn rejects_bad_documents() {
        for (doc, needle) in [
            ("{", "not valid JSON"),
            ("{}", "not valid JSON"),
            ("{\"keys\": []}", "no x509-svid keys"),
            ("{\"keys\": [1]}", "not a JSON object"),
            (
                "{\"keys\": [{\"use\": \"x509-svid\", \"kty\": \"EC\"}]}",
                "no \"x5c\"",
            ),
            (
                "{\"keys\": [{\"use\": \"x509-svid\", \"kty\": \"EC\", \"x5c\": [\"!!\"]}]}",
                "not base64",
            ),
            (
                "{\"keys\": [{\"use\": \"x509-svid\", \"kty\": \"EC\", \"x5c\": [\"AAAA\"]}]}",
                "key #1",
            ),
            ("{\"keys\": [], \"spiffe_sequence\": -1}", "not valid JSON"),
        ] {
            let err = TrustBundle::parse(doc.as_bytes(), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{doc}: {err}");
        }
        let big = vec![b' '; MAX_BUNDLE_BYTES + 1];
        assert!(matches!(
            TrustBundle::parse(&big, None),
            Err(BundleError::TooLarge(_))
        ));
        assert!(matches!(
            TrustBundle::parse(b"no pem here", None),
            Err(BundleError::Pem(PemError::Missing(_)))
        ));
    }

    #[test]
    fn one_key_gives_its_root_or_is_skipped_or_names_its_problem() {
        let b = bundle_of(1);
        let v: Value = serde_json::from_str(&b.to_spiffe_json().unwrap()).unwrap();
        let key = &v["keys"][0];
        assert_eq!(x509_svid_root(key).unwrap(), Some(b.roots()[0].clone()));
        let jwt = serde_json::json!({"use": "jwt-svid", "kty": "EC"});
        assert_eq!(x509_svid_root(&jwt).unwrap(), None);
        assert!(matches!(
            x509_svid_root(&Value::from(1)),
            Err(KeyError::NotAnObject)
        ));
        let mut no_kty = key.clone();
        no_kty.as_object_mut().unwrap().remove("kty");
        assert!(matches!(x509_svid_root(&no_kty), Err(KeyError::NoKty)));
        let mut wrong_crv = key.clone();
        wrong_crv["crv"] = "P-384".into();
        assert!(matches!(
            x509_svid_root(&wrong_crv),
            Err(KeyError::Mismatch("crv"))
        ));
    }

    #[test]
    fn add_and_remove_for_rotation() {
        let mut b = bundle_of(1);
        let new_root = TestPki::new("td").root.root_der().to_vec();
        assert!(b.add(new_root.clone()));
        assert!(!b.add(new_root.clone()));
        assert_eq!(b.roots().len(), 2);
        let old = b.roots()[0].clone();
        assert!(b.remove(&old));
        assert_eq!(b.roots(), [new_root]);
    }
}
