use serde_json::json;

use super::*;

fn errors(doc: &Value) -> Vec<String> {
    match validate_object(doc) {
        Ok(()) => Vec::new(),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

fn service(spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "demo",
            "annotations": {"strait.io/export": "true"}},
        "spec": spec})
}

#[test]
fn a_good_service_passes() {
    let doc = service(json!({
        "selector": {"app": "echo", "app.kubernetes.io/version": "v1"},
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10"],
        "ports": [
            {"name": "http", "port": 8080, "targetPort": 9090, "protocol": "TCP",
             "appProtocol": "kubernetes.io/h2c"},
            {"name": "metrics", "port": 9100, "targetPort": "metrics"},
            {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}
        ]
    }));
    assert_eq!(errors(&doc), Vec::<String>::new());
}

#[test]
fn a_port_out_of_range_is_named_with_its_value() {
    let doc = service(json!({"selector": {"app": "echo"},
        "ports": [{"name": "http", "port": 99999}]}));
    assert_eq!(
        errors(&doc),
        ["spec.ports[0].port: Invalid value: 99999: must be between 1 and 65535, inclusive"]
    );
    for bad in [
        json!(0),
        json!(-1),
        json!(65536),
        json!(1e20),
        json!(18446744073709551615u64),
    ] {
        let doc = service(json!({"ports": [{"port": bad}]}));
        assert_eq!(errors(&doc).len(), 1, "{bad}");
    }
    let doc = service(json!({"ports": [{"port": "8080"}]}));
    assert_eq!(
        errors(&doc),
        ["spec.ports[0].port: Invalid value: \"8080\": must be an integer"]
    );
    let doc = service(json!({"ports": [{"port": 80.5}]}));
    assert!(
        errors(&doc)[0].contains("must be an integer"),
        "{:?}",
        errors(&doc)
    );
}

#[test]
fn every_bad_service_field_is_reported() {
    let doc = service(json!({
        "type": "Magic",
        "clusterIP": "10.96.0.300",
        "selector": {"app": "-bad-", "bad key!": "x"},
        "ports": [
            {"name": "http", "port": 80, "targetPort": 70000, "protocol": "tcp"},
            {"name": "http", "port": 81, "targetPort": "HTTP--x", "appProtocol": "a/b/c"},
            {"port": 82},
            {"name": "Web_1", "port": 80, "protocol": "TCP", "nodePort": 99999}
        ]
    }));
    let got = errors(&doc);
    let want = [
        "spec.type: Unsupported value: \"Magic\"",
        "spec.clusterIP: Invalid value: \"10.96.0.300\"",
        "spec.ports[0].protocol: Unsupported value: \"tcp\": supported values: \"TCP\", \"UDP\", \"SCTP\"",
        "spec.ports[0].targetPort: Invalid value: 70000",
        "spec.ports[1].name: Duplicate value: \"http\"",
        "spec.ports[1].targetPort: Invalid value: \"HTTP--x\"",
        "spec.ports[1].appProtocol: Invalid value: \"a/b/c\"",
        "spec.ports[2].name: Required value",
        "spec.ports[3].name: Invalid value: \"Web_1\"",
        "spec.ports[3].nodePort: Invalid value: 99999",
        "spec.selector[app]: Invalid value: \"-bad-\"",
        "spec.selector: Invalid value: \"bad key!\"",
    ];
    for w in want {
        assert!(
            got.iter().any(|g| g.starts_with(w)),
            "missing {w:?} in {got:#?}"
        );
    }
    // Port 80 twice with the same protocol: the second is a duplicate
    // (ports[0] is "tcp", not supported, so the pair differs).
    let dup = service(json!({"ports": [
        {"name": "a", "port": 80}, {"name": "b", "port": 80, "protocol": "TCP"}]}));
    assert_eq!(
        errors(&dup),
        ["spec.ports[1].port: Duplicate value: 80/TCP"]
    );
}

