//! `strait lab`: a whole federation on one machine. Every component is its
//! own process of this binary (brokers, control planes, gateways, echo
//! workloads, sidecars); the lab directory holds their state, logs, the
//! process table and `lab.json`.

mod client;
mod components;
pub mod demo;
pub mod echo;
pub mod kube;
pub mod netns;
pub mod objects;
pub mod plan;
pub mod run;
mod up;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};

pub use components::components;
use plan::{Lab, Mode, NAMESPACE, Topology};
use run::Procs;
pub use up::bring_up;
pub(crate) use up::check_not_running;
use up::{start_component, up};

pub use client::{CurlSummary, curl, proxy_get, proxy_get_h2, websocket_echo};

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  strait lab up                      # multi-primary, in ./.strait-lab\n  \
strait lab status\n  strait lab curl east http://echo.demo:8080/ -n 20\n  \
strait lab up --netns &             # root: clusters in network namespaces\n  \
strait lab partition east west; strait lab heal\n  \
straitctl --lab .strait-lab exports list\n  strait lab kill east/gateway\n  strait lab down"
)]
pub struct LabArgs {
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Debug, Clone, Args)]
pub struct DirArg {
    /// The lab directory.
    #[arg(long, default_value = ".strait-lab", env = "STRAIT_LAB")]
    pub dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Start a lab and run it in the foreground until SIGINT/SIGTERM.
    #[command(
        after_help = "Examples:\n  strait lab up &                                   # multi-primary in ./.strait-lab\n  \
strait lab up --topology federated --mode quic --dir /tmp/fed &\n  \
strait lab up --ip-base 30 --dir /tmp/lab2 &       # a second lab beside the first\n  \
strait lab up --cert-ttl 30s &                     # renewals within a minute\n  \
strait lab up --kube &                             # each cluster with its own kube-apiserver"
    )]
    Up(UpArgs),
    /// Table of the lab's components and their health (exit 0 only when all are ready).
    #[command(
        after_help = "Example:\n  strait lab status\n  until strait lab status >/dev/null; do sleep 1; done   # wait for ready"
    )]
    Status(DirArg),
    /// Stop a running lab (every process it started).
    #[command(after_help = "Example:\n  strait lab down --dir /tmp/fed")]
    Down(DirArg),
    /// SIGKILL one component, e.g. `broker`, `east/gateway`, `east/controlplane`.
    #[command(
        after_help = "Example:\n  strait lab kill west/gateway\n  strait lab curl east http://echo.demo:8080/ -n 20   # answered in east\n  strait lab start west/gateway"
    )]
    Kill {
        component: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Start one (killed) component again.
    #[command(after_help = "Example:\n  strait lab start west/gateway")]
    Start {
        component: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Print a component's log.
    #[command(
        after_help = "Example:\n  strait lab logs east/controlplane\n  strait lab logs east/client/sidecar | grep 'config applied'"
    )]
    Logs {
        component: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Apply Kubernetes-style YAML objects to a cluster, like `kubectl
    /// apply -f`: an object replaces the one of the same kind, namespace
    /// and name (whichever file it came from). Waits until the cluster's
    /// control plane has read them and fails, with its reason, for an
    /// object it rejected (whose last good version stays in force).
    #[command(
        after_help = "Example:\n  strait lab apply east examples/lab/subsets.yaml\n  \
strait lab apply west examples/lab/subsets.yaml\n  \
strait lab apply east examples/lab/split.yaml     # VirtualService demo/echo created"
    )]
    Apply {
        cluster: String,
        file: PathBuf,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Delete a file's objects from a cluster by kind, namespace and name
    /// (like `kubectl delete -f`); waits until the control plane has
    /// dropped them.
    #[command(
        after_help = "Example:\n  strait lab delete east examples/lab/split.yaml   # VirtualService demo/echo deleted"
    )]
    Delete {
        cluster: String,
        file: PathBuf,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Cut the WAN link between two clusters (netns mode).
    #[command(
        after_help = "Example:\n  strait lab up --netns &\n  strait lab apply east examples/lab/failover.yaml\n  \
strait lab partition east west\n  strait lab curl east http://echo.demo:8080/ -n 20   # all answered in east\n  strait lab heal"
    )]
    Partition {
        a: String,
        b: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Restore every link `partition` cut (netns mode).
    #[command(after_help = "Example:\n  strait lab heal")]
    Heal(DirArg),
    /// Send N requests from a cluster's client through its sidecar and
    /// summarise the answers.
    #[command(
        after_help = "Example:\n  strait lab curl east http://echo.demo:8080/ -n 20\n  \
strait lab curl east http://echo.demo.svc.clusterset.local:8080/   # federated: the other mesh\n  \
strait lab curl east http://echo.demo:8080/ -n 10 --timeout 2s     # under a partition"
    )]
    Curl {
        cluster: String,
        url: String,
        #[arg(short = 'n', default_value_t = 1)]
        n: u32,
        /// How long each request may wait for its answer; one that gets
        /// none is counted as timed out and the next is sent.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::cli::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        dir: DirArg,
    },
    /// The demo workload: answers every request with who answered and who asked.
    #[command(
        after_help = "Example:\n  strait lab echo --listen 127.0.0.1:8080 --cluster east --service echo --version v1 --workload echo-1 &\n  curl http://127.0.0.1:8080/   # {\"cluster\":\"east\",\"service\":\"echo\",...}"
    )]
    Echo(echo::EchoArgs),
    /// Bring labs up, tour them (cross-cluster identity, weighted split,
    /// authorization, failover, rotation, federation), tear them down.
    #[command(
        after_help = "Example:\n  strait lab demo --dir /tmp/demo   # exit 0 when every step passed"
    )]
    Demo {
        #[command(flatten)]
        dir: DirArg,
        /// First address block (see `lab up --ip-base`).
        #[arg(long, default_value_t = 10)]
        ip_base: u8,
        /// Run the demo's labs in Kubernetes mode (see `lab up --kube`).
        #[arg(long)]
        kube: bool,
    },
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[arg(long, value_enum, default_value = "multi-primary")]
    pub topology: Topology,
    #[arg(long, value_enum, default_value = "sni")]
    pub mode: Mode,
    /// Run each cluster in its own network namespace on a shared WAN
    /// bridge (needs root and iproute2); then `partition`/`heal` cut and
    /// restore links between clusters.
    #[arg(long)]
    pub netns: bool,
    /// First address block: brokers in 127.BASE.0.0/16, clusters in the
    /// blocks after it (127.BASE+1.0.0/16, ...); another base runs a
    /// second lab beside the first.
    #[arg(long, default_value_t = 10)]
    pub ip_base: u8,
    /// The certificate lifetime sidecars and gateways ask for (default:
    /// theirs, 24h). A short one (e.g. 30s) makes renewals, and a root
    /// rotation's `finish`, reachable within minutes.
    #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
    pub cert_ttl: Option<std::time::Duration>,
    /// Start the brokers with --bind-identities-to-clusters: a workload
    /// identity issued by one cluster's intermediate is accepted only if
    /// that cluster runs it.
    #[arg(long)]
    pub bind_identities: bool,
    /// Give each cluster its own Kubernetes API server (etcd and
    /// kube-apiserver on loopback, built once by `bash scripts/tools.sh
    /// etcd kube`): the control planes run in Kubernetes mode against
    /// them, the demo's Services and Pods are objects
    /// there, imports land there as ServiceEntries, and `lab apply` goes
    /// there. `lab.json` names each cluster's kubeconfig.
    #[arg(long)]
    pub kube: bool,
    /// Highly available brokers: a 3-member etcd (`etcd-0`..`etcd-2`)
    /// and 2 broker replicas (`broker-0`, `broker-1`; `--ha 3` for three)
    /// keeping the mesh's state in it, one of them leading. `lab kill` /
    /// `lab start` take those names; `straitctl --lab DIR status` shows
    /// which leads. Needs etcd (`bash scripts/tools.sh etcd`) and a strait
    /// built with `--features etcd`.
    #[arg(long, value_name = "REPLICAS", num_args = 0..=1, default_missing_value = "2")]
    pub ha: Option<usize>,
    #[command(flatten)]
    pub dir: DirArg,
}

