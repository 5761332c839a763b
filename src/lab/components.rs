//! The processes of a lab: for each component (broker, control plane,
//! gateway, workload, sidecar) the command line this binary is started
//! with, and the health endpoint that says it is ready.

use std::path::PathBuf;

use super::plan::{self, Cluster, Component, Lab, Mesh, Mode, Workload};
use super::s;

/// The components of a lab, in start order (brokers first, then per
/// cluster: control plane, gateway, workloads with their sidecars).
pub fn components(lab: &Lab) -> Vec<Component> {
    let mut out: Vec<Component> = lab.etcd.iter().map(|e| etcd(lab, e)).collect();
    out.extend(lab.brokers.iter().flat_map(|m| brokers(lab, m)));
    // Kubernetes mode: every cluster's API server first (a primary's
    // control plane reads its remotes' at start).
    if lab.kube {
        for c in &lab.clusters {
            out.extend(super::kube::components(c));
        }
    }
    for c in &lab.clusters {
        if let Some(cp) = &c.control_plane {
            out.push(control_plane(lab, c, cp));
        }
        let cp = c.cp_address(lab).unwrap_or_default();
        out.push(gateway(lab, c, &cp));
        for w in &c.workloads {
            if w.service != "client" {
                out.push(echo(c, w));
            }
            out.push(sidecar(lab, c, w, &cp));
        }
    }
    out
}

/// `--cert-ttl` for sidecars and gateways, when the lab sets one.
fn cert_ttl(lab: &Lab) -> Vec<String> {
    lab.cert_ttl
        .iter()
        .flat_map(|t| ["--cert-ttl".to_string(), t.clone()])
        .collect()
}

/// One member of the lab's etcd (`--ha`).
fn etcd(lab: &Lab, e: &plan::EtcdMember) -> Component {
    let bin = super::kube::tool("etcd")
        .map(|p| s(&p))
        .unwrap_or_else(|_| "etcd".into());
    let cluster: Vec<String> = lab
        .etcd
        .iter()
        .map(|m| format!("{}=http://{}:2380", m.name, m.ip))
        .collect();
    Component {
        name: e.name.clone(),
        args: vec![
            bin,
            "--name".into(),
            e.name.clone(),
            "--data-dir".into(),
            s(&e.data_dir),
            "--listen-client-urls".into(),
            format!("http://{}", e.client),
            "--advertise-client-urls".into(),
            format!("http://{}", e.client),
            "--listen-peer-urls".into(),
            format!("http://{}:2380", e.ip),
            "--initial-advertise-peer-urls".into(),
            format!("http://{}:2380", e.ip),
            "--initial-cluster".into(),
            cluster.join(","),
            "--initial-cluster-state".into(),
            "new".into(),
            "--listen-metrics-urls".into(),
            format!("http://{}:2381", e.ip),
        ],
        health: format!("http://{}:2381/health", e.ip),
        netns: None,
        env: Vec::new(),
        health_ca: None,
    }
}

/// A mesh's broker, or its replicas (`--ha`).
fn brokers(lab: &Lab, m: &Mesh) -> Vec<Component> {
    if m.replicas.is_empty() {
        return vec![broker(lab, m)];
    }
    let store = format!(
        "etcd://{}",
        lab.etcd
            .iter()
            .map(|e| e.client.clone())
            .collect::<Vec<_>>()
            .join(",")
    );
    m.replicas
        .iter()
        .map(|r| {
            let one = Mesh {
                ip: r.ip.clone(),
                address: r.address.clone(),
                data_dir: r.data_dir.clone(),
                component: r.name.clone(),
                ..m.clone()
            };
            let mut c = broker(lab, &one);
            c.args.extend([
                "--store".into(),
                store.clone(),
                "--replica".into(),
                r.name.clone(),
                "--lease-ttl".into(),
                plan::HA_LEASE_TTL.into(),
            ]);
            for other in &m.replicas {
                c.args.extend(["--advertise".into(), other.address.clone()]);
            }
            c
        })
        .collect()
}

