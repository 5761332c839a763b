//! Transparent mode for real: two network namespaces this test makes (a
//! pod and the outside world, joined by a veth pair), istio-init-like
//! iptables rules applied in the pod, the app (a thread of another uid)
//! dialing outside addresses as if there were no sidecar. What the
//! outbound listener does with each redirected connection:
//!
//! - HTTP for a mesh service is routed through the mesh (mTLS);
//! - HTTP for a host outside the mesh goes to where the app was going;
//! - anything else (here a client-first protocol, and a server-first one
//!   that sends nothing until the server greets it) goes through as it is,
//!   while a client that connects well before its first HTTP request is
//!   still routed;
//! - with `--outbound-traffic-policy registry-only`, the last two are
//!   refused and the mesh service still works.
//!
//! Skipped, with the reason printed, unless root with iproute2 and
//! iptables (`scripts/test.sh` installs iptables).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;
use strait_ca::testing::TestPki;
use strait_sidecar::transparent::{InterceptOptions, iptables_rules, restore_input};

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    if stdin.is_some() {
        cmd.stdin(std::process::Stdio::piped());
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{args:?}: {e}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{args:?}: {text}"))
    }
}

/// The pod and outside namespaces, removed when dropped.
struct Namespaces {
    pod: String,
    out: String,
}

impl Namespaces {
    fn new() -> Result<Namespaces, String> {
        let id = std::process::id();
        let ns = Namespaces {
            pod: format!("strait-tp-pod-{id}"),
            out: format!("strait-tp-out-{id}"),
        };
        for name in [&ns.pod, &ns.out] {
            run(&["ip", "netns", "add", name], None)?;
        }
        let (pod, out) = (ns.pod.as_str(), ns.out.as_str());
        for cmd in [
            vec!["ip", "-n", pod, "link", "set", "lo", "up"],
            vec!["ip", "-n", out, "link", "set", "lo", "up"],
            vec![
                "ip", "-n", pod, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
                "netns", out,
            ],
            vec!["ip", "-n", pod, "addr", "add", "10.9.9.1/24", "dev", "v0"],
            vec!["ip", "-n", out, "addr", "add", "10.9.9.2/24", "dev", "v1"],
            vec!["ip", "-n", pod, "link", "set", "v0", "up"],
            vec!["ip", "-n", out, "link", "set", "v1", "up"],
        ] {
            run(&cmd, None)?;
        }
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in [&self.pod, &self.out] {
            let _ = run(&["ip", "netns", "delete", name], None);
        }
    }
}

/// Why the test cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables-restore"] {
        if run(&["sh", "-c", &format!("command -v {tool}")], None).is_err() {
            return Some(format!("{tool} is missing"));
        }
    }
    None
}

/// Moves the calling thread into network namespace `name`.
fn enter(name: &str) {
    use std::os::fd::AsFd;
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|e| panic!("entering {name}: {e}"));
}

/// Serves, in the outside namespace, on 10.9.9.2: 7000 answers each
/// chunk with `outside:<chunk>`; 7001 first greets (`220 hello\r\n`),
/// then does the same; 7080 answers one HTTP/1.1 request with the Host
/// and path it got, then closes.
fn outside_servers(ns: String) {
    std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for (port, greet) in [(7000u16, false), (7001, true), (7080, false)] {
                let l = tokio::net::TcpListener::bind(("10.9.9.2", port)).await.unwrap();
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = l.accept().await {
                        tokio::spawn(async move {
                            if greet {
                                s.write_all(b"220 hello\r\n").await.unwrap();
                            }
                            let mut buf = vec![0u8; 4096];
                            if port == 7080 {
                                let n = s.read(&mut buf).await.unwrap();
                                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                                let path = head.split(' ').nth(1).unwrap_or("?").to_string();
                                let host = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("host: ").or(l.strip_prefix("Host: ")))
                                    .unwrap_or("?")
                                    .to_string();
                                let body = format!("outside host={host} path={path}");
                                let resp = format!(
                                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                    body.len()
                                );
                                s.write_all(resp.as_bytes()).await.unwrap();
                                return;
                            }
                            loop {
                                match s.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => {
                                        let mut out = b"outside:".to_vec();
                                        out.extend_from_slice(&buf[..n]);
                                        s.write_all(&out).await.unwrap();
                                    }
                                }
                            }
                        });
                    }
                });
            }
            std::future::pending::<()>().await;
        });
    });
}

