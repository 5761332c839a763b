//! The roots ConfigMap (`strait-ca-root-cert`) and the injection
//! webhook's caBundle through a root rotation driven by `straitctl trust
//! rotate-root`: the old root alone, then both roots while both are
//! trusted (also in a namespace created meanwhile), then the new root
//! alone after `finish`.

use std::collections::BTreeSet;

use base64::Engine;

use super::*;
use crate::common::{all_clusters, free_port};

/// Namespaces of east (`default` is the API server's own).
const NAMESPACES: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo}
"#;

/// The roots the ConfigMap of `ns` holds (as [`pem_certs`]).
fn published(api: &ApiServer, ns: &str) -> Option<BTreeSet<String>> {
    let cm = api.get(&["configmap", "strait-ca-root-cert", "-n", ns])?;
    Some(pem_certs(cm["data"]["root-cert.pem"].as_str()?))
}

/// The roots the webhook's caBundle holds.
fn ca_bundle(api: &ApiServer) -> Option<BTreeSet<String>> {
    let mwc = api.get(&["mutatingwebhookconfiguration", "strait-sidecar-injector"])?;
    let b64 = mwc["webhooks"][0]["clientConfig"]["caBundle"].as_str()?;
    let pem = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(pem_certs(&String::from_utf8(pem).ok()?))
}

/// Waits until every namespace of `namespaces` and the webhook publish
/// exactly `roots`.
#[track_caller]
fn until_published(api: &ApiServer, namespaces: &[&str], roots: &BTreeSet<String>, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now: Vec<_> = namespaces.iter().map(|ns| published(api, ns)).collect();
        let bundle = ca_bundle(api);
        if now.iter().all(|p| p.as_ref() == Some(roots)) && bundle.as_ref() == Some(roots) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not published within {WAIT:?}: {} roots wanted; namespaces {namespaces:?} hold {:?}, the webhook {:?}",
            roots.len(),
            now.iter()
                .map(|p| p.as_ref().map(|r| r.len()))
                .collect::<Vec<_>>(),
            bundle.map(|b| b.len())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roots_config_map_follows_a_root_rotation() {
    let s = Scratch::new();
    let Some(api) = ApiServer::start(&s.path("kube")) else {
        return;
    };
    api.apply(NAMESPACES);
    for d in manifest(&["MutatingWebhookConfiguration"]) {
        apply_value(&api, &d);
    }
    let broker = Broker::start(&s.path("broker"), TD);
    let east = ControlPlane::east_on_kube(
        &s,
        &broker,
        &api.kubeconfig,
        &[
            "--inject-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            // Leaves live 2 s at most: `finish` is accepted 2 s after
            // east moved to its new intermediate.
            "--max-cert-ttl".into(),
            "2s".into(),
        ],
    );
    let namespaces = ["default", "demo", "bookinfo"];
    let old =
        pem_certs(&std::fs::read_to_string(east.state.join("cacerts/root-cert.pem")).unwrap());
    assert_eq!(old.len(), 1);
    until_published(&api, &namespaces, &old, "the old root");

    broker.ctl(&["trust", "rotate-root", "begin"]).ok();
    broker
        .wait_rotation("bundle acknowledged", WAIT, |v| {
            all_clusters(v, "bundle_acknowledged")
        })
        .await;
    let new = pem_certs(&std::fs::read_to_string(broker.rotation_root()).unwrap());
    assert_eq!(new.len(), 1);
    assert_ne!(new, old);
    let both: BTreeSet<String> = old.union(&new).cloned().collect();
    until_published(&api, &namespaces, &both, "both roots while distributing");
    // A namespace made during the rotation gets both too.
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n");
    let all = ["default", "demo", "bookinfo", "late"];
    until_published(&api, &all, &both, "both roots in a new namespace");

    broker.ctl(&["trust", "rotate-root", "advance"]).ok();
    broker
        .wait_rotation("intermediate re-issued", WAIT, |v| {
            all_clusters(v, "on_target")
        })
        .await;
    // Both are still trusted: still both published.
    until_published(&api, &all, &both, "both roots while reissuing");

    // Finish, once east's leaves under the old root have expired.
    let deadline = Instant::now() + WAIT;
    loop {
        let run = broker.ctl(&["trust", "rotate-root", "finish"]);
        if run.code == 0 {
            break;
        }
        assert!(
            run.stderr.contains("wait, or finish with --force") && Instant::now() < deadline,
            "finish: {}",
            run.stderr
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    broker
        .wait_rotation("idle on the new root", WAIT, |v| v["stage"] == "idle")
        .await;
    until_published(&api, &all, &new, "the new root alone after finish");
    assert!(
        !east.log().contains("mesh roots not published"),
        "{}",
        east.log()
    );
}
