use std::collections::HashMap;
use std::path::PathBuf;

use prost::Message;

use super::*;
use crate::source;

mod policy;

fn ctx() -> ClusterContext {
    ClusterContext {
        cluster: "east".into(),
        network: "net-east".into(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        locality: Some("eu/a".into()),
        egress: Some("10.0.0.1:15444".into()),
        path_normalization: PathNormalization::Base,
    }
}

fn config(yaml: &str) -> Config {
    let read = BTreeMap::from([(PathBuf::from("c.yaml"), source::parse_file(yaml))]);
    Config::default().apply(&read)
}

/// The resources built from `yaml`, and what was said about it: the
/// objects rejected at the config boundary (`c.yaml: <object>: <why>`),
/// then the builder's warnings.
fn run(yaml: &str) -> (Snapshot, Vec<String>) {
    let c = config(yaml);
    let (snap, warnings) = build(&ctx(), &c, &TrustInput::default(), &[]);
    let mut said: Vec<String> = c.rejections.iter().map(ToString::to_string).collect();
    said.extend(warnings);
    (snap, said)
}

fn decode<M: Message + Default>(snap: &Snapshot, type_url: &str, name: &str) -> M {
    let r = snap
        .resources(type_url)
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no {type_url} {name}: {:?}", snap.resources(type_url)));
    M::decode(r.resource.value.as_slice()).unwrap()
}

fn service(snap: &Snapshot, host: &str) -> pb::Service {
    decode(snap, type_url::SERVICE, host)
}

const ECHO: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports:
  - {name: http-web, port: 8080, targetPort: 80}
  - {name: grpc, port: 9090, appProtocol: grpc}
  - {name: plain, port: 7000}
  - {name: h2, port: 7001, appProtocol: kubernetes.io/h2c}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-1, namespace: demo, annotations: {strait.io/inbound-port: "16006"}}
spec: {address: 10.1.0.1, labels: {app: echo, version: v1}, serviceAccount: echo}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-2, namespace: demo}
spec: {address: 10.1.0.2, labels: {app: echo, version: v2}, network: net-east, locality: eu/b}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: demo}
spec: {address: 10.1.0.3, labels: {app: other}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-elsewhere, namespace: prod}
spec: {address: 10.1.0.4, labels: {app: echo}}
"#;

const IMPORTED_WE: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: strait-echo.west, namespace: demo, labels: {strait.io/cluster: west}}
spec:
  address: 192.0.2.10
  network: net-west
  ports: {http-web: 15443, grpc: 15443}
  weight: 3
  locality: us/x
  serviceAccount: echo
  labels: {app: echo, strait.io/cluster: west}
"#;

const IMPORTED_SE: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: strait-echo, namespace: demo}
spec:
  hosts: [echo.demo.svc.clusterset.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http-web, protocol: HTTP}]
  subjectAltNames: [spiffe://partner.example/ns/demo/sa/echo]
  endpoints:
  - {address: 192.0.2.10, network: net-west, ports: {http-web: 15443}, weight: 3, labels: {strait.io/cluster: west}}
"#;

#[test]
fn a_service_gets_ports_aliases_and_its_selected_endpoints() {
    let (snap, warnings) = run(ECHO);
    assert!(warnings.is_empty(), "{warnings:?}");
    let s = service(&snap, "echo.demo.svc.cluster.local");
    assert_eq!(s.aliases, ["echo.demo.svc.clusterset.local", "echo.demo"]);
    let ports: Vec<(&str, u32, &str, u32)> = s
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.protocol.as_str(), p.target_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("http-web", 8080, "http", 80),
            ("grpc", 9090, "grpc", 0),
            ("plain", 7000, "tcp", 0),
            ("h2", 7001, "http2", 0),
        ]
    );
    assert!(!s.exported);
    let eps: Vec<(&str, u32, &str, &str, &str)> = s
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.as_str(),
                e.port,
                e.identity.as_str(),
                e.workload.as_str(),
                e.locality.as_str(),
            )
        })
        .collect();
    assert_eq!(
        eps,
        [
            (
                "10.1.0.1",
                16006,
                "spiffe://cluster.local/ns/demo/sa/echo",
                "echo-1",
                "eu/a"
            ),
            (
                "10.1.0.2",
                15006,
                "spiffe://cluster.local/ns/demo/sa/default",
                "echo-2",
                "eu/b"
            ),
        ]
    );
    assert!(
        s.endpoints
            .iter()
            .all(|e| e.kind == pb::endpoint::Kind::Sidecar as i32
                && e.healthy
                && e.weight == 1
                && e.cluster == "east"
                && e.network == "net-east")
    );
    assert_eq!(
        s.identities,
        [
            "spiffe://cluster.local/ns/demo/sa/default",
            "spiffe://cluster.local/ns/demo/sa/echo"
        ]
    );
}

