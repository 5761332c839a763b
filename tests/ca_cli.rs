//! The `strait ca` command line as a user meets it: exit codes, messages
//! that name the bad input, refusal to overwrite keys, formats.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Scratch;

#[test]
fn help_and_version_exit_zero_with_examples() {
    let s = Scratch::new();
    let r = s.strait(&["--help"]).ok();
    assert!(r.stdout.contains("ca"), "{}", r.stdout);
    for cmd in [
        "init-root",
        "issue-intermediate",
        "csr",
        "sign-intermediate",
        "install-intermediate",
        "issue-workload",
        "verify",
        "inspect",
        "check-id",
    ] {
        let r = s.strait(&["ca", cmd, "--help"]).ok();
        assert!(
            r.stdout.contains("Example"),
            "{cmd} --help has no example:\n{}",
            r.stdout
        );
    }
    s.strait(&["ca", "bundle", "export", "--help"]).ok();
    s.strait(&["--version"]).ok();
}

#[test]
fn usage_errors_exit_64_and_name_the_flag() {
    let s = Scratch::new();
    s.strait(&["ca", "init-root", "--out", "x"])
        .fails_with(64, "--trust-domain");
    s.strait(&[
        "ca",
        "init-root",
        "--trust-domain",
        "Bad.Domain",
        "--out",
        "x",
    ])
    .fails_with(64, "'Bad.Domain' for '--trust-domain <TD>'");
    s.strait(&[
        "ca",
        "init-root",
        "--trust-domain",
        "td",
        "--out",
        "x",
        "--validity",
        "10 years",
    ])
    .fails_with(64, "--validity");
    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "r",
        "--cluster",
        "East_1",
        "--out",
        "o",
    ])
    .fails_with(64, "must be a DNS label");
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "c",
        "--spiffe-id",
        "spiffe://td/a/",
        "--out",
        "o",
    ])
    .fails_with(64, "must not end with '/'");
    s.strait(&["ca", "no-such-command"])
        .fails_with(64, "unrecognized subcommand");
    s.strait(&[]).fails_with(64, "Usage");
    // A directory that is no CA at all is a usage error too.
    std::fs::create_dir_all(s.path("empty")).unwrap();
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "empty",
        "--spiffe-id",
        "spiffe://td/a",
        "--out",
        "o",
    ])
    .fails_with(64, "neither a plug-in CA directory");
    // straitctl has no commands yet and says so.
    let r = s.run(env!("CARGO_BIN_EXE_straitctl"), &["--help"]).ok();
    assert!(r.stdout.contains("broker"), "{}", r.stdout);
}

