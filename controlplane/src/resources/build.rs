//! The steps of [`super::build`], one per kind of resource: workloads,
//! services (Kubernetes Services, then ServiceEntries), policies, gateway
//! routes, trust bundles and networks.

use super::*;

/// The objects of `kind` in `config`.
pub(super) fn of_kind<'c>(
    config: &'c Config,
    kind: &'static str,
) -> impl Iterator<Item = (&'c ObjectKey, &'c Value)> {
    config
        .objects
        .iter()
        .filter(move |(k, _)| k.kind == kind)
        .map(|(k, o)| (k, &o.value))
}

/// The WorkloadEntries of the config (a bad one left out, with a warning).
pub(super) fn workload_entries(b: &mut Builder<'_>, config: &Config) -> Vec<Entry> {
    // WorkloadEntries.
    let mut entries: Vec<Entry> = Vec::new();
    for (key, doc) in of_kind(config, "WorkloadEntry") {
        let annotations = str_map(doc["metadata"].get("annotations"));
        match read_entry(&key.namespace, &key.name, &doc["spec"], &annotations) {
            Ok(e) => entries.push(e),
            Err(reason) => b.warnings.push(format!("{key}: {reason}")),
        }
    }
    entries
}

/// The local workloads, from their WorkloadEntries.
pub(super) fn insert_workloads(b: &mut Builder<'_>, snap: &mut Snapshot, entries: &[Entry]) {
    let ctx = b.ctx;
    // Workloads.
    for e in entries
        .iter()
        .filter(|e| b.is_local(e))
        .cloned()
        .collect::<Vec<_>>()
    {
        let what = format!("WorkloadEntry {}/{}", e.namespace, e.name);
        let sa = e
            .service_account
            .clone()
            .unwrap_or_else(|| "default".into());
        let identity = b.identity(&what, &e.namespace, &sa).unwrap_or_default();
        let w = pb::Workload {
            name: e.name.clone(),
            namespace: e.namespace.clone(),
            address: e.address.clone(),
            labels: e.labels.clone().into_iter().collect(),
            service_account: sa,
            identity,
            locality: if e.locality.is_empty() {
                ctx.locality.clone().unwrap_or_default()
            } else {
                e.locality.clone()
            },
            network: ctx.network.clone(),
            cluster: ctx.cluster.clone(),
            ports: e.ports.clone().into_iter().collect(),
        };
        snap.insert(
            type_url::WORKLOAD,
            &format!("{}/{}", e.namespace, e.name),
            &w,
        );
    }
}

