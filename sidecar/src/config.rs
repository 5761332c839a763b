//! What the sidecar knows of the mesh: the services it can call (with
//! their endpoints and allowed identities), itself, the compiled Istio
//! policies, and the trust bundles, built from the control plane's
//! resources. Rebuilt whole on every accepted update.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use strait_ca::{SpiffeId, TrustDomain};
use strait_proto::strait::mesh::v1 as pb;

use strait_model::request_path::PathNormalization;

use crate::policy::{DEFAULT_ROOT_NAMESPACE, Labels, Policies};

/// Which workload this sidecar serves.
#[derive(Debug, Clone)]
pub struct WorkloadRef {
    /// The workload's name (its WorkloadEntry or pod).
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

/// The sidecar's view of the mesh.
#[derive(Debug, Default)]
pub struct MeshConfig {
    /// Canonical hostname → service.
    pub services: HashMap<String, Arc<pb::Service>>,
    /// Every name a service answers to → its canonical hostname.
    names: HashMap<String, String>,
    /// Where a service is served → its canonical hostname and the
    /// service port: its virtual IPs on each service port, and its sidecar
    /// endpoints' addresses on each target port (what a redirected app
    /// dialed; see [`MeshConfig::service_at`]).
    addresses: HashMap<SocketAddr, (String, u16)>,
    /// This workload, once the control plane knows it.
    pub me: Option<pb::Workload>,
    /// This workload's labels (for policy selectors).
    pub my_labels: Labels,
    /// The compiled Istio policies.
    pub policies: Arc<Policies>,
    /// The trust bundles; the local one first.
    pub bundles: Vec<pb::TrustBundle>,
    /// Other networks by name.
    pub networks: HashMap<String, pb::Network>,
    /// Built from the control plane's resources (not the empty default).
    pub loaded: bool,
    /// Changes whenever the bundles or the deny-list change: upstream
    /// connections verified under other trust are not reused.
    pub trust_version: u64,
    /// How HTTP request paths are normalized, inbound and outbound, before
    /// policy, routing and forwarding (the mesh's `MeshSettings`; `BASE`
    /// without one).
    pub path_normalization: PathNormalization,
}

/// A `MeshSettings` path normalization that names no known mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path_normalization {0} is not a known mode (0 to 4)")]
pub struct UnknownPathNormalization(pub i32);

/// The path normalization a `MeshSettings` resource names.
fn path_normalization(m: &pb::MeshSettings) -> Result<PathNormalization, UnknownPathNormalization> {
    use pb::mesh_settings::PathNormalization as W;
    match W::try_from(m.path_normalization) {
        Ok(W::Default | W::Base) => Ok(PathNormalization::Base),
        Ok(W::None) => Ok(PathNormalization::None),
        Ok(W::MergeSlashes) => Ok(PathNormalization::MergeSlashes),
        Ok(W::DecodeAndMergeSlashes) => Ok(PathNormalization::DecodeAndMergeSlashes),
        Err(_) => Err(UnknownPathNormalization(m.path_normalization)),
    }
}

/// A service port and the workload port it reaches (its `targetPort`, or
/// the same port when unset); `None` for numbers that are not ports.
fn port_and_target(p: &pb::Port) -> Option<(u16, u16)> {
    let port = u16::try_from(p.port).ok()?;
    let target = match p.target_port {
        0 => port,
        t => u16::try_from(t).ok()?,
    };
    Some((port, target))
}

/// The index behind [`MeshConfig::service_at`]. Services go in hostname
/// order and the first to claim an address keeps it (two Services that
/// select the same pods, a headless one next to a ClusterIP one, reach
/// the same endpoints either way); virtual IPs before endpoint addresses.
fn service_addresses(
    services: &HashMap<String, Arc<pb::Service>>,
) -> HashMap<SocketAddr, (String, u16)> {
    let mut sorted: Vec<(&String, &Arc<pb::Service>)> = services.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = HashMap::new();
    let ports = |s: &pb::Service| -> Vec<(u16, u16)> {
        s.ports.iter().filter_map(port_and_target).collect()
    };
    for (host, s) in &sorted {
        for ip in s.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
            for (port, _) in ports(s) {
                out.entry(SocketAddr::new(ip, port))
                    .or_insert_with(|| ((*host).clone(), port));
            }
        }
    }
    for (host, s) in &sorted {
        let sidecars = s
            .endpoints
            .iter()
            .filter(|e| e.kind() == pb::endpoint::Kind::Sidecar && e.via.is_empty());
        for ip in sidecars.filter_map(|e| e.address.parse::<IpAddr>().ok()) {
            for (port, target) in ports(s) {
                out.entry(SocketAddr::new(ip, target))
                    .or_insert_with(|| ((*host).clone(), port));
            }
        }
    }
    out
}

