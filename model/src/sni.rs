//! Istio's SNI for mesh traffic, `outbound_.<port>_.<subset>_.<host>`
//! (e.g. `outbound_.9080_.v1_.reviews.bookinfo.svc.cluster.local`, or
//! `outbound_.9080_._.reviews.bookinfo.svc.cluster.local` without a
//! subset): what a sidecar sends, what another sidecar's inbound reads to
//! find the service and port, and what an east-west gateway routes by.
//! One codec for all of them, so that they agree on every name.
//!
//! The port is written as Istio writes it: decimal digits, no sign, no
//! leading zero, 1 to 65535. The subset is everything up to the next
//! `_.` (it may be empty: no subset); the host is the rest and may not be
//! empty. What [`parse`] accepts, [`format`] writes back byte for byte.

/// The prefix of every Istio outbound SNI.
pub const PREFIX: &str = "outbound_.";

/// The separator between the SNI's fields.
const SEP: &str = "_.";

/// A parsed Istio SNI, borrowing from the name it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioSni<'a> {
    /// The service port (1..=65535).
    pub port: u16,
    /// The DestinationRule subset, if one is named.
    pub subset: Option<&'a str>,
    /// The service host, e.g. `reviews.bookinfo.svc.cluster.local`.
    pub host: &'a str,
}

/// Why a name is not an Istio SNI; each names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// Not `outbound_.<port>_.<subset>_.<host>`.
    #[error("SNI {0:?} is not Istio's outbound_.<port>_.<subset>_.<host> form")]
    NotIstio(String),
    /// The port field is not a port as Istio writes one.
    #[error("SNI {sni:?}: port {port:?} is not a port number (1-65535, no leading zero)")]
    Port {
        /// The whole SNI.
        sni: String,
        /// The port field.
        port: String,
    },
    /// Nothing after the subset.
    #[error("SNI {0:?} has an empty host")]
    EmptyHost(String),
}

/// Parses Istio's outbound SNI.
pub fn parse(sni: &str) -> Result<IstioSni<'_>, SniError> {
    let not_istio = || SniError::NotIstio(sni.to_string());
    let rest = sni.strip_prefix(PREFIX).ok_or_else(not_istio)?;
    let (port, rest) = rest.split_once(SEP).ok_or_else(not_istio)?;
    let (subset, host) = rest.split_once(SEP).ok_or_else(not_istio)?;
    let port = parse_port(port).ok_or_else(|| SniError::Port {
        sni: sni.to_string(),
        port: port.to_string(),
    })?;
    if host.is_empty() {
        return Err(SniError::EmptyHost(sni.to_string()));
    }
    Ok(IstioSni {
        port,
        subset: (!subset.is_empty()).then_some(subset),
        host,
    })
}

/// A port as Istio writes it: 1 to 5 digits, the first not `0`, at most
/// 65535.
fn parse_port(s: &str) -> Option<u16> {
    let canonical =
        (1..=5).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    canonical.then(|| s.parse::<u16>().ok()).flatten()
}

/// Istio's SNI for `host` on `port`, for `subset` (or none). Written
/// without `fmt` and sized up front: a sidecar makes one per request for
/// its connection-pool lookup.
pub fn format(port: u16, subset: Option<&str>, host: &str) -> String {
    let subset = subset.unwrap_or("");
    let mut sni =
        String::with_capacity(PREFIX.len() + 5 + 2 * SEP.len() + subset.len() + host.len());
    sni.push_str(PREFIX);
    push_decimal(&mut sni, port);
    sni.push_str(SEP);
    sni.push_str(subset);
    sni.push_str(SEP);
    sni.push_str(host);
    sni
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

impl IstioSni<'_> {
    /// The SNI this stands for ([`format`]).
    pub fn to_sni(&self) -> String {
        format(self.port, self.subset, self.host)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_istio_names_with_and_without_a_subset() {
        assert_eq!(
            parse("outbound_.9080_._.reviews.bookinfo.svc.cluster.local").unwrap(),
            IstioSni {
                port: 9080,
                subset: None,
                host: "reviews.bookinfo.svc.cluster.local"
            }
        );
        let v1 = parse("outbound_.9080_.v1_.reviews.bookinfo.svc.cluster.local").unwrap();
        assert_eq!(v1.subset, Some("v1"));
        assert_eq!(parse("outbound_.1_._.a").unwrap().port, 1);
        assert_eq!(parse("outbound_.65535_._.a").unwrap().port, 65535);
        // The host is the rest, separators and all.
        assert_eq!(parse("outbound_.80_.v1_.a_.b").unwrap().host, "a_.b");
    }

    #[test]
    fn writes_what_it_reads() {
        for (port, subset, host) in [
            (8080, Some("v2"), "echo.demo.svc.cluster.local"),
            (1, None, "a"),
            (65535, None, "x.y"),
            (10, Some("canary"), "h"),
        ] {
            let sni = format(port, subset, host);
            let p = parse(&sni).unwrap();
            assert_eq!((p.port, p.subset, p.host), (port, subset, host), "{sni}");
            assert_eq!(p.to_sni(), sni);
        }
        assert_eq!(
            format(8080, Some("v2"), "echo.demo.svc.cluster.local"),
            "outbound_.8080_.v2_.echo.demo.svc.cluster.local"
        );
        assert_eq!(format(80, None, "a.b"), "outbound_.80_._.a.b");
    }

    #[test]
    fn refuses_names_that_are_not_istios_and_says_which() {
        for bad in [
            "",
            "reviews.bookinfo",
            "inbound_.9080_._.x",
            "Outbound_.9080_._.x",
            "outbound_.9080",
            "outbound_.9080_.v1",
            "outbound_.",
        ] {
            assert_eq!(
                parse(bad),
                Err(SniError::NotIstio(bad.to_string())),
                "{bad:?}"
            );
        }
        for (bad, port) in [
            ("outbound_.http_._.x", "http"),
            ("outbound_.0_._.x", "0"),
            ("outbound_.+80_._.x", "+80"),
            ("outbound_.-1_._.x", "-1"),
            ("outbound_.080_._.x", "080"),
            ("outbound_.00080_._.x", "00080"),
            ("outbound_.65536_._.x", "65536"),
            ("outbound_.99999_._.x", "99999"),
            ("outbound_.123456_._.x", "123456"),
            ("outbound_._._.x", ""),
            ("outbound_. 80_._.x", " 80"),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(
                e,
                SniError::Port {
                    sni: bad.to_string(),
                    port: port.to_string()
                },
                "{bad:?}"
            );
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert_eq!(
            parse("outbound_.80_._."),
            Err(SniError::EmptyHost("outbound_.80_._.".into()))
        );
    }
}
