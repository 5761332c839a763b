//! strait's CA checked against the real `openssl`: openssl must accept every
//! chain strait issues, and strait must reject chains that openssl builds to
//! break strait's rules (several of which openssl itself accepts, because
//! they are valid X.509 but not valid SPIFFE).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Scratch;

const TD: &str = "example.org";

/// root → east intermediate → one workload, made with the CLI.
fn mesh() -> Scratch {
    let s = Scratch::new();
    s.pki(TD, &["east"]);
    s
}

fn openssl_verify(s: &Scratch, untrusted: &str, leaf: &str, purpose: &str) -> common::Run {
    s.openssl(&[
        "verify",
        "-x509_strict",
        "-purpose",
        purpose,
        "-CAfile",
        "root/root-cert.pem",
        "-untrusted",
        untrusted,
        leaf,
    ])
}

fn strait_verify(s: &Scratch, chain: &str) -> common::Run {
    s.strait(&[
        "ca",
        "verify",
        "--bundle",
        "root/root-cert.pem",
        "--chain",
        chain,
    ])
}

#[test]
fn openssl_accepts_every_chain_strait_issues() {
    let s = mesh();
    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "root",
        "--cluster",
        "west",
        "--out",
        "west",
    ])
    .ok();
    for (cluster, sa) in [("east", "cart"), ("west", "payments")] {
        let id = format!("spiffe://{TD}/ns/shop/sa/{sa}");
        let out = format!("{cluster}-{sa}");
        s.strait(&[
            "ca",
            "issue-workload",
            "--ca",
            cluster,
            "--spiffe-id",
            &id,
            "--out",
            &out,
            "--dns",
            &format!("{sa}.shop.svc.cluster.local"),
        ])
        .ok();
        let chain = format!("{out}/cert-chain.pem");
        let ca = format!("{cluster}/ca-cert.pem");
        // The leaf works as a TLS server and as a TLS client certificate.
        for purpose in ["sslserver", "sslclient"] {
            let r = openssl_verify(&s, &ca, &chain, purpose).ok();
            assert!(r.stdout.contains(": OK"), "{}", r.stdout);
        }
        // The plug-in CA directory is self-consistent for istiod too.
        s.openssl(&[
            "verify",
            "-x509_strict",
            "-CAfile",
            &format!("{cluster}/root-cert.pem"),
            &ca,
        ])
        .ok();
        let text = s
            .openssl(&["x509", "-in", &chain, "-noout", "-text"])
            .ok()
            .stdout;
        for needle in [
            &format!("URI:{id}") as &str,
            &format!("DNS:{sa}.shop.svc.cluster.local"),
            "CA:FALSE",
            "Digital Signature",
            "TLS Web Server Authentication, TLS Web Client Authentication",
            "X509v3 Subject Alternative Name: critical",
            "X509v3 Key Usage: critical",
            "ecdsa-with-SHA256",
        ] {
            assert!(text.contains(needle), "leaf lacks {needle:?}:\n{text}");
        }
        let text = s
            .openssl(&["x509", "-in", &ca, "-noout", "-text"])
            .ok()
            .stdout;
        for needle in [
            "CA:TRUE, pathlen:0",
            "Certificate Sign, CRL Sign",
            &format!("CN = {cluster}") as &str,
            &format!("URI:spiffe://{TD}"),
        ] {
            assert!(
                text.contains(needle),
                "intermediate lacks {needle:?}:\n{text}"
            );
        }
        let r = strait_verify(&s, &chain).ok();
        assert!(
            r.stdout.contains(&format!("spiffe_id: {id}")),
            "{}",
            r.stdout
        );
    }
    let text = s
        .openssl(&["x509", "-in", "root/root-cert.pem", "-noout", "-text"])
        .ok()
        .stdout;
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
    // The root key is PKCS#8 that openssl reads.
    s.openssl(&["pkey", "-in", "root/root-key.pem", "-noout"])
        .ok();
}

