//! Issuance and verification together: every rule and refusal of the CA,
//! checked by issuing real certificates and verifying them.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::OffsetDateTime;

use crate::authority::*;
use crate::bundle::TrustBundle;
use crate::csr::Csr;
use crate::csr::tests::csr_with;
use crate::policy::{AnyIdentityInTrustDomain, Entitled, PolicyError};
use crate::spiffe::{ClusterName, SpiffeId, TrustDomain};
use crate::testing::{TestPki, intermediate_of};
use crate::verify::{CertRef, Reason, expect_id, verify_svid};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn csr(uris: &[&str], dns: &[&str], ca: bool) -> (Csr, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let pem = csr_with(&key, uris, dns, ca, None);
    (Csr::from_pem(pem.as_bytes()).unwrap(), key)
}

fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    for u in uris {
        p.subject_alt_names
            .push(SanType::URI((*u).try_into().unwrap()));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = now() - HOUR;
    p.not_after = now() + HOUR;
    p
}

fn reason(result: Result<crate::VerifiedSvid, crate::VerifyError>) -> Reason {
    result.expect_err("verification must fail").reason
}

#[test]
fn issued_chain_verifies_and_reports_id_and_expiry() {
    let pki = TestPki::new("cluster.local");
    let chain = pki.leaf_chain("spiffe://cluster.local/ns/bookinfo/sa/reviews");
    let svid = verify_svid(&chain, &pki.bundle(), now()).unwrap();
    assert_eq!(
        svid.spiffe_id.as_str(),
        "spiffe://cluster.local/ns/bookinfo/sa/reviews"
    );
    assert!(svid.expires <= now() + DAY && svid.expires > now() + DAY - HOUR);
    assert_eq!(svid.root, pki.root.root_der());
    assert_eq!(svid.path_len, 3);
    // Chain order does not matter after the leaf; an included root is fine.
    let mut with_root = chain.clone();
    with_root.push(pki.root.root_der().to_vec());
    assert!(verify_svid(&with_root, &pki.bundle(), now()).is_ok());
}

#[test]
fn root_properties() {
    let pki = TestPki::new("td");
    let c = crate::cert::CertSummary::from_der(pki.root.root_der()).unwrap();
    assert!(c.is_ca);
    assert_eq!(c.path_len, None);
    assert!(c.self_signed);
    assert_eq!(c.key_usage, ["Key Cert Sign", "CRL Sign"]);
    assert_eq!(c.sans.uris, ["spiffe://td"]);
    assert!(c.public_key.starts_with("EC 256"), "{}", c.public_key);
}

#[test]
fn root_validity_is_configurable() {
    let td = TrustDomain::new("td").unwrap();
    let root = Authority::create_root(
        &RootOptions {
            trust_domain: td,
            common_name: Some("Example Root".into()),
            validity: 30 * DAY,
            key_algorithm: KeyAlgorithm::EcdsaP384,
        },
        now(),
    )
    .unwrap();
    let c = crate::cert::CertSummary::from_der(root.root_der()).unwrap();
    assert!(c.subject.contains("CN=Example Root"), "{}", c.subject);
    assert!(c.public_key.starts_with("EC 384"), "{}", c.public_key);
    let na = root.not_after();
    assert!(na > now() + 29 * DAY && na <= now() + 30 * DAY);
}

