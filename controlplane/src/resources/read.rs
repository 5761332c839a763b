//! Reading the config's objects: string maps, ports and their protocols,
//! a Service's cluster IPs, WorkloadEntry-shaped endpoints.

use super::*;

/// The elements of a JSON array with their indexes (none when `v` is
/// not an array).
pub(super) fn items(v: &Value) -> std::iter::Enumerate<std::slice::Iter<'_, Value>> {
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
}

pub(super) use strait_model::local::str_map;

/// A Kubernetes Service's cluster IPs (`spec.clusterIPs`, else
/// `spec.clusterIP`): none for a headless Service (`None`) or one not
/// allocated yet. An address that is not an IP is left out with a
/// warning.
pub(super) fn cluster_ips(b: &mut Builder<'_>, what: &str, spec: &Value) -> Vec<String> {
    let listed: Vec<&Value> = match spec["clusterIPs"].as_array() {
        Some(ips) => ips.iter().collect(),
        None => vec![&spec["clusterIP"]],
    };
    let mut out = Vec::new();
    for v in listed {
        match v.as_str() {
            None | Some("" | "None") => {}
            Some(text) => match text.parse::<std::net::IpAddr>() {
                Ok(ip) if !out.contains(&ip.to_string()) => out.push(ip.to_string()),
                Ok(_) => {}
                Err(_) => b.warnings.push(format!(
                    "{what}: spec.clusterIP {text:?} is not an IP address; left out"
                )),
            },
        }
    }
    out
}

pub(super) fn port_number(v: &Value) -> Option<u32> {
    v.as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0)
        .map(u32::from)
}

/// A port's `appProtocol` that names no protocol strait knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("appProtocol {0:?} is not a protocol strait knows")]
pub(super) struct UnknownProtocol(pub(super) String);

/// Istio's protocol of a port: `appProtocol`, else the name's prefix, else
/// TCP. Lowercase Istio names.
pub(super) fn protocol_of(
    app_protocol: Option<&str>,
    name: &str,
) -> Result<String, UnknownProtocol> {
    let p = match app_protocol {
        Some(app) => Protocol::parse(app)
            .ok()
            .or_else(|| Protocol::ALL.into_iter().find(|p| p.app_protocol() == app))
            .ok_or_else(|| UnknownProtocol(app.to_string()))?,
        None => Protocol::from_port_name(name).unwrap_or(Protocol::Tcp),
    };
    Ok(p.as_str().to_ascii_lowercase())
}

/// A `WorkloadEntry` (or a `ServiceEntry` endpoint), read.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) address: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) ports: BTreeMap<String, u32>,
    pub(super) network: String,
    pub(super) locality: String,
    pub(super) weight: u32,
    pub(super) service_account: Option<String>,
    pub(super) inbound_port: u32,
}

/// Why a `WorkloadEntry` (a `ServiceEntry` endpoint) is left out: the
/// field and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum EntryError {
    #[error("address is missing")]
    NoAddress,
    #[error("ports.{name}: {value} is not a port number")]
    Port { name: String, value: Value },
    #[error("weight: {0} is not a non-negative integer")]
    Weight(Value),
    #[error("annotation {INBOUND_PORT_ANNOTATION}: {0:?} is not a port number")]
    InboundPort(String),
}

pub(super) fn read_entry(
    namespace: &str,
    name: &str,
    spec: &Value,
    annotations: &BTreeMap<String, String>,
) -> Result<Entry, EntryError> {
    let address = spec["address"]
        .as_str()
        .filter(|a| !a.is_empty())
        .ok_or(EntryError::NoAddress)?
        .to_string();
    let mut ports = BTreeMap::new();
    if let Some(map) = spec["ports"].as_object() {
        for (port_name, v) in map {
            let n = port_number(v).ok_or_else(|| EntryError::Port {
                name: port_name.clone(),
                value: v.clone(),
            })?;
            ports.insert(port_name.clone(), n);
        }
    }
    let weight = match &spec["weight"] {
        Value::Null => 1,
        v => v
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or_else(|| EntryError::Weight(v.clone()))?
            .max(1),
    };
    let inbound_port = match annotations.get(INBOUND_PORT_ANNOTATION) {
        None => SIDECAR_INBOUND_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(u32::from)
            .ok_or_else(|| EntryError::InboundPort(p.clone()))?,
    };
    Ok(Entry {
        namespace: namespace.to_string(),
        name: name.to_string(),
        address,
        labels: str_map(spec.get("labels")),
        ports,
        network: spec["network"].as_str().unwrap_or_default().to_string(),
        locality: spec["locality"].as_str().unwrap_or_default().to_string(),
        weight,
        service_account: spec["serviceAccount"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        inbound_port,
    })
}
