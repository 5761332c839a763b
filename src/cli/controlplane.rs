//! `strait controlplane`: the local control plane of one cluster, and its
//! `token` helper for workload bootstrap tokens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use strait_controlplane::kube::inject::Interception;

use super::parse_duration;

/// `--inject-interception`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InjectInterception {
    Explicit,
    Transparent,
}

/// Run a cluster's control plane: config from a directory or the
/// Kubernetes API, the broker
/// link (exports out, imports and trust in), workload certificates (Istio's
/// CSR API) and discovery for sidecars and gateways, on one mTLS port.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  # first start: join the mesh with a token from `straitctl cluster add east ...`
  strait controlplane --cluster east --network net-east --config-dir /etc/strait/config \\
      --state-dir /var/lib/strait --join-token east.token --listen 0.0.0.0:15012 \\
      --gateway 203.0.113.10:15443 --health-listen 0.0.0.0:15021 --metrics-listen 0.0.0.0:15090
  # in a Kubernetes cluster (config from the API, imports applied to it),
  # injecting sidecars into pods of namespaces labelled strait.io/inject=enabled
  strait controlplane --kube --cluster east --network net-east --state-dir /var/lib/strait \\
      --join-token /etc/strait/join/token --gateway 203.0.113.10:15443 \\
      --inject-listen 0.0.0.0:15017 --inject-image registry.example/strait:0.1
  # the strictest path normalization (Istio's DECODE_AND_MERGE_SLASHES)
  strait controlplane --cluster east --network net-east --config-dir /etc/strait/config \\
      --state-dir /var/lib/strait --path-normalization DECODE_AND_MERGE_SLASHES
  # primary-remote: also serve cluster `remote`, whose config is in /etc/strait/remote
  strait controlplane --cluster primary --network net-primary --config-dir /etc/strait/config \\
      --state-dir /var/lib/strait --remote remote=/etc/strait/remote --gateway 203.0.113.10:15443
  # a bootstrap token for a workload's sidecar
  strait controlplane token --state-dir /var/lib/strait --namespace demo \\
      --service-account echo --workload echo-v1 --out echo-v1.token"
)]
pub struct ControlPlaneArgs {
    #[command(subcommand)]
    command: Option<ControlPlaneCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum ControlPlaneCommand {
    /// Issue a bootstrap token with which a workload's sidecar gets its
    /// first certificate (it renews with that certificate afterwards).
    #[command(
        after_help = "Example:\n  strait controlplane token --state-dir /var/lib/strait/east --namespace demo \\\n      --service-account echo --workload echo-1 --ttl 1h --out echo-1.token\n  strait sidecar --token echo-1.token ...   # the sidecar's first certificate"
    )]
    Token(TokenArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// This cluster's name (must match the join token's).
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// This cluster's network.
    #[arg(long, value_name = "NET")]
    network: Option<String>,
    /// Directory of Kubernetes-style YAML (watched; imports are written to
    /// its imported/ subdirectory).
    #[arg(long, value_name = "DIR", conflicts_with = "kube")]
    config_dir: Option<PathBuf>,
    /// Read the config from the Kubernetes API instead (KUBECONFIG,
    /// ~/.kube/config or the in-cluster service account): Services,
    /// EndpointSlices, Pods, Nodes, Namespaces and the Istio/MCS resources.
    /// Imports are applied to the API; workloads may also bootstrap with
    /// service-account tokens (audience istio-ca, checked by TokenReview);
    /// the mesh roots are kept in ConfigMap strait-ca-root-cert (key
    /// root-cert.pem) of every namespace, for sidecars to mount (in the
    /// --remote clusters' namespaces too).
    #[arg(long)]
    kube: bool,
    /// The cluster's state: intermediate CA (cacerts/), broker credentials,
    /// the token key.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Join token file (from `straitctl cluster add`), used on first start.
    #[arg(long, value_name = "FILE")]
    join_token: Option<PathBuf>,
    /// Discovery and certificate API (mTLS).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Health endpoints (/healthz/ready, /healthz/live).
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// Debug endpoints: /debug/nacks (the last config each proxy refused,
    /// JSON) and /debug/config (the config objects in force and every
    /// rejected file or object with its reason, JSON). Unauthenticated, so loopback by default (127.0.0.1:15014;
    /// not served, with a warning, when another process holds that port);
    /// `off` serves none.
    #[arg(long, value_name = "ADDR|off", value_parser = strait_controlplane::app::DebugListen::parse)]
    debug_listen: Option<strait_controlplane::app::DebugListen>,
    /// Prometheus metrics (/metrics).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// This cluster's east-west gateway address (host:port), published to
    /// importers (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    gateway: Vec<String>,
    /// Reach other networks through QUIC tunnels via the local gateway's
    /// egress listener at this address (default: SNI passthrough straight
    /// to the remote gateways).
    #[arg(long, value_name = "HOST:PORT")]
    quic_egress: Option<String>,
    /// Also serve a remote cluster that has no control plane of its own
    /// (primary-remote): NAME=CONFIG_DIR (with --kube: NAME=KUBECONFIG of
    /// the remote's API), its Services, WorkloadEntries (pods), Namespaces
    /// and ServiceExports (policy comes from this cluster's config). Its network is the `topology.istio.io/network` label of its
    /// strait-system Namespace, its gateways the Services labelled with
    /// that network (port 15443, spec.externalIPs). Its proxies name it in
    /// their node metadata (`strait sidecar --cluster NAME`). Repeatable.
    #[arg(long, value_name = "NAME=CONFIG_DIR|KUBECONFIG")]
    remote: Vec<strait_controlplane::remote::RemoteSpec>,
    /// Quiet time before pushing a config change to proxies.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    debounce: Duration,
    /// The longest workload certificate the CA issues: a proxy asking for
    /// more (`--cert-ttl`) gets this. The broker is told, and a root
    /// rotation's `finish` waits this long after the cluster switched to
    /// its new intermediate, for the last leaf under the old root to
    /// expire.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "24h")]
    max_cert_ttl: Duration,
    /// The largest config file read (--config-dir and --remote
    /// directories), in bytes; a larger file is rejected by name without
    /// being read, and its objects keep their last good version. The
    /// default is the Kubernetes API server's 3 MiB request limit. YAML
    /// bombs are refused by a fixed budget: 10000 documents, 500000 nodes,
    /// nesting 64 deep, 10000 aliases expanding to 20000 nodes per file.
    #[arg(long, value_name = "BYTES", default_value_t = strait_controlplane::source::DEFAULT_MAX_FILE_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_config_file_bytes: u64,
    /// The IPv4 range imported services get their ClusterSet IP from, or
    /// `off`. Each imported service gets one address, kept across restarts
    /// and changes, in its ServiceEntry's `addresses` and its
    /// ServiceImport's `spec.ips`: CoreDNS's multicluster plugin answers
    /// `<svc>.<ns>.svc.clusterset.local` with it, and sidecars that capture
    /// traffic (iptables) know a connection to it is for that service. The
    /// default sits beside Istio's own auto-allocation range
    /// (240.240.0.0/16), not in it.
    #[arg(long, value_name = "CIDR|off", default_value = strait_model::imports::vips::DEFAULT_RANGE)]
    clusterset_ip_range: String,
    /// Serve the sidecar injection webhook here (HTTPS, `POST /inject`,
    /// with this control plane's certificate for
    /// controlplane.strait-system.svc; Istio's port is 15017). A pod it
    /// admits gets `strait-sidecar` (explicit mode: the app's http_proxy
    /// is the sidecar; with the pod annotation
    /// `sidecar.strait.io/interception: transparent`, an iptables init
    /// container instead, and the app's httpGet, tcpSocket and grpc probes
    /// rewritten to the sidecar's /app-health/ paths on port 15021 unless
    /// `sidecar.strait.io/rewriteAppHTTPProbers: "false"`) unless it is
    /// annotated `sidecar.strait.io/inject: "false"`. Needs --kube.
    #[arg(long, value_name = "ADDR", requires = "kube")]
    inject_listen: Option<SocketAddr>,
    /// The image injected sidecars run.
    #[arg(long, value_name = "IMAGE", default_value = "strait:dev")]
    inject_image: String,
    /// How injected pods' traffic reaches the sidecar unless a pod's
    /// `sidecar.strait.io/interception` annotation says otherwise:
    /// `explicit` (the app's http_proxy; no privileged init container, so
    /// it fits namespaces whose Pod Security level is restricted) or
    /// `transparent` (iptables in an init container, as Istio's default).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = InjectInterception::Explicit, requires = "inject_listen")]
    inject_interception: InjectInterception,
    /// The control plane address injected sidecars use.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "controlplane.strait-system.svc:15012"
    )]
    inject_control_plane: String,
    /// How every sidecar served normalizes HTTP request paths before
    /// AuthorizationPolicy `paths`/`notPaths`, VirtualService `uri`
    /// matches and forwarding to the app (Istio's
    /// meshConfig.pathNormalization; the app sees the normalized path).
    /// BASE: RFC 3986 dot segments (`/a/../b` is `/b`, `%2e` counts as a
    /// dot), `\` to `/`, percent-encoded unreserved characters decoded
    /// (`/%61dmin` is `/admin`); NUL (`%00`) and a `%` without two hex
    /// digits are answered 400; `%2F` and `%5C` are kept. MERGE_SLASHES:
    /// BASE, then `//` merged. DECODE_AND_MERGE_SLASHES: `%2F` and `%5C`
    /// decoded first, then MERGE_SLASHES. NONE: raw paths (policies can
    /// then be bypassed, CVE-2021-31920).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "BASE",
        value_parser = ["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"],
        ignore_case = true
    )]
    path_normalization: String,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The control plane's state directory (holds the token key).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    #[arg(long, value_name = "NS")]
    namespace: String,
    #[arg(long, value_name = "SA")]
    service_account: String,
    /// The workload's name.
    #[arg(long, value_name = "NAME")]
    workload: String,
    /// How long the token may be used for a first certificate.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    ttl: Duration,
    /// Write the token here (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

