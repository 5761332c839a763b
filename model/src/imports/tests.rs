use std::collections::BTreeMap;

use strait_ca::TrustDomain;

use super::*;
use crate::mesh::{ExportTarget, ExportTo, ExportedService, Locality, LocalityEndpoints, Protocol};

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn cluster(name: &str, network: &str, gateway: Option<&str>) -> ClusterInfo {
    ClusterInfo {
        name: ClusterName::new(name).unwrap(),
        network: Network::new(network).unwrap(),
        locality: None,
        gateways: gateway
            .map(|g| GatewayAddress::parse(g).unwrap())
            .into_iter()
            .collect(),
        trust_domain: td("cluster.local"),
    }
}

fn west() -> ClusterInfo {
    cluster("west", "net-west", Some("192.0.2.1"))
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("bookinfo", name).unwrap()
}

fn http(name: &str, number: u16) -> ServicePort {
    ServicePort::new(name, number, Protocol::Http, None).unwrap()
}

fn export(from: ClusterInfo, name: &str, healthy: u32) -> RemoteService {
    let mut service = ExportedService::new(key(name), vec![http("http", 9080)]);
    service.endpoints = vec![LocalityEndpoints {
        locality: None,
        healthy,
        total: healthy.max(1),
    }];
    service.service_accounts.insert(format!("bookinfo-{name}"));
    RemoteService { from, service }
}

fn east() -> ClusterInfo {
    let mut c = cluster("east", "net-east", Some("203.0.113.10"));
    c.locality = Some(Locality::parse("us-east1/us-east1-b").unwrap());
    c
}

fn central() -> ClusterInfo {
    cluster("central", "net-central", Some("198.51.100.7:15443"))
}

fn local_reviews() -> LocalService {
    LocalService {
        key: key("reviews"),
        selector: BTreeMap::from([("app".to_string(), "reviews".to_string())]),
        ports: vec![http("http", 9080)],
    }
}

fn endpoint_addresses(se: &ServiceEntry) -> Vec<&str> {
    se.spec
        .endpoints
        .iter()
        .map(|e| e.address.as_str())
        .collect()
}

#[test]
fn namespace_sameness_merges_exporters_into_one_service() {
    let out = import_objects(
        &west(),
        &[
            export(east(), "reviews", 3),
            export(central(), "reviews", 2),
        ],
        &[],
    );
    assert_eq!(out.service_entries.len(), 1);
    assert_eq!(out.service_imports.len(), 1);
    assert!(out.workload_entries.is_empty() && out.warnings.is_empty());
    let se = &out.service_entries[0];
    assert_eq!(se.metadata.name, "strait-reviews");
    assert_eq!(se.metadata.namespace, "bookinfo");
    assert_eq!(se.metadata.labels[MANAGED_BY_LABEL], "strait");
    assert_eq!(se.metadata.labels[SERVICE_LABEL], "reviews");
    assert_eq!(se.spec.hosts, ["reviews.bookinfo.svc.clusterset.local"]);
    assert_eq!(se.spec.location, Some(Location::MeshInternal));
    assert_eq!(se.spec.resolution, Some(Resolution::Static));
    // Clusters in name order: central, east.
    assert_eq!(endpoint_addresses(se), ["198.51.100.7", "203.0.113.10"]);
    let e = &se.spec.endpoints[1];
    assert_eq!(e.network.as_deref(), Some("net-east"));
    assert_eq!(e.locality.as_deref(), Some("us-east1/us-east1-b"));
    assert_eq!(e.weight, Some(3));
    assert_eq!(
        e.labels,
        BTreeMap::from([(CLUSTER_LABEL.into(), "east".into())])
    );
    assert_eq!(e.ports, BTreeMap::from([("http".into(), 15443)]));
    assert_eq!(e.service_account.as_deref(), Some("bookinfo-reviews"));
    assert_eq!(se.spec.endpoints[0].weight, Some(2));
    assert_eq!(se.spec.endpoints[0].locality, None);
    assert_eq!(
        se.spec.subject_alt_names,
        ["spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"]
    );
    let si = &out.service_imports[0];
    assert_eq!(
        (si.metadata.name.as_str(), si.metadata.namespace.as_str()),
        ("reviews", "bookinfo")
    );
    assert_eq!(si.spec.type_, ServiceImportType::ClusterSetIP);
    assert_eq!(si.spec.ports.len(), 1);
    assert_eq!(si.spec.ports[0].port, 9080);
    assert_eq!(si.spec.ports[0].protocol.as_deref(), Some("TCP"));
    assert_eq!(si.spec.ports[0].app_protocol.as_deref(), Some("http"));
    let clusters: Vec<&str> = si
        .status
        .iter()
        .flat_map(|s| &s.clusters)
        .map(|c| c.cluster.as_str())
        .collect();
    assert_eq!(clusters, ["central", "east"]);
}

