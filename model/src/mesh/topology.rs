//! Where a cluster is: its network, locality, east-west gateways and trust
//! domain.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use strait_ca::{ClusterName, TrustDomain};

use super::ModelError;
use super::serde_names;
use crate::names;

/// The port Istio's east-west gateways listen on for cross-network mTLS
/// (`AUTO_PASSTHROUGH`, routed by SNI).
pub const DEFAULT_GATEWAY_PORT: u16 = 15443;

/// An Istio network name (`topology.istio.io/network`): endpoints on the same
/// network reach each other directly; others go through east-west gateways.
/// Validated as a non-empty Kubernetes label value, since Istio carries it in
/// that label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Network(String);

impl Network {
    pub fn new(name: &str) -> Result<Self, ModelError> {
        if !name.is_empty() && names::is_label_value(name) {
            Ok(Network(name.to_string()))
        } else {
            Err(ModelError::Network(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Network {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Network::new(s)
    }
}

impl TryFrom<String> for Network {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Network::new(&s)
    }
}

impl From<Network> for String {
    fn from(n: Network) -> String {
        n.0
    }
}

/// Istio's locality, `region[/zone[/subzone]]` (e.g. `us-east1/us-east1-b`),
/// from the `topology.kubernetes.io/region` and `…/zone` node labels and
/// `topology.istio.io/subzone`. Each part is a non-empty label value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Locality {
    region: String,
    zone: Option<String>,
    subzone: Option<String>,
}

impl Locality {
    /// Parses `region`, `region/zone` or `region/zone/subzone`.
    pub fn parse(value: &str) -> Result<Self, ModelError> {
        let err = |reason| ModelError::Locality {
            value: value.to_string(),
            reason,
        };
        if value.is_empty() {
            return Err(err("is empty; expected region[/zone[/subzone]]"));
        }
        let parts: Vec<&str> = value.split('/').collect();
        if parts.len() > 3 {
            return Err(err(
                "has more than three parts; expected region[/zone[/subzone]]",
            ));
        }
        if parts.iter().any(|p| p.is_empty()) {
            return Err(err("has an empty part; expected region[/zone[/subzone]]"));
        }
        if !parts.iter().all(|p| names::is_label_value(p)) {
            return Err(err(
                "each part must be 1 to 63 letters, digits, '-', '_' or '.', starting and \
                 ending with a letter or digit",
            ));
        }
        Ok(Locality {
            region: parts[0].to_string(),
            zone: parts.get(1).map(|s| s.to_string()),
            subzone: parts.get(2).map(|s| s.to_string()),
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    pub fn subzone(&self) -> Option<&str> {
        self.subzone.as_deref()
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.region)?;
        for part in [&self.zone, &self.subzone].into_iter().flatten() {
            write!(f, "/{part}")?;
        }
        Ok(())
    }
}

impl FromStr for Locality {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Locality::parse(s)
    }
}

impl TryFrom<String> for Locality {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Locality::parse(&s)
    }
}

impl From<Locality> for String {
    fn from(l: Locality) -> String {
        l.to_string()
    }
}

/// An east-west gateway's address as other networks dial it: an IP address
/// or a DNS name, and a port (default [`DEFAULT_GATEWAY_PORT`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayAddress {
    host: String,
    port: u16,
}

impl GatewayAddress {
    /// Builds an address from a host (IP, or DNS name which is lowercased)
    /// and a port.
    pub fn new(host: &str, port: u16) -> Result<Self, ModelError> {
        let display = format!("{host}:{port}");
        let host = normalize_host(host).map_err(|reason| ModelError::GatewayAddress {
            value: display.clone(),
            reason,
        })?;
        if port == 0 {
            return Err(ModelError::GatewayAddress {
                value: display,
                reason: "port must be 1-65535",
            });
        }
        Ok(GatewayAddress { host, port })
    }

    /// Parses `host`, `host:port`, `ip`, `ipv4:port`, `ipv6`, `[ipv6]` or
    /// `[ipv6]:port`.
    pub fn parse(value: &str) -> Result<Self, ModelError> {
        let err = |reason| ModelError::GatewayAddress {
            value: value.to_string(),
            reason,
        };
        if value.is_empty() {
            return Err(err("is empty; expected host[:port]"));
        }
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let (v6, after) = rest
                .split_once(']')
                .ok_or_else(|| err("'[' without a closing ']'"))?;
            if v6.parse::<Ipv6Addr>().is_err() {
                return Err(err("brackets must hold an IPv6 address"));
            }
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| err("expected ':port' after ']'"))?,
                ),
            };
            (v6, port)
        } else if value.parse::<IpAddr>().is_ok() {
            (value, None)
        } else {
            match value.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(err(
                        "an IPv6 address with a port must be written [address]:port",
                    ));
                }
                Some((host, port)) => (host, Some(port)),
                None => (value, None),
            }
        };
        let port = match port {
            None => DEFAULT_GATEWAY_PORT,
            // `u16::from_str` accepts a leading '+'; a port is digits only.
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(err("port must be a number 1-65535")),
            },
        };
        let host = normalize_host(host).map_err(err)?;
        Ok(GatewayAddress { host, port })
    }

    /// The IP address or DNS name.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// True when the host is an IP address rather than a DNS name.
    pub fn is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }
}

fn normalize_host(host: &str) -> Result<String, &'static str> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let lower = host.to_ascii_lowercase();
    if host.is_empty() {
        Err("host is empty")
    } else if names::is_dns1123_subdomain(&lower) {
        Ok(lower)
    } else {
        Err("host must be an IP address or a DNS name (letters, digits, '-' and '.')")
    }
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for GatewayAddress {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GatewayAddress::parse(s)
    }
}

