//! A request path (from the network, so untrusted) under every
//! normalization mode: never panics; an accepted path is a fixed point
//! (normalizing it again changes nothing), keeps its query as it was, and
//! holds no dot segment, no `\`, no escaped dot, no byte a path may not hold
//! raw, and, where slashes are merged, no `//` (nor, where they are
//! decoded, an escaped slash).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_model::request_path::{PathNormalization, normalize};

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    for mode in PathNormalization::ALL {
        let Ok(once) = normalize(target, mode) else {
            continue;
        };
        assert_eq!(
            normalize(&once, mode).as_deref(),
            Ok(once.as_ref()),
            "{mode}: not idempotent"
        );
        if mode == PathNormalization::None {
            assert_eq!(once, target);
            continue;
        }
        if target == "*" {
            continue;
        }
        let split = |s: &str| match s.find('?') {
            Some(q) => (s[..q].to_owned(), s[q..].to_owned()),
            None => (s.to_owned(), String::new()),
        };
        let (path, query) = split(&once);
        assert_eq!(query, split(target).1, "{mode}: the query changed");
        assert!(path.starts_with('/'), "{mode}: {path:?}");
        assert!(!path.contains('\\'), "{mode}: {path:?}");
        let lower = path.to_ascii_lowercase();
        assert!(!lower.contains("%2e"), "{mode}: {path:?}");
        for segment in path.split('/') {
            assert!(
                segment != "." && segment != ".." && !segment.starts_with(".;")
                    && !segment.starts_with("..;"),
                "{mode}: dot segment in {path:?}"
            );
        }
        assert!(
            path.bytes().all(|b| b.is_ascii_graphic()
                && !b"\"#<>?^`{|}".contains(&b)),
            "{mode}: a raw byte that must be escaped in {path:?}"
        );
        if mode != PathNormalization::Base {
            assert!(!path.contains("//"), "{mode}: {path:?}");
        }
        if mode == PathNormalization::DecodeAndMergeSlashes {
            assert!(
                !lower.contains("%2f") && !lower.contains("%5c"),
                "{mode}: {path:?}"
            );
        }
    }
});
