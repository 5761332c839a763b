//! The fault matrix: a lab (real processes on loopback) put through what
//! an adversarial operator tries, each fault under traffic and each with
//! what a user would measure. Every step is bounded in count and time.
//!
//! - `the_fault_matrix`: the broker killed (`kill -9`) while exports
//!   change, the broker and a control plane down under traffic, a flood of
//!   idle and half-sent connections at a gateway, forged certificates and
//!   forged `x-forwarded-client-cert` headers, AuthorizationPolicy path
//!   bypasses (CVE-2021-31920's class), a semantically invalid edit;
//! - `revocation_closes_live_connections_{sni,quic}`: a revoked cluster's
//!   pooled connections and tunnels are closed;
//! - `a_dead_cluster_is_withdrawn_from_the_importers_and_returns`.
//!
//! Run with `--nocapture` to see the figures (`fault matrix:` lines).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/lab.rs"]
mod harness;
use harness::*;

const ECHO: &str = "http://echo.demo:8080/";

/// The figures of a run, printed as they come and once more at the end.
#[derive(Default)]
struct Figures(Vec<String>);

impl Figures {
    fn add(&mut self, fault: &str, figure: impl Into<String>) {
        let line = format!("{fault}: {}", figure.into());
        eprintln!("fault matrix: {line}");
        self.0.push(line);
    }
}

impl Drop for Figures {
    fn drop(&mut self) {
        eprintln!("fault matrix, all figures:");
        for l in &self.0 {
            eprintln!("  {l}");
        }
    }
}

/// What `lab curl` counted: requests sent, answered 200, and by cluster.
struct Counted {
    total: u32,
    ok: u32,
    east: u32,
    west: u32,
    text: String,
}

fn curl(lab: &Lab, cluster: &str, url: &str, n: u32) -> Counted {
    let (_, out, err) = lab.lab(&[
        "curl",
        cluster,
        url,
        "-n",
        &n.to_string(),
        "--timeout",
        "5s",
    ]);
    let text = format!("{out}{err}");
    let mut c = Counted {
        total: 0,
        ok: 0,
        east: 0,
        west: 0,
        text: text.clone(),
    };
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line;
            continue;
        }
        let Some((n, what)) = line.trim().split_once("  ") else {
            continue;
        };
        let n: u32 = n.trim().parse().unwrap_or(0);
        match section {
            "status codes:" => {
                c.total += n;
                if what.trim() == "200" {
                    c.ok += n;
                }
            }
            s if s.starts_with("answered by") => {
                if what.trim().starts_with("east/") {
                    c.east += n;
                }
                if what.trim().starts_with("west/") {
                    c.west += n;
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        c.total, n,
        "lab curl did not account for every request:\n{text}"
    );
    c
}

/// Waits (bounded) until `check` holds.
fn eventually(what: &str, within: Duration, lab: &Lab, check: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn cluster<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name} in lab.json"))
}

fn workload<'a>(cluster: &'a Value, service: &str) -> &'a Value {
    cluster["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["service"] == service)
        .unwrap_or_else(|| panic!("no workload of {service}"))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// curl through a cluster's client sidecar: the status code and body.
fn proxy_get(proxy: &str, path: &str, headers: &[&str]) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "--path-as-is",
        "--max-time",
        "5",
        "-w",
        "\n%{http_code}",
        "-x",
        proxy,
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("http://echo.demo:8080{path}"));
    let (_, out) = run(&mut cmd);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().to_string(), body.to_string())
}

/// A leaf for `spiffe://cluster.local/ns/demo/sa/client` signed by the CA
/// in `ca_cert`/`ca_key`, written to `dir` as `<name>-chain.pem` (leaf,
/// then the CA) and `<name>.key`.
fn openssl_leaf(dir: &Path, name: &str, ca_cert: &Path, ca_key: &Path) -> (PathBuf, PathBuf) {
    openssl_leaf_for(dir, name, "client", ca_cert, ca_key)
}

