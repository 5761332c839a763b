//! `straitctl`: the broker admin CLI. This file is the command line and
//! the commands; `conn.rs` the connection to the broker (the first of its
//! addresses that answers), `rotate.rs` `trust rotate-root` and its
//! `--wait`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use strait_proto::strait::broker::v1 as pb;

use super::{LogArgs, UsageError, parse_duration};

mod conn;
mod rotate;
mod status;

use conn::Conn;

#[derive(Debug, Parser)]
#[command(
    name = "straitctl",
    version,
    about = "Admin CLI of a strait trust broker",
    long_about = "Admin CLI of a strait trust broker: clusters and join tokens, exported and \
imported services, trust status. It authenticates with the admin credentials the broker \
writes to DATA/admin on first start.",
    after_help = "Examples:
  export STRAIT_BROKER=127.0.0.1:15011 STRAIT_CREDS=/var/lib/strait-broker/admin
  export STRAIT_BROKER=broker-0.example.org:15011,broker-1.example.org:15011   # replicas
  straitctl cluster add east --network net-east --locality us-east/a > east.token
  straitctl cluster list
  straitctl exports list -o json
  straitctl imports show west"
)]
pub struct Ctl {
    /// Broker address (HOST:PORT), or the addresses of its replicas
    /// (HOST:PORT,HOST:PORT,...): the first that answers is used, and
    /// `trust rotate-root --wait` moves on to the next when it goes away.
    #[arg(
        long,
        global = true,
        env = "STRAIT_BROKER",
        value_name = "ADDR[,ADDR...]"
    )]
    broker: Option<String>,
    /// Directory with admin credentials (cert-chain.pem, key.pem, root-cert.pem).
    #[arg(long, global = true, env = "STRAIT_CREDS", value_name = "DIR")]
    creds: Option<PathBuf>,
    /// A `strait lab` directory: broker address and admin credentials come
    /// from its lab.json (`{"broker": {"address": ..., "admin_creds": ...}}`;
    /// `"addresses": [...]` for several).
    #[arg(long, global = true, env = "STRAIT_LAB", value_name = "DIR", conflicts_with_all = ["broker", "creds"])]
    lab: Option<PathBuf>,
    /// With --lab: which mesh's broker (default: the first in lab.json's
    /// `brokers`).
    #[arg(long, global = true, value_name = "NAME", requires = "lab")]
    mesh: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    output: Output,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Clusters of the mesh: add (join token), list, show, revoke.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Services the clusters export.
    #[command(subcommand)]
    Exports(ExportsCmd),
    /// What a cluster imports.
    #[command(subcommand)]
    Imports(ImportsCmd),
    /// Trust: roots, bundle version, intermediates.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Peering with other meshes (other trust domains).
    #[command(subcommand)]
    Peer(PeerCmd),
    /// The broker: its store and, with several replicas on etcd, each
    /// replica, which leads, and whether it can write.
    #[command(
        after_help = "Examples:\n  straitctl --broker 10.0.0.1:15011,10.0.0.2:15011 --creds admin status\n  straitctl --lab .strait-lab status -o json"
    )]
    Status,
}

