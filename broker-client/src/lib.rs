//! The cluster side of a strait trust broker: what a control plane, `strait
//! cluster` and `straitctl` link to talk to a broker, without the broker's
//! server, state or database.
//!
//! - [`token`]: join tokens (pure): their encoding, what they carry and
//!   how a broker checks one;
//! - [`client`]: joining (CSR, never a key sent), gRPC channels for
//!   clusters and admins, and the joined-directory layout
//!   ([`client::CACERTS_DIR`], [`client::BROKER_FILE`], ...);
//! - [`agent`]: the Sync stream a cluster keeps up (exports out, imports
//!   and trust in, intermediate renewal, back-off and resume);
//! - [`wire`]: conversions between the protobuf messages and the mesh
//!   model, shared with the broker.

pub mod agent;
pub mod client;
pub mod token;
pub mod wire;
