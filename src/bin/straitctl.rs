//! `straitctl`: the admin CLI of a strait trust broker.
//!
//! Its commands (clusters, join tokens, exports and imports, trust rotation,
//! peering) talk to the broker's admin API, which arrives with the broker;
//! until then this binary only answers `--help` and `--version`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "straitctl",
    version,
    about = "Admin CLI of a strait trust broker",
    long_about = "Admin CLI of a strait trust broker: clusters and join tokens, exported \
and imported services, root rotation and peering. The broker and its admin API are not \
built yet, so this release has no commands; use `strait ca` for certificate work.",
    arg_required_else_help = true
)]
struct Cli {}

fn main() -> ExitCode {
    match Cli::try_parse() {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
