//! The mesh model of strait.
//!
//! This crate will own the cluster, network, locality, service and endpoint
//! types; the Istio (`networking.istio.io`, `security.istio.io`) and MCS API
//! (`multicluster.x-k8s.io`) object types; parsing of the `strait.io/export`
//! and `strait.io/export-to` annotations; generation of the `ServiceEntry`,
//! `WorkloadEntry` and `ServiceImport` objects an importing cluster receives;
//! and validation of configuration objects. Its work starts with the broker.
