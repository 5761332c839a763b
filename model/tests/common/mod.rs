//! Scenarios shared by the golden and schema tests: each
//! `testdata/<name>.input.yaml` holds an importer, the exports it receives,
//! its local Services and the warnings expected; `<name>.golden.yaml` holds
//! the objects it must get.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;
use strait_model::imports::{ImportObjects, import_objects};
use strait_model::mesh::{ClusterInfo, LocalService, RemoteService};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub importer: ClusterInfo,
    #[serde(default)]
    pub remote: Vec<RemoteService>,
    #[serde(default)]
    pub local: Vec<LocalService>,
    /// The Display form of every expected warning, in order.
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl Scenario {
    pub fn run(&self) -> ImportObjects {
        import_objects(&self.importer, &self.remote, &self.local)
    }
}

pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// Every scenario, by name, sorted.
pub fn scenarios() -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(testdata())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".input.yaml"))
        .collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".input.yaml")
            .to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let scenario: Scenario =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.push((name, scenario));
    }
    assert!(!out.is_empty(), "no scenarios in {}", testdata().display());
    out
}
