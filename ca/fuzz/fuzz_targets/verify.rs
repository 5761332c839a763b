//! Chain verification over untrusted certificate bytes: never panics. The
//! input is split into a chain at 0xFF 0xFF markers and checked against a
//! fixed bundle.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strait_ca::testing::TestPki;
use strait_ca::{TrustBundle, verify_svid};

fn bundle() -> &'static TrustBundle {
    static B: OnceLock<TrustBundle> = OnceLock::new();
    B.get_or_init(|| TestPki::new("fuzz.example").bundle())
}

fuzz_target!(|data: &[u8]| {
    let chain: Vec<Vec<u8>> = data
        .split(|b| *b == 0xff)
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let _ = verify_svid(&chain, bundle(), time::OffsetDateTime::now_utc());
});