#[derive(Debug, Subcommand)]
enum PeerCmd {
    /// Print a one-time peer token for another mesh's broker (stdout: only the token).
    #[command(
        after_help = "Example (two meshes):\n  straitctl --broker a:15011 --creds a-admin peer token > a.peer\n  straitctl --broker b:15011 --creds b-admin peer establish \"$(cat a.peer)\""
    )]
    Token {
        /// How long the token may be used.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        ttl: Duration,
    },
    /// Peer with the mesh that issued TOKEN: exchange trust bundles and start
    /// exchanging the services each exports to `mesh:<other>`.
    #[command(
        after_help = "Example:\n  straitctl --broker b:15011 --creds b-admin peer establish \"$(cat a.peer)\""
    )]
    Establish { token: String },
    /// The peered meshes.
    #[command(
        after_help = "Example:\n  straitctl --broker 127.0.0.1:15011 --creds /var/lib/strait/broker/admin peer list\n  straitctl --lab .strait-lab --mesh mesh-a peer list   # a federated lab's mesh-a"
    )]
    List,
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Register a cluster and print its one-time join token (only the token
    /// goes to stdout; details to stderr).
    #[command(
        after_help = "Example:\n  straitctl cluster add east --network net-east --locality us-east/a --ttl 30m > east.token"
    )]
    Add(ClusterAdd),
    /// List the clusters.
    #[command(
        after_help = "Example:\n  straitctl --broker 127.0.0.1:15011 --creds /var/lib/strait/broker/admin cluster list\n  straitctl --lab .strait-lab cluster list -o json"
    )]
    List,
    /// Show one cluster.
    #[command(after_help = "Example:\n  straitctl --lab .strait-lab cluster show east -o yaml")]
    Show { name: String },
    /// Revoke a cluster: its exports leave every importer and its
    /// intermediate is deny-listed everywhere.
    #[command(
        after_help = "Example:\n  straitctl --lab .strait-lab cluster revoke west\n  straitctl --lab .strait-lab cluster show west   # state: revoked"
    )]
    Revoke { name: String },
}

#[derive(Debug, Args)]
struct ClusterAdd {
    /// Cluster name (a DNS label).
    name: String,
    /// The cluster's network (clusters on one network reach each other's pods directly).
    #[arg(long, value_name = "NET")]
    network: String,
    /// region/zone[/subzone].
    #[arg(long, value_name = "REGION/ZONE")]
    locality: Option<String>,
    /// How long the token may be used.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    ttl: Duration,
}

#[derive(Debug, Subcommand)]
enum ExportsCmd {
    /// List exported services.
    #[command(
        after_help = "Example:\n  straitctl --lab .strait-lab exports list\n  straitctl --lab .strait-lab exports list --cluster west -o json"
    )]
    List {
        /// Only this cluster's exports.
        #[arg(long)]
        cluster: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImportsCmd {
    /// The Istio and MCS objects the broker sends a cluster, as YAML. The
    /// cluster's control plane (or `strait cluster sync`) adds a
    /// WorkloadEntry per remote cluster for each service it also runs
    /// itself: the broker does not know a cluster's own Services.
    #[command(after_help = "Example:\n  straitctl --lab .strait-lab imports show east")]
    Show { cluster: String },
}

#[derive(Debug, Subcommand)]
enum TrustCmd {
    /// Roots in the bundle, and each cluster's intermediate and acknowledgement.
    #[command(after_help = "Example:\n  straitctl --lab .strait-lab trust status")]
    Status,
    /// Ask a cluster for a new intermediate (it makes a new key and sends a
    /// CSR on its sync stream; now if connected, else when it connects).
    #[command(
        after_help = "Example:\n  straitctl --lab .strait-lab trust rotate-intermediate east\n  straitctl --lab .strait-lab trust status   # east's intermediate changes"
    )]
    RotateIntermediate { cluster: String },
    /// Rotate the mesh root in stages: begin (new root joins the bundle),
    /// advance (once every cluster acknowledged it: intermediates are
    /// re-issued under the new root), finish (once they all are and old
    /// leaves expired: the old root leaves the bundle), abort, status.
    /// With --wait, each returns once every cluster has done what its
    /// stage needs.
    #[command(after_help = "Examples:
  straitctl trust rotate-root begin --wait      # returns once every cluster acknowledged the bundle
  straitctl trust rotate-root advance --wait    # returns once every intermediate is on the new root
  straitctl trust rotate-root finish            # after 24 h, or --force
  straitctl trust rotate-root status --wait --timeout 10m   # exit 1 naming who is behind after 10 min
By hand, without --wait:
  straitctl trust rotate-root begin
  straitctl trust rotate-root status      # until every BUNDLE-ACKED is yes
  straitctl trust rotate-root advance
  straitctl trust rotate-root status      # until every ON-NEW-ROOT is yes")]
    RotateRoot(rotate::RotateRoot),
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn short(fp: &str) -> String {
    fp.chars().take(23).collect()
}

