//! What a lab contains, computed without I/O: meshes, clusters, the
//! processes to run (with their command lines and health endpoints), the
//! config each cluster starts with, and `lab.json`.
//!
//! Addresses (loopback mode): brokers live in `127.<base>.0.0/16`
//! (`127.<base>.0.<mesh index + 1>`), cluster `i` in `127.<base + 1 + i>.0.0/16`:
//! `.0.1` its control plane (15012 discovery and CSR, 15021 health, 15090
//! metrics), `.0.2` its east-west gateway (15443 TCP passthrough and UDP
//! QUIC, 15444 egress), `.0.10` and up its workloads (app 8080, sidecar
//! inbound 15006, outbound 15001, health 15021, metrics 15090). Ports are
//! Istio's; every process has its own address, as pods do.
//!
//! Netns mode (see [`super::netns`]): brokers on the WAN bridge at
//! `10.<base>.0.<mesh index + 1>`, cluster `i`'s control plane and gateway
//! at `10.<base>.<i + 1>.1` and `.2` in its namespace; its workloads keep
//! their loopback addresses, private to the namespace.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The lab's topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// Two clusters (east, west), each with its own control plane; one mesh.
    MultiPrimary,
    /// A primary cluster whose control plane also serves a remote cluster.
    PrimaryRemote,
    /// Two meshes with their own trust domains and brokers, peered.
    Federated,
}

/// How sidecars reach other networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// mTLS to the remote gateway, routed by SNI.
    Sni,
    /// Through the local gateway's egress and a pooled QUIC tunnel.
    Quic,
}

pub const CP_PORT: u16 = 15012;
pub const HEALTH_PORT: u16 = 15021;
pub const METRICS_PORT: u16 = 15090;
/// A control plane's debug endpoints (loopback only).
pub const DEBUG_PORT: u16 = 15014;
/// The east-west gateway's port (TCP passthrough, UDP tunnels).
pub const GATEWAY_PORT: u16 = strait_model::mesh::DEFAULT_GATEWAY_PORT;
pub const EGRESS_PORT: u16 = 15444;
pub const BROKER_PORT: u16 = 15011;
pub const PEER_PORT: u16 = 15013;
pub const APP_PORT: u16 = 8080;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
/// The demo namespace.
pub const NAMESPACE: &str = "demo";

#[derive(Debug, Clone, Serialize)]
pub struct Mesh {
    pub mesh: String,
    pub trust_domain: String,
    #[serde(skip)]
    pub ip: String,
    pub address: String,
    #[serde(skip)]
    pub peer_address: String,
    pub admin_creds: PathBuf,
    /// The broker's data directory.
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// The broker's component name (`broker`, or `<mesh>/broker`).
    #[serde(skip)]
    pub component: String,
    /// With `--ha`: the broker's replicas on the lab's etcd (the first is
    /// the one above: `address`, `data_dir` and `component` are its).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Replica>,
}

/// One replica of a mesh's broker (`--ha`).
#[derive(Debug, Clone, Serialize)]
pub struct Replica {
    /// Its replica and component name: `broker-0`, ...
    pub name: String,
    #[serde(skip)]
    pub ip: String,
    pub address: String,
    #[serde(skip)]
    pub data_dir: PathBuf,
}

/// One member of the lab's etcd (`--ha`).
#[derive(Debug, Clone, Serialize)]
pub struct EtcdMember {
    /// Its member and component name: `etcd-0`, ...
    pub name: String,
    #[serde(skip)]
    pub ip: String,
    /// `HOST:PORT` clients use.
    pub client: String,
    #[serde(skip)]
    pub data_dir: PathBuf,
}

/// The etcd members of an HA lab (`lab up --ha`).
pub const HA_ETCD_MEMBERS: u8 = 3;
/// The lease of the lab's broker replicas: short, so that failover shows.
pub const HA_LEASE_TTL: &str = "3s";

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub service_account: String,
    /// The sidecar's mTLS listener.
    pub inbound: String,
    pub metrics: String,
    #[serde(skip)]
    pub ip: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayInfo {
    pub tcp: String,
    pub udp: String,
    pub metrics: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub name: String,
    pub mesh: String,
    pub trust_domain: String,
    pub network: String,
    pub locality: String,
    pub role: &'static str,
    pub config_dir: PathBuf,
    pub control_plane: Option<String>,
    pub gateway: GatewayInfo,
    pub client_proxy: String,
    pub workloads: Vec<Workload>,
    /// The network namespace the cluster runs in (netns mode).
    pub netns: Option<String>,
    /// Kubernetes mode: the admin kubeconfig of the cluster's apiserver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// The control plane's and gateway's addresses.
    #[serde(skip)]
    pub cp_host: String,
    #[serde(skip)]
    pub gw_host: String,
    /// The cluster's directory (state, tokens, identities).
    #[serde(skip)]
    pub dir: PathBuf,
    #[serde(skip)]
    pub block: u8,
}

