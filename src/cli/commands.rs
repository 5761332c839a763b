//! The command lines of the binaries, as types: `main` of each binary
//! only parses and runs them, and tests parse deployment manifests'
//! arguments with the very same parsers.

use clap::Parser;

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
pub struct Cli {
    #[command(flatten)]
    pub log: super::LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Certificate authority: roots, cluster intermediates, workload certificates, bundles.
    Ca(super::ca::CaArgs),
    /// Run the trust broker of a mesh.
    Broker(super::broker::BrokerArgs),
    /// Run the east-west gateway (SNI passthrough to exported services).
    Gateway(super::gateway::GatewayArgs),
    /// The cluster side of a broker: join a mesh, sync a static config.
    #[command(subcommand)]
    Cluster(super::cluster::ClusterCommand),
    /// Run a cluster's local control plane (discovery, workload certificates, broker link).
    Controlplane(super::controlplane::ControlPlaneArgs),
    /// Run a workload's sidecar (mTLS, Istio routing and policy, metrics).
    Sidecar(super::sidecar::SidecarArgs),
    /// straitctl, built in (the lab uses it so that one binary suffices).
    #[command(hide = true)]
    Ctl(super::ctl::Ctl),
    /// A whole federation on this machine: up, status, curl, demo, down.
    Lab(crate::lab::LabArgs),
}

/// Runs a parsed `strait` command.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ca(args) => super::ca::run(args),
        Command::Broker(args) => super::broker::run(args),
        Command::Cluster(cmd) => super::cluster::run(cmd),
        Command::Gateway(args) => super::gateway::run(args),
        Command::Lab(args) => crate::lab::run(args),
        Command::Ctl(args) => super::ctl::run(args),
        Command::Controlplane(args) => super::controlplane::run(args),
        Command::Sidecar(args) => super::sidecar::run(args),
    }
}
