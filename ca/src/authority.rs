//! Certificate authorities: a root, and per-cluster intermediates issued from
//! CSRs, both able to sign X.509-SVID leaves from CSRs.
//!
//! Every issuance takes `now` as an argument (no clock inside), so validity
//! capping and expiry are tested without waiting.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::cert::{self, CertError};
use crate::csr::{Csr, CsrError};
use crate::pemfile::{self, PemError};
use crate::policy::{self, LeafRequest, PolicyError, SigningPolicy};
use crate::spiffe::{ClusterName, SpiffeId, TrustDomain};

/// Default validity of a root CA.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Default validity of a cluster intermediate.
pub const DEFAULT_INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// Default TTL of a workload certificate.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far `notBefore` is set into the past, for verifiers whose clocks lag.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The common name of a root when none is given.
pub const DEFAULT_ROOT_COMMON_NAME: &str = "strait root CA";
/// The organizational unit that marks a cluster intermediate's subject.
pub const INTERMEDIATE_OU: &str = "strait clusters";

/// The subject of cluster `cluster`'s intermediate in trust domain `td`,
/// as a certificate's subject or issuer prints
/// (`O=<td>, OU=strait clusters, CN=<cluster>`).
pub fn intermediate_subject(td: &str, cluster: &str) -> String {
    format!("O={td}, OU={INTERMEDIATE_OU}, CN={cluster}")
}

/// The cluster a printed subject names when it is a cluster
/// intermediate's of trust domain `td` ([`intermediate_subject`]).
pub fn cluster_of_intermediate<'a>(td: &str, subject: &'a str) -> Option<&'a str> {
    subject
        .strip_prefix(&intermediate_subject(td, ""))
        .filter(|c| !c.is_empty() && !c.contains(','))
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("CA {0}: {1}")]
    Pem(&'static str, PemError),
    #[error("CA certificate {subject:?} is not a CA: {reason}")]
    NotACa { subject: String, reason: String },
    #[error("CA private key does not match the public key of certificate {0:?}")]
    KeyMismatch(String),
    #[error(
        "CA certificate {0:?} names no trust domain (no spiffe://<trust-domain> URI SAN); \
         give the trust domain explicitly"
    )]
    NoTrustDomain(String),
    #[error("CA certificate is for trust domain {cert:?} but {given:?} was given")]
    TrustDomainMismatch { cert: String, given: String },
    #[error("CA chain is broken: {0}")]
    BadChain(String),
    #[error("CA chain is broken: certificate #{position}: {source}")]
    BadChainCertificate {
        position: usize,
        #[source]
        source: CertError,
    },
    #[error("CA chain is broken: {0}")]
    BadSigningCertificate(#[source] CertError),
    #[error("CA {subject:?} is not valid at {now}: valid from {not_before} until {not_after}")]
    CaNotValid {
        subject: String,
        now: String,
        not_before: String,
        not_after: String,
    },
    #[error("CA {subject:?} has pathLen {path_len}: it cannot issue another CA")]
    CannotIssueCa { subject: String, path_len: u32 },
    #[error("{what} must be longer than zero")]
    ZeroValidity { what: &'static str },
    #[error("key generation failed: {0}")]
    KeyGen(String),
    #[error("certificate encoding failed: {0}")]
    Encode(String),
}

/// Key algorithms strait generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    EcdsaP384,
}

/// Generates a private key where it will be used.
pub fn generate_key(alg: KeyAlgorithm) -> Result<KeyPair, IssueError> {
    let alg = match alg {
        KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    KeyPair::generate_for(alg).map_err(|e| IssueError::KeyGen(e.to_string()))
}

/// A CSR for a cluster intermediate (subject CN = the cluster name); the
/// cluster keeps `key`.
pub fn intermediate_csr(cluster: &ClusterName, key: &KeyPair) -> Result<String, IssueError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, cluster.as_str());
    let csr = params
        .serialize_request(key)
        .map_err(|e| IssueError::Encode(e.to_string()))?;
    csr.pem().map_err(|e| IssueError::Encode(e.to_string()))
}

/// A CSR for a workload certificate carrying `id` and optional DNS names.
pub fn leaf_csr(id: &SpiffeId, dns: &[String], key: &KeyPair) -> Result<String, IssueError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names.push(san_uri(id.as_str())?);
    for name in dns {
        params.subject_alt_names.push(SanType::DnsName(
            name.as_str()
                .try_into()
                .map_err(|_| PolicyError::BadDnsName(name.clone()))?,
        ));
    }
    let csr = params
        .serialize_request(key)
        .map_err(|e| IssueError::Encode(e.to_string()))?;
    csr.pem().map_err(|e| IssueError::Encode(e.to_string()))
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub der: Vec<u8>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Issued {
    pub fn pem(&self) -> String {
        pemfile::encode(pemfile::CERTIFICATE, &self.der)
    }
}