#[test]
fn gateway_port_and_locality_fallback() {
    let mut c = cluster("east", "net-east", Some("[2001:db8::5]:8443"));
    c.gateways
        .push(GatewayAddress::parse("203.0.113.99").unwrap());
    let mut r = export(c, "reviews", 4);
    r.service.endpoints = vec![
        LocalityEndpoints {
            locality: Some(Locality::parse("r1/z1").unwrap()),
            healthy: 4,
            total: 4,
        },
        LocalityEndpoints {
            locality: Some(Locality::parse("r1/z2").unwrap()),
            healthy: 0,
            total: 2,
        },
    ];
    let out = import_objects(&west(), std::slice::from_ref(&r), &[]);
    let e = &out.service_entries[0].spec.endpoints[0];
    assert_eq!(e.address, "2001:db8::5", "the first gateway is used");
    assert_eq!(e.ports["http"], 8443);
    assert_eq!(
        e.locality.as_deref(),
        Some("r1/z1"),
        "the only locality with healthy endpoints"
    );
    r.service.endpoints[1].healthy = 1;
    let out = import_objects(&west(), &[r], &[]);
    assert_eq!(
        out.service_entries[0].spec.endpoints[0].locality, None,
        "localities differ"
    );
}

#[test]
fn networks_without_healthy_endpoints_get_no_endpoint() {
    let out = import_objects(
        &west(),
        &[
            export(east(), "reviews", 3),
            export(central(), "reviews", 0),
        ],
        &[local_reviews()],
    );
    let se = &out.service_entries[0];
    assert_eq!(endpoint_addresses(se), ["203.0.113.10"]);
    assert_eq!(out.workload_entries.len(), 1);
    assert_eq!(out.workload_entries[0].metadata.name, "strait-reviews.east");
    // The ServiceImport still names every exporter.
    assert_eq!(
        out.service_imports[0]
            .status
            .as_ref()
            .unwrap()
            .clusters
            .len(),
        2
    );

    // Nothing healthy anywhere: the ServiceEntry stays, without endpoints.
    let out = import_objects(&west(), &[export(east(), "reviews", 0)], &[local_reviews()]);
    assert_eq!(out.service_entries.len(), 1);
    assert!(out.service_entries[0].spec.endpoints.is_empty());
    assert!(out.workload_entries.is_empty());
    assert!(out.warnings.is_empty());
    assert_eq!(out.service_imports.len(), 1);
}

