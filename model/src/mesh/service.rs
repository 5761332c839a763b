//! Services: their keys, ports and protocols, who may import them, and what
//! an exporting cluster publishes about them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{ClusterInfo, ExportTo, Locality, ModelError};
use crate::names;

/// The default Kubernetes cluster domain.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// The MCS (KEP-1645) domain for services of the whole cluster set.
pub const CLUSTERSET_DOMAIN: &str = "clusterset.local";

/// A port protocol as Istio names it (Istio parses these case-insensitively
/// and spells them as below).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum Protocol {
    Http,
    Https,
    Http2,
    Grpc,
    GrpcWeb,
    Tcp,
    Tls,
    Mongo,
    Redis,
    MySql,
}

impl Protocol {
    pub const ALL: [Protocol; 10] = [
        Protocol::Http,
        Protocol::Https,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::Tcp,
        Protocol::Tls,
        Protocol::Mongo,
        Protocol::Redis,
        Protocol::MySql,
    ];

    /// Istio's spelling, as in a ServiceEntry port's `protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Https => "HTTPS",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-Web",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Mongo => "Mongo",
            Protocol::Redis => "Redis",
            Protocol::MySql => "MySQL",
        }
    }

    /// Parses a protocol name, case-insensitively as Istio does. `UDP` and
    /// `UNSUPPORTED` are refused: strait cannot carry them across networks.
    pub fn parse(value: &str) -> Result<Self, ModelError> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(value))
            .ok_or_else(|| ModelError::Protocol(value.to_string()))
    }

    /// Istio's port-naming convention: `<protocol>[-<suffix>]`, e.g.
    /// `http-web` or `grpc`. `None` when the name carries no known protocol.
    pub fn from_port_name(name: &str) -> Option<Self> {
        let prefix = name.split_once('-').map_or(name, |(p, _)| p);
        // "grpc-web" is the one protocol whose own name contains '-'.
        if name.eq_ignore_ascii_case("grpc-web")
            || name.to_ascii_lowercase().starts_with("grpc-web-")
        {
            return Some(Protocol::GrpcWeb);
        }
        Protocol::parse(prefix).ok()
    }

    /// The Kubernetes `appProtocol` for this protocol (lowercase Istio names,
    /// `kubernetes.io/h2c` for cleartext HTTP/2), which Istio also reads.
    pub fn app_protocol(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Http2 => "kubernetes.io/h2c",
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
            Protocol::Mongo => "mongo",
            Protocol::Redis => "redis",
            Protocol::MySql => "mysql",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::parse(s)
    }
}

impl TryFrom<String> for Protocol {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Protocol::parse(&s)
    }
}

impl From<Protocol> for &'static str {
    fn from(p: Protocol) -> &'static str {
        p.as_str()
    }
}

/// A service port. The name follows Istio's rule for endpoint port names
/// (letters, digits and `-`, shorter than 63 characters) because importers
/// key endpoint port maps by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawServicePort")]
pub struct ServicePort {
    name: String,
    number: u16,
    protocol: Protocol,
    /// The port the workloads listen on, when it differs from `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServicePort {
    name: String,
    number: u16,
    protocol: Protocol,
    #[serde(default)]
    target_port: Option<u16>,
}

impl TryFrom<RawServicePort> for ServicePort {
    type Error = ModelError;
    fn try_from(r: RawServicePort) -> Result<Self, Self::Error> {
        ServicePort::new(&r.name, r.number, r.protocol, r.target_port)
    }
}