#[test]
fn ports_are_required_unless_headless_or_external_name() {
    assert_eq!(
        errors(&service(json!({"selector": {"app": "echo"}}))),
        ["spec.ports: Required value"]
    );
    assert_eq!(
        errors(&service(json!({"ports": []}))),
        ["spec.ports: Required value"]
    );
    assert!(errors(&service(json!({"clusterIP": "None"}))).is_empty());
    assert_eq!(
        errors(&service(json!({"type": "ExternalName"}))),
        ["spec.externalName: Required value"]
    );
    assert!(
        errors(&service(
            json!({"type": "ExternalName", "externalName": "db.example.com."})
        ))
        .is_empty()
    );
    assert_eq!(errors(&service(json!({"ports": "80"}))).len(), 1);
}

#[test]
fn names_follow_the_rule_of_their_kind() {
    let mut doc = service(json!({"ports": [{"port": 80}]}));
    doc["metadata"]["name"] = json!("1echo");
    assert!(
        errors(&doc)[0].starts_with("metadata.name: Invalid value: \"1echo\": a DNS-1035 label"),
        "{:?}",
        errors(&doc)
    );
    // A subdomain is fine for a custom resource, not for a Service.
    doc["metadata"]["name"] = json!("echo.v1");
    assert_eq!(errors(&doc).len(), 1);
    let we = json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "echo.v1", "namespace": "demo"}, "spec": {"address": "10.0.0.1"}});
    assert!(errors(&we).is_empty(), "{:?}", errors(&we));
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}});
    assert_eq!(errors(&ns).len(), 1);
    for (meta, want) in [
        (
            json!({"namespace": "demo"}),
            "metadata.name: Required value",
        ),
        (json!({"name": ""}), "metadata.name: Required value"),
        (
            json!({"name": 7}),
            "metadata.name: Invalid value: 7: must be a string",
        ),
        (
            json!({"name": "x", "namespace": "Demo"}),
            "metadata.namespace: Invalid value: \"Demo\"",
        ),
        (
            json!({"name": "x", "labels": {"a": 1}}),
            "metadata.labels[a]: Invalid value: 1: must be a string",
        ),
        (
            json!({"name": "x", "labels": {"a": "b c"}}),
            "metadata.labels[a]: Invalid value: \"b c\"",
        ),
        (
            json!({"name": "x", "labels": ["a"]}),
            "metadata.labels: Invalid value: [\"a\"]: must be a mapping",
        ),
        (
            json!({"name": "x", "annotations": {"-x": "1"}}),
            "metadata.annotations: Invalid value: \"-x\"",
        ),
        (
            json!({"name": "x", "annotations": {"strait.io/export": true}}),
            "metadata.annotations[strait.io/export]: Invalid value: true: must be a string",
        ),
        (
            json!("x"),
            "metadata: Invalid value: \"x\": must be a mapping",
        ),
    ] {
        let doc = json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": meta, "spec": {"address": "10.0.0.1"}});
        let got = errors(&doc);
        assert!(
            got.iter().any(|g| g.starts_with(want)),
            "{meta}: missing {want:?} in {got:?}"
        );
    }
    let big = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "x", "annotations": {"a": "x".repeat(ANNOTATIONS_MAX_BYTES)}}});
    assert_eq!(
        errors(&big),
        ["metadata.annotations: Invalid value: 262145 bytes: may not be more than 262144 bytes"]
    );
}

