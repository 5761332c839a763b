//! The local control plane that runs in every strait cluster.
//!
//! - [`source`]: the directory config source (Kubernetes-style YAML; each
//!   object judged on its own, last good version kept).
//!
//! Still to come in this crate: watching the directory and the Kubernetes
//! API (`kube`), the broker link (`strait_broker::agent`), the workload CA
//! service (Istio's CSR API, signing with the cluster's intermediate from
//! `strait-ca`) and the discovery server for sidecars and gateways.

pub mod source;