#[test]
fn check_id_exit_codes_and_rules() {
    let s = Scratch::new();
    let r = s
        .strait(&["ca", "check-id", "spiffe://prod.example/ns/shop/sa/cart"])
        .ok();
    assert!(
        r.stdout.contains("trust_domain: prod.example"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("path: /ns/shop/sa/cart"), "{}", r.stdout);
    assert!(r.stdout.contains("service_account: cart"), "{}", r.stdout);
    for (id, rule) in [
        ("http://td/a", "scheme must be"),
        ("spiffe://", "trust domain is missing"),
        ("spiffe://TD/a", "lowercase letters"),
        ("spiffe://u@td/a", "userinfo"),
        ("spiffe://td:443/a", "port"),
        ("spiffe://td/a?x", "query"),
        ("spiffe://td/a#x", "fragment"),
        ("spiffe://td/a%41", "percent-encoding"),
        ("spiffe://td//a", "empty segments"),
        ("spiffe://td/./a", "'.' or '..' segments"),
        ("spiffe://td/a/", "must not end with '/'"),
        ("spiffe://td/a*b", "path segments may only contain"),
    ] {
        s.strait(&["ca", "check-id", id]).fails_with(1, rule);
    }
}

#[test]
fn keys_are_never_overwritten_silently() {
    let s = Scratch::new();
    s.strait(&["ca", "init-root", "--trust-domain", "td", "--out", "root"])
        .ok();
    let cert = s.read("root/root-cert.pem");
    let key = s.read("root/root-key.pem");
    s.strait(&["ca", "init-root", "--trust-domain", "td", "--out", "root"])
        .fails_with(1, "root-key.pem: a private key already exists");
    assert_eq!(s.read("root/root-key.pem"), key);
    assert_eq!(s.read("root/root-cert.pem"), cert);
    s.strait(&[
        "ca",
        "init-root",
        "--trust-domain",
        "td",
        "--out",
        "root",
        "--force",
    ])
    .ok();
    assert_ne!(s.read("root/root-key.pem"), key);

    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "root",
        "--cluster",
        "east",
        "--out",
        "east",
    ])
    .ok();
    let ca_key = s.read("east/ca-key.pem");
    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "root",
        "--cluster",
        "east",
        "--out",
        "east",
    ])
    .fails_with(1, "ca-key.pem: a private key already exists");
    assert_eq!(s.read("east/ca-key.pem"), ca_key);
    s.strait(&["ca", "csr", "--cluster", "east", "--out", "east"])
        .fails_with(1, "already exists");
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "east",
        "--spiffe-id",
        "spiffe://td/a",
        "--out",
        "w",
    ])
    .ok();
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "east",
        "--spiffe-id",
        "spiffe://td/a",
        "--out",
        "w",
    ])
    .fails_with(1, "key.pem: a private key already exists");

    use std::os::unix::fs::PermissionsExt;
    for key in ["root/root-key.pem", "east/ca-key.pem", "w/key.pem"] {
        let mode = std::fs::metadata(s.path(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
}

#[test]
fn bad_files_are_named() {
    let s = Scratch::new();
    s.strait(&["ca", "init-root", "--trust-domain", "td", "--out", "root"])
        .ok();
    s.write("garbage.pem", "hello\n");
    s.strait(&[
        "ca",
        "verify",
        "--bundle",
        "root/root-cert.pem",
        "--chain",
        "garbage.pem",
    ])
    .fails_with(1, "garbage.pem: no CERTIFICATE PEM block found");
    s.strait(&[
        "ca",
        "verify",
        "--bundle",
        "garbage.pem",
        "--chain",
        "root/root-cert.pem",
    ])
    .fails_with(1, "garbage.pem");
    s.strait(&[
        "ca",
        "verify",
        "--bundle",
        "missing.pem",
        "--chain",
        "root/root-cert.pem",
    ])
    .fails_with(1, "missing.pem: No such file");
    s.write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    s.strait(&["ca", "inspect", "broken.pem"])
        .fails_with(1, "certificate #1 (PEM block 1) is not valid X.509");
    s.write(
        "bad.json",
        "{\"keys\": [{\"use\": \"x509-svid\", \"kty\": \"EC\", \"x5c\": []}]}",
    );
    s.strait(&["ca", "bundle", "import", "bad.json"])
        .fails_with(1, "bad.json: SPIFFE bundle key #1");
    // A root directory whose key belongs to another root.
    s.strait(&["ca", "init-root", "--trust-domain", "td", "--out", "other"])
        .ok();
    std::fs::copy(s.path("other/root-key.pem"), s.path("root/root-key.pem")).unwrap();
    s.strait(&[
        "ca",
        "issue-intermediate",
        "--root",
        "root",
        "--cluster",
        "east",
        "--out",
        "east",
    ])
    .fails_with(1, "does not match");
}

#[test]
fn inspect_shows_every_certificate() {
    let s = Scratch::new();
    s.pki("td", &["east"]);
    let text = s
        .strait(&["ca", "inspect", "east/cert-chain.pem"])
        .ok()
        .stdout;
    assert!(
        text.contains("Certificate #1") && text.contains("Certificate #2"),
        "{text}"
    );
    assert!(text.contains("yes, pathLen 0"), "{text}");
    assert!(text.contains("SHA-256:"), "{text}");
    let json = s
        .strait(&["ca", "inspect", "east/cert-chain.pem", "-o", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["path_len"], 0);
    assert_eq!(v[0]["spiffe_id"], "spiffe://td");
    assert_eq!(v[1]["self_signed"], true);
    // The fingerprint is openssl's.
    let fp = s
        .openssl(&[
            "x509",
            "-in",
            "root/root-cert.pem",
            "-noout",
            "-fingerprint",
            "-sha256",
        ])
        .ok()
        .stdout;
    let fp = fp.trim().split('=').nth(1).unwrap().to_string();
    assert_eq!(v[1]["sha256_fingerprint"], fp);
}

#[test]
fn bundle_export_import_round_trip() {
    let s = Scratch::new();
    s.strait(&["ca", "init-root", "--trust-domain", "td", "--out", "root"])
        .ok();
    let json = s
        .strait(&[
            "ca",
            "bundle",
            "export",
            "--bundle",
            "root/root-cert.pem",
            "--trust-domain",
            "td",
            "--sequence",
            "7",
            "--refresh-hint",
            "5m",
        ])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["spiffe_sequence"], 7);
    assert_eq!(v["spiffe_refresh_hint"], 300);
    assert_eq!(v["keys"][0]["use"], "x509-svid");
    s.write("b.json", &json);
    let pem = s.strait(&["ca", "bundle", "import", "b.json"]).ok().stdout;
    assert_eq!(pem, s.read("root/root-cert.pem"));
    // Inspecting the JSON bundle shows the root.
    let text = s.strait(&["ca", "inspect", "b.json"]).ok().stdout;
    assert!(text.contains("CN=strait root CA"), "{text}");
}

#[test]
fn verify_json_output() {
    let s = Scratch::new();
    s.strait(&["ca", "init-root", "--trust-domain", "td", "--out", "root"])
        .ok();
    s.strait(&[
        "ca",
        "issue-workload",
        "--ca",
        "root",
        "--spiffe-id",
        "spiffe://td/ns/a/sa/b",
        "--out",
        "w",
        "--ttl",
        "30m",
    ])
    .ok();
    let out = s
        .strait(&[
            "ca",
            "verify",
            "--bundle",
            "root/root-cert.pem",
            "--chain",
            "w/cert-chain.pem",
            "-o",
            "json",
        ])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["spiffe_id"], "spiffe://td/ns/a/sa/b");
    let r = s.strait(&[
        "ca",
        "verify",
        "--bundle",
        "root/root-cert.pem",
        "--chain",
        "w/cert-chain.pem",
        "--expect-id",
        "spiffe://td/ns/a/sa/c",
        "-o",
        "json",
    ]);
    assert_eq!(r.code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("spiffe://td/ns/a/sa/c")
    );
}
