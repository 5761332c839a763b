//! ClusterSet IPs: the virtual IP an importing cluster gives each imported
//! service (MCS `ServiceImport.spec.ips`, Istio `ServiceEntry.addresses`).
//!
//! The MCS API leaves the ClusterSet IP to the importing cluster's
//! implementation, and CoreDNS's `multicluster` plugin answers
//! `<svc>.<ns>.svc.clusterset.local` with it. With an address on the
//! `ServiceEntry`, a sidecar that captures traffic (iptables) knows which
//! service a connection to that address is for: without one, an app that
//! dials a service no local Service backs has no address to dial.
//!
//! # Assignment
//!
//! Addresses come from one IPv4 range (default [`DEFAULT_RANGE`], in the
//! reserved class E block like Istio's own auto-allocation, which uses
//! 240.240.0.0/16, so the two never clash). The range's first and last
//! addresses are not used. The assignment is deterministic and stable:
//!
//! 1. In host order, a service keeps the address it had before (`previous`,
//!    read back from the objects the cluster already holds) while that
//!    address is in the range and no other service took it first.
//! 2. In host order, every other service gets the first free address at or
//!    after the slot its host hashes to (FNV-1a, fixed across versions and
//!    platforms), wrapping around.
//!
//! So adding or removing a service never moves another one's address, and a
//! restart (same `previous`) gives the same answer. An address `previous`
//! gives a host that is not being assigned is given to no one (it is held
//! elsewhere, or was until now). A full range leaves the rest without an
//! address, with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::{ImportObjects, ImportWarning};

/// The default range of ClusterSet IPs.
pub const DEFAULT_RANGE: &str = "240.241.0.0/16";

/// An IPv4 range of ClusterSet IPs (`a.b.c.d/len`, 8 ≤ len ≤ 30).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipRange {
    network: u32,
    prefix: u8,
}

impl VipRange {
    /// How many addresses can be given out (all but the first and last).
    pub fn capacity(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    /// Whether `ip` is one the range gives out.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        let offset = ip.wrapping_sub(self.network);
        ip >= self.network && offset >= 1 && offset <= self.capacity()
    }

