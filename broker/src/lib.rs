//! The trust broker of a strait mesh.
//!
//! It registers clusters (join tokens), issues and renews their
//! intermediates, distributes the trust bundle, and exchanges the services
//! each cluster exports. Modules:
//!
//! - [`reconcile`]: the export/import state machine (pure);
//! - [`token`]: join tokens (pure);
//! - [`store`]: the durable store trait and its redb implementation;
//! - [`state`]: the broker core (plan, persist, apply, notify);
//! - [`liveness`]: which clusters are withdrawn for want of a sync stream (pure);
//! - [`server`]: the `Federation` and `Admin` gRPC services;
//! - [`client`]: joining, and channels for clusters and admins;
//! - [`app`]: wiring of a broker process.
//!
//! Not built yet: root rotation, intermediate renewal over Sync, peering
//! between meshes, the etcd store.

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
