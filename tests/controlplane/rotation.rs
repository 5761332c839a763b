//! A root rotation reaches a running sidecar and a running gateway: their
//! certificate renewals keep working while the control plane moves to the
//! new root, and the certificates they serve end up under the new root.

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::rustls;
use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust};

use crate::common::{Broker, Scratch, all_clusters, free_port, http_status};
use crate::support::*;

/// Polls `served` until it returns a chain (verified as `served` checks it)
/// whose leaf is not the first of `before`; fails with `log` after
/// [`WAIT`].
async fn until_renewed<F, Fut>(
    who: &str,
    before: &[Vec<u8>],
    mut served: F,
    log: impl Fn() -> String,
) -> Vec<Vec<u8>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Vec<u8>>, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match served().await {
            Ok(chain) if chain.first() != before.first() => return chain,
            other => assert!(
                Instant::now() < deadline,
                "{who} renewed no certificate under the new root after the control plane moved ({:?}):\n{}",
                other.map(|_| "the same certificate"),
                log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The chain the mTLS listener at `addr` presents (with ALPN `alpn`),
/// when it verifies under `trust` (else why not).
fn served_chain(
    addr: &str,
    alpn: &[u8],
    trust: &Trust,
    me: &strait_proxy_client::identity::Identity,
) -> Result<Vec<Vec<u8>>, String> {
    let tls = strait_ca::tls::client_config(
        SpiffeServerVerifier::new(trust.clone(), Accept::Any),
        Some((&me.chain_der, &me.key_pkcs8)),
        &[alpn],
    )
    .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("sidecar.strait.internal").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(tls), name).map_err(|e| e.to_string())?;
    let mut sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    let chain = conn
        .peer_certificates()
        .ok_or("no certificate")?
        .iter()
        .map(|c| c.to_vec())
        .collect();
    // Close politely; the answer does not matter.
    let _ = conn.writer().write_all(b"");
    let _ = sock.read(&mut [0u8; 1]);
    Ok(chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_and_a_gateway_renew_their_certificates_through_a_root_rotation() {
    let s = Scratch::new();
    let broker = Broker::start(&s.path("broker"), TD);
    let cp = ControlPlane::start(&s, &broker, "east", "net-east", "192.0.2.10:15443");
    put(
        &cp.config,
        "echo.yaml",
        &workload_yaml("echo-1", "echo", "127.0.0.1", "net-east"),
    );
    // The sidecar is started with the roots of that moment: the old root.
    let old_roots = s.write(
        "old-root-cert.pem",
        &std::fs::read_to_string(cp.state.join("cacerts/root-cert.pem")).unwrap(),
    );
    let token = s.write("echo.token", &cp.token("demo", "echo", "echo-1"));
    let inbound = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    let mut sidecar = Process::spawn(
        &s,
        "sidecar",
        Command::new(crate::support::sidecar_exe())
            .args(["--workload", "echo-1", "--namespace", "demo"])
            .args(["--control-plane", &cp.listen])
            .arg("--token")
            .arg(&token)
            .arg("--root-cert")
            .arg(&old_roots)
            .args(["--inbound", &inbound, "--health-listen", &health])
            .args(["--app", &format!("127.0.0.1:{}", free_port())])
            .args(["--outbound", &format!("127.0.0.1:{}", free_port())])
            .args(["--access-log", "off"])
            // Renewed every few seconds, so that renewals happen during
            // and after the rotation.
            .args(["--cert-ttl", "6s"]),
    );
    let (mut gateway, gateway_listen, gateway_health) =
        crate::gateway::start_token_gateway(&s, &cp, &old_roots, "6s").await;
    sidecar.ready(&s, &health).await;

    broker.ctl(&["trust", "rotate-root", "begin"]).ok();
    broker
        .wait_rotation("bundle acknowledged", WAIT, |v| {
            all_clusters(v, "bundle_acknowledged")
        })
        .await;
    broker.ctl(&["trust", "rotate-root", "advance"]).ok();
    broker
        .wait_rotation("intermediate re-issued", WAIT, |v| {
            all_clusters(v, "on_target")
        })
        .await;

    // The new root alone, as a peer that joined after the rotation has it.
    let new_root = broker.rotation_root();
    let new_only =
        Trust::new(strait_ca::layout::load_bundle(&new_root, Some(cp.trust_domain())).unwrap());
    let client = cp.certificate("demo", "client", "client-1").await;
    // The control plane's own certificate moves to the new root too.
    let deadline = Instant::now() + WAIT;
    while let Err(e) = served_chain(&cp.listen, b"h2", &new_only, &client) {
        assert!(
            Instant::now() < deadline,
            "the control plane stayed on the old root: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From then on, the sidecar still renews: a certificate issued after
    // the control plane moved, under the new root, is served.
    let both = cp.trust();
    both.set_bundle(
        strait_ca::TrustBundle::new(
            Some(cp.trust_domain()),
            [cp.trust().bundle().roots(), new_only.bundle().roots()]
                .concat()
                .into_iter()
                .map(|r| r.to_vec())
                .collect(),
        )
        .unwrap(),
    );
    let before = served_chain(&inbound, b"http/1.1", &both, &client).unwrap();
    let chain = until_renewed(
        "the sidecar",
        &before,
        || std::future::ready(served_chain(&inbound, b"http/1.1", &new_only, &client)),
        || sidecar.log(&s),
    )
    .await;
    let leaf = strait_ca::cert::CertSummary::from_der(&chain[0]).unwrap();
    assert_eq!(
        leaf.spiffe_id.as_deref(),
        Some("spiffe://cluster.local/ns/demo/sa/echo")
    );
    sidecar.assert_running(&s);
    assert_eq!(http_status(&health, "/healthz/ready"), Some(200));

    // The gateway too: a later tunnel sees a certificate under the new
    // root, and the gateway accepts a peer gateway issued after the move.
    let peer = cp
        .certificate("strait-system", "eastwest-gateway", "peer")
        .await;
    let before = crate::gateway::try_tunnel_chain(&gateway_listen, &peer, &both)
        .await
        .unwrap_or_default();
    until_renewed(
        "the gateway",
        &before,
        || crate::gateway::try_tunnel_chain(&gateway_listen, &peer, &new_only),
        || gateway.log(&s),
    )
    .await;
    gateway.assert_running(&s);
    assert_eq!(http_status(&gateway_health, "/healthz/ready"), Some(200));
}