/// [`openssl_leaf`] for `spiffe://cluster.local/ns/demo/sa/<sa>`.
fn openssl_leaf_for(
    dir: &Path,
    name: &str,
    sa: &str,
    ca_cert: &Path,
    ca_key: &Path,
) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let leaf = dir.join(format!("{name}.pem"));
    let ext = dir.join(format!("{name}.cnf"));
    std::fs::write(
        &ext,
        format!(
            "[ext]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             subjectAltName=critical,URI:spiffe://cluster.local/ns/demo/sa/{sa}\n"
        ),
    )
    .unwrap();
    ec_key(&key);
    openssl(&[
        "req",
        "-new",
        "-key",
        p(&key),
        "-subj",
        "/O=cluster.local",
        "-out",
        p(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        p(&csr),
        "-CA",
        p(ca_cert),
        "-CAkey",
        p(ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        p(&ext),
        "-extensions",
        "ext",
        "-out",
        p(&leaf),
    ]);
    let chain = dir.join(format!("{name}-chain.pem"));
    let text = std::fs::read_to_string(&leaf).unwrap() + &std::fs::read_to_string(ca_cert).unwrap();
    std::fs::write(&chain, text).unwrap();
    (chain, key)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs openssl with `args`; it must succeed.
fn openssl(args: &[&str]) {
    let (ok, out) = run(Command::new("openssl").args(args));
    assert!(ok, "openssl {args:?}: {out}");
}

/// A new P-256 key at `path`.
fn ec_key(path: &Path) {
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        p(path),
    ]);
}

/// Where a lab cluster keeps its intermediate (`ca-cert.pem`, `ca-key.pem`).
fn cacerts(cluster: &Value) -> PathBuf {
    PathBuf::from(cluster["config_dir"].as_str().unwrap())
        .parent()
        .unwrap()
        .join("state/cacerts")
}

/// An mTLS request straight at a sidecar's inbound port with a client
/// certificate of the caller's choosing: the HTTP status, or `000` when
/// the sidecar refused the connection.
fn mtls_get(inbound: &str, chain: &Path, key: &Path) -> String {
    let (_, out) = run(Command::new("curl").args([
        "-sk",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cert",
        p(chain),
        "--key",
        p(key),
        "-H",
        "Host: echo.demo:8080",
        &format!("https://{inbound}/"),
    ]));
    out.trim().to_string()
}

