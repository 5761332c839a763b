//! `strait sidecar`: the proxy next to a workload. Its key is made here,
//! its certificate comes from the control plane's CSR API (bootstrap token
//! first, then renewals with the certificate), its config from the control
//! plane's discovery service; it keeps serving with the last good config
//! while the control plane is away.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use prometheus_client::registry::Registry;
use strait_proto::strait::mesh::v1::{self as pb, type_url};
use strait_proxy_client::identity::{IdentityConfig, IdentityManager};
use strait_proxy_client::xds::{self, Resources, Validator, XdsClientConfig};
use strait_runtime::http::{self, Ready};
use strait_sidecar::config::{MeshConfig, WorkloadRef};
use strait_sidecar::identity;

use super::parse_duration;

/// `--outbound-traffic-policy` (Istio's `outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboundTrafficPolicy {
    AllowAny,
    RegistryOnly,
}

/// Where the access log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AccessLogTarget {
    /// One JSON line per request on stdout.
    Stdout,
    /// Not written.
    Off,
}

impl From<OutboundTrafficPolicy> for strait_sidecar::OutboundPolicy {
    fn from(p: OutboundTrafficPolicy) -> Self {
        match p {
            OutboundTrafficPolicy::AllowAny => strait_sidecar::OutboundPolicy::AllowAny,
            OutboundTrafficPolicy::RegistryOnly => strait_sidecar::OutboundPolicy::RegistryOnly,
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
    command: Option<SidecarCommand>,
    /// The workload's name (as its WorkloadEntry or pod is named).
    #[arg(long, value_name = "NAME", required = true)]
    workload: Option<String>,
    /// The workload's namespace.
    #[arg(long, value_name = "NS", required = true)]
    namespace: Option<String>,
    /// The control plane (`host:port`, discovery and CSR).
    #[arg(long, value_name = "ADDR", required = true)]
    control_plane: Option<String>,
    /// The bootstrap token file (from `strait controlplane token`, or in
    /// Kubernetes the pod's projected service account token, audience
    /// istio-ca, with --service-account). Read again whenever the token is
    /// needed (the first certificate, or after one expired), so a rotated
    /// token file is followed.
    #[arg(long, value_name = "FILE", required = true)]
    token: Option<PathBuf>,
    /// The mesh root certificate(s), to verify the control plane.
    #[arg(long, value_name = "FILE", required = true)]
    root_cert: Option<PathBuf>,
    /// The cluster this workload runs in, sent to the control plane as
    /// node metadata CLUSTER_ID. Needed in a remote cluster of a
    /// primary-remote mesh (the primary's control plane serves several
    /// clusters); default: the control plane's own cluster.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// The service account (default: from the token).
    #[arg(long, value_name = "SA")]
    service_account: Option<String>,
    /// The mTLS listener.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15006")]
    inbound: SocketAddr,
    /// The app, plain HTTP: HTTP/1.1, or HTTP/2 with prior knowledge for
    /// callers that spoke HTTP/2 (gRPC).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    app: SocketAddr,
    /// Other ports the app serves on --app's host (a pod with several
    /// container ports), comma-separated. A request or connection whose
    /// workload port (the target port of the service port it came for,
    /// or the port a redirected caller dialed) is one of them goes to that
    /// port; everything else goes to --app.
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    app_ports: Vec<u16>,
    /// The HTTP proxy for the app's outbound calls (HTTP/1.1, or HTTP/2
    /// with prior knowledge: gRPC clients naming the service in
    /// `:authority`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// What redirected traffic for destinations outside the mesh gets
    /// (transparent mode): `allow-any` sends it on unchanged to where the
    /// app was going (TLS to outside hosts, databases, HTTP to unknown
    /// hosts), as Istio's default `ALLOW_ANY` does; `registry-only`
    /// refuses it.
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = OutboundTrafficPolicy::AllowAny)]
    outbound_traffic_policy: OutboundTrafficPolicy,
    /// The JSON access log, one line per request or TCP connection:
    /// `stdout`, or `off` (Istio's default; the metrics still count every
    /// request).
    #[arg(long, value_name = "WHERE", value_enum, default_value_t = AccessLogTarget::Stdout)]
    access_log: AccessLogTarget,
    /// Health endpoint (/healthz/ready: ready once it has a certificate and
    /// a first config).
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// The app's probes, answered on the health listener at
    /// /app-health/<container>/<livez|readyz|startupz> by probing the app
    /// at --app-probe-address: JSON from those paths to Kubernetes `httpGet` (HTTP,
    /// or HTTPS without verifying the app's certificate, as the kubelet),
    /// `tcpSocket` or `grpc` (a health check over h2c) probes (ports as
    /// numbers), as the injector writes it
    /// for transparent interception, where the kubelet's own probes would
    /// meet the inbound mTLS listener.
    #[arg(long, value_name = "JSON", env = strait_model::probe::ENV)]
    app_probers: Option<String>,
    /// Where --app-probers probe the app: the pod's IP, where the kubelet
    /// sends its probes (the injector passes $(POD_IP)), so that an app
    /// listening on that address alone passes as it would without the
    /// sidecar; or loopback. To a non-loopback IPv4 address the probes
    /// come from 127.0.0.6, which `strait sidecar iptables` lets through
    /// to the app.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    app_probe_address: std::net::IpAddr,
    /// Prometheus metrics (/stats/prometheus).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Requested workload certificate lifetime.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    cert_ttl: Duration,
    /// On SIGTERM, let in-flight requests finish for up to this long.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    drain: Duration,
    /// Worker threads. With 1 (the default, like Envoy's --concurrency 1)
    /// everything runs on one thread with tokio's current-thread scheduler:
    /// no cross-thread wake-ups on the request path and no idle worker
    /// stacks. More use the multi-thread scheduler, for busier workloads.
    #[arg(long, value_name = "N", default_value_t = 1)]
    worker_threads: usize,
}

