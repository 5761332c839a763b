//! Whole-object validation of the Kubernetes-style objects a cluster's
//! config holds, as the Kubernetes API server (core kinds) and Istio's
//! validation webhook (Istio kinds) would judge them before storing them.
//!
//! The config boundary (a control plane reading its config directory or
//! its Kubernetes API) runs [`validate_object`] on every object, so that an
//! object that breaks a rule is refused *as a whole*, named with every bad
//! field, and its last good version stays in force. Without it, a bad
//! field was dropped further in (a Service port of 99999 left out), which
//! could silently change what the object means (the Service no longer
//! exported).
//!
//! What is checked:
//!
//! - **metadata**, every kind: `name` (a DNS-1035 label for a `Service`, a
//!   DNS-1123 label for a `Namespace`, a DNS-1123 subdomain otherwise),
//!   `namespace` (a DNS-1123 label), `labels` (qualified-name keys, label
//!   values), `annotations` (qualified-name keys, string values, 256 KiB in
//!   all), and strait's own annotations: `strait.io/export`,
//!   `strait.io/export-to` (see [`crate::export`]) and
//!   `strait.io/inbound-port`.
//! - **Service**: `type`; `ports` (required unless headless or
//!   `ExternalName`; `port` 1–65535; `targetPort` 1–65535 or an IANA
//!   service name; `protocol` TCP, UDP or SCTP; `appProtocol` a qualified
//!   name; `name` a DNS-1123 label, required when there are several ports;
//!   names unique, port and protocol unique; `nodePort` 1–65535);
//!   `selector` (as labels); `clusterIP`/`clusterIPs` (IPs, or `None`);
//!   `externalName`.
//! - **WorkloadEntry** and each `ServiceEntry` endpoint: `address` (an IP,
//!   an FQDN or `unix://`; required unless `network` is set); `ports` (Istio
//!   port names → 1–65535; for an endpoint, names of the entry's ports);
//!   `labels`; `weight` (a 32-bit unsigned integer); `locality`
//!   (`region[/zone[/subzone]]`); string fields are strings.
//! - **ServiceEntry**: `hosts` (required; FQDNs, `*.` wildcards allowed),
//!   `addresses` (IPs or CIDRs), `ports` (Istio port names, 1–65535, an
//!   Istio protocol, names and numbers unique), `resolution`, `location`,
//!   `subjectAltNames`, `endpoints`.
//! - **ServiceImport**: `spec.ips` are IPs.
//! - **VirtualService**, **DestinationRule**, **PeerAuthentication**,
//!   **AuthorizationPolicy**, **Sidecar**: [`crate::istio::parse`].
//!
//! Errors follow Kubernetes' `field.Error`: the field path
//! (`spec.ports[0].port`), what is wrong, and the bad value
//! (`spec.ports[0].port: Invalid value: 99999: must be between 1 and
//! 65535, inclusive`). Every error of an object is reported, not only the
//! first.

pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value;

use crate::export::{self, EXPORT_ANNOTATION, ExportError, ObjectKind, ObjectRef};
use crate::mesh::Locality;

/// The annotation naming a workload's sidecar inbound port.
pub const INBOUND_PORT_ANNOTATION: &str = "strait.io/inbound-port";
/// Kubernetes' limit on all of an object's annotations together.
pub const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// The Service protocols Kubernetes accepts.
pub const SERVICE_PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];
/// The Service types Kubernetes accepts.
pub const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
/// The protocols Istio accepts on a `ServiceEntry` port (case-insensitive).
pub const ISTIO_PROTOCOLS: &[&str] = &[
    "HTTP",
    "HTTPS",
    "HTTP2",
    "HTTP_PROXY",
    "GRPC",
    "GRPC-Web",
    "TCP",
    "TLS",
    "UDP",
    "Mongo",
    "Redis",
    "MySQL",
];
/// `ServiceEntry` resolutions.
pub const RESOLUTIONS: &[&str] = &["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"];
/// `ServiceEntry` locations.
pub const LOCATIONS: &[&str] = &["MESH_EXTERNAL", "MESH_INTERNAL"];
/// The Istio policy kinds validated by [`crate::istio::parse`].
const POLICY_KINDS: [&str; 5] = [
    "VirtualService",
    "DestinationRule",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "Sidecar",
];

