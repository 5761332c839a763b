//! The east-west gateway of a strait cluster.
//!
//! - [`hello`]: an incremental TLS ClientHello reader (SNI, ALPN) that never
//!   terminates TLS;
//! - [`route`]: Istio's `outbound_.<port>_.<subset>_.<host>` SNI and the
//!   routing table of exported services (subsets, round robin), and the
//!   remote gateways QUIC tunnels go to;
//! - [`passthrough`]: the SNI passthrough listener (port 15443, TCP);
//! - [`tunnel`]: QUIC tunnels between gateways (port 15443, UDP), pooled
//!   per remote gateway (named by address or by DNS name, resolved with
//!   hickory and cached for the record's TTL), and the egress listener
//!   (15444) local sidecars hand their connections to;
//! - [`expose`]: the control plane exposed to remote clusters' proxies
//!   (primary-remote, 15012), as TLS passthrough.
//!
//! - [`app`]: the role's wiring: its one [`app::Config`], routes pushed by
//!   the control plane or read from a file, the gateway's certificate and
//!   its renewal and reload, health and metrics, drain.

pub mod app;
pub mod expose;
pub mod hello;
pub mod passthrough;
pub mod route;
pub mod tunnel;
