//! Usage errors a newcomer meets first: each exits 64 and says what to
//! pass instead, naming the flag and the value.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const STRAIT: &str = env!("CARGO_BIN_EXE_strait");

fn strait(args: &[&str]) -> (i32, String) {
    let out = Command::new(STRAIT).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn sidecar_iptables_without_a_flag_names_print_and_apply() {
    let (code, text) = strait(&["sidecar", "iptables"]);
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("--print") && text.contains("--apply"),
        "{text}"
    );
}

#[test]
fn a_token_for_a_missing_state_dir_is_refused_and_makes_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-state");
    let (code, text) = strait(&[
        "controlplane",
        "token",
        "--state-dir",
        missing.to_str().unwrap(),
        "--namespace",
        "demo",
        "--service-account",
        "echo",
        "--workload",
        "echo-1",
    ]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains(missing.to_str().unwrap()), "{text}");
    assert!(!missing.exists(), "a key was made in {}", missing.display());
}

#[test]
fn a_garbage_join_token_is_called_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("east");
    let (code, text) = strait(&[
        "cluster",
        "join",
        "--token",
        "garbage",
        "--dir",
        d.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("not a join token"), "{text}");
    let file = dir.path().join("east.token");
    std::fs::write(&file, "garbage\n").unwrap();
    let (code, text) = strait(&[
        "cluster",
        "join",
        "--token",
        file.to_str().unwrap(),
        "--dir",
        d.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("malformed join token"), "{text}");
}

#[test]
fn a_gateway_without_routes_mentions_the_control_plane() {
    let (code, text) = strait(&["gateway", "--cluster", "east", "--network", "n"]);
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("--routes") && text.contains("--control-plane"),
        "{text}"
    );
}

#[test]
fn cluster_sync_refuses_a_gateway_that_is_no_address() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = strait(&[
        "cluster",
        "sync",
        "--dir",
        dir.path().to_str().unwrap(),
        "--config",
        "east.yaml",
        "--gateway",
        "not-an-addr",
    ]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("--gateway \"not-an-addr\""), "{text}");
}
