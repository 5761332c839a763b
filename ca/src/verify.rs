//! X.509-SVID chain verification: leaf → intermediates → a root of the
//! bundle, with the SPIFFE rules on top of RFC 5280 path validation (one
//! SPIFFE ID per leaf, CA and key-usage constraints, trust domain agreement).
//!
//! Errors are typed and name the certificate that failed, because "unknown
//! issuer" alone helps nobody at 3 a.m. during a root rotation.

use std::fmt;

use time::OffsetDateTime;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::X509Certificate;

use crate::bundle::TrustBundle;
use crate::cert::{self, CertError};
use crate::spiffe::SpiffeId;

/// Longest chain looked at (leaf + intermediates); deeper is refused.
pub const MAX_CHAIN_LEN: usize = 8;

/// A verified X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    pub spiffe_id: SpiffeId,
    /// When the SVID stops verifying: the earliest `notAfter` on its path.
    pub expires: OffsetDateTime,
    /// The DER of the bundle root the path ended at.
    pub root: Vec<u8>,
    /// Certificates on the path, leaf and root included.
    pub path_len: usize,
    /// The leaf's issuer, as its subject prints (`O=…, OU=…, CN=…`).
    pub leaf_issuer: String,
}

/// Which certificate failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertRef {
    /// Position in the presented chain, 1-based (1 = leaf).
    Chain { position: usize, name: String },
    /// A root of the bundle.
    Root { name: String },
}

impl fmt::Display for CertRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertRef::Chain { position: 1, name } => write!(f, "leaf certificate ({name})"),
            CertRef::Chain { position, name } => {
                write!(f, "chain certificate #{position} ({name})")
            }
            CertRef::Root { name } => write!(f, "bundle root ({name})"),
        }
    }
}

/// Why verification failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    EmptyChain,
    ChainTooLong(usize),
    Malformed(CertError),
    Expired { not_after: String },
    NotYetValid { not_before: String },
    NotCa,
    MissingKeyCertSign,
    PathLenExceeded { path_len: u32, below: u32 },
    LeafIsCa,
    LeafKeyUsage(String),
    NoSpiffeId,
    BadSpiffeId(String),
    ForeignTrustDomain { expected: String, found: String },
    CaForeignTrustDomain { ca: String, leaf: String },
    UnknownIssuer { issuer: String },
    BadSignature { issuer: String },
    UntrustedRoot,
    UnhandledCriticalExtension(String),
    IdMismatch { expected: String },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::EmptyChain => write!(f, "the chain is empty"),
            Reason::ChainTooLong(n) => write!(
                f,
                "the chain has {n} certificates, at most {MAX_CHAIN_LEN} are followed"
            ),
            Reason::Malformed(e) => write!(f, "not a valid certificate: {e}"),
            Reason::Expired { not_after } => write!(f, "expired at {not_after}"),
            Reason::NotYetValid { not_before } => write!(f, "not valid before {not_before}"),
            Reason::NotCa => write!(
                f,
                "issues certificates but is not a CA (basicConstraints CA:FALSE or absent)"
            ),
            Reason::MissingKeyCertSign => write!(f, "is a CA without keyUsage keyCertSign"),
            Reason::PathLenExceeded { path_len, below } => write!(
                f,
                "pathLen {path_len} allows {path_len} CA certificate(s) below it, but {below} sit between it and the leaf"
            ),
            Reason::LeafIsCa => {
                write!(f, "a leaf SVID must not be a CA (basicConstraints CA:TRUE)")
            }
            Reason::LeafKeyUsage(e) => write!(f, "{e}"),
            Reason::NoSpiffeId => write!(f, "has no URI SAN: not an X.509-SVID"),
            Reason::BadSpiffeId(e) => write!(f, "{e}"),
            Reason::ForeignTrustDomain { expected, found } => {
                write!(
                    f,
                    "belongs to trust domain {found:?}, expected {expected:?}"
                )
            }
            Reason::CaForeignTrustDomain { ca, leaf } => write!(
                f,
                "is a CA of trust domain {ca:?} and cannot vouch for a leaf of trust domain {leaf:?}"
            ),
            Reason::UnknownIssuer { issuer } => write!(
                f,
                "its issuer {issuer:?} is neither in the chain nor a root of the bundle (wrong root?)"
            ),
            Reason::BadSignature { issuer } => {
                write!(
                    f,
                    "its signature does not verify with the key of {issuer:?}"
                )
            }
            Reason::UntrustedRoot => write!(f, "is a self-signed root that is not in the bundle"),
            Reason::UnhandledCriticalExtension(oid) => {
                write!(
                    f,
                    "has a critical extension strait does not process ({oid})"
                )
            }
            Reason::IdMismatch { expected } => write!(f, "is not the expected identity {expected}"),
        }
    }
}