#[test]
fn intermediate_properties_and_cap() {
    let td = TrustDomain::new("td").unwrap();
    let t = now();
    let root = Authority::create_root(
        &RootOptions {
            trust_domain: td,
            common_name: None,
            validity: 100 * DAY,
            key_algorithm: KeyAlgorithm::EcdsaP256,
        },
        t,
    )
    .unwrap();
    // Asking for a year under a 100-day root gets at most the root's expiry.
    let inter = intermediate_of(&root, "east", t);
    let c = crate::cert::CertSummary::from_der(inter.certificate_der()).unwrap();
    assert!(c.is_ca);
    assert_eq!(c.path_len, Some(0));
    assert!(c.subject.contains("CN=east"), "{}", c.subject);
    assert!(c.subject.contains("O=td"), "{}", c.subject);
    // The printed subject is the one the binding and broker checks read.
    assert_eq!(
        c.subject,
        crate::authority::intermediate_subject("td", "east")
    );
    assert_eq!(
        crate::authority::cluster_of_intermediate("td", &c.subject),
        Some("east")
    );
    for other in [
        "O=other, OU=strait clusters, CN=east",
        "O=td, OU=strait clusters, CN=",
        "O=td, CN=east",
        "O=td, OU=strait clusters, CN=east, L=x",
    ] {
        assert_eq!(
            crate::authority::cluster_of_intermediate("td", other),
            None,
            "{other}"
        );
    }
    assert_eq!(c.sans.uris, ["spiffe://td"]);
    assert_eq!(inter.not_after(), root.not_after());
}

#[test]
fn leaf_properties() {
    let pki = TestPki::new("td");
    let (csr, _) = csr(
        &["spiffe://td/ns/a/sa/b"],
        &["b.a.svc.cluster.local"],
        false,
    );
    let leaf = pki
        .intermediate
        .issue_leaf(&csr, 2 * HOUR, &AnyIdentityInTrustDomain, now())
        .unwrap();
    let c = crate::cert::CertSummary::from_der(&leaf.der).unwrap();
    assert!(!c.is_ca);
    assert_eq!(c.spiffe_id.as_deref(), Some("spiffe://td/ns/a/sa/b"));
    assert_eq!(c.sans.dns, ["b.a.svc.cluster.local"]);
    assert_eq!(c.key_usage, ["Digital Signature"]);
    assert_eq!(c.extended_key_usage, ["serverAuth", "clientAuth"]);
    assert_eq!(c.subject, "");
    let ttl = leaf.not_after - leaf.not_before;
    assert!(ttl <= 2 * HOUR + CLOCK_SKEW && ttl > 2 * HOUR);
}

#[test]
fn leaf_never_outlives_its_issuer() {
    let td = TrustDomain::new("td").unwrap();
    let t = now();
    let root = Authority::create_root(
        &RootOptions {
            trust_domain: td,
            common_name: None,
            validity: HOUR,
            key_algorithm: KeyAlgorithm::EcdsaP256,
        },
        t,
    )
    .unwrap();
    let inter = intermediate_of(&root, "east", t);
    let (csr, _) = csr(&["spiffe://td/x"], &[], false);
    let leaf = inter
        .issue_leaf(&csr, DAY, &AnyIdentityInTrustDomain, t)
        .unwrap();
    assert_eq!(leaf.not_after, root.not_after());
}

#[test]
fn expired_ca_does_not_issue() {
    let pki = TestPki::new("td");
    let (csr, _) = csr(&["spiffe://td/x"], &[], false);
    let later = pki.intermediate.not_after() + DAY;
    let err = pki
        .intermediate
        .issue_leaf(&csr, HOUR, &AnyIdentityInTrustDomain, later)
        .unwrap_err();
    assert!(matches!(err, IssueError::CaNotValid { .. }), "{err}");
}

#[test]
fn refuses_csr_for_a_ca() {
    let pki = TestPki::new("td");
    let (csr, _) = csr(&["spiffe://td/x"], &[], true);
    let err = pki
        .intermediate
        .issue_leaf(&csr, HOUR, &AnyIdentityInTrustDomain, now())
        .unwrap_err();
    assert!(
        matches!(err, IssueError::Policy(PolicyError::RequestsCa)),
        "{err}"
    );
}

#[test]
fn refuses_csr_with_two_uri_sans() {
    let pki = TestPki::new("td");
    let (csr, _) = csr(&["spiffe://td/a", "spiffe://td/b"], &[], false);
    let err = pki
        .intermediate
        .issue_leaf(&csr, HOUR, &AnyIdentityInTrustDomain, now())
        .unwrap_err();
    assert!(
        matches!(err, IssueError::Policy(PolicyError::UriSanCount(2))),
        "{err}"
    );
}