#[test]
fn shared_network_uses_pod_addresses() {
    let neighbour = cluster("west-2", "net-west", Some("192.0.2.2"));
    let mut r = export(neighbour, "reviews", 2);
    r.service.ports = vec![ServicePort::new("http", 9080, Protocol::Http, Some(8080)).unwrap()];
    r.service.addresses = vec!["10.0.0.9".into(), "10.0.0.10".into(), "fd00::7".into()];
    let out = import_objects(&west(), &[r.clone()], &[local_reviews()]);
    let se = &out.service_entries[0];
    assert_eq!(endpoint_addresses(se), ["10.0.0.9", "10.0.0.10", "fd00::7"]);
    for e in &se.spec.endpoints {
        assert_eq!(
            e.ports["http"], 8080,
            "pods are reached on the workload port"
        );
        assert_eq!(e.weight, Some(1));
        assert_eq!(e.network.as_deref(), Some("net-west"));
    }
    let names: Vec<&str> = out
        .workload_entries
        .iter()
        .map(|w| w.metadata.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "strait-reviews.west-2.10-0-0-10",
            "strait-reviews.west-2.10-0-0-9",
            "strait-reviews.west-2.fd00-0-0-0-0-0-0-7"
        ]
    );
    assert_eq!(out.workload_entries[0].spec.ports["http"], 8080);

    // A bad address is skipped with a warning; the rest are used.
    let mut bad = r.clone();
    bad.service.addresses.push("pod-x".into());
    let out = import_objects(&west(), &[bad], &[]);
    assert_eq!(out.service_entries[0].spec.endpoints.len(), 3);
    assert!(
        matches!(&out.warnings[..], [ImportWarning::BadAddress { address, .. }] if address == "pod-x")
    );

    // No addresses published: the gateway it is.
    let mut none = r.clone();
    none.service.addresses.clear();
    let out = import_objects(&west(), &[none], &[]);
    assert_eq!(endpoint_addresses(&out.service_entries[0]), ["192.0.2.2"]);

    // Addresses are ignored for a cluster on another network.
    let mut far = r;
    far.from.network = Network::new("net-far").unwrap();
    let out = import_objects(&west(), &[far], &[]);
    assert_eq!(endpoint_addresses(&out.service_entries[0]), ["192.0.2.2"]);
}

#[test]
fn cluster_without_gateway_is_skipped_with_a_warning() {
    let lost = cluster("lost", "net-lost", None);
    let out = import_objects(
        &west(),
        &[
            export(lost.clone(), "reviews", 2),
            export(east(), "reviews", 1),
        ],
        &[],
    );
    assert_eq!(
        endpoint_addresses(&out.service_entries[0]),
        ["203.0.113.10"]
    );
    let msg = out.warnings[0].to_string();
    assert!(
        msg.contains("cluster lost (network net-lost) has no east-west gateway"),
        "{msg}"
    );
    // Without healthy endpoints there is nothing to route, so no warning.
    let out = import_objects(&west(), &[export(lost, "reviews", 0)], &[]);
    assert!(out.warnings.is_empty());
}

#[test]
fn dns_gateways_switch_resolution_and_skip_workload_entries() {
    let dns = cluster("aws", "net-aws", Some("gw.aws.example.com"));
    let out = import_objects(
        &west(),
        &[export(dns, "reviews", 2), export(east(), "reviews", 1)],
        &[local_reviews()],
    );
    let se = &out.service_entries[0];
    assert_eq!(se.spec.resolution, Some(Resolution::Dns));
    assert_eq!(
        endpoint_addresses(se),
        ["gw.aws.example.com", "203.0.113.10"]
    );
    assert_eq!(
        out.workload_entries.len(),
        1,
        "only the IP gateway backs a WorkloadEntry"
    );
    assert!(matches!(
        &out.warnings[..],
        [ImportWarning::DnsGatewayForWorkloadEntry { host, .. }] if host == "gw.aws.example.com"
    ));
}