/// Why a service resource is unusable, if it is.
fn check_service(s: &pb::Service) -> Vec<String> {
    let mut errors = Vec::new();
    if s.hostname.is_empty() {
        errors.push("hostname is empty".to_string());
    }
    for id in &s.identities {
        if let Err(e) = SpiffeId::parse(id) {
            errors.push(format!("identity {id:?}: {e}"));
        }
    }
    for (i, ep) in s.endpoints.iter().enumerate() {
        if ep.address.is_empty() {
            errors.push(format!("endpoints[{i}].address is empty"));
        }
        if ep.port == 0 || ep.port > u32::from(u16::MAX) {
            errors.push(format!("endpoints[{i}].port {} is not a TCP port", ep.port));
        }
        if !ep.via.is_empty() && host_port(&ep.via).is_none() {
            errors.push(format!("endpoints[{i}].via {:?} is not host:port", ep.via));
        }
        if !ep.identity.is_empty()
            && let Err(e) = SpiffeId::parse(&ep.identity)
        {
            errors.push(format!("endpoints[{i}].identity {:?}: {e}", ep.identity));
        }
    }
    for p in &s.ports {
        if p.port == 0 || p.port > u32::from(u16::MAX) {
            errors.push(format!("port {:?}: {} is not a TCP port", p.name, p.port));
        }
    }
    errors
}

/// `host:port` (`[v6]:port`) with a non-zero port.
fn host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty() && port != 0).then_some((host, port))
}