impl ServicePort {
    pub fn new(
        name: &str,
        number: u16,
        protocol: Protocol,
        target_port: Option<u16>,
    ) -> Result<Self, ModelError> {
        let name_ok = !name.is_empty()
            && name.len() < names::MAX_LABEL_LEN
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !name_ok {
            return Err(ModelError::PortName(name.to_string()));
        }
        if number == 0 {
            return Err(ModelError::PortNumber {
                name: name.to_string(),
                field: "number",
            });
        }
        if target_port == Some(0) {
            return Err(ModelError::PortNumber {
                name: name.to_string(),
                field: "targetPort",
            });
        }
        Ok(ServicePort {
            name: name.to_string(),
            number,
            protocol,
            target_port,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn number(&self) -> u16 {
        self.number
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn target_port(&self) -> Option<u16> {
        self.target_port
    }

    /// The port a workload receives this port's traffic on.
    pub fn workload_port(&self) -> u16 {
        self.target_port.unwrap_or(self.number)
    }
}

/// A service's identity across the mesh, `<name>.<namespace>`: by namespace
/// sameness, the same key in several clusters is one service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawServiceKey")]
pub struct ServiceKey {
    namespace: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceKey {
    namespace: String,
    name: String,
}

impl TryFrom<RawServiceKey> for ServiceKey {
    type Error = ModelError;
    fn try_from(r: RawServiceKey) -> Result<Self, Self::Error> {
        ServiceKey::new(&r.namespace, &r.name)
    }
}

impl ServiceKey {
    /// Both parts must be DNS-1123 labels, so that they fit in a hostname.
    pub fn new(namespace: &str, name: &str) -> Result<Self, ModelError> {
        if !names::is_dns1123_label(namespace) {
            return Err(ModelError::Namespace(namespace.to_string()));
        }
        if !names::is_dns1123_label(name) {
            return Err(ModelError::ServiceName(name.to_string()));
        }
        Ok(ServiceKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<name>.<namespace>.svc.clusterset.local`, the host every importer
    /// knows the service by.
    pub fn hostname_clusterset(&self) -> String {
        format!("{}.{}.svc.{CLUSTERSET_DOMAIN}", self.name, self.namespace)
    }

    /// `<name>.<namespace>.svc.<domain>`, the in-cluster host; the domain
    /// defaults to [`DEFAULT_CLUSTER_DOMAIN`].
    pub fn hostname_local(&self, domain: Option<&str>) -> String {
        let domain = domain.unwrap_or(DEFAULT_CLUSTER_DOMAIN);
        format!("{}.{}.svc.{domain}", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceKey {
    /// `namespace/name`, as kubectl names objects.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Endpoint counts of a service in one locality of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityEndpoints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    pub healthy: u32,
    pub total: u32,
}

/// What a cluster publishes to its broker about one exported service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawExportedService")]
pub struct ExportedService {
    pub key: ServiceKey,
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub service_accounts: BTreeSet<String>,
    /// Labels every endpoint of the service carries (e.g. `version: v2`
    /// when all of this cluster's endpoints run v2), so that importers can
    /// select the cluster's endpoints by subset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoint_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<LocalityEndpoints>,
    #[serde(default)]
    pub export_to: ExportTo,
    /// Ready endpoint IPs; only published to clusters on the same network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawExportedService {
    key: ServiceKey,
    ports: Vec<ServicePort>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    service_accounts: BTreeSet<String>,
    #[serde(default)]
    endpoint_labels: BTreeMap<String, String>,
    #[serde(default)]
    endpoints: Vec<LocalityEndpoints>,
    #[serde(default)]
    export_to: ExportTo,
    #[serde(default)]
    addresses: Vec<String>,
}

impl TryFrom<RawExportedService> for ExportedService {
    type Error = ModelError;
    fn try_from(r: RawExportedService) -> Result<Self, Self::Error> {
        let s = ExportedService {
            key: r.key,
            ports: r.ports,
            labels: r.labels,
            service_accounts: r.service_accounts,
            endpoint_labels: r.endpoint_labels,
            endpoints: r.endpoints,
            export_to: r.export_to,
            addresses: r.addresses,
        };
        s.validate()?;
        Ok(s)
    }
}

impl ExportedService {
    /// A service with these ports, no endpoints yet, exported to the whole
    /// own mesh.
    pub fn new(key: ServiceKey, ports: Vec<ServicePort>) -> Self {
        ExportedService {
            key,
            ports,
            labels: BTreeMap::new(),
            service_accounts: BTreeSet::new(),
            endpoint_labels: BTreeMap::new(),
            endpoints: Vec::new(),
            export_to: ExportTo::whole_mesh(),
            addresses: Vec::new(),
        }
    }

    /// Healthy endpoints across all localities.
    pub fn healthy(&self) -> u32 {
        self.endpoints
            .iter()
            .fold(0u32, |n, e| n.saturating_add(e.healthy))
    }

    /// Checks the rules the field types cannot: at least one port, unique
    /// port names and numbers, valid labels and service account names,
    /// `healthy <= total`, one entry per locality, addresses that are
    /// unique IPs.
    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |problem: String| ModelError::service(&self.key, problem);
        if self.ports.is_empty() {
            return Err(err("has no ports".to_string()));
        }
        validate_ports(&self.key, &self.ports)?;
        validate_labels(&self.key, "label", &self.labels)?;
        validate_labels(&self.key, "endpoint label", &self.endpoint_labels)?;
        for sa in &self.service_accounts {
            if !names::is_dns1123_subdomain(sa) {
                return Err(err(format!(
                    "service account {sa:?} is not a valid Kubernetes name (DNS-1123 subdomain)"
                )));
            }
        }
        let mut localities = BTreeSet::new();
        for e in &self.endpoints {
            let shown = e
                .locality
                .as_ref()
                .map_or_else(|| "<none>".to_string(), |l| l.to_string());
            if e.healthy > e.total {
                return Err(err(format!(
                    "locality {shown}: {} healthy endpoints but only {} in total",
                    e.healthy, e.total
                )));
            }
            if !localities.insert(&e.locality) {
                return Err(err(format!("locality {shown} is listed twice")));
            }
        }
        let mut seen = BTreeSet::new();
        for a in &self.addresses {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| err(format!("address {a:?} is not an IP address")))?;
            if !seen.insert(ip) {
                return Err(err(format!("address {a:?} is listed twice")));
            }
        }
        Ok(())
    }
}

/// One exporting cluster's export of a service, as an importer receives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteService {
    pub from: ClusterInfo,
    pub service: ExportedService,
}

/// A Kubernetes Service of the importing cluster that has the same key as an
/// imported service: imported endpoints join it through WorkloadEntries that
/// its selector picks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawLocalService")]
pub struct LocalService {
    pub key: ServiceKey,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalService {
    key: ServiceKey,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
}

impl TryFrom<RawLocalService> for LocalService {
    type Error = ModelError;
    fn try_from(r: RawLocalService) -> Result<Self, Self::Error> {
        let s = LocalService {
            key: r.key,
            selector: r.selector,
            ports: r.ports,
        };
        s.validate()?;
        Ok(s)
    }
}

impl LocalService {
    /// Unique port names and numbers, valid selector labels.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_ports(&self.key, &self.ports)?;
        validate_labels(&self.key, "selector label", &self.selector)
    }
}

fn validate_ports(key: &ServiceKey, ports: &[ServicePort]) -> Result<(), ModelError> {
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for p in ports {
        if !names.insert(p.name()) {
            return Err(ModelError::service(
                key,
                format!("port name {:?} is used twice", p.name()),
            ));
        }
        if !numbers.insert(p.number()) {
            return Err(ModelError::service(
                key,
                format!("port number {} is used twice", p.number()),
            ));
        }
    }
    Ok(())
}

fn validate_labels(
    key: &ServiceKey,
    what: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), ModelError> {
    for (k, v) in labels {
        if !names::is_label_key(k) {
            return Err(ModelError::service(
                key,
                format!("{what} key {k:?} is not a valid Kubernetes label key"),
            ));
        }
        if !names::is_label_value(v) {
            return Err(ModelError::service(
                key,
                format!("{what} {k:?} has value {v:?}, not a valid Kubernetes label value"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey::new("bookinfo", "reviews").unwrap()
    }

    fn port(name: &str, number: u16) -> ServicePort {
        ServicePort::new(name, number, Protocol::Http, None).unwrap()
    }

    #[test]
    fn protocols_parse_case_insensitively_and_print_as_istio() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::parse(p.as_str()).unwrap(), p);
            assert_eq!(Protocol::parse(&p.as_str().to_lowercase()).unwrap(), p);
            assert_eq!(Protocol::parse(&p.as_str().to_uppercase()).unwrap(), p);
        }
        assert_eq!(Protocol::parse("grpc-web").unwrap().as_str(), "GRPC-Web");
        assert_eq!(Protocol::parse("mysql").unwrap().to_string(), "MySQL");
        for bad in ["", "UDP", "UNSUPPORTED", "http ", "h2", "SCTP"] {
            let e = Protocol::parse(bad).unwrap_err();
            assert_eq!(e, ModelError::Protocol(bad.to_string()));
            assert!(e.to_string().contains(&format!("{bad:?}")));
        }
        assert_eq!(
            serde_json::to_string(&Protocol::GrpcWeb).unwrap(),
            "\"GRPC-Web\""
        );
        assert_eq!(
            serde_json::from_str::<Protocol>("\"http2\"").unwrap(),
            Protocol::Http2
        );
        assert!(serde_json::from_str::<Protocol>("\"udp\"").is_err());
    }

    #[test]
    fn protocols_from_port_names() {
        for (name, want) in [
            ("http", Some(Protocol::Http)),
            ("http-web", Some(Protocol::Http)),
            ("HTTP2-x", Some(Protocol::Http2)),
            ("grpc", Some(Protocol::Grpc)),
            ("grpc-web", Some(Protocol::GrpcWeb)),
            ("grpc-web-ui", Some(Protocol::GrpcWeb)),
            ("grpc-api", Some(Protocol::Grpc)),
            ("tcp-db", Some(Protocol::Tcp)),
            ("web", None),
            ("httpx", None),
        ] {
            assert_eq!(Protocol::from_port_name(name), want, "{name}");
        }
        assert_eq!(Protocol::Http2.app_protocol(), "kubernetes.io/h2c");
    }

    #[test]
    fn service_ports() {
        let p = ServicePort::new("http-web", 9080, Protocol::Http, Some(8080)).unwrap();
        assert_eq!(
            (p.name(), p.number(), p.workload_port()),
            ("http-web", 9080, 8080)
        );
        assert_eq!(port("http", 9080).workload_port(), 9080);
        for bad in ["", "-a", "a-", "a_b", "a.b", "a b", &"p".repeat(63)] {
            assert_eq!(
                ServicePort::new(bad, 1, Protocol::Tcp, None),
                Err(ModelError::PortName(bad.to_string()))
            );
        }
        assert!(ServicePort::new(&"p".repeat(62), 1, Protocol::Tcp, None).is_ok());
        assert!(ServicePort::new("Http-Upper", 1, Protocol::Tcp, None).is_ok());
        let e = ServicePort::new("http", 0, Protocol::Tcp, None).unwrap_err();
        assert!(e.to_string().contains("number must be 1-65535"), "{e}");
        let e = ServicePort::new("http", 1, Protocol::Tcp, Some(0)).unwrap_err();
        assert!(e.to_string().contains("targetPort"), "{e}");
    }

    #[test]
    fn service_port_serde_validates() {
        let p: ServicePort =
            serde_json::from_str(r#"{"name":"http","number":9080,"protocol":"http"}"#).unwrap();
        assert_eq!(p, port("http", 9080));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"name":"http","number":9080,"protocol":"HTTP"}"#
        );
        for bad in [
            r#"{"name":"http","number":0,"protocol":"HTTP"}"#,
            r#"{"name":"ht_tp","number":1,"protocol":"HTTP"}"#,
            r#"{"name":"http","number":70000,"protocol":"HTTP"}"#,
            r#"{"name":"http","number":1,"protocol":"UDP"}"#,
            r#"{"name":"http","number":1,"protocol":"HTTP","extra":1}"#,
        ] {
            assert!(serde_json::from_str::<ServicePort>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_keys_and_hostnames() {
        let k = key();
        assert_eq!(
            k.hostname_clusterset(),
            "reviews.bookinfo.svc.clusterset.local"
        );
        assert_eq!(k.hostname_local(None), "reviews.bookinfo.svc.cluster.local");
        assert_eq!(
            k.hostname_local(Some("corp.internal")),
            "reviews.bookinfo.svc.corp.internal"
        );
        assert_eq!(k.to_string(), "bookinfo/reviews");
        assert_eq!(
            ServiceKey::new("Bookinfo", "r"),
            Err(ModelError::Namespace("Bookinfo".into()))
        );
        assert_eq!(
            ServiceKey::new("ns", "a.b"),
            Err(ModelError::ServiceName("a.b".into()))
        );
        assert!(ServiceKey::new("", "r").is_err());
        assert!(ServiceKey::new("ns", &"r".repeat(64)).is_err());
        let back: ServiceKey =
            serde_json::from_str(r#"{"namespace":"bookinfo","name":"reviews"}"#).unwrap();
        assert_eq!(back, k);
        assert!(serde_json::from_str::<ServiceKey>(r#"{"namespace":"b","name":"R"}"#).is_err());
        assert!(ServiceKey::new("a", "z").unwrap() < ServiceKey::new("b", "a").unwrap());
    }

    fn exported() -> ExportedService {
        let mut s = ExportedService::new(key(), vec![port("http", 9080), port("grpc", 9090)]);
        s.endpoints = vec![
            LocalityEndpoints {
                locality: Some(Locality::parse("r/z1").unwrap()),
                healthy: 2,
                total: 3,
            },
            LocalityEndpoints {
                locality: Some(Locality::parse("r/z2").unwrap()),
                healthy: 1,
                total: 1,
            },
        ];
        s.service_accounts.insert("bookinfo-reviews".into());
        s.labels.insert("app".into(), "reviews".into());
        s.addresses = vec!["10.0.0.1".into(), "fd00::1".into()];
        s
    }

    #[test]
    fn exported_service_counts_and_validates() {
        let s = exported();
        assert_eq!(s.healthy(), 3);
        s.validate().unwrap();
        let mut big = s.clone();
        big.endpoints[0].healthy = u32::MAX;
        big.endpoints[0].total = u32::MAX;
        assert_eq!(big.healthy(), u32::MAX);
    }

    #[test]
    fn exported_service_rejects_bad_fields() {
        type Mutation = Box<dyn Fn(&mut ExportedService)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("has no ports", Box::new(|s| s.ports.clear())),
            (
                "port name \"http\" is used twice",
                Box::new(|s| s.ports.push(port("http", 1))),
            ),
            (
                "port number 9080 is used twice",
                Box::new(|s| s.ports.push(port("other", 9080))),
            ),
            (
                "label key \"-x\"",
                Box::new(|s| {
                    s.labels.insert("-x".into(), "v".into());
                }),
            ),
            (
                "label \"app\" has value \"a b\"",
                Box::new(|s| {
                    s.labels.insert("app".into(), "a b".into());
                }),
            ),
            (
                "service account \"Bad_SA\"",
                Box::new(|s| {
                    s.service_accounts.insert("Bad_SA".into());
                }),
            ),
            (
                "locality r/z1: 4 healthy endpoints but only 3",
                Box::new(|s| s.endpoints[0].healthy = 4),
            ),
            (
                "locality r/z1 is listed twice",
                Box::new(|s| s.endpoints[1].locality = s.endpoints[0].locality.clone()),
            ),
            (
                "address \"pod-a\" is not an IP",
                Box::new(|s| s.addresses.push("pod-a".into())),
            ),
            (
                "address \"10.0.0.1\" is listed twice",
                Box::new(|s| s.addresses.push("10.0.0.1".into())),
            ),
        ];
        for (want, mutate) in cases {
            let mut s = exported();
            mutate(&mut s);
            let msg = s.validate().unwrap_err().to_string();
            assert!(msg.starts_with("service bookinfo/reviews: "), "{msg}");
            assert!(msg.contains(want), "want {want:?} in {msg:?}");
            let json = serde_json::to_value(&s).unwrap();
            assert!(
                serde_json::from_value::<ExportedService>(json).is_err(),
                "{want}"
            );
        }
    }

    #[test]
    fn exported_service_serde_round_trip() {
        let s = exported();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["serviceAccounts"],
            serde_json::json!(["bookinfo-reviews"])
        );
        assert_eq!(json["endpoints"][0]["locality"], "r/z1");
        assert_eq!(serde_json::from_value::<ExportedService>(json).unwrap(), s);
        let minimal = serde_json::json!({
            "key": {"namespace": "bookinfo", "name": "reviews"},
            "ports": [{"name": "http", "number": 9080, "protocol": "HTTP"}]
        });
        let m: ExportedService = serde_json::from_value(minimal).unwrap();
        assert!(m.export_to.is_whole_mesh() && m.healthy() == 0);
    }

    #[test]
    fn local_service_validates() {
        let mut l = LocalService {
            key: key(),
            selector: BTreeMap::from([("app".to_string(), "reviews".to_string())]),
            ports: vec![port("http", 9080)],
        };
        l.validate().unwrap();
        l.selector.insert("bad key".into(), "x".into());
        let msg = l.validate().unwrap_err().to_string();
        assert!(msg.contains("selector label key \"bad key\""), "{msg}");
        l.selector.remove("bad key");
        l.ports.push(port("http", 1));
        assert!(l.validate().is_err());
        let json = serde_json::to_value(&l).unwrap();
        assert!(serde_json::from_value::<LocalService>(json).is_err());
    }
}
