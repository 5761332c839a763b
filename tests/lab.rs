//! End to end through `strait lab`: real processes for every component
//! (broker, control planes, gateways, echo workloads, sidecars) on
//! loopback address blocks, driven the way a user drives them.
//!
//! Each test uses its own address blocks (`--ip-base`) and directory, so
//! they can run side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/lab.rs"]
mod harness;
use harness::*;

#[test]
fn multi_primary_end_to_end() {
    let mut lab = Lab::up("multi-primary", 20);
    let j = lab.json();
    assert_eq!(j["topology"], "multi-primary");
    assert_eq!(j["clusters"][0]["name"], "east");
    assert_eq!(j["clusters"][1]["name"], "west");
    let (code, out, err) = lab.lab(&["status"]);
    assert_eq!(code, 0, "status: {out}{err}");
    // Sidecars run the slim binary, which cargo builds next to `strait`.
    let procs: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.path().join("run/procs.json")).unwrap())
            .unwrap();
    let pid = procs["procs"]["east/client/sidecar"]["pid"]
        .as_u64()
        .unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("strait-sidecar"), "{}", exe.display());
    // A second `up` on the same directory is refused.
    let (code, _, err) = strait(&[
        "lab",
        "up",
        "--ip-base",
        "20",
        "--dir",
        lab.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already running"), "{err}");

    // Cross-cluster: east's client reaches echo in both clusters, and the
    // echo in west sees the client's SPIFFE ID (mTLS end to end).
    let seen = lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("west/echo/v2") && t.contains("east/echo/v1")
    });
    assert!(
        seen.contains("spiffe://cluster.local/ns/demo/sa/client"),
        "{seen}"
    );
    assert!(
        !seen.contains("(none)"),
        "every answer saw an identity: {seen}"
    );

    // `private` is not exported: west's client only ever reaches west's.
    let seen = lab.curl_until("west", "http://private.demo:8080/", 10, |t| {
        t.contains("west/private/v1")
    });
    assert!(!seen.contains("east/private"), "{seen}");

    // Protocols across the gateway: an h2c client (as gRPC apps are)
    // naming the service in :authority reaches west's app as HTTP/2, an
    // HTTP/1.1 client as HTTP/1.1; a WebSocket handshake switches and
    // bytes cross both ways.
    let proxy = lab.json()["clusters"][0]["client_proxy"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let from_west = |h2: bool| {
        for _ in 0..40 {
            let mut args = vec!["-sS", "--max-time", "10"];
            let url = format!("http://{proxy}/");
            if h2 {
                args.extend([
                    "--http2-prior-knowledge",
                    "-H",
                    "Host: echo.demo:8080",
                    &url,
                ]);
            } else {
                args.extend(["-x", &url, "http://echo.demo:8080/"]);
            }
            let out = std::process::Command::new("curl")
                .args(&args)
                .output()
                .unwrap();
            let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "curl {args:?}: {e}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
            if doc["cluster"] == "west" {
                return doc;
            }
        }
        panic!("west never answered");
    };
    let doc = from_west(true);
    assert_eq!(doc["protocol"], "HTTP/2.0", "{doc}");
    assert_eq!(
        doc["peer_identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(from_west(false)["protocol"], "HTTP/1.1");
    let mut crossed = false;
    for _ in 0..40 {
        let (first, echoed) =
            strait::lab::websocket_echo(&proxy, "http://echo.demo:8080/ws", "ping").unwrap();
        assert_eq!(echoed, "ping", "{first}");
        if first["cluster"] == "west" {
            assert_eq!(
                first["peer_identity"],
                "spiffe://cluster.local/ns/demo/sa/client"
            );
            crossed = true;
            break;
        }
    }
    assert!(crossed, "no WebSocket reached west");

    // straitctl reads the lab.
    let out = Command::new(STRAITCTL)
        .args(["--lab", lab.path().to_str().unwrap(), "exports", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("echo") && !text.contains("private"), "{text}");

    // The broker killed with -9 under traffic: no request fails (the data
    // path does not need it), and after a restart exports are intact and
    // new ones propagate.
    let dir = lab.path();
    let traffic = std::thread::spawn(move || {
        Command::new(STRAIT)
            .args([
                "lab",
                "curl",
                "east",
                "http://echo.demo:8080/",
                "-n",
                "300",
                "--dir",
            ])
            .arg(&dir)
            .output()
            .unwrap()
    });
    // Killed while the requests are flowing (the first ones are through).
    std::thread::sleep(Duration::from_millis(100));
    let (code, _, err) = lab.lab(&["kill", "broker"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !traffic.is_finished(),
        "the requests were done before the broker died: raise -n"
    );
    let out = traffic.join().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "requests failed while the broker died:\n{seen}"
    );
    assert!(seen.contains("  300  200"), "{seen}");
    assert!(seen.contains("west/echo/v2"), "{seen}");
    let (code, _, err) = lab.lab(&["start", "broker"]);
    assert_eq!(code, 0, "{err}");
    let extra = lab.dir.path().join("extra.yaml");
    std::fs::write(
        &extra,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: extra\n  namespace: demo\n  annotations: {strait.io/export: \"true\"}\nspec:\n  selector: {app: echo}\n  ports:\n  - {name: http, port: 8080}\n",
    )
    .unwrap();
    let (code, _, err) = lab.lab(&["apply", "east", extra.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let start = Instant::now();
    loop {
        let out = Command::new(STRAITCTL)
            .args(["--lab", lab.path().to_str().unwrap(), "exports", "list"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("extra") && text.contains("echo") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the new export never reached the restarted broker: {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // ... and on to west, which calls it across the gateway.
    let seen = lab.curl_until("west", "http://extra.demo:8080/", 5, |t| {
        t.contains("  5  200")
    });
    assert!(seen.contains("east/"), "{seen}");

    // The control plane killed: proxies keep their last config and keep
    // serving; restarted, they resume and take new config.
    let (code, _, err) = lab.lab(&["kill", "east/controlplane"]);
    assert_eq!(code, 0, "{err}");
    lab.curl_until("east", "http://echo.demo:8080/", 10, |t| {
        t.contains("  10  200")
    });
    let (code, _, err) = lab.lab(&["start", "east/controlplane"]);
    assert_eq!(code, 0, "{err}");
    let to_v2 = lab.dir.path().join("to-v2.yaml");
    std::fs::write(
        &to_v2,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\nspec:\n  host: echo.demo.svc.cluster.local\n  subsets:\n  - {name: v2, labels: {version: v2}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo.demo.svc.cluster.local]\n  http:\n  - route:\n    - destination: {host: echo.demo.svc.cluster.local, subset: v2}\n",
    )
    .unwrap();
    for cluster in ["east", "west"] {
        let (code, _, err) = lab.lab(&["apply", cluster, to_v2.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
    lab.curl_until("east", "http://echo.demo:8080/", 10, |t| {
        t.contains("  10  200") && t.contains("west/echo/v2") && !t.contains("east/echo/v1")
    });

    // Down leaves no process and no bound port.
    let mut addrs: Vec<String> = vec![j["brokers"][0]["address"].as_str().unwrap().to_string()];
    for c in j["clusters"].as_array().unwrap() {
        addrs.push(c["control_plane"].as_str().unwrap().to_string());
        addrs.push(c["gateway"]["tcp"].as_str().unwrap().to_string());
        for w in c["workloads"].as_array().unwrap() {
            addrs.push(w["inbound"].as_str().unwrap().to_string());
        }
    }
    lab.down();
    ports_free(&addrs).unwrap();
}

#[test]
fn federated_identity_crosses_trust_domains() {
    let lab = Lab::up("federated", 40);
    lab.assert_east_reaches_the_other_mesh();
    // `private` is not exported to the other mesh.
    let own = lab.curl_until("west", "http://private.demo:8080/", 6, |t| {
        t.contains("west/private")
    });
    assert!(!own.contains("east/private"), "{own}");
    let clusterset = lab.lab(&[
        "curl",
        "west",
        "http://private.demo.svc.clusterset.local:8080/",
    ]);
    assert!(
        !format!("{}{}", clusterset.1, clusterset.2).contains("east/private"),
        "{clusterset:?}"
    );
}

/// Primary-remote: the remote cluster, which has no control plane of its
/// own, is served by the primary's, and reached through the primary's
/// gateway.
#[test]
fn primary_remote_serves_the_remote_through_the_primarys_gateway() {
    let mut lab = Lab::up("primary-remote", 60);
    let json = lab.json();
    let clusters = json["clusters"].as_array().unwrap();
    assert_eq!(clusters[0]["name"], "primary");
    assert_eq!(clusters[1]["role"], "remote");
    assert!(
        clusters[1]["control_plane"].is_null(),
        "a remote has no control plane"
    );
    let procs: Vec<String> = std::fs::read_dir(lab.path().join("logs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !procs
            .iter()
            .any(|p| p.starts_with("remote") && p.contains("controlplane")),
        "{procs:?}"
    );

    // Both directions cross: the remote's proxies got their certificates
    // and config from the primary's control plane through its gateway.
    for from in ["primary", "remote"] {
        let seen = lab.curl_until(from, "http://echo.demo:8080/", 20, |t| {
            t.contains("primary/echo/v1") && t.contains("remote/echo/v2")
        });
        assert!(
            seen.contains("spiffe://cluster.local/ns/demo/sa/client"),
            "{seen}"
        );
        assert!(seen.contains("20  200"), "{seen}");
    }
    // `private` is not exported: each cluster reaches only its own.
    let own = lab.curl_until("remote", "http://private.demo:8080/", 6, |t| {
        t.contains("remote/private")
    });
    assert!(!own.contains("primary/private"), "{own}");

    // Policy in the remote cluster would be ignored (the primary holds
    // it): refused, pointing at the primary; its workloads' kinds apply.
    let split = example("split.yaml");
    let (code, out, err) = lab.lab(&["apply", "remote", split.to_str().unwrap()]);
    assert_eq!(code, 64, "{out}{err}");
    assert!(
        err.contains("VirtualService demo/echo") && err.contains("strait lab apply primary"),
        "{err}"
    );
    let svc = lab.dir.path().join("svc.yaml");
    std::fs::write(
        &svc,
        "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: demo}\nspec:\n  selector: {app: echo}\n  ports: [{name: http, port: 8080}]\n",
    )
    .unwrap();
    let (code, out, err) = lab.lab(&["apply", "remote", svc.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Service demo/extra created"), "{out}");
    lab.down();
}

#[test]
fn quic_mode_carries_cross_network_calls_in_tunnels() {
    let mut lab = Lab::up_with("multi-primary", 80, &["--mode", "quic"]);
    assert_eq!(lab.json()["mode"], "quic");
    for from in ["east", "west"] {
        let seen = lab.curl_until(from, "http://echo.demo:8080/", 20, |t| {
            t.contains("east/echo/v1") && t.contains("west/echo/v2")
        });
        assert!(
            seen.contains("spiffe://cluster.local/ns/demo/sa/client"),
            "{seen}"
        );
    }
    // Each side's sidecar handed its connection to its own gateway's
    // egress listener, which sent it as a stream of the pooled tunnel.
    for c in ["east", "west"] {
        let url = lab.gateway_metrics(c);
        let sent = metric(
            &url,
            "strait_gateway_tunnel_streams_total{outcome=\"sent\",reason=\"ok\"}",
        );
        let tunnels = metric(&url, "strait_gateway_active_tunnels");
        assert!(sent >= 1.0, "{c}: no tunnel stream sent");
        assert!(tunnels >= 1.0, "{c}: no tunnel up");
    }
    lab.down();
}

/// The status codes of a `lab curl` summary, e.g. `["200"]`.
fn status_codes(summary: &str) -> Vec<String> {
    summary
        .lines()
        .skip_while(|l| !l.starts_with("status codes:"))
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Every request answered 200, by both clusters.
fn both_clusters_all_ok(summary: &str) -> bool {
    status_codes(summary) == ["200"]
        && summary.contains("east/echo/v1")
        && summary.contains("west/echo/v2")
}

/// A root rotation under cross-cluster traffic, to the end: at every
/// stage calls from each cluster reach both clusters, every sidecar
/// renews under the new root (10 s certificates), and once `finish` has
/// dropped the old root, they still do.
#[test]
fn root_rotation_under_cross_cluster_traffic() {
    let mut lab = Lab::up_with("multi-primary", 140, &["--cert-ttl", "10s"]);
    let ctl = |args: &[&str]| {
        let out = Command::new(STRAITCTL)
            .arg("--lab")
            .arg(lab.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "straitctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let wait_rotation = |what: &str, field: &str| {
        let start = Instant::now();
        loop {
            let v: Value =
                serde_json::from_str(&ctl(&["trust", "rotate-root", "status", "-o", "json"]))
                    .unwrap();
            let clusters = v["clusters"].as_array().unwrap();
            if !clusters.is_empty() && clusters.iter().all(|c| c[field] == true) {
                return;
            }
            assert!(start.elapsed() < UP, "{what}: not reached: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let traffic = |stage: &str| {
        for from in ["east", "west"] {
            let seen = lab.curl_until(from, "http://echo.demo:8080/", 20, both_clusters_all_ok);
            assert!(
                seen.contains("spiffe://cluster.local/ns/demo/sa/client"),
                "{stage}, from {from}: {seen}"
            );
        }
    };
    traffic("before");

    ctl(&["trust", "rotate-root", "begin"]);
    wait_rotation("bundle acknowledged", "bundle_acknowledged");
    traffic("distributing");
    ctl(&["trust", "rotate-root", "advance"]);
    wait_rotation("intermediates re-issued", "on_target");
    traffic("reissuing");

    // Every sidecar serves a certificate under the new root (verified by
    // openssl with the new root alone).
    let roots = lab.path().join("mesh/broker/roots");
    let new_root = std::fs::read_dir(&roots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("root-cert.pem");
    let json = lab.json();
    let inbounds: Vec<String> = json["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["workloads"].as_array().unwrap().iter())
        .map(|w| w["inbound"].as_str().unwrap().to_string())
        .collect();
    assert!(inbounds.len() >= 6, "{inbounds:?}");
    // The leaf `inbound` serves when it verifies under the new root alone.
    let new_leaf = |inbound: &str| -> Option<String> {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", inbound, "-CAfile"])
            .arg(&new_root)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("Verify return code: 0 (ok)") {
            return None;
        }
        let begin = text.find("-----BEGIN CERTIFICATE-----")?;
        let end = text[begin..].find("-----END CERTIFICATE-----")?;
        Some(text[begin..begin + end].to_string())
    };
    // Waits until every sidecar serves a leaf under the new root, other
    // than the one it served at `before` (if any); returns them.
    let renewed = |before: &[Option<String>]| -> Vec<Option<String>> {
        let start = Instant::now();
        inbounds
            .iter()
            .zip(before)
            .map(|(inbound, old)| {
                loop {
                    let leaf = new_leaf(inbound);
                    if leaf.is_some() && leaf != *old {
                        return leaf;
                    }
                    assert!(
                        start.elapsed() < UP,
                        "{inbound} served no new certificate under the new root\n{}",
                        lab.logs()
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
            .collect()
    };
    let on_new_root = renewed(&vec![None; inbounds.len()]);

    // The old root goes once the last leaf issued under it has expired:
    // the control planes cap leaves at the lab's 10 s (`--max-cert-ttl`)
    // and told the broker, so `finish` without --force is refused with
    // the time to wait, then accepted within seconds, not 24 h.
    let finish_at = Instant::now();
    let refusals = loop {
        let out = Command::new(STRAITCTL)
            .arg("--lab")
            .arg(lab.path())
            .args(["trust", "rotate-root", "finish"])
            .output()
            .unwrap();
        if out.status.success() {
            break finish_at.elapsed();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("may live until") && err.contains("up to 10s"),
            "finish refused for another reason: {err}"
        );
        assert!(
            finish_at.elapsed() < Duration::from_secs(30),
            "finish still refused after 30 s with 10 s leaves: {err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("rotate-root finish accepted {refusals:?} after re-issuing was seen");
    let start = Instant::now();
    loop {
        let v: Value =
            serde_json::from_str(&ctl(&["trust", "rotate-root", "status", "-o", "json"])).unwrap();
        if v["stage"] == "idle" {
            break;
        }
        assert!(start.elapsed() < UP, "not idle: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Renewals go on without the old root: each sidecar gets a new leaf.
    renewed(&on_new_root);
    traffic("after finish");
    lab.down();
}

/// Across trust domains in QUIC mode: the gateways of the two meshes get
/// their certificates from their own control planes and open a tunnel to
/// each other, each verifying the other against that mesh's bundle, which
/// only the control plane's pushed bundles carry.
#[test]
fn federated_quic_tunnels_cross_trust_domains() {
    let mut lab = Lab::up_with("federated", 120, &["--mode", "quic"]);
    lab.assert_east_reaches_the_other_mesh();
    let sent = metric(
        &lab.gateway_metrics("east"),
        "strait_gateway_tunnel_streams_total{outcome=\"sent\",reason=\"ok\"}",
    );
    assert!(sent >= 1.0, "east sent no tunnel stream");
    let accepted = metric(
        &lab.gateway_metrics("west"),
        "strait_gateway_tunnel_connections_total{outcome=\"accepted\",reason=\"ok\"}",
    );
    assert!(
        accepted >= 1.0,
        "west accepted no tunnel from the other mesh"
    );
    lab.down();
}

/// The README's main command: every step of the tour passes.
#[test]
fn the_demo_passes_every_step() {
    demo_passes(&["--ip-base", "120"]);
}

/// `lab apply` is object-based, as `kubectl apply` is: an object of the
/// same kind, namespace and name from another file replaces the first
/// (before, both files stayed and the second was rejected by the control
/// plane while `apply` said "applied"); an object the control plane
/// rejects fails the apply with its reason, and the last good version
/// stays; `delete` removes by identity.
#[test]
fn apply_replaces_by_identity_and_reports_rejections() {
    let mut lab = Lab::up("multi-primary", 160);
    let dir = lab.dir.path().to_path_buf();
    // Every sidecar says once that it is ready and where it listens.
    let sidecar_log =
        std::fs::read_to_string(lab.path().join("logs/east-client-sidecar.log")).unwrap();
    assert!(
        sidecar_log.contains("sidecar ready: inbound (mTLS) "),
        "{sidecar_log}"
    );
    let vs = |name: &str, subset: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  hosts: [echo.demo.svc.cluster.local]\n  http:\n  - route:\n    - destination: {{host: echo.demo.svc.cluster.local, subset: {subset}}}\n"
        )
    };
    let subsets = example("subsets.yaml");
    for cluster in ["east", "west"] {
        let (code, out, err) = lab.lab(&["apply", cluster, subsets.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("DestinationRule demo/echo created"), "{out}");
    }
    let to_v1 = dir.join("to-v1.yaml");
    std::fs::write(&to_v1, vs("echo", "v1")).unwrap();
    let (code, out, err) = lab.lab(&["apply", "east", to_v1.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("VirtualService demo/echo created"), "{out}");
    lab.curl_until("east", "http://echo.demo:8080/", 10, |t| {
        t.contains("10  200") && t.contains("east/echo/v1") && !t.contains("west/")
    });
    // The same object from another file replaces it.
    let to_v2 = dir.join("to-v2.yaml");
    std::fs::write(&to_v2, vs("echo", "v2")).unwrap();
    let (code, out, err) = lab.lab(&["apply", "east", to_v2.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("VirtualService demo/echo configured"), "{out}");
    lab.curl_until("east", "http://echo.demo:8080/", 10, |t| {
        t.contains("10  200") && t.contains("west/echo/v2") && !t.contains("east/")
    });
    let (code, out, err) = lab.lab(&["apply", "east", to_v2.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("VirtualService demo/echo unchanged"), "{out}");

    // A file the control plane reads but refuses: a hand-written file
    // defining the object already in force (the control plane keeps the
    // first file's). The apply fails with the control plane's reason.
    let config_dir = lab.path().join("east/config");
    std::fs::write(config_dir.join("aaa-by-hand.yaml"), vs("echo", "v1")).unwrap();
    let back_to_v1 = dir.join("back.yaml");
    std::fs::write(&back_to_v1, vs("echo", "v1")).unwrap();
    let (code, out, err) = lab.lab(&["apply", "east", back_to_v1.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("VirtualService demo/echo rejected"), "{out}");
    assert!(
        err.contains("already defined in") && err.contains("aaa-by-hand.yaml"),
        "{err}"
    );
    std::fs::remove_file(config_dir.join("aaa-by-hand.yaml")).unwrap();

    // An object strait cannot read is refused by name; nothing of it is
    // written, the rest of the file applies.
    let mixed = dir.join("mixed.yaml");
    std::fs::write(
        &mixed,
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x, namespace: demo}}\n---\n{}",
            vs("other", "v1")
        ),
    )
    .unwrap();
    let (code, out, err) = lab.lab(&["apply", "east", mixed.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("Deployment demo/x"), "{err}");
    assert!(out.contains("VirtualService demo/other created"), "{out}");

    // Delete by identity: the content in the file does not matter.
    let (code, out, err) = lab.lab(&["delete", "east", to_v1.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("VirtualService demo/echo deleted"), "{out}");
    let (code, out, err) = lab.lab(&["delete", "east", to_v1.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("not found"), "{out}");
    let (code, out, err) = lab.lab(&["delete", "east", mixed.to_str().unwrap()]);
    assert_ne!(code, 0, "the Deployment is named: {out}{err}");
    assert!(out.contains("VirtualService demo/other deleted"), "{out}");
    lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("20  200") && t.contains("east/echo/v1") && t.contains("west/echo/v2")
    });

    // The shipped failover policy is one the control plane takes.
    let (code, out, err) = lab.lab(&["apply", "east", example("failover.yaml").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("DestinationRule demo/echo configured"),
        "{out}"
    );
    assert!(out.contains("VirtualService demo/echo created"), "{out}");

    // An unknown cluster is a usage error naming the lab's clusters.
    let (code, _, err) = lab.lab(&["apply", "north", to_v1.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("east, west"), "{err}");
    for args in [
        &["curl", "north", "http://echo.demo:8080/"][..],
        &["partition", "east", "north"],
        &["kill", "north/gateway"],
    ] {
        let (code, _, err) = lab.lab(args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains("east"), "{args:?}: {err}");
    }
    lab.down();
}

/// How many answers of a `lab curl` summary came from `who`
/// (`cluster/service/version`).
fn answered_by(summary: &str, who: &str) -> u32 {
    summary
        .lines()
        .find(|l| l.trim_end().ends_with(&format!("  {who}")))
        .and_then(|l| l.split_whitespace().next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A subset defined only where it is called from (east), for endpoints
/// that run in another cluster (west's echo is all v2): east reaches it
/// through west's gateway, and an 80/20 split between east's v1 and
/// west's v2 gives each its share. Before, the SNI named the subset,
/// west's gateway refused it (`unknown_subset`), and every v2 attempt was
/// retried onto a new weight roll: 0 % v2 and no error.
#[test]
fn a_split_onto_a_subset_only_the_caller_defines_keeps_its_weights() {
    let mut lab = Lab::up("multi-primary", 180);
    let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\nspec:\n  host: echo.demo.svc.cluster.local\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n";
    let route = |v1: u32, v2: u32| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo, namespace: demo}}\nspec:\n  hosts: [echo.demo.svc.cluster.local]\n  http:\n  - route:\n    - {{destination: {{host: echo.demo.svc.cluster.local, subset: v1}}, weight: {v1}}}\n    - {{destination: {{host: echo.demo.svc.cluster.local, subset: v2}}, weight: {v2}}}\n"
        )
    };
    // One file, changed in place: `lab apply` tracks objects by file.
    let apply = |yaml: String| {
        let file = lab.dir.path().join("echo-routing.yaml");
        std::fs::write(&file, yaml).unwrap();
        let (code, _, err) = lab.lab(&["apply", "east", file.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    };
    // All of it to v2, which only west runs.
    apply(format!("{rule}{}", route(0, 100)));
    lab.curl_until("east", "http://echo.demo:8080/", 10, |t| {
        status_codes(t) == ["200"] && answered_by(t, "west/echo/v2") == 10
    });
    // 80/20: east's v1 showing up says the split is in force.
    apply(format!("{rule}{}", route(80, 20)));
    lab.curl_until("east", "http://echo.demo:8080/", 10, |t| {
        t.contains("east/echo/v1")
    });
    let n = 200;
    let (_, out, err) = lab.lab(&[
        "curl",
        "east",
        "http://echo.demo:8080/",
        "-n",
        &n.to_string(),
    ]);
    let summary = format!("{out}{err}");
    assert_eq!(status_codes(&summary), ["200"], "{summary}");
    // Binomial(200, 0.2): mean 40, sd 5.7; this range is about ±4 sd.
    let v2 = answered_by(&summary, "west/echo/v2");
    assert!(
        (17..=70).contains(&v2),
        "v2 answered {v2} of {n}:\n{summary}"
    );
    assert_eq!(answered_by(&summary, "east/echo/v1") + v2, n, "{summary}");
    lab.down();
}
