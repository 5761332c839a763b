//! Running a lab: starting and stopping its processes, remembering them in
//! `DIR/run/procs.json` (so that `status`, `kill`, `start` and `down` work
//! from other shells), waiting on health endpoints, and the status table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::plan::Component;

/// Where a running lab keeps its process table.
pub fn run_dir(dir: &Path) -> PathBuf {
    dir.join("run")
}

pub fn logs_dir(dir: &Path) -> PathBuf {
    dir.join("logs")
}

/// A component's log file (`east/gateway` → `logs/east-gateway.log`).
pub fn log_file(dir: &Path, component: &str) -> PathBuf {
    logs_dir(dir).join(format!("{}.log", component.replace('/', "-")))
}

/// One started process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Proc {
    pub pid: u32,
    pub args: Vec<String>,
    pub health: String,
    /// The network namespace it runs in (netns mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// With an `https://` health URL, the CA it is verified with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_ca: Option<PathBuf>,
}

/// The process table of a lab, in start order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Procs {
    /// The `lab up` process.
    pub supervisor: Option<u32>,
    pub order: Vec<String>,
    pub procs: BTreeMap<String, Proc>,
}

impl Procs {
    fn path(dir: &Path) -> PathBuf {
        run_dir(dir).join("procs.json")
    }

    pub fn load(dir: &Path) -> Result<Procs> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Procs::default()),
            Err(e) => Err(anyhow!("{}: {e}", path.display())),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(run_dir(dir))?;
        let path = Self::path(dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

/// Whether process `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|s| s != "Z" && s != "X")
}

/// Sends a signal with kill(1) (the workspace forbids `unsafe`, and a
/// lab has no hot path).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The slim sidecar binary's name (`src/bin/strait-sidecar.rs`).
pub const SIDECAR_BIN: &str = "strait-sidecar";

/// The program and arguments that run `args` (arguments of `strait`).
/// Sidecars run `strait-sidecar` when it sits next to `exe`: it holds only
/// the sidecar's code and idles at about two thirds of the memory of
/// `strait sidecar`. `cargo run -- lab ...` builds only `strait`, so
/// without it they run `strait sidecar`, the same code.
pub fn program<'a>(exe: &Path, args: &'a [String]) -> (PathBuf, &'a [String]) {
    // Another program than strait (etcd, kube-apiserver): its path first.
    if let Some(first) = args.first()
        && first.starts_with('/')
    {
        return (PathBuf::from(first), &args[1..]);
    }
    if args.first().map(String::as_str) == Some("sidecar") {
        let slim = exe.with_file_name(SIDECAR_BIN);
        if slim.is_file() {
            return (slim, &args[1..]);
        }
    }
    (exe.to_path_buf(), args)
}

/// Starts `c` with its output appended to its log file; returns the pid.
/// The child is put in its own process group so that a terminal's ^C
/// reaches only `lab up`, which then stops everything in order.
pub fn spawn(dir: &Path, exe: &Path, c: &Component) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(logs_dir(dir))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file(dir, &c.name))?;
    // In netns mode `ip netns exec` enters the namespace and execs the
    // component: the pid is the component's.
    let (program, args) = program(exe, &c.args);
    let mut cmd = match &c.netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .envs(c.env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", c.name))?;
    Ok(child.id())
}

/// [`http_status`] from inside network namespace `netns` (when given).
/// A component's health: its URL's status code, over TLS verified with
/// `ca` for an `https://` URL (an API server's `/readyz`).
fn health_status(netns: Option<&str>, url: &str, ca: Option<&Path>) -> Option<u16> {
    let timeout = Duration::from_secs(1);
    match (url.strip_prefix("https://"), ca) {
        (Some(rest), Some(ca)) => super::netns::within(netns, || https_status(rest, ca, timeout))
            .ok()
            .flatten(),
        _ => http_status_in(netns, url, timeout),
    }
}

/// HTTPS GET of `host:port/path` (an IP address), the server verified
/// against the CA in `ca` (PEM); the status code.
fn https_status(rest: &str, ca: &Path, timeout: Duration) -> Option<u16> {
    let (addr, hostport, path) = target_of(rest)?;
    let pem = std::fs::read(ca).ok()?;
    let mut roots = rustls::RootCertStore::empty();
    for der in strait_ca::pemfile::parse_certificates(&pem).ok()? {
        roots.add(der.into()).ok()?;
    }
    let config = rustls::ClientConfig::builder_with_provider(strait_ca::tls::provider())
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).ok()?;
    let tcp = connect(addr, timeout)?;
    get_status(rustls::StreamOwned::new(conn, tcp), hostport, &path)
}

