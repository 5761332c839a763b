//! The local control plane that runs in every strait cluster.
//!
//! This crate will own the config sources (a watched directory of
//! Kubernetes-style YAML, or the Kubernetes API through `kube`), the broker
//! client, the workload CA service (Istio's CSR API, signing with the
//! cluster's intermediate from `strait-ca`) and the discovery server that
//! pushes configuration to sidecars and gateways.
