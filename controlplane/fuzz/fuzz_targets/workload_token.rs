//! Workload bootstrap tokens come from unauthenticated callers (the
//! `authorization` header of a first certificate request). The parser must
//! never panic, and must accept only what the key signed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_controlplane::ca::service::bearer_token;
use strait_controlplane::ca::{Claims, TokenIssuer};
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    // The header around the token is untrusted too.
    let _ = bearer_token(data);
    let issuer = TokenIssuer::from_key(&[9; 32]);
    let now = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
    // Arbitrary text as a token: almost always refused, never a panic.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = issuer.verify(text, now);
    }
    // Arbitrary claims behind a valid MAC: reaches the JSON and name checks.
    let signed = issuer.sign_payload(data);
    match issuer.verify(&signed, now) {
        Ok(claims) => {
            // Only valid claims pass, and they parse the same way alone.
            assert_eq!(Claims::from_json(data).ok(), Some(claims.clone()));
            assert!(claims.exp > 1_000_000);
            let td = strait_ca::TrustDomain::new("td").unwrap();
            assert!(claims.spiffe_id(&td).is_ok());
        }
        Err(_) => {}
    }
    // A valid MAC from another key never verifies.
    let other = TokenIssuer::from_key(&[8; 32]).sign_payload(data);
    assert!(issuer.verify(&other, now).is_err());
});
