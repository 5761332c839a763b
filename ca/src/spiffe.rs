//! SPIFFE IDs and trust domains, validated exactly as the SPIFFE ID
//! specification (SPIFFE-ID.md, sections 2.1–2.3) requires, plus the cluster
//! names strait puts into identities.
//!
//! Every rejection names the rule that was broken, so that an operator who
//! typed `spiffe://Example.org/ns/default/sa/` learns which part is wrong.

use std::fmt;
use std::str::FromStr;

/// The longest trust domain name the specification allows.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The longest SPIFFE ID (as a URI) the specification allows.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";

/// The rule a SPIFFE ID, trust domain or cluster name broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("scheme must be \"spiffe://\" (lowercase), got {0:?}")]
    Scheme(String),
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain must not contain userinfo ('@')")]
    UserInfo,
    #[error("trust domain must not contain a port (':')")]
    Port,
    #[error("SPIFFE ID must not contain a query ('?')")]
    Query,
    #[error("SPIFFE ID must not contain a fragment ('#')")]
    Fragment,
    #[error("SPIFFE ID must not contain percent-encoding ('%')")]
    PercentEncoded,
    #[error(
        "trust domain may only contain lowercase letters, digits, '.', '-' and '_': \
         {character:?} at position {position}"
    )]
    TrustDomainChar { character: char, position: usize },
    #[error("trust domain is {0} bytes long; at most 255 are allowed")]
    TrustDomainTooLong(usize),
    #[error("SPIFFE ID is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
    #[error("path must not contain empty segments ('//')")]
    EmptySegment,
    #[error("path must not contain '.' or '..' segments")]
    DotSegment,
    #[error("path must not end with '/'")]
    TrailingSlash,
    #[error(
        "path segments may only contain letters, digits, '.', '-' and '_': \
         {character:?} in segment {segment:?}"
    )]
    PathChar { character: char, segment: String },
    #[error(
        "cluster name {0:?} must be a DNS label: 1 to 63 lowercase letters, digits or '-', \
         starting and ending with a letter or digit"
    )]
    ClusterName(String),
}

