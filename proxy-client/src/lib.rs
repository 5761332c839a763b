//! The proxies' side of a strait control plane: what a gateway or a
//! sidecar links to be told what to do, without the control plane itself
//! (no Kubernetes client, no discovery server, no CA).
//!
//! - [`xds`]: the discovery subscription (delta ADS over mTLS): subscribe,
//!   validate, ACK or NACK, keep the last good resources, reconnect and
//!   resume;
//! - [`identity`]: the workload certificate client: a key made here, a
//!   CSR sent, the answer checked, renewal at half life, back-off;
//! - [`trust`]: pushed trust bundles into a live [`strait_ca::tls::Trust`].

pub mod identity;
pub mod trust;
pub mod xds;
