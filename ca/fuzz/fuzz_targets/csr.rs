//! CSR parsing (PEM and DER) on untrusted bytes: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_ca::Csr;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = Csr::from_der(data) {
        // A CSR that parsed has a usable key and names.
        let _ = (csr.common_name(), csr.sans(), csr.requests_ca());
        assert!(!csr.public_key_der().is_empty());
    }
    let _ = Csr::from_pem(data);
});
