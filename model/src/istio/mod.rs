//! Istio configuration the sidecar implements, as serde types of each
//! kind's `spec` (Istio's camelCase JSON), with validation.
//!
//! One entry point, [`parse`], turns a kind name and its `spec` JSON into an
//! [`IstioSpec`] or into every problem found, each naming the field path
//! and the bad value (`spec.http[0].route[1].weight: -5 is not in 0..=100`).
//!
//! Fields Istio has and strait does not implement are ignored when their
//! absence cannot change a decision (`gateways`, `exportTo`, ...). Fields
//! whose meaning strait cannot honour and whose omission would make traffic
//! or security behave differently from what the author wrote (an
//! `AuthorizationPolicy` with `action: CUSTOM` or `requestPrincipals`, a
//! `VirtualService` route with `redirect`) are refused with a reason.
//!
//! Enumerations are read leniently (an unknown string becomes an `Other`
//! variant) so that validation, not serde, reports them with their path.
//! Regular expressions are only checked for being present here: this crate
//! does not link a regex engine; the proxy compiles them and refuses the
//! object when one does not compile.

/// Declares an enumeration read from Istio's upper-case strings, with an
/// `Other` variant for unknown values so that validation reports them with
/// their field path.
macro_rules! lenient_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal $(| $alias:literal)*),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vm])* $variant,)+
            /// A value strait does not know (refused by validation).
            Other(String),
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($text $(| $alias)* => Self::$variant,)+
                    _ => Self::Other(s),
                }
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                match v {
                    $($name::$variant => $text.to_owned(),)+
                    $name::Other(s) => s,
                }
            }
        }
    };
}

pub mod authorization_policy;
pub mod destination_rule;
pub mod peer_authentication;
pub mod sidecar;
pub mod virtual_service;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use authorization_policy::AuthorizationPolicy;
pub use destination_rule::DestinationRule;
pub use peer_authentication::PeerAuthentication;
pub use sidecar::Sidecar;
pub use virtual_service::VirtualService;

/// The kinds [`parse`] understands.
pub const KINDS: [&str; 5] = [
    "VirtualService",
    "DestinationRule",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "Sidecar",
];

/// A validated `spec` of one of the [`KINDS`].
// Parsed once per pushed object and then compiled: boxing would only add
// noise at every match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum IstioSpec {
    /// `networking.istio.io/v1` VirtualService.
    VirtualService(VirtualService),
    /// `networking.istio.io/v1` DestinationRule.
    DestinationRule(DestinationRule),
    /// `security.istio.io/v1` PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// `security.istio.io/v1` AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// `networking.istio.io/v1` Sidecar.
    Sidecar(Sidecar),
}

/// Parses and validates the `spec` of an object of `kind`.
///
/// Returns every problem found (not only the first), each starting with the
/// path of the bad field (`spec.…`).
pub fn parse(kind: &str, spec_json: &serde_json::Value) -> Result<IstioSpec, Vec<String>> {
    match kind {
        "VirtualService" => parse_as::<VirtualService>(spec_json).map(IstioSpec::VirtualService),
        "DestinationRule" => parse_as::<DestinationRule>(spec_json).map(IstioSpec::DestinationRule),
        "PeerAuthentication" => {
            parse_as::<PeerAuthentication>(spec_json).map(IstioSpec::PeerAuthentication)
        }
        "AuthorizationPolicy" => {
            parse_as::<AuthorizationPolicy>(spec_json).map(IstioSpec::AuthorizationPolicy)
        }
        "Sidecar" => parse_as::<Sidecar>(spec_json).map(IstioSpec::Sidecar),
        other => Err(vec![format!(
            "kind {other:?} is not one of {}",
            KINDS.join(", ")
        )]),
    }
}

fn parse_as<T: DeserializeOwned + Validate>(spec: &serde_json::Value) -> Result<T, Vec<String>> {
    if !spec.is_object() {
        return Err(vec![format!("spec: expected an object, got {spec}")]);
    }
    let value = T::deserialize(spec).map_err(|e| vec![format!("spec: {e}")])?;
    let mut errors = Errors::default();
    value.validate(&Path::root(), &mut errors);
    if errors.0.is_empty() {
        Ok(value)
    } else {
        Err(errors.0)
    }
}

