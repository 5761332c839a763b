//! The broker's gRPC services for its own mesh: `Federation` (clusters:
//! join, and the Sync stream) and `Admin` (straitctl).
//!
//! Handlers authenticate the caller from its TLS client certificate
//! ([`authenticate`], here), then call into [`BrokerState`]; everything
//! protocol-shaped (what to push when) lives in the sync [`session`],
//! everything stateful in `state`.
//!
//! - [`federation`]: the `Federation` service;
//! - [`session`]: one cluster's Sync stream, broker side;
//! - [`admin`]: the `Admin` service and its protobuf views.

use strait_ca::tls::TrustError;
use strait_ca::{ClusterName, SpiffeId};
use time::OffsetDateTime;
use tonic::{Request, Status};

use crate::state::{BrokerState, StateError};

pub mod admin;
pub mod federation;
pub mod session;

pub use admin::AdminService;
pub use federation::FederationService;
pub use session::{HELLO_TIMEOUT, RENEWAL_CHECK};

/// Who is calling, from the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Cluster(ClusterName),
    Admin(String),
}

impl From<StateError> for Status {
    fn from(e: StateError) -> Self {
        match &e {
            StateError::Token(_) => Status::permission_denied(e.to_string()),
            StateError::Duplicate(..) => Status::already_exists(e.to_string()),
            StateError::UnknownCluster(_) => Status::not_found(e.to_string()),
            StateError::Revoked(_) => Status::permission_denied(e.to_string()),
            StateError::Invalid(_)
            | StateError::Csr(_)
            | StateError::TokenField { .. }
            | StateError::RootWrite(_)
            | StateError::RootLoad { .. }
            | StateError::Bundle(_)
            | StateError::Sync(_) => Status::invalid_argument(e.to_string()),
            StateError::Issue(_) | StateError::RootCreate(_) => {
                Status::failed_precondition(e.to_string())
            }
            StateError::Rotation(_) => Status::failed_precondition(e.to_string()),
            StateError::Store(_) | StateError::Corrupt { .. } | StateError::UnfinishedMigration => {
                Status::unavailable(e.to_string())
            }
        }
    }
}

/// Authenticates the caller of `req`. Cluster identities must come from
/// that cluster's own intermediate (subject `CN=<cluster>`), so a cluster's
/// CA cannot mint another cluster's identity; admin identities must be
/// issued by the root itself.
pub fn authenticate<T>(state: &BrokerState, req: &Request<T>) -> Result<Caller, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required for this call"))?;
    let svid = strait_ca::tls::peer_identity(&state.trust, &certs, OffsetDateTime::now_utc())
        .map_err(|e| match e {
            // The handshake let this chain through (the broker applies the
            // deny-list per call) so that a revoked cluster hears why.
            TrustError::Revoked { .. } => {
                tracing::warn!(peer = ?req.remote_addr(), error = %e, "refused a revoked cluster");
                Status::permission_denied(format!(
                    "this cluster is revoked: {e}; it can take part again only by joining with a new token"
                ))
            }
            e => Status::unauthenticated(format!("client certificate refused: {e}")),
        })?;
    let id: &SpiffeId = &svid.spiffe_id;
    let segments: Vec<&str> = id.segments().collect();
    match segments.as_slice() {
        ["strait", "cluster", name] => {
            let name = ClusterName::new(name)
                .map_err(|e| Status::unauthenticated(format!("{id}: {e}")))?;
            let issuer_ok = svid.path_len == 3
                && certs.len() == 2
                && strait_ca::authority::cluster_of_intermediate(
                    state.trust_domain.as_str(),
                    &svid.leaf_issuer,
                ) == Some(name.as_str());
            if !issuer_ok {
                return Err(Status::unauthenticated(format!(
                    "{id} must be issued by cluster {name}'s own intermediate"
                )));
            }
            Ok(Caller::Cluster(name))
        }
        ["strait", "admin", name] => {
            if svid.path_len != 2 {
                return Err(Status::unauthenticated(format!(
                    "{id} must be issued by the mesh root itself"
                )));
            }
            Ok(Caller::Admin((*name).to_string()))
        }
        _ => Err(Status::permission_denied(format!(
            "{id} has no role at the broker"
        ))),
    }
}
