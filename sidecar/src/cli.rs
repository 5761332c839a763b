//! The sidecar's command line, shared by `strait sidecar` and the
//! `strait-sidecar` binary: the flags, their [`Config`], and the
//! `iptables` subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use strait_runtime::cli::parse_duration;
use strait_runtime::http::Ready;

use crate::config::WorkloadRef;
use crate::role::{self, Config};

/// `strait-sidecar`'s command line: exactly the arguments of `strait
/// sidecar`, and the logging flags.
#[derive(Debug, clap::Parser)]
#[command(name = "strait-sidecar", version)]
pub struct SidecarCli {
    #[command(flatten)]
    pub log: strait_runtime::cli::LogArgs,
    #[command(flatten)]
    pub args: SidecarArgs,
}

/// Why a sidecar command failed: a usage error (exit 64), a check that
/// said no (exit 1, printed as is), or a failure (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Rules(#[from] crate::transparent::RestoreError),
    #[error(transparent)]
    Role(#[from] role::RoleError),
}

/// `--outbound-traffic-policy` (Istio's `outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboundTrafficPolicy {
    AllowAny,
    RegistryOnly,
}

/// Where the access log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogTarget {
    /// One JSON line per request on stdout.
    Stdout,
    /// Not written.
    Off,
}

impl From<OutboundTrafficPolicy> for crate::OutboundPolicy {
    fn from(p: OutboundTrafficPolicy) -> Self {
        match p {
            OutboundTrafficPolicy::AllowAny => crate::OutboundPolicy::AllowAny,
            OutboundTrafficPolicy::RegistryOnly => crate::OutboundPolicy::RegistryOnly,
        }
    }
}

/// Run a workload's sidecar: an HTTP proxy for the app's outbound calls
/// (mTLS to the destination, Istio routing and policy) and an mTLS
/// listener in front of the app (PeerAuthentication, AuthorizationPolicy,
/// x-forwarded-client-cert).
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Example:
  strait sidecar --workload echo-v1 --namespace demo --control-plane 10.0.0.5:15012 \\
      --token /var/run/strait/token --root-cert /var/run/strait/root-cert.pem \\
      --inbound 0.0.0.0:15006 --app 127.0.0.1:8080 --outbound 127.0.0.1:15001 \\
      --health-listen 0.0.0.0:15021 --metrics-listen 0.0.0.0:15090
  # a pod serving HTTP on 8080 and gRPC on 9090: add --app-ports 9090
  # then, from the app: curl -x http://127.0.0.1:15001 http://echo.demo:8080/
  # (gRPC: dial 127.0.0.1:15001 with authority echo.demo:8080)
  # transparent capture rules for a pod's init container (istio-init-like)
  strait sidecar iptables --print
  strait sidecar iptables --apply     # in the pod's network namespace, as its init container"
)]
pub struct SidecarArgs {
    #[command(subcommand)]
    pub command: Option<SidecarCommand>,
    /// The workload's name (as its WorkloadEntry or pod is named).
    #[arg(long, value_name = "NAME", required = true)]
    pub workload: Option<String>,
    /// The workload's namespace.
    #[arg(long, value_name = "NS", required = true)]
    pub namespace: Option<String>,
    /// The control plane (`host:port`, discovery and CSR).
    #[arg(long, value_name = "ADDR", required = true)]
    pub control_plane: Option<String>,
    /// The bootstrap token file (from `strait controlplane token`, or in
    /// Kubernetes the pod's projected service account token, audience
    /// istio-ca, with --service-account). Read again whenever the token is
    /// needed (the first certificate, or after one expired), so a rotated
    /// token file is followed.
    #[arg(long, value_name = "FILE", required = true)]
    pub token: Option<PathBuf>,
    /// The mesh root certificate(s), to verify the control plane.
    #[arg(long, value_name = "FILE", required = true)]
    pub root_cert: Option<PathBuf>,
    /// The cluster this workload runs in, sent to the control plane as
    /// node metadata CLUSTER_ID. Needed in a remote cluster of a
    /// primary-remote mesh (the primary's control plane serves several
    /// clusters); default: the control plane's own cluster.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// The service account (default: from the token).
    #[arg(long, value_name = "SA")]
    pub service_account: Option<String>,
    /// The mTLS listener.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15006")]
    pub inbound: SocketAddr,
    /// The app, plain HTTP: HTTP/1.1, or HTTP/2 with prior knowledge for
    /// callers that spoke HTTP/2 (gRPC).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub app: SocketAddr,
    /// Other ports the app serves on --app's host (a pod with several
    /// container ports), comma-separated. A request or connection whose
    /// workload port (the target port of the service port it came for,
    /// or the port a redirected caller dialed) is one of them goes to that
    /// port; everything else goes to --app.
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    pub app_ports: Vec<u16>,
    /// The HTTP proxy for the app's outbound calls (HTTP/1.1, or HTTP/2
    /// with prior knowledge: gRPC clients naming the service in
    /// `:authority`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,
    /// What redirected traffic for destinations outside the mesh gets
    /// (transparent mode): `allow-any` sends it on unchanged to where the
    /// app was going (TLS to outside hosts, databases, HTTP to unknown
    /// hosts), as Istio's default `ALLOW_ANY` does; `registry-only`
    /// refuses it.
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = OutboundTrafficPolicy::AllowAny)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// The JSON access log, one line per request or TCP connection:
    /// `stdout`, or `off` (Istio's default; the metrics still count every
    /// request).
    #[arg(long, value_name = "WHERE", value_enum, default_value_t = AccessLogTarget::Stdout)]
    pub access_log: AccessLogTarget,
    /// Health endpoint (/healthz/ready: ready once it has a certificate and
    /// a first config).
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
    /// The app's probes, answered on the health listener at
    /// /app-health/<container>/<livez|readyz|startupz> by probing the app
    /// at --app-probe-address: JSON from those paths to Kubernetes `httpGet` (HTTP,
    /// or HTTPS without verifying the app's certificate, as the kubelet),
    /// `tcpSocket` or `grpc` (a health check over h2c) probes (ports as
    /// numbers), as the injector writes it
    /// for transparent interception, where the kubelet's own probes would
    /// meet the inbound mTLS listener.
    #[arg(long, value_name = "JSON", env = strait_model::probe::ENV)]
    pub app_probers: Option<String>,
    /// Where --app-probers probe the app: the pod's IP, where the kubelet
    /// sends its probes (the injector passes $(POD_IP)), so that an app
    /// listening on that address alone passes as it would without the
    /// sidecar; or loopback. To a non-loopback IPv4 address the probes
    /// come from 127.0.0.6, which `strait sidecar iptables` lets through
    /// to the app.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub app_probe_address: std::net::IpAddr,
    /// Prometheus metrics (/stats/prometheus).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Requested workload certificate lifetime.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
    /// On SIGTERM, let in-flight requests finish for up to this long.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub drain: Duration,
    /// Worker threads. With 1 (the default, like Envoy's --concurrency 1)
    /// everything runs on one thread with tokio's current-thread scheduler:
    /// no cross-thread wake-ups on the request path and no idle worker
    /// stacks. More use the multi-thread scheduler, for busier workloads.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub worker_threads: usize,
}

