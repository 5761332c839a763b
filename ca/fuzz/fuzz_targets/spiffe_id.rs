//! SPIFFE ID parsing: never panics, and whatever parses re-parses to itself
//! with consistent parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_ca::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s);
        let again = SpiffeId::parse(id.as_str()).expect("a parsed ID re-parses");
        assert_eq!(again, id);
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain_str(), id.path()),
            s
        );
        let rebuilt =
            SpiffeId::from_segments(&id.trust_domain(), &id.segments().collect::<Vec<_>>())
                .expect("segments of a valid ID are valid");
        assert_eq!(rebuilt, id);
    }
});