#[derive(Debug, clap::Subcommand)]
enum SidecarCommand {
    /// The iptables rules (IPv4, nat table) that redirect a pod's traffic
    /// to the sidecar, as Istio's init container sets them up: `--print`
    /// them or `--apply` them.
    #[command(
        after_help = "Example:\n  strait sidecar iptables --print                       # review the rules\n  strait sidecar iptables --apply --exclude-inbound-port 8081   # in the pod's network namespace (CAP_NET_ADMIN)"
    )]
    Iptables(IptablesArgs),
}

#[derive(Debug, Args)]
struct IptablesArgs {
    /// Print the commands (for review, or for an init container's shell:
    /// `strait sidecar iptables --print | sh`).
    #[arg(long, conflicts_with = "apply")]
    print: bool,
    /// Apply the rules in this network namespace, as one
    /// `iptables-restore --noflush` transaction (all or nothing; needs
    /// CAP_NET_ADMIN and iptables). Refused when they are applied already.
    #[arg(long)]
    apply: bool,
    /// The uid the sidecar runs as (its own traffic is not redirected).
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The inbound (mTLS) listener's port.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The outbound listener's port.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Inbound ports not to redirect (repeatable; 15021 and 15090 always).
    #[arg(long, value_name = "PORT")]
    exclude_inbound_port: Vec<u16>,
    /// Outbound CIDRs not to redirect (repeatable).
    #[arg(long, value_name = "CIDR")]
    exclude_outbound_cidr: Vec<String>,
}

