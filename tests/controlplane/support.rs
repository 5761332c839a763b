//! The control plane process, the config it reads and the test proxy's
//! waits, shared by the tests of this binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Broker, Scratch, free_port, http_status};
use strait_ca::TrustDomain;
use strait_ca::tls::Trust;
use strait_proto::strait::mesh::v1 as pb;
use strait_proto::strait::mesh::v1::type_url;
use strait_proxy_client::identity::{self as ca, Credential, Identity};
use strait_proxy_client::xds::{
    self, ClientState, Resources, Validator, XdsClient, XdsClientConfig,
};
use tokio::sync::watch;

pub(crate) const TD: &str = "cluster.local";
/// Generous: two cores shared with other test binaries.
pub(crate) const WAIT: Duration = Duration::from_secs(60);
/// A Service the test proxy refuses (to see a NACK end to end).
pub(crate) const REFUSED: &str = "refuse-me.demo.svc.cluster.local";

/// Writes `data` to `dir/name` atomically (a temporary name the control
/// plane does not read, then rename), as a config management tool would.
pub(crate) fn put(dir: &Path, name: &str, data: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

pub(crate) fn service_yaml(name: &str, port: u32, export: bool) -> String {
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

pub(crate) fn workload_yaml(name: &str, app: &str, address: &str, network: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: demo\n\
spec:\n  address: {address}\n  labels: {{app: {app}}}\n  serviceAccount: {app}\n  network: {network}\n  ports: {{http: 8080}}\n"
    )
}

/// A `strait controlplane` process of one cluster.
pub(crate) struct ControlPlane {
    pub(crate) child: Option<Child>,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) listen: String,
    pub(crate) health: String,
    pub(crate) metrics: String,
    pub(crate) debug: String,
    pub(crate) state: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) log: PathBuf,
}

impl ControlPlane {
    /// The `east` control plane (gateway `192.0.2.10:15443`) in
    /// Kubernetes mode against the API server `kubeconfig` names, with
    /// `extra` flags: how the real-API tests run it.
    pub(crate) fn east_on_kube(
        s: &Scratch,
        broker: &Broker,
        kubeconfig: &Path,
        extra: &[String],
    ) -> Self {
        Self::start_with(
            s,
            broker,
            "east",
            "net-east",
            "192.0.2.10:15443",
            Some(kubeconfig),
            extra,
        )
    }

    /// Joins `cluster` to `broker` (first start) and waits until ready.
    pub(crate) fn start(
        s: &Scratch,
        broker: &Broker,
        cluster: &str,
        network: &str,
        gateway: &str,
    ) -> Self {
        Self::start_with(s, broker, cluster, network, gateway, None, &[])
    }

    /// [`Self::start`] reading the config from the Kubernetes API of
    /// `kubeconfig` (`--kube`) when given, else from a directory.
    pub(crate) fn start_with(
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
            let debug = format!("127.0.0.1:{}", free_port());
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
                    "--debug-listen",
                    &debug,
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
                debug,
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
    pub(crate) fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("{log}");
        }
    }

    /// [`Self::spawn`], or the log when the process exited while starting.
    pub(crate) fn try_spawn(&mut self) -> Result<(), String> {
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
    pub(crate) fn terminate(&mut self) {
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

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn trust_domain(&self) -> TrustDomain {
        TrustDomain::new(TD).unwrap()
    }

    /// The mesh roots, as a sidecar is given them.
    pub(crate) fn trust(&self) -> Trust {
        let root = self.state.join("cacerts/root-cert.pem");
        Trust::new(strait_ca::layout::load_bundle(&root, Some(self.trust_domain())).unwrap())
    }

    /// A bootstrap token from `strait controlplane token`.
    pub(crate) fn token(&self, ns: &str, sa: &str, workload: &str) -> String {
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
    pub(crate) async fn certificate(&self, ns: &str, sa: &str, workload: &str) -> Identity {
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
    pub(crate) fn subscribe(&self, identity: &Identity, workload: &str) -> XdsClient {
        self.subscribe_as(identity, workload, "")
    }

    /// [`Self::subscribe`] for a proxy of `cluster` (node metadata
    /// CLUSTER_ID; empty: the control plane's own).
    pub(crate) fn subscribe_as(
        &self,
        identity: &Identity,
        workload: &str,
        cluster: &str,
    ) -> XdsClient {
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
        xds::spawn(
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

pub(crate) fn services(r: &Resources) -> std::collections::BTreeMap<String, pb::Service> {
    r.decode::<pb::Service>(type_url::SERVICE).unwrap()
}

/// Waits until `f` finds what it wants in the client's resources.
pub(crate) async fn until<T>(
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
pub(crate) async fn until_state(
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

pub(crate) fn has(name: &str) -> impl Fn(&Resources) -> Option<()> + '_ {
    move |r| services(r).contains_key(name).then_some(())
}

/// A strait process a test started: its stderr goes to `<name>.log` in the
/// scratch directory, and it is killed when dropped.
pub(crate) struct Process {
    pub(crate) child: Child,
    name: &'static str,
}

impl Process {
    pub(crate) fn spawn(s: &Scratch, name: &'static str, cmd: &mut Command) -> Self {
        let log = std::fs::File::create(s.path(&format!("{name}.log"))).unwrap();
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting the {name}: {e}"));
        Process { child, name }
    }

    /// Its log so far.
    pub(crate) fn log(&self, s: &Scratch) -> String {
        s.read(&format!("{}.log", self.name))
    }

    /// Waits until its health endpoint `health` reports ready; fails with
    /// its log when it exits first or is not ready within [`WAIT`].
    pub(crate) async fn ready(&mut self, s: &Scratch, health: &str) {
        let deadline = Instant::now() + WAIT;
        while http_status(health, "/healthz/ready") != Some(200) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the {} exited ({status}):\n{}", self.name, self.log(s));
            }
            assert!(
                Instant::now() < deadline,
                "the {} never got ready:\n{}",
                self.name,
                self.log(s)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails with its log if it has exited.
    pub(crate) fn assert_running(&mut self, s: &Scratch) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the {} exited ({status}):\n{}", self.name, self.log(s));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `importer`'s imported objects (the file its control plane
/// writes back) satisfy `check`, or panics naming `what` with the text and
/// `exporter`'s log.
pub(crate) async fn until_imported(
    importer: &ControlPlane,
    exporter: &ControlPlane,
    what: &str,
    check: impl Fn(&str) -> bool,
) {
    let imported = importer.config.join("imported/strait-imports.yaml");
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&imported).unwrap_or_default();
        if check(&text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not so within {WAIT:?}:\n{text}\n{}",
            exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The slim `strait-sidecar` binary. It is the sidecar package's, so
/// cargo builds it next to `strait` when it builds the workspace's tests
/// (`cargo test --workspace`, as `scripts/test.sh` runs them).
pub fn sidecar_exe() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_strait")).with_file_name("strait-sidecar");
    assert!(
        exe.is_file(),
        "{} is not built: run the tests with --workspace, or `cargo build -p strait-sidecar` first",
        exe.display()
    );
    exe
}
