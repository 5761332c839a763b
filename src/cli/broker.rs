//! `strait broker`: run a mesh's trust broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use strait_broker::app::{self, BrokerConfig, StoreSpec};
use strait_ca::TrustDomain;

use super::{UsageError, parse_duration};

/// Run the trust broker of a mesh: cluster join, trust distribution,
/// export/import exchange.
///
/// On first start the broker creates the mesh root in DIR/root (unless
/// --root gives one) and writes admin credentials to DIR/admin/
/// (cert-chain.pem, key.pem, root-cert.pem) for straitctl.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:
  strait broker --data-dir /var/lib/strait-broker --listen 0.0.0.0:15011 \\
      --trust-domain example.org --health-listen 0.0.0.0:15021 --metrics-listen 0.0.0.0:15090
  straitctl --broker 127.0.0.1:15011 --creds /var/lib/strait-broker/admin cluster add east --network net-east
  strait broker migrate --from redb:/var/lib/strait-broker/broker.redb \\
      --to etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379 --mesh-name example.org"
)]
pub struct BrokerArgs {
    #[command(subcommand)]
    command: Option<BrokerCommand>,
    /// Directory for the store, the root (unless --root) and admin credentials.
    #[arg(long, value_name = "DIR", required = true)]
    data_dir: Option<PathBuf>,
    /// Address of the cluster and admin API.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15011")]
    listen: SocketAddr,
    /// Trust domain of the mesh.
    #[arg(long, value_name = "TD", required = true)]
    trust_domain: Option<TrustDomain>,
    /// An existing root directory (root-cert.pem, root-key.pem) to sign with.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Address clusters reach the broker at, put into join tokens
    /// (repeatable; default: the listen address).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Vec<String>,
    /// Health endpoint (/healthz/ready).
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// Prometheus metrics endpoint (/metrics).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Store: `redb` (embedded, in --data-dir; the default) or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (a build with feature `etcd`).
    /// The root and the broker's own keys stay in --data-dir either way.
    #[arg(long, value_name = "STORE", default_value = "redb")]
    store: String,
    #[command(flatten)]
    etcd: EtcdFlags,
    /// Lifetime of cluster intermediates.
    #[arg(long, value_parser = parse_duration, default_value = "7d")]
    intermediate_validity: Duration,
    /// Peer API for federated meshes (brokers of other trust domains).
    #[arg(long, value_name = "ADDR")]
    peer_listen: Option<SocketAddr>,
    /// Address peers reach the peer API at (repeatable; default: --peer-listen).
    #[arg(long, value_name = "HOST:PORT")]
    peer_advertise: Vec<String>,
    /// This mesh's name for its peers (`strait.io/export-to: mesh:<name>`);
    /// default: the trust domain.
    #[arg(long, value_name = "NAME")]
    mesh_name: Option<String>,
    /// How long a cluster may be without a sync stream (its control plane
    /// or `cluster sync` down, or cut off from the broker) before its
    /// exports are withdrawn from every importer, so that traffic fails
    /// over to other clusters; restored when it reconnects. A broker start
    /// gives every cluster this grace. 0 never withdraws.
    #[arg(long, value_parser = parse_grace, default_value = "10s")]
    cluster_grace: Duration,
    /// Contain a stolen cluster CA key: every proxy of the mesh accepts a
    /// workload identity issued by cluster X's intermediate only if X runs
    /// it (clusters report their workloads' service accounts). Without
    /// it, as in Istio, any cluster's intermediate can mint any identity
    /// of the trust domain.
    #[arg(long)]
    bind_identities_to_clusters: bool,
    /// With --store etcd: this replica's name among the mesh's brokers
    /// (default: the host name). Every replica serves clusters and admins;
    /// one, elected by an etcd lease, leads.
    #[arg(long, value_name = "NAME")]
    replica: Option<String>,
    /// With --store etcd: where clusters and admins reach this replica, as
    /// `straitctl status` shows it (default: the listen address).
    #[arg(long, value_name = "HOST:PORT")]
    replica_address: Option<String>,
    /// With --store etcd: the leader's lease. A replica that dies is
    /// replaced as leader within it; a replica that cannot renew it within
    /// it (cut off from etcd) stops serving sync streams.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    lease_ttl: Duration,
}

