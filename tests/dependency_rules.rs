//! The architecture's dependency rules (docs/architecture.md#dependency-rules),
//! checked on the real dependency graph with `cargo tree`.

use std::collections::BTreeSet;
use std::process::Command;

/// Every package `package` links (normal dependencies, the whole tree).
fn links(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}", "-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != package)
        .map(str::to_string)
        .collect()
}

fn assert_none_of(package: &str, forbidden: &[&str]) {
    let linked = links(package);
    let found: Vec<&&str> = forbidden.iter().filter(|f| linked.contains(**f)).collect();
    assert!(
        found.is_empty(),
        "{package} must not link {found:?} (see docs/architecture.md#dependency-rules)"
    );
}

#[test]
fn the_proxies_link_neither_the_broker_nor_the_control_plane_nor_each_other() {
    // The sidecar package also builds the `strait-sidecar` binary: no
    // Kubernetes client, no database, no QUIC, no broker.
    assert_none_of(
        "strait-sidecar",
        &[
            "strait-broker",
            "strait-broker-client",
            "strait-controlplane",
            "strait-gateway",
            "redb",
            "kube",
            "k8s-openapi",
            "quinn",
        ],
    );
    assert_none_of(
        "strait-gateway",
        &[
            "strait-broker",
            "strait-broker-client",
            "strait-controlplane",
            "strait-sidecar",
            "redb",
            "kube",
        ],
    );
}

#[test]
fn the_control_plane_links_the_broker_client_only() {
    let linked = links("strait-controlplane");
    assert!(linked.contains("strait-broker-client"), "{linked:?}");
    assert_none_of(
        "strait-controlplane",
        &[
            "strait-broker",
            "redb",
            "strait-gateway",
            "strait-sidecar",
            "strait-proxy-client",
        ],
    );
}

#[test]
fn nothing_below_depends_on_anything_above() {
    // From the bottom: (proto, ca, io), model, runtime, the two clients,
    // the roles; `strait` (CLI and lab) on top.
    let layers: &[&[&str]] = &[
        &["strait-proto", "strait-ca", "strait-io"],
        &["strait-model"],
        &["strait-runtime"],
        &["strait-broker-client", "strait-proxy-client"],
        &[
            "strait-broker",
            "strait-controlplane",
            "strait-gateway",
            "strait-sidecar",
        ],
        &["strait"],
    ];
    for (i, layer) in layers.iter().enumerate() {
        let not_below: Vec<&str> = layers[i..].iter().flat_map(|l| l.iter().copied()).collect();
        for package in *layer {
            let forbidden: Vec<&str> = not_below.iter().copied().filter(|p| p != package).collect();
            assert_none_of(package, &forbidden);
        }
    }
}
