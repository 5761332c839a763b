//! Certificate signing requests: parsed, proof of possession checked, and
//! reduced to the few facts the signing policy decides on.
//!
//! A CSR comes from an untrusted caller. Nothing in it is copied into a
//! certificate except the public key and, after the policy has approved them,
//! the names it asks for.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use crate::cert::{Sans, collect_general_names};
use crate::pemfile::{self, PemError};

/// The largest CSR we look at; real ones are under 2 KiB.
pub const MAX_CSR_BYTES: usize = 64 * 1024;
/// The smallest RSA modulus a CSR may carry.
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is {0} bytes; at most {MAX_CSR_BYTES} are accepted")]
    TooLarge(usize),
    #[error("CSR PEM: {0}")]
    Pem(#[from] PemError),
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify with its own public key (no proof of possession)")]
    BadSignature,
    #[error("CSR public key is not supported: {0}")]
    UnsupportedKey(String),
    #[error("CSR requested extension could not be parsed: {0}")]
    BadExtension(String),
}

/// A parsed CSR whose signature has been checked against its own public key.
#[derive(Debug, Clone)]
pub struct Csr {
    spki_der: Vec<u8>,
    common_name: Option<String>,
    sans: Sans,
    requests_ca: bool,
    key_description: String,
}

impl Csr {
    /// Parses a PEM `CERTIFICATE REQUEST`.
    pub fn from_pem(input: &[u8]) -> Result<Self, CsrError> {
        if input.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge(input.len()));
        }
        let der = pemfile::parse_single(input, pemfile::CERTIFICATE_REQUEST)?;
        Self::from_der(&der)
    }

    /// Parses a DER PKCS#10 request and checks its proof of possession.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge(der.len()));
        }
        let csr = match X509CertificationRequest::from_der(der) {
            Ok(([], csr)) => csr,
            Ok((rest, _)) => {
                return Err(CsrError::Malformed(format!(
                    "{} trailing bytes after the request",
                    rest.len()
                )));
            }
            Err(e) => return Err(CsrError::Malformed(e.to_string())),
        };
        let info = &csr.certification_request_info;
        let spki = &info.subject_pki;
        // Key first: a weak key is the better message than the failed
        // signature check it would also cause (ring refuses small RSA keys).
        let key_description = check_key(spki)?;
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        // rcgen must be able to put this key into a certificate.
        rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;

        let common_name = match info.subject.iter_common_name().next() {
            Some(cn) => Some(
                cn.as_str()
                    .map_err(|e| CsrError::Malformed(format!("subject CN: {e}")))?
                    .to_string(),
            ),
            None => None,
        };

        let mut sans = Sans::default();
        let mut requests_ca = false;
        if let Some(extensions) = csr.requested_extensions() {
            for ext in extensions {
                match ext {
                    ParsedExtension::SubjectAlternativeName(san) => {
                        collect_general_names(&san.general_names, &mut sans);
                    }
                    ParsedExtension::BasicConstraints(bc) => requests_ca |= bc.ca,
                    ParsedExtension::ParseError { error } => {
                        return Err(CsrError::BadExtension(error.to_string()));
                    }
                    _ => {}
                }
            }
        }
        Ok(Csr {
            spki_der: spki.raw.to_vec(),
            common_name,
            sans,
            requests_ca,
            key_description,
        })
    }

    /// The DER SubjectPublicKeyInfo the certificate will carry.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The subject's common name, if any.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// The subject alternative names requested.
    pub fn sans(&self) -> &Sans {
        &self.sans
    }

    /// True when the request asks for `basicConstraints CA:TRUE`.
    pub fn requests_ca(&self) -> bool {
        self.requests_ca
    }

    /// e.g. `EC P-256`, for messages.
    pub fn key_description(&self) -> &str {
        &self.key_description
    }

    pub(crate) fn public_key(&self) -> Result<rcgen::SubjectPublicKeyInfo, CsrError> {
        rcgen::SubjectPublicKeyInfo::from_der(&self.spki_der)
            .map_err(|e| CsrError::UnsupportedKey(e.to_string()))
    }
}