/// Every service: Kubernetes Services, then clusterset ServiceEntries
/// without a local Service, then other ServiceEntries (a host already
/// served is left out with a warning).
pub(super) fn services(
    b: &mut Builder<'_>,
    config: &Config,
    entries: &[Entry],
) -> BTreeMap<String, pb::Service> {
    // ServiceExports, by (namespace, name).
    let service_exports: BTreeMap<(String, String), BTreeMap<String, String>> =
        of_kind(config, "ServiceExport")
            .map(|(k, doc)| {
                (
                    (k.namespace.clone(), k.name.clone()),
                    str_map(doc["metadata"].get("annotations")),
                )
            })
            .collect();

    // ServiceEntries, split by whether they name a clusterset service.
    let mut clusterset_entries: BTreeMap<(String, String), Vec<ServiceEntryObj<'_>>> =
        BTreeMap::new();
    let mut other_entries = Vec::new();
    for (key, doc) in of_kind(config, "ServiceEntry") {
        let hosts: Vec<String> = doc["spec"]["hosts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| h.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let Some(first) = hosts.first() else {
            b.warnings.push(format!("{key}: spec.hosts is empty"));
            continue;
        };
        let obj = ServiceEntryObj {
            key,
            doc,
            hosts: hosts.clone(),
        };
        match clusterset_key(first) {
            Some(k) => clusterset_entries.entry(k).or_default().push(obj),
            None => other_entries.push(obj),
        }
    }

    let mut services: BTreeMap<String, pb::Service> = BTreeMap::new();

    // Kubernetes Services.
    for (key, doc) in of_kind(config, "Service") {
        let s = kube_service(
            b,
            key,
            doc,
            entries,
            &service_exports,
            &mut clusterset_entries,
        );
        services.insert(s.hostname.clone(), s);
    }

    // ServiceEntries of clusterset services without a local Service.
    for ((svc, ns), ses) in clusterset_entries {
        let mut ses = ses.into_iter();
        let Some(se) = ses.next() else { continue };
        for dup in ses {
            b.warnings.push(format!(
                "{}: host {} is already served by {}; left out",
                dup.key, dup.hosts[0], se.key
            ));
        }
        let hostname = format!("{svc}.{ns}.{CLUSTER_SUFFIX}");
        let mut aliases = vec![se.hosts[0].clone(), format!("{svc}.{ns}")];
        aliases.extend(se.hosts.iter().skip(1).cloned());
        let s = entry_service(b, &se, hostname.clone(), &ns, &svc, aliases);
        services.insert(hostname, s);
    }

    // Other ServiceEntries.
    for se in other_entries {
        let hostname = se.hosts[0].clone();
        if services.contains_key(&hostname)
            || services.values().any(|s| s.aliases.contains(&hostname))
        {
            b.warnings.push(format!(
                "{}: host {hostname} is already a service; left out",
                se.key
            ));
            continue;
        }
        let aliases = se.hosts[1..].to_vec();
        let (ns, name) = (se.key.namespace.clone(), se.key.name.clone());
        let s = entry_service(b, &se, hostname.clone(), &ns, &name, aliases);
        services.insert(hostname, s);
    }
    services
}

/// The service of a Kubernetes Service: its ports, its endpoints (the
/// WorkloadEntries it selects), identities and addresses (with those of
/// the clusterset ServiceEntries of the same name, namespace sameness).
pub(super) fn kube_service(
    b: &mut Builder<'_>,
    key: &ObjectKey,
    doc: &Value,
    entries: &[Entry],
    service_exports: &BTreeMap<(String, String), BTreeMap<String, String>>,
    clusterset_entries: &mut BTreeMap<(String, String), Vec<ServiceEntryObj<'_>>>,
) -> pb::Service {
    let (ns, name) = (key.namespace.as_str(), key.name.as_str());
    let what = key.to_string();
    let mut ports = Vec::new();
    for (i, p) in items(&doc["spec"]["ports"]) {
        let Some(number) = port_number(&p["port"]) else {
            b.warnings.push(format!(
                "{what}: spec.ports[{i}].port is not a port number; port left out"
            ));
            continue;
        };
        let port_name = p["name"].as_str().unwrap_or_default().to_string();
        let protocol = protocol_of(p["appProtocol"].as_str(), &port_name).unwrap_or_else(|e| {
            b.warnings
                .push(format!("{what}: spec.ports[{i}]: {e}; served as tcp"));
            "tcp".into()
        });
        ports.push(pb::Port {
            name: port_name,
            port: number,
            protocol,
            target_port: port_number(&p["targetPort"]).unwrap_or_default(),
        });
    }
    let addresses = cluster_ips(b, &what, &doc["spec"]);
    let annotations = str_map(doc["metadata"].get("annotations"));
    let svc_ref = ObjectRef::new(ObjectKind::Service, ns, name);
    let se = service_exports
        .get(&(ns.to_string(), name.to_string()))
        .map(|a| (ObjectRef::new(ObjectKind::ServiceExport, ns, name), a));
    let exported = match export::export_decision_with_service_export(
        &svc_ref,
        &annotations,
        se.as_ref().map(|(r, a)| (r, *a)),
    ) {
        Ok(to) => to.is_some(),
        Err(e) => {
            b.warnings.push(format!("{e}; not exported"));
            false
        }
    };
    let selector = str_map(doc["spec"].get("selector"));
    let port_names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
    let mut endpoints = Vec::new();
    let mut identities = BTreeSet::new();
    for e in entries.iter().filter(|e| {
        e.namespace == ns
            && !selector.is_empty()
            && selector.iter().all(|(k, v)| e.labels.get(k) == Some(v))
    }) {
        let ep = b.endpoint(
            &format!("WorkloadEntry {}/{}", e.namespace, e.name),
            e,
            &port_names,
        );
        if !ep.identity.is_empty() {
            identities.insert(ep.identity.clone());
        } else if let Some(sa) = &e.service_account
            && let Some(id) = b.identity(&what, ns, sa)
        {
            identities.insert(id);
        }
        endpoints.push(ep);
    }
    sort_endpoints(&mut endpoints);
    // Namespace sameness: the clusterset entries of this service add
    // their identities (their endpoints are the WorkloadEntries above)
    // and their addresses (the ClusterSet IP, beside the cluster IP).
    let mut addresses = addresses;
    if let Some(ses) = clusterset_entries.remove(&(name.to_string(), ns.to_string())) {
        for se in ses {
            identities.extend(sans(&se));
            for a in service_entry::entry_addresses(b, &se.key.to_string(), &se.doc["spec"]) {
                if !addresses.contains(&a) {
                    addresses.push(a);
                }
            }
        }
    }
    let hostname = format!("{name}.{ns}.{CLUSTER_SUFFIX}");
    pb::Service {
        hostname,
        namespace: ns.to_string(),
        name: name.to_string(),
        aliases: vec![
            format!("{name}.{ns}.{CLUSTERSET_SUFFIX}"),
            format!("{name}.{ns}"),
        ],
        ports,
        identities: identities.into_iter().collect(),
        exported,
        endpoints,
        addresses,
    }
}

