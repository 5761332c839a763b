//! `strait controlplane` end to end: a real broker, real control plane
//! processes joined to it with `straitctl cluster add` tokens, and a
//! proxy-like client in the test that gets its certificate with a
//! bootstrap token (Istio's CSR API) and then subscribes to discovery
//! (delta ADS), ACKing or NACKing what it receives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../controlplane/tests/support/fake_api.rs"]
mod fake_api;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Broker, Scratch, free_port, http_get, http_status};
use strait_ca::TrustDomain;
use strait_ca::tls::Trust;
use strait_controlplane::ca::{self, Credential, Identity};
use strait_controlplane::client::{
    self, ClientState, Resources, Validator, XdsClient, XdsClientConfig,
};
use strait_proto::strait::mesh::v1 as pb;
use strait_proto::strait::mesh::v1::type_url;
use tokio::sync::watch;

const TD: &str = "cluster.local";
/// Generous: two cores shared with other test binaries.
const WAIT: Duration = Duration::from_secs(60);
/// A Service the test proxy refuses (to see a NACK end to end).
const REFUSED: &str = "refuse-me.demo.svc.cluster.local";

/// Writes `data` to `dir/name` atomically (a temporary name the control
/// plane does not read, then rename), as a config management tool would.
fn put(dir: &Path, name: &str, data: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn service_yaml(name: &str, port: u32, export: bool) -> String {
    let annotations = if export {
        "  annotations: {strait.io/export: \"true\"}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: demo\n{annotations}\
spec:\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, port: {port}}}\n"
    )
}

fn workload_yaml(name: &str, app: &str, address: &str, network: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: demo\n\
spec:\n  address: {address}\n  labels: {{app: {app}}}\n  serviceAccount: {app}\n  network: {network}\n  ports: {{http: 8080}}\n"
    )
}

