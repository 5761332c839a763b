//! A one-member etcd on loopback for tests (the binary `bash
//! scripts/tools.sh etcd` builds), shared by `broker/tests/store.rs` and
//! the root package's tests (`#[path]`-included).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strait_broker::store::etcd::{EtcdConfig, EtcdStore};

/// The etcd binary `scripts/tools.sh etcd` builds, or `None` (with
/// one line saying why; under `CI=true` a failure).
pub fn etcd_binary() -> Option<PathBuf> {
    let bin = std::env::var_os("STRAIT_TOOLS")
        .map(|d| PathBuf::from(d).join("bin"))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/strait/tools/bin")
        })
        .join("etcd");
    if bin.is_file() {
        return Some(bin);
    }
    let why = format!(
        "{} is missing: build it with `bash scripts/tools.sh etcd`",
        bin.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the etcd store must be tested in CI: {why}");
    }
    eprintln!("skipped (etcd store): {why}");
    None
}

/// A one-member etcd on loopback, killed on drop.
pub struct Etcd {
    child: Child,
    pub client: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Runs `etcdctl ARGS` (the one beside the etcd binary) against this
    /// member; panics with its output when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let bin = etcd_binary().unwrap().with_file_name("etcdctl");
        let out = Command::new(&bin)
            .arg(format!("--endpoints=http://{}", self.client))
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

    pub fn start() -> Option<Etcd> {
        let bin = etcd_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let client = format!("127.0.0.1:{client}");
        let peer = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new(bin)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--name", "m0"])
            .arg(format!("--listen-client-urls=http://{client}"))
            .arg(format!("--advertise-client-urls=http://{client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=m0={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let etcd = Etcd {
            child,
            client,
            _dir: dir,
        };
        // Ready when a store opens on it.
        let start = Instant::now();
        loop {
            let config = EtcdConfig::parse(&format!("etcd://{}", etcd.client), "ready").unwrap();
            if EtcdStore::open(config).is_ok() {
                return Some(etcd);
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
