//! Peering between meshes (federation across trust domains).
//!
//! One broker issues a peer token; the other presents it to the first's
//! peer API (`Establish`, no client certificate; the token's secret and
//! pinned root authenticate both sides). The two SPIFFE bundles are
//! exchanged and kept per trust domain, never merged. From then on each
//! broker pulls the other's `Sync` stream with its own broker identity,
//! verified against its own trust domain's bundle, and receives the services
//! the other mesh exports to `mesh:<its name>`. Those reach every cluster
//! of the importing mesh, with the foreign bundle in their trust updates.
//!
//! - [`token`]: peer tokens, their parsing and the issuer's record of them;
//! - [`registry`]: the peered meshes ([`Peers`], [`PeerRecord`]);
//! - [`service`]: the peer API's server side (the `Peer` service and the
//!   verifier of peer brokers' certificates);
//! - [`client`]: the outbound side (establishing with a token, pulling
//!   peers' streams).
//!
//! What is stored (peers, tokens) changes through `state::peers`.

pub mod client;
pub mod registry;
pub mod service;
pub mod token;

use strait_ca::{SpiffeId, TrustDomain};

pub use client::{
    ClientIdentity, PeeringError, PullError, establish, set_client_identity, spawn_puller,
    start_all,
};
pub(crate) use registry::{META_PEER, META_PEER_TOKEN};
pub use registry::{PeerRecord, Peers};
pub use service::{AcceptError, PeerClientVerifier, PeerService};
pub use token::{PEER_TOKEN_PREFIX, PeerToken, PeerTokenError, PeerTokenRecord, TokenRefusal};

/// The broker identity of a trust domain.
fn broker_id(td: &TrustDomain) -> Result<SpiffeId, crate::client::ClientError> {
    crate::client::broker_id(td)
}
