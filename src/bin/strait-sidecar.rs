//! `strait-sidecar`: the sidecar on its own, the binary a pod runs.
//!
//! It takes exactly the arguments of `strait sidecar` and runs the same
//! code; what differs is what is linked in. `strait` carries every role
//! (broker, control plane with its Kubernetes client, gateway, lab), and
//! the pages of that code which startup touches stay resident: the sidecar
//! run from `strait` idles at about 15.7 MB RSS, from this binary at about
//! 10 MB (`scripts/bench-sidecar.sh` prints both sides).

use std::process::ExitCode;

use strait::cli;

/// mimalloc rather than glibc's malloc: a request through the sidecar
/// allocates and frees some hundred small buffers and strings, and glibc
/// spent about a fifth of the sidecar's instructions on them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match cli::parse::<cli::commands::SidecarCli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    cli.log.init();
    cli::exit(cli::sidecar::run(cli.args))
}
