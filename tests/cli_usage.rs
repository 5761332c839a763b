//! What a newcomer meets first: usage errors (each exits 64 and says what
//! to pass instead, naming the flag and the value), and servers started by
//! hand saying, at the default log level, that they are ready and where.
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

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Starts `strait ARGS` with the default log level (no RUST_LOG) and
/// returns its stderr once a line contains `needle` (within 30 s).
fn started_by_hand(args: &[&str], needle: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(STRAIT)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(needle) {
            break text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("strait {args:?} exited ({status}):\n{text}");
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("no {needle:?} from strait {args:?} within 30 s:\n{text}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    text
}

#[test]
fn a_broker_started_by_hand_says_where_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, health, metrics) = (free_addr(), free_addr(), free_addr());
    let text = started_by_hand(
        &[
            "broker",
            "--data-dir",
            dir.path().join("b").to_str().unwrap(),
            "--listen",
            &listen,
            "--trust-domain",
            "example.org",
            "--health-listen",
            &health,
            "--metrics-listen",
            &metrics,
        ],
        "broker serving",
    );
    for a in [&listen, &health, &metrics] {
        assert!(text.contains(a.as_str()), "{a} in {text}");
    }
    // Only that line: the default level stays quiet otherwise.
    assert_eq!(
        text.lines().filter(|l| l.contains(" INFO ")).count(),
        1,
        "{text}"
    );
}

#[test]
fn a_gateway_started_by_hand_says_where_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, "services: []\n").unwrap();
    let (listen, health) = (free_addr(), free_addr());
    let text = started_by_hand(
        &[
            "gateway",
            "--cluster",
            "east",
            "--network",
            "n",
            "--listen",
            &listen,
            "--routes",
            routes.to_str().unwrap(),
            "--health-listen",
            &health,
        ],
        "gateway ready",
    );
    assert!(text.contains(&format!("passthrough {listen}")), "{text}");
    assert!(text.contains(&format!("health {health}")), "{text}");
}

/// `strait broker --store`: a store that is neither redb nor etcd, a bad
/// etcd address, etcd flags without etcd, each refused by name before
/// anything starts.
#[test]
fn a_broker_store_that_cannot_be_used_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = [
        "broker",
        "--data-dir",
        data.to_str().unwrap(),
        "--trust-domain",
        "example.org",
    ];
    let run = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        strait(&a)
    };
    let (code, out) = run(&["--store", "sqlite"]);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("--store \"sqlite\": expected redb or etcd://"),
        "{out}"
    );
    let (code, out) = run(&["--etcd-prefix", "/x/"]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("--etcd-* flags need --store etcd://"), "{out}");
    let (code, out) = run(&["--store", "etcd://127.0.0.1"]);
    assert_eq!(code, 64, "{out}");
    if cfg!(feature = "etcd") {
        assert!(
            out.contains("etcd://127.0.0.1") && out.contains("has no :PORT"),
            "{out}"
        );
        let (code, out) = run(&[
            "--store",
            "etcd://127.0.0.1:2379",
            "--etcd-prefix",
            "strait",
        ]);
        assert_eq!(code, 64, "{out}");
        assert!(
            out.contains("--etcd-prefix \"strait\": must start and end with /"),
            "{out}"
        );
    } else {
        assert!(out.contains("built without etcd support"), "{out}");
    }
    assert!(
        !data.join("broker.redb").exists(),
        "a refused start made a store"
    );
}
