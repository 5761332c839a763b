//! The export annotations on untrusted values: the decision never panics,
//! and an accepted `export-to` list means what it says.
//!
//! The input is lines of `key=value` (a line without '=' is a key with an
//! empty value). The first line is also tried as the value of
//! `strait.io/export` and the second as `strait.io/export-to`.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use strait_model::export::{
    EXPORT_ANNOTATION, EXPORT_TO_ANNOTATION, ObjectKind, ObjectRef, export_decision,
    export_decision_with_service_export,
};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let lines: Vec<&str> = s.split('\n').collect();
    let mut from_pairs = BTreeMap::new();
    for line in &lines {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        from_pairs.insert(k.to_string(), v.to_string());
    }
    let mut keyed = BTreeMap::new();
    if let Some(first) = lines.first() {
        keyed.insert(EXPORT_ANNOTATION.to_string(), first.to_string());
    }
    if let Some(second) = lines.get(1) {
        keyed.insert(EXPORT_TO_ANNOTATION.to_string(), second.to_string());
    }
    let mut to_only = BTreeMap::new();
    to_only.insert(EXPORT_ANNOTATION.to_string(), "true".to_string());
    to_only.insert(EXPORT_TO_ANNOTATION.to_string(), s.to_string());

    let svc = ObjectRef::new(ObjectKind::Service, "ns", "svc");
    let se = ObjectRef::new(ObjectKind::ServiceExport, "ns", "svc");
    for annotations in [&from_pairs, &keyed, &to_only] {
        let decision = export_decision(&svc, annotations);
        match annotations.get(EXPORT_ANNOTATION).map(String::as_str) {
            None | Some("false") => assert_eq!(decision, Ok(None)),
            Some("true") => {}
            Some(_) => assert!(decision.is_err()),
        }
        if let Ok(Some(to)) = &decision {
            match annotations.get(EXPORT_TO_ANNOTATION) {
                None => assert!(to.is_whole_mesh()),
                Some(value) => {
                    assert!(!to.is_whole_mesh());
                    // Every target is one of the listed items, and every item
                    // is a target.
                    let items: Vec<&str> = value.split(',').map(str::trim).collect();
                    let targets: Vec<String> = to.targets().map(|t| t.to_string()).collect();
                    assert_eq!(targets.len(), items.len(), "{value:?} -> {targets:?}");
                    for t in &targets {
                        assert!(items.contains(&t.as_str()), "{value:?} -> {targets:?}");
                    }
                }
            }
        }
        // A ServiceExport always exports (or refuses), never Ok(None).
        let as_export = export_decision(&se, annotations);
        assert!(!matches!(as_export, Ok(None)));
        // With an empty ServiceExport beside it, a service exports unless
        // something is wrong.
        let empty = BTreeMap::new();
        let with = export_decision_with_service_export(&svc, annotations, Some((&se, &empty)));
        assert!(!matches!(with, Ok(None)));
        if let (Ok(Some(a)), Ok(Some(b))) = (&decision, &with) {
            assert_eq!(a, b);
        }
    }
});
