//! The ClientHello reader on untrusted bytes: never panics, and feeding the
//! same bytes in two pieces gives the same answer as feeding them at once
//! (the reader is incremental: a prefix is either "need more" or already
//! decided).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_gateway::hello::{Progress, parse};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Progress::Done(h)) = &whole {
        if let Some(name) = &h.server_name {
            assert!(!name.is_empty() && name.len() <= 253);
        }
    }
    // Any prefix that is already decided must agree with the whole.
    let cut = data.len() / 2;
    match parse(&data[..cut]) {
        Ok(Progress::NeedMore) => {}
        decided => {
            if let (Ok(Progress::Done(a)), Ok(Progress::Done(b))) = (&decided, &whole) {
                assert_eq!(a, b);
            }
        }
    }
});
