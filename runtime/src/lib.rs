//! What every strait process shares, whatever its role (broker, control
//! plane, gateway, sidecar, lab):
//!
//! - [`http`]: the health (`/healthz/ready`, `/healthz/live`) and metrics
//!   (`/metrics`) endpoints, off the data path, and [`http::Ready`];
//! - [`drain`]: graceful shutdown, one primitive for every listener
//!   (serving, draining, killed; connections counted until they end);
//! - [`accept`]: the one accept loop policy (a failed `accept` is logged
//!   and retried after a growing pause, never spun on);
//! - [`transport`]: gRPC over strait's own rustls configs (a TLS incoming
//!   stream for tonic servers, a lazily connecting channel for clients);
//! - [`tls`]: the one swappable serving certificate;
//! - [`rt`]: the tokio runtime of a process, and the shutdown signal;
//! - [`cli`]: what every binary's command line shares (exit codes, logging
//!   flags, the ready line, durations).
//!
//! Nothing here knows about meshes, clusters or certificates' contents: the
//! crate sits under every role and depends on none of them.

pub mod accept;
pub mod cli;
pub mod drain;
pub mod http;
pub mod rt;
pub mod tls;
pub mod transport;