/// A failed verification: which certificate, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{cert}: {reason}")]
pub struct VerifyError {
    pub cert: CertRef,
    pub reason: Reason,
}

/// Verifies `chain` (leaf first, then intermediates in any order; a root may
/// be included) against `bundle` at time `now`.
pub fn verify_svid(
    chain: &[Vec<u8>],
    bundle: &TrustBundle,
    now: OffsetDateTime,
) -> Result<VerifiedSvid, VerifyError> {
    let at = |position: usize, name: String, reason: Reason| VerifyError {
        cert: CertRef::Chain { position, name },
        reason,
    };
    if chain.is_empty() {
        return Err(at(1, "none".into(), Reason::EmptyChain));
    }
    if chain.len() > MAX_CHAIN_LEN {
        return Err(at(1, "leaf".into(), Reason::ChainTooLong(chain.len())));
    }
    let parsed = chain
        .iter()
        .enumerate()
        .map(|(i, der)| {
            cert::parse(der).map_err(|e| at(i + 1, "unparsable".into(), Reason::Malformed(e)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let roots = bundle
        .roots()
        .iter()
        .map(|der| {
            cert::parse(der).map(|c| (c, der)).map_err(|e| VerifyError {
                cert: CertRef::Root {
                    name: "unparsable".into(),
                },
                reason: Reason::Malformed(e),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    // The leaf.
    let leaf = &parsed[0];
    let leaf_ref = CertRef::Chain {
        position: 1,
        name: cert::display_name(leaf),
    };
    let fail = |cert: &CertRef, reason: Reason| VerifyError {
        cert: cert.clone(),
        reason,
    };
    let id = check_leaf(leaf).map_err(|r| fail(&leaf_ref, r))?;
    if let Some(td) = bundle.trust_domain()
        && td.as_str() != id.trust_domain_str()
    {
        return Err(fail(
            &leaf_ref,
            Reason::ForeignTrustDomain {
                expected: td.to_string(),
                found: id.trust_domain_str().to_string(),
            },
        ));
    }
    check_validity(leaf, now).map_err(|r| fail(&leaf_ref, r))?;
    let mut expires = cert::not_after(leaf);

    // Walk up: prefer a bundle root, else an unused intermediate of the chain.
    let mut used = vec![false; parsed.len()];
    used[0] = true;
    let mut current = 0usize;
    let mut cas_below: u32 = 0;
    loop {
        let child = &parsed[current];
        let child_ref = CertRef::Chain {
            position: current + 1,
            name: cert::display_name(child),
        };
        let issuer_name = child.issuer().to_string();

        let mut subject_matched = false;
        for (root, der) in &roots {
            if root.subject().as_raw() != child.issuer().as_raw() {
                continue;
            }
            subject_matched = true;
            if child.verify_signature(Some(root.public_key())).is_ok() {
                let root_ref = CertRef::Root {
                    name: cert::display_name(root),
                };
                check_ca(root, cas_below, &id).map_err(|r| fail(&root_ref, r))?;
                check_validity(root, now).map_err(|r| fail(&root_ref, r))?;
                expires = expires.min(cert::not_after(root));
                return Ok(VerifiedSvid {
                    spiffe_id: id,
                    expires,
                    root: (*der).clone(),
                    path_len: used.iter().filter(|u| **u).count() + 1,
                    leaf_issuer: leaf.issuer().to_string(),
                });
            }
        }
        let mut next = None;
        for (j, candidate) in parsed.iter().enumerate() {
            if used[j] || candidate.subject().as_raw() != child.issuer().as_raw() {
                continue;
            }
            subject_matched = true;
            if child.verify_signature(Some(candidate.public_key())).is_ok() {
                next = Some(j);
                break;
            }
        }
        let Some(j) = next else {
            let self_signed = child.subject().as_raw() == child.issuer().as_raw()
                && child.verify_signature(None).is_ok();
            let reason = if self_signed {
                Reason::UntrustedRoot
            } else if subject_matched {
                Reason::BadSignature {
                    issuer: issuer_name,
                }
            } else {
                Reason::UnknownIssuer {
                    issuer: issuer_name,
                }
            };
            return Err(fail(&child_ref, reason));
        };
        let ca = &parsed[j];
        let ca_ref = CertRef::Chain {
            position: j + 1,
            name: cert::display_name(ca),
        };
        check_ca(ca, cas_below, &id).map_err(|r| fail(&ca_ref, r))?;
        check_validity(ca, now).map_err(|r| fail(&ca_ref, r))?;
        expires = expires.min(cert::not_after(ca));
        used[j] = true;
        current = j;
        cas_below += 1;
    }
}

/// Checks a verified SVID is the expected identity.
pub fn expect_id(svid: &VerifiedSvid, expected: &SpiffeId) -> Result<(), VerifyError> {
    if &svid.spiffe_id == expected {
        Ok(())
    } else {
        Err(VerifyError {
            cert: CertRef::Chain {
                position: 1,
                name: svid.spiffe_id.to_string(),
            },
            reason: Reason::IdMismatch {
                expected: expected.to_string(),
            },
        })
    }
}

fn check_validity(c: &X509Certificate<'_>, now: OffsetDateTime) -> Result<(), Reason> {
    let (nb, na) = (cert::not_before(c), cert::not_after(c));
    if now < nb {
        return Err(Reason::NotYetValid {
            not_before: cert::rfc3339(nb),
        });
    }
    if now > na {
        return Err(Reason::Expired {
            not_after: cert::rfc3339(na),
        });
    }
    Ok(())
}

/// Extensions whose semantics are checked here (or are informational).
fn check_critical_extensions(c: &X509Certificate<'_>) -> Result<(), Reason> {
    for ext in c.extensions() {
        if let ParsedExtension::ParseError { error } = ext.parsed_extension() {
            return Err(Reason::Malformed(CertError::Extension {
                oid: ext.oid.to_id_string(),
                source: Box::new(error.clone()),
            }));
        }
        if !ext.critical {
            continue;
        }
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(_)
            | ParsedExtension::KeyUsage(_)
            | ParsedExtension::ExtendedKeyUsage(_)
            | ParsedExtension::SubjectAlternativeName(_)
            | ParsedExtension::SubjectKeyIdentifier(_)
            | ParsedExtension::AuthorityKeyIdentifier(_) => {}
            _ => return Err(Reason::UnhandledCriticalExtension(ext.oid.to_id_string())),
        }
    }
    Ok(())
}

fn check_leaf(c: &X509Certificate<'_>) -> Result<SpiffeId, Reason> {
    check_critical_extensions(c)?;
    let (is_ca, _) = cert::basic_constraints(c).map_err(Reason::Malformed)?;
    if is_ca {
        return Err(Reason::LeafIsCa);
    }
    match c.key_usage() {
        Ok(Some(ku)) => {
            if !ku.value.digital_signature() {
                return Err(Reason::LeafKeyUsage(
                    "keyUsage lacks digitalSignature".into(),
                ));
            }
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(Reason::LeafKeyUsage(
                    "a leaf SVID must not have keyCertSign or cRLSign".into(),
                ));
            }
        }
        Ok(None) => {
            return Err(Reason::LeafKeyUsage(
                "no keyUsage extension (digitalSignature is required)".into(),
            ));
        }
        Err(e) => return Err(Reason::Malformed(CertError::KeyUsage(e))),
    }
    let sans = cert::sans(c).map_err(Reason::Malformed)?;
    match cert::spiffe_id(&sans) {
        Ok(Some(id)) if id.is_trust_domain_id() => Err(Reason::BadSpiffeId(format!(
            "SPIFFE ID {id} is a trust domain ID; a leaf needs a path"
        ))),
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(Reason::NoSpiffeId),
        Err(e) => Err(Reason::BadSpiffeId(e.to_string())),
    }
}

/// A CA on the path: CA bit, keyCertSign, its pathLen against the number of
/// CAs between it and the leaf, and its trust domain (if it names one).
fn check_ca(c: &X509Certificate<'_>, cas_below: u32, leaf: &SpiffeId) -> Result<(), Reason> {
    check_critical_extensions(c)?;
    let (is_ca, path_len) = cert::basic_constraints(c).map_err(Reason::Malformed)?;
    if !is_ca {
        return Err(Reason::NotCa);
    }
    match c.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {}
        Ok(_) => return Err(Reason::MissingKeyCertSign),
        Err(e) => return Err(Reason::Malformed(CertError::KeyUsage(e))),
    }
    if let Some(path_len) = path_len
        && cas_below > path_len
    {
        return Err(Reason::PathLenExceeded {
            path_len,
            below: cas_below,
        });
    }
    let sans = cert::sans(c).map_err(Reason::Malformed)?;
    for uri in &sans.uris {
        if let Ok(id) = SpiffeId::parse(uri)
            && id.trust_domain_str() != leaf.trust_domain_str()
        {
            return Err(Reason::CaForeignTrustDomain {
                ca: id.trust_domain_str().to_string(),
                leaf: leaf.trust_domain_str().to_string(),
            });
        }
    }
    Ok(())
}
