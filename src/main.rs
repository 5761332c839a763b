//! `strait`: every server role of a strait mesh, the CA tooling and the lab.
//!
//! `main` only parses the command line and hands each role to its `run`.

use std::process::ExitCode;

use clap::Parser;

use strait::cli;

#[derive(Debug, Parser)]
#[command(
    name = "strait",
    version,
    about = "Federates service meshes across Kubernetes clusters",
    long_about = "strait federates Istio-style service meshes across Kubernetes clusters: a \
shared root CA issues one intermediate per cluster, a trust broker exchanges trust bundles \
and exported services, and east-west gateways carry cross-cluster mTLS.",
    after_help = "Examples:\n  strait ca init-root --trust-domain example.org --out root\n  \
strait ca issue-intermediate --root root --cluster east --out east/cacerts\n  \
strait ca --help"
)]
struct Cli {
    #[command(flatten)]
    log: cli::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Certificate authority: roots, cluster intermediates, workload certificates, bundles.
    Ca(cli::ca::CaArgs),
    /// Run the trust broker of a mesh.
    Broker(cli::broker::BrokerArgs),
    /// Run the east-west gateway (SNI passthrough to exported services).
    Gateway(cli::gateway::GatewayArgs),
    /// The cluster side of a broker: join a mesh, sync a static config.
    #[command(subcommand)]
    Cluster(cli::cluster::ClusterCommand),
    /// Run a cluster's local control plane (discovery, workload certificates, broker link).
    Controlplane(cli::controlplane::ControlPlaneArgs),
    /// Run a workload's sidecar (mTLS, Istio routing and policy, metrics).
    Sidecar(cli::sidecar::SidecarArgs),
    /// straitctl, built in (the lab uses it so that one binary suffices).
    #[command(hide = true)]
    Ctl(cli::ctl::Ctl),
    /// A whole federation on this machine: up, status, curl, demo, down.
    Lab(strait::lab::LabArgs),
}

fn main() -> ExitCode {
    let cli = match cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    cli.log.init();
    let result = match cli.command {
        Command::Ca(args) => cli::ca::run(args),
        Command::Broker(args) => cli::broker::run(args),
        Command::Cluster(cmd) => cli::cluster::run(cmd),
        Command::Gateway(args) => cli::gateway::run(args),
        Command::Lab(args) => strait::lab::run(args),
        Command::Ctl(args) => cli::ctl::run(args),
        Command::Controlplane(args) => cli::controlplane::run(args),
        Command::Sidecar(args) => cli::sidecar::run(args),
    };
    cli::exit(result)
}
