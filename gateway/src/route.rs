//! Where a passthrough connection goes: Istio's SNI read into a target
//! (with the codec the sidecars use, [`strait_model::sni`]), and the
//! routing table of exported services and their local endpoints (subsets
//! by labels, round robin over healthy endpoints).
//! Pure: the listener feeds names in and gets addresses out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Deserialize;
use strait_proto::strait::mesh::v1 as pb;

/// The ALPN values Istio sidecars offer on mTLS to a remote gateway.
pub const ISTIO_ALPN: [&[u8]; 5] = [
    b"istio",
    b"istio-peer-exchange",
    b"istio-http/1.0",
    b"istio-http/1.1",
    b"istio-h2",
];

/// A parsed `outbound_.<port>_.<subset>_.<fqdn>`, owned (it outlives the
/// ClientHello it was read from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub port: u16,
    pub subset: Option<String>,
    pub host: String,
}

/// Why an SNI is not Istio's: the codec's own error.
pub use strait_model::sni::SniError as TargetError;

/// Parses Istio's cross-network SNI, e.g.
/// `outbound_.9080_._.reviews.bookinfo.svc.cluster.local` (no subset) or
/// `outbound_.9080_.v1_.reviews.bookinfo.svc.cluster.local`, with the
/// codec the sidecars use ([`strait_model::sni`]).
pub fn parse_target(sni: &str) -> Result<Target, TargetError> {
    let parsed = strait_model::sni::parse(sni)?;
    Ok(Target {
        port: parsed.port,
        subset: parsed.subset.map(str::to_string),
        host: parsed.host.to_string(),
    })
}

/// The routing table file (`--routes FILE`, YAML or JSON).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    #[serde(default)]
    pub services: Vec<ServiceRoute>,
    /// Services of other networks, reached through their gateways' QUIC
    /// tunnels (used by the egress listener).
    #[serde(default)]
    pub remote: Vec<RemoteRoute>,
}

impl RoutesFile {
    /// The routing table the control plane pushes: exported services from
    /// `GatewayRoute` resources; for the egress side, every service with
    /// endpoints on another network, reached through that network's QUIC
    /// tunnel addresses (from `Network` resources). A route whose
    /// endpoint address is not an IP is left out and named in the errors.
    pub fn from_resources(
        routes: &[pb::GatewayRoute],
        services: &[pb::Service],
        networks: &[pb::Network],
    ) -> (RoutesFile, Vec<String>) {
        let mut errors = Vec::new();
        let mut out = RoutesFile::default();
        for r in routes {
            let mut endpoints = Vec::new();
            for e in &r.endpoints {
                let Ok(address) = e.address.parse() else {
                    errors.push(format!(
                        "GatewayRoute {}: endpoint address {:?} is not an IP address",
                        r.hostname, e.address
                    ));
                    continue;
                };
                let ports = e
                    .ports
                    .iter()
                    .filter_map(|(k, v)| Some((u16::try_from(*k).ok()?, u16::try_from(*v).ok()?)))
                    .collect();
                endpoints.push(Endpoint {
                    address,
                    ports,
                    labels: e.labels.clone().into_iter().collect(),
                    healthy: e.healthy,
                });
            }
            out.services.push(ServiceRoute {
                host: r.hostname.clone(),
                ports: r
                    .ports
                    .iter()
                    .filter_map(|p| u16::try_from(*p).ok())
                    .collect(),
                subsets: r
                    .subsets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.labels.clone().into_iter().collect()))
                    .collect(),
                endpoints,
            });
        }
        let tunnels: BTreeMap<&str, &[String]> = networks
            .iter()
            .filter(|n| !n.tunnels.is_empty())
            .map(|n| (n.name.as_str(), n.tunnels.as_slice()))
            .collect();
        for s in services {
            let mut gateways: Vec<String> = Vec::new();
            for e in &s.endpoints {
                if let Some(t) = tunnels.get(e.network.as_str()) {
                    for g in t.iter() {
                        if !gateways.contains(g) {
                            gateways.push(g.clone());
                        }
                    }
                }
            }
            if !gateways.is_empty() {
                out.remote.push(RemoteRoute {
                    host: s.hostname.clone(),
                    gateways,
                });
            }
        }
        (out, errors)
    }
}

/// A host served by other networks' gateways.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RemoteRoute {
    pub host: String,
    /// The remote gateways' tunnel addresses (UDP), `ip:port` or
    /// `dns-name:port`, in order of preference.
    pub gateways: Vec<String>,
}

/// One exported service: its host, exported ports, subsets and endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceRoute {
    /// e.g. `reviews.bookinfo.svc.cluster.local`
    pub host: String,
    /// The exported service ports; connections for other ports are refused.
    pub ports: Vec<u16>,
    /// Subset name → labels an endpoint must have.
    #[serde(default)]
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Endpoint {
    /// The workload's IP address.
    pub address: std::net::IpAddr,
    /// Service port → endpoint port, where they differ.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "yes")]
    pub healthy: bool,
}

fn yes() -> bool {
    true
}

