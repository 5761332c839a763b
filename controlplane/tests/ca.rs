//! The workload CA over loopback with real mTLS: bootstrap with a token,
//! refusals, renewal with the current certificate, and the proxies'
//! identity task.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use strait_ca::authority::{KeyAlgorithm, generate_key, leaf_csr};
use strait_ca::testing::{TestPki, intermediate_of};
use strait_ca::tls::{Accept, SpiffeClientVerifier, Trust};
use strait_ca::{SpiffeId, TrustDomain};
use strait_controlplane::ca::{TokenIssuer, TtlPolicy, WorkloadCa, serving_identity};
use strait_proto::istio::v1::auth::IstioCertificateRequest;
use strait_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use strait_proxy_client::identity::{
    Credential, Identity, IdentityConfig, IdentityError, IdentityManager, control_plane_id,
    mesh_client_tls, request_certificate,
};
use time::OffsetDateTime;

const TD: &str = "cluster.local";
const KEY: [u8; 32] = [42; 32];

struct Harness {
    pki: TestPki,
    trust: Trust,
    addr: SocketAddr,
    registry: Registry,
    tokens: TokenIssuer,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Harness {
    async fn start() -> Self {
        let pki = TestPki::new(TD);
        let td = td();
        let trust = Trust::new(pki.bundle());
        let authority = intermediate_of(&pki.root, "east", OffsetDateTime::now_utc());
        let (chain, key) = serving_identity(&authority, &td, Duration::from_secs(3600)).unwrap();
        let mut registry = Registry::default();
        let ca = WorkloadCa::new(
            authority,
            trust.clone(),
            Some(TokenIssuer::from_key(&KEY)),
            TtlPolicy::default(),
            &mut registry,
        )
        .unwrap();
        let verifier = SpiffeClientVerifier::new(trust.clone(), Accept::Any, false);
        let tls = strait_ca::tls::server_config(&chain, &key, verifier, &[b"h2"]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = strait_runtime::transport::tls_incoming(listener, Arc::new(tls));
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ca.service())
                .serve_with_incoming(incoming),
        );
        Harness {
            pki,
            trust,
            addr,
            registry,
            tokens: TokenIssuer::from_key(&KEY),
            server,
        }
    }

    fn address(&self) -> String {
        self.addr.to_string()
    }

    fn tls(&self) -> strait_proxy_client::identity::ClientTls {
        mesh_client_tls(self.trust.clone(), control_plane_id(&td()))
    }

    fn token(&self, ns: &str, sa: &str) -> String {
        self.tokens
            .issue(ns, sa, "w", Duration::from_secs(600))
            .unwrap()
    }

    async fn bootstrap(&self, id: &SpiffeId, token: &str) -> Result<Identity, IdentityError> {
        request_certificate(
            &self.address(),
            &self.tls(),
            &self.trust,
            id,
            Credential::Token(token),
            None,
        )
        .await
    }

    /// A raw call: any CSR, optional client identity, optional token.
    async fn raw(
        &self,
        csr: String,
        client: Option<&Identity>,
        token: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        let config = (self.tls())(client).unwrap();
        let channel =
            strait_runtime::transport::channel(&self.address(), Arc::new(config)).unwrap();
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: None,
        });
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn workload(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&td(), ns, sa).unwrap()
}

fn csr_for(uri: &str) -> String {
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    leaf_csr(&SpiffeId::parse(uri).unwrap(), &[], &key).unwrap()
}

fn pem(der: &[u8]) -> String {
    strait_ca::pemfile::encode(strait_ca::pemfile::CERTIFICATE, der)
}

#[tokio::test]
async fn bootstrap_with_a_token_gets_a_verifiable_certificate() {
    let h = Harness::start().await;
    let id = workload("shop", "cart");
    let identity = h.bootstrap(&id, &h.token("shop", "cart")).await.unwrap();
    assert_eq!(identity.spiffe_id, id);
    assert_eq!(
        identity.chain_der.len(),
        2,
        "leaf and intermediate, no root"
    );
    let now = OffsetDateTime::now_utc();
    let svid = strait_ca::verify_svid(&identity.chain_der, &h.pki.bundle(), now).unwrap();
    assert_eq!(svid.spiffe_id, id);
    let life = identity.not_after - now;
    assert!(
        (23 * 3600..=24 * 3600).contains(&life.whole_seconds()),
        "default TTL is 24 h, got {life}"
    );
    assert!(
        h.metrics()
            .contains(r#"strait_ca_certificates_issued_total{auth="token"} 1"#),
        "{}",
        h.metrics()
    );

    // An independent verifier agrees: openssl sees one URI SAN, no CA bit,
    // and a path to the root.
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, der: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem(der)).unwrap();
        p
    };
    let leaf = write("leaf.pem", &identity.chain_der[0]);
    let inter = write("inter.pem", &identity.chain_der[1]);
    let root = write("root.pem", h.pki.root.root_der());
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/shop/sa/cart"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("DNS:"), "{text}");
    let verify = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-untrusted")
        .arg(&inter)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[tokio::test]
