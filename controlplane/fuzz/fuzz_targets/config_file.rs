//! A config file of untrusted text: parsing and judging never panic, and
//! applying the same read twice gives the same config (idempotent).
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use strait_controlplane::source::{Config, parse_file};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let read: BTreeMap<PathBuf, _> = [(PathBuf::from("fuzz.yaml"), parse_file(text))].into();
    let once = Config::default().apply(&read);
    let twice = once.apply(&read);
    assert_eq!(once, twice);
});
