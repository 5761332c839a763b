//! The generated objects must pass the CRD schemas of Istio and of the MCS
//! API, read from `tests/testdata/crds` (copies of the upstream CRDs,
//! pinned to the commits `SOURCES.txt` there names).
//!
//! The API server prunes unknown fields instead of rejecting them, so plain
//! JSON Schema validation would let a misspelled field through. Before
//! compiling, every object schema with `properties` (and neither
//! `additionalProperties` nor `x-kubernetes-preserve-unknown-fields: true`)
//! gets `additionalProperties: false`; the top level gets `apiVersion` and
//! `kind` pinned and a `metadata` schema with Kubernetes' name and label
//! rules (other metadata fields are allowed).
//!
//! CEL rules (`x-kubernetes-validations`) are not JSON Schema. Each rule met
//! in the schemas of the generated kinds is translated into an equivalent
//! (or stricter) JSON Schema fragment from a table below, or checked in Rust
//! (uniqueness rules); a rule the table does not know fails the test, so a
//! new Istio rule cannot slip by unnoticed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use jsonschema::{Draft, Validator};
use serde_json::{Value, json};
use strait_ca::{ClusterName, TrustDomain};
use strait_model::imports::import_objects;
use strait_model::mesh::{
    ClusterInfo, ExportedService, GatewayAddress, LocalService, LocalityEndpoints, Network,
    Protocol, RemoteService, ServiceKey, ServicePort,
};

fn crd_testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/crds")
}

