//! A real Kubernetes API server for the tests: etcd and kube-apiserver,
//! both built from their Go modules at pinned releases by
//! `scripts/tools.sh`, started on loopback in a scratch directory with
//! their own PKI (serving, client and service-account keys made here by
//! openssl), and an admin kubeconfig (`system:masters`).
//!
//! When the tools are missing the tier is skipped with one line saying how
//! to build them; under `CI=true` their absence is a failure.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// How long etcd and the API server may take to become ready on a loaded
/// 2-core machine (the API server installs its built-in objects first).
const READY: Duration = Duration::from_secs(120);

/// The directory `scripts/tools.sh` links the built tools into (the
/// lab's `--kube` looks in the same place).
fn tools_bin() -> PathBuf {
    strait::lab::kube::tools_bin()
}

/// The path of tool `name`, or why the tier cannot run. Under `CI=true`
/// a missing tool panics: CI's `scripts/test.sh` builds them first.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = tools_bin().join(name);
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{} is missing: build it with `bash scripts/tools.sh kube etcd`",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the real Kubernetes tier must run in CI: {why}");
    }
    eprintln!("skipped (real Kubernetes tier): {why}");
    None
}

/// [`tool`] for a tool that `bash scripts/tools.sh TARGET` builds (e.g.
/// `helm`), whose skip line names that target.
pub fn tool_from(name: &str, target: &str) -> Option<PathBuf> {
    let path = tools_bin().join(name);
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{} is missing: build it with `bash scripts/tools.sh {target}`",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the real Kubernetes tier must run in CI: {why}");
    }
    eprintln!("skipped (real Kubernetes tier): {why}");
    None
}

/// A running etcd and kube-apiserver; both killed on drop.
pub struct ApiServer {
    pub url: String,
    /// An admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// The CA that signed the API server's serving certificate.
    pub ca: PathBuf,
    pub dir: PathBuf,
    kubectl: PathBuf,
    etcd: Child,
    apiserver: Child,
    /// etcd's client URL (`http://127.0.0.1:PORT`), for `etcdctl`.
    pub etcd_url: String,
    /// The API server's binary and flags, to start it again
    /// ([`ApiServer::restart`]): same etcd, port and PKI.
    apiserver_cmd: (PathBuf, Vec<String>),
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key and a certificate `name` signed by `ca`, with `subject` and
/// `ext` (an openssl extension section's lines).
fn issue(dir: &Path, name: &str, subject: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-subj",
            subject,
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// Waits until `check` holds, or panics with `what` and the log at `log`.
fn wait_for(what: &str, log: &Path, child: &mut Child, check: impl Fn() -> bool) {
    let start = Instant::now();
    loop {
        if check() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{what} exited ({status}) before it was ready:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < READY,
            "{what} not ready within {READY:?}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `bin ARGS` with its stderr appended to `log`.
fn spawn_logged(bin: &Path, args: &[String], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()))
}

impl ApiServer {
    /// Starts etcd and the API server in `dir`, or `None` when the tools
    /// are not built (see [`tool`]).
    pub fn start(dir: &Path) -> Option<ApiServer> {
        Self::start_with(dir, &[])
    }

    /// [`ApiServer::start`] with more API server flags (`--name=value`);
    /// one that names a flag set here replaces it.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Option<ApiServer> {
        let etcd_bin = tool("etcd")?;
        let apiserver_bin = tool("kube-apiserver")?;
        let kubectl = tool("kubectl")?;
        std::fs::create_dir_all(dir).unwrap();
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        openssl(
            &pki,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-subj",
                "/CN=strait-test-kubernetes-ca",
                "-days",
                "2",
                "-out",
                "ca.crt",
            ],
        );
        issue(
            &pki,
            "serving",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n\
             extendedKeyUsage=serverAuth\n",
        );
        issue(
            &pki,
            "admin",
            "/O=system:masters/CN=strait-test-admin",
            "extendedKeyUsage=clientAuth\n",
        );
        openssl(
            &pki,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "sa.key",
            ],
        );
        openssl(
            &pki,
            &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
        );

