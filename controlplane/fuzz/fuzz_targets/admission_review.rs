//! The injection webhook's port is reachable from inside the cluster, so
//! what it reads is untrusted. The parser must never panic, and whatever
//! it answers is a review that lets the request through with its uid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_controlplane::kube::inject::{InjectConfig, review};

fuzz_target!(|data: &[u8]| {
    let cfg = InjectConfig {
        image: "strait:dev".into(),
        control_plane: "controlplane.strait-system.svc:15012".into(),
    };
    if let Ok(answer) = review(data, &cfg) {
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["allowed"], true);
        let request: serde_json::Value = serde_json::from_slice(data).unwrap();
        assert_eq!(answer["response"]["uid"], request["request"]["uid"]);
    }
});