/// A whole lab, as `lab.json` describes it.
#[derive(Debug, Clone, Serialize)]
pub struct Lab {
    pub topology: Topology,
    pub dir: PathBuf,
    pub mode: Mode,
    /// Each cluster in its own network namespace.
    pub netns: bool,
    pub brokers: Vec<Mesh>,
    pub clusters: Vec<Cluster>,
    /// The certificate lifetime sidecars and gateways ask for (`None`:
    /// theirs, 24 h).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_ttl: Option<String>,
    /// The brokers bind identities to clusters
    /// (`--bind-identities-to-clusters`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bind_identities: bool,
    /// Each cluster with its own kube-apiserver (`--kube`), the control
    /// planes in Kubernetes mode against them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub kube: bool,
    /// `--ha`: the etcd members the brokers keep their state in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<EtcdMember>,
    #[serde(skip)]
    base: u8,
}

/// One process of the lab.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// e.g. `broker`, `east/controlplane`, `east/echo-v1/sidecar`.
    pub name: String,
    /// Arguments to the `strait` binary.
    pub args: Vec<String>,
    /// `http://…/healthz/ready`
    pub health: String,
    /// The network namespace it runs in (netns mode).
    pub netns: Option<String>,
    /// Environment variables it is started with (`KUBECONFIG`).
    pub env: Vec<(String, String)>,
    /// With an `https://` health URL: the CA its certificate chains to.
    pub health_ca: Option<PathBuf>,
}

/// name, mesh index, network, locality, role
type ClusterSpec = (
    &'static str,
    usize,
    &'static str,
    &'static str,
    &'static str,
);

fn ip(block: u8, host: u8) -> String {
    format!("127.{block}.0.{host}")
}

impl Lab {
    /// The lab for `topology` in `dir`, with address blocks from `base`.
    pub fn new(
        topology: Topology,
        dir: &Path,
        mode: Mode,
        base: u8,
        netns: bool,
    ) -> Result<Lab, String> {
        if base == 0 || base > 250 {
            return Err(format!("--ip-base {base} must be in 1..=250"));
        }
        let wan = |i: usize, host: u8| format!("10.{base}.{i}.{host}");
        let mesh = |i: u8, name: &str, td: &str, component: &str| {
            let ip = if netns {
                wan(0, i + 1)
            } else {
                ip(base, i + 1)
            };
            Mesh {
                mesh: name.to_string(),
                trust_domain: td.to_string(),
                address: format!("{ip}:{BROKER_PORT}"),
                peer_address: format!("{ip}:{PEER_PORT}"),
                admin_creds: dir.join(name).join("broker").join("admin"),
                data_dir: dir.join(name).join("broker"),
                component: component.to_string(),
                replicas: Vec::new(),
                ip,
            }
        };
        let (brokers, specs): (Vec<Mesh>, Vec<ClusterSpec>) = match topology {
            Topology::MultiPrimary => (
                vec![mesh(0, "mesh", "cluster.local", "broker")],
                vec![
                    ("east", 0, "net-east", "region-a/zone-1", "primary"),
                    ("west", 0, "net-west", "region-b/zone-1", "primary"),
                ],
            ),
            Topology::PrimaryRemote => (
                vec![mesh(0, "mesh", "cluster.local", "broker")],
                vec![
                    ("primary", 0, "net-primary", "region-a/zone-1", "primary"),
                    ("remote", 0, "net-remote", "region-b/zone-1", "remote"),
                ],
            ),
            Topology::Federated => (
                vec![
                    mesh(0, "mesh-a", "mesh-a.local", "mesh-a/broker"),
                    mesh(1, "mesh-b", "mesh-b.local", "mesh-b/broker"),
                ],
                vec![
                    ("east", 0, "net-east", "region-a/zone-1", "primary"),
                    ("west", 1, "net-west", "region-b/zone-1", "primary"),
                ],
            ),
        };
        let mut clusters = Vec::new();
        for (i, (name, m, network, locality, role)) in specs.into_iter().enumerate() {
            let block = base
                .checked_add(1 + u8::try_from(i).map_err(|_| "too many clusters")?)
                .ok_or_else(|| format!("--ip-base {base} leaves no block for cluster {name}"))?;
            let version = if i == 0 { "v1" } else { "v2" };
            let w = |host: u8, name: String, service: &str, version: &str, sa: &str| {
                let ip = ip(block, host);
                Workload {
                    name,
                    namespace: NAMESPACE.into(),
                    service: service.into(),
                    version: version.into(),
                    service_account: sa.into(),
                    inbound: format!("{ip}:{INBOUND_PORT}"),
                    metrics: format!("http://{ip}:{METRICS_PORT}/stats/prometheus"),
                    ip,
                }
            };
            let workloads = vec![
                w(10, format!("echo-{version}"), "echo", version, "echo"),
                w(11, "private".into(), "private", "v1", "private"),
                w(12, "client".into(), "client", "v1", "client"),
            ];
            let client_ip = ip(block, 12);
            let (cp_ip, gw_ip) = if netns {
                (wan(i + 1, 1), wan(i + 1, 2))
            } else {
                (ip(block, 1), ip(block, 2))
            };
            let dir = dir.join(name);
            clusters.push(Cluster {
                name: name.into(),
                mesh: brokers[m].mesh.clone(),
                trust_domain: brokers[m].trust_domain.clone(),
                network: network.into(),
                locality: locality.into(),
                role,
                config_dir: dir.join("config"),
                control_plane: (role == "primary").then(|| format!("{cp_ip}:{CP_PORT}")),
                gateway: GatewayInfo {
                    tcp: format!("{gw_ip}:{GATEWAY_PORT}"),
                    udp: format!("{gw_ip}:{GATEWAY_PORT}"),
                    metrics: format!("http://{gw_ip}:{METRICS_PORT}/metrics"),
                },
                client_proxy: format!("http://{client_ip}:{OUTBOUND_PORT}"),
                workloads,
                netns: netns.then(|| format!("strait{base}-{name}")),
                kubeconfig: None,
                cp_host: cp_ip,
                gw_host: gw_ip,
                dir,
                block,
            });
        }
        Ok(Lab {
            topology,
            dir: dir.to_path_buf(),
            mode,
            netns,
            brokers,
            clusters,
            cert_ttl: None,
            bind_identities: false,
            kube: false,
            etcd: Vec::new(),
            base,
        })
    }