fn load_documents(file: &str) -> Vec<Value> {
    let path = crd_testdata().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `x-kubernetes-validations` rules (whitespace collapsed) and what stands
/// for them here.
enum Cel {
    /// An equivalent or stricter JSON Schema fragment, added with `allOf`.
    Schema(Value),
    /// Checked in Rust by [`check_uniqueness`].
    Rust,
}

fn cel_table() -> Vec<(&'static str, Cel)> {
    let port_name = "^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$";
    // strait never writes Unix socket addresses; forbidding them is stricter
    // than the three UDS rules and makes them hold.
    let no_uds = json!({"properties": {"address": {"not": {"pattern": "^unix://"}}}});
    vec![
        (
            "0 < self && self <= 65535",
            Cel::Schema(json!({"minimum": 1, "maximum": 65535})),
        ),
        (
            r#"self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))"#,
            Cel::Schema(json!({"propertyNames": {"maxLength": 62, "pattern": port_name}})),
        ),
        (
            r#"self != "*""#,
            Cel::Schema(json!({"not": {"const": "*"}})),
        ),
        (
            r#"!self.contains("*")"#,
            Cel::Schema(json!({"not": {"pattern": "\\*"}})),
        ),
        (
            "has(self.address) || has(self.network)",
            Cel::Schema(json!({"anyOf": [{"required": ["address"]}, {"required": ["network"]}]})),
        ),
        (
            "(has(self.workloadSelector) ? 1 : 0) + (has(self.endpoints) ? 1 : 0) <= 1",
            Cel::Schema(json!({"not": {"required": ["workloadSelector", "endpoints"]}})),
        ),
        (
            r#"((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true"#,
            Cel::Schema(json!({"anyOf": [
                {"not": {"required": ["endpoints"]}},
                {"required": ["resolution"], "properties": {"resolution": {"not": {"const": "NONE"}}}}
            ]})),
        ),
        (
            r#"((has(self.resolution) ? self.resolution : "") == "DNS_ROUND_ROBIN") ? ((has(self.endpoints) ? self.endpoints : []).size() <= 1) : true"#,
            Cel::Schema(json!({"anyOf": [
                {"not": {"required": ["resolution"]}},
                {"properties": {"resolution": {"not": {"const": "DNS_ROUND_ROBIN"}}}},
                {"properties": {"endpoints": {"maxItems": 1}}}
            ]})),
        ),
        (
            r#"!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && !((has(self.resolution) ? self.resolution : "NONE") in ["STATIC", "NONE"]))"#,
            Cel::Schema(json!({"anyOf": [
                {"properties": {"addresses": {"items": {"not": {"pattern": "/"}}}}},
                {"not": {"required": ["resolution"]}},
                {"properties": {"resolution": {"enum": ["STATIC", "NONE"]}}}
            ]})),
        ),
        (
            "self.all(l1, self.exists_one(l2, l1.number == l2.number))",
            Cel::Rust,
        ),
        (
            r#"self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true"#,
            Cel::Schema(json!({"not": {"pattern": "^unix://"}})),
        ),
        (
            r#"self.startsWith("unix://") ? !self.endsWith("/") : true"#,
            Cel::Schema(json!({"not": {"pattern": "^unix://"}})),
        ),
        (
            r#"(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true"#,
            Cel::Schema(no_uds),
        ),
    ]
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Makes a CRD schema strict (see the module doc), translating CEL rules.
/// Unknown rules are collected in `unknown`.
fn tighten(node: &mut Value, table: &[(&str, Cel)], unknown: &mut BTreeSet<String>) {
    let Some(obj) = node.as_object_mut() else {
        return;
    };
    // Children first, so that the fragments added below stay as written.
    if let Some(Value::Object(props)) = obj.get_mut("properties") {
        for child in props.values_mut() {
            tighten(child, table, unknown);
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(child) = obj.get_mut(key) {
            tighten(child, table, unknown);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(list)) = obj.get_mut(key) {
            for child in list {
                tighten(child, table, unknown);
            }
        }
    }
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if obj.contains_key("properties") && !preserve && !obj.contains_key("additionalProperties") {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    let rules: Vec<String> = obj
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("rule").and_then(Value::as_str))
        .map(collapse)
        .collect();
    for rule in rules {
        match table.iter().find(|(r, _)| collapse(r) == rule) {
            Some((_, Cel::Schema(fragment))) => {
                let all = obj.entry("allOf").or_insert_with(|| json!([]));
                if let Value::Array(list) = all {
                    list.push(fragment.clone());
                }
            }
            Some((_, Cel::Rust)) => {}
            None => {
                unknown.insert(rule);
            }
        }
    }
}

fn metadata_schema() -> Value {
    let label = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
    json!({
        "type": "object",
        "required": ["name", "namespace"],
        "properties": {
            "name": {"type": "string", "maxLength": 253,
                     "pattern": format!("^{label}(\\.{label})*$")},
            "namespace": {"type": "string", "maxLength": 63, "pattern": format!("^{label}$")},
            "labels": {
                "type": "object",
                "propertyNames": {
                    "pattern": format!("^({label}(\\.{label})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$")
                },
                "additionalProperties": {
                    "type": "string", "maxLength": 63,
                    "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
                }
            },
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
        }
    })
}

/// Strict validators for the generated kinds.
struct Schemas {
    /// By kind: the schema pins `apiVersion`, so a wrong version fails it.
    validators: BTreeMap<String, Validator>,
    schemas: BTreeMap<String, Value>,
}

impl Schemas {
    /// Parsed once per test binary (the Istio CRD file is ~930 KB).
    fn get() -> &'static Schemas {
        static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
        SCHEMAS.get_or_init(Schemas::load)
    }

    fn load() -> Self {
        let mut crds = load_documents("istio-crds.gen.yaml");
        assert!(
            crds.len() > 10,
            "expected the Istio CRDs, got {} documents",
            crds.len()
        );
        crds.extend(load_documents("multicluster.x-k8s.io_serviceimports.yaml"));
        crds.extend(load_documents("multicluster.x-k8s.io_serviceexports.yaml"));
        let table = cel_table();
        let mut validators = BTreeMap::new();
        let mut schemas = BTreeMap::new();
        let mut unknown = BTreeSet::new();
        for (group, version, kind) in [
            ("networking.istio.io", "v1", "ServiceEntry"),
            ("networking.istio.io", "v1", "WorkloadEntry"),
            ("multicluster.x-k8s.io", "v1beta1", "ServiceImport"),
        ] {
            let crd = crds
                .iter()
                .find(|c| c["spec"]["group"] == group && c["spec"]["names"]["kind"] == kind)
                .unwrap_or_else(|| panic!("no CRD for {kind}.{group}"));
            let mut schema =
                crd["spec"]["versions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == version)
                    .unwrap_or_else(|| panic!("{kind}.{group} has no version {version}"))["schema"]
                    ["openAPIV3Schema"]
                    .clone();
            assert!(schema.is_object(), "{kind}: no openAPIV3Schema");
            let api_version = format!("{group}/{version}");
            tighten(&mut schema, &table, &mut unknown);
            let props = schema["properties"].as_object_mut().unwrap();
            props.insert(
                "apiVersion".into(),
                json!({"type": "string", "enum": [api_version]}),
            );
            props.insert("kind".into(), json!({"type": "string", "enum": [kind]}));
            props.insert("metadata".into(), metadata_schema());
            let required = schema
                .as_object_mut()
                .unwrap()
                .entry("required")
                .or_insert_with(|| json!([]));
            for field in ["apiVersion", "kind", "metadata"] {
                required.as_array_mut().unwrap().push(json!(field));
            }
            let validator = jsonschema::options()
                .with_draft(Draft::Draft7)
                .build(&schema)
                .unwrap_or_else(|e| panic!("{kind}: schema does not compile: {e}"));
            validators.insert(kind.to_string(), validator);
            schemas.insert(kind.to_string(), schema);
        }
        assert!(
            unknown.is_empty(),
            "CEL rules this test does not know; add them to cel_table():\n{unknown:#?}"
        );
        Schemas {
            validators,
            schemas,
        }
    }

    /// Every problem with `object`, or none.
    fn problems(&self, object: &Value) -> Vec<String> {
        let kind = object["kind"].as_str().unwrap_or_default();
        let Some(validator) = self.validators.get(kind) else {
            return vec![format!("no schema for kind {kind:?}")];
        };
        let mut out: Vec<String> = validator
            .iter_errors(object)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        out.extend(check_uniqueness(object));
        out
    }
}

/// The uniqueness rules JSON Schema cannot express: CEL
/// `self.all(l1, self.exists_one(l2, l1.number == l2.number))` on
/// ServiceEntry ports, and `x-kubernetes-list-type: map` keys (port names;
/// ServiceImport `status.clusters`).
fn check_uniqueness(object: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut unique = |what: &str, items: Vec<String>| {
        let set: BTreeSet<&String> = items.iter().collect();
        if set.len() != items.len() {
            out.push(format!("{what} not unique: {items:?}"));
        }
    };
    let list = |v: &Value, field: &str| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| p[field].to_string())
            .collect()
    };
    if object["kind"] == "ServiceEntry" {
        unique(
            "ServiceEntry port numbers",
            list(&object["spec"]["ports"], "number"),
        );
        unique(
            "ServiceEntry port names",
            list(&object["spec"]["ports"], "name"),
        );
    }
    if object["kind"] == "ServiceImport" {
        unique(
            "ServiceImport clusters",
            list(&object["status"]["clusters"], "cluster"),
        );
    }
    out
}

fn assert_valid(schemas: &Schemas, objects: &[Value], what: &str) {
    let mut failures = Vec::new();
    for o in objects {
        let mut problems = schemas.problems(o);
        // The control plane reads the imports back through its config
        // boundary, which refuses what strait_model::validation refuses.
        if let Err(e) = strait_model::validation::validate_object(o) {
            problems.push(format!("validation: {e}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} {}/{}: {problems:#?}",
                o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]
            ));
        }
    }
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
}

