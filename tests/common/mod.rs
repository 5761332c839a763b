//! Helpers for the end-to-end tests: run the real `strait` binary and real
//! tools (openssl) in a scratch directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod envoy;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod sync;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The output of one command, with the checks tests need.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Run {
    pub fn from(what: String, out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            what,
        }
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "{} failed\nstdout:\n{}\nstderr:\n{}",
            self.what, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails_with(self, code: i32, needle: &str) -> Self {
        assert_eq!(
            self.code, code,
            "{}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.what, self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle) || self.stdout.contains(needle),
            "{}: expected {needle:?} in the output\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A scratch directory in which commands run.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, data: &str) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, data).unwrap();
        p
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    /// A root in `root/` for trust domain `td` and a cluster intermediate
    /// (Istio plug-in CA layout) in a directory named after each cluster.
    pub fn pki(&self, td: &str, clusters: &[&str]) {
        self.strait(&["ca", "init-root", "--trust-domain", td, "--out", "root"])
            .ok();
        for c in clusters {
            self.strait(&[
                "ca",
                "issue-intermediate",
                "--root",
                "root",
                "--cluster",
                c,
                "--out",
                c,
            ])
            .ok();
        }
    }

    /// Runs `strait ARGS...` here.
    pub fn strait(&self, args: &[&str]) -> Run {
        self.run(env!("CARGO_BIN_EXE_strait"), args)
    }

    /// Runs `openssl ARGS...` here. The tests need the real openssl: its
    /// absence is a failure (the test script installs it), not a skip.
    pub fn openssl(&self, args: &[&str]) -> Run {
        self.run("openssl", args)
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Run {
        let out = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed?)"));
        Run::from(format!("{program} {}", args.join(" ")), out)
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// A free loopback port (bound and released; the race with other
/// processes is acceptable for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` on `addr`; the HTTP status code, or None if unreachable.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// GET `path` on `addr`: the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// A real `strait broker` process on loopback.
pub struct Broker {
    child: std::process::Child,
    pub addr: String,
    pub health: String,
    pub metrics: String,
    pub data: PathBuf,
    pub trust_domain: String,
}

impl Broker {
    /// Polls `straitctl trust rotate-root status -o json` until `check`
    /// holds, for up to `within`; every call must work (the broker's own
    /// credentials move while both roots are trusted).
    pub async fn wait_rotation(
        &self,
        what: &str,
        within: std::time::Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let run = self
                .ctl(&["trust", "rotate-root", "status", "-o", "json"])
                .ok();
            let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
            if check(&v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not reached in {within:?}: {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The root certificate file of the root a rotation made (the one
    /// directory under DATA/roots).
    pub fn rotation_root(&self) -> PathBuf {
        std::fs::read_dir(self.data.join("roots"))
            .unwrap()
            .next()
            .expect("a rotation root")
            .unwrap()
            .path()
            .join("root-cert.pem")
    }

    pub fn start(data: &Path, trust_domain: &str) -> Self {
        // A port picked free can be taken (by another test's outgoing
        // connection) before the broker binds it: pick again.
        for attempt in 1.. {
            let addr = format!("127.0.0.1:{}", free_port());
            match Self::try_start(data, trust_domain, &addr, &[]) {
                Ok(b) => return b,
                Err(log) if attempt < 5 && log.contains("Address already in use") => {}
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Starts on a given address (to restart a killed broker in place) and
    /// waits until its health endpoint says ready.
    pub fn start_at(data: &Path, trust_domain: &str, addr: &str) -> Self {
        Self::start_with(data, trust_domain, addr, &[])
    }

    /// Starts with extra `strait broker` arguments.
    /// Makes a root for `trust_domain` in `dir` with `strait ca init-root`
    /// (what replicas on etcd are given with `--root`).
    pub fn init_root(dir: &Path, trust_domain: &str) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
            .args(["ca", "init-root", "--trust-domain", trust_domain, "--out"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "strait ca init-root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_with(data: &Path, trust_domain: &str, addr: &str, extra: &[&str]) -> Self {
        // The health and metrics ports are picked here: a lost race for one
        // of them (not for `addr`, the caller's) is retried on new ones.
        for attempt in 1.. {
            match Self::try_start(data, trust_domain, addr, extra) {
                Ok(b) => return b,
                Err(log)
                    if attempt < 5
                        && log.contains("Address already in use")
                        && !log.contains(&format!("{addr} ")) => {}
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Starts the broker and waits until it is ready, or returns what it
    /// logged when it exited while starting.
    fn try_start(
        data: &Path,
        trust_domain: &str,
        addr: &str,
        extra: &[&str],
    ) -> Result<Self, String> {
        let health = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let log_path = data.with_extension("log");
        let logged_before = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_strait"))
            .args([
                "broker",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                addr,
                "--trust-domain",
                trust_domain,
                "--health-listen",
                &health,
                "--metrics-listen",
                &metrics,
            ])
            .args(extra)
            .env("RUST_LOG", "strait_broker=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start strait broker");
        let mut b = Broker {
            child,
            addr: addr.to_string(),
            health,
            metrics,
            data: data.to_path_buf(),
            trust_domain: trust_domain.to_string(),
        };
        b.wait_ready(logged_before)?;
        Ok(b)
    }

    /// Waits until ready; when the broker exits first, what it logged
    /// after `logged_before` bytes.
    fn wait_ready(&mut self, logged_before: u64) -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read(self.data.with_extension("log")).unwrap_or_default();
                let start = usize::try_from(logged_before).unwrap_or(0).min(log.len());
                return Err(format!(
                    "broker exited with {status}: {}",
                    String::from_utf8_lossy(&log[start..])
                ));
            }
            if http_status(&self.health, "/healthz/ready") == Some(200) {
                return Ok(());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "broker not ready within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn admin_creds(&self) -> PathBuf {
        self.data.join("admin")
    }

    /// Runs `straitctl ARGS` against this broker with its admin credentials.
    pub fn ctl(&self, args: &[&str]) -> Run {
        self.ctl_with(&self.admin_creds(), args)
    }

    pub fn ctl_with(&self, creds: &Path, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_straitctl"))
            .args(args)
            .env("STRAIT_BROKER", &self.addr)
            .env("STRAIT_CREDS", creds)
            .output()
            .unwrap();
        Run::from(format!("straitctl {}", args.join(" ")), out)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether every cluster of a rotation status (`-o json`) has `field` set.
pub fn all_clusters(v: &serde_json::Value, field: &str) -> bool {
    let c = v["clusters"].as_array().unwrap();
    !c.is_empty() && c.iter().all(|c| c[field] == true)
}
