//! A transparent pod's probes, as the injection webhook rewrites them,
//! answered by a real sidecar: the kubelet's GET of the path the webhook
//! wrote reaches the app on loopback and reports what the app says, also
//! once STRICT mTLS refuses the plain-text probes the kubelet would
//! otherwise send through the inbound listener.

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{free_port, http_status};
use serde_json::{Value, json};
use strait_controlplane::kube::inject::{self, InjectConfig};

use super::*;

/// An app on loopback whose `/healthz` answers 200 while `healthy` holds
/// and 500 after; its port.
fn app(healthy: Arc<AtomicBool>) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let status = match head.starts_with(b"GET /healthz ") {
                true if healthy.load(Ordering::SeqCst) => "200 OK",
                true => "500 Internal Server Error",
                false => "404 Not Found",
            };
            let _ = write!(s, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
        }
    });
    port
}

/// The `op` of `ops` at `path`.
fn op_at<'a>(ops: &'a [Value], path: &str) -> &'a Value {
    &ops.iter()
        .find(|op| op["path"] == path)
        .unwrap_or_else(|| panic!("no {path} in {ops:?}"))["value"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_sidecar_answers_the_rewritten_probes() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let cp = ControlPlane::start(&s, &broker, "east", "net-east", "192.0.2.10:15443");
    put(
        &cp.config,
        "web.yaml",
        &workload_yaml("web-1", "web", "127.0.0.1", "net-east"),
    );
    let healthy = Arc::new(AtomicBool::new(true));
    let http_port = app(healthy.clone());
    // Only accepts (the kernel completes the handshake): a tcpSocket probe.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();

    let pod = json!({
        "metadata": {"annotations": {inject::INTERCEPTION_ANNOTATION: "transparent"}},
        "spec": {"containers": [{
            "name": "web",
            "ports": [
                {"name": "http", "containerPort": http_port},
                {"name": "grpc", "containerPort": tcp_port},
            ],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            "readinessProbe": {"tcpSocket": {"port": "grpc"}},
        }]},
    });
    let cfg = InjectConfig {
        image: "strait:dev".into(),
        control_plane: cp.listen.clone(),
        interception: inject::Interception::Explicit,
    };
    let ops = inject::patch_for(&pod, &cfg).unwrap().unwrap();
    // What the kubelet will ask for, and what the sidecar is given (as
    // Kubernetes hands it over: "$$" is "$").
    let probe_path = |field: &str| {
        let get = &op_at(&ops, &format!("/spec/containers/0/{field}"))["httpGet"];
        assert_eq!(get["port"], 15021, "{field} goes to the health port");
        get["path"].as_str().unwrap().to_string()
    };
    let (live, ready) = (probe_path("livenessProbe"), probe_path("readinessProbe"));
    let env = op_at(&ops, "/spec/containers/-")["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == strait_model::probe::ENV)
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .replace("$$", "$");

    let token = s.write("web.token", &cp.token("demo", "web", "web-1"));
    let health = format!("127.0.0.1:{}", free_port());
    let inbound = format!("127.0.0.1:{}", free_port());
    let mut sidecar = Process::spawn(
        &s,
        "sidecar",
        Command::new(crate::support::sidecar_exe())
            .env(strait_model::probe::ENV, &env)
            .args(["--workload", "web-1", "--namespace", "demo"])
            .args(["--control-plane", &cp.listen])
            .arg("--token")
            .arg(&token)
            .arg("--root-cert")
            .arg(cp.state.join("cacerts/root-cert.pem"))
            .args(["--inbound", &inbound])
            .args(["--health-listen", &health])
            .args(["--app", &format!("127.0.0.1:{http_port}")])
            .args(["--outbound", &format!("127.0.0.1:{}", free_port())])
            .args(["--access-log", "off"]),
    );
    sidecar.ready(&s, &health).await;

    assert_eq!(
        http_status(&health, &live),
        Some(200),
        "{}",
        sidecar.log(&s)
    );
    assert_eq!(http_status(&health, &ready), Some(200));

    // Why the probes are rewritten: redirected to the inbound listener, a
    // kubelet's plain-text probe reaches the app under PERMISSIVE (the
    // default) and is refused once the namespace is STRICT.
    assert_eq!(http_status(&inbound, "/healthz"), Some(200));
    put(
        &cp.config,
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let deadline = Instant::now() + WAIT;
    while http_status(&inbound, "/healthz").is_some() {
        assert!(
            Instant::now() < deadline,
            "STRICT never applied:\n{}",
            sidecar.log(&s)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The rewritten probes do not go through it.
    assert_eq!(http_status(&health, &live), Some(200));
    assert_eq!(http_status(&health, &ready), Some(200));

    // The answers follow the app.
    healthy.store(false, Ordering::SeqCst);
    assert_eq!(http_status(&health, &live), Some(503));
    drop(tcp);
    assert_eq!(http_status(&health, &ready), Some(503));
    healthy.store(true, Ordering::SeqCst);
    assert_eq!(http_status(&health, &live), Some(200));
    // Only the paths it was given.
    assert_eq!(http_status(&health, "/app-health/other/livez"), Some(404));
    sidecar.assert_running(&s);
}

#[test]
fn a_sidecar_refuses_bad_probes_naming_them() {
    let health = format!("127.0.0.1:{}", free_port());
    for (env, health, want) in [
        (
            r#"{"/app-health/web/livez": {"tcpSocket": {"port": 0}}}"#,
            Some(health.as_str()),
            r#"--app-probers: STRAIT_APP_PROBERS: "/app-health/web/livez": tcpSocket.port is 0"#,
        ),
        (
            r#"{"/app-health/web/livez": {"tcpSocket": {"port": 1}}}"#,
            None,
            "--app-probers are answered on the health listener: give --health-listen",
        ),
    ] {
        let mut cmd = Command::new(crate::support::sidecar_exe());
        cmd.env(strait_model::probe::ENV, env)
            .args(["--workload", "web-1", "--namespace", "demo"])
            .args(["--control-plane", "127.0.0.1:1", "--token", "/nonexistent"])
            .args(["--root-cert", "/nonexistent"]);
        if let Some(h) = health {
            cmd.args(["--health-listen", h]);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(want), "{env}: {stderr}");
    }
}
