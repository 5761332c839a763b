//! Server-side apply of imports, by the API server's rules: another field
//! manager cannot change a field strait owns without forcing; when it
//! forces, strait's next apply (forced too) takes the field back, while
//! what the other manager added that strait does not set stays. An
//! import whose export goes at its source is deleted from the API (its
//! ServiceEntry, WorkloadEntry and ServiceImport), and objects that are
//! not strait's stay.
//!
//! What "next apply" is: strait applies when what it imports changes (or
//! a failed write is retried, or it restarts); it does not watch its
//! objects for edits. Here the export's port changes.

use super::*;

const SE: &str = "serviceentries.networking.istio.io";

/// Someone else's ServiceEntry in the same namespace: not labelled as
/// strait's, so never pruned.
const THEIRS: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: theirs, namespace: demo}
spec:
  hosts: [theirs.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
"#;

/// Another manager's apply to strait's echo ServiceEntry: a field strait
/// owns (`location`) and two it does not set (a label, `exportTo`).
const EDIT: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: strait-echo
  namespace: demo
  labels: {team: payments}
spec:
  location: MESH_EXTERNAL
  exportTo: ["."]
"#;

/// The managers of `field` (a `f:` path such as `["f:spec", "f:location"]`)
/// in `object`'s managedFields.
fn owners(object: &Value, field: &[&str]) -> Vec<String> {
    object["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let mut at = &m["fieldsV1"];
            field.iter().all(|f| {
                at = &at[*f];
                !at.is_null()
            })
        })
        .map(|m| m["manager"].as_str().unwrap().to_string())
        .collect()
}

fn get_echo(api: &ApiServer) -> Value {
    api.get(&[SE, "strait-echo", "-n", "demo", "--show-managed-fields"])
        .expect("strait-echo")
}

fn ports(object: &Value) -> Vec<u64> {
    object["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_follow_server_side_apply_and_go_when_unexported() {
    let s = Scratch::new();
    let Some(api) = ApiServer::start(&s.path("kube")) else {
        return;
    };
    api.install_crds();
    api.apply(LOCAL_ECHO);
    api.apply(THEIRS);
    let broker = Broker::start(&s.path("broker"), TD);
    let east = ControlPlane::east_on_kube(&s, &broker, &api.kubeconfig, &[]);
    let west = ControlPlane::start(&s, &broker, "west", "net-west", "192.0.2.20:15443");
    west_echo(&west, 8080, true);

    let entry = api.wait_get(
        &[SE, "strait-echo", "-n", "demo", "--show-managed-fields"],
        WAIT,
        |_| true,
    );
    assert_eq!(entry["spec"]["location"], "MESH_INTERNAL", "{entry}");
    assert_eq!(
        owners(&entry, &["f:spec", "f:location"]),
        ["strait-controlplane"]
    );
    for (kind, name) in [
        ("workloadentries.networking.istio.io", "strait-echo.west"),
        ("serviceimports.multicluster.x-k8s.io", "echo"),
    ] {
        api.wait_get(&[kind, name, "-n", "demo"], WAIT, |_| true);
    }

    // Without forcing, the other manager's change of strait's field is a
    // conflict naming strait's manager; nothing changes.
    let apply = [
        "apply",
        "--server-side",
        "--field-manager=someone-else",
        "-f",
        "-",
    ];
    let (code, out, err) = api.kubectl_with(&apply, Some(EDIT));
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("conflict") && err.contains("strait-controlplane"),
        "{err}"
    );
    assert_eq!(get_echo(&api)["spec"]["location"], "MESH_INTERNAL");
    // Forced, it takes the field over, and adds its own.
    let forced = [&apply[..], &["--force-conflicts"]].concat();
    let (code, out, err) = api.kubectl_with(&forced, Some(EDIT));
    assert_eq!(code, 0, "{out}{err}");
    let edited = get_echo(&api);
    assert_eq!(edited["spec"]["location"], "MESH_EXTERNAL");
    assert_eq!(owners(&edited, &["f:spec", "f:location"]), ["someone-else"]);

    // Strait's next apply: the export's port changes.
    west_echo(&west, 8081, true);
    let applied = api.wait_get(
        &[SE, "strait-echo", "-n", "demo", "--show-managed-fields"],
        WAIT,
        |v| ports(v) == [8081],
    );
    // Its field back (forced), owned by strait alone; the port it no
    // longer applies gone.
    assert_eq!(applied["spec"]["location"], "MESH_INTERNAL", "{applied}");
    assert_eq!(
        owners(&applied, &["f:spec", "f:location"]),
        ["strait-controlplane"]
    );
    // What strait does not set is kept, with its owner.
    assert_eq!(
        applied["metadata"]["labels"]["team"], "payments",
        "{applied}"
    );
    assert_eq!(
        applied["spec"]["exportTo"],
        serde_json::json!(["."]),
        "{applied}"
    );
    assert_eq!(
        owners(&applied, &["f:metadata", "f:labels", "f:team"]),
        ["someone-else"]
    );
    assert_eq!(
        applied["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "strait"
    );

    // Unexported at its source: every import object deleted from east's
    // API; the local Service and someone else's ServiceEntry stay.
    west_echo(&west, 8081, false);
    for (kind, name) in [
        (SE, "strait-echo"),
        ("workloadentries.networking.istio.io", "strait-echo.west"),
        ("serviceimports.multicluster.x-k8s.io", "echo"),
    ] {
        wait_gone(&api, kind, "demo", name, WAIT);
    }
    assert!(api.get(&[SE, "theirs", "-n", "demo"]).is_some());
    assert!(api.get(&["service", "echo", "-n", "demo"]).is_some());
    until_logged(&east, "the prune", |l| {
        l.contains("imports applied to the Kubernetes API") && l.contains("deleted=3")
    })
    .await;
}
