//! Transparent interception, as Istio's `istio-init` sets it up: iptables
//! `nat` rules redirect the pod's inbound TCP to the inbound listener and
//! the app's outbound TCP to the outbound listener, except the sidecar's
//! own traffic (by uid/gid). A redirected connection keeps its original
//! destination, read back with `SO_ORIGINAL_DST`.
//!
//! The outbound listener serves explicit-proxy and redirected clients
//! alike: a redirected HTTP request (HTTP/1.1 or h2c) names its service in
//! `Host` or `:authority`; the original destination supplies the port when
//! it names none. What a redirected connection carries is told by its
//! first bytes ([`sniff`]): HTTP is routed; anything else (TLS to an
//! outside host, a database protocol) goes on unchanged to the original
//! destination. A client silent for [`SNIFF_WAIT`] gets the way to its
//! destination opened, and whichever side speaks first decides (a
//! server-first protocol passes through; a client that connected ahead of
//! its first HTTP request is still routed). All this as
//! Istio's `PassthroughCluster` does under `outboundTrafficPolicy:
//! ALLOW_ANY` (the discovery resources carry no service VIPs to route raw
//! TCP by). An HTTP request for a host outside the mesh also goes to the
//! original destination. `REGISTRY_ONLY` refuses both.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination the client dialed before iptables redirected the
/// connection here (`SO_ORIGINAL_DST`, IPv4 or IPv6).
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = if tcp.local_addr()?.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST is not an IP socket address"))
}

/// Where the client was going, when the connection was redirected here
/// (its original destination is not this listener); `None` for a client
/// that connected to the listener itself.
pub fn redirected_to(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let original = original_dst(tcp).ok()?;
    (original != local).then_some(original)
}

/// What the first bytes of a connection say, as far as they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.x request line (a method token and a space) or the
    /// HTTP/2 preface.
    Http,
    /// Something else.
    Other,
    /// Too few bytes to tell.
    NeedMore,
}

/// The HTTP/2 connection preface's first line.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// The longest method token taken for HTTP (`OPTIONS`, `CONNECT` and the
/// WebDAV ones fit).
const MAX_METHOD: usize = 16;

/// Classifies the first bytes a client sent.
pub fn classify(first: &[u8]) -> Sniffed {
    if first.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Sniffed::Http
        } else {
            Sniffed::NeedMore
        };
    }
    for (i, b) in first.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            b' ' if i > 0 => return Sniffed::Http,
            _ => return Sniffed::Other,
        }
    }
    Sniffed::NeedMore
}

/// How long [`sniff`] waits for a redirected client's first bytes before
/// the outbound side stops waiting on the client alone: a client silent
/// this long may wait for the server to speak first (MySQL, SMTP), or may
/// have opened its connection ahead of its first request.
pub const SNIFF_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// What a redirected connection speaks, from the bytes it sent within
/// `wait` (peeked, not consumed): [`Sniffed::Http`], [`Sniffed::Other`]
/// (other bytes, or closed), or [`Sniffed::NeedMore`] when nothing
/// decisive came in time (silence, or a fragment).
pub async fn sniff(tcp: &TcpStream, wait: std::time::Duration) -> Sniffed {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 24];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            Ok(_) => return Sniffed::Other,
            Err(_) => return Sniffed::NeedMore,
        };
        match classify(&buf[..n]) {
            Sniffed::NeedMore if n == buf.len() => return Sniffed::Other,
            Sniffed::NeedMore if tokio::time::Instant::now() < deadline => {
                // A request line split across segments: peeking again
                // returns the same bytes until more arrive.
                if n == seen {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                seen = n;
            }
            decided => return decided,
        }
    }
}

/// What the interception rules need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptOptions {
    /// The uid the sidecar runs as (its traffic is not redirected).
    pub proxy_uid: u32,
    /// The gid the sidecar runs as, when it should be excluded too.
    pub proxy_gid: Option<u32>,
    /// The inbound (mTLS) listener's port.
    pub inbound_port: u16,
    /// The outbound listener's port.
    pub outbound_port: u16,
    /// Inbound ports left alone (health, metrics).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs left alone (`10.0.0.0/8`).
    pub exclude_outbound_cidrs: Vec<String>,
}

impl Default for InterceptOptions {
    /// Istio's defaults: uid 1337, 15006 in, 15001 out, the health
    /// (15021) and metrics (15090) ports not intercepted.
    fn default() -> Self {
        InterceptOptions {
            proxy_uid: 1337,
            proxy_gid: None,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: vec![15021, 15090],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
        }
    }
}

