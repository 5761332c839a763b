//! `strait lab up --kube`: each cluster with a Kubernetes API server of its
//! own (etcd and kube-apiserver on the cluster's loopback block, built by
//! `scripts/tools.sh`), the control planes in Kubernetes mode against them.
//!
//! - Cluster `i`'s etcd listens on `127.<block>.0.6:2379` (peer 2380) and
//!   its kube-apiserver on `127.<block>.0.6:6443`, with a PKI made here
//!   (`<cluster>/kube/pki`: CA, serving and admin client certificates,
//!   service-account keys), RBAC on, and an admin kubeconfig
//!   (`<cluster>/kube/admin.kubeconfig`, in `lab.json` as `kubeconfig`).
//! - There is no kubelet, scheduler or controller-manager: the lab creates
//!   the demo's objects as they would be after them — Services,
//!   ServiceAccounts, a Node with the cluster's locality, Pods whose status
//!   (phase, IP, Ready) is set through the status subresource to the
//!   workload processes' addresses. No EndpointSlices: the API server
//!   refuses loopback endpoint addresses, so the control plane follows the
//!   pods' Ready condition, as it does for a pod no slice speaks of.
//! - Istio's and the MCS API's CRDs (compiled into this binary) are
//!   installed first, so imports are applied and validated by the API
//!   server itself.
//! - `lab apply` / `lab delete` go to the cluster's API server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::plan::{APP_PORT, Cluster, Component, INBOUND_PORT, Lab, NAMESPACE};
use super::s;

/// The host number of the API server (and etcd) in a cluster's block.
const HOST: u8 = 6;
pub const APISERVER_PORT: u16 = 6443;
pub const ETCD_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;

/// The CRDs the lab installs (the same files the schema tests read).
const CRDS: [&str; 3] = [
    include_str!("../../model/tests/testdata/crds/istio-crds.gen.yaml"),
    include_str!("../../model/tests/testdata/crds/multicluster.x-k8s.io_serviceexports.yaml"),
    include_str!("../../model/tests/testdata/crds/multicluster.x-k8s.io_serviceimports.yaml"),
];

/// The directory `scripts/tools.sh` links the built tools into
/// (`$STRAIT_TOOLS/bin`, default `~/.cache/strait/tools/bin`).
pub fn tools_bin() -> PathBuf {
    match std::env::var_os("STRAIT_TOOLS") {
        Some(dir) => PathBuf::from(dir).join("bin"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/strait/tools/bin"),
    }
}

/// The path of a tool `scripts/tools.sh` builds, or why it is missing.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = tools_bin().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "--kube needs {name} ({} is missing): build etcd, kube-apiserver and kubectl once \
             with `bash scripts/tools.sh etcd kube` (or point STRAIT_TOOLS at where they are)",
            path.display()
        )
    }
}

/// Why `--kube` cannot run here, if it cannot.
pub fn unavailable(netns: bool) -> Option<String> {
    if netns {
        return Some("--kube does not run with --netns yet: use one or the other".into());
    }
    ["etcd", "kube-apiserver", "kubectl"]
        .iter()
        .find_map(|t| tool(t).err().map(|e| e.to_string()))
}

fn kube_dir(c: &Cluster) -> PathBuf {
    c.dir.join("kube")
}

fn pki(c: &Cluster) -> PathBuf {
    kube_dir(c).join("pki")
}

/// The admin kubeconfig of a cluster's API server.
pub fn kubeconfig_of(c: &Cluster) -> PathBuf {
    kube_dir(c).join("admin.kubeconfig")
}

fn host(c: &Cluster) -> String {
    format!("127.{}.0.{HOST}", c.block)
}

/// The API server's URL.
pub fn server(c: &Cluster) -> String {
    format!("https://{}:{APISERVER_PORT}", host(c))
}

