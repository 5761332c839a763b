//! Istio's SNI codec: never panics, and a parsed name formats back to
//! exactly the input (so every reader of the codec agrees on what a name
//! means).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_model::sni;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = sni::parse(s) {
        assert!(parsed.port != 0);
        assert!(!parsed.host.is_empty());
        assert!(parsed.subset.is_none_or(|s| !s.is_empty()));
        let again = sni::format(parsed.port, parsed.subset, parsed.host);
        assert_eq!(again, s);
        assert_eq!(sni::parse(&again), Ok(parsed));
    }
});
