//! Tunnel header decoding on untrusted bytes: never panics; a header that
//! decodes re-encodes to a header that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_gateway::tunnel::{decode_header, encode_header};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = decode_header(data) {
        let wire = encode_header(&h);
        let again = decode_header(&wire[4..]).expect("a re-encoded header decodes");
        assert_eq!(again, h);
    }
});