#[derive(Debug, clap::Subcommand)]
pub enum SidecarCommand {
    /// The iptables rules (IPv4, nat table) that redirect a pod's traffic
    /// to the sidecar, as Istio's init container sets them up: `--print`
    /// them or `--apply` them.
    #[command(
        after_help = "Example:\n  strait sidecar iptables --print                       # review the rules\n  strait sidecar iptables --apply --exclude-inbound-port 8081   # in the pod's network namespace (CAP_NET_ADMIN)"
    )]
    Iptables(IptablesArgs),
}

#[derive(Debug, Args)]
pub struct IptablesArgs {
    /// Print the commands (for review, or for an init container's shell:
    /// `strait sidecar iptables --print | sh`).
    #[arg(long, conflicts_with = "apply")]
    pub print: bool,
    /// Apply the rules in this network namespace, as one
    /// `iptables-restore --noflush` transaction (all or nothing; needs
    /// CAP_NET_ADMIN and iptables). Refused when they are applied already.
    #[arg(long)]
    pub apply: bool,
    /// The uid the sidecar runs as (its own traffic is not redirected).
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The inbound (mTLS) listener's port.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The outbound listener's port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports not to redirect (repeatable; 15021 and 15090 always).
    #[arg(long, value_name = "PORT")]
    pub exclude_inbound_port: Vec<u16>,
    /// Outbound CIDRs not to redirect (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub exclude_outbound_cidr: Vec<String>,
}

/// `iptables --print` or `--apply`.
pub fn iptables(a: IptablesArgs) -> Result<(), CliError> {
    if !a.print && !a.apply {
        return Err(CliError::Usage(
            "say what to do with the rules: --print them (e.g. `strait sidecar iptables --print | sh`) \
             or --apply them in this network namespace"
                .into(),
        ));
    }
    let mut o = crate::transparent::InterceptOptions {
        proxy_uid: a.proxy_uid,
        inbound_port: a.inbound_port,
        outbound_port: a.outbound_port,
        ..Default::default()
    };
    o.exclude_inbound_ports.extend(a.exclude_inbound_port);
    o.exclude_outbound_cidrs.extend(a.exclude_outbound_cidr);
    let rules =
        crate::transparent::iptables_rules(&o).map_err(|e| CliError::Usage(e.to_string()))?;
    if !a.apply {
        for r in rules {
            println!("{r}");
        }
        return Ok(());
    }
    let input = crate::transparent::restore_input(&rules)?;
    // iptables-restore would flush our chains and append the jumps to
    // them twice: once per network namespace is the rule.
    let present = std::process::Command::new("iptables")
        .args(["-t", "nat", "-n", "-L", "STRAIT_OUTPUT"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| CliError::Failed(format!("cannot run iptables (is it installed?): {e}")))?;
    if present.success() {
        return Err(CliError::Rejected(
            "the rules are applied in this network namespace already (chain STRAIT_OUTPUT exists in the nat table)".into(),
        ));
    }
    let mut child = std::process::Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            CliError::Failed(format!(
                "cannot run iptables-restore (is iptables installed?): {e}"
            ))
        })?;
    {
        use std::io::Write;
        let io = |e: std::io::Error| CliError::Failed(format!("iptables-restore: {e}"));
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| CliError::Failed("iptables-restore: no stdin".into()))?;
        stdin.write_all(input.as_bytes()).map_err(io)?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CliError::Failed(format!("iptables-restore: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("already exists") || err.contains("File exists") {
            " (the rules are applied in this network namespace already)"
        } else {
            ""
        };
        return Err(CliError::Rejected(format!(
            "iptables-restore refused the rules{hint}: {}",
            err.trim()
        )));
    }
    eprintln!(
        "{} rules applied (nat table): inbound to {}, outbound to {}, uid {} spared",
        rules.len(),
        o.inbound_port,
        o.outbound_port,
        o.proxy_uid
    );
    Ok(())
}