/// What is wrong with one field, as Kubernetes' `field.ErrorType` says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The field is missing (the text says why it is needed, or is empty).
    Required(String),
    /// The value breaks a rule.
    Invalid { value: String, detail: String },
    /// The value is given twice where it must be unique.
    Duplicate { value: String },
    /// The value is not one of a fixed set.
    NotSupported {
        value: String,
        supported: &'static [&'static str],
    },
    /// A rule whose message names its own field: a policy kind's
    /// ([`crate::istio::parse`]) or an export annotation's
    /// ([`crate::export`]).
    Rule(String),
}

/// One bad field of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, as Kubernetes writes it: `spec.ports[0].port`,
    /// `metadata.labels[app]`.
    pub field: String,
    pub kind: ErrorKind,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Required(d) if d.is_empty() => write!(f, "{}: Required value", self.field),
            ErrorKind::Required(d) => write!(f, "{}: Required value: {d}", self.field),
            ErrorKind::Invalid { value, detail } => {
                write!(f, "{}: Invalid value: {value}: {detail}", self.field)
            }
            ErrorKind::Duplicate { value } => {
                write!(f, "{}: Duplicate value: {value}", self.field)
            }
            ErrorKind::NotSupported { value, supported } => {
                let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
                write!(
                    f,
                    "{}: Unsupported value: {value}: supported values: {}",
                    self.field,
                    list.join(", ")
                )
            }
            ErrorKind::Rule(p) => f.write_str(p),
        }
    }
}

/// Why an object is refused: every bad field (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidObject {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A value as an error shows it: JSON (strings quoted), cut to 80 chars.
fn shown(v: &Value) -> String {
    let text = v.to_string();
    if text.len() <= 80 {
        return text;
    }
    let mut cut = 77;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &text[..cut])
}

fn shown_str(s: &str) -> String {
    shown(&Value::String(s.to_string()))
}

/// The errors found so far.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, kind: ErrorKind) {
        self.0.push(FieldError {
            field: field.into(),
            kind,
        });
    }

    fn required(&mut self, field: impl Into<String>, detail: &str) {
        self.push(field, ErrorKind::Required(detail.to_string()));
    }

    fn invalid(&mut self, field: impl Into<String>, value: &Value, detail: impl Into<String>) {
        self.push(
            field,
            ErrorKind::Invalid {
                value: shown(value),
                detail: detail.into(),
            },
        );
    }

    /// An error for `value` at `field` when `rule` has messages.
    fn rule(&mut self, field: impl Into<String>, value: &str, rule: fn(&str) -> Vec<String>) {
        let msgs = rule(value);
        if !msgs.is_empty() {
            self.push(
                field,
                ErrorKind::Invalid {
                    value: shown_str(value),
                    detail: msgs.join("; "),
                },
            );
        }
    }

    fn not_supported(
        &mut self,
        field: impl Into<String>,
        value: &str,
        supported: &'static [&'static str],
    ) {
        self.push(
            field,
            ErrorKind::NotSupported {
                value: shown_str(value),
                supported,
            },
        );
    }

    /// `v` as a string, or an error (`None`) when it is something else.
    /// A missing field (`null`) is `Some("")`-free: `None` without an error.
    fn string<'v>(&mut self, field: &str, v: &'v Value) -> Option<&'v str> {
        match v {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => {
                self.invalid(field, other, "must be a string");
                None
            }
        }
    }

    /// `v` as a mapping (empty for a missing field), or an error.
    fn mapping<'v>(
        &mut self,
        field: &str,
        v: &'v Value,
    ) -> Option<&'v serde_json::Map<String, Value>> {
        match v {
            Value::Null => None,
            Value::Object(m) => Some(m),
            other => {
                self.invalid(field, other, "must be a mapping");
                None
            }
        }
    }

    /// `v` as a sequence (empty for a missing field), or an error.
    fn sequence<'v>(&mut self, field: &str, v: &'v Value) -> &'v [Value] {
        match v {
            Value::Null => &[],
            Value::Array(a) => a,
            other => {
                self.invalid(field, other, "must be a list");
                &[]
            }
        }
    }

    /// `v` as an integer (`None` when missing), or an error.
    fn integer(&mut self, field: &str, v: &Value) -> Option<i64> {
        match v {
            Value::Null => None,
            Value::Number(n) => match n.as_i64() {
                Some(i) => Some(i),
                // Beyond i64: out of every range checked here.
                None if n.as_u64().is_some() => Some(i64::MAX),
                None => {
                    self.invalid(field, v, "must be an integer");
                    None
                }
            },
            other => {
                self.invalid(field, other, "must be an integer");
                None
            }
        }
    }

    /// A port number field: an integer 1–65535 (`None` when missing).
    fn port(&mut self, field: &str, v: &Value) -> Option<i64> {
        let n = self.integer(field, v)?;
        let msgs = rules::port_num(n);
        if msgs.is_empty() {
            Some(n)
        } else {
            self.invalid(field, v, msgs.join("; "));
            None
        }
    }

    /// A map of string keys to string values whose keys are qualified
    /// names and values label values (`metadata.labels`, a selector).
    fn labels(&mut self, field: &str, v: &Value) {
        let Some(map) = self.mapping(field, v) else {
            return;
        };
        for (k, val) in map {
            self.rule(field, k, rules::qualified_name);
            let at = format!("{field}[{k}]");
            match val {
                Value::String(s) => self.rule(at, s, rules::label_value),
                other => self.invalid(at, other, "must be a string"),
            }
        }
    }
}