/// A synthetic import with every shape the generator can produce: long
/// names, IPv6, a DNS gateway, pod addresses, a peered mesh, many ports.
fn synthetic_objects() -> Vec<Value> {
    let td = TrustDomain::new("cluster.local").unwrap();
    let cluster = |name: &str, network: &str, gw: &str| ClusterInfo {
        name: ClusterName::new(name).unwrap(),
        network: Network::new(network).unwrap(),
        locality: None,
        gateways: vec![GatewayAddress::parse(gw).unwrap()],
        trust_domain: td.clone(),
    };
    let importer = cluster("west", "net-1", "192.0.2.1");
    let long_svc = "s".repeat(63);
    let long_cluster = "c".repeat(63);
    let mut partner = cluster("east", "p-net", "[2001:db8::1]");
    partner.trust_domain = TrustDomain::new("partner.example").unwrap();
    let exporters = [
        cluster(&long_cluster, "net-2", "198.51.100.1"),
        cluster("dns", "net-3", "gw.example.com:8443"),
        cluster("neighbour", "net-1", "192.0.2.2"),
        partner,
    ];
    let protocols = [Protocol::Http, Protocol::Grpc, Protocol::Tcp, Protocol::Tls];
    let mut remote = Vec::new();
    for svc in ["reviews", long_svc.as_str()] {
        for (i, from) in exporters.iter().enumerate() {
            let key = ServiceKey::new("bookinfo", svc).unwrap();
            let ports = (0..4)
                .map(|p| {
                    let name = format!("{}-{p}", protocols[p].as_str().to_lowercase());
                    ServicePort::new(&name, 8000 + p as u16, protocols[p], Some(9000)).unwrap()
                })
                .collect();
            let mut service = ExportedService::new(key, ports);
            service.endpoints = vec![LocalityEndpoints {
                locality: None,
                healthy: i as u32 + 1,
                total: 9,
            }];
            service.service_accounts.insert("sa".into());
            if from.network == importer.network {
                service.addresses = vec!["10.0.0.1".into(), "fd00::1".into()];
            }
            remote.push(RemoteService {
                from: from.clone(),
                service,
            });
        }
    }
    let local = [LocalService {
        key: ServiceKey::new("bookinfo", &long_svc).unwrap(),
        selector: BTreeMap::from([("app.kubernetes.io/name".to_string(), "x".to_string())]),
        ports: vec![ServicePort::new("http-0", 8000, Protocol::Http, None).unwrap()],
    }];
    let mut out = import_objects(&importer, &remote, &local);
    assert!(!out.workload_entries.is_empty());
    // With ClusterSet IPs, as a control plane writes them.
    out.assign_clusterset_ips(&Default::default(), &BTreeMap::new());
    assert!(out.service_imports.iter().all(|si| si.spec.ips.len() == 1));
    out.to_json_values().unwrap()
}