fn iptables(a: IptablesArgs) -> Result<()> {
    if !a.print && !a.apply {
        return Err(super::UsageError(
            "say what to do with the rules: --print them (e.g. `strait sidecar iptables --print | sh`) \
             or --apply them in this network namespace"
                .into(),
        )
        .into());
    }
    let mut o = strait_sidecar::transparent::InterceptOptions {
        proxy_uid: a.proxy_uid,
        inbound_port: a.inbound_port,
        outbound_port: a.outbound_port,
        ..Default::default()
    };
    o.exclude_inbound_ports.extend(a.exclude_inbound_port);
    o.exclude_outbound_cidrs.extend(a.exclude_outbound_cidr);
    let rules = strait_sidecar::transparent::iptables_rules(&o).map_err(super::UsageError)?;
    if !a.apply {
        for r in rules {
            println!("{r}");
        }
        return Ok(());
    }
    let input = strait_sidecar::transparent::restore_input(&rules).map_err(anyhow::Error::msg)?;
    // iptables-restore would flush our chains and append the jumps to
    // them twice: once per network namespace is the rule.
    let present = std::process::Command::new("iptables")
        .args(["-t", "nat", "-n", "-L", "STRAIT_OUTPUT"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("cannot run iptables (is it installed?)")?;
    if present.success() {
        return Err(crate::cli::Rejected(
            "the rules are applied in this network namespace already (chain STRAIT_OUTPUT exists in the nat table)".into(),
        )
        .into());
    }
    let mut child = std::process::Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run iptables-restore (is iptables installed?)")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("iptables-restore stdin")?;
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("already exists") || err.contains("File exists") {
            " (the rules are applied in this network namespace already)"
        } else {
            ""
        };
        return Err(crate::cli::Rejected(format!(
            "iptables-restore refused the rules{hint}: {}",
            err.trim()
        ))
        .into());
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

fn mesh_config(res: &Resources, me: &WorkloadRef) -> Result<MeshConfig, Vec<(String, String)>> {
    let decode_err = |e: (String, String)| vec![e];
    let services = res
        .decode::<pb::Service>(type_url::SERVICE)
        .map_err(decode_err)?;
    let workloads = res
        .decode::<pb::Workload>(type_url::WORKLOAD)
        .map_err(decode_err)?;
    let policies = res
        .decode::<pb::Policy>(type_url::POLICY)
        .map_err(decode_err)?;
    let bundles = res
        .decode::<pb::TrustBundle>(type_url::TRUST_BUNDLE)
        .map_err(decode_err)?;
    let networks = res
        .decode::<pb::Network>(type_url::NETWORK)
        .map_err(decode_err)?;
    let settings = res
        .decode::<pb::MeshSettings>(type_url::MESH_SETTINGS)
        .map_err(decode_err)?;
    let (cfg, errors) = MeshConfig::from_resources(
        services.into_values().collect(),
        workloads.into_values().collect(),
        policies.into_values().collect(),
        bundles.into_values().collect(),
        networks.into_values().collect(),
        settings.into_values().collect(),
        me,
    );
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(errors)
    }
}

pub fn run(args: SidecarArgs) -> Result<()> {
    if let Some(SidecarCommand::Iptables(a)) = args.command {
        return iptables(a);
    }
    let missing = |f: &str| super::UsageError(format!("--{f} is required"));
    let workload = args.workload.clone().ok_or_else(|| missing("workload"))?;
    let namespace = args.namespace.clone().ok_or_else(|| missing("namespace"))?;
    let control_plane = args
        .control_plane
        .clone()
        .ok_or_else(|| missing("control-plane"))?;
    let token_file = args.token.clone().ok_or_else(|| missing("token"))?;
    let root_cert = args.root_cert.clone().ok_or_else(|| missing("root-cert"))?;
    let app_probers = match &args.app_probers {
        None => None,
        Some(_) if args.health_listen.is_none() => {
            return Err(super::UsageError(
                "--app-probers are answered on the health listener: give --health-listen".into(),
            )
            .into());
        }
        Some(json) => Some(Arc::new(
            strait_model::probe::AppProbers::parse(json)
                .map_err(|e| super::UsageError(format!("--app-probers: {e}")))?,
        )),
    };
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("--token {}", token_file.display()))?;
    let sa = match &args.service_account {
        Some(sa) => sa.clone(),
        None => token_service_account(&token).ok_or_else(|| {
            super::UsageError(format!(
                "--token {}: not a strait workload token; pass --service-account too",
                token_file.display()
            ))
        })?,
    };
    let (td, bundle) = super::load_root_cert(&root_cert)?;
    let spiffe_id = strait_ca::SpiffeId::from_segments(&td, &["ns", &namespace, "sa", &sa])?;
    let me = WorkloadRef {
        name: workload.clone(),
        namespace: namespace.clone(),
    };
    if args.worker_threads == 0 {
        return Err(super::UsageError("--worker-threads must be at least 1".into()).into());
    }
    let runtime = strait_runtime::rt::build(Some(args.worker_threads))?;
    runtime.block_on(async move {
        let inbound = strait_runtime::accept::bind(args.inbound, "inbound").await?;
        let outbound = strait_runtime::accept::bind(args.outbound, "outbound").await?;
        let mut registry = Registry::default();
        let metrics = strait_sidecar::metrics::Metrics::new(&mut registry);
        let probe_host = args.app_probe_address;
        let routes = app_probers.map(|p| strait_sidecar::probe::routes(p, probe_host, &mut registry));
        let registry = Arc::new(registry);
        let ready = Ready::default();
        super::announce_when_ready(
            ready.clone(),
            "sidecar",
            vec![
                ("inbound (mTLS)", Some(args.inbound.to_string())),
                ("outbound (HTTP proxy)", Some(args.outbound.to_string())),
                ("health", args.health_listen.map(|a| a.to_string())),
                ("metrics", args.metrics_listen.map(|a| a.to_string())),
            ],
        );
        if let Some(addr) = args.health_listen {
            let l = strait_runtime::accept::bind(addr, "health").await?;
            tokio::spawn(http::serve_with(l, ready.clone(), None, routes));
        }
        if let Some(addr) = args.metrics_listen {
            let l = strait_runtime::accept::bind(addr, "metrics").await?;
            tokio::spawn(http::serve(l, ready.clone(), Some(registry.clone())));
        }

        // The mesh trust: verifies the control plane (its CA answers and
        // discovery) and peers; it follows the pushed bundles, so that a
        // root rotation moves it along.
        let trust = strait_ca::tls::Trust::new(bundle.clone());
        // Identity first: discovery needs a client certificate. The key is
        // made here; one task renews the certificate at about half life.
        let manager = IdentityManager::spawn(IdentityConfig {
            ttl: Some(args.cert_ttl),
            token_file: Some(token_file.clone()),
            ..IdentityConfig::new(&control_plane, spiffe_id.clone(), trust.clone(), Some(token.trim().to_string()))
        });
        let mut identity = workload_identity(manager.subscribe());
        let first = identity
            .wait_for(Option::is_some)
            .await
            .map_err(|_| anyhow::anyhow!("the certificate task stopped"))?
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
        tracing::info!(id = %first.spiffe_id, "workload certificate ready");

        // Discovery, over mTLS: every (re)connect takes the current
        // certificate and the current trust.
        identity::control_plane_tls_with(&trust, &td, Some(&first)).map_err(anyhow::Error::msg)?;
        let tls = {
            let identity = identity.clone();
            let trust = trust.clone();
            let td = td.clone();
            xds::ClientTls::dynamic(move || {
                let current = identity.borrow().clone().ok_or("no certificate yet")?;
                identity::control_plane_tls_with(&trust, &td, Some(&current)).map(Arc::new)
            })
        };
        let validator_me = me.clone();
        let validator: Validator = Arc::new(move |res| mesh_config(res, &validator_me).map(|_| ()));
        let xds = xds::spawn(
            XdsClientConfig {
                address: control_plane.clone(),
                tls,
                node_id: format!(
                    "sidecar~{}~{}.{}~{}.svc.cluster.local",
                    args.inbound.ip(),
                    workload,
                    namespace,
                    namespace
                ),
                cluster: args.cluster.clone().unwrap_or_default(),
                network: String::new(),
                types: type_url::ALL.to_vec(),
            },
            validator,
        );
        let (config_tx, config_rx) = tokio::sync::watch::channel(Arc::new(MeshConfig::default()));
        {
            let mut resources = xds.resources();
            let mut state = xds.state();
            let me = me.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = resources.changed() => {
                            if r.is_err() { return; }
                            let res = resources.borrow_and_update().clone();
                            match mesh_config(&res, &me) {
                                Ok(c) => {
                                    let policies: Vec<&str> =
                                        res.of_type(type_url::POLICY).map(|(n, _)| n).collect();
                                    tracing::info!(
                                        services = res.of_type(type_url::SERVICE).count(),
                                        policies = %policies.join(","),
                                        "config applied"
                                    );
                                    config_tx.send_replace(Arc::new(c));
                                }
                                Err(e) => tracing::error!(?e, "config refused; keeping the last good one"),
                            }
                        }
                        r = state.changed() => {
                            if r.is_err() { return; }
                            let st = state.borrow_and_update().clone();
                            if let Some((type_url, error)) = st.last_nack {
                                tracing::warn!(%type_url, %error, "the last update was refused (NACK)");
                            }
                        }
                    }
                }
            });
        }
        // Ready means a certificate and a first config, whatever the
        // control plane's stream is doing now.
        strait_sidecar::follow_readiness(identity.clone(), config_rx.clone(), ready.clone());
        strait_sidecar::metrics::set_access_log(args.access_log == AccessLogTarget::Stdout);
        let shared = Arc::new(strait_sidecar::Shared::new(
            strait_sidecar::Options {
                workload: me,
                inbound: args.inbound,
                app: args.app,
                app_ports: args.app_ports,
                outbound: args.outbound,
                drain: args.drain,
                outbound_policy: args.outbound_traffic_policy.into(),
            },
            config_rx,
            identity,
            trust,
            metrics,
        ));
        tracing::info!(inbound = %args.inbound, outbound = %args.outbound, app = %args.app, "sidecar serving");
        strait_sidecar::run(shared, inbound, outbound, async {
            super::broker::shutdown_signal().await;
            ready.set(false);
        })
        .await;
        drop(xds);
        tracing::info!("sidecar stopped");
        strait_sidecar::metrics::flush_log();
        Ok(())
    })
}

/// The sidecar's view of the identity the manager keeps current.
fn workload_identity(
    mut from: tokio::sync::watch::Receiver<Option<Arc<strait_proxy_client::identity::Identity>>>,
) -> tokio::sync::watch::Receiver<Option<Arc<identity::Identity>>> {
    let convert = |i: &Option<Arc<strait_proxy_client::identity::Identity>>| {
        i.as_ref().map(|i| {
            Arc::new(identity::Identity {
                chain_der: i.chain_der.clone(),
                key_pkcs8: i.key_pkcs8.clone(),
                spiffe_id: i.spiffe_id.clone(),
                not_after: i.not_after,
            })
        })
    };
    let (tx, rx) = tokio::sync::watch::channel(convert(&from.borrow_and_update()));
    tokio::spawn(async move {
        while from.changed().await.is_ok() {
            if tx.send(convert(&from.borrow_and_update())).is_err() {
                return;
            }
        }
    });
    rx
}
