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
//!   refused and the mesh service still works;
//! - TCP to a mesh service's cluster IP or to its pod's address goes over
//!   mTLS to the service's sidecar (a STRICT one), not to the address
//!   dialed; so does HTTP to a cluster IP.
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
use strait_proto::strait::mesh::v1 as pb;
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
            // Cluster IPs are routable from the pod (the redirect takes
            // the connection before anything is sent).
            vec![
                "ip", "-n", pod, "route", "add", "default", "via", "10.9.9.2",
            ],
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

/// Serves, in the outside namespace, on 10.9.9.2: 7000 and 5432 answer
/// each chunk with `outside:<chunk>`; 7001 first greets (`220 hello\r\n`),
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
            for (port, greet) in [(7000u16, false), (5432, false), (7001, true), (7080, false)] {
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
    connect_to("10.9.9.2", port)
}

fn connect_to(ip: &str, port: u16) -> TcpStream {
    let s = TcpStream::connect((ip, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Writes `line` on a new connection to `ip:port` and reads the answer.
fn exchange(ip: &str, port: u16, line: &str) -> String {
    let mut s = connect_to(ip, port);
    s.write_all(line.as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
        Err(e) => format!("error: {e}"),
    }
}

/// A TCP app that answers each chunk with `db:<chunk>`.
async fn tcp_app() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    let mut out = b"db:".to_vec();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A listener on `ip:0` in network namespace `ns`.
fn listener_in(ns: &str, ip: &str) -> tokio::net::TcpListener {
    let (ns, ip) = (ns.to_string(), ip.to_string());
    let l = std::thread::spawn(move || {
        enter(&ns);
        std::net::TcpListener::bind((ip.as_str(), 0)).unwrap()
    })
    .join()
    .unwrap();
    l.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(l).unwrap()
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
    let out = ns.out.clone();
    let (seen, metrics, mesh_tcp, refused) = std::thread::spawn(move || {
        enter(&pod);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pki = TestPki::new(TD);
            let (client, server, mesh) = sleep_and_echo(&pki, backend("v1").await).await;
            // A TCP service, db, whose pod is 10.9.9.2 (its sidecar listens
            // there, in the other namespace) with cluster IP 10.96.0.10,
            // STRICT; and a cluster IP for echo.
            let db_id = spiffe("demo", "db");
            let db = Sidecar::start_on(
                "db-v1",
                "demo",
                tcp_app().await,
                identity(&pki, &db_id),
                &pki,
                listener_in(&out, "10.9.9.2"),
            )
            .await;
            let mut mesh = mesh.workload("db-v1", "demo", &[("app", "db")]).policy(
                "PeerAuthentication",
                "demo",
                "default",
                serde_json::json!({"mtls": {"mode": "STRICT"}}),
            );
            mesh.services[0].addresses = vec!["10.96.0.20".into()];
            mesh.services.push(pb::Service {
                hostname: "db.demo.svc.cluster.local".into(),
                namespace: "demo".into(),
                name: "db".into(),
                ports: vec![pb::Port {
                    name: "tcp-postgres".into(),
                    port: 5432,
                    protocol: "tcp".into(),
                    target_port: 0,
                }],
                identities: vec![db_id.clone()],
                endpoints: vec![db.endpoint("v1", &db_id)],
                addresses: vec!["10.96.0.10".into()],
                ..Default::default()
            });
            for s in [&client, &server, &db] {
                s.push(&mesh);
            }
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
            let mesh_tcp = as_app(|| {
                [
                    exchange("10.96.0.10", 5432, "by cluster IP"),
                    exchange("10.9.9.2", 5432, "by pod IP"),
                    exchange(
                        "10.96.0.20",
                        8080,
                        "GET /vip HTTP/1.1\r\nHost: 10.96.0.20:8080\r\nConnection: close\r\n\r\n",
                    ),
                ]
            })
            .await;
            let metrics = client.metrics();
            let db_metrics = db.metrics();

            // Registry-only: a client sidecar that refuses the outside.
            let strict = Sidecar::start_opts(
                "sleep",
                "demo",
                backend("sleep").await,
                identity(&pki, &spiffe("demo", "sleep")),
                &pki,
                Tuning {
                    outbound_policy: strait_sidecar::OutboundPolicy::RegistryOnly,
                    ..Tuning::default()
                },
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
            (seen, metrics, (mesh_tcp, db_metrics), refused)
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

    // TCP to the db service, by cluster IP and by pod IP, reached its app
    // through its STRICT sidecar (plain TCP to 10.9.9.2:5432 would have
    // met the outside server); HTTP to echo's cluster IP was routed.
    let (mesh_tcp, db_metrics) = mesh_tcp;
    assert_eq!(mesh_tcp[0], "db:by cluster IP");
    assert_eq!(mesh_tcp[1], "db:by pod IP");
    assert!(
        mesh_tcp[2].starts_with("HTTP/1.1 200") && mesh_tcp[2].contains("backend=v1"),
        "{}",
        mesh_tcp[2]
    );
    let count = |m: &str, family: &str, labels: &[&str]| -> u64 {
        m.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let db_service = "destination_service=\"db.demo.svc.cluster.local\"";
    assert_eq!(
        count(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                db_service,
                "connection_security_policy=\"mutual_tls\""
            ]
        ),
        2,
        "{metrics}"
    );
    assert_eq!(
        count(
            &db_metrics,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "source_principal=\"spiffe://cluster.local/ns/demo/sa/sleep\"",
                "connection_security_policy=\"mutual_tls\"",
            ]
        ),
        2,
        "{db_metrics}"
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