    /// `--ha`: three etcd members in the brokers' block
    /// (`127.<base>.0.20`-`.22`) and `replicas` broker replicas of the
    /// mesh on them (`127.<base>.0.10` and up), instead of one broker with
    /// an embedded store. One mesh only, on loopback.
    pub fn with_ha(mut self, replicas: usize) -> Result<Self, String> {
        if replicas == 0 {
            return Ok(self);
        }
        if !(2..=3).contains(&replicas) {
            return Err(format!(
                "--ha {replicas}: a lab runs 2 or 3 broker replicas"
            ));
        }
        if self.brokers.len() != 1 {
            return Err("--ha: one mesh only (not --topology federated)".into());
        }
        if self.netns || self.kube {
            return Err("--ha runs on loopback: not with --netns or --kube".into());
        }
        let base = self.base;
        let dir = self.dir.clone();
        self.etcd = (0..HA_ETCD_MEMBERS)
            .map(|j| {
                let ip = ip(base, 20 + j);
                EtcdMember {
                    name: format!("etcd-{j}"),
                    client: format!("{ip}:2379"),
                    data_dir: dir.join(format!("etcd-{j}")),
                    ip,
                }
            })
            .collect();
        let m = &mut self.brokers[0];
        m.replicas = (0..replicas)
            .map(|i| {
                let ip = ip(base, 10 + i as u8);
                Replica {
                    name: format!("broker-{i}"),
                    address: format!("{ip}:{BROKER_PORT}"),
                    data_dir: dir.join(&m.mesh).join(format!("broker-{i}")),
                    ip,
                }
            })
            .collect();
        let first = m.replicas[0].clone();
        m.ip = first.ip;
        m.address = first.address;
        m.admin_creds = first.data_dir.join("admin");
        m.data_dir = first.data_dir;
        m.component = first.name;
        Ok(self)
    }

    /// The lab with its brokers binding identities to clusters.
    /// Kubernetes mode (`--kube`): each cluster's config lives in its own
    /// kube-apiserver; `lab.json` names each cluster's `kubeconfig`.
    pub fn with_kube(mut self, on: bool) -> Self {
        self.kube = on;
        for c in &mut self.clusters {
            c.kubeconfig = on.then(|| super::kube::kubeconfig_of(c));
        }
        self
    }