#[test]
fn offline_root_flow_with_an_openssl_csr() {
    let s = mesh();
    // A cluster operator makes the key and CSR with openssl, not strait.
    std::fs::create_dir_all(s.path("north")).unwrap();
    ec_csr(&s, "north/ca-key.pem", "north.csr", "/CN=north", &[]);
    s.strait(&[
        "ca",
        "sign-intermediate",
        "--root",
        "root",
        "--csr",
        "north.csr",
        "--out",
        "north-chain.pem",
    ])
    .ok();
    s.strait(&[
        "ca",
        "install-intermediate",
        "--dir",
        "north",
        "--chain",
        "north-chain.pem",
    ])
    .ok();
    s.openssl(&[
        "verify",
        "-x509_strict",
        "-CAfile",
        "root/root-cert.pem",
        "north/ca-cert.pem",
    ])
    .ok();
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "north",
        "--spiffe-id",
        "spiffe://example.org/ns/a/sa/b",
        "--out",
        "w",
    ])
    .ok();
    openssl_verify(&s, "north/ca-cert.pem", "w/cert-chain.pem", "sslclient").ok();
    strait_verify(&s, "w/cert-chain.pem").ok();

    // An RSA-2048 cluster key works as well.
    std::fs::create_dir_all(s.path("rsa")).unwrap();
    s.openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "rsa/ca-key.pem",
        "-out",
        "rsa.csr",
        "-subj",
        "/CN=rsa",
    ])
    .ok();
    let r = s
        .strait(&[
            "ca",
            "sign-intermediate",
            "--root",
            "root",
            "--csr",
            "rsa.csr",
            "--out",
            "rsa.pem",
        ])
        .ok();
    assert!(r.stdout.contains("RSA 2048"), "{}", r.stdout);
    s.openssl(&[
        "verify",
        "-x509_strict",
        "-CAfile",
        "root/root-cert.pem",
        "rsa.pem",
    ])
    .ok();

    // The same through strait's own `ca csr`.
    s.strait(&["ca", "csr", "--cluster", "south", "--out", "south"])
        .ok();
    s.strait(&[
        "ca",
        "sign-intermediate",
        "--root",
        "root",
        "--csr",
        "south/ca-csr.pem",
        "--out",
        "south.pem",
    ])
    .ok();
    s.strait(&[
        "ca",
        "install-intermediate",
        "--dir",
        "south",
        "--chain",
        "south.pem",
    ])
    .ok();
    // A chain for another cluster's key does not install.
    s.strait(&[
        "ca",
        "install-intermediate",
        "--dir",
        "south",
        "--chain",
        "north-chain.pem",
    ])
    .fails_with(1, "does not match");
}

#[test]
fn intermediate_csrs_that_break_the_rules_are_refused() {
    let s = mesh();
    // An intermediate CSR asking for a workload identity.
    ec_csr(
        &s,
        "k1.pem",
        "uri.csr",
        "/CN=north",
        &[
            "-addext",
            "subjectAltName=URI:spiffe://example.org/ns/a/sa/b",
        ],
    );
    s.strait(&[
        "ca",
        "sign-intermediate",
        "--root",
        "root",
        "--csr",
        "uri.csr",
        "--out",
        "x.pem",
    ])
    .fails_with(1, "not allowed in an intermediate");
    // A weak RSA key.
    s.openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:1024",
        "-nodes",
        "-keyout",
        "k2.pem",
        "-out",
        "weak.csr",
        "-subj",
        "/CN=north",
    ])
    .ok();
    s.strait(&[
        "ca",
        "sign-intermediate",
        "--root",
        "root",
        "--csr",
        "weak.csr",
        "--out",
        "x.pem",
    ])
    .fails_with(1, "at least 2048");
    // A CN that is not a cluster name.
    ec_csr(&s, "k3.pem", "cn.csr", "/CN=Not A Cluster", &[]);
    s.strait(&[
        "ca",
        "sign-intermediate",
        "--root",
        "root",
        "--csr",
        "cn.csr",
        "--out",
        "x.pem",
    ])
    .fails_with(1, "not a cluster name");
    // A certificate is not a CSR.
    s.strait(&[
        "ca",
        "sign-intermediate",
        "--root",
        "root",
        "--csr",
        "east/ca-cert.pem",
        "--out",
        "x.pem",
    ])
    .fails_with(1, "no CERTIFICATE REQUEST PEM block");
    assert!(!s.path("x.pem").exists());
}

