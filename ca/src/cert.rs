//! Reading facts out of X.509 certificates: names, SANs, SPIFFE ID, validity,
//! CA constraints, fingerprint. Used by verification, by the authority when it
//! loads its own certificate, and by `strait ca inspect`.

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::der_parser::error::BerError;
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::nom;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// A certificate that is not well-formed X.509, or one of its extensions
/// that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CertError {
    /// The DER does not parse as a certificate.
    #[error("{0}")]
    Der(#[source] nom::Err<X509Error>),
    #[error("{0} trailing bytes after the certificate")]
    TrailingBytes(usize),
    #[error("bad subjectAltName extension: {0}")]
    SubjectAltName(#[source] X509Error),
    #[error("bad basicConstraints extension: {0}")]
    BasicConstraints(#[source] X509Error),
    #[error("keyUsage: {0}")]
    KeyUsage(#[source] X509Error),
    /// The extension of this OID does not parse (boxed: the error stays
    /// small in the errors that carry it).
    #[error("extension {oid}: {source}")]
    Extension {
        oid: String,
        #[source]
        source: Box<nom::Err<BerError>>,
    },
}

// The parser's errors are plain enums compared field by field (no floats):
// their `PartialEq` is an equivalence, so errors holding them can be `Eq`.
impl Eq for CertError {}

/// Why a certificate's URI SANs do not give its SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanIdError {
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    NotSpiffe {
        uri: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("{0} URI SANs, expected exactly one")]
    Several(usize),
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(CertError::TrailingBytes(rest.len())),
        Err(e) => Err(CertError::Der(e)),
    }
}

/// The subject alternative names of a certificate, by type.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Sans {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<String>,
    pub other: Vec<String>,
}

pub(crate) fn sans(cert: &X509Certificate<'_>) -> Result<Sans, CertError> {
    let mut out = Sans::default();
    let ext = cert
        .subject_alternative_name()
        .map_err(CertError::SubjectAltName)?;
    if let Some(ext) = ext {
        collect_general_names(&ext.value.general_names, &mut out);
    }
    Ok(out)
}

pub(crate) fn collect_general_names(names: &[GeneralName<'_>], out: &mut Sans) {
    for name in names {
        match name {
            GeneralName::URI(u) => out.uris.push((*u).to_string()),
            GeneralName::DNSName(d) => out.dns.push((*d).to_string()),
            GeneralName::IPAddress(bytes) => out.ips.push(ip_to_string(bytes)),
            other => out.other.push(format!("{other:?}")),
        }
    }
}

fn ip_to_string(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => {
            let a: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
            std::net::Ipv4Addr::from(a).to_string()
        }
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => format!("invalid IP ({} bytes)", bytes.len()),
    }
}

/// The SPIFFE ID of a certificate: its one URI SAN if that parses as a
/// SPIFFE ID. `None` for zero URI SANs; an error for several or for a URI
/// that is not a valid SPIFFE ID.
pub(crate) fn spiffe_id(sans: &Sans) -> Result<Option<SpiffeId>, SanIdError> {
    match sans.uris.as_slice() {
        [] => Ok(None),
        [one] => SpiffeId::parse(one)
            .map(Some)
            .map_err(|source| SanIdError::NotSpiffe {
                uri: one.clone(),
                source,
            }),
        many => Err(SanIdError::Several(many.len())),
    }
}

/// `(is CA, path length constraint)` from basicConstraints; absent means not a CA.
pub(crate) fn basic_constraints(
    cert: &X509Certificate<'_>,
) -> Result<(bool, Option<u32>), CertError> {
    match cert.basic_constraints() {
        Ok(Some(bc)) => Ok((bc.value.ca, bc.value.path_len_constraint)),
        Ok(None) => Ok((false, None)),
        Err(e) => Err(CertError::BasicConstraints(e)),
    }
}

pub(crate) fn not_before(cert: &X509Certificate<'_>) -> OffsetDateTime {
    cert.validity().not_before.to_datetime()
}

pub(crate) fn not_after(cert: &X509Certificate<'_>) -> OffsetDateTime {
    cert.validity().not_after.to_datetime()
}

