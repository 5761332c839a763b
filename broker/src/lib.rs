//! The trust broker of a strait mesh.
//!
//! It registers clusters (join tokens), issues and renews their
//! intermediates, distributes the trust bundle, exchanges the services
//! each cluster exports, rotates the mesh root in stages, and peers with
//! the brokers of other meshes (other trust domains). Modules:
//!
//! - [`reconcile`]: the export/import state machine (pure);
//! - [`rotation`]: root rotation stages, begin/advance/finish/abort (pure);
//! - [`token`]: join tokens (pure);
//! - [`wire`]: conversions between the protobuf messages and the mesh model;
//! - [`store`]: the durable store trait and its redb implementation;
//! - [`state`]: the broker core (plan, persist, apply, notify), including
//!   intermediate renewal and revocation;
//! - [`liveness`]: which clusters are withdrawn for want of a sync stream (pure);
//! - [`server`]: the `Federation` and `Admin` gRPC services;
//! - [`peer`]: peering between meshes (the `Peer` service and the pull of
//!   a peer's exports and bundle);
//! - [`metrics`]: the `strait_broker_*` metrics;
//! - [`app`]: wiring of a broker process.
//!
//! The cluster side lives here too, for now: [`client`] (joining, channels
//! for clusters and admins, the joined-directory layout) and [`agent`] (the
//! Sync stream a control plane or `strait cluster sync` keeps up), and two
//! pieces every strait server uses: [`http`] (health and metrics) and
//! [`transport`] (gRPC over strait's rustls configs).
//!
//! Not built yet: the etcd store for highly available brokers.

pub mod agent;
pub mod app;
pub mod client;
pub mod http;
pub mod liveness;
pub mod metrics;
pub mod peer;
pub mod reconcile;
pub mod rotation;
pub mod server;
pub mod state;
pub mod store;
pub mod token;
pub mod transport;
pub mod wire;