/// A `strait controlplane` process of one cluster.
struct ControlPlane {
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    listen: String,
    health: String,
    metrics: String,
    state: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl ControlPlane {
    /// Joins `cluster` to `broker` (first start) and waits until ready.
    fn start(s: &Scratch, broker: &Broker, cluster: &str, network: &str, gateway: &str) -> Self {
        Self::start_with(s, broker, cluster, network, gateway, None, &[])
    }

    /// [`Self::start`] reading the config from the Kubernetes API of
    /// `kubeconfig` (`--kube`) when given, else from a directory.
    fn start_with(
        s: &Scratch,
        broker: &Broker,
        cluster: &str,
        network: &str,
        gateway: &str,
        kubeconfig: Option<&Path>,
        extra: &[String],
    ) -> Self {
        let token = broker
            .ctl(&["cluster", "add", cluster, "--network", network])
            .ok()
            .stdout;
        let token_file = s.write(&format!("{cluster}.token"), &token);
        let config = s.path(&format!("{cluster}/config"));
        std::fs::create_dir_all(&config).unwrap();
        let state = s.path(&format!("{cluster}/state"));
        // A port picked free can be taken (by another test's outgoing
        // connection) before the control plane binds it: pick again.
        for attempt in 1.. {
            let listen = format!("127.0.0.1:{}", free_port());
            let health = format!("127.0.0.1:{}", free_port());
            let metrics = format!("127.0.0.1:{}", free_port());
            let source = match kubeconfig {
                Some(_) => vec!["--kube"],
                None => vec!["--config-dir", config.to_str().unwrap()],
            };
            let args: Vec<String> = ["controlplane", "--cluster", cluster, "--network", network]
                .into_iter()
                .chain(source)
                .chain([
                    "--state-dir",
                    state.to_str().unwrap(),
                    "--join-token",
                    token_file.to_str().unwrap(),
                    "--listen",
                    &listen,
                    "--health-listen",
                    &health,
                    "--metrics-listen",
                    &metrics,
                    "--gateway",
                    gateway,
                ])
                .map(str::to_string)
                .chain(extra.iter().cloned())
                .collect();
            let env = kubeconfig
                .map(|k| vec![("KUBECONFIG".to_string(), k.display().to_string())])
                .unwrap_or_default();
            let mut cp = ControlPlane {
                child: None,
                args,
                env,
                listen,
                health,
                metrics,
                state: state.clone(),
                config: config.clone(),
                log: s.path(&format!("{cluster}/controlplane.log")),
            };
            match cp.try_spawn() {
                Ok(()) => return cp,
                Err(log) if attempt < 5 && log.contains("Address already in use") => {
                    let _ = std::fs::remove_file(&cp.log);
                }
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// (Re)starts the process with the same arguments and waits until its
    /// health endpoint says ready.
    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("{log}");
        }
    }

    /// [`Self::spawn`], or the log when the process exited while starting.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_strait"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "strait_controlplane=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start strait controlplane");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "control plane exited with {status}:\n{}",
                    self.log()
                ));
            }
            if http_status(&self.health, "/healthz/ready") == Some(200) {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "control plane not ready within {WAIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and a clean exit.
    fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "control plane exit: {status}\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn trust_domain(&self) -> TrustDomain {
        TrustDomain::new(TD).unwrap()
    }

    /// The mesh roots, as a sidecar is given them.
    fn trust(&self) -> Trust {
        let root = self.state.join("cacerts/root-cert.pem");
        Trust::new(strait_ca::layout::load_bundle(&root, Some(self.trust_domain())).unwrap())
    }

    /// A bootstrap token from `strait controlplane token`.
    fn token(&self, ns: &str, sa: &str, workload: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_strait"))
            .args(["controlplane", "token", "--state-dir"])
            .arg(&self.state)
            .args([
                "--namespace",
                ns,
                "--service-account",
                sa,
                "--workload",
                workload,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "strait controlplane token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// What a sidecar does first: a certificate for `ns/sa` with a token.
    async fn certificate(&self, ns: &str, sa: &str, workload: &str) -> Identity {
        let td = self.trust_domain();
        let id = strait_ca::SpiffeId::from_segments(&td, &["ns", ns, "sa", sa]).unwrap();
        let tls = ca::mesh_client_tls(self.trust(), ca::control_plane_id(&td));
        let token = self.token(ns, sa, workload);
        ca::request_certificate(
            &self.listen,
            &tls,
            &self.trust(),
            &id,
            Credential::Token(&token),
            None,
        )
        .await
        .unwrap()
    }

    /// A sidecar-like discovery client with `identity`, refusing the
    /// Service [`REFUSED`].
    fn subscribe(&self, identity: &Identity, workload: &str) -> XdsClient {
        self.subscribe_as(identity, workload, "")
    }

    /// [`Self::subscribe`] for a proxy of `cluster` (node metadata
    /// CLUSTER_ID; empty: the control plane's own).
    fn subscribe_as(&self, identity: &Identity, workload: &str, cluster: &str) -> XdsClient {
        let td = self.trust_domain();
        let tls = ca::mesh_client_tls(self.trust(), ca::control_plane_id(&td));
        let validator: Validator = Arc::new(|r: &Resources| {
            let services = r
                .decode::<pb::Service>(type_url::SERVICE)
                .map_err(|e| vec![e])?;
            if services.contains_key(REFUSED) {
                return Err(vec![(
                    REFUSED.to_string(),
                    "refused by the test proxy".to_string(),
                )]);
            }
            Ok(())
        });
        client::spawn(
            XdsClientConfig {
                address: self.listen.clone(),
                tls: Arc::new(tls(Some(identity)).unwrap()).into(),
                node_id: format!(
                    "sidecar~10.1.0.1~{workload}.{}~{}.svc.cluster.local",
                    identity.spiffe_id.workload_parts().unwrap().0,
                    identity.spiffe_id.workload_parts().unwrap().0
                ),
                cluster: cluster.to_string(),
                network: String::new(),
                types: type_url::ALL.to_vec(),
            },
            validator,
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn services(r: &Resources) -> std::collections::BTreeMap<String, pb::Service> {
    r.decode::<pb::Service>(type_url::SERVICE).unwrap()
}

/// Waits until `f` finds what it wants in the client's resources.
async fn until<T>(
    rx: &mut watch::Receiver<Arc<Resources>>,
    what: &str,
    cp: &ControlPlane,
    f: impl Fn(&Resources) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(t) = f(&rx.borrow_and_update()) {
            return t;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the client stopped while waiting for {what}"),
            Err(_) => panic!(
                "{what}: not seen within {WAIT:?}; the client holds {:?}\ncontrol plane log:\n{}",
                services(&rx.borrow()).keys().collect::<Vec<_>>(),
                cp.log()
            ),
        }
    }
}

/// Waits until the client's state satisfies `f`.
async fn until_state(
    rx: &mut watch::Receiver<ClientState>,
    what: &str,
    f: impl Fn(&ClientState) -> bool,
) -> ClientState {
    tokio::time::timeout(WAIT, rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"))
        .expect("client running")
        .clone()
}

fn has(name: &str) -> impl Fn(&Resources) -> Option<()> + '_ {
    move |r| services(r).contains_key(name).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_config_changes_nacks_and_a_restart() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let mut east = ControlPlane::start(&s, &broker, "east", "net-east", "192.0.2.10:15443");
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    put(
        &east.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", 8080, false),
            workload_yaml("echo-v1", "echo", "10.1.0.1", "net-east")
        ),
    );
    put(
        &west.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", 8080, true),
            workload_yaml("echo-v2", "echo", "10.2.0.1", "net-west")
        ),
    );

    // A sidecar of east: certificate with a token, then discovery with it.
    let identity = east.certificate("demo", "echo", "echo-v1").await;
    assert_eq!(
        identity.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    let proxy = east.subscribe(&identity, "echo-v1");
    let mut res = proxy.resources();
    let mut state = proxy.state();

    // West's export reaches east's Service resource as a GATEWAY endpoint,
    // next to east's own SIDECAR endpoint.
    let echo = until(&mut res, "echo with west's gateway", &east, |r| {
        let svc = services(r).remove("echo.demo.svc.cluster.local")?;
        svc.endpoints
            .iter()
            .any(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
            .then_some(svc)
    })
    .await;
    let kinds: Vec<(i32, &str, &str)> = echo
        .endpoints
        .iter()
        .map(|e| (e.kind, e.address.as_str(), e.network.as_str()))
        .collect();
    assert!(
        kinds.contains(&(pb::endpoint::Kind::Sidecar as i32, "10.1.0.1", "net-east")),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(pb::endpoint::Kind::Gateway as i32, "192.0.2.20", "net-west")),
        "{kinds:?}"
    );
    let gw = echo
        .endpoints
        .iter()
        .find(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
        .unwrap();
    assert_eq!((gw.port, gw.cluster.as_str()), (15443, "west"), "{gw:?}");
    assert!(
        std::fs::read_to_string(east.config.join("imported/strait-imports.yaml"))
            .unwrap()
            .contains("192.0.2.20"),
        "imports written back to the config directory"
    );
    until_state(&mut state, "synced", |s| s.synced && s.connected).await;

    // The import carries a ClusterSet IP from the default range, in the
    // ServiceEntry's addresses and the ServiceImport's spec.ips, and the
    // service resource has it (for captured connections to it).
    let imported = east.config.join("imported/strait-imports.yaml");
    let vip = until(&mut res, "echo's ClusterSet IP", &east, |r| {
        let svc = services(r).remove("echo.demo.svc.cluster.local")?;
        svc.addresses
            .iter()
            .find(|a| a.starts_with("240.241."))
            .cloned()
    })
    .await;
    let text = std::fs::read_to_string(&imported).unwrap();
    assert_eq!(text.matches(vip.as_str()).count(), 2, "{text}");
    // An address the cluster already holds is kept, not moved back to where
    // the name hashes.
    let kept_ip = "240.241.9.9";
    assert_ne!(vip, kept_ip);
    std::fs::write(&imported, text.replace(&vip, kept_ip)).unwrap();
    let has_held = |r: &Resources| {
        services(r)
            .remove("echo.demo.svc.cluster.local")?
            .addresses
            .contains(&kept_ip.to_string())
            .then_some(())
    };
    until(
        &mut res,
        "the ClusterSet IP held in the config",
        &east,
        has_held,
    )
    .await;

    // A change to a file reaches the subscriber.
    put(
        &east.config,
        "extra.yaml",
        &service_yaml("extra", 9090, false),
    );
    until(
        &mut res,
        "extra",
        &east,
        has("extra.demo.svc.cluster.local"),
    )
    .await;

    // A bad file is isolated: named in the log, its last good version
    // stays, and a good change made at the same time applies.
    put(
        &east.config,
        "extra.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
    );
    put(
        &east.config,
        "more.yaml",
        &service_yaml("more", 7070, false),
    );
    until(&mut res, "more", &east, has("more.demo.svc.cluster.local")).await;
    let held = services(&res.borrow());
    assert_eq!(
        held["extra.demo.svc.cluster.local"].ports[0].port, 9090,
        "the last good version of extra.yaml is kept"
    );
    let deadline = Instant::now() + WAIT;
    while !east.log().contains("extra.yaml") {
        assert!(
            Instant::now() < deadline,
            "extra.yaml not named in the log:\n{}",
            east.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A config the proxy refuses is NACKed: it keeps what it had, the
    // control plane logs and counts the NACK (and names the node).
    let accepted = state.borrow().accepted;
    put(
        &east.config,
        "refused.yaml",
        &service_yaml("refuse-me", 80, false),
    );
    let st = until_state(&mut state, "a NACK", |s| s.last_nack.is_some()).await;
    let (nacked_type, error) = st.last_nack.unwrap();
    assert_eq!(nacked_type, type_url::SERVICE);
    assert!(error.contains("refused by the test proxy"), "{error}");
    assert!(!services(&res.borrow()).contains_key(REFUSED));
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = http_get(&east.metrics, "/metrics");
        let log = east.log();
        let counted = metrics.lines().any(|l| {
            l.starts_with("strait_xds_nacks_total{") && l.contains("Service") && !l.ends_with(" 0")
        });
        if counted
            && log.contains("proxy refused config (NACK)")
            && log.contains("sidecar~10.1.0.1~echo-v1.demo")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "NACK not logged and counted:\n{metrics}\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nacks: serde_json::Value =
        serde_json::from_str(&http_get(&east.health, "/debug/nacks")).unwrap();
    let ours = &nacks["sidecar~10.1.0.1~echo-v1.demo~demo.svc.cluster.local"];
    assert_eq!(ours["type_url"], type_url::SERVICE, "{nacks:#}");
    assert!(
        ours["error"]
            .as_str()
            .unwrap()
            .contains("refused by the test proxy"),
        "{nacks:#}"
    );
    // Taking the refused object away: the proxy accepts updates again.
    std::fs::remove_file(east.config.join("refused.yaml")).unwrap();
    put(
        &east.config,
        "after.yaml",
        &service_yaml("after", 6060, false),
    );
    until(
        &mut res,
        "after",
        &east,
        has("after.demo.svc.cluster.local"),
    )
    .await;
    // (The client publishes resources just before it counts the ACK.)
    until_state(&mut state, "the push accepted", |s| s.accepted > accepted).await;

    // An Istio Sidecar resource scopes what the sidecar sees (egress
    // hosts); taking it away shows everything again.
    put(
        &east.config,
        "scope.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: demo}\n\
spec:\n  egress:\n  - hosts: [./echo.demo.svc.cluster.local]\n",
    );
    until(&mut res, "only echo in scope", &east, |r| {
        (services(r).keys().collect::<Vec<_>>() == ["echo.demo.svc.cluster.local"]).then_some(())
    })
    .await;
    std::fs::remove_file(east.config.join("scope.yaml")).unwrap();
    until(
        &mut res,
        "everything back in scope",
        &east,
        has("after.demo.svc.cluster.local"),
    )
    .await;

    // The control plane restarts: the proxy keeps its resources meanwhile
    // and resumes (same certificate) when it is back.
    east.terminate();
    until_state(&mut state, "disconnected", |s| !s.connected).await;
    assert!(services(&res.borrow()).contains_key("after.demo.svc.cluster.local"));
    put(
        &east.config,
        "while-down.yaml",
        &service_yaml("while-down", 5050, false),
    );
    east.spawn();
    until(
        &mut res,
        "while-down",
        &east,
        has("while-down.demo.svc.cluster.local"),
    )
    .await;
    until_state(&mut state, "reconnected", |s| s.connected && s.synced).await;
    put(
        &east.config,
        "resumed.yaml",
        &service_yaml("resumed", 4040, false),
    );
    until(
        &mut res,
        "resumed",
        &east,
        has("resumed.demo.svc.cluster.local"),
    )
    .await;
    // West's export survived east's restart too.
    let echo = services(&res.borrow())["echo.demo.svc.cluster.local"].clone();
    assert!(
        echo.endpoints
            .iter()
            .any(|e| e.kind == pb::endpoint::Kind::Gateway as i32),
        "{echo:?}"
    );
    assert_eq!(
        echo.addresses,
        [kept_ip],
        "the ClusterSet IP survived the restart"
    );
    assert_eq!(
        std::fs::read_to_string(&imported)
            .unwrap()
            .matches(kept_ip)
            .count(),
        2
    );
}

/// Push latency: the time from a config file write to the subscriber
/// holding the new resource, over 100 changes. Prints figures (this
/// machine's, shared with other tests) rather than asserting a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_latency_from_file_write_to_subscriber() {
    const CHANGES: u32 = 100;
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let cp = ControlPlane::start(&s, &broker, "solo", "net-solo", "192.0.2.30:15443");
    let identity = cp.certificate("demo", "bench", "bench-1").await;
    let proxy = cp.subscribe(&identity, "bench-1");
    let mut res = proxy.resources();
    let mut state = proxy.state();
    until_state(&mut state, "synced", |s| s.synced).await;

    let mut samples = Vec::with_capacity(CHANGES as usize);
    for i in 0..CHANGES {
        let port = 10_000 + i;
        // Writes land at varied points of the control plane's 200 ms poll
        // (writing right after the previous push would phase-lock to it
        // and measure one point of the cycle only).
        tokio::time::sleep(Duration::from_millis(u64::from(i * 37 % 200))).await;
        let start = Instant::now();
        put(
            &cp.config,
            "bench.yaml",
            &service_yaml("bench", port, false),
        );
        until(&mut res, "the new port", &cp, |r| {
            let svc = services(r).remove("bench.demo.svc.cluster.local")?;
            (svc.ports.first()?.port == port).then_some(())
        })
        .await;
        samples.push(start.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    eprintln!(
        "push latency, file write to subscriber ({CHANGES} changes; poll {:?}, debounce 100ms): \
         p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        strait_controlplane::dirwatch::POLL,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        samples[samples.len() - 1]
    );
    let metrics = http_get(&cp.metrics, "/metrics");
    let histogram: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("strait_xds_push_latency_seconds"))
        .collect();
    eprintln!("{}", histogram.join("\n"));
    let count = histogram
        .iter()
        .find_map(|l| l.strip_prefix("strait_xds_push_latency_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("the push latency histogram is exported");
    assert!(
        count >= u64::from(CHANGES),
        "every change was pushed and observed: {count}"
    );
}

/// A kubeconfig for the API server at `url` (no credentials).
fn kubeconfig(s: &Scratch, name: &str, url: &str) -> PathBuf {
    s.write(
        name,
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{url}\"}}\n\
contexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n\
users:\n- name: fake\n  user: {{}}\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_reads_the_api_applies_imports_and_reviews_tokens() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    // The recorded bookinfo cluster; `reviews` has a ServiceExport.
    let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/tests/testdata/kube");
    let (fake, url) = fake_api::Fake::start(recorded);
    let kube = kubeconfig(&s, "kubeconfig", &url);
    let east = ControlPlane::start_with(
        &s,
        &broker,
        "east",
        "net-east",
        "192.0.2.10:15443",
        Some(&kube),
        &[],
    );
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    put(
        &west.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", 8080, true),
            workload_yaml("echo-v2", "echo", "10.2.0.1", "net-west")
        ),
    );

    // A pod's proxy bootstraps with its service-account token, reviewed by
    // the API server, and gets that account's identity.
    let td = east.trust_domain();
    let id = strait_ca::SpiffeId::workload(&td, "bookinfo", "bookinfo-reviews").unwrap();
    let tls = ca::mesh_client_tls(east.trust(), ca::control_plane_id(&td));
    let identity = ca::request_certificate(
        &east.listen,
        &tls,
        &east.trust(),
        &id,
        Credential::Token("reviews-token"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(identity.spiffe_id, id);
    let other = strait_ca::SpiffeId::workload(&td, "bookinfo", "admin").unwrap();
    let refused = ca::request_certificate(
        &east.listen,
        &tls,
        &east.trust(),
        &other,
        Credential::Token("reviews-token"),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        refused.to_string().contains("bookinfo-reviews"),
        "{refused}"
    );

    // Discovery serves the API's services with the pods as endpoints.
    let proxy = east.subscribe(&identity, "reviews-v1");
    let mut res = proxy.resources();
    let reviews = until(&mut res, "reviews with its pods", &east, |r| {
        let svc = services(r).remove("reviews.bookinfo.svc.cluster.local")?;
        (!svc.endpoints.is_empty()).then_some(svc)
    })
    .await;
    assert!(
        reviews
            .endpoints
            .iter()
            .all(|e| e.kind == pb::endpoint::Kind::Sidecar as i32 && e.network == "net-east"),
        "{:?}",
        reviews.endpoints
    );
    // Its cluster IP, as the API recorded it: what a redirected app's
    // connection is routed by.
    assert_eq!(reviews.addresses, ["10.96.0.81"]);

    // West's export is applied to the API (server-side apply, labelled as
    // strait's), and east's ServiceExport reaches west.
    let deadline = Instant::now() + WAIT;
    let applied = loop {
        let seen = fake.seen();
        let found = seen.into_iter().find(|r| {
            r.method == hyper::Method::PATCH
                && r.path.contains("/namespaces/demo/serviceentries/")
                && r.body.contains("192.0.2.20")
        });
        if let Some(f) = found {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "west's echo not applied to the API within {WAIT:?}:\n{}\nwest:\n{}",
            east.log(),
            west.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(applied.content_type, "application/apply-patch+yaml");
    assert!(
        applied.query.contains("fieldManager=strait-controlplane"),
        "{applied:?}"
    );
    // It carries a ClusterSet IP, and the ServiceImport sent for it (this
    // API serves no MCS CRDs, so it is refused) the same one.
    let at = applied
        .body
        .find("240.241.")
        .unwrap_or_else(|| panic!("no ClusterSet IP: {}", applied.body));
    let vip: String = applied.body[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    assert!(vip.parse::<std::net::Ipv4Addr>().is_ok(), "{vip}");
    assert!(
        fake.seen().iter().any(|r| r.method == hyper::Method::PATCH
            && r.path.contains("/namespaces/demo/serviceimports/")
            && r.body.contains(&vip)),
        "no ServiceImport with {vip} sent"
    );
    let imported = west.config.join("imported/strait-imports.yaml");
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&imported).unwrap_or_default();
        if text.contains("reviews") && text.contains("192.0.2.10") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east's reviews not imported by west within {WAIT:?}:\n{text}\n{}",
            east.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_primary_serves_a_remote_cluster_from_its_api() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/tests/testdata");
    let (_primary_api, url) = fake_api::Fake::start(testdata.join("kube"));
    let (_remote_api, remote_url) = fake_api::Fake::start(testdata.join("kube-remote"));
    let kube = kubeconfig(&s, "kubeconfig", &url);
    let remote_kube = kubeconfig(&s, "remote.kubeconfig", &remote_url);
    let east = ControlPlane::start_with(
        &s,
        &broker,
        "east",
        "net-east",
        "192.0.2.10:15443",
        Some(&kube),
        &[
            "--remote".to_string(),
            format!("remote={}", remote_kube.display()),
        ],
    );
    let td = east.trust_domain();
    let id = strait_ca::SpiffeId::workload(&td, "bookinfo", "bookinfo-reviews").unwrap();
    let tls = ca::mesh_client_tls(east.trust(), ca::control_plane_id(&td));
    let identity = ca::request_certificate(
        &east.listen,
        &tls,
        &east.trust(),
        &id,
        Credential::Token("reviews-token"),
        None,
    )
    .await
    .unwrap();

    // A proxy of the remote cluster: the remote's pod is local (its
    // network from the remote's strait-system Namespace), east's exported
    // reviews is behind east's gateway.
    let remote_proxy = east.subscribe_as(&identity, "reviews-r", "remote");
    let mut res = remote_proxy.resources();
    let (ratings, reviews) = until(&mut res, "the remote's view", &east, |r| {
        let svcs = services(r);
        let ratings = svcs.get("ratings.bookinfo.svc.cluster.local")?.clone();
        let reviews = svcs.get("reviews.bookinfo.svc.cluster.local")?.clone();
        (!ratings.endpoints.is_empty() && !reviews.endpoints.is_empty())
            .then_some((ratings, reviews))
    })
    .await;
    let eps = |svc: &pb::Service| -> Vec<(i32, String, String)> {
        svc.endpoints
            .iter()
            .map(|e| (e.kind, e.address.clone(), e.network.clone()))
            .collect()
    };
    assert_eq!(
        eps(&ratings),
        [(
            pb::endpoint::Kind::Sidecar as i32,
            "10.20.0.5".to_string(),
            "net-remote".to_string()
        )]
    );
    assert!(
        eps(&reviews)
            .iter()
            .all(|(k, a, n)| *k == pb::endpoint::Kind::Gateway as i32
                && a == "192.0.2.10"
                && n == "net-east"),
        "{:?}",
        eps(&reviews)
    );

    // East's own proxies see the remote's exported ratings behind the
    // remote's gateway (from its LoadBalancer Service).
    let east_proxy = east.subscribe(&identity, "reviews-v1");
    let mut res = east_proxy.resources();
    let ratings = until(
        &mut res,
        "ratings behind the remote's gateway",
        &east,
        |r| {
            let svc = services(r).remove("ratings.bookinfo.svc.cluster.local")?;
            svc.endpoints
                .iter()
                .any(|e| e.address == "192.0.2.30" && e.network == "net-remote")
                .then_some(svc)
        },
    )
    .await;
    assert!(
        ratings
            .endpoints
            .iter()
            .any(|e| e.kind == pb::endpoint::Kind::Gateway as i32 && e.port == 15443),
        "{:?}",
        ratings.endpoints
    );

    // A proxy naming a cluster this control plane does not serve is
    // refused by name.
    let stranger = east.subscribe_as(&identity, "reviews-x", "elsewhere");
    let mut state = stranger.state();
    let refused = until_state(&mut state, "a refusal", |s| s.last_error.is_some()).await;
    let error = refused.last_error.unwrap();
    assert!(
        error.contains("elsewhere") && error.contains("remote"),
        "{error}"
    );
}
