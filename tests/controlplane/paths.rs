//! The mesh's path normalization end to end: `strait controlplane
//! --path-normalization MERGE_SLASHES` pushes it, a real `strait-sidecar`
//! applies it before a DENY AuthorizationPolicy on `/admin` and forwards
//! the normalized path to its app; `curl --path-as-is` is the client.

use std::io::{Read, Write};
use std::process::Command;

use common::free_port;

use super::*;

/// An app on loopback that answers 200 with its request line; its port.
fn app() -> u16 {
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
            let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line).to_string();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{line}",
                line.len()
            );
        }
    });
    port
}

/// `curl --path-as-is http://<addr><path>`: status and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--path-as-is",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_planes_path_normalization_reaches_the_sidecar() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let extra = ["--path-normalization", "merge_slashes"].map(String::from);
    let cp = ControlPlane::start_with(
        &s,
        &broker,
        "east",
        "net-east",
        "192.0.2.10:15443",
        None,
        &extra,
    );
    put(
        &cp.config,
        "web.yaml",
        &format!(
            "{}---\n{}",
            workload_yaml("web-1", "web", "127.0.0.1", "net-east"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: deny-admin, namespace: demo}\n\
             spec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/admin, /admin/*]}\n"
        ),
    );
    let app_port = app();
    let token = s.write("web.token", &cp.token("demo", "web", "web-1"));
    let health = format!("127.0.0.1:{}", free_port());
    let inbound = format!("127.0.0.1:{}", free_port());
    let mut sidecar = Process::spawn(
        &s,
        "sidecar",
        Command::new(crate::support::sidecar_exe())
            .args(["--workload", "web-1", "--namespace", "demo"])
            .args(["--control-plane", &cp.listen])
            .arg("--token")
            .arg(&token)
            .arg("--root-cert")
            .arg(cp.state.join("cacerts/root-cert.pem"))
            .args(["--inbound", &inbound])
            .args(["--health-listen", &health])
            .args(["--app", &format!("127.0.0.1:{app_port}")])
            .args(["--outbound", &format!("127.0.0.1:{}", free_port())])
            .args(["--access-log", "off"]),
    );
    sidecar.ready(&s, &health).await;

    // The policy arrives with a push of its own once the control plane
    // has read the file.
    let deadline = Instant::now() + WAIT;
    while get(&inbound, "/admin").0 != 403 {
        assert!(
            Instant::now() < deadline,
            "the DENY never applied:\n{}\n{}",
            sidecar.log(&s),
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for bypass in ["//admin", "/x/..//admin", "/%61dmin", "/.//admin\\x"] {
        assert_eq!(get(&inbound, bypass).0, 403, "{bypass}");
    }
    assert_eq!(get(&inbound, "/admin%00").0, 400);
    let (status, body) = get(&inbound, "//public/./a/..//x?q=//");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "GET /public/x?q=// HTTP/1.1");
    sidecar.assert_running(&s);
}