        let etcd_client = free_port();
        let etcd_peer = free_port();
        let etcd_log = dir.join("etcd.log");
        let mut etcd = Command::new(&etcd_bin)
            .args([
                "--name",
                "test",
                "--data-dir",
                dir.join("etcd").to_str().unwrap(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{etcd_client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{etcd_client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{etcd_peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{etcd_peer}"),
                "--initial-cluster",
                &format!("test=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&etcd_log).unwrap())
            .spawn()
            .expect("start etcd");
        let etcd_health = format!("127.0.0.1:{etcd_client}");
        wait_for("etcd", &etcd_log, &mut etcd, || {
            super::http_status(&etcd_health, "/health") == Some(200)
        });

        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let log = dir.join("kube-apiserver.log");
        let p = |f: &str| pki.join(f).to_str().unwrap().to_string();
        let mut args: Vec<String> = [
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", p("serving.crt")),
            format!("--tls-private-key-file={}", p("serving.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--authorization-mode=Node,RBAC".into(),
            // An address range handed to Services: nothing is ever
            // sent to it.
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            format!("--cert-dir={}", dir.join("certs").display()),
        ]
        .into_iter()
        .filter(|a| {
            let name = a.split('=').next().unwrap_or_default();
            !extra.iter().any(|e| e.split('=').next() == Some(name))
        })
        .collect();
        args.extend(extra.iter().map(|e| e.to_string()));
        let mut apiserver = spawn_logged(&apiserver_bin, &args, &log);
        let kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\n\
contexts:\n- name: test\n  context: {{cluster: test, user: admin, namespace: default}}\ncurrent-context: test\n\
users:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\n",
                p("ca.crt"),
                p("admin.crt"),
                p("admin.key")
            ),
        )
        .unwrap();
        let ready = || {
            Command::new(&kubectl)
                .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
                .args(["get", "--raw", "/readyz"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        wait_for("kube-apiserver", &log, &mut apiserver, ready);
        Some(ApiServer {
            url,
            kubeconfig,
            ca: pki.join("ca.crt"),
            dir: dir.to_path_buf(),
            kubectl,
            etcd,
            apiserver,
            etcd_url: format!("http://127.0.0.1:{etcd_client}"),
            apiserver_cmd: (apiserver_bin, args),
        })
    }

    /// Runs `kubectl ARGS...` as the admin, returning (exit code, stdout,
    /// stderr).
    pub fn kubectl(&self, args: &[&str]) -> (i32, String, String) {
        self.kubectl_with(args, None)
    }

    /// [`ApiServer::kubectl`] with `stdin` fed to it (`apply -f -`).
    pub fn kubectl_with(&self, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .args(["--kubeconfig", self.kubeconfig.to_str().unwrap()])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kubectl apply -f -` of `yaml`, which must succeed.
    #[track_caller]
    pub fn apply(&self, yaml: &str) {
        let (code, out, err) =
            self.kubectl_with(&["apply", "--server-side", "-f", "-"], Some(yaml));
        assert_eq!(code, 0, "kubectl apply:\n{out}{err}\n---\n{yaml}");
    }

    /// `kubectl get ARGS -o json`, parsed; `None` when kubectl fails (not
    /// found).
    pub fn get(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend(["-o", "json"]);
        let (code, out, _) = self.kubectl(&a);
        (code == 0).then(|| serde_json::from_str(&out).unwrap())
    }

    /// Waits until `kubectl get ARGS -o json` gives an object `check`
    /// accepts, and returns it.
    #[track_caller]
    pub fn wait_get(
        &self,
        args: &[&str],
        within: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Some(v) = self.get(args) {
                if check(&v) {
                    return v;
                }
                last = Some(v);
            }
            assert!(
                start.elapsed() < within,
                "kubectl get {args:?}: never as expected within {within:?}; last: {}",
                last.map(|v| v.to_string())
                    .unwrap_or_else(|| "not found".into())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A projected service-account token for `namespace/account` with
    /// `audience`, lasting `seconds` (the API server's TokenRequest, as
    /// the kubelet asks for a pod's).
    pub fn token(&self, namespace: &str, account: &str, audience: &str, seconds: u32) -> String {
        let (code, out, err) = self.kubectl(&[
            "create",
            "token",
            account,
            "-n",
            namespace,
            "--audience",
            audience,
            "--duration",
            &format!("{seconds}s"),
        ]);
        assert_eq!(code, 0, "kubectl create token: {err}");
        out.trim().to_string()
    }

    /// Installs the Istio and MCS CRDs the project tests its objects
    /// against, and waits until the API server serves them.
    pub fn install_crds(&self) {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/testdata/crds");
        for file in [
            "istio-crds.gen.yaml",
            "multicluster.x-k8s.io_serviceexports.yaml",
            "multicluster.x-k8s.io_serviceimports.yaml",
        ] {
            let (code, out, err) = self.kubectl(&[
                "apply",
                "--server-side",
                "-f",
                crds.join(file).to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "install {file}:\n{out}{err}");
        }
        let (code, out, err) = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ]);
        assert_eq!(code, 0, "CRDs not established:\n{out}{err}");
    }
}

/// Faults: the API server stopped and started again (same etcd, port and
/// PKI), and etcd's history compacted away.
impl ApiServer {
    /// Stops the API server as a crash does: SIGKILL, no goodbye to its
    /// clients (a graceful stop waits out their open watches, tens of
    /// seconds). etcd keeps running.
    pub fn stop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
    }

    /// Starts the API server again with the flags it had (its log goes on
    /// in the same file), and waits until it is ready.
    pub fn restart(&mut self) {
        let (bin, args) = &self.apiserver_cmd;
        let log = self.dir.join("kube-apiserver.log");
        self.apiserver = spawn_logged(bin, args, &log);
        let (kubectl, kubeconfig) = (self.kubectl.clone(), self.kubeconfig.clone());
        wait_for(
            "kube-apiserver (restarted)",
            &log,
            &mut self.apiserver,
            || {
                Command::new(&kubectl)
                    .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
                    .args(["get", "--raw", "/readyz"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    /// `etcdctl ARGS` against this etcd: its stdout, which must succeed.
    #[track_caller]
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let bin = tool("etcdctl").expect("etcdctl is built with etcd");
        let out = Command::new(bin)
            .args(["--endpoints", &self.etcd_url])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// etcd's current revision (every resource version the API server
    /// hands out is one).
    pub fn etcd_revision(&self) -> u64 {
        let status: serde_json::Value =
            serde_json::from_str(&self.etcdctl(&["endpoint", "status", "-w", "json"])).unwrap();
        status[0]["Status"]["header"]["revision"]
            .as_u64()
            .unwrap_or_else(|| panic!("no revision in {status}"))
    }

    /// Compacts etcd's history up to its current revision: a watch from
    /// an older resource version is then answered 410 Gone ("too old
    /// resource version"). Returns the revision compacted to.
    pub fn compact(&self) -> u64 {
        let revision = self.etcd_revision();
        self.etcdctl(&["compact", &revision.to_string(), "--physical"]);
        revision
    }
}

/// Other identities than the admin's.
impl ApiServer {
    /// Writes a kubeconfig to `path` for this API server (its URL and CA,
    /// as in the admin kubeconfig) that authenticates as the
    /// ServiceAccount `namespace/account` with a bearer token from
    /// TokenRequest for the API server's own audience, lasting `seconds`:
    /// what a pod running as that account is given.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        account: &str,
        seconds: u32,
        path: &Path,
    ) -> PathBuf {
        let (code, out, err) = self.kubectl(&[
            "create",
            "token",
            account,
            "-n",
            namespace,
            "--duration",
            &format!("{seconds}s"),
        ]);
        assert_eq!(code, 0, "kubectl create token {namespace}/{account}: {err}");
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
contexts:\n- name: test\n  context: {{cluster: test, user: {account}, namespace: {namespace}}}\ncurrent-context: test\n\
users:\n- name: {account}\n  user:\n    token: {}\n",
                self.url,
                self.ca.display(),
                out.trim()
            ),
        )
        .unwrap();
        path.to_path_buf()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}