/// `openssl req` with a new P-256 key: KEY and CSR files, subject, and any
/// extra arguments (e.g. `-addext`).
fn ec_csr(s: &Scratch, key: &str, csr: &str, subj: &str, extra: &[&str]) {
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        subj,
    ];
    args.extend_from_slice(extra);
    s.openssl(&args).ok();
}

/// Signs a leaf for `subj`/extensions with the east intermediate's key using
/// `openssl x509 -req`; returns the chain file (leaf + intermediate).
fn openssl_leaf(s: &Scratch, name: &str, ext: &str) -> String {
    s.write(&format!("{name}.ext"), &format!("[v3]\n{ext}\n"));
    ec_csr(
        s,
        &format!("{name}.key"),
        &format!("{name}.csr"),
        "/O=test",
        &[],
    );
    s.openssl(&[
        "x509",
        "-req",
        "-in",
        &format!("{name}.csr"),
        "-CA",
        "east/ca-cert.pem",
        "-CAkey",
        "east/ca-key.pem",
        "-set_serial",
        "4242",
        "-days",
        "1",
        "-extfile",
        &format!("{name}.ext"),
        "-extensions",
        "v3",
        "-out",
        &format!("{name}.pem"),
    ])
    .ok();
    let chain = format!(
        "{}{}",
        s.read(&format!("{name}.pem")),
        s.read("east/ca-cert.pem")
    );
    s.write(&format!("{name}-chain.pem"), &chain);
    format!("{name}-chain.pem")
}

const GOOD_LEAF: &str = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth";

#[test]
fn openssl_made_leaf_that_follows_the_rules_is_accepted() {
    let s = mesh();
    let chain = openssl_leaf(
        &s,
        "good",
        &format!("{GOOD_LEAF}\nsubjectAltName=URI:spiffe://{TD}/ns/a/sa/b"),
    );
    let r = strait_verify(&s, &chain).ok();
    assert!(
        r.stdout.contains("spiffe://example.org/ns/a/sa/b"),
        "{}",
        r.stdout
    );
}

#[test]
fn strait_rejects_what_openssl_accepts_but_spiffe_forbids() {
    let s = mesh();
    let cases = [
        (
            "two-uris",
            format!(
                "{GOOD_LEAF}\nsubjectAltName=URI:spiffe://{TD}/ns/a/sa/b,URI:spiffe://{TD}/ns/a/sa/c"
            ),
            "2 URI SANs",
        ),
        (
            "foreign-td",
            format!("{GOOD_LEAF}\nsubjectAltName=URI:spiffe://evil.example/ns/a/sa/b"),
            "cannot vouch for a leaf of trust domain \"evil.example\"",
        ),
        (
            "bad-id",
            format!("{GOOD_LEAF}\nsubjectAltName=URI:spiffe://{TD}/ns/../sa/b"),
            "'.' or '..' segments",
        ),
        (
            "no-uri",
            format!("{GOOD_LEAF}\nsubjectAltName=DNS:b.a.svc"),
            "no URI SAN",
        ),
        (
            "ca-leaf",
            format!(
                "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature\nsubjectAltName=URI:spiffe://{TD}/ns/a/sa/b"
            ),
            "must not be a CA",
        ),
        (
            "no-digital-signature",
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,keyAgreement\nsubjectAltName=URI:spiffe://{TD}/ns/a/sa/b"
            ),
            "lacks digitalSignature",
        ),
        (
            "cert-sign-leaf",
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyCertSign\nsubjectAltName=URI:spiffe://{TD}/ns/a/sa/b"
            ),
            "must not have keyCertSign",
        ),
    ];
    for (name, ext, needle) in cases {
        let chain = openssl_leaf(&s, name, &ext);
        // openssl: plain X.509 path validation passes (no purpose check, so
        // only chain, signature, validity and constraints are looked at) ...
        let ossl = s.openssl(&[
            "verify",
            "-CAfile",
            "root/root-cert.pem",
            "-untrusted",
            "east/ca-cert.pem",
            &format!("{name}.pem"),
        ]);
        if name != "ca-leaf" {
            assert_eq!(
                ossl.code, 0,
                "{name}: openssl should accept it: {}",
                ossl.stderr
            );
        }
        // ... strait's SPIFFE rules do not.
        strait_verify(&s, &chain).fails_with(1, needle);
    }
}

