//! `AuthorizationPolicy` (`security.istio.io/v1`): who may call what.

use serde::{Deserialize, Serialize};

use super::{CidrError, Errors, LabelSelector, Path, Validate, parse_cidr};

/// The `spec` of an AuthorizationPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// The workloads it applies to; none means the whole namespace (or the
    /// mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// What a matching request gets; ALLOW when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// A request matches the policy when it matches any rule. An ALLOW
    /// policy with no rules matches nothing (so it denies every request of
    /// the workloads it selects); a DENY policy with no rules denies
    /// nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// Not implemented: refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    /// Not implemented: refused when set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<serde_json::Value>,
}

lenient_enum! {
    /// `action`.
    Action {
        /// Allow matching requests.
        Allow = "ALLOW",
        /// Deny matching requests.
        Deny = "DENY",
        /// Log matching requests; no effect on the decision.
        Audit = "AUDIT",
        /// An external authorizer (refused: not supported).
        Custom = "CUSTOM",
    }
}

impl AuthorizationPolicy {
    /// The action, ALLOW when unset.
    pub fn action(&self) -> Action {
        self.action.clone().unwrap_or(Action::Allow)
    }
}

/// `rules[]`: a request matches when every part (`from`, `to`, `when`)
/// matches; each of `from[]`/`to[]` is ORed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Rule {
    /// Sources, ORed; empty matches any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    /// Operations, ORed; empty matches any operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    /// Conditions, ANDed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `from[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// `to[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// `source`: every set field must match. Values support Istio's `*`,
/// `prefix*` and `*suffix` forms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities without `spiffe://` (`cluster.local/ns/a/sa/b`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Peer identities that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals: not supported, refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// JWT principals: not supported, refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces (from the peer identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Peer namespaces that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Peer addresses or CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Peer addresses that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// The client address (the same as the peer for a sidecar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Client addresses that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `operation`: every set field must match. HTTP-only fields (`methods`,
/// `paths`, `hosts`) never match a TCP connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Hosts (`Host`/`:authority`), case-insensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Hosts that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Ports that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Methods that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Paths (without the query).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Paths that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// `when[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// One of the keys [`ConditionKey::parse`] accepts.
    #[serde(default)]
    pub key: String,
    /// Values, ORed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Values that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The `when[].key`s strait implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// `source.ip` / `remote.ip`: the peer address, IP or CIDR values.
    SourceIp,
    /// `source.namespace`.
    SourceNamespace,
    /// `source.principal`.
    SourcePrincipal,
    /// `request.headers[<name>]` (name lowercased).
    RequestHeader(String),
    /// `destination.port`.
    DestinationPort,
}

/// A `when[].key` strait does not implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a supported condition key (source.ip, remote.ip, source.namespace, \
     source.principal, destination.port, request.headers[<name>])"
)]
pub struct ConditionKeyError(pub String);

/// A value that is not a port in 1..=65535.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a port in 1..=65535")]
pub struct PortValueError(pub String);