/// A duration, or a bare `0` (off).
fn parse_grace(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// How to reach etcd, for `--store etcd://...` and `migrate --to`.
#[derive(Debug, Args)]
pub struct EtcdFlags {
    /// etcd: the prefix of every key (default `/strait/<mesh name>/`).
    #[arg(long, value_name = "PREFIX")]
    etcd_prefix: Option<String>,
    /// etcd over TLS: the CA of the members' certificates (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// etcd over TLS: a client certificate (PEM), with --etcd-key.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// etcd over TLS: the client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl EtcdFlags {
    fn given(&self) -> bool {
        self.etcd_prefix.is_some() || self.etcd_ca.is_some() || self.etcd_cert.is_some()
    }
}

#[derive(Debug, clap::Subcommand)]
enum BrokerCommand {
    Migrate(MigrateArgs),
}

/// Copy a mesh's broker state (root hash, clusters, exports, join tokens,
/// rotation state, peers) from one store to another, then read the copy
/// back and compare it row by row. The target must be empty (or hold an
/// unfinished copy, which this finishes); a broker refuses to start on a
/// copy that was not verified. Stop the broker first. The root and the
/// broker's keys are files in --data-dir, not in the store: keep that
/// directory.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  strait broker migrate --from redb:/var/lib/strait-broker/broker.redb \\
      --to etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379 --mesh-name example.org
  strait broker --data-dir /var/lib/strait-broker --trust-domain example.org \\
      --store etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379")]
struct MigrateArgs {
    /// The source: `redb:PATH` (the broker's DATA/broker.redb).
    #[arg(long, value_name = "redb:PATH")]
    from: String,
    /// The target: `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, value_name = "etcd://...")]
    to: String,
    /// The mesh name the broker runs with (`--mesh-name`, else its trust
    /// domain): the target's prefix is `/strait/<mesh>/` unless
    /// --etcd-prefix.
    #[arg(long, value_name = "NAME", required_unless_present = "etcd_prefix")]
    mesh_name: Option<String>,
    #[command(flatten)]
    etcd: EtcdFlags,
}

/// The store `--store` and the `--etcd-*` flags name.
fn store_spec(store: &str, mesh: &str, flags: &EtcdFlags) -> Result<StoreSpec> {
    if store == "redb" {
        if flags.given() {
            return Err(UsageError("--etcd-* flags need --store etcd://...".into()).into());
        }
        return Ok(StoreSpec::Redb);
    }
    if !store.starts_with("etcd://") {
        return Err(UsageError(format!(
            "--store {store:?}: expected redb or etcd://HOST:PORT[,HOST:PORT...]"
        ))
        .into());
    }
    etcd_spec(store, mesh, flags)
}

#[cfg(feature = "etcd")]
fn etcd_spec(store: &str, mesh: &str, flags: &EtcdFlags) -> Result<StoreSpec> {
    use anyhow::Context;
    let mut etcd = strait_broker::store::etcd::EtcdConfig::parse(store, mesh)
        .map_err(|e| UsageError(e.to_string()))?;
    if let Some(prefix) = &flags.etcd_prefix {
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err(UsageError(format!(
                "--etcd-prefix {prefix:?}: must start and end with /"
            ))
            .into());
        }
        etcd.prefix = prefix.clone();
    }
    let read = |flag: &str, p: &PathBuf| {
        std::fs::read(p).with_context(|| format!("{flag} {}", p.display()))
    };
    if let Some(ca) = &flags.etcd_ca {
        etcd.ca = Some(read("--etcd-ca", ca)?);
    }
    if let (Some(cert), Some(key)) = (&flags.etcd_cert, &flags.etcd_key) {
        if etcd.ca.is_none() {
            return Err(UsageError("--etcd-cert needs --etcd-ca (TLS)".into()).into());
        }
        etcd.identity = Some((read("--etcd-cert", cert)?, read("--etcd-key", key)?));
    }
    Ok(StoreSpec::Etcd(etcd))
}