#[test]
fn local_services_get_workload_entries() {
    let mut local = local_reviews();
    local.ports.push(http("metrics", 9090));
    local.selector.insert("version".into(), "v2".into());
    let mut r = export(east(), "reviews", 3);
    r.service.ports.push(http("admin", 9999));
    let out = import_objects(&west(), &[r, export(central(), "reviews", 2)], &[local]);
    let names: Vec<&str> = out
        .workload_entries
        .iter()
        .map(|w| w.metadata.name.as_str())
        .collect();
    assert_eq!(names, ["strait-reviews.central", "strait-reviews.east"]);
    let we = &out.workload_entries[1];
    assert_eq!(we.metadata.namespace, "bookinfo");
    assert_eq!(we.metadata.labels[CLUSTER_LABEL], "east");
    assert_eq!(we.metadata.labels[MANAGED_BY_LABEL], "strait");
    assert_eq!(we.spec.address, "203.0.113.10");
    assert_eq!(
        we.spec.labels,
        BTreeMap::from([
            ("app".into(), "reviews".into()),
            ("version".into(), "v2".into()),
            (CLUSTER_LABEL.into(), "east".into()),
        ])
    );
    // Only local port names the exporter serves are mapped.
    assert_eq!(we.spec.ports, BTreeMap::from([("http".into(), 15443)]));
    assert_eq!(we.spec.weight, Some(3));
    assert_eq!(we.spec.network.as_deref(), Some("net-east"));
    assert_eq!(we.spec.locality.as_deref(), Some("us-east1/us-east1-b"));
    assert_eq!(we.spec.service_account.as_deref(), Some("bookinfo-reviews"));
    // The ServiceEntry carries the union of exported ports.
    let se_ports: Vec<&str> = out.service_entries[0]
        .spec
        .ports
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(se_ports, ["http", "admin"]);
    // An exporter serving none of the local ports gets no WorkloadEntry.
    let mut grpc_only = export(
        cluster("north", "net-north", Some("192.0.2.77")),
        "reviews",
        1,
    );
    grpc_only.service.ports = vec![ServicePort::new("grpc", 7070, Protocol::Grpc, None).unwrap()];
    let out = import_objects(&west(), &[grpc_only], &[local_reviews()]);
    assert_eq!(out.service_entries[0].spec.endpoints.len(), 1);
    assert!(out.workload_entries.is_empty());
    // A local service of another key gets nothing.
    let mut other = local_reviews();
    other.key = key("ratings");
    let out = import_objects(&west(), &[export(east(), "reviews", 3)], &[other]);
    assert!(out.workload_entries.is_empty());
}

#[test]
fn local_service_without_selector_gets_no_workload_entries() {
    let mut local = local_reviews();
    local.selector.clear();
    let out = import_objects(&west(), &[export(east(), "reviews", 3)], &[local]);
    assert!(out.workload_entries.is_empty());
    assert_eq!(
        out.warnings,
        [ImportWarning::LocalServiceWithoutSelector {
            service: key("reviews")
        }]
    );
}

#[test]
fn service_accounts_and_subject_alt_names() {
    let mut two = export(east(), "reviews", 1);
    two.service.service_accounts.insert("reviews-v2".into());
    let out = import_objects(
        &west(),
        &[two.clone(), export(central(), "reviews", 1)],
        &[local_reviews()],
    );
    let se = &out.service_entries[0];
    let by_cluster = |c: &str| {
        se.spec
            .endpoints
            .iter()
            .find(|e| e.labels[CLUSTER_LABEL] == c)
            .unwrap()
    };
    assert_eq!(
        by_cluster("east").service_account,
        None,
        "two accounts: none set"
    );
    assert_eq!(
        by_cluster("central").service_account.as_deref(),
        Some("bookinfo-reviews")
    );
    assert_eq!(
        se.spec.subject_alt_names,
        [
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
            "spiffe://cluster.local/ns/bookinfo/sa/reviews-v2",
        ]
    );
    // One exporter without service accounts: no SANs at all.
    let mut anonymous = export(central(), "reviews", 1);
    anonymous.service.service_accounts.clear();
    let out = import_objects(&west(), &[two, anonymous], &[]);
    assert!(out.service_entries[0].spec.subject_alt_names.is_empty());
}