async fn asking_for_another_identity_is_refused_naming_both() {
    let h = Harness::start().await;
    let token = h.token("shop", "cart");
    let err = h
        .raw(
            csr_for("spiffe://cluster.local/ns/shop/sa/admin"),
            None,
            Some(&token),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("spiffe://cluster.local/ns/shop/sa/admin")
            && err
                .message()
                .contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{}",
        err.message()
    );
    // A garbage CSR is a bad argument, named as such.
    let err = h
        .raw("-----BEGIN NONSENSE-----".into(), None, Some(&token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("CSR"), "{}", err.message());
    assert!(
        h.metrics()
            .contains(r#"strait_ca_requests_refused_total{reason="wrong_identity"} 1"#),
        "{}",
        h.metrics()
    );
}

#[tokio::test]
async fn forged_expired_and_missing_tokens_are_refused() {
    let h = Harness::start().await;
    let id = workload("shop", "cart");
    let forged = TokenIssuer::from_key(&[1; 32])
        .issue("shop", "cart", "w", Duration::from_secs(600))
        .unwrap();
    let expired = h
        .tokens
        .issue_at(
            "shop",
            "cart",
            "w",
            Duration::from_secs(60),
            OffsetDateTime::now_utc() - Duration::from_secs(3600),
        )
        .unwrap();
    for (token, needle) in [
        (forged.as_str(), "signature"),
        (expired.as_str(), "expired"),
        ("swt1.garbage", "two '.'-separated parts"),
    ] {
        let err = h.bootstrap(&id, token).await.unwrap_err();
        match &err {
            IdentityError::Refused { code, message, .. } => {
                assert_eq!(*code, tonic::Code::Unauthenticated, "{message}");
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("expected a refusal, got {other}"),
        }
    }
    let err = h.raw(csr_for(id.as_str()), None, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("Bearer"), "{}", err.message());
}

#[tokio::test]
async fn renewal_with_the_current_certificate_gets_only_its_own_identity() {
    let h = Harness::start().await;
    let id = workload("shop", "cart");
    let first = h.bootstrap(&id, &h.token("shop", "cart")).await.unwrap();
    let renewed = request_certificate(
        &h.address(),
        &h.tls(),
        &h.trust,
        &id,
        Credential::Certificate(&first),
        Some(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    assert_eq!(renewed.spiffe_id, id);
    assert_ne!(renewed.key_pkcs8, first.key_pkcs8, "a new key each time");
    let life = (renewed.not_after - OffsetDateTime::now_utc()).whole_seconds();
    assert!((590..=600).contains(&life), "asked for 600 s, got {life}");
    assert!(
        h.metrics()
            .contains(r#"strait_ca_certificates_issued_total{auth="certificate"} 1"#),
        "{}",
        h.metrics()
    );

    // The certificate wins over any token sent along: no other identity.
    let other_token = h.token("shop", "admin");
    let err = h
        .raw(
            csr_for("spiffe://cluster.local/ns/shop/sa/admin"),
            Some(&first),
            Some(&other_token),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("may only get spiffe://cluster.local/ns/shop/sa/cart"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_certificate_of_another_root_cannot_renew() {
    let h = Harness::start().await;
    let rogue = TestPki::new(TD);
    let (leaf, key_pem) = rogue.leaf("spiffe://cluster.local/ns/shop/sa/cart");
    let key = strait_ca::pemfile::parse_private_key(key_pem.as_bytes()).unwrap();
    let forged = Identity {
        chain_der: vec![leaf, rogue.intermediate.certificate_der().to_vec()],
        key_pkcs8: key.serialize_der(),
        spiffe_id: workload("shop", "cart"),
        received: OffsetDateTime::now_utc(),
        not_after: OffsetDateTime::now_utc() + Duration::from_secs(3600),
    };
    let err = request_certificate(
        &h.address(),
        &h.tls(),
        &h.trust,
        &forged.spiffe_id,
        Credential::Certificate(&forged),
        None,
    )
    .await
    .unwrap_err();
    // The TLS handshake itself refuses the client certificate.
    assert!(
        matches!(
            err,
            IdentityError::Unreachable { .. } | IdentityError::Refused { .. }
        ),
        "{err}"
    );
    assert!(!h.metrics().contains("strait_ca_certificates_issued_total{"));
}

#[tokio::test]
async fn the_client_refuses_a_server_that_is_not_the_control_plane() {
    let h = Harness::start().await;
    // The proxy expects another identity on the CA port: it must not
    // send its CSR (or token) to whoever answers.
    let wrong = mesh_client_tls(h.trust.clone(), workload("shop", "cart"));
    let err = request_certificate(
        &h.address(),
        &wrong,
        &h.trust,
        &workload("shop", "cart"),
        Credential::Token(&h.token("shop", "cart")),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, IdentityError::Unreachable { .. }), "{err}");
    assert!(!h.metrics().contains("strait_ca_certificates_issued_total{"));
}

/// Waits until `rx` holds a value for which `pred` holds, or fails at the
/// deadline.
async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<Option<Arc<Identity>>>,
    deadline: Duration,
    pred: impl Fn(&Identity) -> bool,
) -> Arc<Identity> {
    tokio::time::timeout(deadline, async {
        loop {
            if let Some(id) = rx.borrow_and_update().clone()
                && pred(&id)
            {
                return id;
            }
            rx.changed().await.expect("identity task alive");
        }
    })
    .await
    .expect("identity within the deadline")
}

#[tokio::test]
async fn identity_manager_bootstraps_and_renews() {
    let h = Harness::start().await;
    let id = workload("shop", "cart");
    let mut config = IdentityConfig::new(
        &h.address(),
        id.clone(),
        h.trust.clone(),
        Some(h.token("shop", "cart")),
    );
    config.ttl = Some(Duration::from_secs(2));
    let manager = IdentityManager::spawn(config);
    let mut rx = manager.subscribe();
    let first = wait_for(&mut rx, Duration::from_secs(10), |_| true).await;
    assert_eq!(first.spiffe_id, id);
    let renewed = wait_for(&mut rx, Duration::from_secs(10), |i| {
        i.key_pkcs8 != first.key_pkcs8
    })
    .await;
    assert_eq!(renewed.spiffe_id, id);
    assert!(renewed.not_after >= first.not_after);
    // The renewal authenticated with the certificate, not the token.
    let metrics = h.metrics();
    assert!(
        metrics.contains(r#"strait_ca_certificates_issued_total{auth="token"} 1"#)
            && metrics.contains(r#"strait_ca_certificates_issued_total{auth="certificate"}"#),
        "{metrics}"
    );
    assert!(manager.current().is_some());
}

#[tokio::test]
async fn identity_manager_keeps_its_certificate_until_expiry_while_the_ca_is_away() {
    let h = Harness::start().await;
    let id = workload("shop", "cart");
    let mut config = IdentityConfig::new(
        &h.address(),
        id.clone(),
        h.trust.clone(),
        Some(h.token("shop", "cart")),
    );
    config.ttl = Some(Duration::from_secs(4));
    config.backoff.initial = Duration::from_millis(50);
    let manager = IdentityManager::spawn(config);
    let mut rx = manager.subscribe();
    let first = wait_for(&mut rx, Duration::from_secs(10), |_| true).await;
    // The CA goes away: every renewal fails from now on.
    h.server.abort();
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            rx.changed().await.expect("identity task alive");
            match rx.borrow_and_update().clone() {
                None => return OffsetDateTime::now_utc(),
                Some(i) => assert_eq!(i, first, "nothing new can arrive"),
            }
        }
    })
    .await
    .expect("the expired certificate is withdrawn");
    assert!(
        gone >= first.not_after,
        "withdrawn at {gone}, before its expiry {}",
        first.not_after
    );
}

#[tokio::test]
async fn identity_manager_without_credentials_stops() {
    let h = Harness::start().await;
    let manager = IdentityManager::spawn(IdentityConfig::new(
        &h.address(),
        workload("shop", "cart"),
        h.trust.clone(),
        None,
    ));
    let mut rx = manager.subscribe();
    tokio::time::timeout(Duration::from_secs(5), async {
        while rx.changed().await.is_ok() {}
    })
    .await
    .expect("the task stops: it has nothing to ask with");
    assert!(rx.borrow().is_none());
}

#[tokio::test]
async fn identity_manager_reads_its_token_file_again_at_every_use() {
    let h = Harness::start().await;
    let id = workload("shop", "cart");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    // A stale token, in the file and read at start: the CA refuses it.
    std::fs::write(&file, "stale-token").unwrap();
    let mut config = IdentityConfig::new(
        &h.address(),
        id.clone(),
        h.trust.clone(),
        Some("stale-token".to_string()),
    );
    config.token_file = Some(file.clone());
    config.backoff.initial = Duration::from_millis(50);
    let manager = IdentityManager::spawn(config);
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        while !h.metrics().contains("strait_ca_requests_refused_total{") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "the stale token was never tried: {}",
        h.metrics()
    );
    assert!(manager.current().is_none());
    // The file is replaced (as the kubelet replaces a projected token): the
    // next try reads it.
    std::fs::write(&file, h.token("shop", "cart")).unwrap();
    let mut rx = manager.subscribe();
    let first = wait_for(&mut rx, Duration::from_secs(10), |_| true).await;
    assert_eq!(first.spiffe_id, id);
}
