//! The `strait lab` harness of the end-to-end tests (`tests/lab.rs`,
//! `tests/faults.rs`): a lab brought up with `strait lab up`, driven with
//! `strait lab` and `straitctl` as a user drives them, stopped and checked
//! clean on drop. Included with `#[path]` by each of them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const STRAIT: &str = env!("CARGO_BIN_EXE_strait");
pub const STRAITCTL: &str = env!("CARGO_BIN_EXE_straitctl");
/// How long a lab may take to come up on a loaded 2-core CI machine.
pub const UP: Duration = Duration::from_secs(180);

/// A running `strait lab up`; stopped (and checked clean) on drop.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub up: Child,
}

pub fn strait(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(STRAIT).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Lab {
    pub fn up(topology: &str, base: u8) -> Lab {
        Self::up_with(topology, base, &[])
    }

    /// [`Lab::up`] with more `lab up` arguments.
    pub fn up_with(topology: &str, base: u8, extra: &[&str]) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let lab_dir = dir.path().join("lab");
        let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
        let up = Command::new(STRAIT)
            .args([
                "lab",
                "up",
                "--topology",
                topology,
                "--ip-base",
                &base.to_string(),
                "--dir",
            ])
            .arg(&lab_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lab = Lab { dir, up };
        let start = Instant::now();
        loop {
            if let Some(status) = lab.up.try_wait().unwrap() {
                panic!(
                    "lab up exited ({status}) before it was ready:\n{}",
                    std::fs::read_to_string(lab.dir.path().join("up.log")).unwrap_or_default()
                );
            }
            let up_log = std::fs::read_to_string(lab.dir.path().join("up.log")).unwrap_or_default();
            if up_log.contains("Running until SIGINT/SIGTERM") {
                break;
            }
            assert!(start.elapsed() < UP, "lab not up within {UP:?}:\n{up_log}");
            std::thread::sleep(Duration::from_millis(200));
        }
        lab
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("lab")
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.path().join("lab.json")).unwrap())
            .unwrap()
    }

    /// `cluster`'s entry of lab.json.
    pub fn cluster(&self, cluster: &str) -> Value {
        let json = self.json();
        json["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == cluster)
            .unwrap_or_else(|| panic!("no cluster {cluster} in lab.json"))
            .clone()
    }

    /// The metrics URL of `cluster`'s east-west gateway.
    pub fn gateway_metrics(&self, cluster: &str) -> String {
        self.cluster(cluster)["gateway"]["metrics"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// In the federated lab: east's client (mesh-a) reaches west's echo
    /// (mesh-b) by its clusterset name and keeps its own trust domain's
    /// identity on the way.
    pub fn assert_east_reaches_the_other_mesh(&self) {
        let seen = self.curl_until(
            "east",
            "http://echo.demo.svc.clusterset.local:8080/",
            10,
            |t| t.contains("west/echo/v2"),
        );
        assert!(
            seen.contains("spiffe://mesh-a.local/ns/demo/sa/client"),
            "{seen}"
        );
    }

    pub fn lab(&self, args: &[&str]) -> (i32, String, String) {
        let mut a = vec!["lab"];
        a.extend_from_slice(args);
        let dir = self.path();
        a.extend(["--dir", dir.to_str().unwrap()]);
        strait(&a)
    }

    /// `lab curl` until `check` accepts the summary, or a deadline.
    pub fn curl_until(
        &self,
        cluster: &str,
        url: &str,
        n: u32,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let (_, out, err) = self.lab(&["curl", cluster, url, "-n", &n.to_string()]);
            let text = format!("{out}{err}");
            if check(&text) {
                return text;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "curl {cluster} {url} never gave the expected answers; last:\n{text}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.path().join("logs")) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                out.push_str(&format!("--- {}\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    pub fn pids(&self) -> Vec<u32> {
        let procs: Value = serde_json::from_str(
            &std::fs::read_to_string(self.path().join("run/procs.json")).unwrap_or_default(),
        )
        .unwrap_or(Value::Null);
        procs["procs"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|p| p["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn down(&mut self) {
        let pids = self.pids();
        let (code, out, err) = self.lab(&["down"]);
        assert_eq!(code, 0, "lab down: {out}{err}");
        let _ = self.up.wait();
        for pid in pids {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
                "pid {pid} survived lab down"
            );
        }
    }
}

pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(STRAIT)
            .args(["lab", "down", "--dir"])
            .arg(self.path())
            .output();
        let _ = self.up.kill();
        let _ = self.up.wait();
    }
}

/// `strait lab demo ARGS --dir <new>` must exit 0 with every step passed;
/// its output.
pub fn demo_passes(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(STRAIT)
        .args(["lab", "demo"])
        .args(args)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("8 of 8 steps passed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    text
}

/// A file of `examples/lab/` (the objects the README's tour applies).
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/lab")
        .join(name)
}

pub fn ports_free(addrs: &[String]) -> Result<(), String> {
    for a in addrs {
        if std::net::TcpListener::bind(a.as_str()).is_err() {
            return Err(format!("{a} is still bound"));
        }
    }
    Ok(())
}

/// A metric's value from a Prometheus text endpoint (0 when absent).
pub fn metric(url: &str, name_and_labels: &str) -> f64 {
    let out = Command::new("curl").args(["-s", url]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}
