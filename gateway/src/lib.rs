//! The east-west gateway of a strait cluster.
//!
//! - [`hello`]: an incremental TLS ClientHello reader (SNI, ALPN) that never
//!   terminates TLS;
//! - [`route`]: Istio's `outbound_.<port>_.<subset>_.<host>` SNI and the
//!   routing table of exported services (subsets, round robin);
//! - [`passthrough`]: the SNI passthrough listener (port 15443).
//!
//! Still to come in this crate: the QUIC tunnel endpoint that pools one
//! connection per remote gateway, the egress listener local sidecars hand
//! connections to, and routes pushed by the control plane.

pub mod hello;
pub mod passthrough;
pub mod route;
