//! `strait lab up`: checks that nothing is in the way, then brings the
//! lab up step by step (root CAs, brokers, peering, every cluster's
//! config, registrations, control planes, tokens, workloads), with
//! progress, and stops what started when a step fails.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use super::components::{components, root_dir};
use super::plan::{Cluster, Component, Lab, Mode};
use super::run::{self, Procs};
use super::{UpArgs, absolute, down, exe, netns, objects, s, strait, straitctl, topology_name};

/// How long a component may take to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// Refuses a directory that is in use by a running lab.
pub(crate) fn check_not_running(dir: &Path) -> Result<()> {
    let procs = Procs::load(dir)?;
    if let Some(pid) = procs.supervisor
        && run::alive(pid)
    {
        bail!(
            "a lab is already running in {} (pid {pid}); stop it with `strait lab down --dir {}`",
            dir.display(),
            dir.display()
        );
    }
    if procs.procs.values().any(|p| run::alive(p.pid)) {
        bail!(
            "processes of an earlier lab in {} are still running; stop them with `strait lab down --dir {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Refuses a lab whose brokers' addresses are taken (another lab with the
/// same `--ip-base`, in another directory): its clusters would join the
/// other lab's broker. Not in netns mode, where the brokers listen in
/// namespaces of their own.
pub(super) fn check_addresses_free(lab: &Lab) -> Result<()> {
    if lab.netns {
        return Ok(());
    }
    for m in &lab.brokers {
        if let Err(e) = std::net::TcpListener::bind(m.address.as_str()) {
            bail!(
                "{} (the {} broker's address) is taken: {e}; is another lab running with --ip-base {}? \
                 Stop it, or pick another --ip-base",
                m.address,
                m.mesh,
                lab.base()
            );
        }
    }
    Ok(())
}

/// Prepares a fresh lab directory: the previous lab's state is replaced; a
/// non-empty directory that is not a lab is refused.
fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let is_lab = dir.join("lab.json").exists() || run::run_dir(dir).exists();
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !is_lab && !empty {
            bail!(
                "{} exists and is not a lab directory; choose another --dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// A step of `up`, shown as progress.
fn step<T>(bar: &indicatif::ProgressBar, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    bar.set_message(what.to_string());
    let r = f();
    match &r {
        Ok(_) => bar.println(format!("  ok  {what}")),
        Err(_) => bar.println(format!("  FAILED  {what}")),
    }
    bar.inc(1);
    r
}

pub(super) fn start_component(lab: &Lab, procs: &mut Procs, c: &Component) -> Result<()> {
    let pid = spawn_component(lab, procs, c)?;
    run::wait_healthy(&lab.dir, c, pid, READY_DEADLINE)
}

/// Starts `c` and records it, without waiting for it to be ready.
fn spawn_component(lab: &Lab, procs: &mut Procs, c: &Component) -> Result<u32> {
    let pid = run::spawn(&lab.dir, &exe()?, c)?;
    procs.order.retain(|n| n != &c.name);
    procs.order.push(c.name.clone());
    procs.procs.insert(
        c.name.clone(),
        run::Proc {
            pid,
            args: c.args.clone(),
            health: c.health.clone(),
            health_ca: c.health_ca.clone(),
            netns: c.netns.clone(),
        },
    );
    procs.save(&lab.dir)?;
    Ok(pid)
}

/// Brings a lab up (returns once every component is ready).
pub fn bring_up(lab: &Lab, quiet: bool) -> Result<()> {
    let dir = &lab.dir;
    check_not_running(dir)?;
    prepare_dir(dir)?;
    let comps = components(lab);
    // Root CAs, components, peering, registrations, tokens.
    let joined = lab.clusters.iter().filter(|c| c.role != "remote").count();
    let total = lab.brokers.len()
        + comps.len()
        + usize::from(lab.brokers.len() > 1)
        + joined
        + lab.clusters.len()
        + usize::from(lab.netns)
        + if lab.kube { lab.clusters.len() } else { 0 };
    let bar = progress(total, quiet);
    let mut procs = Procs {
        supervisor: Some(std::process::id()),
        ..Procs::default()
    };
    procs.save(dir)?;
    // lab.json first, so that status/down work while starting.
    let mut json = lab.to_json();
    json["ip_base"] = serde_json::json!(lab.clusters[0].block - 1);
    std::fs::write(dir.join("lab.json"), serde_json::to_string_pretty(&json)?)?;

    let mut up = Up {
        lab,
        comps: &comps,
        procs: &mut procs,
        bar: &bar,
    };
    up.meshes()?;
    // Every cluster's config first: a primary's control plane reads its
    // remotes' at start.
    if lab.kube {
        up.api_servers()?;
    } else {
        write_configs(lab)?;
    }
    for cl in &lab.clusters {
        up.cluster(cl)?;
    }
    // Processes up is not traffic flowing: in netns mode the WAN between
    // the clusters' namespaces is checked too.
    if lab.netns {
        step(
            &bar,
            "WAN: every cluster reaches the others' gateways",
            || netns::check_wan(lab),
        )?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// The progress bar of `up` (hidden when `quiet`).
fn progress(total: usize, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template("[{pos}/{len}] {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// Every cluster's config directory, one file per object (as `lab apply`
/// writes them).
fn write_configs(lab: &Lab) -> Result<()> {
    for cl in &lab.clusters {
        std::fs::create_dir_all(&cl.config_dir)?;
        // In a federation, echo is exported to the other meshes too.
        let others: Vec<String> = lab
            .brokers
            .iter()
            .filter(|b| b.mesh != cl.mesh)
            .map(|b| format!("mesh:{}", b.mesh))
            .collect();
        objects::write_objects(&cl.config_dir, &cl.config_yaml(&others))?;
        if cl.role == "remote" {
            objects::write_objects(&cl.config_dir, &cl.network_yaml())?;
        }
    }
    Ok(())
}

/// A lab being brought up: its plan, what has started, the progress.
struct Up<'a> {
    lab: &'a Lab,
    comps: &'a [Component],
    procs: &'a mut Procs,
    bar: &'a indicatif::ProgressBar,
}

impl Up<'_> {
    fn component(&self, name: &str) -> Option<Component> {
        self.comps.iter().find(|c| c.name == name).cloned()
    }

    fn start(&mut self, c: &Component) -> Result<()> {
        let (lab, bar) = (self.lab, self.bar);
        let procs = &mut *self.procs;
        step(bar, &format!("{} ready", c.name), || {
            start_component(lab, procs, c)
        })
    }

    /// The meshes: a root CA each, their brokers, and peering between
    /// them (federated).
    fn meshes(&mut self) -> Result<()> {
        let lab = self.lab;
        for m in &lab.brokers {
            step(
                self.bar,
                &format!("root CA for {} ({})", m.mesh, m.trust_domain),
                || {
                    strait(&[
                        "ca",
                        "init-root",
                        "--trust-domain",
                        &m.trust_domain,
                        "--out",
                        &s(&root_dir(lab, &m.mesh)),
                        "--validity",
                        "1y",
                    ])?;
                    Ok(())
                },
            )?;
        }
        // etcd's members wait for each other: all started, then each
        // checked.
        let members: Vec<Component> = lab
            .etcd
            .iter()
            .filter_map(|e| self.component(&e.name))
            .collect();
        let mut pids = Vec::new();
        for c in &members {
            pids.push(spawn_component(lab, self.procs, c)?);
        }
        for (c, pid) in members.iter().zip(pids) {
            step(self.bar, &format!("{} ready", c.name), || {
                run::wait_healthy(&lab.dir, c, pid, READY_DEADLINE)
            })?;
        }
        for m in &lab.brokers {
            let names: Vec<String> = if m.replicas.is_empty() {
                vec![m.component.clone()]
            } else {
                m.replicas.iter().map(|r| r.name.clone()).collect()
            };
            for name in names {
                let c = self
                    .component(&name)
                    .ok_or_else(|| anyhow!("no component {name}"))?;
                self.start(&c)?;
            }
        }
        if lab.brokers.len() > 1 {
            step(self.bar, "brokers peered", || {
                let token = straitctl(&lab.brokers[0], &["peer", "token"])?;
                straitctl(&lab.brokers[1], &["peer", "establish", token.trim()])?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Kubernetes mode: each cluster's etcd and API server, their PKI, and
    /// the CRDs and starting objects in them.
    fn api_servers(&mut self) -> Result<()> {
        let lab = self.lab;
        for cl in &lab.clusters {
            super::kube::write_pki(cl)?;
            for name in ["etcd", "apiserver"] {
                let c = self
                    .component(&format!("{}/{name}", cl.name))
                    .ok_or_else(|| anyhow!("no {name} component for {}", cl.name))?;
                self.start(&c)?;
            }
            step(
                self.bar,
                &format!("{}: CRDs, Services and Pods in its API server", cl.name),
                || super::kube::install(lab, cl),
            )?;
        }
        Ok(())
    }

    /// One cluster: registered at its broker (a remote cluster joins no
    /// broker: the primary's control plane serves it, with the primary's
    /// intermediate), its control plane, its tokens, its other
    /// components.
    fn cluster(&mut self, cl: &Cluster) -> Result<()> {
        let lab = self.lab;
        if cl.role != "remote" {
            let m = lab.mesh_of(cl);
            step(
                self.bar,
                &format!("{} registered at the broker", cl.name),
                || {
                    let token = straitctl(
                        m,
                        &[
                            "cluster",
                            "add",
                            &cl.name,
                            "--network",
                            &cl.network,
                            "--locality",
                            &cl.locality,
                        ],
                    )?;
                    std::fs::write(cl.dir.join("join.token"), token.trim())?;
                    Ok(())
                },
            )?;
        }
        if let Some(cp) = self.component(&format!("{}/controlplane", cl.name)) {
            self.start(&cp)?;
        }
        std::fs::create_dir_all(&cl.dir)?;
        step(
            self.bar,
            &format!("{}: workload and gateway tokens", cl.name),
            || issue_tokens(lab, cl),
        )?;
        let prefix = format!("{}/", cl.name);
        let rest: Vec<Component> = self
            .comps
            .iter()
            .filter(|c| c.name.starts_with(&prefix) && !c.name.ends_with("/controlplane"))
            .filter(|c| !self.procs.procs.contains_key(&c.name))
            .cloned()
            .collect();
        for c in &rest {
            self.start(c)?;
        }
        Ok(())
    }
}

/// The bootstrap tokens of a cluster's workloads and gateway.
fn issue_tokens(lab: &Lab, cl: &Cluster) -> Result<()> {
    let state = cl.state_dir(lab);
    let tokens = cl.dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let token = |namespace: &str, service_account: &str, workload: &str| {
        strait(&[
            "controlplane",
            "token",
            "--state-dir",
            &s(&state),
            "--namespace",
            namespace,
            "--service-account",
            service_account,
            "--workload",
            workload,
            "--out",
            &s(&tokens.join(format!("{workload}.token"))),
        ])
    };
    for w in &cl.workloads {
        token(&w.namespace, &w.service_account, &w.name)?;
    }
    token("strait-system", "eastwest-gateway", "eastwest-gateway")?;
    Ok(())
}

/// What `--ha` needs on this machine, said before anything starts.
fn ha_available() -> Result<()> {
    if !cfg!(feature = "etcd") {
        bail!(
            "--ha needs a strait built with the etcd store: cargo build --release --features etcd \
             (its build needs protoc: apt-get install protobuf-compiler)"
        );
    }
    super::kube::tool("etcd").map(drop)
}

pub(super) fn up(a: UpArgs) -> Result<()> {
    if a.netns
        && let Some(why) = netns::unavailable()
    {
        bail!("{why}");
    }
    let dir = absolute(&a.dir.dir)?;
    if a.kube
        && let Some(why) = super::kube::unavailable(a.netns)
    {
        bail!("{why}");
    }
    if a.ha.is_some() {
        ha_available()?;
    }
    let lab = Lab::new(a.topology, &dir, a.mode, a.ip_base, a.netns)
        .map_err(|e| anyhow!(e))?
        .with_kube(a.kube)
        .with_cert_ttl(a.cert_ttl.map(crate::cli::format_duration))
        .with_bind_identities(a.bind_identities)
        .with_ha(a.ha.unwrap_or(0))
        .map_err(crate::cli::UsageError)?;
    // Refused before anything starts: a running lab is not ours to stop.
    check_not_running(&dir)?;
    check_addresses_free(&lab)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signal = rt.spawn(crate::cli::broker::shutdown_signal());
    if lab.netns {
        netns::setup(&lab).context("setting up the network namespaces")?;
    }
    if let Err(e) = bring_up(&lab, false) {
        eprintln!("lab did not come up; stopping what started");
        let _ = down(&dir);
        return Err(e);
    }
    let (sidecar, _) = run::program(&exe()?, &["sidecar".to_string()]);
    let sidecar = if sidecar.ends_with(run::SIDECAR_BIN) {
        run::SIDECAR_BIN
    } else {
        "strait sidecar (strait-sidecar is not built next to strait)"
    };
    println!(
        "lab {} is up in {} (--mode {}; sidecars run {sidecar})\n",
        topology_name(lab.topology),
        dir.display(),
        match lab.mode {
            Mode::Sni => "sni",
            Mode::Quic => "quic",
        }
    );
    run::print_table(&run::status_rows(&Procs::load(&dir)?));
    println!(
        "\nTry:\n  strait lab curl {} http://echo.demo:8080/ -n 10 --dir {}\n  straitctl --lab {} exports list\n  strait lab down --dir {}\n\nRunning until SIGINT/SIGTERM.",
        lab.clusters[0].name,
        dir.display(),
        dir.display(),
        dir.display()
    );
    let _ = rt.block_on(signal);
    eprintln!("stopping the lab");
    down(&dir)
}