#[test]
fn the_fault_matrix() {
    let mut figures = Figures::default();
    let mut lab = Lab::up("multi-primary", 240);
    let json = lab.json();
    let (east, west) = (cluster(&json, "east"), cluster(&json, "west"));
    let east_proxy = east["client_proxy"].as_str().unwrap().to_string();
    let west_imports = PathBuf::from(west["config_dir"].as_str().unwrap())
        .join("imported")
        .join("strait-imports.yaml");
    // Both clients reach both clusters before anything breaks.
    for from in ["east", "west"] {
        lab.curl_until(from, ECHO, 20, |t| {
            t.contains("east/echo/v1") && t.contains("west/echo/v2")
        });
    }
    let scratch = tempfile::tempdir().unwrap();

    // 1. The broker killed (SIGKILL) while east's exports change, twice;
    //    under traffic from both clusters while it is down.
    let mut exported = Vec::new();
    let mut down_requests = (0, 0);
    for round in 0..2 {
        let (code, out, err) = lab.lab(&["kill", "broker"]);
        assert_eq!(code, 0, "kill broker: {out}{err}");
        for i in 0..3 {
            let name = format!("churn-{round}-{i}");
            let file = scratch.path().join(format!("{name}.yaml"));
            std::fs::write(
                &file,
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: demo\n  \
                     annotations: {{strait.io/export: \"true\"}}\nspec:\n  selector: {{app: echo}}\n  \
                     ports:\n  - {{name: http, port: 8080}}\n"
                ),
            )
            .unwrap();
            let (code, out, err) = lab.lab(&["apply", "east", file.to_str().unwrap()]);
            assert_eq!(code, 0, "apply {name}: {out}{err}");
            exported.push(name);
        }
        for from in ["east", "west"] {
            let c = curl(&lab, from, ECHO, 50);
            assert_eq!(c.ok, c.total, "{from}, broker down:\n{}", c.text);
            assert!(c.east > 0 && c.west > 0, "{from}, broker down:\n{}", c.text);
            down_requests.0 += c.total - c.ok;
            down_requests.1 += c.total;
        }
        let (code, out, err) = lab.lab(&["start", "broker"]);
        assert_eq!(code, 0, "start broker: {out}{err}");
        if round == 0 {
            // Acknowledged and at west before the next kill, which they
            // must survive.
            eventually(
                "the first round's exports reach west",
                Duration::from_secs(60),
                &lab,
                || {
                    let text = std::fs::read_to_string(&west_imports).unwrap_or_default();
                    exported
                        .iter()
                        .all(|n| text.contains(&format!("{n}.demo.svc.clusterset.local")))
                },
            );
        }
    }
    let took = eventually(
        "every export changed while the broker was down reaches west",
        Duration::from_secs(60),
        &lab,
        || {
            let text = std::fs::read_to_string(&west_imports).unwrap_or_default();
            exported
                .iter()
                .all(|n| text.contains(&format!("{n}.demo.svc.clusterset.local")))
        },
    );
    figures.add(
        "broker kill -9 under export churn",
        format!(
            "0 of {} exports lost over 2 kills (3 acknowledged before the second); all at west {took:.1?} after the broker's last start",
            exported.len()
        ),
    );
    figures.add(
        "broker down under traffic",
        format!(
            "{} of {} requests failed (both clients, both clusters answering)",
            down_requests.0, down_requests.1
        ),
    );

    // 2. East's control plane down under traffic: proxies keep their last
    //    config and certificates.
    let (code, out, err) = lab.lab(&["kill", "east/controlplane"]);
    assert_eq!(code, 0, "kill east/controlplane: {out}{err}");
    let mut failed = (0, 0);
    for from in ["east", "west"] {
        let c = curl(&lab, from, ECHO, 100);
        assert_eq!(
            c.ok, c.total,
            "{from}, east's control plane down:\n{}",
            c.text
        );
        assert!(c.east > 0 && c.west > 0, "{from}:\n{}", c.text);
        failed.0 += c.total - c.ok;
        failed.1 += c.total;
    }
    let (code, out, err) = lab.lab(&["start", "east/controlplane"]);
    assert_eq!(code, 0, "start east/controlplane: {out}{err}");
    figures.add(
        "control plane down under traffic",
        format!("{} of {} requests failed", failed.0, failed.1),
    );

    // 3. A flood at east's gateway: idle connections, and connections that
    //    send half a TLS record and stop. Good calls from west go on; the
    //    gateway closes the flood on its handshake deadline.
    let gateway = east["gateway"]["tcp"].as_str().unwrap();
    let opened = Instant::now();
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(gateway).unwrap();
        if i % 3 == 0 {
            // A TLS handshake record header promising 512 bytes, and 4 of them.
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
                .unwrap();
        }
        flood.push(s);
    }
    let c = curl(&lab, "west", ECHO, 100);
    assert_eq!(c.ok, c.total, "west during the flood:\n{}", c.text);
    assert!(
        c.east > 0,
        "west reached east through the flooded gateway:\n{}",
        c.text
    );
    let mut latest = Duration::ZERO;
    for s in &mut flood {
        let left = Duration::from_secs(30).saturating_sub(opened.elapsed());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) | Err(_) if opened.elapsed() < Duration::from_secs(30) => {
                latest = latest.max(opened.elapsed());
            }
            other => panic!("a flood connection stayed open 30 s ({other:?})"),
        }
    }
    figures.add(
        "gateway flood",
        format!(
            "300 idle or half-sent connections; {}/{} good calls from west answered (east: {}); \
             every flood connection closed by {latest:.1?}",
            c.ok, c.total, c.east
        ),
    );

    // 4. A forged x-forwarded-client-cert header is replaced by the
    //    sidecar's own, which names the caller's verified identity.
    let forged = "x-forwarded-client-cert: By=spiffe://cluster.local/ns/demo/sa/echo;URI=spiffe://cluster.local/ns/demo/sa/admin";
    for _ in 0..10 {
        let (code, body) = proxy_get(&east_proxy, "/", &[forged]);
        assert_eq!(code, "200", "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["peer_identity"], "spiffe://cluster.local/ns/demo/sa/client",
            "{body}"
        );
        assert!(
            !body.contains("sa/admin"),
            "the forged identity reached the app: {body}"
        );
    }
    figures.add(
        "forged XFCC header",
        "10 of 10 replaced by the caller's verified identity",
    );

    // 5. Forged certificates at east's echo sidecar: a CA with the very
    //    subject of east's intermediate but its own key is refused; a leaf
    //    from east's real intermediate key (the control) is served.
    let east_cacerts = cacerts(east);
    let fake_ca_key = scratch.path().join("fake-ca.key");
    let fake_ca = scratch.path().join("fake-ca.pem");
    ec_key(&fake_ca_key);
    openssl(&[
        "req",
        "-new",
        "-x509",
        "-key",
        p(&fake_ca_key),
        "-days",
        "1",
        "-subj",
        "/O=cluster.local/OU=strait clusters/CN=east",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
        "-out",
        p(&fake_ca),
    ]);
    let echo_inbound = workload(east, "echo")["inbound"].as_str().unwrap();
    let (real_chain, real_key) = openssl_leaf(
        scratch.path(),
        "real",
        &east_cacerts.join("ca-cert.pem"),
        &east_cacerts.join("ca-key.pem"),
    );
    let (fake_chain, fake_key) = openssl_leaf(scratch.path(), "fake", &fake_ca, &fake_ca_key);
    assert_eq!(
        mtls_get(echo_inbound, &real_chain, &real_key),
        "200",
        "the control"
    );
    let refused = (0..10)
        .filter(|_| mtls_get(echo_inbound, &fake_chain, &fake_key) == "000")
        .count();
    assert_eq!(refused, 10, "a forged chain was served");
    figures.add(
        "forged certificate",
        "10 of 10 refused in the handshake (a CA named like east's intermediate); the control, east's real intermediate, served",
    );
    // Unbound (the default, as in Istio): west's intermediate key, stolen,
    // mints an identity west does not run, and east accepts it. What
    // `--bind-identities-to-clusters` closes (tested below).
    let west_cacerts = cacerts(west);
    let (stolen_chain, stolen_key) = openssl_leaf_for(
        scratch.path(),
        "stolen",
        "payments",
        &west_cacerts.join("ca-cert.pem"),
        &west_cacerts.join("ca-key.pem"),
    );
    assert_eq!(mtls_get(echo_inbound, &stolen_chain, &stolen_key), "200");
    figures.add(
        "stolen cluster CA key, identities unbound (default)",
        "west's key minting demo/payments (which west does not run) is served by east",
    );

    // 6. Path bypasses of a DENY on /admin, /admin/* (both clusters' echo).
    let deny = scratch.path().join("deny-admin.yaml");
    std::fs::write(
        &deny,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: demo}\n\
         spec:\n  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules:\n  \
         - to:\n    - operation: {paths: [/admin, /admin/*]}\n",
    )
    .unwrap();
    for c in ["east", "west"] {
        let (code, out, err) = lab.lab(&["apply", c, deny.to_str().unwrap()]);
        assert_eq!(code, 0, "apply deny-admin to {c}: {out}{err}");
    }
    eventually(
        "/admin denied in both clusters",
        Duration::from_secs(20),
        &lab,
        || (0..6).all(|_| proxy_get(&east_proxy, "/admin", &[]).0 == "403"),
    );
    let bypasses = [
        "/admin",
        "/admin/x",
        "/x/../admin",
        "/./admin",
        "/%61dmin",
        "/%2e/admin",
        "/admin\\x",
        "/admin%00",
        "/public/../admin",
        "/ADMIN/../admin",
    ];
    let mut answered = std::collections::BTreeMap::<String, u32>::new();
    for path in bypasses {
        for _ in 0..4 {
            let (code, body) = proxy_get(&east_proxy, path, &[]);
            assert!(
                code == "403" || code == "400",
                "{path} was answered {code}: {body}"
            );
            *answered.entry(code).or_default() += 1;
        }
    }
    let (code, _) = proxy_get(&east_proxy, "/public", &[]);
    assert_eq!(code, "200", "a path the policy does not name");
    figures.add(
        "path bypasses",
        format!(
            "0 of {} reached the app ({answered:?}) over {} spellings of /admin; /public 200",
            bypasses.len() * 4,
            bypasses.len()
        ),
    );

    // 7. A semantically invalid edit of an exported Service is rejected by
    //    name and the last good version stays exported.
    let bad = scratch.path().join("echo-bad-port.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\n  \
         annotations: {strait.io/export: \"true\"}\nspec:\n  selector: {app: echo}\n  \
         ports:\n  - {name: http, port: 99999}\n",
    )
    .unwrap();
    let (code, out, err) = lab.lab(&["apply", "east", bad.to_str().unwrap()]);
    assert_ne!(code, 0, "an invalid Service was applied: {out}{err}");
    assert!(
        format!("{out}{err}").contains("99999"),
        "the rejection does not name the bad value: {out}{err}"
    );
    let c = curl(&lab, "west", ECHO, 40);
    assert!(
        c.ok == c.total && c.east > 0,
        "east's echo left west after an invalid edit:\n{}",
        c.text
    );
    figures.add(
        "invalid edit",
        format!(
            "rejected naming port 99999; west still reaches east's echo ({} of {} from east)",
            c.east, c.total
        ),
    );

    lab.down();
}

/// Revoking a cluster ends what it holds open in other clusters: west's
/// client has a pooled connection to east's echo (and in QUIC mode west's
/// gateway a tunnel to east's); after `straitctl cluster revoke west`,
/// east's sidecar closes that connection (and east's gateway the tunnel)
/// within 5 s, and west's calls no longer reach east. In QUIC mode the
/// connection is closed by whichever of the two sees the revocation first.
fn revocation_closes_live_connections(mode: &str, base: u8) {
    let mut lab = Lab::up_with("multi-primary", base, &["--mode", mode]);
    let json = lab.json();
    let east = cluster(&json, "east");
    let echo_metrics = workload(east, "echo")["metrics"]
        .as_str()
        .unwrap()
        .to_string();
    let closed_inbound = "strait_sidecar_untrusted_closed_connections_total{direction=\"inbound\"}";
    let closed_tunnels = "strait_gateway_untrusted_closed_tunnels_total{side=\"server\"}";
    let gateway_metrics = lab.gateway_metrics("east");
    // West's client pools a connection to east's echo.
    lab.curl_until("west", ECHO, 20, |t| t.contains("east/echo/v1"));
    assert_eq!(metric(&echo_metrics, closed_inbound), 0.0);

    let revoked = Instant::now();
    let out = Command::new(STRAITCTL)
        .arg("--lab")
        .arg(lab.path())
        .args(["cluster", "revoke", "west"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let within = |what: &str, url: &str, name: &str| -> Duration {
        loop {
            if metric(url, name) >= 1.0 {
                return revoked.elapsed();
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(5),
                "{mode}: {what} not closed within 5 s of the revocation\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    if mode == "quic" {
        // The pooled connection rides west's tunnel: whichever of east's
        // gateway (closing the tunnel, and every stream in it) and east's
        // sidecar sees the revocation first ends it, so only the tunnel's
        // close is certain to be counted.
        let took = within("west's tunnel", &gateway_metrics, closed_tunnels);
        let by = if metric(&echo_metrics, closed_inbound) >= 1.0 {
            "east's echo sidecar and the tunnel"
        } else {
            "the tunnel"
        };
        eprintln!(
            "fault matrix: revocation ({mode}): east's gateway closed west's tunnel {took:?} after the revoke; west's pooled connection was closed by {by}"
        );
    } else {
        let took = within("west's pooled connection", &echo_metrics, closed_inbound);
        eprintln!(
            "fault matrix: revocation ({mode}): east's echo sidecar closed west's connection {took:?} after the revoke"
        );
    }
    // West's calls no longer reach east (its own echo still answers).
    let (_, out, err) = lab.lab(&["curl", "west", ECHO, "-n", "20"]);
    let summary = format!("{out}{err}");
    assert!(!summary.contains("east/echo"), "{mode}: {summary}");
    lab.down();
}

#[test]
fn revocation_closes_live_connections_sni() {
    revocation_closes_live_connections("sni", 200);
}

#[test]
fn revocation_closes_live_connections_quic() {
    revocation_closes_live_connections("quic", 220);
}

/// The time the importers take to drop a dead cluster: west's control
/// plane and gateway are killed, and after the broker's grace (10 s by
/// default) west's endpoints leave east's imports, so that east's client is
/// answered by east alone, without errors; started again, west comes back.
#[test]
fn a_dead_cluster_is_withdrawn_from_the_importers_and_returns() {
    let mut lab = Lab::up("multi-primary", 180);
    let json = lab.json();
    let east = &json["clusters"][0];
    let west = &json["clusters"][1];
    assert_eq!(west["name"], "west");
    let imports = PathBuf::from(east["config_dir"].as_str().unwrap())
        .join("imported")
        .join("strait-imports.yaml");
    let west_gateway = west["gateway"]["tcp"].as_str().unwrap();
    let (ip, _) = west_gateway.rsplit_once(':').unwrap();
    let endpoint = format!("\"{ip}\"");
    let has_west = || {
        std::fs::read_to_string(&imports)
            .unwrap_or_default()
            .contains(&endpoint)
    };
    // Waits until east's imports do or do not hold an endpoint at west's
    // gateway; how long that took.
    let wait_for = |present: bool, within: Duration| -> Duration {
        let start = Instant::now();
        while has_west() != present {
            assert!(
                start.elapsed() < within,
                "east's imports {} west's gateway {ip} after {within:?}:\n{}\n{}",
                if present {
                    "never regained"
                } else {
                    "still hold"
                },
                std::fs::read_to_string(&imports).unwrap_or_default(),
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    };
    lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("east/echo/v1") && t.contains("west/echo/v2")
    });
    wait_for(true, Duration::from_secs(10));

    let killed = Instant::now();
    for c in ["west/gateway", "west/controlplane"] {
        let (code, out, err) = lab.lab(&["kill", c]);
        assert_eq!(code, 0, "kill {c}: {out}{err}");
    }
    wait_for(false, Duration::from_secs(40));
    let withdrawn = killed.elapsed();
    eprintln!(
        "fault matrix: dead cluster: west's endpoints left east's imports {withdrawn:?} after west was killed"
    );
    assert!(
        withdrawn >= Duration::from_secs(10),
        "withdrawn after {withdrawn:?}, before the broker's 10 s grace"
    );
    // East's client is answered by east alone, every request.
    let seen = lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("20  200") && !t.contains("west/")
    });
    assert!(seen.contains("east/echo/v1"), "{seen}");

    let started = Instant::now();
    for c in ["west/controlplane", "west/gateway"] {
        let (code, out, err) = lab.lab(&["start", c]);
        assert_eq!(code, 0, "start {c}: {out}{err}");
    }
    let back = wait_for(true, Duration::from_secs(30));
    eprintln!(
        "fault matrix: dead cluster: west's endpoints back in east's imports {:?} after its restart began ({back:?} after it was ready)",
        started.elapsed()
    );
    lab.curl_until("east", "http://echo.demo:8080/", 20, |t| {
        t.contains("west/echo/v2")
    });
    lab.down();
}

/// A stolen cluster CA key, with the mesh binding identities to clusters
/// (`strait lab up --bind-identities`): east runs `demo/payments`, west
/// does not. A leaf for it minted with west's intermediate key is refused
/// by east's sidecar, one minted with east's is served, and identities
/// west does run still pass; cross-cluster calls go on.
#[test]
fn a_stolen_cluster_key_cannot_mint_another_clusters_identities() {
    let mut figures = Figures::default();
    let mut lab = Lab::up_with("multi-primary", 230, &["--bind-identities"]);
    let json = lab.json();
    let (east, west) = (cluster(&json, "east"), cluster(&json, "west"));
    let scratch = tempfile::tempdir().unwrap();
    let payments = scratch.path().join("payments.yaml");
    std::fs::write(
        &payments,
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
         metadata: {name: payments-1, namespace: demo}\n\
         spec: {address: 10.99.0.7, labels: {app: payments}, serviceAccount: payments}\n",
    )
    .unwrap();
    let (code, out, err) = lab.lab(&["apply", "east", payments.to_str().unwrap()]);
    assert_eq!(code, 0, "apply payments: {out}{err}");
    let leaf = |by: &Value, name: &str, sa: &str| {
        let ca = cacerts(by);
        openssl_leaf_for(
            scratch.path(),
            name,
            sa,
            &ca.join("ca-cert.pem"),
            &ca.join("ca-key.pem"),
        )
    };
    let echo_inbound = workload(east, "echo")["inbound"].as_str().unwrap();
    let (own_chain, own_key) = leaf(east, "east-payments", "payments");
    // East's report of what it runs reaches the broker and comes back to
    // east's sidecars with the trust bundle.
    let took = eventually(
        "east's sidecar accepts east's own payments identity",
        Duration::from_secs(30),
        &lab,
        || mtls_get(echo_inbound, &own_chain, &own_key) == "200",
    );
    let (stolen_chain, stolen_key) = leaf(west, "west-payments", "payments");
    let refused = (0..10)
        .filter(|_| mtls_get(echo_inbound, &stolen_chain, &stolen_key) == "000")
        .count();
    assert_eq!(
        refused, 10,
        "west's key minted east's payments and was served"
    );
    let (client_chain, client_key) = leaf(west, "west-client", "client");
    assert_eq!(
        mtls_get(echo_inbound, &client_chain, &client_key),
        "200",
        "an identity west runs"
    );
    for from in ["east", "west"] {
        let c = curl(&lab, from, ECHO, 40);
        assert!(
            c.ok == c.total && c.east > 0 && c.west > 0,
            "{from} with identities bound:\n{}",
            c.text
        );
    }
    figures.add(
        "stolen cluster CA key, identities bound",
        format!(
            "10 of 10 leaves for demo/payments minted with west's key refused by east (east's own served {took:.1?} after it ran payments); west's demo/client served; 80 of 80 cross-cluster calls answered"
        ),
    );
    lab.down();
}