/// Why a target has nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{0} is not exported by this cluster")]
    NotExported(String),
    #[error("port {port} of {host} is not exported")]
    PortNotExported { host: String, port: u16 },
    #[error("subset {subset:?} of {host} is not defined")]
    UnknownSubset { host: String, subset: String },
    #[error("{0} has no healthy endpoint")]
    NoHealthyEndpoint(String),
}

impl RouteError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::NotExported(_) => "not_exported",
            RouteError::PortNotExported { .. } => "port_not_exported",
            RouteError::UnknownSubset { .. } => "unknown_subset",
            RouteError::NoHealthyEndpoint(_) => "no_healthy_endpoint",
        }
    }
}

/// A routing table file whose entries do not hold together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The service (its host) lacks a host or ports.
    #[error("service {0:?}: host and ports are required")]
    Incomplete(String),
    #[error("service {0:?} is listed twice")]
    DuplicateService(String),
    #[error("remote {0:?}: no gateway")]
    NoGateway(String),
    #[error("remote {host:?}: gateway {gateway:?} is not host:port")]
    BadGateway { host: String, gateway: String },
    #[error("remote {0:?} is listed twice")]
    DuplicateRemote(String),
}

/// The routing table, ready for lookups.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: BTreeMap<String, ServiceRoute>,
    remote: BTreeMap<String, Vec<String>>,
    cursor: AtomicUsize,
}

impl RouteTable {
    pub fn new(file: RoutesFile) -> Result<Self, TableError> {
        let mut services = BTreeMap::new();
        for s in file.services {
            let host = s.host.to_ascii_lowercase();
            if host.is_empty() || s.ports.is_empty() {
                return Err(TableError::Incomplete(host));
            }
            if services.insert(host.clone(), s).is_some() {
                return Err(TableError::DuplicateService(host));
            }
        }
        let mut remote = BTreeMap::new();
        for r in file.remote {
            let host = r.host.to_ascii_lowercase();
            if r.gateways.is_empty() {
                return Err(TableError::NoGateway(host));
            }
            for g in &r.gateways {
                let ok = g
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
                if !ok {
                    return Err(TableError::BadGateway {
                        host,
                        gateway: g.clone(),
                    });
                }
            }
            if remote.insert(host.clone(), r.gateways).is_some() {
                return Err(TableError::DuplicateRemote(host));
            }
        }
        Ok(RouteTable {
            services,
            remote,
            cursor: AtomicUsize::new(0),
        })
    }