    /// The `slot`th address given out (`slot < capacity`).
    fn nth(&self, slot: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1 + slot)
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

impl Default for VipRange {
    fn default() -> Self {
        DEFAULT_RANGE.parse().expect("the default range parses")
    }
}

/// Why a range was refused; the message names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ClusterSet IP range {input:?}: {why}")]
pub struct VipRangeError {
    input: String,
    why: &'static str,
}

impl FromStr for VipRange {
    type Err = VipRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| VipRangeError {
            input: s.to_string(),
            why,
        };
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| err("expected an IPv4 CIDR such as 240.241.0.0/16"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| err("not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .map_err(|_| err("the prefix length is not a number"))?;
        if !(8..=30).contains(&prefix) {
            return Err(err(
                "the prefix length must be 8 to 30 (at least two addresses)",
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        let network = u32::from(ip);
        if network & !mask != 0 {
            return Err(err("host bits are set: give the network address"));
        }
        Ok(VipRange { network, prefix })
    }
}

/// FNV-1a (64 bit): stable across Rust versions, unlike `std`'s hasher.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Gives each host an address from `range` (see the module documentation).
/// Hosts without one (the range is full) are left out of the map. The
/// addresses `previous` gives hosts not in `hosts` are given to no one:
/// they are still in use (by objects not computed here), or were until
/// now, and DNS caches may still hold them.
pub fn assign(
    hosts: &BTreeSet<String>,
    range: &VipRange,
    previous: &BTreeMap<String, Ipv4Addr>,
) -> BTreeMap<String, Ipv4Addr> {
    let capacity = range.capacity();
    let mut taken: BTreeSet<Ipv4Addr> = previous
        .iter()
        .filter(|(host, ip)| !hosts.contains(*host) && range.contains(**ip))
        .map(|(_, ip)| *ip)
        .collect();
    let mut out = BTreeMap::new();
    for host in hosts {
        if let Some(&ip) = previous.get(host)
            && range.contains(ip)
            && taken.insert(ip)
        {
            out.insert(host.clone(), ip);
        }
    }
    for host in hosts {
        if out.contains_key(host) || taken.len() as u64 >= u64::from(capacity) {
            continue;
        }
        let start = (fnv1a(host) % u64::from(capacity)) as u32;
        let free = (0..capacity)
            .map(|i| range.nth((start + i) % capacity))
            .find(|ip| !taken.contains(ip));
        if let Some(ip) = free {
            taken.insert(ip);
            out.insert(host.clone(), ip);
        }
    }
    out
}

impl ImportObjects {
    /// Gives every imported service a ClusterSet IP from `range`: its
    /// `ServiceEntry`'s `addresses` and its `ServiceImport`'s `spec.ips`.
    /// `previous` maps clusterset hosts to the addresses the cluster's
    /// objects already carry, so that they keep them.
    pub fn assign_clusterset_ips(
        &mut self,
        range: &VipRange,
        previous: &BTreeMap<String, Ipv4Addr>,
    ) {
        let hosts: BTreeSet<String> = self
            .service_entries
            .iter()
            .filter_map(|se| se.spec.hosts.first().cloned())
            .collect();
        let ips = assign(&hosts, range, previous);
        for se in &mut self.service_entries {
            let Some(host) = se.spec.hosts.first() else {
                continue;
            };
            match ips.get(host) {
                Some(ip) => se.spec.addresses = vec![ip.to_string()],
                None => self.warnings.push(ImportWarning::NoClusterSetIp {
                    host: host.clone(),
                    range: range.to_string(),
                }),
            }
        }
        for si in &mut self.service_imports {
            let host = format!(
                "{}.{}.svc.{}",
                si.metadata.name,
                si.metadata.namespace,
                crate::mesh::CLUSTERSET_DOMAIN
            );
            if let Some(ip) = ips.get(&host) {
                si.spec.ips = vec![ip.to_string()];
            }
        }
        self.warnings.sort();
        self.warnings.dedup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> BTreeSet<String> {
        names
            .iter()
            .map(|n| format!("{n}.demo.svc.clusterset.local"))
            .collect()
    }

    #[test]
    fn ranges_parse_and_bad_ones_are_named() {
        let r: VipRange = "240.241.0.0/16".parse().unwrap();
        assert_eq!(r.capacity(), 65534);
        assert_eq!(r.to_string(), "240.241.0.0/16");
        assert!(r.contains("240.241.0.1".parse().unwrap()));
        assert!(r.contains("240.241.255.254".parse().unwrap()));
        for outside in [
            "240.241.0.0",
            "240.241.255.255",
            "240.240.255.254",
            "10.0.0.1",
        ] {
            assert!(!r.contains(outside.parse().unwrap()), "{outside}");
        }
        assert_eq!(VipRange::default(), r);
        for (bad, why) in [
            ("240.241.0.0", "expected an IPv4 CIDR"),
            ("240.241.0/16", "not an IPv4 address"),
            ("fd00::/64", "not an IPv4 address"),
            ("240.241.0.0/x", "not a number"),
            ("240.241.0.0/31", "8 to 30"),
            ("240.0.0.0/4", "8 to 30"),
            ("240.241.0.1/16", "host bits are set"),
            ("", "expected an IPv4 CIDR"),
        ] {
            let e = bad.parse::<VipRange>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn addresses_are_in_range_distinct_and_deterministic() {
        let range: VipRange = "240.241.0.0/16".parse().unwrap();
        let all = hosts(&["a", "b", "c", "reviews", "ratings", "details"]);
        let one = assign(&all, &range, &BTreeMap::new());
        assert_eq!(one.len(), all.len());
        let distinct: BTreeSet<_> = one.values().collect();
        assert_eq!(distinct.len(), all.len());
        assert!(one.values().all(|ip| range.contains(*ip)));
        assert_eq!(one, assign(&all, &range, &BTreeMap::new()));
    }

    #[test]
    fn others_keep_their_address_when_services_come_and_go() {
        // A /29 has 6 addresses: collisions are certain, so this checks the
        // probing as well as stability.
        let range: VipRange = "10.10.0.0/29".parse().unwrap();
        let first = assign(&hosts(&["a", "b", "c"]), &range, &BTreeMap::new());
        let more = assign(&hosts(&["a", "b", "c", "d", "e", "f"]), &range, &first);
        assert_eq!(more.len(), 6);
        for (host, ip) in &first {
            assert_eq!(more[host], *ip, "{host} moved");
        }
        let fewer = assign(&hosts(&["b", "f"]), &range, &more);
        assert_eq!(
            fewer["b.demo.svc.clusterset.local"],
            more["b.demo.svc.clusterset.local"]
        );
        assert_eq!(
            fewer["f.demo.svc.clusterset.local"],
            more["f.demo.svc.clusterset.local"]
        );
    }

    #[test]
    fn previous_addresses_outside_the_range_or_taken_twice_are_replaced() {
        let range: VipRange = "10.10.0.0/29".parse().unwrap();
        let a = "a.demo.svc.clusterset.local".to_string();
        let b = "b.demo.svc.clusterset.local".to_string();
        let previous = BTreeMap::from([
            (a.clone(), "10.10.0.3".parse().unwrap()),
            // Claimed by `a` first (host order).
            (b.clone(), "10.10.0.3".parse().unwrap()),
        ]);
        let got = assign(&hosts(&["a", "b"]), &range, &previous);
        assert_eq!(got[&a], "10.10.0.3".parse::<Ipv4Addr>().unwrap());
        assert_ne!(got[&b], got[&a]);
        assert!(range.contains(got[&b]));
        let outside = BTreeMap::from([(a.clone(), "192.0.2.1".parse().unwrap())]);
        assert!(range.contains(assign(&hosts(&["a"]), &range, &outside)[&a]));
    }

    #[test]
    fn addresses_held_by_other_hosts_are_not_given_out() {
        // A /30 has two: `z` holds one (assigned elsewhere), so of `a` and
        // `b` only one gets an address, and not z's.
        let range: VipRange = "10.10.0.0/30".parse().unwrap();
        let z: Ipv4Addr = "10.10.0.1".parse().unwrap();
        let previous = BTreeMap::from([("z.demo.svc.clusterset.local".to_string(), z)]);
        let got = assign(&hosts(&["a", "b"]), &range, &previous);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got.values()
                .all(|ip| *ip == "10.10.0.2".parse::<Ipv4Addr>().unwrap())
        );
    }

    #[test]
    fn a_full_range_leaves_the_rest_without_an_address() {
        let range: VipRange = "10.10.0.0/30".parse().unwrap();
        let got = assign(&hosts(&["a", "b", "c", "d"]), &range, &BTreeMap::new());
        assert_eq!(got.len(), 2);
        let ips: BTreeSet<_> = got.values().map(ToString::to_string).collect();
        assert_eq!(
            ips,
            BTreeSet::from(["10.10.0.1".to_string(), "10.10.0.2".to_string()])
        );
    }
}