#[test]
fn workloads_are_the_local_workload_entries() {
    let (snap, _) = run(&format!("{ECHO}{IMPORTED_WE}"));
    let names: Vec<&String> = snap.resources(type_url::WORKLOAD).unwrap().keys().collect();
    assert_eq!(
        names,
        [
            "demo/echo-1",
            "demo/echo-2",
            "demo/other",
            "prod/echo-elsewhere"
        ]
    );
    let w: pb::Workload = decode(&snap, type_url::WORKLOAD, "demo/echo-1");
    assert_eq!(w.identity, "spiffe://cluster.local/ns/demo/sa/echo");
    assert_eq!(w.network, "net-east");
    assert_eq!(w.cluster, "east");
    assert_eq!(w.locality, "eu/a");
    assert_eq!(w.labels.get("version").map(String::as_str), Some("v1"));
}

#[test]
fn remote_workload_entries_become_gateway_endpoints() {
    let networks = [NetworkInput {
        name: "net-west".into(),
        gateways: vec!["192.0.2.10:15443".into()],
        mode: NetworkMode::Quic,
        tunnels: vec!["192.0.2.10:15443".into()],
    }];
    let (snap, warnings) = build(
        &ctx(),
        &config(&format!("{ECHO}{IMPORTED_WE}")),
        &TrustInput::default(),
        &networks,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let s = service(&snap, "echo.demo.svc.cluster.local");
    let gw: Vec<&pb::Endpoint> = s
        .endpoints
        .iter()
        .filter(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
        .collect();
    assert_eq!(gw.len(), 1);
    let g = gw[0];
    assert_eq!(
        (
            g.address.as_str(),
            g.port,
            g.weight,
            g.network.as_str(),
            g.cluster.as_str()
        ),
        ("192.0.2.10", 15443, 3, "net-west", "west")
    );
    assert_eq!(g.locality, "us/x");
    assert_eq!(g.identity, "");
    assert_eq!(
        g.via, "10.0.0.1:15444",
        "QUIC network goes through the egress"
    );
    assert!(
        s.identities
            .contains(&"spiffe://cluster.local/ns/demo/sa/echo".to_string())
    );
    let n: pb::Network = decode(&snap, type_url::NETWORK, "net-west");
    assert_eq!(n.mode, pb::network::Mode::Quic as i32);
    assert!(
        snap.resources(type_url::WORKLOAD)
            .unwrap()
            .get("demo/strait-echo.west")
            .is_none()
    );
}

#[test]
fn namespace_sameness_merges_a_clusterset_entry_into_the_local_service() {
    let (snap, warnings) = run(&format!("{ECHO}{IMPORTED_WE}{IMPORTED_SE}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let services = snap.resources(type_url::SERVICE).unwrap();
    assert_eq!(
        services.keys().collect::<Vec<_>>(),
        ["echo.demo.svc.cluster.local"],
        "one service, not one per host"
    );
    let s = service(&snap, "echo.demo.svc.cluster.local");
    let gateways = s
        .endpoints
        .iter()
        .filter(|e| e.kind == pb::endpoint::Kind::Gateway as i32)
        .count();
    assert_eq!(gateways, 1, "the entry's endpoint is not counted twice");
    assert!(
        s.identities
            .contains(&"spiffe://partner.example/ns/demo/sa/echo".to_string()),
        "{:?}",
        s.identities
    );
}

#[test]
fn a_clusterset_entry_without_local_service_is_served_under_the_local_name() {
    let (snap, warnings) = run(IMPORTED_SE);
    assert!(warnings.is_empty(), "{warnings:?}");
    let s = service(&snap, "echo.demo.svc.cluster.local");
    assert_eq!((s.name.as_str(), s.namespace.as_str()), ("echo", "demo"));
    assert_eq!(s.aliases, ["echo.demo.svc.clusterset.local", "echo.demo"]);
    assert_eq!(s.ports.len(), 1);
    assert_eq!(s.ports[0].protocol, "http");
    assert_eq!(s.endpoints.len(), 1);
    let e = &s.endpoints[0];
    assert_eq!(e.kind, pb::endpoint::Kind::Gateway as i32);
    assert_eq!((e.port, e.weight, e.cluster.as_str()), (15443, 3, "west"));
    assert_eq!(s.identities, ["spiffe://partner.example/ns/demo/sa/echo"]);
}

#[test]
fn a_clusterset_ip_reaches_the_service_beside_its_cluster_ip() {
    let entry = IMPORTED_SE.replace(
        "  hosts: [echo.demo.svc.clusterset.local]\n",
        "  hosts: [echo.demo.svc.clusterset.local]\n  addresses: [240.241.0.9]\n",
    );
    // Imported only: the entry's address is the service's.
    let (snap, warnings) = run(&entry);
    assert!(warnings.is_empty(), "{warnings:?}");
    let s = service(&snap, "echo.demo.svc.cluster.local");
    assert_eq!(s.addresses, ["240.241.0.9"]);
    // With a local Service: its cluster IP first, then the ClusterSet IP.
    let local = ECHO.replace(
        "  selector: {app: echo}\n",
        "  selector: {app: echo}\n  clusterIP: 10.96.0.20\n",
    );
    let (snap, warnings) = run(&format!("{local}{IMPORTED_WE}{entry}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let s = service(&snap, "echo.demo.svc.cluster.local");
    assert_eq!(s.addresses, ["10.96.0.20", "240.241.0.9"]);
}

#[test]
fn an_entry_endpoint_on_the_local_network_is_a_sidecar() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: strait-db, namespace: data}
spec:
  hosts: [db.data.svc.clusterset.local]
  ports: [{number: 5432, name: tcp-pg}]
  endpoints:
  - {address: 10.9.0.7, network: net-east, serviceAccount: db, ports: {tcp-pg: 5432}}
"#;
    let (snap, warnings) = run(yaml);
    assert!(warnings.is_empty(), "{warnings:?}");
    let s = service(&snap, "db.data.svc.cluster.local");
    let e = &s.endpoints[0];
    assert_eq!(e.kind, pb::endpoint::Kind::Sidecar as i32);
    assert_eq!(e.port, SIDECAR_INBOUND_PORT);
    assert_eq!(e.identity, "spiffe://cluster.local/ns/data/sa/db");
    assert_eq!(s.identities, ["spiffe://cluster.local/ns/data/sa/db"]);
}

#[test]
fn services_carry_their_virtual_ips() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::10"]
  ports: [{name: tcp-pg, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: demo}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: tcp, port: 1}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: demo}
spec:
  clusterIP: None
  ports: [{name: tcp, port: 1}]
---
apiVersion: v1
kind: Service
metadata: {name: odd, namespace: demo}
spec:
  clusterIP: ten.nine.six
  ports: [{name: tcp, port: 1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: demo}
spec:
  hosts: [db.example.com]
  addresses: [240.0.0.1, 240.0.0.2/32, 240.0.1.0/24, "fd00::1/128"]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext-bad, namespace: demo}
spec:
  hosts: [bad.example.com]
  addresses: [240.0.0.9, nonsense]
"#;
    let (snap, warnings) = run(yaml);
    let addresses = |host: &str| service(&snap, host).addresses;
    assert_eq!(
        addresses("db.demo.svc.cluster.local"),
        ["10.96.0.10", "fd00::10"]
    );
    assert_eq!(addresses("old.demo.svc.cluster.local"), ["10.96.0.11"]);
    assert!(addresses("headless.demo.svc.cluster.local").is_empty());
    // An address that is not an IP rejects the whole object.
    let services = snap.resources(type_url::SERVICE).unwrap();
    assert!(!services.contains_key("odd.demo.svc.cluster.local"));
    assert!(!services.contains_key("bad.example.com"));
    assert_eq!(
        addresses("db.example.com"),
        ["240.0.0.1", "240.0.0.2", "fd00::1"]
    );
    let named = |needle: &str| warnings.iter().any(|w| w.contains(needle));
    assert!(
        named(r#"Service demo/odd: invalid: spec.clusterIP: Invalid value: "ten.nine.six""#),
        "{warnings:?}"
    );
    assert!(
        named(r#"ServiceEntry demo/ext: spec.addresses[2] "240.0.1.0/24" is not a single IP"#),
        "{warnings:?}"
    );
    assert!(
        named(
            r#"ServiceEntry demo/ext-bad: invalid: spec.addresses[1]: Invalid value: "nonsense""#
        ),
        "{warnings:?}"
    );
    assert_eq!(warnings.len(), 3, "{warnings:?}");
}

#[test]
fn other_service_entries_are_named_by_their_first_host() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: demo}
spec:
  hosts: [api.example.com, api2.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext2, namespace: demo}
spec:
  hosts: [api.example.com]
"#;
    let (snap, warnings) = run(yaml);
    let s = service(&snap, "api.example.com");
    assert_eq!(s.aliases, ["api2.example.com"]);
    assert_eq!(s.ports[0].protocol, "tls");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("ServiceEntry demo/ext2: host api.example.com is already a service"),
        "{warnings:?}"
    );
}

#[test]
fn export_signals() {
    let cases: &[(&str, &str, bool, Option<&str>)] = &[
        (
            "annotation",
            "metadata: {name: a, namespace: ns, annotations: {strait.io/export: \"true\"}}",
            true,
            None,
        ),
        (
            "false",
            "metadata: {name: a, namespace: ns, annotations: {strait.io/export: \"false\"}}",
            false,
            None,
        ),
        ("none", "metadata: {name: a, namespace: ns}", false, None),
        (
            "bad value",
            "metadata: {name: a, namespace: ns, annotations: {strait.io/export: \"yes\"}}",
            false,
            Some("strait.io/export"),
        ),
    ];
    for (label, meta, exported, warning) in cases {
        let yaml =
            format!("apiVersion: v1\nkind: Service\n{meta}\nspec: {{ports: [{{port: 80}}]}}\n");
        let (snap, warnings) = run(&yaml);
        let served = snap.resources(type_url::SERVICE).unwrap();
        match served.get("a.ns.svc.cluster.local") {
            Some(_) => assert_eq!(
                service(&snap, "a.ns.svc.cluster.local").exported,
                *exported,
                "{label}"
            ),
            // A bad signal rejects the Service as a whole.
            None => assert!(warning.is_some(), "{label}: {warnings:?}"),
        }
        match warning {
            Some(w) => assert!(
                warnings.iter().any(|x| x.contains(w)),
                "{label}: {warnings:?}"
            ),
            None => assert!(warnings.is_empty(), "{label}: {warnings:?}"),
        }
    }
    let with_export = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {ports: [{port: 80}]}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: a, namespace: ns}\n";
    assert!(service(&run(with_export).0, "a.ns.svc.cluster.local").exported);
}

