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
#[command(after_help = "Examples:
  strait broker --data-dir /var/lib/strait-broker --listen 0.0.0.0:15011 \\
      --trust-domain example.org --health-listen 0.0.0.0:15021 --metrics-listen 0.0.0.0:15090
  straitctl --broker 127.0.0.1:15011 --creds /var/lib/strait-broker/admin cluster add east --network net-east")]
pub struct BrokerArgs {
    /// Directory for the store, the root (unless --root) and admin credentials.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Address of the cluster and admin API.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15011")]
    listen: SocketAddr,
    /// Trust domain of the mesh.
    #[arg(long, value_name = "TD")]
    trust_domain: TrustDomain,
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
}

/// A duration, or a bare `0` (off).
fn parse_grace(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// The store `--store` and the `--etcd-*` flags name.
fn store_spec(args: &BrokerArgs) -> Result<StoreSpec> {
    if args.store == "redb" {
        if args.etcd_prefix.is_some() || args.etcd_ca.is_some() || args.etcd_cert.is_some() {
            return Err(UsageError("--etcd-* flags need --store etcd://...".into()).into());
        }
        return Ok(StoreSpec::Redb);
    }
    if !args.store.starts_with("etcd://") {
        return Err(UsageError(format!(
            "--store {:?}: expected redb or etcd://HOST:PORT[,HOST:PORT...]",
            args.store
        ))
        .into());
    }
    etcd_spec(args)
}

#[cfg(feature = "etcd")]
fn etcd_spec(args: &BrokerArgs) -> Result<StoreSpec> {
    use anyhow::Context;
    let mesh = args
        .mesh_name
        .clone()
        .unwrap_or_else(|| args.trust_domain.to_string());
    let mut etcd = strait_broker::store::etcd::EtcdConfig::parse(&args.store, &mesh)
        .map_err(|e| UsageError(e.to_string()))?;
    if let Some(prefix) = &args.etcd_prefix {
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
    if let Some(ca) = &args.etcd_ca {
        etcd.ca = Some(read("--etcd-ca", ca)?);
    }
    if let (Some(cert), Some(key)) = (&args.etcd_cert, &args.etcd_key) {
        if etcd.ca.is_none() {
            return Err(UsageError("--etcd-cert needs --etcd-ca (TLS)".into()).into());
        }
        etcd.identity = Some((read("--etcd-cert", cert)?, read("--etcd-key", key)?));
    }
    Ok(StoreSpec::Etcd(etcd))
}

#[cfg(not(feature = "etcd"))]
fn etcd_spec(args: &BrokerArgs) -> Result<StoreSpec> {
    Err(UsageError(format!(
        "--store {}: this strait was built without etcd support \
         (cargo build --features etcd; its build needs protoc, Debian protobuf-compiler)",
        args.store
    ))
    .into())
}

pub fn run(args: BrokerArgs) -> Result<()> {
    let store = store_spec(&args)?;
    let config = BrokerConfig {
        store,
        data_dir: args.data_dir,
        listen: args.listen,
        trust_domain: args.trust_domain,
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
