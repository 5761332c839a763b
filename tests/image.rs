//! The strait image, built here with Docker by `scripts/image.sh` (the
//! base from Debian's packages by debootstrap, the binaries this test run
//! built, no registry): what it ships and runs as, and `strait-sidecar`
//! from it getting its certificate and config from a real control plane on
//! the host (the container on the host's network, loopback only), then
//! stopping cleanly on SIGTERM.
//!
//! Needs root (apt, dockerd, debootstrap); skipped with one line when not
//! root or when docker.io or debootstrap are neither here nor installable,
//! except under `CI=true`, where that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "controlplane/support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Broker, Scratch, free_port, http_get, http_status};
use support::{ControlPlane, TD, sidecar_exe};

/// The tag this test builds (its own: a user's `strait:dev` stays).
const TAG: &str = "strait:image-test";
/// The sidecar's first certificate and config, on a loaded 2-core machine.
const READY: Duration = Duration::from_secs(60);

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why the image cannot be built here, if it cannot.
fn unavailable() -> Option<String> {
    if !sh("[ \"$(id -u)\" -eq 0 ]") {
        return Some("not root (apt, dockerd and debootstrap need root)".into());
    }
    for (tool, package) in [("dockerd", "docker.io"), ("debootstrap", "debootstrap")] {
        let here = sh(&format!("command -v {tool}"));
        if !here && !sh(&format!("apt-cache show --no-all-versions {package}")) {
            return Some(format!("{tool} is missing and apt has no {package}"));
        }
    }
    None
}

/// `None` (after one line saying why) when the image cannot be built
/// here; under `CI=true` that is a failure.
fn available() -> Option<()> {
    let Some(why) = unavailable() else {
        return Some(());
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the image test must run in CI: {why}");
    }
    eprintln!("skipped (image): {why}");
    None
}

/// `docker ARGS...`: stdout, or a panic with both streams.
#[track_caller]
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(
        out.status.success(),
        "docker {}: {}\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The test's image, removed on drop (its layer is the binaries: about
/// 120 MB stripped debug builds).
struct Image(&'static str);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", self.0]).output();
    }
}

/// A container, removed (killed if still running) on drop, also when the
/// test fails.
struct Container(String);

impl Container {
    fn logs(&self) -> String {
        let out = Command::new("docker")
            .args(["logs", &self.0])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

/// Builds [`TAG`] with `scripts/image.sh` from the binaries cargo built
/// for this test run (dev profile, next to `strait`).
fn build_image() -> Image {
    let bins: PathBuf = sidecar_exe().parent().unwrap().to_path_buf();
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh"))
        .arg(TAG)
        .env("STRAIT_BIN_DIR", &bins)
        .output()
        .expect("bash scripts/image.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/image.sh: {}\n{stderr}",
        out.status
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), TAG, "{stderr}");
    for line in stderr.lines().filter(|l| l.starts_with("==>")) {
        eprintln!("image.sh {line}");
    }
    eprintln!("image: scripts/image.sh took {:?}", start.elapsed());
    Image(TAG)
}

#[test]
fn image_ships_the_binaries_and_runs_a_sidecar_against_a_host_control_plane() {
    if available().is_none() {
        return;
    }
    let image = build_image();
    let version = env!("CARGO_PKG_VERSION");

    // The entrypoint is `strait`; the image runs as 65532 and has the
    // tools the manifests use (curl through a sidecar, iptables in the
    // transparent mode's init container).
    let out = docker(&["run", "--rm", "--network", "none", image.0, "--version"]);
    assert_eq!(out, format!("strait {version}\n"));
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        image.0,
        "-c",
        "id -u; id -g; straitctl --version; strait-sidecar --version; \
         curl --version | head -n 1; iptables --version",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "65532",
            "65532",
            &format!("straitctl {version}"),
            &format!("strait-sidecar {version}")
        ],
        "{out}"
    );
    assert!(lines[4].starts_with("curl "), "{out}");
    assert!(lines[5].starts_with("iptables "), "{out}");

    // A real broker and control plane on the host's loopback; the
    // sidecar in the container reaches them on the host's network.
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let cp = ControlPlane::start(&s, &broker, "east", "net-east", "192.0.2.10:15443");
    let token = s.write("sidecar/token", &cp.token("demo", "echo", "echo-v1"));
    let root = s.path("sidecar/root-cert.pem");
    std::fs::copy(cp.state.join("cacerts/root-cert.pem"), &root).unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let name = format!("strait-image-test-{}", std::process::id());
    let mounts = [
        format!("{}:/var/run/strait/token:ro", token.display()),
        format!("{}:/var/run/strait/root-cert.pem:ro", root.display()),
    ];
    let inbound = format!("127.0.0.1:{}", free_port());
    let outbound = format!("127.0.0.1:{}", free_port());
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "-v",
        &mounts[0],
        "-v",
        &mounts[1],
        "--entrypoint",
        "strait-sidecar",
        image.0,
        "--workload",
        "echo-v1",
        "--namespace",
        "demo",
        "--control-plane",
        &cp.listen,
        "--token",
        "/var/run/strait/token",
        "--root-cert",
        "/var/run/strait/root-cert.pem",
        "--inbound",
        &inbound,
        "--outbound",
        &outbound,
        "--health-listen",
        &health,
    ]);
    let container = Container(name);

    let start = Instant::now();
    let mut live = false;
    loop {
        live |= http_status(&health, "/healthz/live") == Some(200);
        if live && http_status(&health, "/healthz/ready") == Some(200) {
            break;
        }
        assert!(
            start.elapsed() < READY,
            "sidecar in {TAG} not ready within {READY:?} (live: {live}; /healthz/ready: {:?})\n{}\ncontrol plane:\n{}",
            http_status(&health, "/healthz/ready").map(|_| http_get(&health, "/healthz/ready")),
            container.logs(),
            cp.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("image: sidecar ready after {:?}", start.elapsed());

    // SIGTERM to the container's PID 1, the sidecar: it drains and exits 0.
    docker(&["stop", "-t", "20", &container.0]);
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &container.0]);
    assert_eq!(code.trim(), "0", "{}", container.logs());
}
