//! Command-line plumbing shared by `strait` and `straitctl`: parsing with
//! sysexits-style exit codes, logging set-up, durations.

use std::process::ExitCode;

pub mod broker;
pub mod ca;
pub mod cluster;
pub mod commands;
pub mod controlplane;
pub mod ctl;
pub mod gateway;
pub mod sidecar;

pub use strait_runtime::cli::{
    EXIT_FAILURE, EXIT_USAGE, LogArgs, LogFormat, READY_TARGET, announce_when_ready,
    format_duration, parse, parse_duration,
};

/// A usage error found after parsing (a bad combination of flags): exit 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A check that ran and said no (e.g. `verify`): its message is the result,
/// printed without an `error:` prefix; exit 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// Maps a command's result to the process exit code, printing the error
/// (with its causes) to stderr.
pub fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<UsageError>() => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) if e.is::<Rejected>() => {
            eprintln!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text
/// the message already contains (many errors quote their source).
pub fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

/// The mesh roots of `--root-cert` and their trust domain. strait's CA
/// certificates name their trust domain (URI SAN spiffe://<td>); the first
/// root's is the mesh's.
pub fn load_root_cert(
    root_cert: &std::path::Path,
) -> anyhow::Result<(strait_ca::TrustDomain, strait_ca::TrustBundle)> {
    use anyhow::Context;
    strait_ca::layout::load_root_cert(root_cert).with_context(|| "--root-cert".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_not_repeated() {
        let inner = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(inner).context("writing x.pem: disk on fire");
        assert_eq!(describe(&e), "writing x.pem: disk on fire");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&e), "outer: inner");
    }
}

#[cfg(test)]
mod help_tests;
