//! Value matching shared by routing and authorization.

use regex::Regex;
use strait_model::istio::{StringMatch, StringMatchKind};

/// A `regex` match that does not compile, quoting the author's expression.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{pattern:?} does not compile: {source}")]
pub struct RegexError {
    pattern: String,
    #[source]
    source: regex::Error,
}

/// A compiled Istio `StringMatch`.
#[derive(Debug, Clone)]
pub(crate) enum StringMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Any,
}

impl StringMatcher {
    /// Compiles `m`; a regex must match the whole value (RE2 semantics, as
    /// Envoy's `safe_regex`).
    pub(crate) fn compile(m: &StringMatch, ignore_case: bool) -> Result<StringMatcher, RegexError> {
        let fold = |s: &str| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        Ok(match m.kind() {
            StringMatchKind::Exact(s) => StringMatcher::Exact(fold(s)),
            StringMatchKind::Prefix(s) => StringMatcher::Prefix(fold(s)),
            StringMatchKind::Regex(r) => {
                let refused = |source| RegexError {
                    pattern: r.to_owned(),
                    source,
                };
                // Compile the text as written first, so that an error
                // quotes the author's expression.
                Regex::new(r).map_err(refused)?;
                let anchored = if ignore_case {
                    format!("(?i)^(?:{r})$")
                } else {
                    format!("^(?:{r})$")
                };
                StringMatcher::Regex(Regex::new(&anchored).map_err(refused)?)
            }
            StringMatchKind::Any => StringMatcher::Any,
        })
    }

    /// Whether `value` matches (`value` already case-folded by the caller
    /// when the matcher was compiled with `ignore_case`, except for regex).
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            StringMatcher::Exact(s) => value == s,
            StringMatcher::Prefix(s) => value.starts_with(s.as_str()),
            StringMatcher::Regex(r) => r.is_match(value),
            StringMatcher::Any => true,
        }
    }
}

/// Istio's authorization value match: `*` (any non-empty value),
/// `prefix*`, `*suffix`, or exact.
pub(crate) fn istio_value_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// The cluster DNS suffix short names are completed with.
pub(crate) const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// A host as written in a VirtualService or DestinationRule of `namespace`,
/// made comparable to a service FQDN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// A full name.
    Exact(String),
    /// `*.suffix`: stores `.suffix`.
    Suffix(String),
    /// `*`.
    All,
}

impl HostPattern {
    /// A name without a dot is a short name of `namespace`.
    pub(crate) fn new(host: &str, namespace: &str) -> HostPattern {
        let host = host.to_ascii_lowercase();
        if host == "*" {
            HostPattern::All
        } else if let Some(suffix) = host.strip_prefix('*') {
            HostPattern::Suffix(suffix.to_owned())
        } else if !host.contains('.') {
            HostPattern::Exact(format!("{host}.{namespace}.{CLUSTER_DOMAIN}"))
        } else {
            HostPattern::Exact(host)
        }
    }

    /// How specifically this pattern matches `fqdn` (higher is more
    /// specific), or `None` when it does not.
    pub(crate) fn specificity(&self, fqdn: &str) -> Option<usize> {
        match self {
            HostPattern::Exact(h) => (h.eq_ignore_ascii_case(fqdn)).then_some(usize::MAX),
            HostPattern::Suffix(s) => (fqdn.len() > s.len()
                && fqdn.to_ascii_lowercase().ends_with(s.as_str()))
            .then_some(s.len()),
            HostPattern::All => Some(0),
        }
    }
}

/// Completes a destination host of an object in `namespace` to an FQDN.
pub(crate) fn qualify_host(host: &str, namespace: &str) -> String {
    match HostPattern::new(host, namespace) {
        HostPattern::Exact(h) => h,
        _ => host.to_owned(),
    }
}

/// The namespace of a SPIFFE ID `spiffe://td/ns/<ns>/sa/<sa>` (also
/// without the scheme).
pub(crate) fn identity_namespace(identity: &str) -> Option<&str> {
    let path = identity.strip_prefix("spiffe://").unwrap_or(identity);
    let mut parts = path.split('/');
    let _trust_domain = parts.next()?;
    (parts.next()? == "ns").then(|| parts.next()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_values() {
        let cases = [
            ("*", "x", true),
            ("*", "", false),
            ("/api/*", "/api/v1", true),
            ("/api/*", "/apix", false),
            ("*.png", "/a/b.png", true),
            ("*.png", "/a/b.jpg", false),
            ("/exact", "/exact", true),
            ("/exact", "/exact/", false),
        ];
        for (pattern, value, want) in cases {
            assert_eq!(
                istio_value_matches(pattern, value),
                want,
                "{pattern} {value}"
            );
        }
    }

    #[test]
    fn hosts() {
        let fqdn = "reviews.bookinfo.svc.cluster.local";
        assert_eq!(
            HostPattern::new("reviews", "bookinfo").specificity(fqdn),
            Some(usize::MAX)
        );
        assert_eq!(HostPattern::new("reviews", "other").specificity(fqdn), None);
        assert_eq!(
            HostPattern::new(fqdn, "other").specificity(fqdn),
            Some(usize::MAX)
        );
        assert!(
            HostPattern::new("*.bookinfo.svc.cluster.local", "x")
                .specificity(fqdn)
                .is_some()
        );
        assert!(
            HostPattern::new("*.cluster.local", "x").specificity(fqdn)
                < HostPattern::new("*.svc.cluster.local", "x").specificity(fqdn)
        );
        assert_eq!(
            HostPattern::new("*.other.svc.cluster.local", "x").specificity(fqdn),
            None
        );
        assert_eq!(
            identity_namespace("spiffe://cluster.local/ns/web/sa/x"),
            Some("web")
        );
        assert_eq!(identity_namespace("cluster.local/ns/web/sa/x"), Some("web"));
        assert_eq!(identity_namespace("spiffe://td/strait/cluster/x"), None);
    }

    #[test]
    fn regex_is_anchored_and_bad_regex_is_named() {
        let m = StringMatcher::compile(
            &StringMatch {
                regex: Some("/v[0-9]+".into()),
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert!(m.matches("/v12"));
        assert!(!m.matches("/v12/x"));
        let err = StringMatcher::compile(
            &StringMatch {
                regex: Some("(".into()),
                ..Default::default()
            },
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("\"(\" does not compile"), "{err}");
    }
}