/// A mesh's broker.
fn broker(lab: &Lab, m: &Mesh) -> Component {
    let mut args = vec![
        "broker".to_string(),
        "--data-dir".into(),
        s(&m.data_dir),
        "--root".into(),
        s(&root_dir(lab, &m.mesh)),
        "--trust-domain".into(),
        m.trust_domain.clone(),
        "--mesh-name".into(),
        m.mesh.clone(),
        "--listen".into(),
        m.address.clone(),
        "--health-listen".into(),
        format!("{}:{}", m.ip, plan::HEALTH_PORT),
        "--metrics-listen".into(),
        format!("{}:{}", m.ip, plan::METRICS_PORT),
    ];
    if lab.brokers.len() > 1 {
        args.extend(["--peer-listen".into(), m.peer_address.clone()]);
    }
    if lab.bind_identities {
        args.push("--bind-identities-to-clusters".into());
    }
    Component {
        name: m.component.clone(),
        args,
        health: format!("http://{}:{}/healthz/ready", m.ip, plan::HEALTH_PORT),
        netns: None,
        env: Vec::new(),
        health_ca: None,
    }
}

/// A cluster's control plane, listening on `cp`.
fn control_plane(lab: &Lab, c: &Cluster, cp: &str) -> Component {
    let state = c.dir.join("state");
    let mut args = vec![
        "controlplane".to_string(),
        "--cluster".into(),
        c.name.clone(),
        "--network".into(),
        c.network.clone(),
        "--state-dir".into(),
        s(&state),
        "--join-token".into(),
        s(&c.dir.join("join.token")),
        "--listen".into(),
        cp.to_string(),
        "--gateway".into(),
        c.gateway.tcp.to_string(),
        "--health-listen".into(),
        format!("{}:{}", c.cp_ip(), plan::HEALTH_PORT),
        "--metrics-listen".into(),
        format!("{}:{}", c.cp_ip(), plan::METRICS_PORT),
    ];
    // Its cluster's config: a directory, or (--kube) its API server.
    match &c.kubeconfig {
        Some(_) => args.push("--kube".into()),
        None => args.extend(["--config-dir".into(), s(&c.config_dir)]),
    }
    for r in lab
        .clusters
        .iter()
        .filter(|r| r.role == "remote" && r.mesh == c.mesh)
    {
        let config = r.kubeconfig.as_ref().unwrap_or(&r.config_dir);
        args.extend(["--remote".into(), format!("{}={}", r.name, s(config))]);
    }
    // Debug endpoints stay on loopback: the control plane's own
    // loopback address here, the namespace's 127.0.0.1 (the
    // default) in netns mode.
    if c.netns.is_none() {
        args.extend([
            "--debug-listen".into(),
            format!("{}:{}", c.cp_ip(), plan::DEBUG_PORT),
        ]);
    }
    // Its CA issues no longer leaves than the proxies ask for, so
    // that a root rotation's finish waits only that long.
    if let Some(ttl) = &lab.cert_ttl {
        args.extend(["--max-cert-ttl".into(), ttl.clone()]);
    }
    if lab.mode == Mode::Quic {
        args.extend([
            "--quic-egress".into(),
            format!("{}:{}", c.gw_ip(), plan::EGRESS_PORT),
        ]);
    }
    Component {
        name: format!("{}/controlplane", c.name),
        args,
        health: format!("http://{}:{}/healthz/ready", c.cp_ip(), plan::HEALTH_PORT),
        netns: c.netns.clone(),
        env: c
            .kubeconfig
            .iter()
            .map(|k| ("KUBECONFIG".to_string(), s(k)))
            .collect(),
        health_ca: None,
    }
}

