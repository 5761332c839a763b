//! `strait sidecar`: the sidecar's flags and role live in the sidecar crate
//! (`strait_sidecar::cli`, `strait_sidecar::role`), shared with the
//! `strait-sidecar` binary; here they are only mapped to `strait`'s exit
//! codes.

use strait_sidecar::cli::CliError;
pub use strait_sidecar::cli::{OutboundTrafficPolicy, SidecarArgs};

pub fn run(args: SidecarArgs) -> anyhow::Result<()> {
    strait_sidecar::cli::run(args).map_err(|e| match e {
        CliError::Usage(m) => super::UsageError(m).into(),
        CliError::Rejected(m) => super::Rejected(m).into(),
        e => anyhow::Error::new(e),
    })
}