/// The Istio policies, each validated on its own; returns the
/// DestinationRules (their subsets make the gateway routes').
pub(super) fn insert_policies<'c>(
    b: &mut Builder<'_>,
    snap: &mut Snapshot,
    config: &'c Config,
) -> Vec<(&'c ObjectKey, Value)> {
    // Policies.
    let mut destination_rules = Vec::new();
    // An object written without `spec` means what `spec: {}` means
    // (Kubernetes drops an empty spec on the way in): for an
    // AuthorizationPolicy that is Istio's allow-nothing, which must deny
    // every request of the workloads it selects, not vanish.
    let empty_spec = Value::Object(serde_json::Map::new());
    for kind in POLICY_KINDS {
        for (key, doc) in of_kind(config, kind) {
            let spec = match &doc["spec"] {
                Value::Null => &empty_spec,
                spec => spec,
            };
            if let Err(problems) = strait_model::istio::parse(kind, spec) {
                b.warnings
                    .push(format!("{key}: {}; left out", problems.join("; ")));
                continue;
            }
            let spec_json = serde_json::to_string(spec).unwrap_or_else(|_| "null".into());
            let generation = doc["metadata"]["generation"]
                .as_u64()
                .unwrap_or_else(|| strait_model::names::fnv1a64(spec_json.as_bytes()));
            snap.insert(
                type_url::POLICY,
                &format!("{kind}/{}/{}", key.namespace, key.name),
                &pb::Policy {
                    kind: kind.to_string(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    spec_json,
                    generation,
                },
            );
            if kind == "DestinationRule" {
                destination_rules.push((key, spec.clone()));
            }
        }
    }
    destination_rules
}

/// A gateway route per exported service, with its subsets and its local
/// (sidecar) endpoints.
pub(super) fn insert_gateway_routes(
    b: &mut Builder<'_>,
    snap: &mut Snapshot,
    services: &BTreeMap<String, pb::Service>,
    destination_rules: &[(&ObjectKey, Value)],
) {
    // Gateway routes.
    for s in services.values().filter(|s| s.exported) {
        let mut subsets: BTreeMap<String, (String, pb::Labels)> = BTreeMap::new();
        for (key, spec) in destination_rules {
            let host = resolve_host(spec["host"].as_str().unwrap_or_default(), &key.namespace);
            if host != s.hostname && !s.aliases.contains(&host) {
                continue;
            }
            for subset in spec["subsets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let name = subset["name"].as_str().unwrap_or_default().to_string();
                let labels = pb::Labels {
                    labels: str_map(subset.get("labels")).into_iter().collect(),
                };
                match subsets.get(&name) {
                    Some((first, _)) => b.warnings.push(format!(
                        "{key}: subset {name:?} of {} is already defined by {first}; left out",
                        s.hostname
                    )),
                    None => {
                        subsets.insert(name, (key.to_string(), labels));
                    }
                }
            }
        }
        let endpoints = s
            .endpoints
            .iter()
            .filter(|e| e.kind == pb::endpoint::Kind::Sidecar as i32)
            .map(|e| pb::GatewayEndpoint {
                address: e.address.clone(),
                ports: s.ports.iter().map(|p| (p.port, e.port)).collect(),
                labels: e.labels.clone(),
                healthy: e.healthy,
            })
            .collect();
        snap.insert(
            type_url::GATEWAY_ROUTE,
            &s.hostname,
            &pb::GatewayRoute {
                hostname: s.hostname.clone(),
                ports: s.ports.iter().map(|p| p.port).collect(),
                subsets: subsets.into_iter().map(|(n, (_, l))| (n, l)).collect(),
                endpoints,
            },
        );
    }
}

/// The local trust bundle (with the deny-list and, when bound, what each
/// cluster runs) and the peered meshes' bundles.
pub(super) fn insert_trust_bundles(b: &mut Builder<'_>, snap: &mut Snapshot, trust: &TrustInput) {
    let ctx = b.ctx;
    // Trust bundles.
    let denied: Vec<String> = trust.denied_intermediates.iter().cloned().collect();
    let local_td = ctx.trust_domain.to_string();
    snap.insert(
        type_url::TRUST_BUNDLE,
        &local_td,
        &pb::TrustBundle {
            trust_domain: local_td.clone(),
            roots_pem: trust.local_roots_pem.clone(),
            denied_intermediates: denied.clone(),
            local: true,
            bind_identities: trust.cluster_identities.is_some(),
            cluster_identities: trust
                .cluster_identities
                .iter()
                .flatten()
                .map(|(c, names)| {
                    (
                        c.clone(),
                        pb::ServiceAccountList {
                            names: names.iter().cloned().collect(),
                        },
                    )
                })
                .collect(),
        },
    );
    for (td, roots) in &trust.federated {
        if *td == local_td {
            b.warnings.push(format!(
                "federated trust domain {td} is this cluster's own; its federated roots are left out"
            ));
            continue;
        }
        snap.insert(
            type_url::TRUST_BUNDLE,
            td,
            &pb::TrustBundle {
                trust_domain: td.clone(),
                roots_pem: roots.clone(),
                denied_intermediates: denied.clone(),
                local: false,
                // A peered mesh's identities are its own broker's business.
                bind_identities: false,
                cluster_identities: Default::default(),
            },
        );
    }
}

/// The networks and how to reach them.
pub(super) fn insert_networks(snap: &mut Snapshot, networks: &[NetworkInput]) {
    // Networks.
    for n in networks {
        snap.insert(
            type_url::NETWORK,
            &n.name,
            &pb::Network {
                name: n.name.clone(),
                gateways: n.gateways.clone(),
                mode: match n.mode {
                    NetworkMode::Sni => pb::network::Mode::Sni as i32,
                    NetworkMode::Quic => pb::network::Mode::Quic as i32,
                },
                tunnels: n.tunnels.clone(),
            },
        );
    }
}