#[test]
fn refuses_foreign_trust_domain() {
    let pki = TestPki::new("td");
    let (csr, _) = csr(&["spiffe://other/ns/a/sa/b"], &[], false);
    let err = pki
        .intermediate
        .issue_leaf(&csr, HOUR, &AnyIdentityInTrustDomain, now())
        .unwrap_err();
    assert!(
        matches!(
            err,
            IssueError::Policy(PolicyError::ForeignTrustDomain { .. })
        ),
        "{err}"
    );
}

#[test]
fn refuses_bad_spiffe_ids_in_csr() {
    let pki = TestPki::new("td");
    for bad in [
        "spiffe://td/a/",
        "spiffe://td/../a",
        "spiffe://TD/a",
        "https://td/a",
        "spiffe://td/a?b",
    ] {
        let (csr, _) = csr(&[bad], &[], false);
        let err = pki
            .intermediate
            .issue_leaf(&csr, HOUR, &AnyIdentityInTrustDomain, now())
            .unwrap_err();
        assert!(
            matches!(err, IssueError::Policy(PolicyError::NotSpiffe { .. })),
            "{bad}: {err}"
        );
    }
}

#[test]
fn policy_extension_narrows_identities() {
    let pki = TestPki::new("td");
    let mine = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
    let policy = Entitled {
        identities: [mine].into(),
        max_ttl: None,
    };
    let (ok, _) = csr(&["spiffe://td/ns/a/sa/b"], &[], false);
    assert!(
        pki.intermediate
            .issue_leaf(&ok, HOUR, &policy, now())
            .is_ok()
    );
    let (other, _) = csr(&["spiffe://td/ns/a/sa/c"], &[], false);
    let err = pki
        .intermediate
        .issue_leaf(&other, HOUR, &policy, now())
        .unwrap_err();
    assert!(
        matches!(err, IssueError::Policy(PolicyError::NotEntitled { .. })),
        "{err}"
    );
}

#[test]
fn pathlen_zero_intermediate_cannot_issue_intermediates() {
    let pki = TestPki::new("td");
    let key = KeyPair::generate().unwrap();
    let cluster = ClusterName::new("test").unwrap();
    let csr = Csr::from_pem(intermediate_csr(&cluster, &key).unwrap().as_bytes()).unwrap();
    let err = pki
        .intermediate
        .issue_intermediate(&csr, &cluster, DAY, now())
        .unwrap_err();
    assert!(
        matches!(err, IssueError::CannotIssueCa { path_len: 0, .. }),
        "{err}"
    );
}