/// Runs `f` as the app: on a thread of uid 1000 in the pod (its
/// connections are redirected; the sidecar's, as root, are not).
async fn as_app<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        // Only this thread's ids (the raw syscall, not libc's all-threads
        // one).
        let app = rustix::process::Uid::from_raw(1000);
        rustix::thread::set_thread_res_uid(app, app, app).unwrap();
        let _ = tx.send(f());
    });
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("the app's calls finish")
        .expect("the app thread did not panic")
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("10.9.9.2", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// `GET /p` with `Host: host` to 10.9.9.2:7080: the whole answer.
fn http(host: &str) -> String {
    http_after(host, Duration::ZERO)
}

/// [`http`], the request sent `pause` after connecting (a client that
/// connects ahead of its first request).
fn http_after(host: &str, pause: Duration) -> String {
    let mut s = connect(7080);
    std::thread::sleep(pause);
    write!(
        s,
        "GET /p HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    all
}

/// Points the pod's redirect at another outbound port.
fn redirect_to(pod: &str, port: u16) {
    run(
        &["ip", "netns", "exec", pod, "iptables-restore", "--noflush"],
        Some(&format!(
            "*nat\n-F STRAIT_REDIRECT\n-A STRAIT_REDIRECT -p tcp -j REDIRECT --to-ports {port}\nCOMMIT\n"
        )),
    )
    .unwrap();
}

/// What the app sees calling outside addresses.
fn app_checks() -> Vec<String> {
    let read_until = |s: &mut TcpStream, want: usize| {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while got.len() < want {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    };
    let mut seen = Vec::new();
    // A client-first protocol that is not HTTP.
    let mut s = connect(7000);
    s.write_all(b"\x16\x03\x01hello").unwrap();
    seen.push(read_until(&mut s, 16));
    // A server-first one: the greeting comes though the client is silent.
    let mut s = connect(7001);
    seen.push(read_until(&mut s, 11));
    s.write_all(b"QUIT").unwrap();
    seen.push(read_until(&mut s, 12));
    // HTTP, for a host outside the mesh and for a mesh service.
    seen.push(http("api.example.com"));
    seen.push(http("echo.demo:8080"));
    // Connected ahead of its request, longer than the sniffing waits: the
    // request is still routed, not passed through as raw bytes.
    seen.push(http_after("echo.demo:8080", Duration::from_millis(400)));
    seen
}

#[test]
fn redirected_traffic_is_routed_or_passed_through() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: needs root, iproute2 and iptables ({why})");
        return;
    }
    let ns = match Namespaces::new() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: cannot make network namespaces: {why}");
            return;
        }
    };
    outside_servers(ns.out.clone());
    let pod = ns.pod.clone();
    let (seen, metrics, refused) = std::thread::spawn(move || {
        enter(&pod);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pki = TestPki::new(TD);
            let (client, _server, mesh) = sleep_and_echo(&pki, backend("v1").await).await;
            // The sidecars run as root here: that is the proxy's uid.
            let rules = iptables_rules(&InterceptOptions {
                proxy_uid: 0,
                outbound_port: client.outbound.port(),
                inbound_port: 15006,
                ..InterceptOptions::default()
            })
            .unwrap();
            run(
                &["ip", "netns", "exec", &pod, "iptables-restore", "--noflush"],
                Some(&restore_input(&rules).unwrap()),
            )
            .unwrap();
            let seen = as_app(app_checks).await;
            let metrics = client.metrics();

            // Registry-only: a client sidecar that refuses the outside.
            let strict = Sidecar::start_opts(
                "sleep",
                "demo",
                backend("sleep").await,
                identity(&pki, &spiffe("demo", "sleep")),
                &pki,
                Duration::from_secs(5),
                strait_sidecar::OutboundPolicy::RegistryOnly,
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            )
            .await;
            strict.push(&mesh);
            redirect_to(&pod, strict.outbound.port());
            let refused = as_app(|| {
                let mut s = connect(7000);
                s.write_all(b"hello").unwrap();
                let mut buf = [0u8; 64];
                let raw = match s.read(&mut buf) {
                    Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
                    Err(e) => format!("error: {e}"),
                };
                (raw, http("api.example.com"), http("echo.demo:8080"))
            })
            .await;
            (seen, metrics, refused)
        })
    })
    .join()
    .unwrap();
    assert_eq!(
        seen[0], "outside:\x16\x03\x01hello",
        "TLS-like bytes pass through"
    );
    assert_eq!(seen[1], "220 hello\r\n", "the server spoke first");
    assert_eq!(seen[2], "outside:QUIT");
    assert!(
        seen[3].starts_with("HTTP/1.1 200")
            && seen[3].ends_with("outside host=api.example.com path=/p"),
        "{}",
        seen[3]
    );
    assert!(
        seen[4].starts_with("HTTP/1.1 200") && seen[4].contains("backend=v1"),
        "a mesh service is routed through the mesh, not to the dialed address: {}",
        seen[4]
    );
    assert!(
        seen[5].starts_with("HTTP/1.1 200") && seen[5].contains("backend=v1"),
        "a late first request is routed too: {}",
        seen[5]
    );
    // The mesh request carried the caller's identity to the server.
    assert!(
        seen[4].contains("URI=spiffe://cluster.local/ns/demo/sa/sleep"),
        "{}",
        seen[4]
    );
    // Both raw connections counted as they opened (they may not have
    // closed yet).
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("destination_service=\"PassthroughCluster\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );

    // Registry-only: the raw connection closed unanswered, the outside
    // host refused by name, the mesh service still reached.
    let (raw, outside, mesh) = refused;
    assert!(raw.is_empty() || raw.starts_with("error"), "{raw:?}");
    assert!(
        outside.starts_with("HTTP/1.1 502") && outside.contains("no service api.example.com"),
        "{outside}"
    );
    assert!(mesh.contains("backend=v1"), "{mesh}");
}