fn required<T: Clone>(v: &Option<T>, flag: &str) -> Result<T> {
    v.clone()
        .ok_or_else(|| super::UsageError(format!("{flag} is required")).into())
}

pub fn run(args: ControlPlaneArgs) -> Result<()> {
    match args.command {
        Some(ControlPlaneCommand::Token(t)) => token(t),
        None => serve(args.run),
    }
}

fn token(t: TokenArgs) -> Result<()> {
    // The key is the control plane's: made in a directory that does not
    // exist, it would sign tokens no control plane accepts.
    if !t.state_dir.is_dir() {
        return Err(super::UsageError(format!(
            "--state-dir {}: no such directory (the control plane's --state-dir, which holds its token key)",
            t.state_dir.display()
        ))
        .into());
    }
    let issuer = strait_controlplane::ca::TokenIssuer::load_or_create(
        &t.state_dir.join(strait_controlplane::ca::TOKEN_KEY_FILE),
    )
    .with_context(|| format!("--state-dir {}", t.state_dir.display()))?;
    let token = issuer
        .issue(&t.namespace, &t.service_account, &t.workload, t.ttl)
        .map_err(|e| super::UsageError(e.to_string()))?;
    match &t.out {
        Some(path) => {
            strait_ca::layout::write_key(path, &token, true)
                .with_context(|| path.display().to_string())?;
            eprintln!(
                "token for {}/{} (service account {}) written to {}",
                t.namespace,
                t.workload,
                t.service_account,
                path.display()
            );
        }
        None => println!("{token}"),
    }
    Ok(())
}

