//! End to end through `strait lab --netns`: each cluster in its own
//! network namespace, the WAN between them a bridge that a partition cuts
//! (needs root and iproute2; says why and passes when they are missing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

#[path = "common/lab.rs"]
mod harness;
use harness::*;

/// Why netns mode cannot run here (not root, no iproute2), if it cannot.
fn netns_unavailable() -> Option<&'static str> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("not root");
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        _ => return Some("iproute2's `ip` is missing"),
    }
    // Root in a container may still lack CAP_NET_ADMIN: try one.
    let probe = format!("strait-probe-{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .is_ok_and(|o| o.status.success());
    if !made {
        return Some("network namespaces cannot be created here");
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    None
}

#[test]
fn netns_partition_fails_over_to_local_endpoints_and_heal_brings_them_back() {
    if let Some(why) = netns_unavailable() {
        eprintln!("skipped: netns mode needs root and iproute2 ({why})");
        return;
    }
    let mut lab = Lab::up_with("multi-primary", 100, &["--netns"]);
    let json = lab.json();
    assert_eq!(json["netns"], true);
    let east = &json["clusters"][0];
    assert_eq!(east["netns"], "strait100-east");
    assert_eq!(east["gateway"]["tcp"], "10.100.1.2:15443");

    // Debug endpoints stay inside the cluster's namespace: from west's,
    // east's control plane serves them neither on its health port nor on
    // the debug port; inside east's, 127.0.0.1:15014 does.
    let status_in = |ns: &str, url: &str| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "--max-time", "5", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (cp, _) = east["control_plane"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap();
    let from_west =
        |port: u16| status_in("strait100-west", &format!("http://{cp}:{port}/debug/nacks"));
    assert_eq!(
        status_in(
            "strait100-west",
            &format!("http://{cp}:15021/healthz/ready")
        ),
        "200",
        "east's health port is reachable from west"
    );
    assert_eq!(from_west(15021), "404");
    assert_eq!(from_west(15014), "000", "nothing listens there for west");
    assert_eq!(
        status_in("strait100-east", "http://127.0.0.1:15014/debug/nacks"),
        "200"
    );

    // Spread over both clusters (no locality preference), with outlier
    // detection and per-try timeouts, as an operator would set failover.
    let policy = example("failover.yaml");
    let (code, out, err) = lab.lab(&["apply", "east", policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    // In force once the client's sidecar has applied it.
    let client_log = lab.path().join("logs/east-client-sidecar.log");
    let start = Instant::now();
    while !std::fs::read_to_string(&client_log)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("config applied") && l.contains("VirtualService/demo/echo"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the policy never reached east's client sidecar:\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("east/echo/v1") && t.contains("west/echo/v2")
    });

    // The WAN between east and west is cut: every request still succeeds,
    // answered in east (a stalled try times out and is retried there; the
    // west gateway is ejected).
    let (code, out, err) = lab.lab(&["partition", "east", "west"]);
    assert_eq!(code, 0, "{out}{err}");
    let failed_over = lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("20  200") && !t.contains("west/")
    });
    assert!(failed_over.contains("east/echo/v1"), "{failed_over}");

    // Healed: west answers again once its ejection ends.
    let (code, out, err) = lab.lab(&["heal"]);
    assert_eq!(code, 0, "{out}{err}");
    lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("west/echo/v2")
    });

    // Without the failover policy, calls on the cut link stall: each is
    // counted as timed out and the summary still comes (before, the first
    // stalled call aborted `lab curl` after 30 s with none).
    let (code, out, err) = lab.lab(&["delete", "east", policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = lab.lab(&["partition", "east", "west"]);
    assert_eq!(code, 0, "{out}{err}");
    let start = Instant::now();
    let (code, out, err) = lab.lab(&[
        "curl",
        "east",
        "http://echo.demo:8080/",
        "-n",
        "6",
        "--timeout",
        "2s",
    ]);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert!(out.contains("status codes:"), "{out}{err}");
    let counted: u32 = out
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
        .sum();
    assert_eq!(counted, 6, "every request is in the summary:\n{out}");
    if code != 0 {
        assert!(err.contains("of 6 requests failed"), "{err}");
    }
    let (code, out, err) = lab.lab(&["heal"]);
    assert_eq!(code, 0, "{out}{err}");

    lab.down();
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains("strait100-"),
        "network namespaces left behind"
    );
}

/// The FORWARD policy and bridge-netfilter setting as Docker's engine
/// leaves them (DROP; bridged frames through iptables), restored when
/// dropped. `None` where iptables or bridge netfilter is missing.
struct DockerLikeForwarding {
    policy: String,
    bridge_nf: String,
}

const BRIDGE_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

impl DockerLikeForwarding {
    fn set() -> Option<Self> {
        let out = Command::new("iptables")
            .args(["-w", "-S", "FORWARD"])
            .output()
            .ok()?;
        let rules = String::from_utf8_lossy(&out.stdout).into_owned();
        let policy = rules
            .lines()
            .find_map(|l| l.strip_prefix("-P FORWARD "))?
            .trim()
            .to_string();
        let bridge_nf = std::fs::read_to_string(BRIDGE_NF).ok()?.trim().to_string();
        std::fs::write(BRIDGE_NF, "1").ok()?;
        let dropped = Command::new("iptables")
            .args(["-w", "-P", "FORWARD", "DROP"])
            .status()
            .is_ok_and(|s| s.success());
        let guard = DockerLikeForwarding { policy, bridge_nf };
        dropped.then_some(guard)
    }
}

impl Drop for DockerLikeForwarding {
    fn drop(&mut self) {
        let _ = Command::new("iptables")
            .args(["-w", "-P", "FORWARD", &self.policy])
            .status();
        let _ = std::fs::write(BRIDGE_NF, &self.bridge_nf);
    }
}

/// With Docker's engine running, the FORWARD policy is DROP and bridged
/// frames go through iptables: the lab's WAN must still carry
/// cross-cluster traffic (its bridge has its own ACCEPT rule, gone after
/// `down`), and `lab status` must see a cut WAN, not only processes up.
#[test]
fn a_netns_lab_works_where_dockerd_drops_forwarding_and_status_sees_the_wan() {
    if let Some(why) = netns_unavailable() {
        eprintln!("skipped: netns mode needs root and iproute2 ({why})");
        return;
    }
    let Some(_docker_like) = DockerLikeForwarding::set() else {
        eprintln!("skipped: no iptables or bridge netfilter here");
        return;
    };
    let mut lab = Lab::up_with("multi-primary", 101, &["--netns"]);
    let rules = || {
        let out = Command::new("iptables")
            .args(["-w", "-S", "FORWARD"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(rules().contains("st101wan"), "{}", rules());
    lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("west/echo/v2") && t.contains("east/echo/v1")
    });
    let (code, out, err) = lab.lab(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("east -> west") && out.contains("reachable") && !out.contains("UNREACHABLE"),
        "{out}"
    );

    // A cut WAN is a status failure, though every process is up.
    let (code, out, err) = lab.lab(&["partition", "east", "west"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = lab.lab(&["status"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("UNREACHABLE"), "{out}");
    assert!(err.contains("WAN link(s) not ready"), "{err}");
    let (code, out, err) = lab.lab(&["heal"]);
    assert_eq!(code, 0, "{out}{err}");

    lab.down();
    assert!(
        !rules().contains("st101wan"),
        "rule left behind:\n{}",
        rules()
    );
}