impl TryFrom<String> for GatewayAddress {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        GatewayAddress::parse(&s)
    }
}

impl From<GatewayAddress> for String {
    fn from(g: GatewayAddress) -> String {
        g.to_string()
    }
}

/// A cluster as the rest of the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    #[serde(with = "serde_names::cluster_name")]
    pub name: ClusterName,
    pub network: Network,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    /// East-west gateways, in the cluster's order of preference: importers
    /// use the first one.
    #[serde(default)]
    pub gateways: Vec<GatewayAddress>,
    #[serde(with = "serde_names::trust_domain")]
    pub trust_domain: TrustDomain,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        for ok in ["network1", "net-east", "a", "Net_1.x"] {
            assert_eq!(Network::new(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "-a", "a-", "a b", "a/b", &"n".repeat(64)] {
            assert_eq!(Network::new(bad), Err(ModelError::Network(bad.to_string())));
        }
        assert!(
            Network::new("a b")
                .unwrap_err()
                .to_string()
                .contains("\"a b\"")
        );
    }

    #[test]
    fn localities_parse_and_display() {
        let l = Locality::parse("us-east1/us-east1-b/rack7").unwrap();
        assert_eq!(
            (l.region(), l.zone(), l.subzone()),
            ("us-east1", Some("us-east1-b"), Some("rack7"))
        );
        for s in ["us-east1", "us-east1/us-east1-b", "r/z/s"] {
            assert_eq!(Locality::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Locality::parse("r").unwrap().zone(), None);
    }

    #[test]
    fn localities_reject_bad_shapes() {
        for (bad, why) in [
            ("", "is empty"),
            ("/zone", "empty part"),
            ("region/", "empty part"),
            ("region//sub", "empty part"),
            ("a/b/c/d", "more than three"),
            ("us east", "each part"),
            ("us-east-/z", "each part"),
        ] {
            let e = Locality::parse(bad).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(why), "{bad}: {msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{bad}: {msg}");
        }
    }

    #[test]
    fn locality_orders_and_serializes() {
        let a = Locality::parse("a/z").unwrap();
        let b = Locality::parse("a/z/s").unwrap();
        let c = Locality::parse("b").unwrap();
        assert!(a < b && b < c);
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"a/z/s\"");
        assert!(serde_json::from_str::<Locality>("\"a//s\"").is_err());
    }

    #[test]
    fn gateway_addresses() {
        for (input, host, port, shown) in [
            ("203.0.113.7", "203.0.113.7", 15443, "203.0.113.7:15443"),
            ("203.0.113.7:443", "203.0.113.7", 443, "203.0.113.7:443"),
            (
                "gw.east.example",
                "gw.east.example",
                15443,
                "gw.east.example:15443",
            ),
            (
                "GW.East.Example:8443",
                "gw.east.example",
                8443,
                "gw.east.example:8443",
            ),
            ("2001:db8::1", "2001:db8::1", 15443, "[2001:db8::1]:15443"),
            ("[2001:db8::1]", "2001:db8::1", 15443, "[2001:db8::1]:15443"),
            (
                "[2001:db8::1]:15443",
                "2001:db8::1",
                15443,
                "[2001:db8::1]:15443",
            ),
            ("[2001:0db8:0::1]:1", "2001:db8::1", 1, "[2001:db8::1]:1"),
        ] {
            let g = GatewayAddress::parse(input).unwrap();
            assert_eq!((g.host(), g.port()), (host, port), "{input}");
            assert_eq!(g.to_string(), shown);
            assert_eq!(GatewayAddress::parse(shown).unwrap(), g);
        }
        assert!(GatewayAddress::parse("1.2.3.4").unwrap().is_ip());
        assert!(!GatewayAddress::parse("gw.example").unwrap().is_ip());
    }

    #[test]
    fn gateway_addresses_reject_bad_shapes() {
        for (bad, why) in [
            ("", "is empty"),
            ("gw:0", "port must be"),
            ("gw:70000", "port must be"),
            ("gw:", "port must be"),
            ("gw: 80", "port must be"),
            ("gw:http", "port must be"),
            ("gw:+80", "port must be"),
            ("[2001:db8::1]:+1", "port must be"),
            ("[2001:db8::1", "closing"),
            ("[gw.example]:1", "IPv6"),
            ("[2001:db8::1]x", "':port'"),
            ("2001:db8::1:15443x", "[address]:port"),
            ("gw_east:1", "DNS name"),
            (":15443", "host is empty"),
            ("-gw.example", "DNS name"),
        ] {
            let msg = GatewayAddress::parse(bad).unwrap_err().to_string();
            assert!(msg.contains(why), "{bad}: {msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{bad}: {msg}");
        }
        assert!(GatewayAddress::new("gw", 0).is_err());
        assert!(GatewayAddress::new("", 1).is_err());
    }

    #[test]
    fn cluster_info_round_trips_through_serde() {
        let info = ClusterInfo {
            name: ClusterName::new("east").unwrap(),
            network: Network::new("net-east").unwrap(),
            locality: Some(Locality::parse("us-east1").unwrap()),
            gateways: vec![GatewayAddress::parse("203.0.113.7").unwrap()],
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "east", "network": "net-east", "locality": "us-east1",
                "gateways": ["203.0.113.7:15443"], "trustDomain": "cluster.local"
            })
        );
        let back: ClusterInfo = serde_json::from_value(json).unwrap();
        assert_eq!(back, info);
        let bad = serde_json::json!({
            "name": "East", "network": "n", "trustDomain": "cluster.local"
        });
        let e = serde_json::from_value::<ClusterInfo>(bad).unwrap_err();
        assert!(e.to_string().contains("East"), "{e}");
    }
}
