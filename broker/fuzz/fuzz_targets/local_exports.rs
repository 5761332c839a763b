//! A config directory's YAML on untrusted text: computing the exports never
//! panics, and every export it returns is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_model::local::local_exports;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = serde_saphyr::from_multiple::<serde_json::Value>(s) else {
        return;
    };
    let out = local_exports(&docs);
    for e in &out.exports {
        if let Err(err) = e.validate() {
            panic!("local_exports returned an invalid export {e:?}: {err}");
        }
    }
});