/// The broker knows no such object (a cluster, a peer): a usage error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NotFound(String);

pub fn run(ctl: Ctl) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut conn = Conn::open(&ctl).await?;
        match run_async(&mut conn, ctl).await {
            Err(e) if e.is::<NotFound>() => Err(unknown(e.to_string(), &mut conn).await.into()),
            r => r,
        }
    })
}

/// A usage error (exit 64, as `strait lab` says it) for something the
/// broker does not know; a cluster's is followed by the known clusters.
async fn unknown(message: String, conn: &mut Conn) -> UsageError {
    if !message.contains("cluster") {
        return UsageError(message);
    }
    match conn.admin.list_clusters(pb::ListClustersRequest {}).await {
        Ok(r) => {
            let names: Vec<String> = r
                .into_inner()
                .clusters
                .into_iter()
                .map(|c| c.name)
                .collect();
            let known = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            UsageError(format!("{message}; its clusters: {known}"))
        }
        Err(_) => UsageError(message),
    }
}

fn time_str(unix: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn cluster_json(c: &pb::ClusterStatus) -> Value {
    json!({
        "name": c.name,
        "network": c.network,
        "locality": c.locality,
        "state": c.state,
        "connected": c.connected,
        "withdrawn": c.withdrawn,
        "gateways": c.gateways,
        "exports": c.exports,
        "export_revision": c.export_revision,
        "import_revision_acked": c.import_revision_acked,
        "bundle_version_acked": c.bundle_version_acked,
        "intermediate_expires": time_str(c.intermediate_expires_unix),
        "intermediate_sha256": c.intermediate_sha256,
    })
}

fn export_json(e: &pb::ExportEntry) -> Value {
    let s = e.service.clone().unwrap_or_default();
    json!({
        "cluster": e.cluster,
        "namespace": s.namespace,
        "name": s.name,
        "ports": s.ports.iter().map(|p| json!({"name": p.name, "number": p.number, "protocol": p.protocol})).collect::<Vec<_>>(),
        "export_to": s.export_to,
        "service_accounts": s.service_accounts,
        "healthy_endpoints": s.endpoints.iter().map(|e| e.healthy).sum::<u32>(),
    })
}

/// Prints `value` as JSON or YAML, or `rows` as a table.
fn print(output: Output, value: &Value, headers: &[&str], rows: Vec<Vec<String>>) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(value)?),
        Output::Table => {
            let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
            for r in &rows {
                for (i, c) in r.iter().enumerate() {
                    widths[i] = widths[i].max(c.len());
                }
            }
            let line = |cells: Vec<String>| {
                cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
            for r in rows {
                println!("{}", line(r));
            }
        }
    }
    Ok(())
}

async fn run_async(conn: &mut Conn, ctl: Ctl) -> Result<()> {
    let out = ctl.output;
    match ctl.command {
        Command::Cluster(cmd) => cluster_cmd(conn, out, cmd).await,
        Command::Exports(cmd) => exports_cmd(conn, out, cmd).await,
        Command::Imports(cmd) => imports_cmd(conn, out, cmd).await,
        Command::Trust(cmd) => trust_cmd(conn, out, cmd).await,
        Command::Peer(cmd) => peer_cmd(conn, out, cmd).await,
        Command::Status => status::status_cmd(conn, out).await,
    }
}

