//! The trust broker of a strait mesh.
//!
//! It registers clusters (join tokens), issues and renews their
//! intermediates, distributes the trust bundle, exchanges the services
//! each cluster exports, rotates the mesh root in stages, and peers with
//! the brokers of other meshes (other trust domains). Modules:
//!
//! - [`reconcile`]: the export/import state machine (pure);
//! - [`rotation`]: root rotation stages, begin/advance/finish/abort (pure);
//! - [`store`]: the durable store trait, its redb implementation and (feature
//!   `etcd`) its etcd one;
//! - [`ha`] (feature `etcd`): replicas on one etcd, the leader's lease;
//! - [`state`]: the broker core (plan, persist, apply, notify), including
//!   intermediate renewal and revocation;
//! - [`liveness`]: which clusters are withdrawn for want of a sync stream (pure);
//! - [`server`]: the `Federation` and `Admin` gRPC services;
//! - [`peer`]: peering between meshes (the `Peer` service and the pull of
//!   a peer's exports and bundle);
//! - [`metrics`]: the `strait_broker_*` metrics;
//! - [`app`]: wiring of a broker process.
//!
//! The cluster side (join tokens, joining, the Sync stream a control plane
//! keeps up, the protobuf conversions) is the `strait-broker-client`
//! crate, re-exported here as [`token`], [`wire`], [`client`] and
//! [`agent`]; health, metrics and gRPC transport come from
//! `strait-runtime`. The store is embedded (redb, one broker per mesh) or
//! etcd, shared by any number of replicas.

pub mod app;
#[cfg(feature = "etcd")]
pub mod ha;
pub mod liveness;
pub mod metrics;
pub mod peer;
pub mod reconcile;
pub mod rotation;
pub mod server;
pub mod state;
pub mod store;

pub use strait_broker_client::{agent, client, token, wire};
