//! The east-west gateway of a strait cluster.
//!
//! This crate will own the TLS passthrough listener that routes cross-cluster
//! mTLS by Istio's SNI format (`outbound_.<port>_.<subset>_.<fqdn>`), the QUIC
//! tunnel endpoint that pools one connection per remote gateway, and the
//! egress listener local sidecars hand connections to.