    pub fn with_bind_identities(mut self, on: bool) -> Self {
        self.bind_identities = on;
        self
    }

    /// The lab with sidecars and gateways asking for certificates of
    /// `ttl` (e.g. `10s`).
    pub fn with_cert_ttl(mut self, ttl: Option<String>) -> Self {
        self.cert_ttl = ttl;
        self
    }

    /// The first address block (`--ip-base`).
    pub fn base(&self) -> u8 {
        self.base
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub fn mesh_of(&self, c: &Cluster) -> &Mesh {
        self.brokers
            .iter()
            .find(|m| m.mesh == c.mesh)
            .unwrap_or(&self.brokers[0])
    }

    /// `lab.json`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        // straitctl --lab reads `broker` (the first mesh's).
        if let Some(first) = self.brokers.first() {
            v["broker"] = serde_json::json!({
                "address": first.address,
                "admin_creds": first.admin_creds,
            });
            if !first.replicas.is_empty() {
                v["broker"]["addresses"] = first
                    .replicas
                    .iter()
                    .map(|r| r.address.clone())
                    .collect::<Vec<_>>()
                    .into();
            }
        }
        v
    }
}

impl Cluster {
    pub fn cp_ip(&self) -> String {
        self.cp_host.clone()
    }

    pub fn gw_ip(&self) -> String {
        self.gw_host.clone()
    }