/// Validation of a parsed value: appends one message per problem.
pub(crate) trait Validate {
    fn validate(&self, path: &Path, errors: &mut Errors);
}

/// Collected validation messages.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<String>);

impl Errors {
    pub(crate) fn at(&mut self, path: &Path, message: impl fmt::Display) {
        self.0.push(format!("{path}: {message}"));
    }
}

/// A field path such as `spec.http[0].route[1].weight`.
#[derive(Debug, Clone)]
pub(crate) struct Path(String);

impl Path {
    pub(crate) fn root() -> Path {
        Path("spec".to_owned())
    }
    pub(crate) fn field(&self, name: &str) -> Path {
        Path(format!("{}.{name}", self.0))
    }
    pub(crate) fn index(&self, i: usize) -> Path {
        Path(format!("{}[{i}]", self.0))
    }
    pub(crate) fn key(&self, k: &str) -> Path {
        Path(format!("{}[{k:?}]", self.0))
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Istio's `StringMatch`: exactly one of `exact`, `prefix`, `regex`.
///
/// An empty `StringMatch` (`{}`) is allowed in `headers`, where it means
/// "the header is present"; elsewhere it matches any value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    /// The value must equal this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value must start with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The value must fully match this RE2 regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// The one condition a valid [`StringMatch`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMatchKind<'a> {
    /// Equal to.
    Exact(&'a str),
    /// Starts with.
    Prefix(&'a str),
    /// Fully matches the regular expression.
    Regex(&'a str),
    /// No condition (`{}`): any value, as long as there is one.
    Any,
}

impl StringMatch {
    /// The condition, once validated (the first set field otherwise).
    pub fn kind(&self) -> StringMatchKind<'_> {
        if let Some(s) = &self.exact {
            StringMatchKind::Exact(s)
        } else if let Some(s) = &self.prefix {
            StringMatchKind::Prefix(s)
        } else if let Some(s) = &self.regex {
            StringMatchKind::Regex(s)
        } else {
            StringMatchKind::Any
        }
    }
}

impl Validate for StringMatch {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        let set = [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.regex.is_some(),
        ]
        .into_iter()
        .filter(|s| *s)
        .count();
        if set > 1 {
            errors.at(path, "only one of exact, prefix, regex may be set");
        }
        if let Some(r) = &self.regex
            && r.is_empty()
        {
            errors.at(&path.field("regex"), "must not be empty");
        }
    }
}

/// `selector` of PeerAuthentication and AuthorizationPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels a workload must all carry to be selected.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    /// Whether a workload with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }
}

impl Validate for LabelSelector {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        validate_labels(&self.match_labels, &path.field("matchLabels"), errors);
    }
}

pub(crate) fn validate_labels(labels: &BTreeMap<String, String>, path: &Path, errors: &mut Errors) {
    for (k, v) in labels {
        if k.is_empty() || k.len() > 317 || k.contains(char::is_whitespace) {
            errors.at(&path.key(k), format!("{k:?} is not a label key"));
        }
        if v.contains('*') {
            errors.at(
                &path.key(k),
                format!("{v:?}: wildcards are not allowed in label values"),
            );
        }
    }
}

/// Istio's `Percent`: `{ value: 0.0..=100.0 }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, serde::Serialize)]
pub struct Percent {
    /// Percentage, 0 to 100.
    #[serde(default)]
    pub value: f64,
}

impl Validate for Percent {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if !(0.0..=100.0).contains(&self.value) {
            errors.at(
                &path.field("value"),
                format!("{} is not in 0..=100", self.value),
            );
        }
    }
}

/// A text that is not a duration [`parse_duration`] accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration ({reason}; e.g. \"1.5s\", \"100ms\")")]
pub struct DurationError {
    /// The text given.
    pub text: String,
    /// What is wrong with it (`missing unit`, `too large`, ...).
    pub reason: &'static str,
}