#[test]
fn golden_scenarios_pass_the_crd_schemas() {
    let schemas = Schemas::get();
    for (name, scenario) in common::scenarios() {
        let objects = scenario.run().to_json_values().unwrap();
        assert!(!objects.is_empty(), "{name}");
        assert_valid(schemas, &objects, &name);
    }
}

#[test]
fn synthetic_import_passes_the_crd_schemas() {
    let schemas = Schemas::get();
    assert_valid(schemas, &synthetic_objects(), "synthetic");
}

/// A valid object of each kind, to break in the negative tests.
fn samples() -> (Value, Value, Value) {
    let (_, scenario) = common::scenarios()
        .into_iter()
        .find(|(n, _)| n == "bookinfo-multinetwork")
        .unwrap();
    let objects = scenario.run().to_json_values().unwrap();
    let find = |kind: &str| {
        objects
            .iter()
            .find(|o| {
                o["kind"] == kind && o["metadata"]["name"].as_str().unwrap().contains("reviews")
            })
            .unwrap()
            .clone()
    };
    (
        find("ServiceEntry"),
        find("WorkloadEntry"),
        find("ServiceImport"),
    )
}

#[test]
fn the_check_has_teeth() {
    let schemas = Schemas::get();
    let (se, we, si) = samples();
    for o in [&se, &we, &si] {
        assert!(schemas.problems(o).is_empty(), "{:#?}", schemas.problems(o));
    }
    type Break = fn(&mut Value);
    let cases: Vec<(&str, &str, &Value, Break)> = vec![
        (
            "misspelled spec field",
            "'resolutoin' was unexpected",
            &se,
            |o| {
                let r = o["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("resolution")
                    .unwrap();
                o["spec"]["resolutoin"] = r;
            },
        ),
        (
            "wrong enum value",
            "\"SOMEWHERE\" is not one of",
            &se,
            |o| o["spec"]["location"] = json!("SOMEWHERE"),
        ),
        (
            "misspelled endpoint field",
            "'serviceAcount' was unexpected",
            &se,
            |o| {
                o["spec"]["endpoints"][0]["serviceAcount"] = json!("x");
            },
        ),
        ("endpoint without address", "anyOf", &se, |o| {
            let ep = o["spec"]["endpoints"][0].as_object_mut().unwrap();
            ep.remove("address");
            ep.remove("network");
        }),
        ("endpoint port 0", "less than the minimum of 1", &se, |o| {
            o["spec"]["endpoints"][0]["ports"]["http"] = json!(0)
        }),
        (
            "endpoint port 65536",
            "greater than the maximum of 65535",
            &se,
            |o| o["spec"]["endpoints"][0]["ports"]["http"] = json!(65536),
        ),
        (
            "bad endpoint port name",
            "\"http_x\" does not match",
            &se,
            |o| o["spec"]["endpoints"][0]["ports"]["http_x"] = json!(1),
        ),
        ("NONE resolution with endpoints", "anyOf", &se, |o| {
            o["spec"]["resolution"] = json!("NONE")
        }),
        ("no resolution with endpoints", "anyOf", &se, |o| {
            o["spec"].as_object_mut().unwrap().remove("resolution");
        }),
        ("wildcard host", "is not allowed for \"*\"", &se, |o| {
            o["spec"]["hosts"] = json!(["*"])
        }),
        ("no hosts", "\"hosts\" is a required property", &se, |o| {
            o["spec"].as_object_mut().unwrap().remove("hosts");
        }),
        (
            "duplicate port number",
            "port numbers not unique",
            &se,
            |o| {
                o["spec"]["ports"][1]["number"] = o["spec"]["ports"][0]["number"].clone();
            },
        ),
        ("duplicate port name", "port names not unique", &se, |o| {
            o["spec"]["ports"][1]["name"] = o["spec"]["ports"][0]["name"].clone();
        }),
        (
            "port without name",
            "\"name\" is a required property",
            &se,
            |o| {
                o["spec"]["ports"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("name");
            },
        ),
        ("weight as string", "is not of type \"integer\"", &se, |o| {
            o["spec"]["endpoints"][0]["weight"] = json!("2")
        }),
        ("unix socket address", "unix:///x", &se, |o| {
            o["spec"]["endpoints"][0]["address"] = json!("unix:///x")
        }),
        (
            "misspelled WorkloadEntry field",
            "'adress' was unexpected",
            &we,
            |o| o["spec"]["adress"] = json!("1.2.3.4"),
        ),
        (
            "WorkloadEntry negative weight",
            "less than the minimum of 0",
            &we,
            |o| o["spec"]["weight"] = json!(-1),
        ),
        (
            "WorkloadEntry port as string",
            "is not of type \"integer\"",
            &we,
            |o| o["spec"]["ports"]["http"] = json!("15443"),
        ),
        (
            "WorkloadEntry weight too large",
            "greater than the maximum",
            &we,
            |o| o["spec"]["weight"] = json!(4_294_967_296u64),
        ),
        (
            "ServiceImport wrong type",
            "\"ClusterIP\" is not one of",
            &si,
            |o| o["spec"]["type"] = json!("ClusterIP"),
        ),
        (
            "ServiceImport without ports",
            "\"ports\" is a required property",
            &si,
            |o| {
                o["spec"].as_object_mut().unwrap().remove("ports");
            },
        ),
        (
            "ServiceImport misspelled status field",
            "'cluster' was unexpected",
            &si,
            |o| {
                o["status"]["cluster"] = json!([]);
            },
        ),
        (
            "ServiceImport duplicate cluster",
            "clusters not unique",
            &si,
            |o| {
                o["status"]["clusters"][1] = o["status"]["clusters"][0].clone();
            },
        ),
        (
            "ServiceImport port as string",
            "is not of type \"integer\"",
            &si,
            |o| o["spec"]["ports"][0]["port"] = json!("80"),
        ),
        (
            "unknown top-level field",
            "'specs' was unexpected",
            &si,
            |o| o["specs"] = json!({}),
        ),
        ("wrong apiVersion", "is not one of", &si, |o| {
            o["apiVersion"] = json!("multicluster.x-k8s.io/v1")
        }),
        ("wrong kind", "\"hosts\" is a required property", &we, |o| {
            o["kind"] = json!("ServiceEntry")
        }),
        ("bad object name", "does not match", &se, |o| {
            o["metadata"]["name"] = json!("Strait_Reviews")
        }),
        (
            "object name too long",
            "longer than 253 characters",
            &se,
            |o| o["metadata"]["name"] = json!("a".repeat(254)),
        ),
        (
            "metadata label value too long",
            "longer than 63 characters",
            &se,
            |o| {
                o["metadata"]["labels"]["strait.io/service"] = json!("x".repeat(64));
            },
        ),
        (
            "metadata bad label key",
            "\"a b\" does not match",
            &se,
            |o| o["metadata"]["labels"]["a b"] = json!("x"),
        ),
        (
            "no namespace",
            "\"namespace\" is a required property",
            &we,
            |o| {
                o["metadata"].as_object_mut().unwrap().remove("namespace");
            },
        ),
    ];
    let mut missed = Vec::new();
    for (what, expect, sample, breaks) in cases {
        let mut o = sample.clone();
        breaks(&mut o);
        let problems = schemas.problems(&o);
        if !problems.iter().any(|p| p.contains(expect)) {
            missed.push(format!("{what}: expected {expect:?} in {problems:#?}"));
        }
    }
    assert!(
        missed.is_empty(),
        "not caught as expected:\n{}",
        missed.join("\n")
    );
    // Metadata fields strait does not set are still allowed.
    let mut o = se.clone();
    o["metadata"]["resourceVersion"] = json!("42");
    o["metadata"]["annotations"] = json!({"a": "b"});
    assert!(schemas.problems(&o).is_empty());
}

#[test]
fn tightening_leaves_open_maps_and_preserved_fields_alone() {
    let schemas = Schemas::get();
    let se = &schemas.schemas["ServiceEntry"];
    assert_eq!(se["additionalProperties"], json!(false));
    assert_eq!(
        se["properties"]["spec"]["additionalProperties"],
        json!(false)
    );
    // Maps keep their value schema; status keeps preserving unknown fields.
    assert!(se["properties"]["spec"]["properties"]["endpoints"]["items"]["properties"]["labels"]
        ["additionalProperties"]
        .is_object());
    assert!(
        se["properties"]["status"]
            .get("additionalProperties")
            .is_none()
    );
}

/// The copies here are byte for byte the upstream CRDs named in
/// `SOURCES.txt`, when `STRAIT_UPSTREAM_CRDS` names a directory holding
/// them (a maintainer refreshing the copies sets it).
#[test]
fn the_crd_copies_match_the_upstream_crds() {
    let Some(shared) = std::env::var_os("STRAIT_UPSTREAM_CRDS").map(std::path::PathBuf::from)
    else {
        eprintln!("skipped: STRAIT_UPSTREAM_CRDS is not set");
        return;
    };
    for file in [
        "istio-crds.gen.yaml",
        "multicluster.x-k8s.io_serviceexports.yaml",
        "multicluster.x-k8s.io_serviceimports.yaml",
    ] {
        let ours = std::fs::read(crd_testdata().join(file)).unwrap();
        let theirs = std::fs::read(shared.join(file)).unwrap();
        assert!(
            ours == theirs,
            "tests/testdata/crds/{file} differs from {}",
            shared.join(file).display()
        );
    }
}