/// A short, human name for a certificate in messages: its subject, or its
/// URI SAN when the subject is empty (as for Istio and strait leaves).
pub(crate) fn display_name(cert: &X509Certificate<'_>) -> String {
    let subject = cert.subject().to_string();
    if !subject.is_empty() {
        return subject;
    }
    match sans(cert) {
        Ok(s) if !s.uris.is_empty() => s.uris.join(","),
        _ => format!("serial {}", cert.raw_serial_as_string()),
    }
}

/// SHA-256 of the DER encoding, as colon-separated uppercase hex (openssl's
/// `-fingerprint -sha256` format).
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// What `strait ca inspect` shows of one certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub sans: Sans,
    pub spiffe_id: Option<String>,
    pub not_before: String,
    pub not_after: String,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    pub key_usage: Vec<String>,
    pub extended_key_usage: Vec<String>,
    pub public_key: String,
    pub self_signed: bool,
    pub sha256_fingerprint: String,
}

impl CertSummary {
    /// Summarises one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let cert = parse(der)?;
        let sans = sans(&cert)?;
        let (is_ca, path_len) = basic_constraints(&cert)?;
        let mut key_usage = Vec::new();
        let mut extended_key_usage = Vec::new();
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::KeyUsage(ku) => {
                    key_usage = ku.to_string().split(", ").map(str::to_string).collect();
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    let pairs = [
                        (eku.server_auth, "serverAuth"),
                        (eku.client_auth, "clientAuth"),
                        (eku.code_signing, "codeSigning"),
                        (eku.email_protection, "emailProtection"),
                        (eku.time_stamping, "timeStamping"),
                        (eku.ocsp_signing, "OCSPSigning"),
                        (eku.any, "any"),
                    ];
                    extended_key_usage = pairs
                        .iter()
                        .filter(|(on, _)| *on)
                        .map(|(_, n)| (*n).to_string())
                        .collect();
                    extended_key_usage.extend(eku.other.iter().map(|o| o.to_id_string()));
                }
                _ => {}
            }
        }
        let spiffe_id = match spiffe_id(&sans) {
            Ok(id) => id.map(|i| i.to_string()),
            Err(_) => None,
        };
        let key = cert.public_key();
        let public_key = match key.parsed() {
            Ok(k) => format!(
                "{} {} bits",
                describe_key_algorithm(&key.algorithm.algorithm.to_id_string()),
                k.key_size()
            ),
            Err(_) => key.algorithm.algorithm.to_id_string(),
        };
        Ok(CertSummary {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            spiffe_id,
            sans,
            not_before: rfc3339(not_before(&cert)),
            not_after: rfc3339(not_after(&cert)),
            is_ca,
            path_len,
            key_usage,
            extended_key_usage,
            public_key,
            self_signed: cert.subject().as_raw() == cert.issuer().as_raw()
                && cert.verify_signature(None).is_ok(),
            sha256_fingerprint: fingerprint_sha256(der),
        })
    }
}

fn describe_key_algorithm(oid: &str) -> &str {
    match oid {
        "1.2.840.10045.2.1" => "EC",
        "1.2.840.113549.1.1.1" => "RSA",
        "1.3.101.112" => "Ed25519",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_matches_known_digest() {
        // SHA-256("abc")
        assert_eq!(
            fingerprint_sha256(b"abc"),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
    }

    #[test]
    fn spiffe_id_needs_exactly_one_valid_uri() {
        let mut s = Sans::default();
        assert_eq!(spiffe_id(&s), Ok(None));
        s.uris.push("spiffe://td/a".into());
        assert_eq!(spiffe_id(&s).unwrap().unwrap().as_str(), "spiffe://td/a");
        s.uris.push("spiffe://td/b".into());
        assert!(
            spiffe_id(&s)
                .unwrap_err()
                .to_string()
                .contains("2 URI SANs")
        );
        let bad = Sans {
            uris: vec!["https://example.com".into()],
            ..Sans::default()
        };
        assert!(
            spiffe_id(&bad)
                .unwrap_err()
                .to_string()
                .contains("not a valid SPIFFE ID")
        );
    }

    #[test]
    fn ip_formatting() {
        assert_eq!(ip_to_string(&[127, 0, 0, 1]), "127.0.0.1");
        assert_eq!(ip_to_string(&[0; 16]), "::");
        assert_eq!(ip_to_string(&[1, 2, 3]), "invalid IP (3 bytes)");
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse(b"\x30\x03\x02\x01\x01").is_err());
        assert!(parse(b"").is_err());
    }
}