/// `straitctl cluster ...`.
async fn cluster_cmd(conn: &mut Conn, out: Output, cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Add(a) => {
            let r = conn
                .admin
                .add_cluster(pb::AddClusterRequest {
                    name: a.name.clone(),
                    network: a.network.clone(),
                    locality: a.locality.clone().unwrap_or_default(),
                    ttl_seconds: a.ttl.as_secs(),
                })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            eprintln!(
                "cluster {} (network {}) registered; join token valid until {}",
                a.name,
                a.network,
                time_str(r.expires_unix)
            );
            println!("{}", r.token);
        }
        ClusterCmd::List => {
            let r = conn
                .admin
                .list_clusters(pb::ListClustersRequest {})
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            let value = Value::Array(r.clusters.iter().map(cluster_json).collect());
            let rows = r
                .clusters
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.state.clone(),
                        if c.withdrawn {
                            "no (withdrawn)".to_string()
                        } else {
                            yes_no(c.connected)
                        },
                        c.network.clone(),
                        c.locality.clone(),
                        c.exports.to_string(),
                        c.gateways.join(","),
                    ]
                })
                .collect();
            print(
                out,
                &value,
                &[
                    "NAME",
                    "STATE",
                    "CONNECTED",
                    "NETWORK",
                    "LOCALITY",
                    "EXPORTS",
                    "GATEWAYS",
                ],
                rows,
            )?;
        }
        ClusterCmd::Show { name } => {
            let c = conn
                .admin
                .get_cluster(pb::GetClusterRequest { name })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            let value = cluster_json(&c);
            let rows = value
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            vec![
                                k.clone(),
                                v.as_str().map_or_else(|| v.to_string(), str::to_string),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print(out, &value, &["FIELD", "VALUE"], rows)?;
        }
        ClusterCmd::Revoke { name } => {
            conn.admin
                .revoke_cluster(pb::RevokeClusterRequest { name: name.clone() })
                .await
                .map_err(|s| conn.fail(s))?;
            eprintln!(
                "cluster {name} revoked: its exports are withdrawn and its intermediate is deny-listed"
            );
        }
    }
    Ok(())
}

/// `straitctl exports ...`.
async fn exports_cmd(conn: &mut Conn, out: Output, cmd: ExportsCmd) -> Result<()> {
    match cmd {
        ExportsCmd::List { cluster } => {
            let r = conn
                .admin
                .list_exports(pb::ListExportsRequest {
                    cluster: cluster.unwrap_or_default(),
                })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            let value = Value::Array(r.exports.iter().map(export_json).collect());
            let rows = r
                .exports
                .iter()
                .map(|e| {
                    let s = e.service.clone().unwrap_or_default();
                    vec![
                        e.cluster.clone(),
                        s.namespace,
                        s.name,
                        s.ports
                            .iter()
                            .map(|p| format!("{}/{}", p.number, p.protocol))
                            .collect::<Vec<_>>()
                            .join(","),
                        if s.export_to.is_empty() {
                            "*".into()
                        } else {
                            s.export_to.join(",")
                        },
                        s.endpoints
                            .iter()
                            .map(|e| e.healthy)
                            .sum::<u32>()
                            .to_string(),
                    ]
                })
                .collect();
            print(
                out,
                &value,
                &[
                    "CLUSTER",
                    "NAMESPACE",
                    "NAME",
                    "PORTS",
                    "EXPORT-TO",
                    "HEALTHY",
                ],
                rows,
            )?;
        }
    }
    Ok(())
}

/// `straitctl imports ...`.
async fn imports_cmd(conn: &mut Conn, out: Output, cmd: ImportsCmd) -> Result<()> {
    match cmd {
        ImportsCmd::Show { cluster } => {
            let r = conn
                .admin
                .show_imports(pb::ShowImportsRequest { cluster })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            if out == Output::Json {
                let docs: Vec<Value> = r
                    .yaml
                    .split("\n---\n")
                    .filter(|d| !d.trim().is_empty() && d.trim() != "---")
                    .map(serde_saphyr::from_str::<Value>)
                    .collect::<Result<_, _>>()?;
                println!("{}", serde_json::to_string_pretty(&docs)?);
            } else {
                print!("{}", r.yaml);
            }
        }
    }
    Ok(())
}

