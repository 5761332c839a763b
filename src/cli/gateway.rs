//! `strait gateway`: the east-west gateway's flags, turned into a
//! `strait_gateway::app::Config` (the role itself is in the gateway crate).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use strait_gateway::app::{Config, Expose, IdentitySource, Routing};
use strait_gateway::passthrough;
use strait_runtime::http::Ready;

use super::parse_duration;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum AlpnCheck {
    /// Require one of Istio's ALPN values (istio, istio-peer-exchange,
    /// istio-http/1.0, istio-http/1.1, istio-h2), as Istio sidecars send.
    Istio,
    /// Accept any ALPN (or none).
    Off,
}

/// Run the east-west gateway: TLS passthrough routed by Istio's SNI
/// (`outbound_.<port>_.<subset>_.<host>`) to the local endpoints of
/// exported services. The gateway never terminates TLS: the client's mTLS
/// session reaches the workload.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  strait gateway --cluster east --network net-east --listen 0.0.0.0:15443 \\
      --control-plane 10.0.0.5:15012 --token /var/run/secrets/tokens/istio-token \\
      --root-cert /etc/strait/root-cert.pem \\
      --health-listen 0.0.0.0:15021 --metrics-listen 0.0.0.0:15090
  # a certificate kept current by something else, re-read when it changes
  strait gateway --cluster east --network net-east --control-plane 10.0.0.5:15012 \\
      --identity /etc/strait/gateway
  strait gateway --cluster east --network net-east --listen 0.0.0.0:15443 \\
      --routes /etc/strait/routes.yaml --health-listen 0.0.0.0:15021 --metrics-listen 0.0.0.0:15090
  # primary-remote: the primary's gateway also exposes its control plane on 15012
  strait gateway --cluster primary --network net-primary --control-plane 10.0.0.5:15012 \\
      --token gateway.token --root-cert root-cert.pem --expose-control-plane 10.0.0.5:15012

routes.yaml:
  services:
  - host: reviews.bookinfo.svc.cluster.local
    ports: [9080]
    subsets: {v1: {version: v1}}
    endpoints:
    - {address: 10.1.0.11, labels: {version: v1}}
    - {address: 10.1.0.12, labels: {version: v2}, healthy: false}")]
// Where the routing table comes from: one of the two is required.
#[command(group(clap::ArgGroup::new("routing").args(["routes", "control_plane"]).required(true)))]
pub struct GatewayArgs {
    /// This cluster's name (for logs and metrics).
    #[arg(long, value_name = "NAME")]
    cluster: strait_ca::ClusterName,
    /// This cluster's network.
    #[arg(long, value_name = "NET")]
    network: String,
    /// The passthrough listener.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15443")]
    listen: SocketAddr,
    /// Routing table of exported services (YAML or JSON); re-read when it
    /// changes. For a gateway without a control plane.
    #[arg(long, value_name = "FILE")]
    routes: Option<PathBuf>,
    /// The cluster's control plane (`host:port`, its discovery port 15012):
    /// the routing table comes from it, over mTLS with the gateway's
    /// certificate (--token or --identity).
    #[arg(long, value_name = "ADDR")]
    control_plane: Option<String>,
    /// The gateway gets its certificate from the control plane's CSR API
    /// with this token: a file holding a bootstrap token (`strait
    /// controlplane token --namespace strait-system --service-account
    /// eastwest-gateway`) or, in Kubernetes, the pod's projected service
    /// account token (audience istio-ca), read again whenever it is needed.
    /// The key is made here; the certificate is renewed at about half life,
    /// and the trust follows the bundles the control plane pushes (root
    /// rotations, peered meshes).
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["control_plane", "root_cert"],
        conflicts_with_all = ["identity", "federated"]
    )]
    token: Option<PathBuf>,
    /// The mesh root certificate(s), to verify the control plane (--token).
    #[arg(long, value_name = "FILE", requires = "token")]
    root_cert: Option<PathBuf>,
    /// Certificate lifetime to ask for (--token).
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    cert_ttl: Duration,
    /// Which ALPN values a connection must offer.
    #[arg(long, value_enum, default_value = "istio")]
    alpn_check: AlpnCheck,
    /// Deadline for the whole ClientHello.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    hello_timeout: Duration,
    /// Close a spliced connection after this long without traffic.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    idle_timeout: Duration,
    /// On SIGTERM, let live connections finish for up to this long.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    drain: Duration,
    /// Health endpoint (/healthz/ready: ready once the routing table loaded).
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// Prometheus metrics endpoint (/metrics, strait_gateway_*).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// The egress listener local sidecars hand connections for other
    /// networks to; they travel over QUIC tunnels (needs --token or
    /// --identity).
    #[arg(long, value_name = "ADDR")]
    egress_listen: Option<SocketAddr>,
    /// The gateway's identity as files someone else keeps current
    /// (cert-chain.pem, key.pem, root-cert.pem; SPIFFE ID
    /// spiffe://<td>/ns/strait-system/sa/eastwest-gateway), re-read when
    /// they change. With an identity (this or --token), the gateway also
    /// accepts QUIC tunnels on the --listen address (UDP).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Bundles of peered meshes for tunnels (`<trust-domain>.pem` each, as a
    /// joined cluster's `federated/` directory holds them): their gateways
    /// may open tunnels to this one and be tunnelled to, each verified
    /// against its own trust domain's bundle only.
    #[arg(long, value_name = "DIR")]
    federated: Option<PathBuf>,
    /// Expose this cluster's control plane (`host:port`) to the proxies of
    /// remote clusters (primary-remote), as TLS passthrough on
    /// --expose-listen for the server name controlplane.strait-system.svc.
    #[arg(long, value_name = "ADDR")]
    expose_control_plane: Option<String>,
    /// The listener of the exposed control plane.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15012")]
    expose_listen: SocketAddr,
    /// Data-plane worker threads (default: one per CPU). With 1, everything
    /// runs on one thread with tokio's current-thread scheduler.
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
}