/// Why the interception rules cannot be made from the options given.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// A listener port is 0.
    #[error("the inbound and outbound ports must not be 0")]
    ZeroPort,
    /// An excluded CIDR whose address is not IPv4.
    #[error("exclude CIDR {cidr:?}: {addr:?} is not an IPv4 address")]
    CidrAddress {
        cidr: String,
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    /// An excluded CIDR whose prefix length is not `0..=32`.
    #[error("exclude CIDR {cidr:?}: prefix length {len:?} is not 0..=32")]
    CidrPrefix { cidr: String, len: String },
}

/// Why rules cannot be turned into `iptables-restore` input.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A rule that is not an `iptables -t nat` command.
    #[error("rule {0:?} is not an `iptables -t nat` command")]
    NotNat(String),
    /// A `nat` rule that neither creates a chain nor appends to one.
    #[error("rule {0:?}: only -N and -A are expected")]
    NotNewOrAppend(String),
}

/// Checks a CIDR (`a.b.c.d/n` or IPv4 address) for an iptables rule.
fn check_cidr(cidr: &str) -> Result<(), RulesError> {
    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    addr.parse::<std::net::Ipv4Addr>()
        .map_err(|source| RulesError::CidrAddress {
            cidr: cidr.to_owned(),
            addr: addr.to_owned(),
            source,
        })?;
    match len.parse::<u8>() {
        Ok(n) if n <= 32 => Ok(()),
        _ => Err(RulesError::CidrPrefix {
            cidr: cidr.to_owned(),
            len: len.to_owned(),
        }),
    }
}

/// The source address of the sidecar's app probes to its pod's own IP,
/// which the rules let through to the app (Istio's, 127.0.0.6, so that
/// the two agree on which local traffic is not inbound).
pub const PROBE_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

/// The `iptables` commands (IPv4, `nat` table) that intercept the pod's
/// traffic, in order, as `strait sidecar iptables --print` shows them.
pub fn iptables_rules(o: &InterceptOptions) -> Result<Vec<String>, RulesError> {
    if o.inbound_port == 0 || o.outbound_port == 0 {
        return Err(RulesError::ZeroPort);
    }
    for c in &o.exclude_outbound_cidrs {
        check_cidr(c)?;
    }
    let nat = |rule: String| format!("iptables -t nat {rule}");
    let mut r = Vec::new();
    for chain in [
        "STRAIT_INBOUND",
        "STRAIT_IN_REDIRECT",
        "STRAIT_OUTPUT",
        "STRAIT_REDIRECT",
    ] {
        r.push(nat(format!("-N {chain}")));
    }
    r.push(nat(format!(
        "-A STRAIT_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        o.inbound_port
    )));
    r.push(nat(format!(
        "-A STRAIT_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        o.outbound_port
    )));
    // Inbound: everything but the excluded ports goes to the inbound listener.
    r.push(nat("-A PREROUTING -p tcp -j STRAIT_INBOUND".into()));
    for p in &o.exclude_inbound_ports {
        r.push(nat(format!(
            "-A STRAIT_INBOUND -p tcp --dport {p} -j RETURN"
        )));
    }
    r.push(nat("-A STRAIT_INBOUND -p tcp -j STRAIT_IN_REDIRECT".into()));
    // Outbound: the sidecar's own traffic leaves as is; the app's to
    // itself over loopback stays local; the rest goes to the outbound
    // listener.
    r.push(nat("-A OUTPUT -p tcp -j STRAIT_OUTPUT".into()));
    let mut owners = vec![format!("--uid-owner {}", o.proxy_uid)];
    if let Some(gid) = o.proxy_gid {
        owners.push(format!("--gid-owner {gid}"));
    }
    // The sidecar's app probes to the pod's own IP (see `probe`) come from
    // PROBE_SOURCE and reach the app directly, as Istio's do from the
    // same address.
    r.push(nat(format!(
        "-A STRAIT_OUTPUT -s {PROBE_SOURCE}/32 -o lo -j RETURN"
    )));
    for owner in &owners {
        // The sidecar calling the pod's own IP: that is inbound traffic.
        r.push(nat(format!(
            "-A STRAIT_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner {owner} -j STRAIT_IN_REDIRECT"
        )));
        r.push(nat(format!("-A STRAIT_OUTPUT -m owner {owner} -j RETURN")));
    }
    r.push(nat("-A STRAIT_OUTPUT -d 127.0.0.1/32 -j RETURN".into()));
    for p in &o.exclude_outbound_ports {
        r.push(nat(format!(
            "-A STRAIT_OUTPUT -p tcp --dport {p} -j RETURN"
        )));
    }
    for c in &o.exclude_outbound_cidrs {
        r.push(nat(format!("-A STRAIT_OUTPUT -d {c} -j RETURN")));
    }
    r.push(nat("-A STRAIT_OUTPUT -j STRAIT_REDIRECT".into()));
    Ok(r)
}