/// How an object's name is checked, by kind (Kubernetes' `ValidateObjectMeta`
/// name functions).
fn name_rule(kind: &str) -> fn(&str) -> Vec<String> {
    match kind {
        // ValidateServiceName: NameIsDNS1035Label.
        "Service" => rules::dns1035_label,
        // ValidateNamespaceName: NameIsDNSLabel.
        "Namespace" => rules::dns1123_label,
        // Custom resources and the rest: NameIsDNSSubdomain.
        _ => rules::dns1123_subdomain,
    }
}

/// Validates a whole object (`apiVersion`, `kind`, `metadata`, `spec`) by
/// the rules of its kind (the module documentation lists them). Kinds
/// without rules of their own get the metadata rules.
pub fn validate_object(doc: &Value) -> Result<(), InvalidObject> {
    let mut e = Errors::default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let annotations = metadata(&mut e, kind, doc);
    let spec = &doc["spec"];
    match kind {
        "Service" => service(&mut e, spec),
        "WorkloadEntry" => {
            workload_entry(&mut e, "spec", spec, None);
        }
        "ServiceEntry" => service_entry(&mut e, spec),
        "ServiceImport" => {
            for (i, v) in e.sequence("spec.ips", &spec["ips"]).iter().enumerate() {
                let at = format!("spec.ips[{i}]");
                if let Some(s) = e.string(&at, v) {
                    e.rule(at, s, rules::ip);
                }
            }
        }
        k if POLICY_KINDS.contains(&k) => {
            // An object without a spec is one with an empty spec.
            let empty = Value::Object(serde_json::Map::new());
            let spec = if spec.is_null() { &empty } else { spec };
            if let Err(problems) = crate::istio::parse(k, spec) {
                for p in problems {
                    e.push("spec", ErrorKind::Rule(p));
                }
            }
        }
        _ => {}
    }
    strait_annotations(&mut e, doc, kind, &annotations);
    if e.0.is_empty() {
        Ok(())
    } else {
        Err(InvalidObject { errors: e.0 })
    }
}

