//! `ServiceEntry` objects as discovery resources: the Service an entry
//! stands for on its own (imports without a local Service of the same
//! name), the identities its `subjectAltNames` add, and whether it is
//! exported.

use super::*;

/// A `ServiceEntry` of the config, with its hosts read.
pub(super) struct ServiceEntryObj<'a> {
    pub(super) key: &'a ObjectKey,
    pub(super) doc: &'a Value,
    pub(super) hosts: Vec<String>,
}

pub(super) fn sans(se: &ServiceEntryObj<'_>) -> Vec<String> {
    se.doc["spec"]["subjectAltNames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A Service resource from a ServiceEntry: its ports, endpoints and SANs.
pub(super) fn entry_service(
    b: &mut Builder<'_>,
    se: &ServiceEntryObj<'_>,
    hostname: String,
    namespace: &str,
    name: &str,
    aliases: Vec<String>,
) -> pb::Service {
    let what = se.key.to_string();
    let spec = &se.doc["spec"];
    let mut ports = Vec::new();
    for (i, p) in items(&spec["ports"]) {
        let Some(number) = port_number(&p["number"]) else {
            b.warnings.push(format!(
                "{what}: spec.ports[{i}].number is not a port number; port left out"
            ));
            continue;
        };
        let port_name = p["name"].as_str().unwrap_or_default().to_string();
        let protocol = match p["protocol"].as_str() {
            Some(proto) => Protocol::parse(proto)
                .ok()
                .map(|p| p.as_str().to_ascii_lowercase()),
            None => protocol_of(None, &port_name).ok(),
        }
        .unwrap_or_else(|| {
            b.warnings.push(format!(
                "{what}: spec.ports[{i}].protocol {:?} is not a protocol strait knows; served as tcp",
                p["protocol"].as_str().unwrap_or_default()
            ));
            "tcp".into()
        });
        ports.push(pb::Port {
            name: port_name,
            port: number,
            protocol,
            target_port: port_number(&p["targetPort"]).unwrap_or_default(),
        });
    }
    let port_names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
    let mut identities: BTreeSet<String> = sans(se).into_iter().collect();
    let mut endpoints = Vec::new();
    for (i, ep) in items(&spec["endpoints"]) {
        let ep_what = format!("{what}: spec.endpoints[{i}]");
        match read_entry(&se.key.namespace, "", ep, &BTreeMap::new()) {
            Ok(mut e) => {
                // An entry's endpoints are not workloads with a name; the
                // namespace of the identity is the service's.
                e.namespace = namespace.to_string();
                let ep = b.endpoint(&ep_what, &e, &port_names);
                if !ep.identity.is_empty() {
                    identities.insert(ep.identity.clone());
                }
                endpoints.push(ep);
            }
            Err(reason) => b.warnings.push(format!("{ep_what}: {reason}; left out")),
        }
    }
    if !spec["workloadSelector"].is_null() {
        b.warnings.push(format!(
            "{what}: spec.workloadSelector is not supported; use spec.endpoints"
        ));
    }
    sort_endpoints(&mut endpoints);
    pb::Service {
        hostname,
        namespace: namespace.to_string(),
        name: name.to_string(),
        aliases,
        ports,
        identities: identities.into_iter().collect(),
        exported: export_flag_of_entry(b, se),
        endpoints,
        addresses: entry_addresses(b, &what, spec),
    }
}

/// A ServiceEntry's `spec.addresses` that are single IPs (a `/32` or
/// `/128` counts as one): the virtual IPs a redirected connection is
/// routed by. CIDR ranges are left out with a warning.
pub(super) fn entry_addresses(
    b: &mut Builder<'_>,
    what: &str,
    spec: &serde_json::Value,
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in items(&spec["addresses"]) {
        let text = a.as_str().unwrap_or_default();
        let single = match text.split_once('/') {
            None => Some(text),
            Some((ip, "32")) if ip.parse::<std::net::Ipv4Addr>().is_ok() => Some(ip),
            Some((ip, "128")) if ip.parse::<std::net::Ipv6Addr>().is_ok() => Some(ip),
            Some(_) => None,
        };
        match single.and_then(|ip| ip.parse::<std::net::IpAddr>().ok()) {
            Some(ip) => out.push(ip.to_string()),
            None => b.warnings.push(format!(
                "{what}: spec.addresses[{i}] {text:?} is not a single IP address; not used to route connections"
            )),
        }
    }
    out
}

fn export_flag_of_entry(b: &mut Builder<'_>, se: &ServiceEntryObj<'_>) -> bool {
    let annotations = str_map(se.doc["metadata"].get("annotations"));
    let r = ObjectRef::new(ObjectKind::ServiceEntry, &se.key.namespace, &se.key.name);
    match export::export_decision(&r, &annotations) {
        Ok(to) => to.is_some(),
        Err(e) => {
            b.warnings.push(format!("{e}; not exported"));
            false
        }
    }
}