#[test]
fn bad_objects_are_rejected_or_warned_about_by_name() {
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {labels: {a: b}}\n",
            "c.yaml: WorkloadEntry ns/w: invalid: spec.address: Required value",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns, annotations: {strait.io/inbound-port: \"0\"}}\nspec: {address: 10.0.0.1}\n",
            "c.yaml: WorkloadEntry ns/w: invalid: metadata.annotations[strait.io/inbound-port]: Invalid value: \"0\"",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {address: 10.0.0.1, ports: {http: 70000}}\n",
            "c.yaml: WorkloadEntry ns/w: invalid: spec.ports[http]: Invalid value: 70000",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {address: 10.0.0.1, weight: -1}\n",
            "c.yaml: WorkloadEntry ns/w: invalid: spec.weight: Invalid value: -1",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {ports: [{port: 0}]}\n",
            "c.yaml: Service ns/s: invalid: spec.ports[0].port: Invalid value: 0",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {ports: [{port: 80, appProtocol: carrier-pigeon}]}\n",
            "Service ns/s: spec.ports[0]: appProtocol \"carrier-pigeon\"",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec: {hosts: []}\n",
            "c.yaml: ServiceEntry ns/e: invalid: spec.hosts: Required value",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec: {hosts: [x.example], endpoints: [{network: x}]}\n",
            "ServiceEntry ns/e: spec.endpoints[0]: address is missing",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec: {hosts: [x.example], ports: [{number: 1, name: a, protocol: UDP}]}\n",
            "ServiceEntry ns/e: spec.ports[0].protocol \"UDP\"",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {address: 10.0.0.1, serviceAccount: \"a/b\"}\n",
            "WorkloadEntry ns/w: service account \"a/b\"",
        ),
    ];
    for (yaml, expected) in cases {
        let (_, warnings) = run(yaml);
        assert!(
            warnings.iter().any(|w| w.contains(expected)),
            "expected {expected:?} in {warnings:?}"
        );
    }
}

const POLICIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo, generation: 7}
spec:
  host: echo
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-fqdn, namespace: other}
spec:
  host: echo.demo.svc.cluster.local
  subsets: [{name: v1, labels: {version: other}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: unrelated, namespace: other}
spec:
  host: echo
  subsets: [{name: v3, labels: {version: v3}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: demo}
spec:
  hosts: [echo]
  http: [{route: [{destination: {host: echo}, weight: -5}]}]
"#;

#[test]
fn host_resolution() {
    let cases = [
        ("echo", "demo", "echo.demo.svc.cluster.local"),
        ("echo.demo", "x", "echo.demo.svc.cluster.local"),
        ("echo.demo.svc", "x", "echo.demo.svc.cluster.local"),
        (
            "echo.demo.svc.cluster.local",
            "x",
            "echo.demo.svc.cluster.local",
        ),
        (
            "echo.demo.svc.clusterset.local",
            "x",
            "echo.demo.svc.clusterset.local",
        ),
        ("api.example.com", "x", "api.example.com"),
    ];
    for (host, ns, want) in cases {
        assert_eq!(resolve_host(host, ns), want, "{host} in {ns}");
    }
    let keys = [
        ("echo.demo.svc.clusterset.local", Some(("echo", "demo"))),
        ("echo.svc.clusterset.local", None),
        ("a.b.c.svc.clusterset.local", None),
        ("echo.demo.svc.cluster.local", None),
        ("xsvc.clusterset.local", None),
    ];
    for (host, want) in keys {
        assert_eq!(
            clusterset_key(host),
            want.map(|(a, b)| (a.to_string(), b.to_string())),
            "{host}"
        );
    }
}

#[test]
fn gateway_routes_for_exported_services_with_subsets_and_sidecars() {
    let yaml = format!(
        "{}{IMPORTED_WE}\n---\n{POLICIES}",
        ECHO.replace(
            "metadata: {name: echo, namespace: demo}",
            "metadata: {name: echo, namespace: demo, annotations: {strait.io/export: \"true\"}}"
        )
    );
    let (snap, warnings) = run(&yaml);
    let routes = snap.resources(type_url::GATEWAY_ROUTE).unwrap();
    assert_eq!(
        routes.keys().collect::<Vec<_>>(),
        ["echo.demo.svc.cluster.local"]
    );
    let r: pb::GatewayRoute = decode(
        &snap,
        type_url::GATEWAY_ROUTE,
        "echo.demo.svc.cluster.local",
    );
    assert_eq!(r.ports, [8080, 9090, 7000, 7001]);
    let subsets: BTreeMap<&str, BTreeMap<&str, &str>> = r
        .subsets
        .iter()
        .map(|(n, l)| {
            (
                n.as_str(),
                l.labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        subsets,
        BTreeMap::from([
            ("v1", BTreeMap::from([("version", "v1")])),
            ("v2", BTreeMap::from([("version", "v2")])),
        ]),
        "short name in the rule's namespace; the first rule wins v1; `echo` in `other` is another host"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("DestinationRule other/echo-fqdn: subset \"v1\"")),
        "{warnings:?}"
    );
    let eps: Vec<(&str, Vec<(u32, u32)>)> = r
        .endpoints
        .iter()
        .map(|e| {
            let mut p: Vec<(u32, u32)> = e.ports.iter().map(|(a, b)| (*a, *b)).collect();
            p.sort_unstable();
            (e.address.as_str(), p)
        })
        .collect();
    assert_eq!(
        eps,
        [
            (
                "10.1.0.1",
                vec![(7000, 16006), (7001, 16006), (8080, 16006), (9090, 16006)]
            ),
            (
                "10.1.0.2",
                vec![(7000, 15006), (7001, 15006), (8080, 15006), (9090, 15006)]
            ),
        ],
        "local sidecars only, not the remote gateway"
    );
}

#[test]
fn builds_are_deterministic_and_versions_follow_content() {
    let yaml = format!("{ECHO}{IMPORTED_WE}{IMPORTED_SE}\n---\n{POLICIES}");
    let (a, _) = run(&yaml);
    for _ in 0..5 {
        let (b, _) = run(&yaml);
        assert_eq!(a, b, "same input, same bytes and versions");
    }
    let changed = yaml.replace("10.1.0.2", "10.1.0.9");
    let (c, _) = run(&changed);
    let v = |s: &Snapshot, t: &str, n: &str| s.resources(t).unwrap()[n].version.clone();
    assert_ne!(
        v(&a, type_url::SERVICE, "echo.demo.svc.cluster.local"),
        v(&c, type_url::SERVICE, "echo.demo.svc.cluster.local")
    );
    assert_eq!(
        v(&a, type_url::POLICY, "DestinationRule/demo/echo"),
        v(&c, type_url::POLICY, "DestinationRule/demo/echo")
    );
}

#[test]
fn canonical_encoding_sorts_maps_and_decodes_to_the_same_message() {
    let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let pairs: Vec<(String, String)> = (0..40)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    let forward: HashMap<String, String> = pairs.iter().cloned().collect();
    let backward: HashMap<String, String> = pairs.iter().rev().cloned().collect();
    let route = |l: HashMap<String, String>| pb::GatewayRoute {
        hostname: "h".into(),
        ports: vec![1, 2],
        subsets: HashMap::from([
            ("a".to_string(), pb::Labels { labels: l.clone() }),
            (
                "b".to_string(),
                pb::Labels {
                    labels: labels(&[("x", "y")]),
                },
            ),
        ]),
        endpoints: vec![pb::GatewayEndpoint {
            address: "10.0.0.1".into(),
            ports: (1..30).map(|p| (p, p + 1000)).collect(),
            labels: l,
            healthy: true,
        }],
    };
    let (r1, r2) = (route(forward.clone()), route(backward));
    assert_eq!(r1.canonical_bytes(), r2.canonical_bytes());
    assert_eq!(
        pb::GatewayRoute::decode(r1.canonical_bytes().as_slice()).unwrap(),
        r1
    );
    let w = pb::Workload {
        name: "w".into(),
        labels: forward.clone(),
        ports: (0..20).map(|i| (format!("p{i}"), i)).collect(),
        ..Default::default()
    };
    assert_eq!(
        pb::Workload::decode(w.canonical_bytes().as_slice()).unwrap(),
        w
    );
    let s = pb::Service {
        hostname: "s".into(),
        endpoints: vec![
            pb::Endpoint {
                labels: forward,
                ..Default::default()
            },
            pb::Endpoint {
                address: "x".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    assert_eq!(
        pb::Service::decode(s.canonical_bytes().as_slice()).unwrap(),
        s
    );
}