/// `metadata`; returns the annotations that are strings, for the kind
/// rules.
fn metadata(e: &mut Errors, kind: &str, doc: &Value) -> BTreeMap<String, String> {
    let m = &doc["metadata"];
    if e.mapping("metadata", m).is_none() {
        if m.is_null() {
            e.required("metadata.name", "name or generateName is required");
        }
        return BTreeMap::new();
    }
    match e.string("metadata.name", &m["name"]) {
        None if m["name"].is_null() => {
            e.required("metadata.name", "name or generateName is required");
        }
        None => {}
        Some("") => e.required("metadata.name", "name or generateName is required"),
        Some(name) => e.rule("metadata.name", name, name_rule(kind)),
    }
    if kind != "Namespace"
        && let Some(ns) = e.string("metadata.namespace", &m["namespace"])
        && !ns.is_empty()
    {
        e.rule("metadata.namespace", ns, rules::dns1123_label);
    }
    e.labels("metadata.labels", &m["labels"]);
    let mut out = BTreeMap::new();
    if let Some(map) = e.mapping("metadata.annotations", &m["annotations"]) {
        let mut total = 0usize;
        for (k, v) in map {
            e.rule(
                "metadata.annotations",
                &k.to_ascii_lowercase(),
                rules::qualified_name,
            );
            let at = format!("metadata.annotations[{k}]");
            match v {
                Value::String(s) => {
                    total += k.len() + s.len();
                    out.insert(k.clone(), s.clone());
                }
                other => e.invalid(
                    at,
                    other,
                    "must be a string (quote it: annotations are strings)",
                ),
            }
        }
        if total > ANNOTATIONS_MAX_BYTES {
            e.push(
                "metadata.annotations",
                ErrorKind::Invalid {
                    value: format!("{total} bytes"),
                    detail: format!("may not be more than {ANNOTATIONS_MAX_BYTES} bytes"),
                },
            );
        }
    }
    out
}

/// `strait.io/export`, `strait.io/export-to` and `strait.io/inbound-port`.
fn strait_annotations(
    e: &mut Errors,
    doc: &Value,
    kind: &str,
    annotations: &BTreeMap<String, String>,
) {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let namespace = doc["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    if let Ok(Some(object_kind)) = ObjectKind::from_type_meta(api, kind) {
        let object = ObjectRef::new(object_kind, namespace, name);
        if let Err(err) = export::export_decision(&object, annotations) {
            match &err {
                ExportError::BadExportValue { value, .. } => e.push(
                    format!("metadata.annotations[{EXPORT_ANNOTATION}]"),
                    ErrorKind::Invalid {
                        value: shown_str(value),
                        detail: "must be \"true\" or \"false\"".into(),
                    },
                ),
                other => {
                    let text = other.to_string();
                    let prefix = format!("{object}: ");
                    let detail = text.strip_prefix(&prefix).unwrap_or(&text).to_string();
                    e.push("metadata.annotations", ErrorKind::Rule(detail));
                }
            }
        }
    }
    if let Some(p) = annotations.get(INBOUND_PORT_ANNOTATION) {
        let ok = p
            .parse::<i64>()
            .is_ok_and(|n| rules::port_num(n).is_empty());
        if !ok {
            e.push(
                format!("metadata.annotations[{INBOUND_PORT_ANNOTATION}]"),
                ErrorKind::Invalid {
                    value: shown_str(p),
                    detail: "must be a port number between 1 and 65535, inclusive".into(),
                },
            );
        }
    }
}

