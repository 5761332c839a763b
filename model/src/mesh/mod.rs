//! The mesh model: clusters, networks, localities, gateways, services, ports
//! and endpoint counts, as a cluster publishes them to its broker and as an
//! importing cluster receives them.
//!
//! Types with rules of their own ([`Network`], [`Locality`], [`ServiceKey`],
//! [`ServicePort`], [`GatewayAddress`], [`ExportTarget`], [`ExportTo`]) can
//! only be built through their validating constructors, and deserialize
//! through them too. The aggregates ([`ExportedService`], [`LocalService`],
//! [`ClusterInfo`], [`RemoteService`]) have public fields; their cross-field
//! rules are checked by `validate()`, which deserialization also runs.
//!
//! Everything serializes deterministically (sorted maps and sets) and orders
//! totally (`Ord`), so that generated output never depends on input order.

mod export_to;
mod service;
mod topology;

pub use export_to::{ExportTarget, ExportTo};
pub use service::{
    CLUSTERSET_DOMAIN, DEFAULT_CLUSTER_DOMAIN, ExportedService, LocalService, LocalityEndpoints,
    Protocol, RemoteService, ServiceKey, ServicePort,
};
pub use topology::{ClusterInfo, DEFAULT_GATEWAY_PORT, GatewayAddress, Locality, Network};

use strait_ca::spiffe::SpiffeIdError;

/// What was wrong with a piece of the mesh model, and with which value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error(
        "network name {0:?} must be 1 to 63 letters, digits, '-', '_' or '.', \
         starting and ending with a letter or digit"
    )]
    Network(String),
    #[error("locality {value:?}: {reason}")]
    Locality { value: String, reason: &'static str },
    #[error(
        "protocol {0:?} is not one strait imports; use one of HTTP, HTTPS, HTTP2, GRPC, \
         GRPC-Web, TCP, TLS, Mongo, Redis, MySQL"
    )]
    Protocol(String),
    #[error(
        "port name {0:?} must be 1 to 62 letters, digits or '-', starting and ending with \
         a letter or digit (Istio's rule for endpoint port names)"
    )]
    PortName(String),
    #[error("port {name:?}: {field} must be 1-65535, got 0")]
    PortNumber { name: String, field: &'static str },
    #[error(
        "namespace {0:?} must be a DNS-1123 label: 1 to 63 lowercase letters, digits or \
         '-', starting and ending with a letter or digit"
    )]
    Namespace(String),
    #[error(
        "service name {0:?} must be a DNS-1123 label: 1 to 63 lowercase letters, digits or \
         '-', starting and ending with a letter or digit"
    )]
    ServiceName(String),
    #[error("gateway address {value:?}: {reason}")]
    GatewayAddress { value: String, reason: &'static str },
    #[error("cluster name: {0}")]
    ClusterName(#[source] SpiffeIdError),
    #[error("trust domain: {0}")]
    TrustDomain(#[source] SpiffeIdError),
    #[error(
        "mesh name {0:?} must be a DNS-1123 subdomain: lowercase letters, digits, '-' and \
         '.', at most 253 characters"
    )]
    MeshName(String),
    #[error("service {service}: {problem}")]
    Service { service: String, problem: String },
}

impl ModelError {
    fn service(service: &ServiceKey, problem: impl Into<String>) -> Self {
        ModelError::Service {
            service: service.to_string(),
            problem: problem.into(),
        }
    }
}

/// Serde adapters for the `strait-ca` name types, which have no serde impls
/// of their own: they (de)serialize as their string form, validated.
pub(crate) mod serde_names {
    pub mod cluster_name {
        use serde::{Deserialize, Deserializer, Serializer};
        use strait_ca::ClusterName;

        pub fn serialize<S: Serializer>(name: &ClusterName, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(name.as_str())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ClusterName, D::Error> {
            let s = String::deserialize(d)?;
            ClusterName::new(&s).map_err(serde::de::Error::custom)
        }
    }

    pub mod trust_domain {
        use serde::{Deserialize, Deserializer, Serializer};
        use strait_ca::TrustDomain;

        pub fn serialize<S: Serializer>(td: &TrustDomain, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(td.as_str())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TrustDomain, D::Error> {
            let s = String::deserialize(d)?;
            TrustDomain::new(&s).map_err(serde::de::Error::custom)
        }
    }
}