#[test]
fn peered_mesh_exports() {
    let mut partner = cluster("east", "partner-net", Some("198.18.0.1"));
    partner.trust_domain = td("partner.example");
    let mut r = export(partner, "reviews", 2);
    // Cluster-level export-to names the partner's own clusters; it does not
    // apply to an importer of another trust domain.
    r.service.export_to = ExportTo::only([ExportTarget::Mesh("home".into())]);
    let out = import_objects(
        &west(),
        &[r, export(east(), "reviews", 1)],
        &[local_reviews()],
    );
    let se = &out.service_entries[0];
    assert_eq!(endpoint_addresses(se), ["203.0.113.10", "198.18.0.1"]);
    let foreign = &se.spec.endpoints[1];
    assert_eq!(foreign.labels[TRUST_DOMAIN_LABEL], "partner.example");
    assert_eq!(foreign.labels[CLUSTER_LABEL], "east");
    assert_eq!(
        foreign.service_account, None,
        "Istio would put it in the wrong trust domain"
    );
    assert_eq!(
        se.spec.subject_alt_names,
        [
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
            "spiffe://partner.example/ns/bookinfo/sa/bookinfo-reviews",
        ]
    );
    // Same cluster name in two trust domains: two exporters, distinct names.
    let names: Vec<&str> = out
        .workload_entries
        .iter()
        .map(|w| w.metadata.name.as_str())
        .collect();
    let slug = format!(
        "east-{}",
        &format!("{:016x}", names::fnv1a64(b"partner.example"))[..8]
    );
    assert_eq!(
        names,
        [
            "strait-reviews.east".to_string(),
            format!("strait-reviews.{slug}")
        ]
    );
    let clusters: Vec<String> = out.service_imports[0]
        .status
        .iter()
        .flat_map(|s| &s.clusters)
        .map(|c| c.cluster.clone())
        .collect();
    assert_eq!(clusters, ["east".to_string(), slug]);
    assert!(out.warnings.is_empty());
}

#[test]
fn export_to_and_own_exports_are_respected() {
    let mut only_central = export(east(), "reviews", 2);
    only_central.service.export_to =
        ExportTo::only([ExportTarget::Cluster(ClusterName::new("central").unwrap())]);
    let mut mesh_only = export(central(), "ratings", 2);
    mesh_only.service.export_to = ExportTo::only([ExportTarget::Mesh("partner".into())]);
    let mut to_west = export(central(), "details", 2);
    to_west.service.export_to = ExportTo::only([ExportTarget::Cluster(west().name)]);
    let own = export(west(), "productpage", 2);
    let out = import_objects(&west(), &[only_central, mesh_only, to_west, own], &[]);
    let hosts: Vec<&str> = out
        .service_entries
        .iter()
        .map(|s| s.spec.hosts[0].as_str())
        .collect();
    assert_eq!(hosts, ["details.bookinfo.svc.clusterset.local"]);
    assert_eq!(out.len(), 2);
}

#[test]
fn ports_merge_by_name_and_conflicts_are_reported() {
    let mut a = export(central(), "reviews", 1);
    a.service.ports = vec![http("http", 9080), http("grpc", 9090)];
    let mut b = export(east(), "reviews", 1);
    b.service.ports = vec![
        http("http", 9081), // same name, other number
        ServicePort::new("grpc", 9090, Protocol::Grpc, None).unwrap(), // other protocol
        http("web", 9080),  // number taken by "http"
        ServicePort::new("tcp", 7000, Protocol::Tcp, None).unwrap(), // new
    ];
    let out = import_objects(&west(), &[b, a], &[]);
    let se = &out.service_entries[0];
    let ports: Vec<(u32, &str)> = se
        .spec
        .ports
        .iter()
        .map(|p| (p.number, p.name.as_str()))
        .collect();
    assert_eq!(ports, [(7000, "tcp"), (9080, "http"), (9090, "grpc")]);
    let east_ep = se
        .spec
        .endpoints
        .iter()
        .find(|e| e.labels[CLUSTER_LABEL] == "east")
        .unwrap();
    assert_eq!(east_ep.ports, BTreeMap::from([("tcp".into(), 15443)]));
    let central_ep = se
        .spec
        .endpoints
        .iter()
        .find(|e| e.labels[CLUSTER_LABEL] == "central")
        .unwrap();
    assert_eq!(central_ep.ports.len(), 2);
    let conflicts: Vec<String> = out.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(conflicts.len(), 3, "{conflicts:#?}");
    assert!(
        conflicts.iter().any(|m| m.contains(
            "cluster east exports port http as 9081/HTTP, which clashes with port http 9080/HTTP"
        )),
        "{conflicts:#?}"
    );
    assert!(
        conflicts
            .iter()
            .any(|m| m.contains("port grpc as 9090/GRPC")),
        "{conflicts:#?}"
    );
    assert!(
        conflicts
            .iter()
            .any(|m| m.contains("port web as 9080/HTTP, which clashes with port http")),
        "{conflicts:#?}"
    );
    assert_eq!(out.service_imports[0].spec.ports.len(), 3);
}