/// A Kubernetes `Service`'s spec (`ValidateService`).
fn service(e: &mut Errors, spec: &Value) {
    if e.mapping("spec", spec).is_none() {
        if spec.is_null() {
            e.required("spec.ports", "");
        }
        return;
    }
    let ty = e.string("spec.type", &spec["type"]).unwrap_or("ClusterIP");
    if !SERVICE_TYPES.contains(&ty) {
        e.not_supported("spec.type", ty, SERVICE_TYPES);
    }
    let cluster_ip = e.string("spec.clusterIP", &spec["clusterIP"]).unwrap_or("");
    let headless = cluster_ip == "None";
    if !cluster_ip.is_empty() && !headless {
        e.rule("spec.clusterIP", cluster_ip, rules::ip);
    }
    let ips = e.sequence("spec.clusterIPs", &spec["clusterIPs"]);
    for (i, v) in ips.iter().enumerate() {
        let at = format!("spec.clusterIPs[{i}]");
        if let Some(s) = e.string(&at, v)
            && s != "None"
        {
            e.rule(at, s, rules::ip);
        }
    }
    if let (Some(first), false) = (ips.first().and_then(Value::as_str), cluster_ip.is_empty())
        && first != cluster_ip
    {
        e.invalid(
            "spec.clusterIPs[0]",
            &ips[0],
            format!("must be the same as spec.clusterIP ({cluster_ip:?})"),
        );
    }
    if ty == "ExternalName" {
        match e.string("spec.externalName", &spec["externalName"]) {
            None | Some("") => e.required("spec.externalName", ""),
            Some(n) => e.rule(
                "spec.externalName",
                n.strip_suffix('.').unwrap_or(n),
                rules::dns1123_subdomain,
            ),
        }
    }
    let ports = e.sequence("spec.ports", &spec["ports"]);
    let ports_given_empty = spec["ports"].is_null() || spec["ports"].is_array();
    if ports.is_empty() && ports_given_empty && !headless && ty != "ExternalName" {
        e.required("spec.ports", "");
    }
    let require_name = ports.len() > 1;
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        if e.mapping(&format!("spec.ports[{i}]"), p).is_none() {
            if p.is_null() {
                e.required(format!("spec.ports[{i}]"), "");
            }
            continue;
        }
        match e.string(&at("name"), &p["name"]).unwrap_or("") {
            "" if require_name => e.required(
                at("name"),
                "a name is required when there are several ports",
            ),
            "" => {}
            name => {
                e.rule(at("name"), name, rules::dns1123_label);
                if !names.insert(name.to_string()) {
                    e.push(
                        at("name"),
                        ErrorKind::Duplicate {
                            value: shown_str(name),
                        },
                    );
                }
            }
        }
        let protocol = e.string(&at("protocol"), &p["protocol"]).unwrap_or("TCP");
        if !SERVICE_PROTOCOLS.contains(&protocol) {
            e.not_supported(at("protocol"), protocol, SERVICE_PROTOCOLS);
        }
        let number = if p["port"].is_null() {
            e.required(at("port"), "");
            None
        } else {
            e.port(&at("port"), &p["port"])
        };
        if let Some(n) = number
            && !numbers.insert((n, protocol.to_string()))
        {
            e.push(
                at("port"),
                ErrorKind::Duplicate {
                    value: format!("{n}/{protocol}"),
                },
            );
        }
        match &p["targetPort"] {
            Value::Null => {}
            Value::String(s) if s.is_empty() => {}
            Value::String(s) => e.rule(at("targetPort"), s, rules::port_name),
            Value::Number(_) if p["targetPort"].as_i64() == Some(0) => {}
            Value::Number(_) => {
                e.port(&at("targetPort"), &p["targetPort"]);
            }
            other => e.invalid(
                at("targetPort"),
                other,
                "must be a port number or a port name",
            ),
        }
        if let Some(app) = e.string(&at("appProtocol"), &p["appProtocol"]) {
            e.rule(at("appProtocol"), app, rules::qualified_name);
        }
        if !p["nodePort"].is_null() && p["nodePort"].as_i64() != Some(0) {
            e.port(&at("nodePort"), &p["nodePort"]);
        }
    }
    e.labels("spec.selector", &spec["selector"]);
}

/// A `WorkloadEntry` spec, or a `ServiceEntry` endpoint (whose port names
/// must be `service_ports`), as Istio's `validateWorkloadEntry`.
fn workload_entry(
    e: &mut Errors,
    at: &str,
    spec: &Value,
    service_ports: Option<&BTreeSet<String>>,
) {
    if e.mapping(at, spec).is_none() {
        if spec.is_null() {
            e.required(format!("{at}.address"), "address is required");
        }
        return;
    }
    let f = |name: &str| format!("{at}.{name}");
    let network = e.string(&f("network"), &spec["network"]).unwrap_or("");
    let address = e.string(&f("address"), &spec["address"]).unwrap_or("");
    let unix = address.starts_with("unix://");
    let address_missing =
        spec["address"].is_null() || address.is_empty() && spec["address"].is_string();
    if address_missing {
        if network.is_empty() {
            e.required(f("address"), "address is required unless network is set");
        }
    } else if address.is_empty() {
        // Not a string: already reported.
    } else if unix {
        if spec["ports"].as_object().is_some_and(|p| !p.is_empty()) {
            e.invalid(
                f("ports"),
                &spec["ports"],
                "a unix:// endpoint has no ports",
            );
        }
    } else if address.parse::<std::net::IpAddr>().is_err() {
        e.rule(f("address"), address, rules::fqdn);
    }
    if let Some(ports) = e.mapping(&f("ports"), &spec["ports"]) {
        for (name, v) in ports {
            e.rule(f("ports"), name, rules::istio_port_name);
            let pat = format!("{at}.ports[{name}]");
            if v.is_null() {
                e.required(pat, "");
                continue;
            }
            e.port(&pat, v);
            if let Some(allowed) = service_ports
                && !allowed.contains(name)
            {
                e.invalid(
                    f("ports"),
                    &Value::String(name.clone()),
                    "is not a port of the ServiceEntry",
                );
            }
        }
    }
    e.labels(&f("labels"), &spec["labels"]);
    if let Some(w) = e.integer(&f("weight"), &spec["weight"])
        && u32::try_from(w).is_err()
    {
        e.invalid(
            f("weight"),
            &spec["weight"],
            "must be between 0 and 4294967295, inclusive",
        );
    }
    if let Some(l) = e.string(&f("locality"), &spec["locality"])
        && !l.is_empty()
        && let Err(err) = Locality::parse(l)
    {
        e.invalid(f("locality"), &spec["locality"], err.to_string());
    }
    e.string(&f("serviceAccount"), &spec["serviceAccount"]);
}