#[test]
fn strait_rejects_a_ca_under_the_pathlen_zero_intermediate() {
    let s = mesh();
    // openssl happily signs a sub-CA with the cluster intermediate's key.
    s.write("sub.ext", "[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n");
    ec_csr(&s, "sub.key", "sub.csr", "/CN=rogue sub-CA", &[]);
    s.openssl(&[
        "x509",
        "-req",
        "-in",
        "sub.csr",
        "-CA",
        "east/ca-cert.pem",
        "-CAkey",
        "east/ca-key.pem",
        "-set_serial",
        "7",
        "-days",
        "1",
        "-extfile",
        "sub.ext",
        "-extensions",
        "v3",
        "-out",
        "sub.pem",
    ])
    .ok();
    s.write(
        "leaf.ext",
        &format!("[v3]\n{GOOD_LEAF}\nsubjectAltName=URI:spiffe://{TD}/ns/a/sa/b\n"),
    );
    ec_csr(&s, "leaf.key", "leaf.csr", "/O=test", &[]);
    s.openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "sub.pem",
        "-CAkey",
        "sub.key",
        "-set_serial",
        "8",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-extensions",
        "v3",
        "-out",
        "leaf.pem",
    ])
    .ok();
    let chain = format!(
        "{}{}{}",
        s.read("leaf.pem"),
        s.read("sub.pem"),
        s.read("east/ca-cert.pem")
    );
    s.write("chain.pem", &chain);
    // openssl agrees this one is bad.
    let inter = format!("{}{}", s.read("sub.pem"), s.read("east/ca-cert.pem"));
    s.write("inter.pem", &inter);
    let ossl = s.openssl(&[
        "verify",
        "-CAfile",
        "root/root-cert.pem",
        "-untrusted",
        "inter.pem",
        "leaf.pem",
    ]);
    assert_ne!(ossl.code, 0, "openssl accepted a CA under pathlen:0");
    strait_verify(&s, "chain.pem")
        .fails_with(1, "pathLen 0 allows 0 CA certificate(s) below it, but 1");
}

/// `openssl ca` can set arbitrary validity windows (x509 -req cannot).
fn openssl_ca_leaf(s: &Scratch, name: &str, start: &str, end: &str) -> String {
    std::fs::create_dir_all(s.path("newcerts")).unwrap();
    s.write("index.txt", "");
    s.write("serial", "1000\n");
    s.write(
        "ca.cnf",
        &format!(
            "[ca]\ndefault_ca = dflt\n[dflt]\ndatabase = index.txt\nnew_certs_dir = newcerts\n\
             certificate = east/ca-cert.pem\nprivate_key = east/ca-key.pem\nserial = serial\n\
             default_md = sha256\npolicy = any\nunique_subject = no\n[any]\norganizationName = optional\n\
             [v3]\n{GOOD_LEAF}\nsubjectAltName=URI:spiffe://{TD}/ns/a/sa/{name}\n"
        ),
    );
    ec_csr(
        s,
        &format!("{name}.key"),
        &format!("{name}.csr"),
        "/O=test",
        &[],
    );
    s.openssl(&[
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-in",
        &format!("{name}.csr"),
        "-out",
        &format!("{name}.pem"),
        "-startdate",
        start,
        "-enddate",
        end,
        "-extensions",
        "v3",
        "-notext",
    ])
    .ok();
    let chain = format!(
        "{}{}",
        s.read(&format!("{name}.pem")),
        s.read("east/ca-cert.pem")
    );
    s.write(&format!("{name}-chain.pem"), &chain);
    format!("{name}-chain.pem")
}

