use super::*;
use strait_ca::authority::{KeyAlgorithm, generate_key, leaf_csr};
use strait_ca::testing::TestPki;

const DAY: Duration = Duration::from_secs(86400);

fn ca(pki: &TestPki) -> WorkloadCa {
    WorkloadCa::new(
        strait_ca::testing::intermediate_of(&pki.root, "test", OffsetDateTime::now_utc()),
        Trust::new(pki.bundle()),
        Some(TokenIssuer::from_key(&[1; 32])),
        TtlPolicy::default(),
        &mut Registry::default(),
    )
    .unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn csr_for(uri: &str, dns: &[&str]) -> String {
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let dns: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
    leaf_csr(&id(uri), &dns, &key).unwrap()
}

#[test]
fn ttl_policy() {
    let p = TtlPolicy {
        default: DAY,
        max: 2 * DAY,
    };
    let cases = [
        (0, DAY),
        (-5, DAY),
        (i64::MIN, DAY),
        (60, Duration::from_secs(60)),
        (2 * 86400, 2 * DAY),
        (2 * 86400 + 1, 2 * DAY),
        (i64::MAX, 2 * DAY),
    ];
    for (asked, want) in cases {
        assert_eq!(p.effective(asked), want, "{asked}");
    }
    // A default above the cap is capped too.
    let p = TtlPolicy {
        default: 3 * DAY,
        max: DAY,
    };
    assert_eq!(p.effective(0), DAY);
}

#[test]
fn zero_ttl_policy_is_refused() {
    let pki = TestPki::new("td");
    let err = WorkloadCa::new(
        strait_ca::testing::intermediate_of(&pki.root, "x", OffsetDateTime::now_utc()),
        Trust::new(pki.bundle()),
        None,
        TtlPolicy {
            default: DAY,
            max: Duration::ZERO,
        },
        &mut Registry::default(),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::ZeroTtl { .. }), "{err}");
}

#[test]
fn service_accounts_of_token_review_users() {
    assert_eq!(
        service_account_of("system:serviceaccount:demo:client"),
        Ok(("demo", "client"))
    );
    for bad in [
        "",
        "admin",
        "system:serviceaccount:",
        "system:serviceaccount:demo",
        "system:serviceaccount:demo:",
        "system:serviceaccount::client",
        "system:serviceaccount:demo:client:extra",
        "system:node:worker-1",
    ] {
        let e = service_account_of(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("{bad:?}")), "{e}");
    }
}

#[test]
fn bearer_headers() {
    assert_eq!(bearer_token(b"Bearer swt1.a.b"), Ok("swt1.a.b"));
    assert_eq!(bearer_token(b"bearer  swt1.a.b "), Ok("swt1.a.b"));
    for (bad, needle) in [
        (&b"swt1.a.b"[..], "Bearer <workload token>"),
        (b"Basic dXNlcjpwdw==", "\"Basic\""),
        (b"Bearer ", "Bearer <workload token>"),
        (b"Bearer \t", "Bearer <workload token>"),
        (&[0xff, 0x20, 0x41][..], "not text"),
    ] {
        let err = bearer_token(bad).unwrap_err().to_string();
        assert!(err.contains(needle), "{bad:?}: {err}");
    }
}

#[test]
fn san_checks_name_what_was_asked_and_what_is_allowed() {
    let allowed = id("spiffe://td/ns/a/sa/b");
    let sans = |uris: &[&str], dns: &[&str]| strait_ca::cert::Sans {
        uris: uris.iter().map(|s| s.to_string()).collect(),
        dns: dns.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    assert!(check_sans(&sans(&["spiffe://td/ns/a/sa/b"], &[]), &allowed).is_ok());
    for (s, needle) in [
        (
            sans(&["spiffe://td/ns/a/sa/admin"], &[]),
            "spiffe://td/ns/a/sa/admin",
        ),
        (sans(&[], &[]), "no URI SAN"),
        (
            sans(&["spiffe://td/ns/a/sa/b", "spiffe://td/ns/x/sa/y"], &[]),
            "spiffe://td/ns/x/sa/y",
        ),
        (
            sans(&["spiffe://td/ns/a/sa/b"], &["evil.example"]),
            "evil.example",
        ),
    ] {
        let r = check_sans(&s, &allowed).unwrap_err();
        assert_eq!(r.code, Code::PermissionDenied);
        assert!(r.message.contains(needle), "{}", r.message);
        assert!(r.message.contains(allowed.as_str()), "{}", r.message);
    }
}

#[test]
fn authenticate_with_a_token() {
    let pki = TestPki::new("td");
    let ca = ca(&pki);
    let now = OffsetDateTime::now_utc();
    let token = TokenIssuer::from_key(&[1; 32])
        .issue_at("shop", "cart", "cart-v1", Duration::from_secs(60), now)
        .unwrap();
    let header = format!("Bearer {token}");
    let (got, method) = ca.authenticate(None, Some(header.as_bytes()), now).unwrap();
    assert_eq!(got.as_str(), "spiffe://td/ns/shop/sa/cart");
    assert_eq!(method, AuthMethod::Token);

    let forged = TokenIssuer::from_key(&[2; 32])
        .issue_at("shop", "cart", "cart-v1", Duration::from_secs(60), now)
        .unwrap();
    let r = ca
        .authenticate(None, Some(format!("Bearer {forged}").as_bytes()), now)
        .unwrap_err();
    assert_eq!((r.code, r.reason), (Code::Unauthenticated, "bad_token"));
    assert!(r.message.contains("signature"), "{}", r.message);

    let later = now + Duration::from_secs(61);
    let r = ca
        .authenticate(None, Some(header.as_bytes()), later)
        .unwrap_err();
    assert!(r.message.contains("expired"), "{}", r.message);

    let r = ca.authenticate(None, None, now).unwrap_err();
    assert_eq!(
        (r.code, r.reason),
        (Code::Unauthenticated, "no_credentials")
    );
}

#[test]
fn authenticate_with_a_certificate() {
    let pki = TestPki::new("td");
    let ca = ca(&pki);
    let now = OffsetDateTime::now_utc();
    let der = |chain: Vec<Vec<u8>>| -> Vec<CertificateDer<'static>> {
        chain.into_iter().map(CertificateDer::from).collect()
    };
    let mine = der(pki.leaf_chain("spiffe://td/ns/a/sa/b"));
    let (got, method) = ca.authenticate(Some(&mine), None, now).unwrap();
    assert_eq!(
        (got.as_str(), method),
        ("spiffe://td/ns/a/sa/b", AuthMethod::Certificate)
    );
    // A certificate wins over a token: a renewal gets only its own ID.
    let token = TokenIssuer::from_key(&[1; 32])
        .issue_at("x", "y", "z", Duration::from_secs(60), now)
        .unwrap();
    let (got, _) = ca
        .authenticate(Some(&mine), Some(format!("Bearer {token}").as_bytes()), now)
        .unwrap();
    assert_eq!(got.as_str(), "spiffe://td/ns/a/sa/b");

    let cluster = der(pki.leaf_chain("spiffe://td/strait/cluster/east"));
    let r = ca.authenticate(Some(&cluster), None, now).unwrap_err();
    assert_eq!(
        (r.code, r.reason),
        (Code::PermissionDenied, "not_a_workload")
    );

    let other = TestPki::new("td");
    let foreign = der(other.leaf_chain("spiffe://td/ns/a/sa/b"));
    let r = ca.authenticate(Some(&foreign), None, now).unwrap_err();
    assert_eq!(
        (r.code, r.reason),
        (Code::Unauthenticated, "bad_client_certificate")
    );
}