#[test]
fn duplicate_exports_resolve_deterministically() {
    let a = export(east(), "reviews", 1);
    let b = export(east(), "reviews", 5);
    let one = import_objects(&west(), &[a.clone(), b.clone()], &[]);
    let two = import_objects(&west(), &[b, a], &[]);
    assert_eq!(one, two);
    assert_eq!(one.service_entries[0].spec.endpoints.len(), 1);
    assert_eq!(one.service_entries[0].spec.endpoints[0].weight, Some(1));
    assert_eq!(
        one.warnings,
        [ImportWarning::DuplicateExport {
            service: key("reviews"),
            cluster: ClusterName::new("east").unwrap()
        }]
    );
}

#[test]
fn output_does_not_depend_on_input_order() {
    let mut same_net = export(cluster("west-2", "net-west", None), "reviews", 2);
    same_net.service.addresses = vec!["10.1.0.2".into(), "10.1.0.1".into()];
    let remote = vec![
        export(east(), "reviews", 3),
        export(central(), "reviews", 2),
        export(central(), "ratings", 1),
        export(east(), "details", 1),
        same_net,
        export(cluster("south", "net-south", None), "reviews", 1),
    ];
    let mut local_ratings = local_reviews();
    local_ratings.key = key("ratings");
    let local = vec![local_reviews(), local_ratings];
    let reference = import_objects(&west(), &remote, &local);
    let reference_yaml = reference.to_yaml().unwrap();
    // Every rotation and the reversal of both inputs.
    for shift in 0..remote.len() {
        let mut r = remote.clone();
        r.rotate_left(shift);
        for reverse in [false, true] {
            if reverse {
                r.reverse();
            }
            let mut l = local.clone();
            if reverse {
                l.reverse();
            }
            let out = import_objects(&west(), &r, &l);
            assert_eq!(out, reference, "shift {shift}, reverse {reverse}");
            assert_eq!(out.to_yaml().unwrap(), reference_yaml);
        }
    }
    let se_names: Vec<&str> = reference
        .service_entries
        .iter()
        .map(|s| s.metadata.name.as_str())
        .collect();
    assert_eq!(
        se_names,
        ["strait-details", "strait-ratings", "strait-reviews"]
    );
}

#[test]
fn long_names_are_bounded_and_distinct() {
    let long_svc = "r".repeat(63);
    let c1 = cluster(&"c".repeat(63), "n1", Some("192.0.2.10"));
    let c2 = cluster(&format!("{}d", "c".repeat(62)), "n2", Some("192.0.2.11"));
    let mut local = local_reviews();
    local.key = key(&long_svc);
    let out = import_objects(
        &west(),
        &[export(c1, &long_svc, 1), export(c2, &long_svc, 1)],
        &[local],
    );
    let se = &out.service_entries[0];
    assert!(se.metadata.name.len() <= 63 && se.metadata.name.starts_with("strait-rrr"));
    assert_eq!(out.workload_entries.len(), 2);
    let (a, b) = (
        &out.workload_entries[0].metadata.name,
        &out.workload_entries[1].metadata.name,
    );
    assert_ne!(a, b);
    for name in [&se.metadata.name, a, b] {
        assert!(name.len() <= 63, "{name}");
        assert!(names::is_dns1123_subdomain(name), "{name}");
        assert!(names::is_label_value(name), "{name}");
    }
    for w in &out.workload_entries {
        for (k, v) in w.metadata.labels.iter().chain(&w.spec.labels) {
            assert!(
                names::is_label_key(k) && names::is_label_value(v),
                "{k}={v}"
            );
        }
    }
    assert_eq!(out.service_imports[0].metadata.name, long_svc);
}

