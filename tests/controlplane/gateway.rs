//! `strait gateway --token`: the east-west gateway's own identity from the
//! control plane's CSR API, renewed like a sidecar's.

use std::process::Command;
use std::time::{Duration, Instant};

use quinn::rustls::pki_types::CertificateDer;
use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust};

use crate::common::{Broker, Scratch, free_port, http_status};
use crate::support::*;

fn gateway_id(td: &str) -> strait_ca::SpiffeId {
    strait_ca::SpiffeId::parse(&format!(
        "spiffe://{td}/ns/strait-system/sa/eastwest-gateway"
    ))
    .unwrap()
}

/// Opens a QUIC tunnel to `addr` as the mesh gateway `me` and returns the
/// chain the gateway presented (leaf first).
async fn tunnel_chain(
    addr: &str,
    me: &strait_proxy_client::identity::Identity,
    trust: &Trust,
) -> Vec<Vec<u8>> {
    try_tunnel_chain(addr, me, trust).await.unwrap()
}

/// [`tunnel_chain`], or why the tunnel was not opened.
pub(crate) async fn try_tunnel_chain(
    addr: &str,
    me: &strait_proxy_client::identity::Identity,
    trust: &Trust,
) -> Result<Vec<Vec<u8>>, String> {
    let verifier = SpiffeServerVerifier::new(trust.clone(), Accept::Ids([gateway_id(TD)].into()));
    let tls = strait_ca::tls::client_config(verifier, Some((&me.chain_der, &me.key_pkcs8)), &[])
        .map_err(|e| e.to_string())?;
    let config = strait_gateway::tunnel::client_config(tls).map_err(|e| e.to_string())?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(config, addr.parse().unwrap(), "gateway.strait.internal")
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| "the tunnel handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let certs = conn
        .peer_identity()
        .ok_or("no peer identity")?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "not a certificate chain")?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(certs.iter().map(|c| c.to_vec()).collect())
}

/// Starts `strait gateway` for `cp` with a bootstrap token and waits until
/// it is ready; its log goes to `gateway.log`.
pub(crate) async fn start_token_gateway(
    s: &Scratch,
    cp: &ControlPlane,
    root_cert: &std::path::Path,
    cert_ttl: &str,
) -> (Process, String, String) {
    let token = s.write(
        "gateway.token",
        &cp.token("strait-system", "eastwest-gateway", "eastwest-gateway"),
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    let mut gw = Process::spawn(
        s,
        "gateway",
        Command::new(env!("CARGO_BIN_EXE_strait"))
            .args(["gateway", "--cluster", "east", "--network", "net-east"])
            .args(["--listen", &listen, "--health-listen", &health])
            .args(["--control-plane", &cp.listen])
            .arg("--token")
            .arg(&token)
            .arg("--root-cert")
            .arg(root_cert)
            .args(["--cert-ttl", cert_ttl]),
    );
    gw.ready(s, &health).await;
    (gw, listen, health)
}

/// The gateway makes its key, gets its certificate with a bootstrap token
/// (ready only once its routes came over mTLS with it), and renews it
/// before it expires: new tunnels are served with the renewed certificate,
/// without a restart and with nothing written to disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_a_token_gets_its_certificate_and_renews_it() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let cp = ControlPlane::start(&s, &broker, "east", "net-east", "127.0.0.1:15443");
    let root = cp.state.join("cacerts/root-cert.pem");
    // Renewed at about half life: a few times within the test.
    let (mut gw, listen, health) = start_token_gateway(&s, &cp, &root, "4s").await;

    // A peer gateway of the same mesh opens a tunnel and sees the gateway's
    // certificate: the east-west gateway's identity, from east's CA.
    let peer = cp
        .certificate("strait-system", "eastwest-gateway", "peer")
        .await;
    let trust = cp.trust();
    let first = tunnel_chain(&listen, &peer, &trust).await;
    let summary = strait_ca::cert::CertSummary::from_der(&first[0]).unwrap();
    assert_eq!(
        summary.spiffe_id.as_deref(),
        Some(gateway_id(TD).as_str()),
        "{summary:?}"
    );
    let intermediate = std::fs::read(cp.state.join("cacerts/ca-cert.pem")).unwrap();
    let intermediate = strait_ca::pemfile::parse_certificates(&intermediate).unwrap();
    assert_eq!(first[1], intermediate[0], "issued by east's intermediate");

    // Renewed before the 4 s are up: a later tunnel sees another leaf.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = tunnel_chain(&listen, &peer, &trust).await;
        if now[0] != first[0] {
            let renewed = strait_ca::cert::CertSummary::from_der(&now[0]).unwrap();
            assert_eq!(renewed.spiffe_id, summary.spiffe_id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway kept its first certificate:\n{}",
            gw.log(&s)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still ready: discovery reconnects with the current certificate.
    assert_eq!(http_status(&health, "/healthz/ready"), Some(200));
    gw.assert_running(&s);
}

/// `--token` without its companions is refused before anything starts, and
/// the message says what is missing.
#[test]
fn a_gateway_token_needs_a_control_plane_and_the_roots() {
    let s = Scratch::new();
    let common = ["gateway", "--cluster", "east", "--network", "net-east"];
    let cases: [(&[&str], &str); 2] = [
        (
            &["--routes", "routes.yaml", "--token", "gateway.token"],
            "--control-plane",
        ),
        (
            &[
                "--control-plane",
                "127.0.0.1:1",
                "--token",
                "gateway.token",
                "--identity",
                "gw",
                "--root-cert",
                "root-cert.pem",
            ],
            "--identity",
        ),
    ];
    for (flags, named) in cases {
        let run = s.strait(&[&common[..], flags].concat());
        assert_eq!(run.code, 64, "{flags:?}: {}", run.stderr);
        assert!(run.stderr.contains(named), "{flags:?}: {}", run.stderr);
    }
}