/// An Istio `ServiceEntry`'s spec (`validateServiceEntry`).
fn service_entry(e: &mut Errors, spec: &Value) {
    if e.mapping("spec", spec).is_none() {
        if spec.is_null() {
            e.required("spec.hosts", "");
        }
        return;
    }
    let hosts = e.sequence("spec.hosts", &spec["hosts"]);
    if hosts.is_empty() && (spec["hosts"].is_null() || spec["hosts"].is_array()) {
        e.required("spec.hosts", "at least one host is required");
    }
    for (i, h) in hosts.iter().enumerate() {
        let at = format!("spec.hosts[{i}]");
        if let Some(s) = e.string(&at, h) {
            e.rule(at, s, rules::wildcard_host);
        }
    }
    for (i, a) in e
        .sequence("spec.addresses", &spec["addresses"])
        .iter()
        .enumerate()
    {
        let at = format!("spec.addresses[{i}]");
        if let Some(s) = e.string(&at, a) {
            e.rule(at, s, rules::ip_or_cidr);
        }
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in e.sequence("spec.ports", &spec["ports"]).iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        if e.mapping(&format!("spec.ports[{i}]"), p).is_none() {
            continue;
        }
        let name = e.string(&at("name"), &p["name"]).unwrap_or("");
        e.rule(at("name"), name, rules::istio_port_name);
        if !names.insert(name.to_string()) {
            e.push(
                at("name"),
                ErrorKind::Duplicate {
                    value: shown_str(name),
                },
            );
        }
        if p["number"].is_null() {
            e.required(at("number"), "");
        } else if let Some(n) = e.port(&at("number"), &p["number"])
            && !numbers.insert(n)
        {
            e.push(
                at("number"),
                ErrorKind::Duplicate {
                    value: n.to_string(),
                },
            );
        }
        if let Some(proto) = e.string(&at("protocol"), &p["protocol"])
            && !proto.is_empty()
            && !ISTIO_PROTOCOLS
                .iter()
                .any(|k| k.eq_ignore_ascii_case(proto))
        {
            e.not_supported(at("protocol"), proto, ISTIO_PROTOCOLS);
        }
        if !p["targetPort"].is_null() && p["targetPort"].as_i64() != Some(0) {
            e.port(&at("targetPort"), &p["targetPort"]);
        }
    }
    if let Some(r) = e.string("spec.resolution", &spec["resolution"])
        && !RESOLUTIONS.contains(&r)
    {
        e.not_supported("spec.resolution", r, RESOLUTIONS);
    }
    if let Some(l) = e.string("spec.location", &spec["location"])
        && !LOCATIONS.contains(&l)
    {
        e.not_supported("spec.location", l, LOCATIONS);
    }
    for (i, s) in e
        .sequence("spec.subjectAltNames", &spec["subjectAltNames"])
        .iter()
        .enumerate()
    {
        e.string(&format!("spec.subjectAltNames[{i}]"), s);
    }
    for (i, ep) in e
        .sequence("spec.endpoints", &spec["endpoints"])
        .iter()
        .enumerate()
    {
        workload_entry(e, &format!("spec.endpoints[{i}]"), ep, Some(&names));
    }
}

#[cfg(test)]
mod tests;
