//! The injection webhook's port is reachable from inside the cluster, so
//! what it reads is untrusted. The parser must never panic, and whatever
//! it answers is a review that lets the request through with its uid; the
//! sidecar's probes it writes (transparent pods) are ones the sidecar
//! reads back.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use strait_controlplane::kube::inject::{InjectConfig, Interception, review};
use strait_model::probe::{AppProbers, ENV};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the configured interception, the rest is the
    // review.
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let cfg = InjectConfig {
        image: "strait:dev".into(),
        control_plane: "controlplane.strait-system.svc:15012".into(),
        interception: if mode % 2 == 0 {
            Interception::Explicit
        } else {
            Interception::Transparent
        },
    };
    let Ok(answer) = review(body, &cfg) else {
        return;
    };
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["allowed"], true);
    let request: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(answer["response"]["uid"], request["request"]["uid"]);
    let Some(patch) = answer["response"]["patch"].as_str() else {
        return;
    };
    let patch = base64::engine::general_purpose::STANDARD.decode(patch).unwrap();
    let ops: Vec<serde_json::Value> = serde_json::from_slice(&patch).unwrap();
    for op in &ops {
        for env in op["value"]["env"].as_array().into_iter().flatten() {
            if env["name"] == ENV {
                // As Kubernetes hands it over: "$$" is "$".
                let value = env["value"].as_str().unwrap().replace("$$", "$");
                AppProbers::parse(&value).unwrap();
            }
        }
    }
});
