//! Primary-remote: one control plane serving its own cluster and remote
//! clusters that have none (`--remote NAME=CONFIG_DIR`).
//!
//! As in Istio's primary-remote model, the primary holds the mesh policy
//! (VirtualService, DestinationRule, PeerAuthentication,
//! AuthorizationPolicy, Sidecar, ServiceEntry and the broker's imports);
//! a remote contributes its workloads: its `Service`, `WorkloadEntry`,
//! `Namespace` and `ServiceExport` objects. Each cluster the control
//! plane serves gets its own view ([`view`]) and so its own discovery
//! snapshot: its workloads are local (sidecar to sidecar), the other
//! clusters' exported services are reached the way the broker's imports
//! reach them (the same [`strait_model::imports::import_objects`] rules:
//! through the other cluster's gateway when it is on another network,
//! straight to the endpoints on the same network).
//!
//! A remote's network and gateways are found the way Istio finds them:
//! the label `topology.istio.io/network` on its `strait-system` Namespace
//! (default: the primary's network), and its gateway Services, those
//! labelled with that network, with a port 15443 and addresses in
//! `spec.externalIPs` or `status.loadBalancer.ingress`.
//!
//! Only the primary's own exports go to the broker; the broker's imports
//! are shared with the remotes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use strait_ca::{ClusterName, TrustDomain};
use strait_model::imports::vips::VipRange;
use strait_model::mesh::{
    ClusterInfo, GatewayAddress, Locality, ModelError, Network, RemoteService,
};

use crate::link::is_managed;
use crate::source::{Config, Object, ObjectKey, check};

/// Istio's label naming a cluster's (namespace's, gateway's) network.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// The namespace whose network label is the cluster's network.
pub const SYSTEM_NAMESPACE: &str = "strait-system";
/// The gateway port of a network gateway Service.
pub const GATEWAY_PORT: u16 = strait_model::mesh::DEFAULT_GATEWAY_PORT;
/// The kinds a remote cluster contributes; everything else comes from the
/// primary.
pub const REMOTE_KINDS: [&str; 4] = ["Service", "WorkloadEntry", "Namespace", "ServiceExport"];

/// `--remote NAME=CONFIG_DIR` (Kubernetes mode: `NAME=KUBECONFIG`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSpec {
    pub name: ClusterName,
    /// Its config directory (Kubernetes mode: its kubeconfig file).
    pub config_dir: PathBuf,
}

impl std::str::FromStr for RemoteSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, dir) = s
            .split_once('=')
            .ok_or_else(|| format!("--remote {s:?}: expected NAME=CONFIG_DIR"))?;
        if dir.is_empty() {
            return Err(format!("--remote {s:?}: the config directory is empty"));
        }
        let name = ClusterName::new(name).map_err(|e| format!("--remote {s:?}: {e}"))?;
        Ok(RemoteSpec {
            name,
            config_dir: PathBuf::from(dir),
        })
    }
}

/// A served cluster: who it is, and its config (the primary's whole
/// config; a remote's own objects).
#[derive(Debug, Clone)]
pub struct Member {
    pub info: ClusterInfo,
    pub config: Arc<Config>,
}

fn label<'a>(doc: &'a Value, name: &str) -> Option<&'a str> {
    doc["metadata"]["labels"][name].as_str()
}

/// Why a remote cluster's network or gateways could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote {cluster}: Namespace {SYSTEM_NAMESPACE} label {NETWORK_LABEL}: {source}")]
    Network {
        cluster: ClusterName,
        #[source]
        source: ModelError,
    },
    #[error("remote {cluster}: gateway Service {service}: {address:?}: {source}")]
    Gateway {
        cluster: ClusterName,
        /// The Service's key (`Service <namespace>/<name>`).
        service: String,
        address: String,
        #[source]
        source: ModelError,
    },
}