/// A signing CA: its key, its certificate and the chain up to its root.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate first, its root last (a root: just itself).
    chain: Vec<Vec<u8>>,
    trust_domain: TrustDomain,
    subject: String,
    not_before: OffsetDateTime,
    /// The earliest expiry along the chain: nothing issued may outlive it.
    not_after: OffsetDateTime,
    path_len: Option<u32>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("subject", &self.subject)
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// How to make a root.
#[derive(Debug, Clone)]
pub struct RootOptions {
    pub trust_domain: TrustDomain,
    pub common_name: Option<String>,
    pub validity: Duration,
    pub key_algorithm: KeyAlgorithm,
}

impl Authority {
    /// Makes a new self-signed root CA (key generated here).
    pub fn create_root(opts: &RootOptions, now: OffsetDateTime) -> Result<Self, IssueError> {
        if opts.validity.is_zero() {
            return Err(IssueError::ZeroValidity {
                what: "root validity",
            });
        }
        let key = generate_key(opts.key_algorithm)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, opts.trust_domain.as_str());
        params.distinguished_name.push(
            DnType::CommonName,
            opts.common_name
                .as_deref()
                .unwrap_or(DEFAULT_ROOT_COMMON_NAME),
        );
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + opts.validity;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![san_uri(opts.trust_domain.id().as_str())?];
        let cert = params
            .self_signed(&key)
            .map_err(|e| IssueError::Encode(e.to_string()))?;
        Self::from_der(vec![cert.der().to_vec()], key, None)
    }

    /// Loads a CA from PEM: `chain` holds the signing certificate first and
    /// its issuers up to the root; `key` is the signing certificate's key.
    pub fn from_pem(
        chain: &[u8],
        key: &[u8],
        trust_domain: Option<&TrustDomain>,
    ) -> Result<Self, IssueError> {
        let chain = pemfile::parse_certificates(chain).map_err(|e| IssueError::Pem("chain", e))?;
        let key = pemfile::parse_private_key(key).map_err(|e| IssueError::Pem("key", e))?;
        Self::from_der(chain, key, trust_domain)
    }

    /// Loads a CA from DER certificates (signing cert first, root last) and
    /// its key, checking that they fit together.
    pub fn from_der(
        chain: Vec<Vec<u8>>,
        key: KeyPair,
        trust_domain: Option<&TrustDomain>,
    ) -> Result<Self, IssueError> {
        let Some(first) = chain.first() else {
            return Err(IssueError::BadChain("no certificate".into()));
        };
        let parsed = chain
            .iter()
            .enumerate()
            .map(|(i, der)| {
                cert::parse(der).map_err(|source| IssueError::BadChainCertificate {
                    position: i + 1,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let signing = &parsed[0];
        let subject = cert::display_name(signing);

        let (is_ca, path_len) =
            cert::basic_constraints(signing).map_err(IssueError::BadSigningCertificate)?;
        if !is_ca {
            return Err(IssueError::NotACa {
                subject,
                reason: "basicConstraints CA is not set".into(),
            });
        }
        if let Ok(Some(ku)) = signing.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(IssueError::NotACa {
                subject,
                reason: "keyUsage lacks keyCertSign".into(),
            });
        }
        if key.public_key_raw() != signing.public_key().subject_public_key.data.as_ref() {
            return Err(IssueError::KeyMismatch(subject));
        }
        for (i, pair) in parsed.windows(2).enumerate() {
            if pair[0].issuer().as_raw() != pair[1].subject().as_raw()
                || pair[0]
                    .verify_signature(Some(pair[1].public_key()))
                    .is_err()
            {
                return Err(IssueError::BadChain(format!(
                    "certificate #{} ({}) is not issued by certificate #{} ({})",
                    i + 1,
                    cert::display_name(&pair[0]),
                    i + 2,
                    cert::display_name(&pair[1]),
                )));
            }
        }
        let root = &parsed[parsed.len() - 1];
        if root.subject().as_raw() != root.issuer().as_raw() || root.verify_signature(None).is_err()
        {
            return Err(IssueError::BadChain(format!(
                "the chain does not end at a self-signed root (last is {})",
                cert::display_name(root)
            )));
        }

        let sans = cert::sans(signing).map_err(IssueError::BadSigningCertificate)?;
        let cert_td = sans
            .uris
            .iter()
            .filter_map(|u| SpiffeId::parse(u).ok())
            .find(SpiffeId::is_trust_domain_id)
            .map(|id| id.trust_domain());
        let trust_domain = match (cert_td, trust_domain) {
            (Some(c), Some(g)) if &c != g => {
                return Err(IssueError::TrustDomainMismatch {
                    cert: c.to_string(),
                    given: g.to_string(),
                });
            }
            (Some(c), _) => c,
            (None, Some(g)) => g.clone(),
            (None, None) => return Err(IssueError::NoTrustDomain(subject)),
        };

        let not_before = cert::not_before(signing);
        let not_after = parsed
            .iter()
            .map(cert::not_after)
            .min()
            .unwrap_or_else(|| cert::not_after(signing));
        let issuer = Issuer::from_ca_cert_der(&first.as_slice().into(), key)
            .map_err(|e| IssueError::BadChain(e.to_string()))?;
        Ok(Authority {
            issuer,
            chain,
            trust_domain,
            subject,
            not_before,
            not_after,
            path_len,
        })
    }

    /// The signing certificate (DER).
    pub fn certificate_der(&self) -> &[u8] {
        &self.chain[0]
    }

    /// The signing certificate followed by its issuers up to the root.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The root this CA chains to.
    pub fn root_der(&self) -> &[u8] {
        &self.chain[self.chain.len() - 1]
    }

    pub fn is_root(&self) -> bool {
        self.chain.len() == 1
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The effective expiry (earliest along the chain).
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The CA's private key as PKCS#8 PEM, for writing to its own disk.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a cluster intermediate CA (pathLen 0) for the key in `csr`.
    pub fn issue_intermediate(
        &self,
        csr: &Csr,
        cluster: &ClusterName,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, IssueError> {
        if validity.is_zero() {
            return Err(IssueError::ZeroValidity {
                what: "intermediate validity",
            });
        }
        if let Some(path_len) = self.path_len
            && path_len == 0
        {
            return Err(IssueError::CannotIssueCa {
                subject: self.subject.clone(),
                path_len,
            });
        }
        if let Some(cn) = csr.common_name()
            && cn != cluster.as_str()
        {
            return Err(PolicyError::ClusterMismatch {
                csr: cn.to_string(),
                requested: cluster.to_string(),
            }
            .into());
        }
        let td_id = self.trust_domain.id();
        let stray: Vec<String> = csr
            .sans()
            .uris
            .iter()
            .filter(|u| u.as_str() != td_id.as_str())
            .cloned()
            .collect();
        if !stray.is_empty() {
            return Err(PolicyError::IntermediateUris(stray).into());
        }

        let (not_before, not_after) = self.window(validity, now)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, INTERMEDIATE_OU);
        params
            .distinguished_name
            .push(DnType::CommonName, cluster.as_str());
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![san_uri(td_id.as_str())?];
        params.use_authority_key_identifier_extension = true;
        self.sign(&params, csr, not_before, not_after)
    }

    /// Issues an X.509-SVID for the SPIFFE ID in `csr`, if the base rules and
    /// `policy` allow it. The TTL is capped by the chain's expiry.
    pub fn issue_leaf(
        &self,
        csr: &Csr,
        ttl: Duration,
        policy: &dyn SigningPolicy,
        now: OffsetDateTime,
    ) -> Result<Issued, IssueError> {
        if ttl.is_zero() {
            return Err(IssueError::ZeroValidity { what: "TTL" });
        }
        let (id, dns) = policy::leaf_base_rules(csr.sans(), csr.requests_ca(), &self.trust_domain)?;
        policy.authorize(&LeafRequest {
            spiffe_id: &id,
            dns_names: &dns,
            ttl,
        })?;
        let (not_before, not_after) = self.window(ttl, now)?;
        let mut params = CertificateParams::default();
        // An empty subject, as Istio's SVIDs: the identity is the URI SAN
        // (which rcgen then marks critical, as RFC 5280 requires).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names.push(san_uri(id.as_str())?);
        for name in &dns {
            params.subject_alt_names.push(SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|_| PolicyError::BadDnsName(name.clone()))?,
            ));
        }
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        self.sign(&params, csr, not_before, not_after)
    }

    /// `[now - skew, min(now + validity, chain expiry)]`, refusing when this
    /// CA is not valid at `now`.
    fn window(
        &self,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<(OffsetDateTime, OffsetDateTime), IssueError> {
        if now < self.not_before || now >= self.not_after {
            return Err(IssueError::CaNotValid {
                subject: self.subject.clone(),
                now: cert::rfc3339(now),
                not_before: cert::rfc3339(self.not_before),
                not_after: cert::rfc3339(self.not_after),
            });
        }
        // X.509 times have whole seconds: drop the fraction here so that
        // `Issued` reports exactly what the certificate says.
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let not_before = (now - CLOCK_SKEW).max(self.not_before);
        let not_after = (now + validity).min(self.not_after);
        Ok((not_before, not_after))
    }

    fn sign(
        &self,
        params: &CertificateParams,
        csr: &Csr,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, IssueError> {
        let public_key = csr.public_key()?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| IssueError::Encode(e.to_string()))?;
        Ok(Issued {
            der: cert.der().to_vec(),
            not_before,
            not_after,
        })
    }
}

#[cfg(any(test, feature = "testing"))]
impl Authority {
    /// Signs arbitrary parameters, bypassing every rule: for tests that need
    /// certificates which break the rules (a CA under a pathLen-0 CA, a leaf
    /// with two URIs) to check that verification refuses them.
    pub fn sign_unchecked(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Vec<u8> {
        #[allow(clippy::expect_used)]
        params
            .signed_by(public_key, &self.issuer)
            .expect("rcgen signs valid parameters")
            .der()
            .to_vec()
    }
}

fn san_uri(uri: &str) -> Result<SanType, IssueError> {
    Ok(SanType::URI(uri.try_into().map_err(
        |e: rcgen::Error| IssueError::Encode(e.to_string()),
    )?))
}

/// A random positive 128-bit serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> Result<SerialNumber, IssueError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IssueError::KeyGen("no system randomness for the serial number".into()))?;
    // Positive, and exactly 16 bytes long (no leading zero octet to strip).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}