/// A digest of what verification depends on in `bundles`.
fn trust_version(bundles: &[pb::TrustBundle]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for b in bundles {
        (
            &b.trust_domain,
            &b.roots_pem,
            &b.denied_intermediates,
            b.local,
            b.bind_identities,
            b.cluster_identities
                .iter()
                .map(|(c, s)| (c, &s.names))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
            .hash(&mut h);
    }
    h.finish()
}

/// Why a trust bundle resource is unusable, if it is.
fn check_bundle(b: &pb::TrustBundle) -> Vec<String> {
    let mut errors = Vec::new();
    let td = match TrustDomain::new(&b.trust_domain) {
        Ok(td) => Some(td),
        Err(e) => {
            errors.push(format!("trust domain {:?}: {e}", b.trust_domain));
            None
        }
    };
    if b.roots_pem.is_empty() {
        errors.push("no root certificate".to_string());
    }
    let pem = b.roots_pem.join("\n");
    if let Err(e) = strait_ca::TrustBundle::from_pem(pem.as_bytes(), td) {
        errors.push(format!("roots: {e}"));
    }
    for d in &b.denied_intermediates {
        if fingerprint(d).is_none() {
            errors.push(format!(
                "denied intermediate {d:?} is not a SHA-256 fingerprint (64 hex digits, colons optional)"
            ));
        }
    }
    errors
}

impl MeshConfig {
    /// Builds the view. Returns the per-resource errors (resource name and
    /// why) for a NACK; what is usable is kept (an unusable `MeshSettings`
    /// leaves the defaults).
    pub fn from_resources(
        services: Vec<pb::Service>,
        workloads: Vec<pb::Workload>,
        policies: Vec<pb::Policy>,
        bundles: Vec<pb::TrustBundle>,
        networks: Vec<pb::Network>,
        settings: Vec<pb::MeshSettings>,
        me: &WorkloadRef,
    ) -> (MeshConfig, Vec<(String, String)>) {
        let (policies, mut errors) = Policies::from_resources(&policies, DEFAULT_ROOT_NAMESPACE);
        let mut cfg = MeshConfig {
            policies: Arc::new(policies),
            loaded: true,
            ..MeshConfig::default()
        };
        for s in services {
            let problems = check_service(&s);
            if !problems.is_empty() {
                let name = if s.hostname.is_empty() {
                    "Service/<no hostname>".to_string()
                } else {
                    s.hostname.clone()
                };
                errors.push((name, problems.join("; ")));
                if s.hostname.is_empty() {
                    continue;
                }
            }
            let host = s.hostname.trim_end_matches('.').to_ascii_lowercase();
            if cfg.services.contains_key(&host) {
                errors.push((s.hostname.clone(), "pushed twice".to_string()));
                continue;
            }
            for alias in &s.aliases {
                cfg.names.insert(
                    alias.trim_end_matches('.').to_ascii_lowercase(),
                    host.clone(),
                );
            }
            cfg.names.insert(host.clone(), host.clone());
            cfg.services.insert(host, Arc::new(s));
        }
        cfg.addresses = service_addresses(&cfg.services);
        cfg.me = workloads
            .into_iter()
            .find(|w| w.name == me.name && w.namespace == me.namespace);
        cfg.my_labels = cfg
            .me
            .as_ref()
            .map(|w| w.labels.clone().into_iter().collect())
            .unwrap_or_default();
        for b in &bundles {
            let problems = check_bundle(b);
            if !problems.is_empty() {
                errors.push((b.trust_domain.clone(), problems.join("; ")));
            }
        }
        if bundles.iter().filter(|b| b.local).count() > 1 {
            errors.push((
                "TrustBundle".to_string(),
                "more than one bundle is marked local".to_string(),
            ));
        }
        cfg.bundles = bundles;
        cfg.bundles
            .sort_by(|a, b| (!a.local, &a.trust_domain).cmp(&(!b.local, &b.trust_domain)));
        cfg.trust_version = trust_version(&cfg.bundles);
        cfg.networks = networks.into_iter().map(|n| (n.name.clone(), n)).collect();
        match settings.as_slice() {
            [] => {}
            [one] => match path_normalization(one) {
                Ok(mode) => cfg.path_normalization = mode,
                Err(why) => errors.push(("MeshSettings".to_string(), why.to_string())),
            },
            _ => errors.push((
                "MeshSettings".to_string(),
                format!("{} resources pushed, one expected", settings.len()),
            )),
        }
        (cfg, errors)
    }

    /// The service a request names: `<svc>.<ns>.svc.cluster.local`, the
    /// clusterset name, `<svc>.<ns>`, or `<svc>` in `caller_ns`; a port
    /// suffix is ignored.
    pub fn lookup(&self, host: &str, caller_ns: &str) -> Option<&Arc<pb::Service>> {
        // The usual case, a name exactly as pushed (lower case, no port, no
        // trailing dot), without the copies the general case makes.
        if let Some(canonical) = self.names.get(host) {
            return self.services.get(canonical);
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let bare = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
            _ => host,
        };
        let dots = bare.matches('.').count();
        let candidates = [
            Some(bare.clone()),
            // <svc>.<ns>
            (dots == 1).then(|| format!("{bare}.svc.cluster.local")),
            // <svc>, in the caller's namespace
            (dots == 0).then(|| format!("{bare}.{caller_ns}.svc.cluster.local")),
        ];
        let canonical = candidates
            .iter()
            .flatten()
            .find_map(|name| self.names.get(name))?;
        self.services.get(canonical)
    }

    /// The service a redirected connection to `to` was going to, and its
    /// service port: `to` is one of the service's virtual IPs on a service
    /// port, or the address of one of its sidecar endpoints on a target
    /// port (a pod IP, as a headless service's clients dial).
    pub fn service_at(&self, to: SocketAddr) -> Option<(&Arc<pb::Service>, u16)> {
        let (host, port) = self.addresses.get(&to)?;
        Some((self.services.get(host)?, *port))
    }

    /// The workload port that port `port` of service `host` (its canonical
    /// name) reaches; `None` when the service or the port is not known.
    pub fn target_port(&self, host: &str, port: u16) -> Option<u16> {
        let service = self.services.get(host)?;
        service
            .ports
            .iter()
            .filter_map(port_and_target)
            .find_map(|(p, target)| (p == port).then_some(target))
    }

    /// This workload's locality (`region/zone`), for locality-aware picks.
    pub fn my_locality(&self) -> &str {
        self.me.as_ref().map_or("", |w| w.locality.as_str())
    }

    /// The local trust domain's bundle and the peered ones.
    pub fn trust_bundles(
        &self,
    ) -> (
        Option<strait_ca::TrustBundle>,
        BTreeMap<String, strait_ca::TrustBundle>,
    ) {
        trust_bundles(&self.bundles)
    }

    /// Deny-listed intermediates across bundles, as `strait_ca` fingerprints.
    pub fn denied(&self) -> Vec<String> {
        denied(&self.bundles)
    }
}

pub use strait_proxy_client::trust::{
    apply_trust, cluster_identities, denied, fingerprint, trust_bundles,
};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn svc(host: &str, aliases: &[&str]) -> pb::Service {
        pb::Service {
            hostname: host.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    fn me() -> WorkloadRef {
        WorkloadRef {
            name: "client".into(),
            namespace: "demo".into(),
        }
    }

    fn build(
        services: Vec<pb::Service>,
        bundles: Vec<pb::TrustBundle>,
    ) -> (MeshConfig, Vec<(String, String)>) {
        MeshConfig::from_resources(services, vec![], vec![], bundles, vec![], vec![], &me())
    }

    #[test]
    fn mesh_settings_set_the_path_normalization() {
        use pb::mesh_settings::PathNormalization as W;
        let with = |settings: Vec<pb::MeshSettings>| {
            MeshConfig::from_resources(vec![], vec![], vec![], vec![], vec![], settings, &me())
        };
        let (cfg, errors) = with(vec![]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(cfg.path_normalization, PathNormalization::Base);
        for (wire, want) in [
            (W::Default, PathNormalization::Base),
            (W::None, PathNormalization::None),
            (W::Base, PathNormalization::Base),
            (W::MergeSlashes, PathNormalization::MergeSlashes),
            (
                W::DecodeAndMergeSlashes,
                PathNormalization::DecodeAndMergeSlashes,
            ),
        ] {
            let (cfg, errors) = with(vec![pb::MeshSettings {
                path_normalization: wire as i32,
            }]);
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(cfg.path_normalization, want, "{wire:?}");
        }
        let (cfg, errors) = with(vec![pb::MeshSettings {
            path_normalization: 9,
        }]);
        assert_eq!(cfg.path_normalization, PathNormalization::Base);
        assert_eq!(
            errors,
            [(
                "MeshSettings".to_string(),
                "path_normalization 9 is not a known mode (0 to 4)".to_string()
            )]
        );
        let (_, errors) = with(vec![pb::MeshSettings::default(); 2]);
        assert_eq!(errors[0].1, "2 resources pushed, one expected");
    }

    #[test]
    fn redirected_addresses_find_their_service() {
        let port = |port: u32, target_port: u32| pb::Port {
            name: "tcp".into(),
            port,
            protocol: "tcp".into(),
            target_port,
        };
        let sidecar = |address: &str| pb::Endpoint {
            address: address.into(),
            port: 15006,
            ..Default::default()
        };
        let db = pb::Service {
            hostname: "db.demo.svc.cluster.local".into(),
            ports: vec![port(5432, 0), port(80, 8080)],
            addresses: vec!["10.96.0.10".into(), "fd00::10".into(), "not-an-ip".into()],
            endpoints: vec![
                sidecar("10.1.0.1"),
                sidecar("db-1.example.com"),
                pb::Endpoint {
                    kind: pb::endpoint::Kind::Gateway as i32,
                    ..sidecar("10.2.0.1")
                },
                pb::Endpoint {
                    via: "10.0.0.1:15444".into(),
                    ..sidecar("10.3.0.1")
                },
            ],
            ..svc("db.demo.svc.cluster.local", &[])
        };
        // A headless twin selecting the same pod: the first name keeps it.
        let twin = pb::Service {
            hostname: "db-headless.demo.svc.cluster.local".into(),
            ..db.clone()
        };
        let (cfg, errors) = build(vec![db, twin], vec![]);
        assert!(errors.is_empty(), "{errors:?}");
        let at = |to: &str| {
            cfg.service_at(to.parse().unwrap())
                .map(|(s, port)| (s.hostname.as_str(), port))
        };
        let twin = "db-headless.demo.svc.cluster.local";
        // Virtual IPs on service ports.
        assert_eq!(at("10.96.0.10:5432"), Some((twin, 5432)));
        assert_eq!(at("[fd00::10]:80"), Some((twin, 80)));
        assert_eq!(at("10.96.0.10:8080"), None, "a VIP takes service ports");
        // Sidecar endpoints on target ports.
        assert_eq!(at("10.1.0.1:5432"), Some((twin, 5432)));
        assert_eq!(at("10.1.0.1:8080"), Some((twin, 80)));
        assert_eq!(at("10.1.0.1:80"), None, "a pod serves its target port");
        assert_eq!(at("10.1.0.1:15006"), None);
        // Gateways and QUIC-mode endpoints are not where an app dials.
        assert_eq!(at("10.2.0.1:5432"), None);
        assert_eq!(at("10.3.0.1:5432"), None);
        assert_eq!(at("10.9.9.9:5432"), None);
        // The workload port a service port reaches.
        assert_eq!(cfg.target_port(twin, 80), Some(8080));
        assert_eq!(cfg.target_port(twin, 5432), Some(5432));
        assert_eq!(cfg.target_port(twin, 8080), None);
        assert_eq!(cfg.target_port("nope.demo.svc.cluster.local", 80), None);
    }

    #[test]
    fn lookup_resolves_every_name_form() {
        let (cfg, errors) = build(
            vec![
                svc(
                    "echo.demo.svc.cluster.local",
                    &["echo.demo.svc.clusterset.local", "echo.demo"],
                ),
                // No aliases pushed: the short forms still resolve.
                svc("bare.other.svc.cluster.local", &[]),
            ],
            vec![],
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert!(cfg.loaded);
        for name in [
            "echo.demo.svc.cluster.local",
            "echo.demo.svc.clusterset.local",
            "echo.demo",
            "echo.demo:8080",
            "echo",
            "echo:80",
            "ECHO.demo.",
            "bare.other",
            "bare.other.svc.cluster.local:9000",
        ] {
            assert!(cfg.lookup(name, "demo").is_some(), "{name}");
        }
        assert_eq!(
            cfg.lookup("bare", "other").map(|s| s.hostname.as_str()),
            Some("bare.other.svc.cluster.local")
        );
        for name in [
            "",
            ":80",
            "echo.other",
            "nope.demo",
            "echo.demo.svc",
            "echo:http",
        ] {
            assert!(cfg.lookup(name, "demo").is_none(), "{name}");
        }
        assert!(cfg.lookup("echo", "other").is_none());
    }

    #[test]
    fn bad_services_are_reported_by_name() {
        let ep = |address: &str, port: u32, via: &str, identity: &str| pb::Endpoint {
            address: address.into(),
            port,
            via: via.into(),
            identity: identity.into(),
            ..Default::default()
        };
        let with = |host: &str, identities: &[&str], eps: Vec<pb::Endpoint>| pb::Service {
            hostname: host.into(),
            identities: identities.iter().map(|i| i.to_string()).collect(),
            endpoints: eps,
            ..Default::default()
        };
        let cases: Vec<(pb::Service, &str)> = vec![
            (with("", &[], vec![]), "hostname is empty"),
            (
                with("a.ns.svc.cluster.local", &["not-an-id"], vec![]),
                "identity \"not-an-id\"",
            ),
            (
                with("b.ns.svc.cluster.local", &[], vec![ep("", 15006, "", "")]),
                "endpoints[0].address is empty",
            ),
            (
                with(
                    "c.ns.svc.cluster.local",
                    &[],
                    vec![ep("10.0.0.1", 0, "", "")],
                ),
                "endpoints[0].port 0",
            ),
            (
                with(
                    "d.ns.svc.cluster.local",
                    &[],
                    vec![ep("10.0.0.1", 70000, "", "")],
                ),
                "port 70000",
            ),
            (
                with(
                    "e.ns.svc.cluster.local",
                    &[],
                    vec![ep("10.0.0.1", 1, "gw", "")],
                ),
                "via \"gw\" is not host:port",
            ),
            (
                with(
                    "f.ns.svc.cluster.local",
                    &[],
                    vec![ep("10.0.0.1", 1, ":15443", "")],
                ),
                "via",
            ),
            (
                with(
                    "g.ns.svc.cluster.local",
                    &[],
                    vec![ep("10.0.0.1", 1, "", "spiffe://")],
                ),
                "endpoints[0].identity",
            ),
        ];
        for (service, needle) in cases {
            let host = service.hostname.clone();
            let (_, errors) = build(vec![service], vec![]);
            assert_eq!(errors.len(), 1, "{host}: {errors:?}");
            assert!(errors[0].1.contains(needle), "{host}: {errors:?}");
            if !host.is_empty() {
                assert_eq!(errors[0].0, host);
            }
        }
        // Good via forms, and a duplicate.
        let ok = with(
            "h.ns.svc.cluster.local",
            &["spiffe://cluster.local/ns/ns/sa/h"],
            vec![
                ep("10.0.0.1", 15006, "127.0.0.1:15443", ""),
                ep("::1", 15006, "[::1]:15443", ""),
            ],
        );
        let (cfg, errors) = build(vec![ok.clone()], vec![]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(cfg.services.len(), 1);
        let (_, errors) = build(vec![ok.clone(), ok], vec![]);
        assert_eq!(
            errors,
            vec![(
                "h.ns.svc.cluster.local".to_string(),
                "pushed twice".to_string()
            )]
        );
    }

    #[test]
    fn fingerprints_normalize_to_strait_ca_form() {
        let der = b"certificate";
        let want = strait_ca::cert::fingerprint_sha256(der);
        let plain = strait_ca::tls::sha256_hex(der);
        assert_eq!(fingerprint(&plain).as_deref(), Some(want.as_str()));
        assert_eq!(fingerprint(&want).as_deref(), Some(want.as_str()));
        assert_eq!(
            fingerprint(&want.to_lowercase()).as_deref(),
            Some(want.as_str())
        );
        for bad in [
            "",
            "ab12",
            &"g".repeat(64),
            &"a".repeat(65),
            "é".repeat(32).as_str(),
        ] {
            assert_eq!(fingerprint(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_trust_bundles_are_reported_by_trust_domain() {
        let pki = strait_ca::testing::TestPki::new("cluster.local");
        let root = strait_ca::pemfile::encode("CERTIFICATE", pki.root.root_der());
        let bundle = |td: &str, roots: &[&str], denied: &[&str], local: bool| pb::TrustBundle {
            trust_domain: td.into(),
            roots_pem: roots.iter().map(|r| r.to_string()).collect(),
            denied_intermediates: denied.iter().map(|d| d.to_string()).collect(),
            local,
            ..Default::default()
        };
        let good = bundle("cluster.local", &[&root], &[&"ab".repeat(32)], true);
        let (cfg, errors) = build(vec![], vec![good.clone()]);
        assert!(errors.is_empty(), "{errors:?}");
        let (local, federated) = cfg.trust_bundles();
        assert!(local.is_some());
        assert!(federated.is_empty());
        assert_eq!(cfg.denied(), vec![vec!["AB"; 32].join(":")]);
        for (b, needle) in [
            (bundle("Not A Domain", &[&root], &[], false), "trust domain"),
            (
                bundle("peer.example", &[], &[], false),
                "no root certificate",
            ),
            (
                bundle(
                    "peer.example",
                    &["-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"],
                    &[],
                    false,
                ),
                "roots",
            ),
            (
                bundle("peer.example", &[&root], &["xyz"], false),
                "not a SHA-256 fingerprint",
            ),
        ] {
            let td = b.trust_domain.clone();
            let (_, errors) = build(vec![], vec![good.clone(), b]);
            assert_eq!(errors.len(), 1, "{td}: {errors:?}");
            assert_eq!(errors[0].0, td);
            assert!(errors[0].1.contains(needle), "{td}: {errors:?}");
        }
        let (_, errors) = build(vec![], vec![good.clone(), good]);
        assert!(
            errors.iter().any(|(_, e)| e.contains("more than one")),
            "{errors:?}"
        );
    }
}
