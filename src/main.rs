//! `strait`: every server role of a strait mesh, the CA tooling and the lab.
//!
//! `main` only parses the command line and hands each role to its `run`.

use std::process::ExitCode;

use strait::cli;

fn main() -> ExitCode {
    let cli = match cli::parse::<cli::commands::Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    cli.log.init();
    cli::exit(cli::commands::run(cli.command))
}