/// `straitctl trust ...`.
async fn trust_cmd(conn: &mut Conn, out: Output, cmd: TrustCmd) -> Result<()> {
    match cmd {
        TrustCmd::RotateIntermediate { cluster } => {
            let r = conn
                .admin
                .rotate_intermediate(pb::RotateIntermediateRequest {
                    cluster: cluster.clone(),
                })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            if r.requested_now {
                eprintln!("cluster {cluster} is connected and was asked for a new intermediate");
            } else {
                eprintln!("cluster {cluster} is not connected; it will be asked when it connects");
            }
        }
        TrustCmd::RotateRoot(args) => rotate::rotate_root(conn, out, args).await?,
        TrustCmd::Status => {
            let r = conn
                .admin
                .trust_status(pb::TrustStatusRequest {})
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            let value = json!({
                "trust_domain": r.trust_domain,
                "bundle_version": r.bundle_version,
                "rotation": r.rotation.as_ref().map(|x| x.stage.clone()).unwrap_or_default(),
                "roots": r.roots.iter().map(|x| json!({"sha256": x.sha256, "subject": x.subject, "expires": time_str(x.expires_unix)})).collect::<Vec<_>>(),
                "clusters": r.clusters.iter().map(|c| json!({
                    "name": c.name,
                    "state": c.state,
                    "intermediate_expires": time_str(c.intermediate_expires_unix),
                    "bundle_acknowledged": c.bundle_version_acked == r.bundle_version,
                })).collect::<Vec<_>>(),
            });
            if out == Output::Table {
                println!(
                    "trust domain {}  bundle version {}  rotation: {}",
                    r.trust_domain,
                    r.bundle_version,
                    r.rotation.as_ref().map_or("idle", |x| x.stage.as_str())
                );
                for x in &r.roots {
                    println!(
                        "root {}  expires {}  sha256 {}",
                        x.subject,
                        time_str(x.expires_unix),
                        x.sha256
                    );
                }
                println!();
            }
            let rows = r
                .clusters
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.state.clone(),
                        time_str(c.intermediate_expires_unix),
                        yes_no(c.bundle_version_acked == r.bundle_version),
                    ]
                })
                .collect();
            print(
                out,
                &value,
                &["CLUSTER", "STATE", "INTERMEDIATE-EXPIRES", "BUNDLE-ACKED"],
                rows,
            )?;
        }
    }
    Ok(())
}

/// `straitctl peer ...`.
async fn peer_cmd(conn: &mut Conn, out: Output, cmd: PeerCmd) -> Result<()> {
    match cmd {
        PeerCmd::Token { ttl } => {
            let r = conn
                .admin
                .peer_token(pb::PeerTokenRequest {
                    ttl_seconds: ttl.as_secs(),
                })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            eprintln!("peer token valid until {}", time_str(r.expires_unix));
            println!("{}", r.token);
        }
        PeerCmd::Establish { token } => {
            let p = conn
                .admin
                .peer_establish(pb::PeerEstablishRequest { token })
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            eprintln!(
                "peered with mesh {} (trust domain {}, {} root(s))",
                p.mesh, p.trust_domain, p.roots
            );
        }
        PeerCmd::List => {
            let r = conn
                .admin
                .list_peers(pb::ListPeersRequest {})
                .await
                .map_err(|s| conn.fail(s))?
                .into_inner();
            let value = Value::Array(
                r.peers
                    .iter()
                    .map(|p| {
                        json!({
                            "mesh": p.mesh,
                            "trust_domain": p.trust_domain,
                            "addresses": p.addresses,
                            "connected": p.connected,
                            "services_imported": p.services_imported,
                            "roots": p.roots,
                            "direction": p.direction,
                        })
                    })
                    .collect(),
            );
            let rows = r
                .peers
                .iter()
                .map(|p| {
                    vec![
                        p.mesh.clone(),
                        p.trust_domain.clone(),
                        yes_no(p.connected),
                        p.services_imported.to_string(),
                        p.roots.to_string(),
                        p.addresses.join(","),
                    ]
                })
                .collect();
            print(
                out,
                &value,
                &[
                    "MESH",
                    "TRUST-DOMAIN",
                    "CONNECTED",
                    "IMPORTED",
                    "ROOTS",
                    "ADDRESSES",
                ],
                rows,
            )?;
        }
    }
    Ok(())
}
