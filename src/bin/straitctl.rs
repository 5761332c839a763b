//! `straitctl`: the admin CLI of a strait trust broker.

use std::process::ExitCode;

use strait::cli::{self, ctl::Ctl};

fn main() -> ExitCode {
    let ctl = match cli::parse::<Ctl>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    ctl.log.init();
    cli::exit(cli::ctl::run(ctl))
}
