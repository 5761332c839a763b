//! The syntax rules of Kubernetes' `k8s.io/apimachinery/pkg/util/validation`
//! (`IsDNS1123Label`, `IsDNS1123Subdomain`, `IsDNS1035Label`,
//! `IsQualifiedName`, `IsValidLabelValue`, `IsValidPortNum`,
//! `IsValidPortName`, `IsValidIP`) and the host rules of Istio's
//! `pkg/config/validation`. Each returns every message that applies (as
//! Kubernetes does), worded as Kubernetes words them; empty when valid.

/// The longest DNS-1123 label (and label value, and label name part).
pub const DNS1123_LABEL_MAX: usize = 63;
/// The longest DNS-1123 subdomain.
pub const DNS1123_SUBDOMAIN_MAX: usize = 253;
/// The longest IANA service name (a named port).
pub const PORT_NAME_MAX: usize = 15;
/// The longest FQDN Istio accepts as a host.
pub const FQDN_MAX: usize = 255;

fn max_len(n: usize) -> String {
    format!("must be no more than {n} bytes")
}

fn alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
fn dns1123_label_syntax(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| alnum_lower(*c) || *c == b'-')
        && alnum_lower(b[0])
        && alnum_lower(b[b.len() - 1])
}

/// A lowercase RFC 1123 label: namespaces, Service port names.
pub fn dns1123_label(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > DNS1123_LABEL_MAX {
        errs.push(max_len(DNS1123_LABEL_MAX));
    }
    if !dns1123_label_syntax(s) {
        errs.push(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters \
             or '-', and must start and end with an alphanumeric character (e.g. 'my-name', \
             or '123-abc')"
                .into(),
        );
    }
    errs
}

/// A lowercase RFC 1123 subdomain: most object names.
pub fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > DNS1123_SUBDOMAIN_MAX {
        errs.push(max_len(DNS1123_SUBDOMAIN_MAX));
    }
    if !s.split('.').all(dns1123_label_syntax) {
        errs.push(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
             characters, '-' or '.', and must start and end with an alphanumeric character \
             (e.g. 'example.com')"
                .into(),
        );
    }
    errs
}