/// The rules of [`iptables_rules`] as `iptables-restore --noflush` input:
/// one transaction for the `nat` table, so that applying them either
/// installs every rule or none. Chains that exist already make the whole
/// transaction fail (the rules are applied once per network namespace).
pub fn restore_input(rules: &[String]) -> Result<String, RestoreError> {
    let mut chains = String::new();
    let mut appends = String::new();
    for r in rules {
        let rest = r
            .strip_prefix("iptables -t nat ")
            .ok_or_else(|| RestoreError::NotNat(r.clone()))?;
        if let Some(chain) = rest.strip_prefix("-N ") {
            chains.push_str(&format!(":{chain} - [0:0]\n"));
        } else if rest.starts_with("-A ") {
            appends.push_str(rest);
            appends.push('\n');
        } else {
            return Err(RestoreError::NotNewOrAppend(r.clone()));
        }
    }
    Ok(format!("*nat\n{chains}{appends}COMMIT\n"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn first_bytes_tell_http_from_the_rest() {
        use Sniffed::*;
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Http),
            (b"POST ", Http),
            (b"M-SEARCH * HTTP/1.1", Http),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Http),
            (b"PRI * HTTP/2.0\r\n", Http),
            // Not yet decidable.
            (b"", NeedMore),
            (b"GE", NeedMore),
            (b"PRI * HTT", NeedMore),
            (b"P", NeedMore),
            // TLS, binary protocols, lower case, a leading space, a token
            // too long to be a method, PRI that is not the preface.
            (b"\x16\x03\x01\x02\x00", Other),
            (b"\x00\x00\x00\x01", Other),
            (b"get / HTTP/1.1", Other),
            (b" GET", Other),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ ", Other),
            (b"PRI / HTTP/1.1", Http),
            (b"PRIX", NeedMore),
            (b"SSH-2.0-OpenSSH_9.2", Other),
            (b"*1\r\n$4\r\nPING\r\n", Other),
        ] {
            assert_eq!(
                classify(bytes),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn classify_takes_any_bytes() {
        // Every one- and two-byte input, and longer pseudo-random ones:
        // no panic, and a verdict never changes once more bytes come.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                inputs.push(vec![a, b]);
            }
        }
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let alphabet = b"GETPOSRI */HT2.0\r\n \x16\x00az-_";
            inputs.push(
                (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect(),
            );
        }
        for input in inputs {
            let mut verdict = Sniffed::NeedMore;
            for end in 0..=input.len() {
                let v = classify(&input[..end]);
                if verdict != Sniffed::NeedMore {
                    assert_eq!(v, verdict, "{input:?} at {end}");
                }
                verdict = v;
            }
        }
    }

    #[test]
    fn default_rules_redirect_in_and_out_but_spare_the_proxy() {
        let rules = iptables_rules(&InterceptOptions::default()).unwrap();
        let has = |s: &str| rules.iter().any(|r| r == s);
        assert!(has(
            "iptables -t nat -A STRAIT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"
        ));
        assert!(has(
            "iptables -t nat -A STRAIT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
        ));
        assert!(has(
            "iptables -t nat -A STRAIT_INBOUND -p tcp --dport 15021 -j RETURN"
        ));
        // Where the first rule ending with `part` stands.
        let at = |part: &str| {
            rules
                .iter()
                .position(|r| r.ends_with(part))
                .unwrap_or_else(|| panic!("no rule ends with {part:?}"))
        };
        let own = at("-m owner --uid-owner 1337 -j RETURN");
        let redirect = at("-A STRAIT_OUTPUT -j STRAIT_REDIRECT");
        // The proxy's exemption comes before the catch-all, which is last.
        assert!(own < redirect);
        // The probes' source is let through before the proxy's own
        // connections to the pod's IP are sent to the inbound listener.
        let probes = at("-A STRAIT_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN");
        let pod_ip = at("--uid-owner 1337 -j STRAIT_IN_REDIRECT");
        assert!(probes < pod_ip);
        assert_eq!(redirect, rules.len() - 1);
        // Chains exist before they are used.
        let created = at("-N STRAIT_OUTPUT");
        let used = rules
            .iter()
            .position(|r| r.contains("-j STRAIT_OUTPUT"))
            .unwrap();
        assert!(created < used);
    }

    #[test]
    fn restore_input_is_one_nat_transaction() {
        let rules = iptables_rules(&InterceptOptions::default()).unwrap();
        let input = restore_input(&rules).unwrap();
        let lines: Vec<&str> = input.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines[1], ":STRAIT_INBOUND - [0:0]");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        assert!(lines.contains(&"-A OUTPUT -p tcp -j STRAIT_OUTPUT"));
        // Every rule is there, chains declared before any append.
        assert_eq!(lines.len(), rules.len() + 2);
        let last_chain = lines.iter().rposition(|l| l.starts_with(':')).unwrap();
        let first_append = lines.iter().position(|l| l.starts_with("-A")).unwrap();
        assert!(last_chain < first_append);
        for bad in ["iptables -t filter -A X", "iptables -t nat -D OUTPUT 1"] {
            let e = restore_input(&[bad.to_string()]).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn exclusions_and_gid_are_honoured_and_bad_ones_refused() {
        let o = InterceptOptions {
            proxy_gid: Some(1337),
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["169.254.169.254/32".into(), "10.0.0.0".into()],
            ..InterceptOptions::default()
        };
        let rules = iptables_rules(&o).unwrap().join("\n");
        for want in [
            "-m owner --gid-owner 1337 -j RETURN",
            "-A STRAIT_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A STRAIT_OUTPUT -d 169.254.169.254/32 -j RETURN",
            "-A STRAIT_OUTPUT -d 10.0.0.0 -j RETURN",
        ] {
            assert!(rules.contains(want), "{want} missing:\n{rules}");
        }
        for (cidr, needle) in [
            ("10.0.0.0/33", "prefix length"),
            ("10.0.0/8", "not an IPv4 address"),
            ("fd00::/8", "not an IPv4 address"),
            ("10.0.0.0/x", "prefix length"),
            ("", "not an IPv4 address"),
        ] {
            let o = InterceptOptions {
                exclude_outbound_cidrs: vec![cidr.into()],
                ..InterceptOptions::default()
            };
            let e = iptables_rules(&o).unwrap_err().to_string();
            assert!(e.contains(needle), "{cidr}: {e}");
        }
        let o = InterceptOptions {
            inbound_port: 0,
            ..InterceptOptions::default()
        };
        assert!(iptables_rules(&o).is_err());
    }

    #[tokio::test]
    async fn sniffing_waits_for_a_split_request_line_and_not_for_silence() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let wait = std::time::Duration::from_millis(300);
        // A request line in two segments.
        let (c, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (mut c, (server, _)) = (c.unwrap(), accepted.unwrap());
        c.write_all(b"GE").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            c.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
            c
        });
        assert_eq!(sniff(&server, wait).await, Sniffed::Http);
        // Peeked, not consumed.
        let mut first = [0u8; 3];
        server.peek(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
        drop(writer.await.unwrap());
        // A TLS ClientHello, and a client waiting for the server.
        let (c, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (mut c, (server, _)) = (c.unwrap(), accepted.unwrap());
        c.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        assert_eq!(sniff(&server, wait).await, Sniffed::Other);
        let (_quiet, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (server, _) = accepted.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(sniff(&server, wait).await, Sniffed::NeedMore);
        assert!(start.elapsed() >= wait, "decided before the wait was over");
        // A client that closes is not HTTP.
        let (closing, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        drop(closing.unwrap());
        let (server, _) = accepted.unwrap();
        assert_eq!(sniff(&server, wait).await, Sniffed::Other);
    }

    #[tokio::test]
    async fn a_direct_connection_is_not_redirected() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_c, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (server, _) = accepted.unwrap();
        // No NAT happened: either no original destination is known, or it
        // is the listener itself.
        assert_eq!(redirected_to(&server), None);
        if let Ok(orig) = original_dst(&server) {
            assert_eq!(orig, addr);
        }
    }
}
