//! The inbound side's reading of Istio's SNI: never panics; what it
//! parses formats to a name that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_sidecar::{istio_sni, parse_sni};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(parsed) = parse_sni(s) {
        let (port, subset, host) = parsed;
        let again = istio_sni(port, subset, host);
        assert_eq!(parse_sni(&again), Some(parsed));
    }
});