#[test]
fn sign_issues_only_the_allowed_identity() {
    let pki = TestPki::new("td");
    let ca = ca(&pki);
    let now = OffsetDateTime::now_utc();
    let allowed = id("spiffe://td/ns/a/sa/b");
    let signed = ca
        .sign(&allowed, &csr_for("spiffe://td/ns/a/sa/b", &[]), 3600, now)
        .unwrap();
    assert_eq!(signed.cert_chain.len(), 3, "leaf, intermediate, root");
    let chain: Vec<Vec<u8>> = signed
        .cert_chain
        .iter()
        .map(|p| strait_ca::pemfile::parse_certificates(p.as_bytes()).unwrap()[0].clone())
        .collect();
    let svid = strait_ca::verify_svid(&chain, &pki.bundle(), now).unwrap();
    assert_eq!(svid.spiffe_id, allowed);
    let life = signed.not_after - now;
    assert!(
        life.whole_seconds() <= 3600 && life.whole_seconds() >= 3598,
        "{life}"
    );

    let cases = [
        (
            csr_for("spiffe://td/ns/a/sa/admin", &[]),
            Code::PermissionDenied,
        ),
        (
            csr_for("spiffe://td/ns/a/sa/b", &["b.a.svc"]),
            Code::PermissionDenied,
        ),
        (
            csr_for("spiffe://other/ns/a/sa/b", &[]),
            Code::PermissionDenied,
        ),
        ("not a csr".to_string(), Code::InvalidArgument),
        (String::new(), Code::InvalidArgument),
    ];
    for (csr, code) in cases {
        let r = ca.sign(&allowed, &csr, 0, now).unwrap_err();
        assert_eq!(r.code, code, "{}", r.message);
    }
}

#[test]
fn sign_never_outlives_the_intermediate_and_refuses_after_it() {
    let pki = TestPki::new("td");
    let ca = ca(&pki);
    let allowed = id("spiffe://td/ns/a/sa/b");
    let end = ca.authority().not_after();
    let near_end = end - Duration::from_secs(600);
    let signed = ca
        .sign(&allowed, &csr_for(allowed.as_str(), &[]), 0, near_end)
        .unwrap();
    assert_eq!(signed.not_after, end);
    let r = ca
        .sign(&allowed, &csr_for(allowed.as_str(), &[]), 0, end)
        .unwrap_err();
    assert_eq!((r.code, r.reason), (Code::Unavailable, "ca_not_valid"));
}

#[test]
fn authority_swaps_within_the_trust_domain_only() {
    let pki = TestPki::new("td");
    let ca = ca(&pki);
    let now = OffsetDateTime::now_utc();
    let next = strait_ca::testing::intermediate_of(&pki.root, "test", now);
    let next_der = next.certificate_der().to_vec();
    ca.set_authority(next).unwrap();
    let signed = ca
        .sign(
            &id("spiffe://td/ns/a/sa/b"),
            &csr_for("spiffe://td/ns/a/sa/b", &[]),
            0,
            now,
        )
        .unwrap();
    let intermediate =
        strait_ca::pemfile::parse_certificates(signed.cert_chain[1].as_bytes()).unwrap();
    assert_eq!(intermediate[0], next_der);

    let other = TestPki::new("other.td");
    let err = ca
        .set_authority(other.intermediate)
        .unwrap_err()
        .to_string();
    assert!(err.contains("other.td") && err.contains("\"td\""), "{err}");
}
