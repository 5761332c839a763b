//! Why the control plane could not start or stopped serving. Every
//! message names the flag, file or address at fault.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why [`super::run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "{} has not joined a mesh: pass --join-token FILE (from `straitctl cluster add {cluster}`)",
        state_dir.display()
    )]
    NotJoined { state_dir: PathBuf, cluster: String },
    #[error("--join-token {}: {source}", path.display())]
    ReadToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("joining with {}: {source}", path.display())]
    Join {
        path: PathBuf,
        #[source]
        source: Box<strait_broker_client::client::ClientError>,
    },
    #[error(
        "{} belongs to cluster {joined} on network {joined_network}, not {cluster} on {network}",
        state_dir.display()
    )]
    OtherCluster {
        state_dir: PathBuf,
        joined: String,
        joined_network: String,
        cluster: String,
        network: String,
    },
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    #[error("the joined trust domain {trust_domain:?}: {source}")]
    TrustDomain {
        trust_domain: String,
        #[source]
        source: strait_ca::spiffe::SpiffeIdError,
    },
    #[error("--config-dir {}: {source}", path.display())]
    ConfigDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--kube: no Kubernetes API to talk to (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    NoKubeApi(#[source] ::kube::Error),
    #[error("--kube: {0}")]
    Kube(#[source] crate::kube::KubeError),
    #[error("--remote {name}={}: {source}", config.display())]
    Remote {
        name: String,
        config: PathBuf,
        #[source]
        source: Box<RemoteError>,
    },
    #[error("the cluster's trust bundle: {0}")]
    Bundle(#[source] Box<strait_ca::layout::LayoutError>),
    #[error(transparent)]
    Serving(#[from] ServingError),
    #[error("the workload CA's token key: {0}")]
    TokenKey(#[source] crate::ca::TokenKeyError),
    #[error("the workload CA: {0}")]
    WorkloadCa(#[source] crate::ca::CaError),
    #[error("the {what} TLS config: {source}")]
    Tls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error(transparent)]
    Bind(#[from] strait_runtime::accept::BindError),
    #[error("cannot listen on {addr}{}: {source}", flag.map_or(String::new(), |f| format!(" ({f})")))]
    Listen {
        addr: SocketAddr,
        flag: Option<&'static str>,
        #[source]
        source: std::io::Error,
    },
    #[error("discovery server: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Why a remote cluster (`--remote`) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    ConfigDir(#[from] std::io::Error),
    #[error("its kubeconfig: {0}")]
    Kubeconfig(#[from] ::kube::config::KubeconfigError),
    #[error("its API client: {0}")]
    Client(#[source] ::kube::Error),
    #[error("reading Namespace {namespace}: {source}")]
    Namespace {
        namespace: &'static str,
        #[source]
        source: ::kube::Error,
    },
    #[error(transparent)]
    Watch(#[from] crate::kube::KubeError),
}

/// Why the control plane's serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("{}: {source}", dir.display())]
    Authority {
        dir: PathBuf,
        #[source]
        source: Box<strait_ca::layout::LayoutError>,
    },
    #[error("serving certificate: {0}")]
    Issue(#[source] strait_ca::authority::IssueError),
    #[error("serving certificate key: {0}")]
    Key(#[source] rustls::Error),
}
