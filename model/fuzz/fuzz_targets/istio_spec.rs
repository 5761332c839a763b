//! An Istio `spec` of untrusted JSON: parsing and validating never panics,
//! whatever the kind, and an accepted spec survives a round trip through
//! its serde form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_model::istio::{IstioSpec, KINDS, parse};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the kind, the rest is the spec.
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(json) else {
        return;
    };
    let kind = KINDS[usize::from(selector) % KINDS.len()];
    let Ok(parsed) = parse(kind, &spec) else {
        return;
    };
    let again = match &parsed {
        IstioSpec::VirtualService(s) => serde_json::to_value(s),
        IstioSpec::DestinationRule(s) => serde_json::to_value(s),
        IstioSpec::PeerAuthentication(s) => serde_json::to_value(s),
        IstioSpec::AuthorizationPolicy(s) => serde_json::to_value(s),
        IstioSpec::Sidecar(s) => serde_json::to_value(s),
    };
    let Ok(again) = again else {
        panic!("an accepted {kind} spec does not serialize");
    };
    assert_eq!(
        parse(kind, &again).as_ref(),
        Ok(&parsed),
        "{kind} round trip"
    );
});
