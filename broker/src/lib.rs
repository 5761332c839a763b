//! The trust broker of a strait mesh.
//!
//! This crate will own the broker server (the `Federation`, `Admin` and `Peer`
//! gRPC services), its durable store (redb by default, etcd for HA), the
//! export/import reconciliation and root rotation state machines, and the
//! client library the local control plane uses to join and sync.