#[test]
fn yaml_and_json_output() {
    let out = import_objects(&west(), &[export(east(), "reviews", 3)], &[local_reviews()]);
    let yaml = out.to_yaml().unwrap();
    assert_eq!(yaml.matches("\n---\n").count(), 2, "{yaml}");
    assert!(
        yaml.starts_with("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"),
        "{yaml}"
    );
    let values = out.to_json_values().unwrap();
    let kinds: Vec<&str> = values.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ServiceEntry", "WorkloadEntry", "ServiceImport"]);
    // The YAML parses back to the same objects.
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    assert_eq!(docs, values);
    assert_eq!(ImportObjects::default().to_yaml().unwrap(), "");
    assert!(ImportObjects::default().is_empty());
}

#[test]
fn ip_slugs() {
    assert_eq!(ip_slug(&"10.0.0.7".parse().unwrap()), "10-0-0-7");
    assert_eq!(ip_slug(&"fd00::7".parse().unwrap()), "fd00-0-0-0-0-0-0-7");
    assert_eq!(ip_slug(&"::".parse().unwrap()), "0-0-0-0-0-0-0-0");
}

#[test]
fn endpoint_labels_reach_entries_but_never_override_the_selector() {
    let mut r = export(east(), "reviews", 3);
    r.service.endpoint_labels = BTreeMap::from([
        ("version".into(), "v1".into()),
        ("app".into(), "other".into()),
    ]);
    let out = import_objects(&west(), &[r], &[local_reviews()]);
    let we = &out.workload_entries[0];
    assert_eq!(we.spec.labels["version"], "v1");
    // The local selector still selects the entry.
    assert_eq!(we.spec.labels["app"], "reviews");
    let ep = &out.service_entries[0].spec.endpoints[0];
    assert_eq!(ep.labels["version"], "v1");
}

#[test]
fn clusterset_ips_reach_the_service_entry_and_the_service_import() {
    let mut out = import_objects(
        &west(),
        &[export(east(), "reviews", 3), export(east(), "ratings", 1)],
        &[],
    );
    assert!(
        out.service_entries
            .iter()
            .all(|se| se.spec.addresses.is_empty()),
        "import_objects leaves addresses to the importer"
    );
    let reviews = "reviews.bookinfo.svc.clusterset.local".to_string();
    let kept: std::net::Ipv4Addr = "240.241.7.7".parse().unwrap();
    let range = vips::VipRange::default();
    out.assign_clusterset_ips(&range, &BTreeMap::from([(reviews.clone(), kept)]));
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let mut seen = BTreeSet::new();
    for se in &out.service_entries {
        let [ip] = se.spec.addresses.as_slice() else {
            panic!("{}: {:?}", se.spec.hosts[0], se.spec.addresses);
        };
        assert!(range.contains(ip.parse().unwrap()), "{ip}");
        assert!(seen.insert(ip.clone()), "{ip} given twice");
        if se.spec.hosts[0] == reviews {
            assert_eq!(*ip, kept.to_string(), "the previous address is kept");
        }
        let si = out
            .service_imports
            .iter()
            .find(|si| se.spec.hosts[0].starts_with(&format!("{}.", si.metadata.name)))
            .unwrap();
        assert_eq!(si.spec.ips, se.spec.addresses, "{}", si.metadata.name);
    }
    assert_eq!(seen.len(), 2);

    // A /30 gives out two addresses: of three services, one is imported
    // without, and a warning names it.
    let tiny: vips::VipRange = "10.0.0.0/30".parse().unwrap();
    let mut out3 = import_objects(
        &west(),
        &[
            export(east(), "reviews", 3),
            export(east(), "ratings", 1),
            export(east(), "details", 1),
        ],
        &[],
    );
    out3.assign_clusterset_ips(&tiny, &BTreeMap::new());
    let without: Vec<_> = out3
        .service_entries
        .iter()
        .filter(|se| se.spec.addresses.is_empty())
        .collect();
    assert_eq!(without.len(), 1);
    let host = &without[0].spec.hosts[0];
    assert_eq!(
        out3.warnings,
        vec![ImportWarning::NoClusterSetIp {
            host: host.clone(),
            range: "10.0.0.0/30".into()
        }]
    );
    let si = out3
        .service_imports
        .iter()
        .find(|si| host.starts_with(&format!("{}.", si.metadata.name)))
        .unwrap();
    assert!(si.spec.ips.is_empty());
}
