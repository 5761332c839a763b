//! The command lines of `strait`, `straitctl` and `strait-sidecar`, and
//! `strait lab`. Each role's work lives in its crate (`strait-ca`,
//! `strait-broker`, `strait-controlplane`, `strait-gateway`,
//! `strait-sidecar`); the gateway's and the sidecar's process wiring
//! (identity, discovery client, listeners) are still in [`cli`] for now.

pub mod cli;
pub mod lab;
