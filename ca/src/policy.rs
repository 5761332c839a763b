//! Signing policy: what a CA may put into a certificate for a requester.
//!
//! Two layers. The base rules are fixed and always run: a leaf carries
//! exactly one URI SAN, a valid SPIFFE ID of the CA's own trust domain, no CA
//! bit, and only DNS names besides. On top of them a [`SigningPolicy`] decides
//! per caller (the control plane grants a workload only its own service
//! account, for example). A policy can only narrow what the base rules allow.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::cert::Sans;
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a signing request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("refusing to issue a CA certificate: the CSR asks for basicConstraints CA:TRUE")]
    RequestsCa,
    #[error("the CSR must carry exactly one URI SAN (the SPIFFE ID); it has {0}")]
    UriSanCount(usize),
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {error}")]
    NotSpiffe { uri: String, error: SpiffeIdError },
    #[error("{requested} is in trust domain {:?}; this CA signs only for {allowed:?}", .requested.trust_domain_str())]
    ForeignTrustDomain {
        requested: SpiffeId,
        allowed: String,
    },
    #[error("{0} is a trust domain ID; a workload identity needs a path")]
    TrustDomainId(SpiffeId),
    #[error("the CSR asks for {kind} SANs ({values}); only one URI and DNS names are allowed")]
    UnsupportedSan { kind: &'static str, values: String },
    #[error("DNS SAN {0:?} is not a valid DNS name")]
    BadDnsName(String),
    #[error(
        "the CSR's URI SANs {0:?} are not allowed in an intermediate; only the trust domain ID is"
    )]
    IntermediateUris(Vec<String>),
    #[error(
        "the CSR names cluster {csr:?} in its subject but the request is for cluster {requested:?}"
    )]
    ClusterMismatch { csr: String, requested: String },
    #[error("caller is not entitled to {id}: {reason}")]
    NotEntitled { id: SpiffeId, reason: String },
    #[error("requested TTL {requested:?} exceeds the maximum {max:?}")]
    TtlTooLong { requested: Duration, max: Duration },
}

/// A leaf signing request after the base rules: what a policy decides on.
#[derive(Debug, Clone)]
pub struct LeafRequest<'a> {
    pub spiffe_id: &'a SpiffeId,
    pub dns_names: &'a [String],
    pub ttl: Duration,
}

/// Per-caller decisions layered on the base rules.
pub trait SigningPolicy: Send + Sync {
    /// Refuses the request with a reason, or lets it through.
    fn authorize(&self, request: &LeafRequest<'_>) -> Result<(), PolicyError>;
}

/// Only the base rules: any identity in the CA's trust domain. This is what
/// an operator with the CA key on disk gets (`strait ca issue-workload`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyIdentityInTrustDomain;

impl SigningPolicy for AnyIdentityInTrustDomain {
    fn authorize(&self, _: &LeafRequest<'_>) -> Result<(), PolicyError> {
        Ok(())
    }
}

/// A caller entitled to a fixed set of identities, optionally with a TTL cap
/// (e.g. a workload authenticated as one service account).
#[derive(Debug, Clone, Default)]
pub struct Entitled {
    pub identities: BTreeSet<SpiffeId>,
    pub max_ttl: Option<Duration>,
}

impl SigningPolicy for Entitled {
    fn authorize(&self, request: &LeafRequest<'_>) -> Result<(), PolicyError> {
        if !self.identities.contains(request.spiffe_id) {
            return Err(PolicyError::NotEntitled {
                id: request.spiffe_id.clone(),
                reason: if self.identities.is_empty() {
                    "the caller is entitled to no identity".to_string()
                } else {
                    let list: Vec<_> = self.identities.iter().map(|i| i.as_str()).collect();
                    format!("the caller is entitled only to {}", list.join(", "))
                },
            });
        }
        if let Some(max) = self.max_ttl
            && request.ttl > max
        {
            return Err(PolicyError::TtlTooLong {
                requested: request.ttl,
                max,
            });
        }
        Ok(())
    }
}

/// The fixed rules for a leaf (X.509-SVID) request; returns the SPIFFE ID
/// and the DNS names to issue.
pub(crate) fn leaf_base_rules(
    sans: &Sans,
    requests_ca: bool,
    trust_domain: &TrustDomain,
) -> Result<(SpiffeId, Vec<String>), PolicyError> {
    if requests_ca {
        return Err(PolicyError::RequestsCa);
    }
    if !sans.ips.is_empty() {
        return Err(PolicyError::UnsupportedSan {
            kind: "IP address",
            values: sans.ips.join(", "),
        });
    }
    if !sans.other.is_empty() {
        return Err(PolicyError::UnsupportedSan {
            kind: "other",
            values: sans.other.join(", "),
        });
    }
    let uri = match sans.uris.as_slice() {
        [one] => one,
        many => return Err(PolicyError::UriSanCount(many.len())),
    };
    let id = SpiffeId::parse(uri).map_err(|error| PolicyError::NotSpiffe {
        uri: uri.clone(),
        error,
    })?;
    if id.trust_domain_str() != trust_domain.as_str() {
        return Err(PolicyError::ForeignTrustDomain {
            requested: id,
            allowed: trust_domain.to_string(),
        });
    }
    if id.is_trust_domain_id() {
        return Err(PolicyError::TrustDomainId(id));
    }
    for name in &sans.dns {
        if !is_dns_name(name) {
            return Err(PolicyError::BadDnsName(name.clone()));
        }
    }
    Ok((id, sans.dns.clone()))
}

/// A DNS name for a SAN: labels of letters, digits and '-', at most 63 bytes
/// each and 253 in all; a leading `*` label is allowed (wildcard).
pub fn is_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut labels = name.split('.').peekable();
    if labels.peek() == Some(&"*") {
        labels.next();
        if labels.peek().is_none() {
            return false;
        }
    }
    labels.all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn sans(uris: &[&str], dns: &[&str]) -> Sans {
        Sans {
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            ..Sans::default()
        }
    }