/// A remote cluster as the mesh sees it, from its config: network from
/// its `strait-system` Namespace (default `default_network`), gateways
/// from its network gateway Services; locality unset (its workloads name
/// theirs).
pub fn remote_info(
    name: &ClusterName,
    trust_domain: &TrustDomain,
    default_network: &Network,
    config: &Config,
) -> Result<ClusterInfo, RemoteError> {
    let ns_key = ObjectKey {
        kind: "Namespace".into(),
        namespace: String::new(),
        name: SYSTEM_NAMESPACE.into(),
    };
    let network = match config
        .objects
        .get(&ns_key)
        .and_then(|o| label(&o.value, NETWORK_LABEL))
    {
        Some(n) => Network::new(n).map_err(|source| RemoteError::Network {
            cluster: name.clone(),
            source,
        })?,
        None => default_network.clone(),
    };
    let mut gateways = Vec::new();
    for (key, o) in &config.objects {
        if key.kind != "Service" || label(&o.value, NETWORK_LABEL) != Some(network.as_str()) {
            continue;
        }
        let doc = &o.value;
        let has_port = doc["spec"]["ports"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["port"].as_u64() == Some(GATEWAY_PORT.into()))
        });
        if !has_port {
            continue;
        }
        let external = doc["spec"]["externalIPs"].as_array().into_iter().flatten();
        let ingress = doc["status"]["loadBalancer"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                if i["ip"].is_string() {
                    &i["ip"]
                } else {
                    &i["hostname"]
                }
            });
        for host in external.chain(ingress).filter_map(Value::as_str) {
            let addr = format!("{host}:{GATEWAY_PORT}");
            let gw = GatewayAddress::parse(&addr).map_err(|source| RemoteError::Gateway {
                cluster: name.clone(),
                service: key.to_string(),
                address: addr.clone(),
                source,
            })?;
            if !gateways.contains(&gw) {
                gateways.push(gw);
            }
        }
    }
    Ok(ClusterInfo {
        name: name.clone(),
        network,
        locality: None::<Locality>,
        gateways,
        trust_domain: trust_domain.clone(),
    })
}

/// The cluster's own objects of a member's config (not imports, which
/// carry strait's managed-by label).
fn own_docs(m: &Member) -> Vec<Value> {
    crate::link::own_docs(None, &m.config)
}

fn insert_absent(out: &mut Config, key: ObjectKey, object: Object) {
    out.objects.entry(key).or_insert(object);
}

/// The config of member `index` as its proxies see it. Member 0 is the
/// primary. What the members import from each other gets ClusterSet IPs
/// from `clusterset_ips`, never one the view already holds (the primary's
/// imports from the broker). Returns the view and a warning for each
/// object left out.
pub fn view(
    members: &[Member],
    index: usize,
    clusterset_ips: Option<&VipRange>,
) -> (Config, Vec<String>) {
    let mut warnings = Vec::new();
    let Some(me) = members.get(index) else {
        return (Config::default(), warnings);
    };
    let mut out = Config::default();
    if index == 0 {
        out = (*me.config).clone();
    } else {
        for (key, o) in &me.config.objects {
            if REMOTE_KINDS.contains(&key.kind.as_str()) && !is_managed(&o.value) {
                insert_absent(&mut out, key.clone(), o.clone());
            }
        }
        if let Some(primary) = members.first() {
            for (key, o) in &primary.config.objects {
                if !REMOTE_KINDS.contains(&key.kind.as_str()) || is_managed(&o.value) {
                    insert_absent(&mut out, key.clone(), o.clone());
                }
            }
        }
    }

    // The other served clusters' exports, imported as the broker's are.
    let mut remotes = Vec::new();
    for (i, other) in members.iter().enumerate() {
        if i == index {
            continue;
        }
        let found = strait_model::local::local_exports(&own_docs(other));
        remotes.extend(found.exports.into_iter().map(|service| RemoteService {
            from: other.info.clone(),
            service,
        }));
    }
    let mine = Member {
        info: me.info.clone(),
        config: Arc::new(out.clone()),
    };
    let locals = strait_model::local::local_services(&own_docs(&mine));
    let mut objects = strait_model::imports::import_objects(&me.info, &remotes, &locals);
    if let Some(range) = clusterset_ips {
        objects.assign_clusterset_ips(range, &crate::link::clusterset_ips_held(&out));
    }
    warnings.extend(objects.warnings.iter().map(ToString::to_string));
    let desired = match crate::kube::apply::desired(&objects) {
        Ok(d) => d,
        Err(e) => {
            warnings.push(e.to_string());
            Vec::new()
        }
    };
    let file = PathBuf::from(format!("served://{}/imports", me.info.name));
    for d in desired {
        match check(&d.body) {
            Ok(key) => insert_absent(
                &mut out,
                key,
                Object {
                    file: file.clone(),
                    value: d.body,
                },
            ),
            Err((key, why)) => warnings.push(format!(
                "{}: {why}",
                key.map_or_else(|| d.name.clone(), |k| k.to_string())
            )),
        }
    }
    (out, warnings)
}