fn serve(r: RunArgs) -> Result<()> {
    let cfg = strait_controlplane::app::AppConfig {
        cluster: required(&r.cluster, "--cluster")?,
        network: required(&r.network, "--network")?,
        source: match (r.kube, &r.config_dir) {
            (true, _) => strait_controlplane::app::ConfigSource::Kube,
            (false, Some(dir)) => strait_controlplane::app::ConfigSource::Dir(dir.clone()),
            (false, None) => {
                return Err(
                    super::UsageError("--config-dir DIR or --kube is required".into()).into(),
                );
            }
        },
        state_dir: required(&r.state_dir, "--state-dir")?,
        join_token: r.join_token,
        listen: r.listen,
        health_listen: r.health_listen,
        metrics_listen: r.metrics_listen,
        debug_listen: r.debug_listen.unwrap_or_default(),
        gateways: r.gateway,
        quic_egress: r.quic_egress,
        debounce: r.debounce,
        max_cert_ttl: r.max_cert_ttl,
        config_limits: strait_controlplane::source::Limits {
            max_file_bytes: r.max_config_file_bytes,
        },
        remotes: r.remote,
        inject: r
            .inject_listen
            .map(|listen| strait_controlplane::app::InjectServe {
                listen,
                config: strait_controlplane::kube::inject::InjectConfig {
                    image: r.inject_image.clone(),
                    control_plane: r.inject_control_plane.clone(),
                    interception: match r.inject_interception {
                        InjectInterception::Explicit => Interception::Explicit,
                        InjectInterception::Transparent => Interception::Transparent,
                    },
                },
            }),
        path_normalization: r
            .path_normalization
            .parse()
            .map_err(|e| super::UsageError(format!("--path-normalization: {e}")))?,
        clusterset_ips: match r.clusterset_ip_range.as_str() {
            "off" => None,
            range => Some(
                range
                    .parse()
                    .map_err(|e| super::UsageError(format!("--clusterset-ip-range: {e}")))?,
            ),
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        strait_controlplane::app::run(cfg, super::broker::shutdown_signal()).await
    })?;
    tracing::info!("control plane stopped");
    Ok(())
}
