//! Golden files: the YAML an importing cluster gets for each scenario in
//! `testdata/`. Compared byte for byte; `UPDATE_GOLDEN=1 cargo test -p
//! strait-model --test golden` rewrites them after a deliberate change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn import_objects_match_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for (name, scenario) in common::scenarios() {
        let out = scenario.run();
        let warnings: Vec<String> = out.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(warnings, scenario.warnings, "{name}: warnings");
        let yaml = out.to_yaml().unwrap();
        let path = common::testdata().join(format!("{name}.golden.yaml"));
        if update {
            std::fs::write(&path, &yaml).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
        if want != yaml {
            failures.push(format!(
                "{} differs (run with UPDATE_GOLDEN=1 to accept):\n--- want\n{want}\n--- got\n{yaml}",
                path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_files_parse_back_to_the_same_objects() {
    for (name, scenario) in common::scenarios() {
        let path = common::testdata().join(format!("{name}.golden.yaml"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // reported by the comparison test
        };
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        assert_eq!(docs, scenario.run().to_json_values().unwrap(), "{name}");
    }
}