#[test]
fn strait_rejects_expired_and_not_yet_valid_leaves() {
    let s = mesh();
    let expired = openssl_ca_leaf(&s, "expired", "20200101000000Z", "20200102000000Z");
    let ossl = s.openssl(&[
        "verify",
        "-CAfile",
        "root/root-cert.pem",
        "-untrusted",
        "east/ca-cert.pem",
        "expired.pem",
    ]);
    assert!(
        ossl.stderr.contains("expired") || ossl.stdout.contains("expired"),
        "{}",
        ossl.stderr
    );
    strait_verify(&s, &expired).fails_with(1, "expired at 2020-01-02T00:00:00Z");

    let future = openssl_ca_leaf(&s, "future", "20990101000000Z", "20990102000000Z");
    strait_verify(&s, &future).fails_with(1, "not valid before 2099-01-01T00:00:00Z");
}

#[test]
fn strait_rejects_a_leaf_from_another_root() {
    let s = mesh();
    // A whole second PKI built by openssl alone, with the same trust domain.
    s.openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "other-root.key",
        "-out",
        "other-root.pem",
        "-days",
        "2",
        "-subj",
        "/CN=other root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])
    .ok();
    s.write(
        "o.ext",
        &format!("[v3]\n{GOOD_LEAF}\nsubjectAltName=URI:spiffe://{TD}/ns/a/sa/b\n"),
    );
    ec_csr(&s, "o.key", "o.csr", "/O=test", &[]);
    s.openssl(&[
        "x509",
        "-req",
        "-in",
        "o.csr",
        "-CA",
        "other-root.pem",
        "-CAkey",
        "other-root.key",
        "-set_serial",
        "9",
        "-days",
        "1",
        "-extfile",
        "o.ext",
        "-extensions",
        "v3",
        "-out",
        "o.pem",
    ])
    .ok();
    strait_verify(&s, "o.pem").fails_with(1, "neither in the chain nor a root of the bundle");
    // Presenting the foreign root in the chain does not make it trusted.
    let chain = format!("{}{}", s.read("o.pem"), s.read("other-root.pem"));
    s.write("o-chain.pem", &chain);
    strait_verify(&s, "o-chain.pem").fails_with(1, "self-signed root that is not in the bundle");
    // With the other root in the bundle it verifies: the bundle decides.
    s.strait(&[
        "ca",
        "verify",
        "--bundle",
        "other-root.pem",
        "--chain",
        "o.pem",
    ])
    .ok();
}

#[test]
fn verify_accepts_a_spiffe_bundle_and_both_roots_during_rotation() {
    let s = mesh();
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "east",
        "--spiffe-id",
        "spiffe://example.org/ns/a/sa/b",
        "--out",
        "w",
    ])
    .ok();
    s.strait(&["ca", "init-root", "--trust-domain", TD, "--out", "root2"])
        .ok();
    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "root2",
        "--cluster",
        "east",
        "--out",
        "east2",
    ])
    .ok();
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "east2",
        "--spiffe-id",
        "spiffe://example.org/ns/a/sa/b",
        "--out",
        "w2",
    ])
    .ok();
    let both = format!(
        "{}{}",
        s.read("root/root-cert.pem"),
        s.read("root2/root-cert.pem")
    );
    s.write("both.pem", &both);
    let json = s
        .strait(&[
            "ca",
            "bundle",
            "export",
            "--bundle",
            "both.pem",
            "--trust-domain",
            TD,
            "--sequence",
            "2",
        ])
        .ok()
        .stdout;
    s.write("both.json", &json);
    for chain in ["w/cert-chain.pem", "w2/cert-chain.pem"] {
        s.strait(&["ca", "verify", "--bundle", "both.json", "--chain", chain])
            .ok();
        // openssl agrees with the PEM form of the JSON bundle.
        let pem = s
            .strait(&["ca", "bundle", "import", "both.json"])
            .ok()
            .stdout;
        s.write("both-imported.pem", &pem);
        s.openssl(&[
            "verify",
            "-CAfile",
            "both-imported.pem",
            "-untrusted",
            chain,
            chain,
        ])
        .ok();
    }
    // The trust domain pin refuses another mesh's identities.
    s.strait(&[
        "ca",
        "verify",
        "--bundle",
        "both.json",
        "--chain",
        "w/cert-chain.pem",
        "--trust-domain",
        "other.org",
    ])
    .fails_with(1, "expected \"other.org\"");
}