#[test]
fn intermediate_csr_must_name_the_cluster() {
    let pki = TestPki::new("td");
    let key = KeyPair::generate().unwrap();
    let csr = Csr::from_pem(
        intermediate_csr(&ClusterName::new("west").unwrap(), &key)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let err = pki
        .root
        .issue_intermediate(&csr, &ClusterName::new("east").unwrap(), DAY, now())
        .unwrap_err();
    assert!(
        matches!(err, IssueError::Policy(PolicyError::ClusterMismatch { .. })),
        "{err}"
    );
    let (with_uri, _) = csr_pair_with_uri();
    let err = pki
        .root
        .issue_intermediate(&with_uri, &ClusterName::new("east").unwrap(), DAY, now())
        .unwrap_err();
    assert!(
        matches!(err, IssueError::Policy(PolicyError::IntermediateUris(_))),
        "{err}"
    );
}

fn csr_pair_with_uri() -> (Csr, KeyPair) {
    csr(&["spiffe://td/ns/a/sa/b"], &[], true)
}

#[test]
fn loading_refuses_wrong_key_and_non_ca() {
    let pki = TestPki::new("td");
    let other = KeyPair::generate().unwrap();
    let err = Authority::from_der(pki.intermediate.chain().to_vec(), other, None).unwrap_err();
    assert!(matches!(err, IssueError::KeyMismatch(_)), "{err}");

    let (leaf, key_pem) = pki.leaf("spiffe://td/x");
    let key = KeyPair::from_pem(&key_pem).unwrap();
    let chain = vec![
        leaf,
        pki.intermediate.certificate_der().to_vec(),
        pki.root.root_der().to_vec(),
    ];
    let err = Authority::from_der(chain, key, None).unwrap_err();
    assert!(matches!(err, IssueError::NotACa { .. }), "{err}");
}

#[test]
fn loading_refuses_broken_chain_and_mismatched_trust_domain() {
    let pki = TestPki::new("td");
    let other = TestPki::new("td");
    let key = KeyPair::from_pem(&pki.intermediate.key_pem()).unwrap();
    let chain = vec![
        pki.intermediate.certificate_der().to_vec(),
        other.root.root_der().to_vec(),
    ];
    let err = Authority::from_der(chain, key, None).unwrap_err();
    assert!(matches!(err, IssueError::BadChain(_)), "{err}");

    let key = KeyPair::from_pem(&pki.intermediate.key_pem()).unwrap();
    let err = Authority::from_der(
        pki.intermediate.chain().to_vec(),
        key,
        Some(&TrustDomain::new("elsewhere").unwrap()),
    )
    .unwrap_err();
    assert!(
        matches!(err, IssueError::TrustDomainMismatch { .. }),
        "{err}"
    );
}

#[test]
fn verify_rejects_wrong_root() {
    let pki = TestPki::new("td");
    let other = TestPki::new("td");
    let chain = pki.leaf_chain("spiffe://td/x");
    let err = verify_svid(&chain, &other.bundle(), now()).unwrap_err();
    // Same subject DN, different key: the signature is what tells them apart.
    assert!(matches!(err.reason, Reason::BadSignature { .. }), "{err}");
    assert!(
        matches!(err.cert, CertRef::Chain { position: 2, .. }),
        "{err}"
    );

    let mut other_named = TestPki::new("td");
    other_named.root = Authority::create_root(
        &RootOptions {
            trust_domain: TrustDomain::new("td").unwrap(),
            common_name: Some("Other Root".into()),
            validity: DAY,
            key_algorithm: KeyAlgorithm::EcdsaP256,
        },
        now(),
    )
    .unwrap();
    let err = verify_svid(&chain, &other_named.bundle(), now()).unwrap_err();
    assert!(matches!(err.reason, Reason::UnknownIssuer { .. }), "{err}");
    assert!(err.to_string().contains("wrong root"), "{err}");

    // The real root presented in the chain but not trusted.
    let mut with_root = chain.clone();
    with_root.push(pki.root.root_der().to_vec());
    let err = verify_svid(&with_root, &other_named.bundle(), now()).unwrap_err();
    assert_eq!(err.reason, Reason::UntrustedRoot, "{err}");
}

#[test]
fn verify_accepts_either_root_during_rotation() {
    let old = TestPki::new("td");
    let new = TestPki::new("td");
    let mut bundle = old.bundle();
    bundle.add(new.root.root_der().to_vec());
    assert!(verify_svid(&old.leaf_chain("spiffe://td/a"), &bundle, now()).is_ok());
    let svid = verify_svid(&new.leaf_chain("spiffe://td/a"), &bundle, now()).unwrap();
    assert_eq!(svid.root, new.root.root_der());
}

#[test]
fn verify_checks_validity_windows() {
    let pki = TestPki::new("td");
    let chain = pki.leaf_chain("spiffe://td/x");
    let err = verify_svid(&chain, &pki.bundle(), now() + 2 * DAY).unwrap_err();
    assert!(matches!(err.reason, Reason::Expired { .. }), "{err}");
    assert!(matches!(err.cert, CertRef::Chain { position: 1, .. }));
    assert!(err.to_string().contains("expired at"), "{err}");
    let err = verify_svid(&chain, &pki.bundle(), now() - DAY).unwrap_err();
    assert!(matches!(err.reason, Reason::NotYetValid { .. }), "{err}");

    // An expired intermediate under a valid leaf window.
    let inter_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "stale");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.not_before = now() - 10 * DAY;
    p.not_after = now() - DAY;
    let stale = pki.root.sign_unchecked(&p, &inter_key);
    let stale_ca = Issuer::from_ca_cert_der(&stale.as_slice().into(), inter_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params(&["spiffe://td/x"])
        .signed_by(&leaf_key, &stale_ca)
        .unwrap();
    let err = verify_svid(&[leaf.der().to_vec(), stale], &pki.bundle(), now()).unwrap_err();
    assert!(matches!(err.reason, Reason::Expired { .. }), "{err}");
    assert!(
        matches!(err.cert, CertRef::Chain { position: 2, .. }),
        "{err}"
    );
}

use rcgen::Issuer;

/// A CA certificate under the pathLen-0 intermediate (which the CA refuses
/// to make, so it is forced with `sign_unchecked`) and a leaf under that.
#[test]
fn verify_rejects_ca_under_pathlen_zero_intermediate() {
    let pki = TestPki::new("td");
    let sub_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "rogue sub-CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.not_before = now() - HOUR;
    p.not_after = now() + HOUR;
    let sub = pki.intermediate.sign_unchecked(&p, &sub_key);
    let sub_ca = Issuer::from_ca_cert_der(&sub.as_slice().into(), sub_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params(&["spiffe://td/x"])
        .signed_by(&leaf_key, &sub_ca)
        .unwrap();
    let chain = vec![
        leaf.der().to_vec(),
        sub,
        pki.intermediate.certificate_der().to_vec(),
    ];
    let err = verify_svid(&chain, &pki.bundle(), now()).unwrap_err();
    assert_eq!(
        err.reason,
        Reason::PathLenExceeded {
            path_len: 0,
            below: 1
        },
        "{err}"
    );
    assert!(
        matches!(err.cert, CertRef::Chain { position: 3, .. }),
        "{err}"
    );
}

#[test]
fn verify_rejects_rule_breaking_leaves() {
    let pki = TestPki::new("td");
    let inter = pki.intermediate.certificate_der().to_vec();
    let sign = |p: &CertificateParams| {
        let k = KeyPair::generate().unwrap();
        vec![pki.intermediate.sign_unchecked(p, &k), inter.clone()]
    };
    let b = pki.bundle();

    let two = leaf_params(&["spiffe://td/a", "spiffe://td/b"]);
    assert!(
        matches!(reason(verify_svid(&sign(&two), &b, now())), Reason::BadSpiffeId(e) if e.contains("2 URI SANs"))
    );

    let none = leaf_params(&[]);
    let mut none = none;
    none.subject_alt_names
        .push(SanType::DnsName("x.example".try_into().unwrap()));
    assert_eq!(
        reason(verify_svid(&sign(&none), &b, now())),
        Reason::NoSpiffeId
    );

    let bad_id = leaf_params(&["spiffe://td/a/../b"]);
    assert!(matches!(
        reason(verify_svid(&sign(&bad_id), &b, now())),
        Reason::BadSpiffeId(_)
    ));

    let td_only = leaf_params(&["spiffe://td"]);
    assert!(matches!(
        reason(verify_svid(&sign(&td_only), &b, now())),
        Reason::BadSpiffeId(_)
    ));

    let mut ca_leaf = leaf_params(&["spiffe://td/a"]);
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    assert_eq!(
        reason(verify_svid(&sign(&ca_leaf), &b, now())),
        Reason::LeafIsCa
    );

    let mut no_ds = leaf_params(&["spiffe://td/a"]);
    no_ds.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert!(matches!(
        reason(verify_svid(&sign(&no_ds), &b, now())),
        Reason::LeafKeyUsage(_)
    ));

    let mut signer = leaf_params(&["spiffe://td/a"]);
    signer.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    assert!(matches!(
        reason(verify_svid(&sign(&signer), &b, now())),
        Reason::LeafKeyUsage(_)
    ));

    let mut no_ku = leaf_params(&["spiffe://td/a"]);
    no_ku.key_usages = vec![];
    assert!(matches!(
        reason(verify_svid(&sign(&no_ku), &b, now())),
        Reason::LeafKeyUsage(_)
    ));

    // A leaf of another trust domain signed by this trust domain's CA.
    let foreign = leaf_params(&["spiffe://evil/ns/a/sa/b"]);
    let err = verify_svid(&sign(&foreign), &b, now()).unwrap_err();
    // The bundle's trust domain catches it first.
    assert!(
        matches!(err.reason, Reason::ForeignTrustDomain { .. }),
        "{err}"
    );
    let untyped = TrustBundle::new(None, b.roots().to_vec()).unwrap();
    let err = verify_svid(&sign(&foreign), &untyped, now()).unwrap_err();
    assert!(
        matches!(err.reason, Reason::CaForeignTrustDomain { .. }),
        "{err}"
    );
    assert!(
        matches!(err.cert, CertRef::Chain { position: 2, .. }),
        "{err}"
    );

    // An unknown critical extension.
    let mut crit = leaf_params(&["spiffe://td/a"]);
    let mut ext =
        rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
    ext.set_criticality(true);
    crit.custom_extensions.push(ext);
    assert!(matches!(
        reason(verify_svid(&sign(&crit), &b, now())),
        Reason::UnhandledCriticalExtension(oid) if oid == "1.3.6.1.4.1.99999.1"
    ));
}

#[test]
fn verify_rejects_non_ca_issuer() {
    let pki = TestPki::new("td");
    // A leaf "issued" by another leaf's key.
    let (leaf_der, leaf_key_pem) = pki.leaf("spiffe://td/issuer");
    let leaf_key = KeyPair::from_pem(&leaf_key_pem).unwrap();
    let fake_ca = Issuer::from_ca_cert_der(&leaf_der.as_slice().into(), leaf_key).unwrap();
    let k = KeyPair::generate().unwrap();
    let victim = leaf_params(&["spiffe://td/victim"])
        .signed_by(&k, &fake_ca)
        .unwrap();
    let chain = vec![
        victim.der().to_vec(),
        leaf_der,
        pki.intermediate.certificate_der().to_vec(),
    ];
    let err = verify_svid(&chain, &pki.bundle(), now()).unwrap_err();
    assert_eq!(err.reason, Reason::NotCa, "{err}");
}

#[test]
fn verify_rejects_garbage_and_empty() {
    let pki = TestPki::new("td");
    assert_eq!(
        reason(verify_svid(&[], &pki.bundle(), now())),
        Reason::EmptyChain
    );
    assert!(matches!(
        reason(verify_svid(&[b"garbage".to_vec()], &pki.bundle(), now())),
        Reason::Malformed(_)
    ));
    let long: Vec<Vec<u8>> = (0..9).map(|_| b"x".to_vec()).collect();
    assert!(matches!(
        reason(verify_svid(&long, &pki.bundle(), now())),
        Reason::ChainTooLong(9)
    ));
}

#[test]
fn expect_id_compares() {
    let pki = TestPki::new("td");
    let svid = verify_svid(&pki.leaf_chain("spiffe://td/a"), &pki.bundle(), now()).unwrap();
    assert!(expect_id(&svid, &SpiffeId::parse("spiffe://td/a").unwrap()).is_ok());
    let err = expect_id(&svid, &SpiffeId::parse("spiffe://td/b").unwrap()).unwrap_err();
    assert!(err.to_string().contains("spiffe://td/b"), "{err}");
}

#[test]
fn verify_reports_the_earliest_expiry_on_the_path() {
    let td = TrustDomain::new("td").unwrap();
    let t = now();
    let root = Authority::create_root(
        &RootOptions {
            trust_domain: td.clone(),
            common_name: None,
            validity: 10 * DAY,
            key_algorithm: KeyAlgorithm::EcdsaP256,
        },
        t,
    )
    .unwrap();
    let inter = intermediate_of(&root, "east", t);
    let (csr, _) = csr(&["spiffe://td/x"], &[], false);
    let leaf = inter
        .issue_leaf(&csr, HOUR, &AnyIdentityInTrustDomain, t)
        .unwrap();
    let bundle = TrustBundle::new(Some(td), vec![root.root_der().to_vec()]).unwrap();
    let svid = verify_svid(
        &[leaf.der.clone(), inter.certificate_der().to_vec()],
        &bundle,
        t,
    )
    .unwrap();
    assert_eq!(svid.expires, leaf.not_after);
}