/// `host:port/path` split: the address, `host:port`, and `/path`.
fn target_of(rest: &str) -> Option<(std::net::SocketAddr, &str, String)> {
    let (hostport, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    Some((hostport.parse().ok()?, hostport, path))
}

fn connect(addr: std::net::SocketAddr, timeout: Duration) -> Option<std::net::TcpStream> {
    let s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    Some(s)
}

/// `GET path` on `s` (HTTP/1.1, then closed): the status code.
fn get_status(
    mut s: impl std::io::Read + std::io::Write,
    hostport: &str,
    path: &str,
) -> Option<u16> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

pub fn http_status_in(netns: Option<&str>, url: &str, timeout: Duration) -> Option<u16> {
    super::netns::within(netns, || http_status(url, timeout))
        .ok()
        .flatten()
}

/// HTTP GET of `url` (plain `http://host:port/path`); the status code.
pub fn http_status(url: &str, timeout: Duration) -> Option<u16> {
    let (addr, hostport, path) = target_of(url.strip_prefix("http://")?)?;
    get_status(connect(addr, timeout)?, hostport, &path)
}

/// HTTP GET of `url` (plain `http://host:port/path`): the status code and
/// the body (the server closes the connection after it).
pub fn http_get(url: &str, timeout: Duration) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr: std::net::SocketAddr = hostport.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.take(64 << 20).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    // The body has a Content-Length (hyper sizes a String body).
    Some((code, body.to_string()))
}

/// Waits until `c` answers 200 on its health endpoint, failing early when
/// its process exits (with the end of its log).
pub fn wait_healthy(dir: &Path, c: &Component, pid: u32, deadline: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if health_status(c.netns.as_deref(), &c.health, c.health_ca.as_deref()) == Some(200) {
            return Ok(());
        }
        if !alive(pid) {
            bail!(
                "{} exited while starting; the end of its log ({}):\n{}",
                c.name,
                log_file(dir, &c.name).display(),
                tail(&log_file(dir, &c.name), 15)
            );
        }
        if start.elapsed() > deadline {
            bail!(
                "{} not ready within {}s ({}); the end of its log:\n{}",
                c.name,
                deadline.as_secs(),
                c.health,
                tail(&log_file(dir, &c.name), 15)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// SIGTERM, then SIGKILL after `grace`; waits until the process is gone.
pub fn stop(pid: u32, grace: Duration) {
    if !alive(pid) {
        return;
    }
    signal(pid, "TERM");
    let start = Instant::now();
    let mut killed = false;
    while alive(pid) {
        if start.elapsed() > grace && !killed {
            signal(pid, "KILL");
            killed = true;
        }
        if start.elapsed() > grace + Duration::from_secs(5) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL.
pub fn kill9(pid: u32) {
    signal(pid, "KILL");
    let start = Instant::now();
    while alive(pid) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One row of the status table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub component: String,
    pub pid: Option<u32>,
    pub running: bool,
    pub healthy: bool,
}

pub fn status_rows(procs: &Procs) -> Vec<Row> {
    procs
        .order
        .iter()
        .filter_map(|name| procs.procs.get(name).map(|p| (name, p)))
        .map(|(name, p)| {
            let running = alive(p.pid);
            Row {
                component: name.clone(),
                pid: Some(p.pid),
                running,
                healthy: running
                    && health_status(p.netns.as_deref(), &p.health, p.health_ca.as_deref())
                        == Some(200),
            }
        })
        .collect()
}

pub fn print_table(rows: &[Row]) {
    let w = rows
        .iter()
        .map(|r| r.component.len())
        .max()
        .unwrap_or(9)
        .max(9);
    println!("{:<w$}  {:>7}  {:<7}  HEALTH", "COMPONENT", "PID", "STATE");
    for r in rows {
        println!(
            "{:<w$}  {:>7}  {:<7}  {}",
            r.component,
            r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            if r.running { "running" } else { "stopped" },
            if r.healthy { "ready" } else { "NOT READY" },
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_free_pid_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }

    #[test]
    fn log_files_flatten_component_names() {
        assert_eq!(
            log_file(Path::new("/l"), "east/echo-v1/sidecar"),
            PathBuf::from("/l/logs/east-echo-v1-sidecar.log")
        );
    }

    #[test]
    fn sidecars_run_the_slim_binary_when_it_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("strait");
        std::fs::write(&exe, b"").unwrap();
        let args: Vec<String> = ["sidecar", "--workload", "w"].map(String::from).into();
        // Not built: `strait sidecar ...`.
        assert_eq!(program(&exe, &args), (exe.clone(), &args[..]));
        std::fs::write(dir.path().join(SIDECAR_BIN), b"").unwrap();
        assert_eq!(
            program(&exe, &args),
            (dir.path().join(SIDECAR_BIN), &args[1..])
        );
        // Every other component runs `strait`.
        let gw: Vec<String> = ["gateway", "--cluster", "east"].map(String::from).into();
        assert_eq!(program(&exe, &gw), (exe.clone(), &gw[..]));
    }

    #[test]
    fn http_status_of_nothing_is_none() {
        assert_eq!(
            http_status("http://127.0.0.1:1/x", Duration::from_millis(200)),
            None
        );
        assert_eq!(http_status("ftp://x", Duration::from_millis(200)), None);
    }
}
