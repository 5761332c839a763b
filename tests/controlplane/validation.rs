//! Bad config edits end to end: an object that breaks its kind's rules is
//! rejected by name and its last good version stays in force (the export
//! it carries too); a file too large, or a YAML bomb, is rejected by name
//! and the control plane keeps serving with bounded memory.

use std::time::{Duration, Instant};

use crate::common::{Broker, Scratch, http_get};

use super::support::*;

/// The exports the broker holds for `cluster`: (name, ports).
fn exports(broker: &Broker, cluster: &str) -> Vec<(String, Vec<u64>)> {
    let list = broker
        .ctl(&["exports", "list", "--cluster", cluster, "-o", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let ports = e["ports"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["number"].as_u64())
                .collect();
            (e["name"].as_str().unwrap().to_string(), ports)
        })
        .collect()
}

/// Waits until `what` holds, polling; panics with `context()` after
/// [`WAIT`].
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_is_rejected_by_name_and_the_export_stays() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    let echo = format!(
        "{}---\n{}",
        service_yaml("echo", 8080, true),
        workload_yaml("echo-v2", "echo", "10.2.0.1", "net-west")
    );
    put(&west.config, "echo.yaml", &echo);
    wait_for(
        "echo exported at the broker",
        || exports(&broker, "west").iter().any(|(n, _)| n == "echo"),
        || west.log(),
    )
    .await;

    // The port edited to 99999: Kubernetes would refuse the object, and so
    // does the control plane, by file, object, field and value.
    put(
        &west.config,
        "echo.yaml",
        &echo.replace("port: 8080", "port: 99999"),
    );
    let named = "echo.yaml: Service demo/echo: invalid: spec.ports[0].port: Invalid value: 99999: \
                 must be between 1 and 65535, inclusive";
    wait_for(
        "the rejection named in the log",
        || west.log().contains(named),
        || west.log(),
    )
    .await;
    let debug: serde_json::Value =
        serde_json::from_str(&http_get(&west.debug, "/debug/config")).unwrap();
    let rejection = &debug["clusters"]["west"]["rejected"][0];
    assert_eq!(
        (
            &rejection["kind"],
            &rejection["namespace"],
            &rejection["name"]
        ),
        (
            &serde_json::json!("Service"),
            &serde_json::json!("demo"),
            &serde_json::json!("echo")
        ),
        "{debug:#}"
    );
    assert!(
        rejection["reason"]
            .as_str()
            .unwrap()
            .contains("spec.ports[0].port: Invalid value: 99999"),
        "{debug:#}"
    );
    assert_eq!(rejection["last_good_in_force"], true, "{debug:#}");
    let metrics = http_get(&west.metrics, "/metrics");
    assert!(
        metrics.lines().any(|l| l == "strait_config_rejections 1"),
        "{metrics}"
    );

    // A later good change exports a second service; by then the bad edit
    // has been seen and passed over: echo is still exported, with 8080.
    put(
        &west.config,
        "marker.yaml",
        &service_yaml("marker", 7070, true),
    );
    wait_for(
        "marker exported at the broker",
        || exports(&broker, "west").iter().any(|(n, _)| n == "marker"),
        || west.log(),
    )
    .await;
    let now = exports(&broker, "west");
    let echo_ports = now
        .iter()
        .find(|(n, _)| n == "echo")
        .map(|(_, p)| p.clone());
    assert_eq!(echo_ports, Some(vec![8080]), "{now:?}\n{}", west.log());

    // Fixing the file clears the rejection.
    put(&west.config, "echo.yaml", &echo);
    wait_for(
        "the rejection cleared",
        || {
            http_get(&west.metrics, "/metrics")
                .lines()
                .any(|l| l == "strait_config_rejections 0")
        },
        || http_get(&west.debug, "/debug/config"),
    )
    .await;
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// The "billion laughs": `levels` levels of ten aliases each.
fn laughs(levels: usize) -> String {
    let mut y = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..levels {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        y.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_file_and_a_yaml_bomb_are_rejected_by_name_with_bounded_memory() {
    const MIB: u64 = 1024 * 1024;
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    let pid = west.child.as_ref().unwrap().id();
    put(
        &west.config,
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", 8080, true),
            workload_yaml("echo-v2", "echo", "10.2.0.1", "net-west")
        ),
    );
    wait_for(
        "echo exported at the broker",
        || exports(&broker, "west").iter().any(|(n, _)| n == "echo"),
        || west.log(),
    )
    .await;
    let rss_before = status_kib(pid, "VmRSS");

    // 50 MB of valid YAML (a comment): refused by its size, unread.
    let big = format!("#{}\n", "x".repeat(50 * 1024 * 1024));
    put(&west.config, "big.yaml", &big);
    let named = format!(
        "big.yaml: {} bytes, over the limit of {} bytes for one config file",
        big.len(),
        3 * MIB
    );
    wait_for(
        "big.yaml rejected by name",
        || west.log().contains(&named),
        || west.log(),
    )
    .await;
    drop(big);
    eprintln!("after big.yaml: VmRSS {} kB", status_kib(pid, "VmRSS"));

    // A billion laughs (a few hundred bytes): refused within the budget.
    put(&west.config, "bomb.yaml", &laughs(9));
    wait_for(
        "bomb.yaml rejected by name",
        || {
            west.log()
                .contains("bomb.yaml: over the YAML budget of a config file")
        },
        || west.log(),
    )
    .await;

    eprintln!("after bomb.yaml: VmRSS {} kB", status_kib(pid, "VmRSS"));
    // Still serving: ready, the good objects in force, the export kept.
    assert_eq!(
        crate::common::http_status(&west.health, "/healthz/ready"),
        Some(200)
    );
    let debug: serde_json::Value =
        serde_json::from_str(&http_get(&west.debug, "/debug/config")).unwrap();
    let west_config = &debug["clusters"]["west"];
    assert_eq!(
        west_config["objects"].as_array().unwrap().len(),
        2,
        "{debug:#}"
    );
    assert_eq!(
        west_config["rejected"].as_array().unwrap().len(),
        2,
        "{debug:#}"
    );
    assert!(exports(&broker, "west").iter().any(|(n, _)| n == "echo"));
    put(
        &west.config,
        "marker.yaml",
        &service_yaml("marker", 7070, true),
    );
    wait_for(
        "a good change still applies",
        || exports(&broker, "west").iter().any(|(n, _)| n == "marker"),
        || west.log(),
    )
    .await;

    let rss_after = status_kib(pid, "VmRSS");
    let peak = status_kib(pid, "VmHWM");
    eprintln!(
        "control plane memory: VmRSS {rss_before} kB before, {rss_after} kB after the 50 MB \
         file and the bomb; peak VmHWM {peak} kB"
    );
    // Neither the 50 MB file nor the bomb's expansion was ever in memory.
    assert!(
        peak < rss_before + 32 * 1024,
        "peak {peak} kB, {rss_before} kB before: the rejected input was held in memory"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "{rss_after} kB after, {rss_before} kB before"
    );
}
