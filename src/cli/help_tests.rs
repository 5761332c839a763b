//! Every leaf command of `strait` and `straitctl` shows an example in its
//! `--help` (the README promises one on every command).

use clap::CommandFactory;

/// The leaf commands of `cmd` (by their full path) whose help has no
/// "Example" section.
fn without_example(cmd: &mut clap::Command, path: &str, out: &mut Vec<String>) {
    let path = format!("{path} {}", cmd.get_name());
    let subs: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help")
        .map(|s| s.get_name().to_string())
        .collect();
    if subs.is_empty() {
        let help = cmd.render_long_help().to_string();
        if !help.contains("Example") {
            out.push(path.trim().to_string());
        }
        return;
    }
    for name in subs {
        if let Some(sub) = cmd.find_subcommand_mut(&name) {
            without_example(sub, &path, out);
        }
    }
}

fn missing(mut cmd: clap::Command) -> Vec<String> {
    cmd.build();
    let mut out = Vec::new();
    without_example(&mut cmd, "", &mut out);
    out
}

#[test]
fn every_strait_command_has_an_example() {
    let m = missing(super::commands::Cli::command());
    assert!(m.is_empty(), "no Example in --help of: {m:#?}");
}

#[test]
fn every_straitctl_command_has_an_example() {
    let m = missing(super::ctl::Ctl::command());
    assert!(m.is_empty(), "no Example in --help of: {m:#?}");
}

#[test]
fn lab_up_help_shows_ip_base() {
    let mut cmd = super::commands::Cli::command();
    cmd.build();
    let up = cmd
        .find_subcommand_mut("lab")
        .and_then(|l| l.find_subcommand_mut("up"))
        .map(|u| u.render_long_help().to_string())
        .unwrap_or_default();
    assert!(up.contains("--ip-base"), "{up}");
}
