//! `strait cluster`: the cluster side of a broker, from the command line.
//! `join` spends a join token; `sync` publishes a static config's exports
//! and writes what the cluster imports. (The local control plane does both
//! itself; these commands serve static setups, scripts and debugging.)

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use strait_broker_client::agent::{Agent, AgentConfig, Exports};
use strait_broker_client::client;
use strait_model::local::{local_exports, local_services};
use strait_model::mesh::{ClusterInfo, GatewayAddress, LocalService, Locality, Network};

use super::UsageError;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    Join(Join),
    Sync(Sync),
}

/// Join a mesh with a join token: makes the cluster's intermediate key
/// here, sends only its CSR, checks the broker against the token's pinned
/// root, and writes DIR/cacerts (Istio plug-in CA), DIR/broker-client and
/// DIR/broker.json.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  straitctl cluster add east --network net-east > east.token\n  strait cluster join --token east.token --dir /var/lib/strait/east"
)]
pub struct Join {
    /// The token: a file holding it, `-` for stdin, or the token itself.
    #[arg(long, value_name = "FILE|TOKEN")]
    token: String,
    /// Directory for the cluster's credentials (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

/// Publish the exports of a static config (Services with
/// `strait.io/export: "true"` or an MCS ServiceExport, and the
/// WorkloadEntries they select) and write the Istio/MCS objects this
/// cluster imports. Runs until SIGINT/SIGTERM, re-reading the config when
/// it changes; `--once` exits after the first sync.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  strait cluster sync --dir /var/lib/strait/east --config east.yaml \\
      --gateway 127.0.0.1:15443 --imports-out east-imports.yaml --once")]
pub struct Sync {
    /// A joined cluster directory (from `strait cluster join`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Multi-document YAML with Service, ServiceExport and WorkloadEntry objects.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// This cluster's east-west gateway address, published to importers (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    gateway: Vec<String>,
    /// Where to write the imported objects (default: DIR/imports.yaml).
    #[arg(long, value_name = "FILE")]
    imports_out: Option<PathBuf>,
    /// Exit once the exports are acknowledged and the imports written.
    #[arg(long)]
    once: bool,
    /// With --once: give up after this long.
    #[arg(long, value_parser = super::parse_duration, default_value = "30s")]
    timeout: Duration,
}

pub fn run(cmd: ClusterCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        ClusterCommand::Join(j) => runtime.block_on(join(j)),
        ClusterCommand::Sync(s) => runtime.block_on(sync(s)),
    }
}

async fn join(j: Join) -> Result<()> {
    let token = if j.token == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else if j.token.starts_with(strait_broker_client::token::PREFIX) {
        j.token.clone()
    } else if Path::new(&j.token).exists() {
        std::fs::read_to_string(&j.token).with_context(|| format!("--token {}", j.token))?
    } else {
        return Err(UsageError(format!(
            "--token {:?}: not a join token (one starts with {:?}) and no such file",
            j.token,
            strait_broker_client::token::PREFIX
        ))
        .into());
    };
    if !token
        .trim()
        .starts_with(strait_broker_client::token::PREFIX)
    {
        return Err(UsageError(format!(
            "--token {}: malformed join token (it must start with {:?}; `straitctl cluster add` prints one)",
            j.token,
            strait_broker_client::token::PREFIX
        ))
        .into());
    }
    let joined = client::join(token.trim(), &j.dir).await?;
    println!(
        "cluster {} joined trust domain {} (network {}{})",
        joined.info.cluster,
        joined.info.trust_domain,
        joined.info.network,
        if joined.info.locality.is_empty() {
            String::new()
        } else {
            format!(", locality {}", joined.info.locality)
        }
    );
    for (p, note) in [
        (
            client::CACERTS_DIR,
            " (Istio plug-in CA: the key was made here)",
        ),
        (client::CLIENT_DIR, " (broker client identity)"),
        (client::BROKER_FILE, ""),
    ] {
        println!("  {}{note}", j.dir.join(p).display());
    }
    Ok(())
}

/// The exports of a config file, and its Services (exported or not),
/// which decide where imports also get `WorkloadEntry` objects.
fn read_config(path: &Path) -> Result<(Exports, Vec<LocalService>)> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
        .with_context(|| format!("{}: not valid YAML", path.display()))?;
    let docs: Vec<_> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let found = local_exports(&docs);
    for e in &found.errors {
        eprintln!("warning: {}: {e}", path.display());
    }
    let exports = found
        .exports
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect();
    Ok((exports, local_services(&docs)))
}

