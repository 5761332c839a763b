//! `strait lab up --kube` end to end: each lab cluster with its own real
//! kube-apiserver and etcd (built by `bash scripts/tools.sh etcd kube`),
//! the control planes in Kubernetes mode against them, everything else
//! as in the directory lab.
//!
//! Without the tools each test prints one line saying how to build them
//! and passes; under `CI=true` their absence is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

mod common;
#[path = "common/lab.rs"]
mod harness;
use common::apiserver::tool;
use harness::*;

/// kubectl from the tools directory, or `None` (with the line saying
/// why) when the real Kubernetes tier is not built.
fn kubectl() -> Option<PathBuf> {
    tool("kube-apiserver")?;
    tool("etcd")?;
    tool("kubectl")
}

/// `kubectl --kubeconfig <cluster's> ARGS`: (success, stdout + stderr).
fn kube(kubectl: &PathBuf, lab: &Lab, cluster: &str, args: &[&str]) -> (bool, String) {
    let c = lab.cluster(cluster);
    let kubeconfig = c["kubeconfig"]
        .as_str()
        .unwrap_or_else(|| panic!("lab.json gives {cluster} no kubeconfig: {c}"));
    let out = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The README's main command in Kubernetes mode: every step of the tour
/// passes, and its `lab apply`/`lab delete` go to the API servers.
#[test]
fn the_demo_passes_every_step_against_real_api_servers() {
    if kubectl().is_none() {
        return;
    }
    let text = demo_passes(&["--kube", "--ip-base", "200"]);
    assert!(
        text.contains("in west's API server") && text.contains("in east's API server"),
        "lab apply did not go to the API servers:\n{text}"
    );
}

/// `lab curl` from `cluster` until every one of 20 calls is answered by
/// one of `expected` and each of them answered at least once.
fn answered_only_by(lab: &Lab, cluster: &str, expected: &[&str]) -> String {
    lab.curl_until(cluster, "http://echo.demo:8080/", 20, |t| {
        let answered: Vec<&str> = t
            .lines()
            .skip_while(|l| !l.starts_with("answered by"))
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        t.contains("     20  200")
            && expected.iter().all(|e| answered.contains(e))
            && answered.iter().all(|a| expected.contains(a))
    })
}

/// Primary-remote with two API servers: the primary's control plane reads
/// the remote's API (its Pods are echo's endpoints, its load-balancer
/// status the remote gateway's address), config applied with `lab apply`
/// is stored in the primary's API server and routes both clusters'
/// calls, and a Pod deleted from the remote's API server stops getting
/// calls.
#[test]
fn primary_remote_reads_the_remotes_api_server() {
    let Some(kubectl) = kubectl() else {
        return;
    };
    let mut lab = Lab::up_with("primary-remote", 210, &["--kube"]);
    for c in ["primary", "remote"] {
        let (ok, pods) = kube(&kubectl, &lab, c, &["get", "pods", "-n", "demo"]);
        assert!(ok && pods.contains("echo-v"), "{c}'s pods: {pods}");
    }
    let (_, gw) = kube(
        &kubectl,
        &lab,
        "remote",
        &[
            "get",
            "service",
            "eastwest-gateway",
            "-n",
            "strait-system",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ],
    );
    assert!(gw.starts_with("127."), "remote gateway's status: {gw}");

    for c in ["primary", "remote"] {
        answered_only_by(&lab, c, &["primary/echo/v1", "remote/echo/v2"]);
    }

    for f in ["subsets.yaml", "all-to-west.yaml"] {
        let (code, out, err) = lab.lab(&["apply", "primary", example(f).to_str().unwrap()]);
        assert_eq!(code, 0, "apply {f}: {out}{err}");
        assert!(out.contains("in primary's API server"), "{out}");
    }
    let (ok, vs) = kube(
        &kubectl,
        &lab,
        "primary",
        &["get", "virtualservices.networking.istio.io", "-n", "demo"],
    );
    assert!(
        ok && vs.contains("echo"),
        "the primary's VirtualServices: {vs}"
    );
    for c in ["primary", "remote"] {
        answered_only_by(&lab, c, &["remote/echo/v2"]);
    }
    let (code, out, err) = lab.lab(&[
        "delete",
        "primary",
        example("all-to-west.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "delete: {out}{err}");

    let (ok, out) = kube(
        &kubectl,
        &lab,
        "remote",
        &["delete", "pod", "echo-v2", "-n", "demo", "--wait=false"],
    );
    assert!(ok, "delete pod echo-v2: {out}");
    let start = Instant::now();
    answered_only_by(&lab, "primary", &["primary/echo/v1"]);
    eprintln!(
        "the remote's deleted Pod stopped getting calls within {:?}",
        start.elapsed()
    );
    lab.down();
}