    /// The primary cluster whose control plane serves this (remote)
    /// cluster.
    pub fn primary<'a>(&self, lab: &'a Lab) -> Option<&'a Cluster> {
        lab.clusters
            .iter()
            .find(|c| c.role == "primary" && c.mesh == self.mesh)
    }

    /// The control plane this cluster's proxies use: its own, or for a
    /// remote cluster the primary's, exposed by the primary's gateway.
    pub fn cp_address(&self, lab: &Lab) -> Option<String> {
        self.control_plane.clone().or_else(|| {
            self.primary(lab)
                .map(|p| format!("{}:{CP_PORT}", p.gw_ip()))
        })
    }

    /// The directory of the control plane state this cluster's proxies
    /// and gateway get their tokens and identity from (a remote cluster
    /// uses its primary's).
    pub fn state_dir(&self, lab: &Lab) -> PathBuf {
        match (self.role, self.primary(lab)) {
            ("remote", Some(p)) => p.dir.join("state"),
            _ => self.dir.join("state"),
        }
    }

    /// A remote cluster's own network and gateway, as its primary's
    /// control plane discovers them (Istio's `topology.istio.io/network`
    /// label on the system namespace and on the gateway Service).
    pub fn network_yaml(&self) -> String {
        self.network_objects(&format!("externalIPs: [{}]", self.gw_ip()))
    }

    /// [`Cluster::network_yaml`] with `gateway_spec` (one line of the
    /// gateway Service's spec) saying where the gateway is.
    pub fn network_objects(&self, gateway_spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: strait-system\n  labels: {{topology.istio.io/network: {net}}}\n---\n\
apiVersion: v1\nkind: Service\nmetadata:\n  name: eastwest-gateway\n  namespace: strait-system\n  labels: {{topology.istio.io/network: {net}}}\n\
spec:\n  {gateway_spec}\n  ports:\n  - {{name: tls, port: {GATEWAY_PORT}}}\n",
            net = self.network,
        )
    }

    /// The cluster's starting config: namespace `demo` with `echo`
    /// (exported), `private` (not exported) and `client`, as
    /// Kubernetes-style YAML.
    /// `export_to`: other meshes (`mesh:<name>`) echo is exported to
    /// besides its own mesh.
    pub fn config_yaml(&self, export_to: &[String]) -> String {
        let export_to = if export_to.is_empty() {
            String::new()
        } else {
            format!(
                "    strait.io/export-to: \"mesh:{},{}\"\n",
                self.mesh,
                export_to.join(",")
            )
        };
        let mut out = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n---\n\
apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: {NAMESPACE}\n  labels: {{app: echo}}\n  annotations:\n    strait.io/export: \"true\"\n{export_to}\
spec:\n  selector: {{app: echo}}\n  ports:\n  - {{name: http, port: {APP_PORT}}}\n---\n\
apiVersion: v1\nkind: Service\nmetadata:\n  name: private\n  namespace: {NAMESPACE}\n\
spec:\n  selector: {{app: private}}\n  ports:\n  - {{name: http, port: {APP_PORT}}}\n"
        );
        for w in &self.workloads {
            out.push_str(&format!(
                "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {}\n  namespace: {}\n\
spec:\n  address: {}\n  labels: {{app: {}, version: {}}}\n  serviceAccount: {}\n  locality: {}\n  network: {}\n  ports: {{http: {APP_PORT}}}\n",
                w.name, w.namespace, w.ip, w.service, w.version, w.service_account, self.locality, self.network
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn multi_primary_has_east_first_and_distinct_blocks() {
        let lab = Lab::new(
            Topology::MultiPrimary,
            Path::new("/l"),
            Mode::Sni,
            10,
            false,
        )
        .unwrap();
        let names: Vec<&str> = lab.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["east", "west"]);
        assert_eq!(
            lab.clusters[0].control_plane.as_deref(),
            Some("127.11.0.1:15012")
        );
        assert_eq!(lab.clusters[1].gateway.tcp, "127.12.0.2:15443");
        assert_eq!(lab.clusters[0].workloads[0].version, "v1");
        assert_eq!(lab.clusters[1].workloads[0].version, "v2");
        let j = lab.to_json();
        assert_eq!(j["topology"], "multi-primary");
        assert_eq!(j["broker"]["address"], "127.10.0.1:15011");
        assert_eq!(
            j["clusters"][0]["workloads"][0]["inbound"],
            "127.11.0.10:15006"
        );
        assert_eq!(j["clusters"][1]["client_proxy"], "http://127.12.0.12:15001");
    }

    #[test]
    fn federated_has_two_meshes_and_remote_uses_the_primary() {
        let lab = Lab::new(Topology::Federated, Path::new("/l"), Mode::Quic, 10, false).unwrap();
        assert_eq!(lab.brokers.len(), 2);
        assert_ne!(lab.brokers[0].trust_domain, lab.brokers[1].trust_domain);
        assert_eq!(lab.clusters[1].trust_domain, "mesh-b.local");
        let pr = Lab::new(
            Topology::PrimaryRemote,
            Path::new("/l"),
            Mode::Sni,
            10,
            false,
        )
        .unwrap();
        assert_eq!(pr.clusters[1].control_plane, None);
        assert_eq!(
            pr.clusters[1].cp_address(&pr).as_deref(),
            Some("127.11.0.2:15012"),
            "through the primary's gateway"
        );
        assert_eq!(pr.clusters[1].state_dir(&pr), Path::new("/l/primary/state"));
        assert!(
            pr.clusters[1]
                .network_yaml()
                .contains("externalIPs: [127.12.0.2]")
        );
    }

    #[test]
    fn netns_mode_puts_control_planes_and_gateways_on_the_wan() {
        let lab = Lab::new(Topology::MultiPrimary, Path::new("/l"), Mode::Sni, 10, true).unwrap();
        assert_eq!(lab.brokers[0].address, "10.10.0.1:15011");
        let west = &lab.clusters[1];
        assert_eq!(west.netns.as_deref(), Some("strait10-west"));
        assert_eq!(west.control_plane.as_deref(), Some("10.10.2.1:15012"));
        assert_eq!(west.gateway.tcp, "10.10.2.2:15443");
        // Workloads stay on the namespace's loopback.
        assert_eq!(west.workloads[0].inbound, "127.12.0.10:15006");
        assert_eq!(lab.to_json()["netns"], true);
    }

    #[test]
    fn bad_bases_are_refused() {
        assert!(Lab::new(Topology::MultiPrimary, Path::new("/l"), Mode::Sni, 0, false).is_err());
        assert!(
            Lab::new(
                Topology::MultiPrimary,
                Path::new("/l"),
                Mode::Sni,
                254,
                false
            )
            .is_err()
        );
    }

    #[test]
    fn config_is_valid_yaml_with_exported_echo() {
        let lab = Lab::new(
            Topology::MultiPrimary,
            Path::new("/l"),
            Mode::Sni,
            10,
            false,
        )
        .unwrap();
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&lab.clusters[1].config_yaml(&[])).unwrap();
        assert_eq!(docs.len(), 6);
        let exports = strait_model::local::local_exports(&docs);
        assert!(exports.errors.is_empty(), "{:?}", exports.errors);
        assert_eq!(exports.exports.len(), 1);
        assert_eq!(exports.exports[0].endpoint_labels["version"], "v2");
        // Federated: exported to its own mesh and the other one.
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&lab.clusters[0].config_yaml(&["mesh:other".into()]))
                .unwrap();
        let exports = strait_model::local::local_exports(&docs);
        assert!(exports.errors.is_empty(), "{:?}", exports.errors);
        assert!(!exports.exports[0].export_to.is_whole_mesh());
    }
}
