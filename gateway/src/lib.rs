//! The east-west gateway of a strait cluster.
//!
//! - [`hello`]: an incremental TLS ClientHello reader (SNI, ALPN) that never
//!   terminates TLS;
//! - [`route`]: Istio's `outbound_.<port>_.<subset>_.<host>` SNI and the
//!   routing table of exported services (subsets, round robin);
//! - [`passthrough`]: the SNI passthrough listener (port 15443, TCP);
//! - [`tunnel`]: QUIC tunnels between gateways (port 15443, UDP), pooled
//!   per remote gateway, and the egress listener (15444) local sidecars
//!   hand their connections to.
//!
//! Still to come in this crate: routes pushed by the control plane, DNS
//! names for remote gateways, identity reload on rotation.

pub mod expose;
pub mod hello;
pub mod passthrough;
pub mod route;
pub mod tunnel;