/// Parses a duration as Istio's CRDs accept it (`duration()` of CEL, Go's
/// `time.ParseDuration` without a sign): one or more decimal numbers each
/// followed by a unit `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`, e.g. `1.5s`,
/// `100ms`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let bad = |reason: &'static str| DurationError {
        text: text.to_string(),
        reason,
    };
    if text.is_empty() {
        return Err(bad("empty"));
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("missing unit"))?;
        if num_len == 0 {
            return Err(bad("expected a number"));
        }
        let number: f64 = rest[..num_len].parse().map_err(|_| bad("bad number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad("unknown unit")),
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    // At most 10 years: Istio's durations are timeouts and intervals.
    if !total.is_finite() || total > 315_360_000.0 {
        return Err(bad("too large"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Validates an optional duration field, with Istio's 1 ms minimum.
pub(crate) fn validate_duration(value: &Option<String>, path: &Path, errors: &mut Errors) {
    if let Some(text) = value {
        match parse_duration(text) {
            Ok(d) if d < Duration::from_millis(1) => {
                errors.at(path, format!("{text:?} is shorter than 1ms"))
            }
            Ok(_) => {}
            Err(e) => errors.at(path, e),
        }
    }
}

/// A text that is not an IP address or CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{text:?} is not an IP address or CIDR block")]
    Address { text: String },
    #[error("{text:?}: prefix length {prefix:?} is not in 0..={max}")]
    PrefixLength {
        text: String,
        prefix: String,
        max: u8,
    },
}

/// Parses an IP address or CIDR block (`10.0.0.0/8`, `2001:db8::/32`,
/// `192.168.1.7`) into an address and prefix length.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), CidrError> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| CidrError::Address {
        text: text.to_string(),
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len =
        match len {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                CidrError::PrefixLength {
                    text: text.to_string(),
                    prefix: l.to_string(),
                    max,
                }
            })?,
        };
    Ok((ip, len))
}

/// Whether `name` is a DNS label (RFC 1123: lowercase alphanumerics and
/// `-`, at most 63, starting and ending with an alphanumeric).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `host` is a host name as Istio accepts in `hosts`: a DNS name
/// (labels of letters, digits, `-`), optionally starting with `*.`, or `*`.
pub fn is_host_name(host: &str) -> bool {
    if host == "*" {
        return true;
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

pub(crate) fn validate_port(port: i64, path: &Path, errors: &mut Errors) {
    if !(1..=65535).contains(&port) {
        errors.at(path, format!("{port} is not a port in 1..=65535"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("1.5s", 1500),
            ("100ms", 100),
            ("1m", 60_000),
            ("1h30m", 5_400_000),
            ("2s500ms", 2500),
            ("250000us", 250),
        ];
        for (text, ms) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in [
            "",
            "1",
            "s",
            "1x",
            "-1s",
            "1.2.3s",
            "ms",
            "1 s",
            "99999999999h",
        ] {
            let err = parse_duration(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok(("10.0.0.0".parse().unwrap(), 8))
        );
        assert_eq!(parse_cidr("::1"), Ok(("::1".parse().unwrap(), 128)));
        for bad in ["", "10.0.0.0/33", "10.0.0/8", "x/1", "::/129", "1.2.3.4/-1"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(is_dns_label("v1"));
        assert!(!is_dns_label("V1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(""));
        assert!(is_host_name("*.example.com"));
        assert!(is_host_name("reviews"));
        assert!(!is_host_name("a..b"));
        assert!(!is_host_name("*a.b"));
    }

    #[test]
    fn unknown_kind_and_non_object() {
        let err = parse("Gateway", &serde_json::json!({})).unwrap_err();
        assert!(err[0].contains("\"Gateway\""), "{err:?}");
        let err = parse("Sidecar", &serde_json::json!([1])).unwrap_err();
        assert!(err[0].starts_with("spec: expected an object"), "{err:?}");
    }
}
