//! PEM reading and writing for certificates, CSRs and private keys.
//!
//! Every certificate read is parsed as X.509 right away, so that a truncated
//! or corrupt file is reported with the position of the bad block, not later
//! as a mysterious verification failure.

use rcgen::KeyPair;

use crate::cert::{self, CertError};

pub const CERTIFICATE: &str = "CERTIFICATE";
pub const CERTIFICATE_REQUEST: &str = "CERTIFICATE REQUEST";
pub const PRIVATE_KEY: &str = "PRIVATE KEY";

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("malformed PEM: {0}")]
    Malformed(#[from] pem::PemError),
    #[error("no {0} PEM block found")]
    Missing(&'static str),
    #[error("{count} {kind} PEM blocks found; expected exactly one")]
    TooMany { kind: &'static str, count: usize },
    #[error("certificate #{index} (PEM block {block}) is not valid X.509: {reason}")]
    BadCertificate {
        index: usize,
        block: usize,
        #[source]
        reason: CertError,
    },
    #[error(
        "{0:?} keys are not supported: convert to PKCS#8 with \
         `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
    )]
    LegacyKey(String),
    #[error("private key is not a usable PKCS#8 key: {0}")]
    BadKey(#[source] rcgen::Error),
}

/// All `CERTIFICATE` blocks of a PEM file, in order, each checked to be
/// well-formed X.509 (DER without trailing bytes). Other block types are
/// ignored; a file without any certificate is an error.
pub fn parse_certificates(input: &[u8]) -> Result<Vec<Vec<u8>>, PemError> {
    let blocks = pem::parse_many(input)?;
    let mut certs = Vec::new();
    for (block, pem) in blocks.into_iter().enumerate() {
        if pem.tag() != CERTIFICATE {
            continue;
        }
        let der = pem.into_contents();
        let index = certs.len() + 1;
        check_certificate_der(&der).map_err(|reason| PemError::BadCertificate {
            index,
            block: block + 1,
            reason,
        })?;
        certs.push(der);
    }
    if certs.is_empty() {
        return Err(PemError::Missing(CERTIFICATE));
    }
    Ok(certs)
}

/// Checks that `der` is exactly one well-formed X.509 certificate.
pub fn check_certificate_der(der: &[u8]) -> Result<(), CertError> {
    cert::parse(der).map(drop)
}

/// The single block of type `kind` in `input`.
pub fn parse_single(input: &[u8], kind: &'static str) -> Result<Vec<u8>, PemError> {
    let blocks = pem::parse_many(input)?;
    let mut found: Vec<_> = blocks.into_iter().filter(|p| p.tag() == kind).collect();
    match found.len() {
        0 => Err(PemError::Missing(kind)),
        1 => Ok(found.remove(0).into_contents()),
        count => Err(PemError::TooMany { kind, count }),
    }
}

/// A PKCS#8 private key (`PRIVATE KEY` block). SEC1 (`EC PRIVATE KEY`) and
/// PKCS#1 (`RSA PRIVATE KEY`) keys are refused with the command that
/// converts them.
pub fn parse_private_key(input: &[u8]) -> Result<KeyPair, PemError> {
    let blocks = pem::parse_many(input)?;
    let mut keys: Vec<_> = blocks
        .into_iter()
        .filter(|p| p.tag().ends_with(PRIVATE_KEY))
        .collect();
    match keys.len() {
        0 => return Err(PemError::Missing(PRIVATE_KEY)),
        1 => {}
        count => {
            return Err(PemError::TooMany {
                kind: PRIVATE_KEY,
                count,
            });
        }
    }
    let key = keys.remove(0);
    if key.tag() != PRIVATE_KEY {
        return Err(PemError::LegacyKey(key.tag().to_string()));
    }
    KeyPair::try_from(key.contents()).map_err(PemError::BadKey)
}

/// PEM text of one block, with `\n` line endings.
pub fn encode(kind: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(kind, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// PEM text of several certificates, concatenated in order.
pub fn encode_certificates<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    ders.into_iter().map(|d| encode(CERTIFICATE, d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_cert() -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn round_trips_certificates_in_order() {
        let (a, b) = (some_cert(), some_cert());
        let text = encode_certificates([a.as_slice(), b.as_slice()]);
        assert!(!text.contains('\r'));
        assert_eq!(parse_certificates(text.as_bytes()).unwrap(), vec![a, b]);
    }

    #[test]
    fn skips_other_blocks_but_requires_a_certificate() {
        let cert = some_cert();
        let text = format!(
            "{}{}",
            encode("PRIVATE KEY", b"x"),
            encode(CERTIFICATE, &cert)
        );
        assert_eq!(parse_certificates(text.as_bytes()).unwrap(), vec![cert]);
        assert!(matches!(
            parse_certificates(b"hello"),
            Err(PemError::Missing(CERTIFICATE))
        ));
        assert!(matches!(parse_certificates(b""), Err(PemError::Missing(_))));
    }

    #[test]
    fn rejects_malformed_pem() {
        let bad = "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_certificates(bad.as_bytes()),
            Err(PemError::Malformed(_))
        ));
        let unterminated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(parse_certificates(unterminated.as_bytes()).is_err());
    }

    #[test]
    fn names_the_corrupt_certificate() {
        let good = some_cert();
        let mut truncated = some_cert();
        truncated.truncate(truncated.len() / 2);
        let text = encode_certificates([good.as_slice(), truncated.as_slice()]);
        match parse_certificates(text.as_bytes()) {
            Err(PemError::BadCertificate {
                index: 2, block: 2, ..
            }) => {}
            other => panic!("unexpected: {other:?}"),
        }
        let mut trailing = some_cert();
        trailing.extend_from_slice(b"junk");
        let err = parse_certificates(encode(CERTIFICATE, &trailing).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("trailing bytes"), "{err}");
    }

    #[test]
    fn private_keys() {
        let key = KeyPair::generate().unwrap();
        let parsed = parse_private_key(key.serialize_pem().as_bytes()).unwrap();
        assert_eq!(parsed.public_key_raw(), key.public_key_raw());
        let sec1 = encode("EC PRIVATE KEY", b"whatever");
        let err = parse_private_key(sec1.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("openssl pkcs8"), "{err}");
        let garbage = encode(PRIVATE_KEY, b"not a key");
        assert!(matches!(
            parse_private_key(garbage.as_bytes()),
            Err(PemError::BadKey(_))
        ));
        let two = format!("{}{}", key.serialize_pem(), key.serialize_pem());
        assert!(matches!(
            parse_private_key(two.as_bytes()),
            Err(PemError::TooMany { count: 2, .. })
        ));
        assert!(matches!(
            parse_private_key(b""),
            Err(PemError::Missing(PRIVATE_KEY))
        ));
    }

    #[test]
    fn single_block() {
        let text = format!("{}{}", encode("A", b"1"), encode("B", b"2"));
        assert_eq!(
            parse_single(text.as_bytes(), "CERTIFICATE REQUEST").ok(),
            None
        );
        assert!(matches!(
            parse_single(encode(CERTIFICATE_REQUEST, b"x").as_bytes(), CERTIFICATE_REQUEST),
            Ok(v) if v == b"x"
        ));
    }
}