/// A bad `when[].values` entry, for its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ConditionValueError {
    #[error(transparent)]
    Cidr(#[from] CidrError),
    #[error(transparent)]
    Port(#[from] PortValueError),
}

impl ConditionKey {
    /// Parses a `when[].key`.
    pub fn parse(key: &str) -> Result<ConditionKey, ConditionKeyError> {
        Ok(match key {
            "source.ip" | "remote.ip" => ConditionKey::SourceIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.port" => ConditionKey::DestinationPort,
            _ => match key
                .strip_prefix("request.headers[")
                .and_then(|r| r.strip_suffix(']'))
            {
                Some(name) if !name.is_empty() && !name.contains(['[', ']']) => {
                    ConditionKey::RequestHeader(name.to_ascii_lowercase())
                }
                _ => return Err(ConditionKeyError(key.to_string())),
            },
        })
    }
}

impl Validate for AuthorizationPolicy {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if let Some(s) = &self.selector {
            s.validate(&path.field("selector"), errors);
        }
        match &self.action {
            Some(Action::Custom) => errors.at(
                &path.field("action"),
                "CUSTOM is not supported (strait has no external authorizer)",
            ),
            Some(Action::Other(a)) => errors.at(
                &path.field("action"),
                format!("{a:?} is not one of ALLOW, DENY, AUDIT"),
            ),
            _ => {}
        }
        if self.target_ref.is_some() || !self.target_refs.is_empty() {
            errors.at(
                &path.field("targetRefs"),
                "targetRef(s) are not supported; use selector",
            );
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let p = path.field("rules").index(i);
            for (j, f) in rule.from.iter().enumerate() {
                f.source
                    .validate(&p.field("from").index(j).field("source"), errors);
            }
            for (j, t) in rule.to.iter().enumerate() {
                t.operation
                    .validate(&p.field("to").index(j).field("operation"), errors);
            }
            for (j, c) in rule.when.iter().enumerate() {
                let p = p.field("when").index(j);
                match ConditionKey::parse(&c.key) {
                    Err(why) => errors.at(&p.field("key"), why),
                    Ok(key) => {
                        if c.values.is_empty() && c.not_values.is_empty() {
                            errors.at(&p, "one of values or notValues is required");
                        }
                        for (field, list) in [("values", &c.values), ("notValues", &c.not_values)] {
                            for (k, v) in list.iter().enumerate() {
                                let bad: Option<ConditionValueError> = match key {
                                    ConditionKey::SourceIp => parse_cidr(v).err().map(Into::into),
                                    ConditionKey::DestinationPort => {
                                        port_value(v).err().map(Into::into)
                                    }
                                    _ => None,
                                };
                                if let Some(why) = bad {
                                    errors.at(&p.field(field).index(k), why);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn port_value(v: &str) -> Result<u16, PortValueError> {
    v.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| PortValueError(v.to_string()))
}

fn non_empty_values(list: &[String], path: &Path, errors: &mut Errors) {
    for (i, v) in list.iter().enumerate() {
        if v.is_empty() {
            errors.at(&path.index(i), "must not be empty");
        } else if v.len() > 1 && v[1..v.len() - 1].contains('*') {
            errors.at(
                &path.index(i),
                format!("{v:?}: `*` is only allowed at the start or the end"),
            );
        }
    }
}

impl Validate for Source {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if *self == Source::default() {
            errors.at(path, "a source must set at least one field");
        }
        if !self.request_principals.is_empty() || !self.not_request_principals.is_empty() {
            errors.at(
                &path.field("requestPrincipals"),
                "request principals (JWT) are not supported",
            );
        }
        for (field, list) in [
            ("principals", &self.principals),
            ("notPrincipals", &self.not_principals),
            ("namespaces", &self.namespaces),
            ("notNamespaces", &self.not_namespaces),
        ] {
            non_empty_values(list, &path.field(field), errors);
        }
        for (field, list) in [
            ("ipBlocks", &self.ip_blocks),
            ("notIpBlocks", &self.not_ip_blocks),
            ("remoteIpBlocks", &self.remote_ip_blocks),
            ("notRemoteIpBlocks", &self.not_remote_ip_blocks),
        ] {
            for (i, v) in list.iter().enumerate() {
                if let Err(why) = parse_cidr(v) {
                    errors.at(&path.field(field).index(i), why);
                }
            }
        }
    }
}

impl Validate for Operation {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if *self == Operation::default() {
            errors.at(path, "an operation must set at least one field");
        }
        for (field, list) in [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ] {
            non_empty_values(list, &path.field(field), errors);
        }
        for (field, list) in [("ports", &self.ports), ("notPorts", &self.not_ports)] {
            for (i, v) in list.iter().enumerate() {
                if let Err(why) = port_value(v) {
                    errors.at(&path.field(field).index(i), why);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{IstioSpec, parse};
    use super::*;

    #[test]
    fn round_trip() {
        let spec = json!({
            "selector": {"matchLabels": {"app": "reviews"}},
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"],
                                     "notNamespaces": ["untrusted"], "ipBlocks": ["10.0.0.0/8"]}}],
                "to": [{"operation": {"methods": ["GET"], "paths": ["/reviews/*"], "ports": ["9080"]}}],
                "when": [{"key": "request.headers[X-Version]", "values": ["v1"]}]
            }]
        });
        let Ok(IstioSpec::AuthorizationPolicy(ap)) = parse("AuthorizationPolicy", &spec) else {
            panic!("{:?}", parse("AuthorizationPolicy", &spec));
        };
        assert_eq!(ap.action(), Action::Allow);
        assert_eq!(
            ConditionKey::parse(&ap.rules[0].when[0].key),
            Ok(ConditionKey::RequestHeader("x-version".into()))
        );
        assert_eq!(serde_json::to_value(&ap).unwrap(), spec);
        let empty = parse("AuthorizationPolicy", &json!({})).unwrap();
        let IstioSpec::AuthorizationPolicy(empty) = empty else {
            panic!()
        };
        assert_eq!(empty.action(), Action::Allow);
        assert!(empty.rules.is_empty());
    }

    #[test]
    fn bad_inputs() {
        let rule = |r: serde_json::Value| json!({"rules": [r]});
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"action": "CUSTOM", "provider": {"name": "ext"}}),
                "spec.action: CUSTOM is not supported",
            ),
            (
                json!({"action": "PERMIT"}),
                "spec.action: \"PERMIT\" is not one of",
            ),
            (
                json!({"targetRefs": [{"kind": "Gateway", "name": "x"}]}),
                "spec.targetRefs: targetRef(s) are not supported",
            ),
            (
                rule(json!({"from": [{"source": {}}]})),
                "spec.rules[0].from[0].source: a source must set",
            ),
            (
                rule(json!({"to": [{"operation": {}}]})),
                "spec.rules[0].to[0].operation: an operation must set",
            ),
            (
                rule(json!({"from": [{"source": {"requestPrincipals": ["*"]}}]})),
                "requestPrincipals: request principals (JWT)",
            ),
            (
                rule(json!({"from": [{"source": {"ipBlocks": ["10.0.0.0/40"]}}]})),
                "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/40\"",
            ),
            (
                rule(json!({"from": [{"source": {"principals": ["a*b"]}}]})),
                "source.principals[0]: \"a*b\": `*` is only allowed",
            ),
            (
                rule(json!({"from": [{"source": {"namespaces": [""]}}]})),
                "source.namespaces[0]: must not be empty",
            ),
            (
                rule(json!({"to": [{"operation": {"ports": ["http"]}}]})),
                "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port",
            ),
            (
                rule(json!({"to": [{"operation": {"notPorts": ["0"]}}]})),
                "operation.notPorts[0]: \"0\"",
            ),
            (
                rule(json!({"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]})),
                "spec.rules[0].when[0].key: \"request.auth.claims[iss]\" is not a supported",
            ),
            (
                rule(json!({"when": [{"key": "source.ip"}]})),
                "spec.rules[0].when[0]: one of values or notValues",
            ),
            (
                rule(json!({"when": [{"key": "source.ip", "values": ["nope"]}]})),
                "when[0].values[0]: \"nope\"",
            ),
            (
                rule(json!({"when": [{"key": "destination.port", "notValues": ["x"]}]})),
                "when[0].notValues[0]: \"x\" is not a port",
            ),
            (json!({"rules": {"from": []}}), "spec: invalid type"),
        ];
        for (spec, want) in cases {
            let errs = parse("AuthorizationPolicy", &spec).expect_err(&spec.to_string());
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{spec}: want {want:?}, got {errs:?}"
            );
        }
    }
}