#[test]
fn strait_annotations_are_checked() {
    let mut doc = service(json!({"ports": [{"port": 80}]}));
    doc["metadata"]["annotations"] = json!({"strait.io/export": "yes"});
    assert_eq!(
        errors(&doc),
        [
            "metadata.annotations[strait.io/export]: Invalid value: \"yes\": must be \"true\" or \"false\""
        ]
    );
    doc["metadata"]["annotations"] =
        json!({"strait.io/export": "true", "strait.io/export-to": "west,,east"});
    let got = errors(&doc);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("annotation strait.io/export-to=\"west,,east\": item 2 is empty"),
        "{got:?}"
    );
    let we = json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "w", "annotations": {"strait.io/inbound-port": "70000"}},
        "spec": {"address": "10.0.0.1"}});
    assert_eq!(
        errors(&we),
        [
            "metadata.annotations[strait.io/inbound-port]: Invalid value: \"70000\": must be a port number between 1 and 65535, inclusive"
        ]
    );
}

fn workload(spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "echo-v1", "namespace": "demo"}, "spec": spec})
}

#[test]
fn workload_entries() {
    for good in [
        json!({"address": "10.0.0.1", "ports": {"http": 8080, "HTTP-2": 1}, "labels": {"app": "echo"},
            "weight": 5, "locality": "eu/zone-a", "serviceAccount": "echo", "network": "net-a"}),
        json!({"address": "gw.example.com"}),
        json!({"address": "unix:///var/run/app.sock"}),
        json!({"network": "net-b"}),
    ] {
        assert!(
            errors(&workload(good.clone())).is_empty(),
            "{good}: {:?}",
            errors(&workload(good.clone()))
        );
    }
    for (bad, want) in [
        (json!({}), "spec.address: Required value"),
        (json!({"address": ""}), "spec.address: Required value"),
        (
            json!({"address": "not an address!"}),
            "spec.address: Invalid value: \"not an address!\"",
        ),
        (
            json!({"address": 10}),
            "spec.address: Invalid value: 10: must be a string",
        ),
        (
            json!({"address": "10.0.0.1", "ports": {"http": 99999}}),
            "spec.ports[http]: Invalid value: 99999",
        ),
        (
            json!({"address": "10.0.0.1", "ports": {"bad_name": 80}}),
            "spec.ports: Invalid value: \"bad_name\"",
        ),
        (
            json!({"address": "10.0.0.1", "ports": [80]}),
            "spec.ports: Invalid value: [80]: must be a mapping",
        ),
        (
            json!({"address": "unix:///a.sock", "ports": {"http": 80}}),
            "spec.ports: Invalid value",
        ),
        (
            json!({"address": "10.0.0.1", "weight": -1}),
            "spec.weight: Invalid value: -1",
        ),
        (
            json!({"address": "10.0.0.1", "weight": 4294967296u64}),
            "spec.weight: Invalid value",
        ),
        (
            json!({"address": "10.0.0.1", "locality": "a//b"}),
            "spec.locality: Invalid value: \"a//b\"",
        ),
        (
            json!({"address": "10.0.0.1", "labels": {"app": "a b"}}),
            "spec.labels[app]: Invalid value",
        ),
        (
            json!({"address": "10.0.0.1", "serviceAccount": ["x"]}),
            "spec.serviceAccount: Invalid value",
        ),
        (
            json!("10.0.0.1"),
            "spec: Invalid value: \"10.0.0.1\": must be a mapping",
        ),
    ] {
        let got = errors(&workload(bad.clone()));
        assert!(
            got.iter().any(|g| g.starts_with(want)),
            "{bad}: missing {want:?} in {got:?}"
        );
    }
}

fn entry(spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "strait-echo", "namespace": "demo"}, "spec": spec})
}