/// The other served clusters' networks and gateways, as seen from member
/// `index` (networks of its own name left out).
pub fn sibling_networks(members: &[Member], index: usize) -> BTreeMap<String, Vec<String>> {
    let own = members.get(index).map(|m| m.info.network.to_string());
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, m) in members.iter().enumerate() {
        let net = m.info.network.to_string();
        if i == index || Some(&net) == own.as_ref() {
            continue;
        }
        let gws = out.entry(net).or_default();
        for g in &m.info.gateways {
            let g = g.to_string();
            if !gws.contains(&g) {
                gws.push(g);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::source::parse_file;

    fn config(files: &[(&str, &str)]) -> Config {
        let read = files
            .iter()
            .map(|(f, text)| (Path::new(f).to_path_buf(), parse_file(text)))
            .collect::<BTreeMap<_, _>>();
        let c = Config::default().apply(&read);
        assert!(c.rejections.is_empty(), "{:?}", c.rejections);
        c
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    const ECHO: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\n  annotations: {strait.io/export: \"true\"}\nspec:\n  selector: {app: echo}\n  ports:\n  - {name: http, port: 8080}\n";

    fn workload(name: &str, address: &str, version: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: demo\n\
spec:\n  address: {address}\n  labels: {{app: echo, version: {version}}}\n  serviceAccount: echo\n"
        )
    }

    const REMOTE_NET: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: strait-system\n  labels: {topology.istio.io/network: net-remote}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: eastwest-gateway\n  namespace: strait-system\n  labels: {topology.istio.io/network: net-remote}\nspec:\n  externalIPs: [127.12.0.3]\n  ports:\n  - {name: tls, port: 15443}\nstatus:\n  loadBalancer:\n    ingress: [{hostname: gw.remote.example}]\n";

    fn remote_name() -> ClusterName {
        ClusterName::new("remote").unwrap()
    }

    #[test]
    fn remote_specs() {
        let ok: RemoteSpec = "remote=/etc/remote".parse().unwrap();
        assert_eq!(ok.name.as_str(), "remote");
        assert_eq!(ok.config_dir, PathBuf::from("/etc/remote"));
        for bad in ["remote", "remote=", "=/dir", "Bad_Name=/dir"] {
            let e = bad.parse::<RemoteSpec>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_remotes_network_and_gateways_come_from_its_config() {
        let primary_net = Network::new("net-primary").unwrap();
        let c = config(&[("gw.yaml", REMOTE_NET)]);
        let info = remote_info(&remote_name(), &td(), &primary_net, &c).unwrap();
        assert_eq!(info.network.as_str(), "net-remote");
        let gws: Vec<String> = info.gateways.iter().map(ToString::to_string).collect();
        assert_eq!(gws, ["127.12.0.3:15443", "gw.remote.example:15443"]);

        // No network label: the primary's network, no gateways needed.
        let plain = remote_info(&remote_name(), &td(), &primary_net, &config(&[])).unwrap();
        assert_eq!(plain.network, primary_net);
        assert!(plain.gateways.is_empty());

        // A bad label is named: at the config boundary, which refuses the
        // Namespace, and here (for a config that did not pass it).
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: strait-system\n  labels: {topology.istio.io/network: \"-bad\"}\n";
        let read = BTreeMap::from([(Path::new("ns.yaml").to_path_buf(), parse_file(ns))]);
        let refused = Config::default().apply(&read);
        assert!(
            refused.rejections[0]
                .to_string()
                .contains("metadata.labels[topology.istio.io/network]: Invalid value: \"-bad\""),
            "{:?}",
            refused.rejections
        );
        let doc = parse_file(ns).unwrap().remove(0);
        let key = crate::source::check(&doc).unwrap_err().0.unwrap();
        let bad = Config {
            objects: BTreeMap::from([(
                key,
                Object {
                    file: "ns.yaml".into(),
                    value: doc,
                },
            )]),
            rejections: Vec::new(),
        };
        let e = remote_info(&remote_name(), &td(), &primary_net, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("topology.istio.io/network"), "{e}");
    }

    fn members() -> Vec<Member> {
        let policy = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: echo\n  namespace: demo\nspec:\n  host: echo\n";
        let primary = config(&[
            (
                "echo.yaml",
                &format!("{ECHO}---\n{}", workload("echo-v1", "127.11.0.5", "v1")),
            ),
            ("dr.yaml", policy),
        ]);
        let remote = config(&[
            (
                "echo.yaml",
                &format!("{ECHO}---\n{}", workload("echo-v2", "127.12.0.5", "v2")),
            ),
            ("gw.yaml", REMOTE_NET),
            // Policy in a remote is not read (the primary holds it).
            (
                "dr.yaml",
                &policy.replace("name: echo\n  namespace", "name: ignored\n  namespace"),
            ),
        ]);
        let primary_info = ClusterInfo {
            name: ClusterName::new("primary").unwrap(),
            network: Network::new("net-primary").unwrap(),
            locality: None,
            gateways: vec![GatewayAddress::parse("127.11.0.3:15443").unwrap()],
            trust_domain: td(),
        };
        let remote_info =
            remote_info(&remote_name(), &td(), &primary_info.network, &remote).unwrap();
        vec![
            Member {
                info: primary_info,
                config: Arc::new(primary),
            },
            Member {
                info: remote_info,
                config: Arc::new(remote),
            },
        ]
    }

    #[test]
    fn imports_between_served_clusters_get_clusterset_ips_the_view_does_not_hold() {
        // The primary already holds a broker import with 10.10.0.1; a /30
        // has two addresses, so echo (imported between the members) gets
        // the other one, in both views.
        let held = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: strait-other\n  namespace: demo\n  labels: {app.kubernetes.io/managed-by: strait}\nspec:\n  hosts: [other.demo.svc.clusterset.local]\n  addresses: [\"10.10.0.1\"]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n";
        let mut m = members();
        let mut primary = (*m[0].config).clone();
        primary
            .objects
            .extend(config(&[("held.yaml", held)]).objects);
        m[0].config = Arc::new(primary);
        let range: VipRange = "10.10.0.0/30".parse().unwrap();
        for index in [0, 1] {
            let (v, warnings) = view(&m, index, Some(&range));
            assert!(warnings.is_empty(), "{index}: {warnings:?}");
            let held = crate::link::clusterset_ips_held(&v);
            let ip = |host: &str| held.get(host).map(ToString::to_string);
            assert_eq!(
                ip("other.demo.svc.clusterset.local").as_deref(),
                Some("10.10.0.1")
            );
            assert_eq!(
                ip("echo.demo.svc.clusterset.local").as_deref(),
                Some("10.10.0.2"),
                "{index}: {held:?}"
            );
        }
        // Without a range, none.
        let (v, _) = view(&m, 1, None);
        assert!(
            !crate::link::clusterset_ips_held(&v).contains_key("echo.demo.svc.clusterset.local")
        );
    }

    fn entries(c: &Config) -> Vec<(String, String, String)> {
        c.objects
            .iter()
            .filter(|(k, _)| k.kind == "WorkloadEntry")
            .map(|(_, o)| {
                let s = &o.value["spec"];
                (
                    s["address"].as_str().unwrap_or_default().to_string(),
                    s["network"].as_str().unwrap_or_default().to_string(),
                    s["labels"]["version"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn each_cluster_sees_its_workloads_locally_and_the_others_through_their_gateways() {
        let m = members();
        let (primary, warnings) = view(&m, 0, None);
        assert!(warnings.is_empty(), "{warnings:?}");
        let mut seen = entries(&primary);
        seen.sort();
        assert_eq!(
            seen,
            [
                ("127.11.0.5".into(), String::new(), "v1".into()),
                ("127.12.0.3".into(), "net-remote".into(), "v2".into()),
            ]
        );

        let (remote, warnings) = view(&m, 1, None);
        assert!(warnings.is_empty(), "{warnings:?}");
        let mut seen = entries(&remote);
        seen.sort();
        assert_eq!(
            seen,
            [
                ("127.11.0.3".into(), "net-primary".into(), "v1".into()),
                ("127.12.0.5".into(), String::new(), "v2".into()),
            ]
        );
        // The primary's policy applies in the remote; the remote's own
        // policy objects are not read.
        let policies: Vec<String> = remote
            .objects
            .keys()
            .filter(|k| k.kind == "DestinationRule")
            .map(|k| k.name.clone())
            .collect();
        assert_eq!(policies, ["echo"]);
        // The remote's gateway Service is its own, not the primary's.
        assert!(remote.objects.keys().any(|k| k.name == "eastwest-gateway"));
        assert!(!primary.objects.keys().any(|k| k.name == "eastwest-gateway"));
    }

    #[test]
    fn sibling_networks_name_the_other_clusters_gateways() {
        let m = members();
        let from_primary = sibling_networks(&m, 0);
        assert_eq!(
            from_primary,
            BTreeMap::from([(
                "net-remote".to_string(),
                vec![
                    "127.12.0.3:15443".to_string(),
                    "gw.remote.example:15443".to_string()
                ]
            )])
        );
        let from_remote = sibling_networks(&m, 1);
        assert_eq!(
            from_remote,
            BTreeMap::from([(
                "net-primary".to_string(),
                vec!["127.11.0.3:15443".to_string()]
            )])
        );
    }
}