impl GatewayArgs {
    /// The gateway's [`Config`] (files named by flags are read here, so
    /// that their errors name the flag).
    fn config(&self) -> Result<Config> {
        if self.worker_threads == Some(0) {
            return Err(super::UsageError("--worker-threads must be at least 1".into()).into());
        }
        let routing = match (&self.control_plane, &self.routes) {
            (Some(cp), _) => Routing::ControlPlane(cp.clone()),
            (None, Some(routes)) => Routing::File(routes.clone()),
            (None, None) => {
                return Err(
                    super::UsageError("pass --routes FILE or --control-plane ADDR".into()).into(),
                );
            }
        };
        let identity = match (&self.token, &self.identity) {
            (Some(token_file), _) => {
                let root_cert = self
                    .root_cert
                    .as_deref()
                    .ok_or_else(|| super::UsageError("--token needs --root-cert".into()))?;
                let token = std::fs::read_to_string(token_file)
                    .with_context(|| format!("--token {}", token_file.display()))?;
                let (td, root) = super::load_root_cert(root_cert)?;
                Some(IdentitySource::Csr {
                    token,
                    token_file: token_file.clone(),
                    td,
                    root,
                    cert_ttl: self.cert_ttl,
                })
            }
            (None, Some(dir)) => Some(IdentitySource::Dir {
                dir: dir.clone(),
                federated: self.federated.clone(),
            }),
            (None, None) => None,
        };
        let config = Config {
            cluster: self.cluster.clone(),
            network: self.network.clone(),
            listen: self.listen,
            routing,
            identity,
            passthrough: passthrough::Config {
                hello_timeout: self.hello_timeout,
                idle_timeout: self.idle_timeout,
                require_istio_alpn: self.alpn_check == AlpnCheck::Istio,
                ..passthrough::Config::default()
            },
            drain: self.drain,
            health_listen: self.health_listen,
            metrics_listen: self.metrics_listen,
            egress_listen: self.egress_listen,
            expose: self.expose_control_plane.as_ref().map(|upstream| Expose {
                upstream: upstream.clone(),
                listen: self.expose_listen,
            }),
        };
        config
            .validate()
            .map_err(|e| super::UsageError(e.to_string()))?;
        Ok(config)
    }
}

pub fn run(args: GatewayArgs) -> Result<()> {
    let config = args.config()?;
    // One worker: a current-thread runtime (see `strait_runtime::rt::build`).
    let runtime = strait_runtime::rt::build(args.worker_threads)?;
    runtime.block_on(async move {
        let ready = Ready::default();
        super::announce_when_ready(
            ready.clone(),
            "gateway",
            vec![
                ("passthrough", Some(config.listen.to_string())),
                (
                    "egress (QUIC tunnels)",
                    config.egress_listen.map(|a| a.to_string()),
                ),
                ("health", config.health_listen.map(|a| a.to_string())),
                ("metrics", config.metrics_listen.map(|a| a.to_string())),
                (
                    "control plane exposed on",
                    config.expose.as_ref().map(|e| e.listen.to_string()),
                ),
            ],
        );
        strait_gateway::app::run(config, ready, strait_runtime::rt::shutdown_signal()).await?;
        Ok(())
    })
}
