//! The strait sidecar: the data-plane proxy next to every workload.
//!
//! This crate will own the outbound and inbound listeners, mutual TLS with
//! SPIFFE identities from `strait-ca`, Istio routing (`VirtualService`,
//! `DestinationRule`) and security policy (`PeerAuthentication`,
//! `AuthorizationPolicy`), Istio-named metrics and the JSON access log.
pub mod policy;
