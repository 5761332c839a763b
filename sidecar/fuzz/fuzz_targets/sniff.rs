//! Telling HTTP from other traffic by a redirected connection's first
//! bytes: never panics, and a verdict never changes as more bytes come.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_sidecar::transparent::{Sniffed, classify};

fuzz_target!(|data: &[u8]| {
    let mut verdict = Sniffed::NeedMore;
    for end in 0..=data.len().min(64) {
        let v = classify(&data[..end]);
        if verdict != Sniffed::NeedMore {
            assert_eq!(v, verdict);
        }
        verdict = v;
    }
});
