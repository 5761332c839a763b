//! Kubernetes name rules (DNS-1123 labels and subdomains, label keys and
//! values) and the bounded names strait gives the objects it generates.
//!
//! Generated names are kept to 63 characters so that they are valid object
//! names of every kind *and* valid label values. A name that would be longer
//! is cut and given a hash suffix of the full name, so it stays unique and
//! stable: see [`bounded_name`].

/// The longest DNS-1123 label (and label value, and label name part).
pub const MAX_LABEL_LEN: usize = 63;
/// The longest DNS-1123 subdomain (most Kubernetes object names).
pub const MAX_SUBDOMAIN_LEN: usize = 253;
/// Length of the hex hash suffix [`bounded_name`] appends.
const HASH_LEN: usize = 10;

use crate::validation::rules;

/// RFC 1123 label as Kubernetes checks it (namespaces, Service names):
/// 1–63 lowercase letters, digits or `-`, starting and ending with a letter
/// or digit. ([`crate::validation::rules`] has the messages.)
pub fn is_dns1123_label(s: &str) -> bool {
    rules::dns1123_label(s).is_empty()
}

/// RFC 1123 subdomain as Kubernetes checks it (most object names, service
/// accounts): dot-separated labels, at most 253 characters in all.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    rules::dns1123_subdomain(s).is_empty()
}

/// A Kubernetes label value: empty, or 1–63 letters, digits, `-`, `_` or `.`,
/// starting and ending with a letter or digit.
pub fn is_label_value(s: &str) -> bool {
    rules::label_value(s).is_empty()
}

/// A Kubernetes label (or annotation) key: `[prefix/]name`, where the prefix
/// is a DNS-1123 subdomain and the name follows the label value rules but
/// may not be empty.
pub fn is_label_key(s: &str) -> bool {
    rules::qualified_name(s).is_empty()
}

/// Keeps a generated name within 63 characters.
///
/// `full` is built from DNS-1123 labels joined by `-` or `.`. When it fits,
/// it is returned unchanged; otherwise its first 52 characters (trailing `-`
/// and `.` removed) are followed by `-` and 10 hex digits of the FNV-1a hash
/// of the whole of `full`. The hash is stable across runs and platforms, so
/// the same input always yields the same name.
pub fn bounded_name(full: &str) -> String {
    if full.len() <= MAX_LABEL_LEN {
        return full.to_string();
    }
    let keep = MAX_LABEL_LEN - HASH_LEN - 1;
    // Generated names are ASCII, but cut on a char boundary regardless.
    let mut cut = keep;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = full[..cut].trim_end_matches(['-', '.']);
    let hash = format!("{:016x}", fnv1a64(full.as_bytes()));
    format!("{head}-{}", &hash[..HASH_LEN])
}

/// 64-bit FNV-1a: tiny, dependency-free and stable, which is all a name
/// suffix needs (it is not used for anything security-relevant).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "reviews", "a-1", "0abc", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
    }

    #[test]
    fn subdomains() {
        for ok in ["a", "a.b", "bookinfo-reviews", "x.y-z.0"] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        for bad in ["", ".", "a..b", "a.", ".a", "A.b", long.as_str()] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        for ok in ["", "v1", "A_b.c-D", &"x".repeat(63)] {
            assert!(is_label_value(ok), "{ok}");
        }
        for bad in ["-a", "a-", "a b", "a/b", &"x".repeat(64)] {
            assert!(!is_label_value(bad), "{bad}");
        }
        for ok in [
            "app",
            "strait.io/cluster",
            "app.kubernetes.io/managed-by",
            "A_b",
        ] {
            assert!(is_label_key(ok), "{ok}");
        }
        for bad in ["", "/app", "strait.io/", "Strait.io/x", "a/b/c", "a b"] {
            assert!(!is_label_key(bad), "{bad}");
        }
    }

    #[test]
    fn bounded_names_are_stable_unique_and_short() {
        assert_eq!(bounded_name("strait-reviews"), "strait-reviews");
        let exact = "a".repeat(63);
        assert_eq!(bounded_name(&exact), exact);
        let long1 = format!("strait-{}.{}", "r".repeat(60), "east");
        let long2 = format!("strait-{}.{}", "r".repeat(60), "west");
        let (n1, n2) = (bounded_name(&long1), bounded_name(&long2));
        assert_eq!(n1.len(), 63);
        assert_eq!(n1, bounded_name(&long1));
        assert_ne!(n1, n2);
        assert!(n1.starts_with("strait-rrrr"));
        assert!(is_dns1123_subdomain(&n1) && is_label_value(&n1), "{n1}");
        // A cut that lands on a separator does not leave "-" or "." before
        // the hash.
        let dotted = format!("{}.{}", "a".repeat(51), "b".repeat(20));
        let n = bounded_name(&dotted);
        assert!(is_dns1123_subdomain(&n), "{n}");
        assert!(!n.contains(".-"), "{n}");
    }

    #[test]
    fn fnv_is_the_reference_function() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
