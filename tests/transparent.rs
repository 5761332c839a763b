//! `strait sidecar iptables --apply`, as the injection webhook gives it to
//! a transparent pod's init container, for real in a network namespace this
//! test makes: the rules go in as one transaction, a second apply is
//! refused, and an app's connection to an outside address lands on the
//! outbound listener, which reads where it was going (SO_ORIGINAL_DST).
//!
//! Skipped, with the reason printed, unless root with iproute2 and
//! iptables (`scripts/test.sh` installs iptables).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const STRAIT: &str = env!("CARGO_BIN_EXE_strait");

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A network namespace for the test, removed when dropped.
struct Netns(String);

impl Netns {
    fn new(what: &str) -> Result<Netns, String> {
        let name = format!("strait-{what}-{}", std::process::id());
        let (ok, out) = run(&["ip", "netns", "add", &name]);
        if !ok {
            return Err(format!("cannot create a network namespace: {out}"));
        }
        let ns = Netns(name);
        // An interface for an "outside" address, so that routing finds a
        // way before NAT redirects the connection.
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            vec!["addr", "add", "10.9.9.1/24", "dev", "v0"],
            vec!["link", "set", "v0", "up"],
            vec!["link", "set", "v1", "up"],
        ] {
            let mut args = vec!["ip", "-n", &ns.0];
            args.extend(cmd);
            let (ok, out) = run(&args);
            assert!(ok, "{args:?}: {out}");
        }
        Ok(ns)
    }

    fn exec(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend(args);
        run(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}

fn unavailable() -> Option<String> {
    if !run(&["id", "-u"]).1.trim().eq("0") {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables-restore", "iptables-save"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Some(format!("{tool} is missing"));
        }
    }
    None
}

/// The command the injection webhook gives a transparent pod's init
/// container, with this build's `strait` in place of the image's.
fn injected_init_command() -> Vec<String> {
    use strait_controlplane::kube::inject;
    let pod = serde_json::json!({
        "metadata": {"annotations": {inject::INTERCEPTION_ANNOTATION: "transparent"}},
        "spec": {"containers": [{"name": "app"}]},
    });
    let cfg = inject::InjectConfig {
        image: "strait:dev".into(),
        control_plane: "controlplane.strait-system.svc:15012".into(),
        interception: inject::Interception::Explicit,
    };
    let ops = inject::patch_for(&pod, &cfg).unwrap().unwrap();
    let init = ops
        .iter()
        .find(|o| o["path"] == "/spec/initContainers/-")
        .expect("an init container")["value"]
        .clone();
    assert_eq!(init["command"], serde_json::json!(["strait"]));
    std::iter::once(STRAIT.to_string())
        .chain(
            init["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string()),
        )
        .collect()
}

/// What the injected init container runs, run for real.
#[test]
fn applied_rules_send_an_apps_connection_to_the_outbound_listener() {
    let Some((ns, out)) = with_injected_rules("ipt") else {
        return;
    };
    assert!(out.contains("rules applied"), "{out}");
    let (ok, saved) = ns.exec(&["iptables-save", "-t", "nat"]);
    assert!(ok, "{saved}");
    for rule in [
        "-A OUTPUT -p tcp -j STRAIT_OUTPUT",
        "-A STRAIT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A STRAIT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "--uid-owner 1337 -j RETURN",
    ] {
        assert!(saved.contains(rule), "{rule:?} not in:\n{saved}");
    }
    // Applied already: refused, and nothing changed.
    let init = injected_init_command();
    let init: Vec<&str> = init.iter().map(String::as_str).collect();
    let (ok, out) = ns.exec(&init);
    assert!(!ok, "a second apply succeeded: {out}");
    assert!(
        out.contains("applied in this network namespace already"),
        "{out}"
    );
    assert_eq!(
        ns.exec(&["iptables-save", "-t", "nat"])
            .1
            .lines()
            .filter(|l| l.starts_with("-A"))
            .count(),
        saved.lines().filter(|l| l.starts_with("-A")).count()
    );

    // In the namespace: the outbound listener on 15001, and an app (this
    // thread, uid 0, not the proxy's 1337) calling 10.9.9.9:8080.
    let ns = std::sync::Arc::new(ns);
    let original = in_netns(&ns, None, || async {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:15001")
            .await
            .unwrap();
        let app = tokio::spawn(tokio::net::TcpStream::connect("10.9.9.9:8080"));
        let (accepted, _) = listener.accept().await.unwrap();
        let _app = app.await.unwrap().unwrap();
        strait_sidecar::transparent::original_dst(&accepted).unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(original.to_string(), "10.9.9.9:8080");
}

/// A network namespace with the rules the injected init container applies,
/// and what applying them printed; `None` (the reason printed) where the
/// test cannot run.
fn with_injected_rules(what: &str) -> Option<(Netns, String)> {
    if let Some(why) = unavailable() {
        eprintln!("skipped: needs root, iproute2 and iptables ({why})");
        return None;
    }
    let ns = match Netns::new(what) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: {why}");
            return None;
        }
    };
    let init = injected_init_command();
    let init: Vec<&str> = init.iter().map(String::as_str).collect();
    let (ok, out) = ns.exec(&init);
    assert!(ok, "apply: {out}");
    Some((ns, out))
}

/// Runs `task` on a thread of its own inside `ns`, as `uid` if given, on a
/// one-thread runtime (so its sockets are made there, by that user).
fn in_netns<T, F, Fut>(
    ns: &std::sync::Arc<Netns>,
    uid: Option<u32>,
    task: F,
) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let ns = ns.clone();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let file = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).unwrap();
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        if let Some(uid) = uid {
            rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid)).unwrap();
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(task())
    })
}

