//! Join token parsing on untrusted text: never panics, and a parsed token
//! survives a round trip through its wire form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_broker::token::{JoinToken, PREFIX};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = JoinToken::parse(s) {
        let text = token.encode();
        assert!(text.starts_with(PREFIX));
        let again = JoinToken::parse(&text).expect("an encoded token parses");
        assert_eq!(again, token);
        // The canonical form is stable.
        assert_eq!(again.encode(), text);
    }
});