/// An RFC 1035 label: Service names (which become DNS names and
/// environment variables, so they start with a letter).
pub fn dns1035_label(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > DNS1123_LABEL_MAX {
        errs.push(max_len(DNS1123_LABEL_MAX));
    }
    if !(dns1123_label_syntax(s) && s.as_bytes()[0].is_ascii_lowercase()) {
        errs.push(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', \
             start with an alphabetic character, and end with an alphanumeric character \
             (e.g. 'my-name', or 'abc-123')"
                .into(),
        );
    }
    errs
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`
fn qualified_syntax(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

const QUALIFIED_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must \
                             start and end with an alphanumeric character (e.g. 'MyName', or \
                             'my.name', or '123-abc')";

/// A qualified name, `[prefix/]name`: label and annotation keys,
/// `appProtocol`. The prefix is a DNS-1123 subdomain, the name 1–63
/// alphanumerics, `-`, `_`, `.`.
pub fn qualified_name(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let parts: Vec<&str> = s.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".into());
            } else {
                errs.extend(
                    dns1123_subdomain(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            *name
        }
        _ => {
            errs.push(format!(
                "a qualified name {QUALIFIED_MSG} with an optional DNS subdomain prefix and '/' \
                 (e.g. 'example.com/MyName')"
            ));
            return errs;
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".into());
    } else if name.len() > DNS1123_LABEL_MAX {
        errs.push(format!("name part {}", max_len(DNS1123_LABEL_MAX)));
    }
    if !name.is_empty() && !qualified_syntax(name) {
        errs.push(format!("name part {QUALIFIED_MSG}"));
    }
    errs
}

/// A label value: empty, or 1–63 alphanumerics, `-`, `_`, `.`, starting
/// and ending with an alphanumeric.
pub fn label_value(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > DNS1123_LABEL_MAX {
        errs.push(max_len(DNS1123_LABEL_MAX));
    }
    if !s.is_empty() && !qualified_syntax(s) {
        errs.push(
            "a valid label must be an empty string or consist of alphanumeric characters, \
             '-', '_' or '.', and must start and end with an alphanumeric character (e.g. \
             'MyValue', or 'my_value', or '12345')"
                .into(),
        );
    }
    errs
}

/// A port number: 1 to 65535.
pub fn port_num(n: i64) -> Vec<String> {
    if (1..=65535).contains(&n) {
        Vec::new()
    } else {
        vec!["must be between 1 and 65535, inclusive".into()]
    }
}

/// A named port (an IANA service name, RFC 6335): 1–15 characters of
/// `[-a-z0-9]`, at least one letter, no `--`, no `-` at either end.
pub fn port_name(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > PORT_NAME_MAX {
        errs.push(max_len(PORT_NAME_MAX));
    }
    if s.is_empty() || !s.bytes().all(|b| alnum_lower(b) || b == b'-') {
        errs.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".into());
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        errs.push("must contain at least one letter (a-z)".into());
    }
    if s.contains("--") {
        errs.push("must not contain consecutive hyphens (-)".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        errs.push("must not begin or end with a hyphen (-)".into());
    }
    errs
}

/// An IPv4 or IPv6 address.
pub fn ip(s: &str) -> Vec<String> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        Vec::new()
    } else {
        vec!["must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)".into()]
    }
}

/// An IP address or a CIDR block (`10.0.0.0/8`), as Istio accepts in a
/// `ServiceEntry`'s `addresses`.
pub fn ip_or_cidr(s: &str) -> Vec<String> {
    let ok = match s.split_once('/') {
        None => s.parse::<std::net::IpAddr>().is_ok(),
        Some((addr, bits)) => match (addr.parse::<std::net::IpAddr>(), bits.parse::<u8>()) {
            (Ok(std::net::IpAddr::V4(_)), Ok(b)) => b <= 32 && !bits.starts_with('+'),
            (Ok(std::net::IpAddr::V6(_)), Ok(b)) => b <= 128 && !bits.starts_with('+'),
            _ => false,
        },
    };
    if ok {
        Vec::new()
    } else {
        vec!["must be an IP address or a CIDR block (e.g. 10.9.8.7 or 10.0.0.0/16)".into()]
    }
}

/// A DNS label as Istio checks host labels (`[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?`,
/// at most 63 characters: Istio's labels accept upper case).
fn istio_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= DNS1123_LABEL_MAX
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// An FQDN as Istio accepts for an endpoint address: at most 255
/// characters of dot-separated DNS labels (a trailing dot allowed).
pub fn fqdn(s: &str) -> Vec<String> {
    let trimmed = s.strip_suffix('.').unwrap_or(s);
    if s.len() > FQDN_MAX {
        return vec![max_len(FQDN_MAX)];
    }
    if trimmed.split('.').all(istio_label) {
        Vec::new()
    } else {
        vec!["must be a domain name of dot-separated DNS labels (e.g. db.example.com)".into()]
    }
}

/// A `ServiceEntry` host (Istio's `ValidateWildcardDomain`): an FQDN,
/// optionally starting with `*.`, or `*` alone is refused.
pub fn wildcard_host(s: &str) -> Vec<String> {
    if s == "*" {
        return vec!["a bare '*' is not a host; use '*.example.com' or a name".into()];
    }
    fqdn(s.strip_prefix("*.").unwrap_or(s))
}

/// Istio's port name rule (`ValidatePortName`: a DNS-1123 label as Istio
/// checks it, upper case accepted).
pub fn istio_port_name(s: &str) -> Vec<String> {
    if istio_label(s) {
        Vec::new()
    } else {
        vec![
            "must be 1 to 63 alphanumeric characters or '-', starting and ending with an \
              alphanumeric character"
                .into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(f: fn(&str) -> Vec<String>, s: &str) -> bool {
        f(s).is_empty()
    }

    #[test]
    fn dns1123_labels() {
        for good in ["a", "0", "a-1", "0abc", &"a".repeat(63)] {
            assert!(ok(dns1123_label, good), "{good}");
        }
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", "ä", &"a".repeat(64)] {
            assert!(!ok(dns1123_label, bad), "{bad}");
        }
        assert_eq!(dns1123_label(&"a".repeat(64)), vec![max_len(63)]);
    }

    #[test]
    fn dns1123_subdomains() {
        for good in ["a", "a.b", "x.y-z.0", &vec!["a".repeat(63); 3].join(".")] {
            assert!(ok(dns1123_subdomain, good), "{good}");
        }
        let long = vec!["a".repeat(63); 4].join(".");
        for bad in ["", ".", "a..b", "a.", ".a", "A.b", "a_b", long.as_str()] {
            assert!(!ok(dns1123_subdomain, bad), "{bad}");
        }
    }

    #[test]
    fn dns1035_labels_start_with_a_letter() {
        for good in ["a", "echo", "echo-v1", &"a".repeat(63)] {
            assert!(ok(dns1035_label, good), "{good}");
        }
        for bad in ["", "1echo", "-a", "a-", "Echo", "a.b", &"a".repeat(64)] {
            assert!(!ok(dns1035_label, bad), "{bad}");
        }
    }

    #[test]
    fn qualified_names() {
        for good in [
            "app",
            "A_b",
            "a.b-c",
            "strait.io/export",
            "app.kubernetes.io/name",
            "kubernetes.io/h2c",
            &"x".repeat(63),
        ] {
            assert!(ok(qualified_name, good), "{good}");
        }
        for bad in [
            "",
            "/app",
            "strait.io/",
            "Strait.io/x",
            "a/b/c",
            "a b",
            "-a",
            "a_",
            &"x".repeat(64),
        ] {
            assert!(!ok(qualified_name, bad), "{bad}");
        }
        assert_eq!(
            qualified_name("/x"),
            vec!["prefix part must be non-empty".to_string()]
        );
        assert_eq!(
            qualified_name("a.io/"),
            vec!["name part must be non-empty".to_string()]
        );
    }

    #[test]
    fn label_values() {
        for good in ["", "v1", "A_b.c-D", &"x".repeat(63)] {
            assert!(ok(label_value, good), "{good}");
        }
        for bad in ["-a", "a-", "a b", "a/b", "_", &"x".repeat(64)] {
            assert!(!ok(label_value, bad), "{bad}");
        }
    }

    #[test]
    fn port_numbers() {
        for good in [1, 80, 65535] {
            assert!(port_num(good).is_empty(), "{good}");
        }
        for bad in [0, -1, 65536, 99999, i64::MAX, i64::MIN] {
            assert_eq!(
                port_num(bad),
                vec!["must be between 1 and 65535, inclusive".to_string()],
                "{bad}"
            );
        }
    }

    #[test]
    fn port_names_are_iana_service_names() {
        for good in ["http", "h2c", "a", "x-1", "123a", &"a".repeat(15)] {
            assert!(ok(port_name, good), "{good}");
        }
        for bad in [
            "",
            "123",
            "HTTP",
            "a--b",
            "-a",
            "a-",
            "a_b",
            &"a".repeat(16),
        ] {
            assert!(!ok(port_name, bad), "{bad}");
        }
        assert_eq!(
            port_name("a--b"),
            vec!["must not contain consecutive hyphens (-)".to_string()]
        );
    }

    #[test]
    fn addresses() {
        for good in ["10.0.0.1", "::1", "2001:db8::1"] {
            assert!(ok(ip, good), "{good}");
        }
        for bad in ["", "10.0.0", "10.0.0.256", "host", "10.0.0.1/8"] {
            assert!(!ok(ip, bad), "{bad}");
        }
        for good in ["10.0.0.1", "10.0.0.0/8", "2001:db8::/32", "0.0.0.0/0"] {
            assert!(ok(ip_or_cidr, good), "{good}");
        }
        for bad in ["10.0.0.0/33", "::/129", "10.0.0.0/", "x/8", "10.0.0.0/+8"] {
            assert!(!ok(ip_or_cidr, bad), "{bad}");
        }
    }

    #[test]
    fn hosts() {
        for good in [
            "db.example.com",
            "DB.example.com",
            "a",
            "echo.demo.svc.cluster.local.",
        ] {
            assert!(ok(fqdn, good), "{good}");
        }
        for bad in ["", "a..b", "-a.b", "a_b.c", "a b", &"a.".repeat(128)] {
            assert!(!ok(fqdn, bad), "{bad}");
        }
        assert!(ok(wildcard_host, "*.example.com"));
        for bad in ["*", "*.", "a.*.b", "**.a"] {
            assert!(!ok(wildcard_host, bad), "{bad}");
        }
        assert!(ok(istio_port_name, "HTTP-web"));
        for bad in ["", "a_b", "-a", &"a".repeat(64)] {
            assert!(!ok(istio_port_name, bad), "{bad}");
        }
    }
}