/// Serves `status` to every HTTP request on `listener`.
async fn answer(listener: tokio::net::TcpListener, status: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut s, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let reply =
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = s.write_all(reply.as_bytes()).await;
        });
    }
}

/// The sidecar's app probe to its pod's own IP reaches the app, while the
/// sidecar's other connections there go to the inbound listener: the rules
/// the init container applies and the prober's source address agree.
#[test]
fn an_app_probe_to_the_pods_ip_reaches_the_app_not_the_inbound_listener() {
    let Some((ns, _)) = with_injected_rules("probe") else {
        return;
    };

    // In the namespace: the app on the pod's IP (10.9.9.1) and the inbound
    // listener on 15006, served by a thread of their own (as root).
    let ns = std::sync::Arc::new(ns);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // Dropped, also when an assertion fails: the servers end and the last
    // handle on the namespace removes it.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let servers = in_netns(&ns, None, || async move {
        let app = tokio::net::TcpListener::bind("10.9.9.1:8080")
            .await
            .unwrap();
        let inbound = tokio::net::TcpListener::bind("0.0.0.0:15006")
            .await
            .unwrap();
        ready_tx.send(()).unwrap();
        tokio::select! {
            _ = answer(app, "200 OK") => {}
            _ = answer(inbound, "500 Internal Server Error") => {}
            _ = stop_rx => {}
        }
    });
    ready_rx.recv().unwrap();

    // The sidecar's side: a thread with the proxy's uid (1337).
    let (plain, probed) = in_netns(&ns, Some(1337), || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Any other connection of the sidecar to its pod's IP is inbound
        // traffic: it lands on 15006.
        let mut c = tokio::net::TcpStream::connect("10.9.9.1:8080")
            .await
            .unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).await.unwrap();
        let probers = strait_model::probe::AppProbers::parse(
            r#"{"/app-health/app/livez": {"httpGet": {"path": "/healthz", "port": 8080}}}"#,
        )
        .unwrap();
        let probe = probers.get("/app-health/app/livez").unwrap();
        let probed = strait_sidecar::probe::check(probe, "10.9.9.1".parse().unwrap())
            .await
            .map_err(|e| e.to_string());
        (reply, probed)
    })
    .join()
    .unwrap();
    assert!(
        plain.starts_with("HTTP/1.1 500"),
        "the sidecar's plain connection should meet the inbound listener: {plain:?}"
    );
    assert_eq!(probed, Ok(()), "the probe should reach the app");
    drop(stop_tx);
    servers.join().unwrap();
}
