//! `strait-sidecar`: the sidecar on its own, the binary a pod runs.
//!
//! It takes exactly the arguments of `strait sidecar` (both parse
//! [`strait_sidecar::cli::SidecarArgs`]) and runs the same role; what
//! differs is what is linked in. This package links neither the broker,
//! the control plane (no Kubernetes client), QUIC nor redb, so the pages
//! startup touches are the sidecar's own (`scripts/bench-sidecar.sh`
//! prints its idle RSS next to `strait sidecar`'s).

use std::process::ExitCode;

use strait_runtime::cli::{EXIT_FAILURE, EXIT_USAGE};
use strait_sidecar::cli::{CliError, SidecarCli};

/// mimalloc rather than glibc's malloc: a request through the sidecar
/// allocates and frees some hundred small buffers and strings, and glibc
/// spent about a fifth of the sidecar's instructions on them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match strait_runtime::cli::parse::<SidecarCli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    cli.log.init();
    match strait_sidecar::cli::run(cli.args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(CliError::Rejected(m)) => {
            eprintln!("{m}");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The error and its causes on one line, a cause left out when the text
/// before already says it.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}
