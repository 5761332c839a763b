//! Trust bundle parsing (PEM or SPIFFE JSON) on untrusted bytes: never
//! panics, and a parsed bundle survives a round trip through both formats.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_ca::TrustBundle;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = TrustBundle::parse(data, None) {
        let pem = TrustBundle::parse(bundle.to_pem().as_bytes(), None).expect("PEM round trip");
        assert_eq!(pem.roots(), bundle.roots());
        if let Ok(json) = bundle.to_spiffe_json() {
            let back = TrustBundle::parse(json.as_bytes(), None).expect("JSON round trip");
            assert_eq!(back.roots(), bundle.roots());
        }
    }
});