/// The service account a token names (its claims are readable; the
/// control plane checks the signature).
fn token_service_account(token: &str) -> Option<String> {
    use base64::Engine;
    let body = token.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["sa"].as_str().map(str::to_string)
}

impl SidecarArgs {
    /// The sidecar's [`Config`] (the token and roots are read here, so that
    /// their errors name the flag).
    pub fn config(&self) -> Result<Config, CliError> {
        let missing = |f: &str| CliError::Usage(format!("--{f} is required"));
        let workload = self.workload.clone().ok_or_else(|| missing("workload"))?;
        let namespace = self.namespace.clone().ok_or_else(|| missing("namespace"))?;
        let control_plane = self
            .control_plane
            .clone()
            .ok_or_else(|| missing("control-plane"))?;
        let token_file = self.token.clone().ok_or_else(|| missing("token"))?;
        let root_cert = self.root_cert.clone().ok_or_else(|| missing("root-cert"))?;
        if self.worker_threads == 0 {
            return Err(CliError::Usage(
                "--worker-threads must be at least 1".into(),
            ));
        }
        let app_probers = match &self.app_probers {
            None => None,
            Some(_) if self.health_listen.is_none() => {
                return Err(CliError::Usage(
                    "--app-probers are answered on the health listener: give --health-listen"
                        .into(),
                ));
            }
            Some(json) => Some(Arc::new(
                strait_model::probe::AppProbers::parse(json)
                    .map_err(|e| CliError::Usage(format!("--app-probers: {e}")))?,
            )),
        };
        let token = std::fs::read_to_string(&token_file)
            .map_err(|e| CliError::Failed(format!("--token {}: {e}", token_file.display())))?;
        let sa = match &self.service_account {
            Some(sa) => sa.clone(),
            None => token_service_account(&token).ok_or_else(|| {
                CliError::Usage(format!(
                    "--token {}: not a strait workload token; pass --service-account too",
                    token_file.display()
                ))
            })?,
        };
        let (td, root) = strait_ca::layout::load_root_cert(&root_cert)
            .map_err(|e| CliError::Failed(format!("--root-cert: {e}")))?;
        let spiffe_id = strait_ca::SpiffeId::from_segments(&td, &["ns", &namespace, "sa", &sa])
            .map_err(|e| CliError::Usage(format!("--namespace/--service-account: {e}")))?;
        let config = Config {
            workload: WorkloadRef {
                name: workload,
                namespace,
            },
            spiffe_id,
            control_plane,
            token,
            token_file,
            td,
            root,
            cluster: self.cluster.clone(),
            inbound: self.inbound,
            app: self.app,
            app_ports: self.app_ports.clone(),
            outbound: self.outbound,
            outbound_policy: self.outbound_traffic_policy.into(),
            access_log: self.access_log == AccessLogTarget::Stdout,
            health_listen: self.health_listen,
            app_probers,
            app_probe_address: self.app_probe_address,
            metrics_listen: self.metrics_listen,
            cert_ttl: self.cert_ttl,
            drain: self.drain,
        };
        config
            .validate()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(config)
    }
}

/// Runs the sidecar (or its `iptables` subcommand) with these flags.
pub fn run(args: SidecarArgs) -> Result<(), CliError> {
    if let Some(SidecarCommand::Iptables(a)) = args.command {
        return iptables(a);
    }
    let config = args.config()?;
    let runtime = strait_runtime::rt::build(Some(args.worker_threads))
        .map_err(|e| CliError::Failed(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let ready = Ready::default();
        strait_runtime::cli::announce_when_ready(
            ready.clone(),
            "sidecar",
            vec![
                ("inbound (mTLS)", Some(config.inbound.to_string())),
                ("outbound (HTTP proxy)", Some(config.outbound.to_string())),
                ("health", config.health_listen.map(|a| a.to_string())),
                ("metrics", config.metrics_listen.map(|a| a.to_string())),
            ],
        );
        role::run(config, ready, strait_runtime::rt::shutdown_signal()).await?;
        Ok(())
    })
}