/// A cluster's etcd and API server, to start before its control plane.
pub fn components(c: &Cluster) -> Vec<Component> {
    let (Ok(etcd), Ok(apiserver)) = (tool("etcd"), tool("kube-apiserver")) else {
        // `up` checked the tools before anything started.
        return Vec::new();
    };
    let h = host(c);
    let dir = kube_dir(c);
    let p = |f: &str| s(&pki(c).join(f));
    let etcd = Component {
        name: format!("{}/etcd", c.name),
        args: vec![
            s(&etcd),
            "--name".into(),
            c.name.clone(),
            "--data-dir".into(),
            s(&dir.join("etcd")),
            "--listen-client-urls".into(),
            format!("http://{h}:{ETCD_PORT}"),
            "--advertise-client-urls".into(),
            format!("http://{h}:{ETCD_PORT}"),
            "--listen-peer-urls".into(),
            format!("http://{h}:{ETCD_PEER_PORT}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{h}:{ETCD_PEER_PORT}"),
            "--initial-cluster".into(),
            format!("{}=http://{h}:{ETCD_PEER_PORT}", c.name),
            "--listen-metrics-urls".into(),
            format!("http://{h}:2381"),
        ],
        health: format!("http://{h}:{ETCD_PORT}/health"),
        netns: None,
        env: Vec::new(),
        health_ca: None,
    };
    let apiserver = Component {
        name: format!("{}/apiserver", c.name),
        args: vec![
            s(&apiserver),
            format!("--etcd-servers=http://{h}:{ETCD_PORT}"),
            format!("--bind-address={h}"),
            format!("--advertise-address={h}"),
            format!("--secure-port={APISERVER_PORT}"),
            format!("--tls-cert-file={}", p("serving.crt")),
            format!("--tls-private-key-file={}", p("serving.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--authorization-mode=Node,RBAC".into(),
            // Handed to Services; nothing is ever sent there.
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            format!("--cert-dir={}", s(&dir.join("certs"))),
        ],
        health: format!("{}/readyz", server(c)),
        netns: None,
        env: Vec::new(),
        health_ca: Some(pki(c).join("ca.crt")),
    };
    vec![etcd, apiserver]
}

/// The PKI and the admin kubeconfig of a cluster's API server.
pub fn write_pki(c: &Cluster) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let dir = pki(c);
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| path.display().to_string())
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("strait-lab-{}-kubernetes-ca", c.name),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    write("ca.crt", &ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let leaf = |sans: Vec<String>, org: Option<&str>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        if let Some(org) = org {
            params
                .distinguished_name
                .push(DnType::OrganizationName, org);
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![eku];
        let cert = params.signed_by(&key, &issuer)?;
        anyhow::Ok((cert.pem(), key.serialize_pem()))
    };
    let (cert, key) = leaf(
        vec![host(c), "localhost".into(), "kubernetes.default.svc".into()],
        None,
        "kube-apiserver",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    write("serving.crt", &cert)?;
    write("serving.key", &key)?;
    let (cert, key) = leaf(
        Vec::new(),
        Some("system:masters"),
        "strait-lab-admin",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    write("admin.crt", &cert)?;
    write("admin.key", &key)?;
    let sa = KeyPair::generate()?;
    write("sa.key", &sa.serialize_pem())?;
    write("sa.pub", &sa.public_key_pem())?;

    let p = |f: &str| s(&dir.join(f));
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
contexts:\n- name: {name}\n  context: {{cluster: {name}, user: admin, namespace: {NAMESPACE}}}\ncurrent-context: {name}\n\
users:\n- name: admin\n  user:\n    client-certificate: {cert}\n    client-key: {key}\n",
        name = c.name,
        server = server(c),
        ca = p("ca.crt"),
        cert = p("admin.crt"),
        key = p("admin.key"),
    );
    let path = kubeconfig_of(c);
    std::fs::write(&path, kubeconfig).with_context(|| path.display().to_string())
}

/// `kubectl --kubeconfig <the cluster's> ARGS`, with `stdin` fed to it;
/// its standard output, or an error with what it printed.
pub fn kubectl(c: &Cluster, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(tool("kubectl")?)
        .arg("--kubeconfig")
        .arg(kubeconfig_of(c))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run kubectl")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {} ({}): {}",
            args.join(" "),
            c.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Server-side apply of `yaml` to a cluster's API server.
pub fn apply(c: &Cluster, yaml: &str) -> Result<()> {
    kubectl(
        c,
        &[
            "apply",
            "--server-side",
            "--field-manager=strait-lab",
            "-f",
            "-",
        ],
        Some(yaml),
    )
    .map(drop)
}

/// Applies or deletes the objects of `file` in cluster `cluster`'s API
/// server (`lab apply` / `lab delete` in Kubernetes mode).
pub fn apply_file(lab: &Lab, cluster: &str, file: &Path, put: bool) -> Result<()> {
    let c = lab
        .cluster(cluster)
        .ok_or_else(|| anyhow::anyhow!("no cluster {cluster:?} in this lab"))?;
    let f = s(file);
    if put {
        kubectl(
            c,
            &[
                "apply",
                "--server-side",
                "--field-manager=strait-lab",
                "-f",
                &f,
            ],
            None,
        )?;
    } else {
        kubectl(c, &["delete", "--ignore-not-found", "-f", &f], None)?;
    }
    println!(
        "{} {} in {cluster}'s API server",
        if put { "applied" } else { "deleted" },
        file.display()
    );
    Ok(())
}

/// Installs the CRDs and the cluster's starting objects, as the
/// controllers a real cluster runs would leave them.
pub fn install(lab: &Lab, c: &Cluster) -> Result<()> {
    for crd in CRDS {
        apply(c, crd)?;
    }
    kubectl(
        c,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
        None,
    )?;
    let others: Vec<String> = lab
        .brokers
        .iter()
        .filter(|b| b.mesh != c.mesh)
        .map(|b| format!("mesh:{}", b.mesh))
        .collect();
    apply(c, &objects_yaml(c, &others))?;
    if c.role == "remote" {
        remote_gateway(c)?;
    }
    for w in &c.workloads {
        let status = format!(
            r#"{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}"#,
            ip = w.ip
        );
        set_status(c, "pod", &w.name, &w.namespace, &status)?;
    }
    Ok(())
}

/// Sets the status of `kind/name` through the status subresource, as the
/// kubelet or a controller would.
fn set_status(c: &Cluster, kind: &str, name: &str, namespace: &str, status: &str) -> Result<()> {
    let patch = format!(r#"{{"status":{status}}}"#);
    kubectl(
        c,
        &[
            "patch",
            kind,
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ],
        None,
    )?;
    Ok(())
}

/// A remote cluster's network and gateway, as its primary's control
/// plane discovers them: the system namespace and the gateway Service
/// labelled with the network, the gateway's address in the Service's
/// load-balancer status, as a cloud's load-balancer controller would set
/// it. (The directory lab's `spec.externalIPs` cannot be used here: the
/// API server refuses loopback external IPs.)
fn remote_gateway(c: &Cluster) -> Result<()> {
    apply(c, &c.network_objects("type: LoadBalancer"))?;
    let status = format!(
        r#"{{"loadBalancer":{{"ingress":[{{"ip":"{}"}}]}}}}"#,
        c.gw_ip()
    );
    set_status(c, "service", "eastwest-gateway", "strait-system", &status)
}

/// The cluster's starting objects: the demo's Services (from the same
/// config a directory lab starts with, without its WorkloadEntries), and
/// what the kubelet and the controllers would have made of the workloads
/// — ServiceAccounts, a Node with the cluster's locality and Pods on it.
pub fn objects_yaml(c: &Cluster, export_to: &[String]) -> String {
    let mut out: Vec<String> = c
        .config_yaml(export_to)
        .split("\n---\n")
        .filter(|d| !d.contains("kind: WorkloadEntry"))
        .map(str::to_string)
        .collect();
    let (region, zone) = c.locality.split_once('/').unwrap_or((&c.locality, ""));
    let node = format!("{}-node", c.name);
    out.push(format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels:\n    topology.kubernetes.io/region: {region}\n    topology.kubernetes.io/zone: {zone}\n"
    ));
    for w in &c.workloads {
        out.push(format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {}\n  namespace: {}\n",
            w.service_account, w.namespace
        ));
        out.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {app}, version: {version}, topology.istio.io/network: {network}}}\n  annotations:\n    strait.io/inbound-port: \"{INBOUND_PORT}\"\n\
spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  automountServiceAccountToken: false\n  containers:\n  - name: app\n    image: strait-lab/echo\n    ports:\n    - {{name: http, containerPort: {APP_PORT}}}\n",
            name = w.name,
            ns = w.namespace,
            app = w.service,
            version = w.version,
            network = c.network,
            sa = w.service_account,
        ));
    }
    // No EndpointSlices: the API server refuses endpoint addresses in
    // the loopback range, where the lab's workloads live. Without one
    // speaking of a pod, the control plane follows the pod's Ready
    // condition, which the lab sets.
    out.join("\n---\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::lab::plan::{Mode, Topology};

    #[test]
    fn the_objects_stand_for_the_workloads_as_the_controllers_would_leave_them() {
        let lab = Lab::new(
            Topology::MultiPrimary,
            Path::new("/l"),
            Mode::Sni,
            10,
            false,
        )
        .unwrap()
        .with_kube(true);
        let east = &lab.clusters[0];
        assert_eq!(
            east.kubeconfig.as_deref(),
            Some(Path::new("/l/east/kube/admin.kubeconfig"))
        );
        let yaml = objects_yaml(east, &[]);
        assert!(!yaml.contains("WorkloadEntry"), "{yaml}");
        for want in [
            "kind: Pod\nmetadata:\n  name: echo-v1",
            "serviceAccountName: echo",
            "topology.kubernetes.io/region: region-a",
            "strait.io/export: \"true\"",
        ] {
            assert!(yaml.contains(want), "{want} missing:\n{yaml}");
        }
        // Every document parses as YAML with a kind.
        for doc in yaml.split("\n---\n") {
            let v: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            assert!(v["kind"].is_string(), "{doc}");
        }
        let comps = components(east);
        if let [etcd, apiserver] = comps.as_slice() {
            assert_eq!(etcd.health, "http://127.11.0.6:2379/health");
            assert_eq!(apiserver.health, "https://127.11.0.6:6443/readyz");
            assert!(apiserver.health_ca.is_some());
        }
    }
}