/// A SPIFFE trust domain, e.g. `cluster.local` or `prod.example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(TrustDomain(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>` (no path), which strait
    /// puts into its CA certificates as SPIRE does.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME}{}", self.0),
            td_end: SCHEME.len() + self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        if id.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(id.len()));
        }
        let Some(rest) = id.strip_prefix(SCHEME) else {
            let scheme = id.split_once("://").map_or(id, |(s, _)| s);
            return Err(SpiffeIdError::Scheme(scheme.chars().take(32).collect()));
        };
        // Query, fragment and percent-encoding are URI features the spec
        // forbids anywhere in the ID; report them before character rules.
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('%') {
            return Err(SpiffeIdError::PercentEncoded);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(SpiffeId {
            uri: id.to_string(),
            td_end: SCHEME.len() + td.len(),
        })
    }

    /// Builds `spiffe://<td>/<segment>/<segment>...`, validating every segment.
    pub fn from_segments(td: &TrustDomain, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut uri = format!("{SCHEME}{}", td.as_str());
        for segment in segments {
            validate_segment(segment)?;
            uri.push('/');
            uri.push_str(segment);
        }
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(uri.len()));
        }
        Ok(SpiffeId {
            uri,
            td_end: SCHEME.len() + td.as_str().len(),
        })
    }

    /// Istio's workload identity `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["ns", namespace, "sa", service_account])
    }

    /// The identity a cluster uses towards its broker:
    /// `spiffe://<td>/strait/cluster/<name>`.
    pub fn cluster(td: &TrustDomain, cluster: &ClusterName) -> Self {
        // Both parts are validated types and their lengths (255 + 63) keep
        // the URI far below the 2048-byte limit, so no check can fail here.
        SpiffeId {
            uri: format!("{SCHEME}{td}/strait/cluster/{cluster}"),
            td_end: SCHEME.len() + td.as_str().len(),
        }
    }

    /// An administrator's identity: `spiffe://<td>/strait/admin/<name>`.
    pub fn admin(td: &TrustDomain, name: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["strait", "admin", name])
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain name (without scheme).
    pub fn trust_domain_str(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    /// The trust domain, as its own type.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_string())
    }

    /// The path, `""` for a trust domain ID or `/seg/seg...`.
    pub fn path(&self) -> &str {
        &self.uri[self.td_end..]
    }

    /// The path segments (none for a trust domain ID).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// `(namespace, service account)` when this is an Istio workload ID.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut s = self.segments();
        match (s.next(), s.next(), s.next(), s.next(), s.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// True for `spiffe://<td>` with no path.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A cluster's name in a strait mesh: a DNS label (RFC 1123), so that it fits
/// in a SPIFFE path segment, a certificate subject and a Kubernetes label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if ok {
            Ok(ClusterName(name.to_string()))
        } else {
            Err(SpiffeIdError::ClusterName(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClusterName::new(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    for (position, character) in td.char_indices() {
        let ok = character.is_ascii_lowercase()
            || character.is_ascii_digit()
            || matches!(character, '.' | '-' | '_');
        if !ok {
            return Err(SpiffeIdError::TrustDomainChar {
                character,
                position,
            });
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path == "/" || path.ends_with('/') {
        // "spiffe://td/" and "spiffe://td/a/" both end in a slash; report
        // that rule rather than the empty segment it technically also is.
        return Err(SpiffeIdError::TrailingSlash);
    }
    for segment in path.split('/').skip(1) {
        validate_segment(segment)?;
    }
    Ok(())
}

fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    if let Some(character) = segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(match character {
            '%' => SpiffeIdError::PercentEncoded,
            '?' => SpiffeIdError::Query,
            '#' => SpiffeIdError::Fragment,
            _ => SpiffeIdError::PathChar {
                character,
                segment: segment.chars().take(64).collect(),
            },
        });
    }
    Ok(())
}

/// The identity a cluster's control plane serves with:
/// `spiffe://<td>/ns/strait-system/sa/controlplane`.
pub fn control_plane_id(td: &TrustDomain) -> SpiffeId {
    // Fixed, valid segments: this cannot fail for a valid trust domain.
    SpiffeId::workload(td, "strait-system", "controlplane").unwrap_or_else(|_| td.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(id: &str) -> SpiffeIdError {
        SpiffeId::parse(id).expect_err(id)
    }

    #[test]
    fn accepts_valid_ids() {
        for id in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            "spiffe://a_b-c.d9/x",
            "spiffe://td/Upper.Case-Path_ok/..a/a..",
            "spiffe://td/...",
        ] {
            let parsed = SpiffeId::parse(id).expect(id);
            assert_eq!(parsed.as_str(), id);
            assert_eq!(parsed.to_string(), id);
        }
    }

    #[test]
    fn splits_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://prod.example/ns/shop/sa/cart").unwrap();
        assert_eq!(id.trust_domain_str(), "prod.example");
        assert_eq!(id.path(), "/ns/shop/sa/cart");
        assert_eq!(
            id.segments().collect::<Vec<_>>(),
            ["ns", "shop", "sa", "cart"]
        );
        assert_eq!(id.workload_parts(), Some(("shop", "cart")));
        let td = SpiffeId::parse("spiffe://prod.example").unwrap();
        assert!(td.is_trust_domain_id());
        assert_eq!(td.path(), "");
        assert_eq!(td.segments().count(), 0);
        assert_eq!(td.workload_parts(), None);
        let other = SpiffeId::parse("spiffe://prod.example/ns/shop/sa/cart/extra").unwrap();
        assert_eq!(other.workload_parts(), None);
    }

    #[test]
    fn rejects_bad_scheme() {
        assert_eq!(err(""), SpiffeIdError::Empty);
        assert_eq!(err("https://td/x"), SpiffeIdError::Scheme("https".into()));
        assert_eq!(err("SPIFFE://td/x"), SpiffeIdError::Scheme("SPIFFE".into()));
        assert_eq!(
            err("spiffe:/td/x"),
            SpiffeIdError::Scheme("spiffe:/td/x".into())
        );
        assert_eq!(err("td/ns/x"), SpiffeIdError::Scheme("td/ns/x".into()));
    }

    #[test]
    fn rejects_bad_trust_domains() {
        assert_eq!(err("spiffe://"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(err("spiffe:///path"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(err("spiffe://user@td/x"), SpiffeIdError::UserInfo);
        assert_eq!(err("spiffe://td:8443/x"), SpiffeIdError::Port);
        assert_eq!(
            err("spiffe://Example.org/x"),
            SpiffeIdError::TrustDomainChar {
                character: 'E',
                position: 0
            }
        );
        assert_eq!(
            err("spiffe://exa mple/x"),
            SpiffeIdError::TrustDomainChar {
                character: ' ',
                position: 3
            }
        );
        assert_eq!(
            err("spiffe://tд/x"),
            SpiffeIdError::TrustDomainChar {
                character: 'д',
                position: 1
            }
        );
        let long = format!("spiffe://{}", "a".repeat(256));
        assert_eq!(err(&long), SpiffeIdError::TrustDomainTooLong(256));
        assert!(TrustDomain::new(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_query_fragment_percent() {
        assert_eq!(err("spiffe://td/x?y=1"), SpiffeIdError::Query);
        assert_eq!(err("spiffe://td?y"), SpiffeIdError::Query);
        assert_eq!(err("spiffe://td/x#frag"), SpiffeIdError::Fragment);
        assert_eq!(err("spiffe://td/a%20b"), SpiffeIdError::PercentEncoded);
        assert_eq!(err("spiffe://t%64/a"), SpiffeIdError::PercentEncoded);
    }

    #[test]
    fn rejects_bad_paths() {
        assert_eq!(err("spiffe://td/"), SpiffeIdError::TrailingSlash);
        assert_eq!(err("spiffe://td/a/"), SpiffeIdError::TrailingSlash);
        assert_eq!(err("spiffe://td//a"), SpiffeIdError::EmptySegment);
        assert_eq!(err("spiffe://td/a//b"), SpiffeIdError::EmptySegment);
        assert_eq!(err("spiffe://td/./a"), SpiffeIdError::DotSegment);
        assert_eq!(err("spiffe://td/a/.."), SpiffeIdError::DotSegment);
        assert_eq!(
            err("spiffe://td/a/b c"),
            SpiffeIdError::PathChar {
                character: ' ',
                segment: "b c".into()
            }
        );
        assert_eq!(
            err("spiffe://td/ns/dé"),
            SpiffeIdError::PathChar {
                character: 'é',
                segment: "dé".into()
            }
        );
        assert!(matches!(
            err("spiffe://td/a+b"),
            SpiffeIdError::PathChar { character: '+', .. }
        ));
    }

    #[test]
    fn rejects_too_long() {
        let id = format!("spiffe://td/{}", "a".repeat(2048));
        assert_eq!(err(&id), SpiffeIdError::TooLong(id.len()));
        let ok = format!("spiffe://td/{}", "a".repeat(2048 - 12));
        assert!(SpiffeId::parse(&ok).is_ok());
    }

    #[test]
    fn error_messages_name_the_rule() {
        assert!(
            err("spiffe://td/a/")
                .to_string()
                .contains("must not end with '/'")
        );
        assert!(err("spiffe://TD").to_string().contains("lowercase"));
        assert!(err("spiffe://td/a b").to_string().contains("\"a b\""));
    }

    #[test]
    fn workload_constructor_validates_segments() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "bookinfo", "reviews").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/bookinfo/sa/reviews");
        assert_eq!(id.trust_domain(), td);
        assert_eq!(
            SpiffeId::workload(&td, "", "x"),
            Err(SpiffeIdError::EmptySegment)
        );
        assert_eq!(
            SpiffeId::workload(&td, "..", "x"),
            Err(SpiffeIdError::DotSegment)
        );
        assert!(matches!(
            SpiffeId::workload(&td, "a/b", "x"),
            Err(SpiffeIdError::PathChar { character: '/', .. })
        ));
    }

    #[test]
    fn component_identities() {
        let td = TrustDomain::new("mesh.example").unwrap();
        let cluster = ClusterName::new("east-1").unwrap();
        assert_eq!(
            SpiffeId::cluster(&td, &cluster).as_str(),
            "spiffe://mesh.example/strait/cluster/east-1"
        );
        assert_eq!(
            SpiffeId::admin(&td, "alice").unwrap().as_str(),
            "spiffe://mesh.example/strait/admin/alice"
        );
        assert_eq!(td.id().as_str(), "spiffe://mesh.example");
        assert!(td.id().is_trust_domain_id());
    }

    #[test]
    fn cluster_names_are_dns_labels() {
        for ok in ["east", "a", "west-2", "0abc", &"a".repeat(63)] {
            ClusterName::new(ok).expect(ok);
        }
        for bad in [
            "",
            "East",
            "-east",
            "east-",
            "ea_st",
            "ea.st",
            &"a".repeat(64),
        ] {
            assert_eq!(
                ClusterName::new(bad),
                Err(SpiffeIdError::ClusterName(bad.to_string()))
            );
        }
    }

    #[test]
    fn serde_round_trip_validates() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://td/a\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://td/a\"");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/a/\"").is_err());
    }
}