pub fn run(args: LabArgs) -> Result<()> {
    match args.command {
        LabCommand::Echo(a) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(echo::serve(a, crate::cli::broker::shutdown_signal()))
        }
        LabCommand::Up(a) => up(a),
        LabCommand::Demo { dir, ip_base, kube } => demo::demo(&absolute(&dir.dir)?, ip_base, kube),
        LabCommand::Status(d) => status(&d.dir),
        LabCommand::Down(d) => down(&d.dir),
        LabCommand::Kill { component, dir } => kill(&dir.dir, &component),
        LabCommand::Start { component, dir } => start(&dir.dir, &component),
        LabCommand::Logs { component, dir } => {
            let path = run::log_file(&dir.dir, &component);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("no log for {component:?} ({})", path.display()))?;
            print!("{text}");
            Ok(())
        }
        LabCommand::Partition { a, b, dir } => {
            netns::partition(&read_lab(&dir.dir)?, &a, &b)?;
            println!("WAN link between {a} and {b} cut (`strait lab heal` restores it)");
            Ok(())
        }
        LabCommand::Heal(dir) => {
            netns::heal(&read_lab(&dir.dir)?)?;
            println!("every WAN link restored");
            Ok(())
        }
        LabCommand::Apply { cluster, file, dir } => apply(&dir.dir, &cluster, &file, true),
        LabCommand::Delete { cluster, file, dir } => apply(&dir.dir, &cluster, &file, false),
        LabCommand::Curl {
            cluster,
            url,
            n,
            timeout,
            dir,
        } => {
            let lab = read_lab(&dir.dir)?;
            let summary = client::curl_with(&lab, &cluster, &url, n, timeout)?;
            print!("{}", summary.render());
            if summary.failed() > 0 {
                let late = summary
                    .codes
                    .get(&client::timed_out(timeout))
                    .copied()
                    .unwrap_or(0);
                let late = if late > 0 {
                    format!(" ({late} timed out)")
                } else {
                    String::new()
                };
                bail!("{} of {n} requests failed{late}", summary.failed());
            }
            Ok(())
        }
    }
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the strait binary")
}

