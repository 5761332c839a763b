//! Compiles every `.proto` under this crate with protox (pure Rust, no system
//! `protoc`) and generates prost messages plus tonic clients and servers.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut protos = Vec::new();
    collect_protos(&root, &root, &mut protos)?;
    protos.sort();
    // Directories too, so that a new .proto file triggers a rebuild (cargo
    // scans a directory given here for any change).
    for dir in ["istio", "strait"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = protox::compile(&protos, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

/// Every `.proto` file below `dir`, as a path relative to `root` (the include
/// root, so that package paths match import paths).
fn collect_protos(
    root: &Path,
    dir: &Path,
    out: &mut Vec<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "src" && name != "target" {
                collect_protos(root, &path, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}