/// Writes the objects the imports `now` make in a cluster with `locals`.
fn write_imports(
    importer: &ClusterInfo,
    now: &strait_broker_client::agent::Imports,
    locals: &[LocalService],
    out: &Path,
) -> Result<()> {
    let remotes: Vec<_> = now.services.values().flatten().cloned().collect();
    let objects = strait_model::imports::import_objects(importer, &remotes, locals);
    strait_ca::layout::write_public(out, &objects.to_yaml()?)?;
    for w in &objects.warnings {
        eprintln!("warning: import: {w}");
    }
    eprintln!(
        "imports revision {}: {} service(s), {} object(s) written to {}",
        now.revision,
        now.services.len(),
        objects.len(),
        out.display()
    );
    Ok(())
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A `--gateway` value: `HOST:PORT` with the port given (importers dial
/// it; a bare word is more likely a mistake than a host name).
fn gateway_flag(g: &str) -> Result<GatewayAddress, UsageError> {
    let bad = |why: &str| {
        UsageError(format!(
            "--gateway {g:?}: {why}; expected HOST:PORT, e.g. 203.0.113.10:15443"
        ))
    };
    let has_port = match g.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if !has_port {
        return Err(bad("no port"));
    }
    GatewayAddress::parse(g).map_err(|e| bad(&e.to_string()))
}

async fn sync(s: Sync) -> Result<()> {
    for g in &s.gateway {
        gateway_flag(g)?;
    }
    let info: client::BrokerInfo = serde_json::from_slice(
        &std::fs::read(s.dir.join(client::BROKER_FILE))
            .with_context(|| format!("{}: not a joined cluster directory", s.dir.display()))?,
    )?;
    let importer = ClusterInfo {
        name: strait_ca::ClusterName::new(&info.cluster)?,
        network: Network::new(&info.network)?,
        locality: if info.locality.is_empty() {
            None
        } else {
            Some(Locality::parse(&info.locality)?)
        },
        gateways: s
            .gateway
            .iter()
            .filter_map(|g| GatewayAddress::parse(g).ok())
            .collect(),
        trust_domain: strait_ca::TrustDomain::new(&info.trust_domain)?,
    };
    let (exports, mut locals) = read_config(&s.config)?;
    eprintln!(
        "publishing {} export(s) from {}; {}",
        exports.len(),
        s.config.display(),
        if s.once {
            format!(
                "exiting once they are acknowledged and the imports written (--once, at most {})",
                super::format_duration(s.timeout)
            )
        } else {
            "syncing until SIGINT/SIGTERM (--once: exit after the first sync)".to_string()
        }
    );
    let (exports_tx, exports_rx) = tokio::sync::watch::channel(exports);
    let (agent, mut imports) = Agent::new(
        AgentConfig {
            dir: s.dir.clone(),
            gateways: s.gateway.clone(),
            // Istio's CA (istiod) issues the leaves: not known here.
            leaf_ttl_max: None,
        },
        exports_rx,
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    let out = s
        .imports_out
        .clone()
        .unwrap_or_else(|| s.dir.join("imports.yaml"));
    let mut last_mtime = mtime(&s.config);
    let mut reload = tokio::time::interval(Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + s.timeout;
    let shutdown = super::broker::shutdown_signal();
    tokio::pin!(shutdown);
    let mut written = None;
    let mut said_refused: Option<String> = None;
    let result = loop {
        tokio::select! {
            changed = imports.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the broker agent stopped"));
                }
                let now = imports.borrow_and_update().clone();
                if let Some(why) = &now.refused {
                    if s.once {
                        break Err(anyhow::anyhow!("the broker refuses this cluster: {why}"));
                    }
                    if said_refused.as_ref() != Some(why) {
                        eprintln!("error: the broker refuses this cluster: {why}");
                        said_refused = Some(why.clone());
                    }
                    continue;
                }
                if now.revision == 0 || written == Some(now.revision) {
                    if s.once && now.exports_acked && written.is_some() {
                        break Ok(());
                    }
                    continue;
                }
                write_imports(&importer, &now, &locals, &out)?;
                written = Some(now.revision);
                if s.once && now.exports_acked {
                    break Ok(());
                }
            }
            _ = reload.tick() => {
                let m = mtime(&s.config);
                if m != last_mtime {
                    last_mtime = m;
                    match read_config(&s.config) {
                        Ok((e, l)) => {
                            eprintln!("config changed: publishing {} export(s)", e.len());
                            exports_tx.send_replace(e);
                            // Which imports get WorkloadEntries may have
                            // changed: write them again now.
                            locals = l;
                            if written.is_some() {
                                write_imports(&importer, &imports.borrow(), &locals, &out)?;
                            }
                        }
                        Err(e) => eprintln!("warning: {}; keeping the last good config", super::describe(&e)),
                    }
                }
            }
            () = tokio::time::sleep_until(deadline), if s.once => {
                break Err(anyhow::anyhow!(
                    "not synced within {}: is the broker reachable? (see RUST_LOG=strait_broker=info)",
                    super::format_duration(s.timeout)
                ));
            }
            () = &mut shutdown => break Ok(()),
        }
    };
    let _ = stop_tx.send(());
    let _ = agent_task.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_flag_needs_a_port() {
        for good in [
            "127.0.0.1:15443",
            "gw.example.com:15443",
            "[2001:db8::1]:15443",
        ] {
            assert!(gateway_flag(good).is_ok(), "{good}");
        }
        for bad in [
            "not-an-addr",
            "127.0.0.1",
            "2001:db8::1",
            "[2001:db8::1]",
            "gw:port",
            "gw:0",
            "",
        ] {
            let e = gateway_flag(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--gateway {bad:?}")), "{e}");
        }
    }
}