fn strait(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(exe()?)
        .args(args)
        .output()
        .with_context(|| format!("strait {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "strait {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn straitctl(mesh: &plan::Mesh, args: &[&str]) -> Result<String> {
    let creds = mesh.admin_creds.to_string_lossy().into_owned();
    let out = std::process::Command::new(exe()?)
        .args(["ctl", "--broker", &mesh.address, "--creds", &creds])
        .args(args)
        .output()
        .context("strait ctl")?;
    if !out.status.success() {
        bail!(
            "straitctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The lab as `up` wrote it (`lab.json` is for people and scripts; the
/// plan is recomputed from its topology, mode and base).
pub fn read_lab(dir: &Path) -> Result<Lab> {
    let path = dir.join("lab.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no lab here (start one with `strait lab up`)",
            path.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let topology = match v["topology"].as_str() {
        Some("multi-primary") => Topology::MultiPrimary,
        Some("primary-remote") => Topology::PrimaryRemote,
        Some("federated") => Topology::Federated,
        other => bail!("{}: unknown topology {other:?}", path.display()),
    };
    let mode = if v["mode"] == "quic" {
        Mode::Quic
    } else {
        Mode::Sni
    };
    let base = v["ip_base"]
        .as_u64()
        .and_then(|b| u8::try_from(b).ok())
        .unwrap_or(10);
    let dir = v["dir"]
        .as_str()
        .map_or_else(|| dir.to_path_buf(), PathBuf::from);
    let netns = v["netns"].as_bool().unwrap_or(false);
    Lab::new(topology, &dir, mode, base, netns)
        .map_err(|e| anyhow!(e))?
        .with_cert_ttl(v["cert_ttl"].as_str().map(str::to_string))
        .with_bind_identities(v["bind_identities"].as_bool().unwrap_or(false))
        .with_kube(v["kube"].as_bool().unwrap_or(false))
        .with_ha(v["brokers"][0]["replicas"].as_array().map_or(0, Vec::len))
        .map_err(|e| anyhow!(e))
}

pub(crate) fn topology_name(t: Topology) -> &'static str {
    match t {
        Topology::MultiPrimary => "multi-primary",
        Topology::PrimaryRemote => "primary-remote",
        Topology::Federated => "federated",
    }
}

pub(crate) fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

fn status(dir: &Path) -> Result<()> {
    let procs = Procs::load(dir)?;
    if procs.order.is_empty() {
        bail!("no lab is running in {}", dir.display());
    }
    let rows = run::status_rows(&procs);
    run::print_table(&rows);
    let mut bad = rows.iter().filter(|r| !r.healthy).count();
    // In netns mode, whether traffic crosses the WAN, not only whether the
    // processes answer.
    if let Ok(lab) = read_lab(dir)
        && lab.netns
    {
        println!();
        for l in netns::wan_links(&lab) {
            println!(
                "WAN {:>10} -> {:<10} {:<21} {}",
                l.from,
                l.to,
                l.target,
                if l.reachable {
                    "reachable"
                } else {
                    "UNREACHABLE"
                }
            );
            bad += usize::from(!l.reachable);
        }
    }
    if bad > 0 {
        return Err(
            crate::cli::Rejected(format!("{bad} component(s) or WAN link(s) not ready")).into(),
        );
    }
    Ok(())
}

/// Stops every process of the lab (in reverse start order) and the `up`
/// process itself, and removes its network namespaces (netns mode).
pub fn down(dir: &Path) -> Result<()> {
    stop_all(dir)?;
    if let Ok(lab) = read_lab(dir)
        && lab.netns
    {
        netns::teardown(&lab);
    }
    Ok(())
}

fn stop_all(dir: &Path) -> Result<()> {
    let mut procs = Procs::load(dir)?;
    let me = std::process::id();
    for name in procs.order.iter().rev() {
        if let Some(p) = procs.procs.get(name) {
            run::stop(p.pid, Duration::from_secs(5));
        }
    }
    if let Some(pid) = procs.supervisor
        && pid != me
    {
        run::stop(pid, Duration::from_secs(10));
    }
    procs.procs.clear();
    procs.order.clear();
    procs.supervisor = None;
    procs.save(dir)?;
    Ok(())
}

pub(crate) fn kill(dir: &Path, component: &str) -> Result<()> {
    let procs = Procs::load(dir)?;
    let p = procs.procs.get(component).ok_or_else(|| {
        crate::cli::UsageError(format!(
            "no component {component:?} in {}; components: {}",
            dir.display(),
            procs.order.join(", ")
        ))
    })?;
    run::kill9(p.pid);
    println!("{component} (pid {}) killed", p.pid);
    Ok(())
}

pub(crate) fn start(dir: &Path, component: &str) -> Result<()> {
    let lab = read_lab(dir)?;
    let all = components(&lab);
    let c = all
        .iter()
        .find(|c| c.name == component)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
            crate::cli::UsageError(format!(
                "no component {component:?} in this lab; components: {}",
                names.join(", ")
            ))
        })?;
    let mut procs = Procs::load(dir)?;
    if let Some(p) = procs.procs.get(component)
        && run::alive(p.pid)
    {
        bail!("{component} is running (pid {})", p.pid);
    }
    start_component(&lab, &mut procs, &c)?;
    println!("{component} started and ready");
    Ok(())
}

/// `lab apply` (`put`) or `lab delete` of a file's objects (see
/// [`objects`]).
pub(crate) fn apply(dir: &Path, cluster: &str, file: &Path, put: bool) -> Result<()> {
    if let Ok(lab) = read_lab(dir)
        && lab.kube
    {
        return kube::apply_file(&lab, cluster, file, put);
    }
    if put {
        objects::apply(dir, cluster, file)
    } else {
        objects::delete(dir, cluster, file)
    }
}

/// The namespace demo YAML objects use.
pub const DEMO_NAMESPACE: &str = NAMESPACE;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::up::check_addresses_free;
    use super::*;

    #[test]
    fn a_lab_whose_broker_address_is_taken_is_refused() {
        let lab = Lab::new(
            Topology::MultiPrimary,
            Path::new("/l"),
            Mode::Sni,
            250,
            false,
        )
        .unwrap();
        assert!(check_addresses_free(&lab).is_ok());
        let _taken = std::net::TcpListener::bind(lab.brokers[0].address.as_str()).unwrap();
        let err = check_addresses_free(&lab).unwrap_err().to_string();
        assert!(err.contains("--ip-base 250"), "{err}");
    }
}