/// Accepts EC P-256/P-384, Ed25519 and RSA of at least 2048 bits.
fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<String, CsrError> {
    use x509_parser::public_key::PublicKey;
    let parsed = spki
        .parsed()
        .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
    match parsed {
        PublicKey::EC(point) => match point.key_size() {
            256 => Ok("EC P-256".into()),
            384 => Ok("EC P-384".into()),
            bits => Err(CsrError::UnsupportedKey(format!(
                "EC key of {bits} bits (P-256 or P-384 expected)"
            ))),
        },
        PublicKey::RSA(rsa) if rsa.key_size() >= MIN_RSA_BITS => {
            Ok(format!("RSA {}", rsa.key_size()))
        }
        PublicKey::RSA(rsa) => Err(CsrError::UnsupportedKey(format!(
            "RSA key of {} bits (at least {MIN_RSA_BITS} required)",
            rsa.key_size()
        ))),
        PublicKey::Unknown(_) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            Ok("Ed25519".into())
        }
        _ => Err(CsrError::UnsupportedKey(format!(
            "algorithm {}",
            spki.algorithm.algorithm.to_id_string()
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SanType};

    pub(crate) fn csr_with(
        key: &KeyPair,
        uris: &[&str],
        dns: &[&str],
        ca: bool,
        cn: Option<&str>,
    ) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        for u in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*u).try_into().unwrap()));
        }
        for d in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*d).try_into().unwrap()));
        }
        if ca {
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn parses_names_and_key() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_with(
            &key,
            &["spiffe://td/ns/a/sa/b"],
            &["b.a.svc"],
            false,
            Some("b"),
        );
        let csr = Csr::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(csr.sans().uris, ["spiffe://td/ns/a/sa/b"]);
        assert_eq!(csr.sans().dns, ["b.a.svc"]);
        assert_eq!(csr.common_name(), Some("b"));
        assert!(!csr.requests_ca());
        assert_eq!(csr.key_description(), "EC P-256");
        let spki = csr.public_key().unwrap();
        assert_eq!(rcgen::PublicKeyData::der_bytes(&spki), key.public_key_raw());
    }

    #[test]
    fn sees_ca_requests() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_with(&key, &[], &[], true, Some("x"));
        assert!(Csr::from_pem(pem.as_bytes()).unwrap().requests_ca());
    }

    #[test]
    fn p384_is_accepted() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let pem = csr_with(&key, &["spiffe://td/x"], &[], false, None);
        assert_eq!(
            Csr::from_pem(pem.as_bytes()).unwrap().key_description(),
            "EC P-384"
        );
    }

    #[test]
    fn rejects_tampered_signature() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_with(&key, &["spiffe://td/ns/a/sa/b"], &[], false, None);
        let mut der = pemfile::parse_single(pem.as_bytes(), pemfile::CERTIFICATE_REQUEST).unwrap();
        // The URI is inside the signed request info: change one letter of it.
        let pos = der.windows(4).position(|w| w == b"ns/a").unwrap();
        der[pos + 3] = b'z';
        assert!(matches!(Csr::from_der(&der), Err(CsrError::BadSignature)));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            Csr::from_pem(b"not pem"),
            Err(CsrError::Pem(PemError::Missing(_)))
        ));
        assert!(matches!(
            Csr::from_der(b"\x30\x00"),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(Csr::from_der(&[]), Err(CsrError::Malformed(_))));
        let big = vec![b'a'; MAX_CSR_BYTES + 1];
        assert!(matches!(Csr::from_pem(&big), Err(CsrError::TooLarge(_))));
        // A certificate is not a CSR.
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(matches!(
            Csr::from_pem(cert.pem().as_bytes()),
            Err(CsrError::Pem(PemError::Missing(_)))
        ));
        assert!(matches!(
            Csr::from_der(cert.der()),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_trailing_bytes() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_with(&key, &["spiffe://td/x"], &[], false, None);
        let mut der = pemfile::parse_single(pem.as_bytes(), pemfile::CERTIFICATE_REQUEST).unwrap();
        der.push(0);
        let err = Csr::from_der(&der).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }
}