#[test]
fn service_entries() {
    let good = entry(json!({
        "hosts": ["echo.demo.svc.clusterset.local", "*.example.com"],
        "addresses": ["240.241.0.1", "10.0.0.0/8"],
        "ports": [{"name": "http", "number": 8080, "protocol": "HTTP", "targetPort": 9090},
                  {"name": "grpc", "number": 9000, "protocol": "grpc"}],
        "resolution": "STATIC", "location": "MESH_INTERNAL",
        "subjectAltNames": ["spiffe://cluster.local/ns/demo/sa/echo"],
        "endpoints": [{"address": "192.0.2.20", "ports": {"http": 15443}, "network": "net-west",
                       "labels": {"strait.io/cluster": "west"}}]
    }));
    assert!(errors(&good).is_empty(), "{:?}", errors(&good));
    for (spec, want) in [
        (json!({}), "spec.hosts: Required value"),
        (json!({"hosts": []}), "spec.hosts: Required value"),
        (
            json!({"hosts": ["*"]}),
            "spec.hosts[0]: Invalid value: \"*\"",
        ),
        (
            json!({"hosts": ["a..b"]}),
            "spec.hosts[0]: Invalid value: \"a..b\"",
        ),
        (
            json!({"hosts": ["a"], "addresses": ["10.0.0.0/40"]}),
            "spec.addresses[0]: Invalid value",
        ),
        (
            json!({"hosts": ["a"], "ports": [{"name": "http", "number": 0}]}),
            "spec.ports[0].number: Invalid value: 0",
        ),
        (
            json!({"hosts": ["a"], "ports": [{"name": "http"}]}),
            "spec.ports[0].number: Required value",
        ),
        (
            json!({"hosts": ["a"], "ports": [{"number": 80}]}),
            "spec.ports[0].name: Invalid value: \"\"",
        ),
        (
            json!({"hosts": ["a"], "ports": [{"name": "a", "number": 80}, {"name": "a", "number": 80}]}),
            "spec.ports[1].name: Duplicate value: \"a\"",
        ),
        (
            json!({"hosts": ["a"], "ports": [{"name": "a", "number": 80}, {"name": "b", "number": 80}]}),
            "spec.ports[1].number: Duplicate value: 80",
        ),
        (
            json!({"hosts": ["a"], "ports": [{"name": "a", "number": 80, "protocol": "QUIC"}]}),
            "spec.ports[0].protocol: Unsupported value: \"QUIC\"",
        ),
        (
            json!({"hosts": ["a"], "resolution": "dns"}),
            "spec.resolution: Unsupported value: \"dns\"",
        ),
        (
            json!({"hosts": ["a"], "location": "OUTSIDE"}),
            "spec.location: Unsupported value",
        ),
        (
            json!({"hosts": ["a"], "ports": [{"name": "http", "number": 80}],
            "endpoints": [{"address": "10.0.0.1", "ports": {"grpc": 80}}]}),
            "spec.endpoints[0].ports: Invalid value: \"grpc\": is not a port of the ServiceEntry",
        ),
        (
            json!({"hosts": ["a"], "endpoints": [{}]}),
            "spec.endpoints[0].address: Required value",
        ),
    ] {
        let got = errors(&entry(spec.clone()));
        assert!(
            got.iter().any(|g| g.starts_with(want)),
            "{spec}: missing {want:?} in {got:?}"
        );
    }
}

#[test]
fn policies_use_the_istio_rules() {
    let good = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "demo"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}});
    assert!(errors(&good).is_empty(), "{:?}", errors(&good));
    let mut bad = good.clone();
    bad["spec"]["action"] = json!("MAYBE");
    let got = errors(&bad);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("spec"), "{got:?}");
    let no_spec = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "demo"}});
    assert!(errors(&no_spec).is_empty(), "{:?}", errors(&no_spec));
}

#[test]
fn service_imports() {
    let si = json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
        "metadata": {"name": "echo", "namespace": "demo"},
        "spec": {"type": "ClusterSetIP", "ips": ["240.241.0.1", "x"]}});
    assert_eq!(errors(&si).len(), 1, "{:?}", errors(&si));
}

#[test]
fn long_values_are_cut_in_messages() {
    let doc = workload(json!({"address": "a_".repeat(1000)}));
    let got = errors(&doc);
    assert!(got[0].len() < 400, "{}", got[0]);
    assert!(got[0].contains("..."), "{}", got[0]);
}
