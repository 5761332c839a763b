//! A config file of untrusted text: parsing and judging never panic,
//! every accepted object passes whole-object validation (and every
//! document that fails it is rejected by name), applying the same read
//! twice gives the same config (idempotent), and
//! building the discovery resources from it (services with their ports,
//! endpoints and virtual IPs, policies) never panics and gives the same
//! resources twice.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use strait_ca::TrustDomain;
use strait_controlplane::resources::{ClusterContext, TrustInput, build};
use strait_controlplane::source::{Config, parse_file};
use strait_model::validation::validate_object;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let read: BTreeMap<PathBuf, _> = [(PathBuf::from("fuzz.yaml"), parse_file(text))].into();
    let once = Config::default().apply(&read);
    let twice = once.apply(&read);
    assert_eq!(once, twice);
    for (key, object) in &once.objects {
        assert!(
            validate_object(&object.value).is_ok(),
            "{key} was accepted but does not validate"
        );
    }
    if let Ok(docs) = &read[&PathBuf::from("fuzz.yaml")] {
        // Each document that fails validation is one rejection (at least).
        let invalid = docs.iter().filter(|d| validate_object(d).is_err()).count();
        assert!(once.rejections.len() >= invalid);
    }
    let ctx = ClusterContext {
        cluster: "east".into(),
        network: "net-east".into(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        locality: Some("eu/a".into()),
        egress: None,
        path_normalization: Default::default(),
    };
    let (a, warnings_a) = build(&ctx, &once, &TrustInput::default(), &[]);
    let (b, warnings_b) = build(&ctx, &once, &TrustInput::default(), &[]);
    assert_eq!(warnings_a, warnings_b);
    for type_url in a.type_urls() {
        assert_eq!(a.resources(type_url), b.resources(type_url), "{type_url}");
    }
});
