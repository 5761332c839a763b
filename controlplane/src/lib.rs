//! The local control plane that runs in every strait cluster (the istiod of
//! strait).
//!
//! - [`source`]: the directory config source (Kubernetes-style YAML; each
//!   object judged on its own, last good version kept).
//! - [`dirwatch`]: keeps that config current as files change (and reads
//!   the imports written back under `imported/`).
//! - [`link`]: the broker link: publishes exports, writes imports back.
//! - [`kube`]: the Kubernetes config source (watchers feeding the same
//!   config model), the write-back of imports to the API, and the sidecar
//!   injection webhook.
//! - [`remote`]: primary-remote: serving clusters that have no control
//!   plane of their own (`--remote NAME=CONFIG_DIR`).
//! - [`resources`]: the discovery resources (`strait.mesh.v1.*`) built from
//!   the config in force and the broker's imports. Pure.
//! - [`xds`]: the discovery server (ADS over gRPC, state-of-the-world and
//!   delta) with ACK/NACK tracking and debounced pushes.
//! - [`ca`]: the workload CA (Istio's `IstioCertificateService`), bootstrap
//!   tokens and the control plane's serving certificate.
//! - [`app`]: wiring of a control plane process (join, watch, link, serve).
//!
//! The proxies' side (the xDS subscription, the certificate client, trust
//! following) is the `strait-proxy-client` crate: gateways and sidecars
//! link it, never this one.

pub mod app;
pub mod ca;
pub mod dirwatch;
pub mod kube;
pub mod link;
pub mod remote;
pub mod resources;
pub mod source;
pub mod xds;