    #[test]
    fn accepts_one_spiffe_id_and_dns_names() {
        let (id, dns) = leaf_base_rules(
            &sans(
                &["spiffe://cluster.local/ns/a/sa/b"],
                &["b.a.svc", "*.b.a.svc"],
            ),
            false,
            &td(),
        )
        .unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(dns, ["b.a.svc", "*.b.a.svc"]);
    }

    #[test]
    fn refusals() {
        let ok = ["spiffe://cluster.local/ns/a/sa/b"];
        assert_eq!(
            leaf_base_rules(&sans(&ok, &[]), true, &td()),
            Err(PolicyError::RequestsCa)
        );
        assert_eq!(
            leaf_base_rules(&sans(&[], &["x"]), false, &td()),
            Err(PolicyError::UriSanCount(0))
        );
        assert_eq!(
            leaf_base_rules(
                &sans(&[ok[0], "spiffe://cluster.local/ns/a/sa/c"], &[]),
                false,
                &td()
            ),
            Err(PolicyError::UriSanCount(2))
        );
        assert!(matches!(
            leaf_base_rules(
                &sans(&["spiffe://cluster.local/ns/../x"], &[]),
                false,
                &td()
            ),
            Err(PolicyError::NotSpiffe {
                error: SpiffeIdError::DotSegment,
                ..
            })
        ));
        assert!(matches!(
            leaf_base_rules(&sans(&["spiffe://other.mesh/ns/a/sa/b"], &[]), false, &td()),
            Err(PolicyError::ForeignTrustDomain { .. })
        ));
        assert!(matches!(
            leaf_base_rules(&sans(&["spiffe://cluster.local"], &[]), false, &td()),
            Err(PolicyError::TrustDomainId(_))
        ));
        assert_eq!(
            leaf_base_rules(&sans(&ok, &["bad_name"]), false, &td()),
            Err(PolicyError::BadDnsName("bad_name".into()))
        );
        let mut with_ip = sans(&ok, &[]);
        with_ip.ips.push("10.0.0.1".into());
        assert!(matches!(
            leaf_base_rules(&with_ip, false, &td()),
            Err(PolicyError::UnsupportedSan {
                kind: "IP address",
                ..
            })
        ));
    }

    #[test]
    fn foreign_trust_domain_message_names_both() {
        let err = leaf_base_rules(
            &sans(&["spiffe://evil.example/ns/a/sa/b"], &[]),
            false,
            &td(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("evil.example") && err.contains("cluster.local"),
            "{err}"
        );
    }

    #[test]
    fn entitlement_narrows() {
        let mine = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let other = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/c").unwrap();
        let policy = Entitled {
            identities: [mine.clone()].into(),
            max_ttl: Some(Duration::from_secs(3600)),
        };
        let req = |id, secs| LeafRequest {
            spiffe_id: id,
            dns_names: &[],
            ttl: Duration::from_secs(secs),
        };
        assert_eq!(policy.authorize(&req(&mine, 60)), Ok(()));
        assert!(matches!(
            policy.authorize(&req(&other, 60)),
            Err(PolicyError::NotEntitled { .. })
        ));
        assert!(matches!(
            policy.authorize(&req(&mine, 7200)),
            Err(PolicyError::TtlTooLong { .. })
        ));
        assert!(
            Entitled::default()
                .authorize(&req(&mine, 1))
                .unwrap_err()
                .to_string()
                .contains("no identity")
        );
    }

    #[test]
    fn dns_names() {
        for ok in [
            "a",
            "a.b",
            "reviews.bookinfo.svc.cluster.local",
            "*.x.y",
            "a-b.c.",
            "A.B",
        ] {
            assert!(is_dns_name(ok), "{ok}");
        }
        let long_label = "a".repeat(64);
        for bad in [
            "",
            "*",
            "a..b",
            "-a",
            "a-",
            "a_b",
            "a b",
            "*.*.x",
            "a.*",
            &long_label,
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}
