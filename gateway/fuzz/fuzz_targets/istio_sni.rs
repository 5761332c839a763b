//! Istio SNI parsing: never panics; a parsed target re-formats to the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_gateway::route::parse_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = parse_target(s) {
        let again = format!(
            "outbound_.{}_.{}_.{}",
            t.port,
            t.subset.as_deref().unwrap_or(""),
            t.host
        );
        assert_eq!(again, s);
    }
});