/// A cluster's east-west gateway, following the control plane at `cp`.
fn gateway(lab: &Lab, c: &Cluster, cp: &str) -> Component {
    let mut gateway_args = vec![
        "gateway".into(),
        "--cluster".into(),
        c.name.clone(),
        "--network".into(),
        c.network.clone(),
        "--listen".into(),
        c.gateway.tcp.to_string(),
        "--egress-listen".into(),
        format!("{}:{}", c.gw_ip(), plan::EGRESS_PORT),
        "--control-plane".into(),
        cp.to_string(),
        // Its own key and a certificate from the control plane's CSR
        // API, renewed at half life, as a sidecar's.
        "--token".into(),
        s(&c.dir.join("tokens").join("eastwest-gateway.token")),
        "--root-cert".into(),
        s(&c.state_dir(lab).join("cacerts").join("root-cert.pem")),
        "--health-listen".into(),
        format!("{}:{}", c.gw_ip(), plan::HEALTH_PORT),
        "--metrics-listen".into(),
        format!("{}:{}", c.gw_ip(), plan::METRICS_PORT),
    ];
    // A primary serving remotes exposes its control plane to them.
    if let Some(own_cp) = &c.control_plane
        && lab
            .clusters
            .iter()
            .any(|r| r.role == "remote" && r.mesh == c.mesh)
    {
        gateway_args.extend([
            "--expose-control-plane".into(),
            own_cp.to_string(),
            "--expose-listen".into(),
            format!("{}:{}", c.gw_ip(), plan::CP_PORT),
        ]);
    }
    gateway_args.extend(cert_ttl(lab));
    Component {
        name: format!("{}/gateway", c.name),
        args: gateway_args,
        health: format!("http://{}:{}/healthz/ready", c.gw_ip(), plan::HEALTH_PORT),
        netns: c.netns.clone(),
        env: Vec::new(),
        health_ca: None,
    }
}

/// A workload's echo server.
fn echo(c: &Cluster, w: &Workload) -> Component {
    Component {
        name: format!("{}/{}", c.name, w.name),
        args: vec![
            "lab".into(),
            "echo".into(),
            "--listen".into(),
            format!("{}:{}", w.ip, plan::APP_PORT),
            "--cluster".into(),
            c.name.clone(),
            "--service".into(),
            w.service.clone(),
            "--version".into(),
            w.version.clone(),
            "--workload".into(),
            w.name.clone(),
        ],
        health: format!("http://{}:{}/healthz", w.ip, plan::APP_PORT),
        netns: c.netns.clone(),
        env: Vec::new(),
        health_ca: None,
    }
}

/// A workload's sidecar, following the control plane at `cp`.
fn sidecar(lab: &Lab, c: &Cluster, w: &Workload, cp: &str) -> Component {
    let root_cert = s(&c.state_dir(lab).join("cacerts").join("root-cert.pem"));
    Component {
        name: format!("{}/{}/sidecar", c.name, w.name),
        args: vec![
            "sidecar".into(),
            "--workload".into(),
            w.name.clone(),
            "--namespace".into(),
            w.namespace.clone(),
            "--control-plane".into(),
            cp.to_string(),
            "--cluster".into(),
            c.name.clone(),
            "--token".into(),
            s(&c.dir.join("tokens").join(format!("{}.token", w.name))),
            "--root-cert".into(),
            root_cert.clone(),
            "--inbound".into(),
            w.inbound.clone(),
            "--app".into(),
            format!("{}:{}", w.ip, plan::APP_PORT),
            "--outbound".into(),
            format!("{}:{}", w.ip, plan::OUTBOUND_PORT),
            "--health-listen".into(),
            format!("{}:{}", w.ip, plan::HEALTH_PORT),
            "--metrics-listen".into(),
            format!("{}:{}", w.ip, plan::METRICS_PORT),
        ]
        .into_iter()
        .chain(cert_ttl(lab))
        .collect(),
        health: format!("http://{}:{}/healthz/ready", w.ip, plan::HEALTH_PORT),
        netns: c.netns.clone(),
        env: Vec::new(),
        health_ca: None,
    }
}

pub(super) fn root_dir(lab: &Lab, mesh: &str) -> PathBuf {
    lab.dir.join(mesh).join("root")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;

    use crate::lab::plan::Topology;

    #[test]
    fn components_start_brokers_first_and_name_clusters() {
        let lab = Lab::new(
            Topology::MultiPrimary,
            Path::new("/l"),
            Mode::Sni,
            10,
            false,
        )
        .unwrap();
        let names: Vec<String> = components(&lab).into_iter().map(|c| c.name).collect();
        assert_eq!(names[0], "broker");
        assert!(names.contains(&"east/controlplane".to_string()));
        assert!(names.contains(&"west/gateway".to_string()));
        assert!(names.contains(&"east/echo-v1/sidecar".to_string()));
        assert!(names.contains(&"west/client/sidecar".to_string()));
        // Every component has its own health endpoint.
        let mut health: Vec<String> = components(&lab).into_iter().map(|c| c.health).collect();
        health.sort();
        health.dedup();
        assert_eq!(health.len(), names.len());
    }
}