    /// The gateways of other networks that serve `host` (`host:port`).
    pub fn remote_gateways(&self, host: &str) -> Option<Vec<String>> {
        self.remote.get(host).cloned()
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Up to `n` distinct candidate addresses for `target`, in round-robin
    /// order (the first to try first; the next for the one retry).
    pub fn pick(&self, target: &Target, n: usize) -> Result<Vec<SocketAddr>, RouteError> {
        let s = self
            .services
            .get(&target.host)
            .ok_or_else(|| RouteError::NotExported(target.host.clone()))?;
        if !s.ports.contains(&target.port) {
            return Err(RouteError::PortNotExported {
                host: target.host.clone(),
                port: target.port,
            });
        }
        let want = match &target.subset {
            None => None,
            Some(name) => Some(
                s.subsets
                    .get(name)
                    .ok_or_else(|| RouteError::UnknownSubset {
                        host: target.host.clone(),
                        subset: name.clone(),
                    })?,
            ),
        };
        let eligible: Vec<SocketAddr> = s
            .endpoints
            .iter()
            .filter(|e| e.healthy)
            .filter(|e| want.is_none_or(|w| w.iter().all(|(k, v)| e.labels.get(k) == Some(v))))
            .map(|e| {
                let port = e.ports.get(&target.port).copied().unwrap_or(target.port);
                SocketAddr::new(e.address, port)
            })
            .collect();
        if eligible.is_empty() {
            return Err(RouteError::NoHealthyEndpoint(target.host.clone()));
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        Ok((0..n.min(eligible.len()))
            .map(|i| eligible[(start + i) % eligible.len()])
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn routes_from_control_plane_resources() {
        let route = pb::GatewayRoute {
            hostname: "echo.demo.svc.cluster.local".into(),
            ports: vec![8080],
            subsets: [(
                "v1".to_string(),
                pb::Labels {
                    labels: [("version".to_string(), "v1".to_string())].into(),
                },
            )]
            .into(),
            endpoints: vec![
                pb::GatewayEndpoint {
                    address: "127.11.0.10".into(),
                    ports: [(8080, 15006)].into(),
                    labels: [("version".to_string(), "v1".to_string())].into(),
                    healthy: true,
                },
                pb::GatewayEndpoint {
                    address: "not-an-ip".into(),
                    ..Default::default()
                },
            ],
        };
        let remote = pb::Service {
            hostname: "far.demo.svc.cluster.local".into(),
            endpoints: vec![pb::Endpoint {
                network: "net-west".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let net = pb::Network {
            name: "net-west".into(),
            tunnels: vec!["127.12.0.2:15443".into()],
            ..Default::default()
        };
        let (file, errors) = RoutesFile::from_resources(&[route], &[remote], &[net]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("not-an-ip"));
        let table = RouteTable::new(file).unwrap();
        let t = parse_target("outbound_.8080_.v1_.echo.demo.svc.cluster.local").unwrap();
        assert_eq!(
            table.pick(&t, 1).unwrap(),
            ["127.11.0.10:15006".parse().unwrap()]
        );
        assert_eq!(
            table.remote_gateways("far.demo.svc.cluster.local"),
            Some(vec!["127.12.0.2:15443".to_string()])
        );
    }

    use super::*;

    #[test]
    fn istio_sni_forms() {
        assert_eq!(
            parse_target("outbound_.9080_._.reviews.bookinfo.svc.cluster.local").unwrap(),
            Target {
                port: 9080,
                subset: None,
                host: "reviews.bookinfo.svc.cluster.local".into()
            }
        );
        assert_eq!(
            parse_target("outbound_.9080_.v1_.reviews.bookinfo.svc.cluster.local")
                .unwrap()
                .subset
                .as_deref(),
            Some("v1")
        );
        for bad in [
            "reviews.bookinfo",
            "inbound_.9080_._.x",
            "outbound_.9080",
            "outbound_.9080_.v1",
        ] {
            assert!(
                matches!(parse_target(bad), Err(TargetError::NotIstio(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_target("outbound_.http_._.x"),
            Err(TargetError::Port { .. })
        ));
        assert!(matches!(
            parse_target("outbound_.0_._.x"),
            Err(TargetError::Port { .. })
        ));
        assert!(matches!(
            parse_target("outbound_.+80_._.x"),
            Err(TargetError::Port { .. })
        ));
        assert!(matches!(
            parse_target("outbound_.080_._.x"),
            Err(TargetError::Port { .. })
        ));
        assert!(matches!(
            parse_target("outbound_.99999_._.x"),
            Err(TargetError::Port { .. })
        ));
        assert!(matches!(
            parse_target("outbound_.80_._."),
            Err(TargetError::EmptyHost(_))
        ));
    }

    fn table() -> RouteTable {
        let yaml = r#"
services:
- host: reviews.bookinfo.svc.cluster.local
  ports: [9080]
  subsets: {v1: {version: v1}, v2: {version: v2}}
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}, ports: {9080: 19080}}
  - {address: 10.0.0.3, labels: {version: v1}, healthy: false}
"#;
        RouteTable::new(serde_saphyr::from_str(yaml).unwrap()).unwrap()
    }

    fn t(sni: &str) -> Target {
        parse_target(sni).unwrap()
    }

    #[test]
    fn picks_healthy_endpoints_round_robin_and_by_subset() {
        let rt = table();
        let any = t("outbound_.9080_._.reviews.bookinfo.svc.cluster.local");
        let a = rt.pick(&any, 2).unwrap();
        let b = rt.pick(&any, 2).unwrap();
        assert_eq!(a.len(), 2);
        assert_ne!(a[0], b[0], "round robin");
        assert!(
            a.iter().chain(&b).all(|x| x.ip().to_string() != "10.0.0.3"),
            "unhealthy skipped"
        );
        let v2 = rt
            .pick(
                &t("outbound_.9080_.v2_.reviews.bookinfo.svc.cluster.local"),
                2,
            )
            .unwrap();
        assert_eq!(v2, ["10.0.0.2:19080".parse().unwrap()]);
        let v1 = rt
            .pick(
                &t("outbound_.9080_.v1_.reviews.bookinfo.svc.cluster.local"),
                2,
            )
            .unwrap();
        assert_eq!(v1, ["10.0.0.1:9080".parse().unwrap()]);
    }

    #[test]
    fn refusals_say_why() {
        let rt = table();
        let e = rt
            .pick(
                &t("outbound_.9080_._.ratings.bookinfo.svc.cluster.local"),
                1,
            )
            .unwrap_err();
        assert_eq!(e.reason(), "not_exported");
        let e = rt
            .pick(
                &t("outbound_.9999_._.reviews.bookinfo.svc.cluster.local"),
                1,
            )
            .unwrap_err();
        assert_eq!(e.reason(), "port_not_exported");
        let e = rt
            .pick(
                &t("outbound_.9080_.v9_.reviews.bookinfo.svc.cluster.local"),
                1,
            )
            .unwrap_err();
        assert_eq!(e.reason(), "unknown_subset");
    }

    #[test]
    fn bad_tables_are_refused() {
        let dup: RoutesFile = serde_saphyr::from_str(
            "services:\n- {host: a, ports: [1], endpoints: []}\n- {host: a, ports: [1], endpoints: []}\n",
        )
        .unwrap();
        assert!(
            RouteTable::new(dup)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(
            serde_saphyr::from_str::<RoutesFile>(
                "services:\n- {host: a, ports: [1], endpoints: [], typo: 1}\n"
            )
            .is_err()
        );
    }
}