#[cfg(not(feature = "etcd"))]
fn etcd_spec(store: &str, _mesh: &str, _flags: &EtcdFlags) -> Result<StoreSpec> {
    Err(UsageError(format!(
        "--store {store}: this strait was built without etcd support \
         (cargo build --features etcd; its build needs protoc, Debian protobuf-compiler)"
    ))
    .into())
}

/// `strait broker migrate`.
fn migrate(args: MigrateArgs) -> Result<()> {
    let path = args.from.strip_prefix("redb:").ok_or_else(|| {
        UsageError(format!(
            "--from {:?}: expected redb:PATH (the broker's DATA/broker.redb)",
            args.from
        ))
    })?;
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(UsageError(format!("--from {}: no such file", args.from)).into());
    }
    let mesh = args.mesh_name.clone().unwrap_or_default();
    match store_spec(&args.to, &mesh, &args.etcd)? {
        StoreSpec::Redb => Err(UsageError(format!(
            "--to {:?}: expected etcd://HOST:PORT[,HOST:PORT...]",
            args.to
        ))
        .into()),
        #[cfg(feature = "etcd")]
        StoreSpec::Etcd(etcd) => copy_to_etcd(&args, &path, etcd),
    }
}

/// Copies the redb store at `path` into `target`, with a line per
/// transaction on stderr and the summary on stdout.
#[cfg(feature = "etcd")]
fn copy_to_etcd(
    args: &MigrateArgs,
    path: &std::path::Path,
    target: strait_broker::store::etcd::EtcdConfig,
) -> Result<()> {
    let from = strait_broker::store::RedbStore::open(path)?;
    let name = format!("{} {}", args.to, target.prefix);
    let to = strait_broker::store::etcd::EtcdStore::open(target)?;
    eprintln!("copying {} into {name}", args.from);
    let copied = strait_broker::store::migrate::migrate(&from, &to, &args.from, |done, total| {
        eprintln!("  {done}/{total} rows");
    })?;
    let tables: Vec<String> = copied
        .tables
        .iter()
        .map(|(t, n)| format!("{} {n}", t.name()))
        .collect();
    println!(
        "migrated {} rows ({}) from {} to {name}{}; verified",
        copied.rows(),
        tables.join(", "),
        args.from,
        if copied.resumed {
            ", finishing an earlier copy"
        } else {
            ""
        }
    );
    Ok(())
}

pub fn run(args: BrokerArgs) -> Result<()> {
    if let Some(BrokerCommand::Migrate(m)) = args.command {
        return migrate(m);
    }
    let (Some(data_dir), Some(trust_domain)) = (args.data_dir, args.trust_domain) else {
        return Err(UsageError("--data-dir and --trust-domain are needed".into()).into());
    };
    let mesh = args
        .mesh_name
        .clone()
        .unwrap_or_else(|| trust_domain.to_string());
    let store = store_spec(&args.store, &mesh, &args.etcd)?;
    let config = BrokerConfig {
        store,
        data_dir,
        listen: args.listen,
        trust_domain,
        root_dir: args.root,
        health_listen: args.health_listen,
        metrics_listen: args.metrics_listen,
        advertise: args.advertise,
        intermediate_validity: args.intermediate_validity,
        peer_listen: args.peer_listen,
        peer_advertise: args.peer_advertise,
        mesh_name: args.mesh_name,
        cluster_grace: (!args.cluster_grace.is_zero()).then_some(args.cluster_grace),
        bind_identities: args.bind_identities_to_clusters,
        replica: args.replica,
        replica_address: args.replica_address,
        lease_ttl: args.lease_ttl,
    };
    tracing::info!(?config, "starting broker");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        app::run(config, shutdown_signal()).await?;
        tracing::info!("broker stopped");
        Ok(())
    })
}

pub use strait_runtime::rt::shutdown_signal;
