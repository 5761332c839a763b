//! The trust broker of a strait mesh.
//!
//! It registers clusters (join tokens), issues and renews their
//! intermediates, distributes the trust bundle, and exchanges the services
//! each cluster exports. Modules:
//!
//! - [`token`]: join tokens (pure);
//! - [`store`]: the durable store trait and its redb implementation.
//!
//! Still to come in this crate: the reconciliation state machine, the
//! `Federation` and `Admin` gRPC services, root rotation, and peering.

pub mod store;
pub mod token;
