//! A `STRAIT_APP_PROBERS` value (from a pod's spec, so untrusted): parsing
//! never panics, and an accepted value survives a round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_model::probe::AppProbers;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(probers) = AppProbers::parse(text) else {
        return;
    };
    assert_eq!(
        AppProbers::parse(&probers.to_json()).as_ref(),
        Ok(&probers),
        "round trip"
    );
});
