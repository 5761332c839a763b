//! AuthorizationPolicy: who may call a workload.

use std::net::IpAddr;

use strait_model::istio::authorization_policy::{
    Action, AuthorizationPolicy, Condition, ConditionKey, Operation, Rule, Source,
};
use strait_model::istio::{LabelSelector, parse_cidr};
use strait_proto::strait::mesh::v1 as pb;

use super::matcher::{identity_namespace, istio_value_matches};
use super::{Labels, RequestAttrs};

/// The outcome of [`Policies::authorize`](super::Policies::authorize).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `policy` is the ALLOW policy (`<namespace>/<name>`) that
    /// matched, `None` when no ALLOW policy applies to the workload.
    Allow {
        /// The matching ALLOW policy.
        policy: Option<String>,
    },
    /// Refused (HTTP 403 / connection closed).
    Deny {
        /// The DENY policy that matched, or the ALLOW policies of which none
        /// matched, as `<namespace>/<name>` (comma-separated).
        policy: String,
        /// Why, for the access log.
        reason: String,
    },
}

impl Decision {
    /// Whether the request is admitted.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Allow,
    Deny,
    Audit,
}

#[derive(Debug)]
pub(crate) struct CompiledAuthz {
    namespace: String,
    id: String,
    selector: Option<LabelSelector>,
    action: Act,
    rules: Vec<Rule>,
    /// A refused policy kept as DENY-everything, with the reason it was
    /// refused.
    fail_closed: Option<String>,
}

impl CompiledAuthz {
    pub(crate) fn new(namespace: &str, name: &str, spec: &AuthorizationPolicy) -> Self {
        let action = match spec.action() {
            Action::Deny => Act::Deny,
            Action::Audit => Act::Audit,
            // CUSTOM and unknown actions are refused by validation.
            Action::Allow | Action::Custom | Action::Other(_) => Act::Allow,
        };
        CompiledAuthz {
            namespace: namespace.to_owned(),
            id: format!("{namespace}/{name}"),
            selector: spec.selector.clone().filter(|s| !s.match_labels.is_empty()),
            action,
            rules: spec.rules.clone(),
            fail_closed: None,
        }
    }

    /// A policy that could not be used: deny everything it would select.
    pub(crate) fn deny_all(p: &pb::Policy, why: &str) -> Self {
        let selector = serde_json::from_str::<serde_json::Value>(&p.spec_json)
            .ok()
            .and_then(|v| v.get("selector").cloned())
            .and_then(|s| serde_json::from_value::<LabelSelector>(s).ok())
            .filter(|s| !s.match_labels.is_empty());
        CompiledAuthz {
            namespace: p.namespace.clone(),
            id: format!("{}/{}", p.namespace, p.name),
            selector,
            action: Act::Deny,
            rules: Vec::new(),
            fail_closed: Some(why.to_owned()),
        }
    }

    fn applies(&self, root: &str, ns: &str, labels: &Labels) -> bool {
        (self.namespace == ns || self.namespace == root)
            && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }

    /// The index of the first rule matching `req`.
    fn matching_rule(&self, req: &RequestAttrs<'_>) -> Option<usize> {
        // On TCP, HTTP-only conditions cannot be evaluated: Istio drops the
        // rule for ALLOW (never matches) and drops the conditions for DENY
        // (matches more), so both fail closed.
        let http_only = self.action == Act::Deny;
        self.rules
            .iter()
            .position(|r| rule_matches(r, req, http_only))
    }
}

pub(crate) fn authorize(
    all: &[CompiledAuthz],
    root: &str,
    ns: &str,
    labels: &Labels,
    req: &RequestAttrs<'_>,
) -> Decision {
    let applicable: Vec<&CompiledAuthz> =
        all.iter().filter(|p| p.applies(root, ns, labels)).collect();
    for p in applicable.iter().filter(|p| p.action == Act::Deny) {
        if let Some(why) = &p.fail_closed {
            return Decision::Deny {
                policy: p.id.clone(),
                reason: format!(
                    "policy {} is invalid, so it denies everything it selects: {why}",
                    p.id
                ),
            };
        }
        if let Some(i) = p.matching_rule(req) {
            return Decision::Deny {
                policy: p.id.clone(),
                reason: format!("rule {i} of DENY policy {} matches", p.id),
            };
        }
    }
    let allows: Vec<&&CompiledAuthz> = applicable
        .iter()
        .filter(|p| p.action == Act::Allow)
        .collect();
    if allows.is_empty() {
        return Decision::Allow { policy: None };
    }
    if let Some(p) = allows.iter().find(|p| p.matching_rule(req).is_some()) {
        return Decision::Allow {
            policy: Some(p.id.clone()),
        };
    }
    let ids: Vec<&str> = allows.iter().map(|p| p.id.as_str()).collect();
    let ids = ids.join(", ");
    Decision::Deny {
        reason: format!("no rule of the ALLOW policies {ids} matches"),
        policy: ids,
    }
}

fn rule_matches(rule: &Rule, req: &RequestAttrs<'_>, http_only: bool) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|f| source_matches(&f.source, req)))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|t| operation_matches(&t.operation, req, http_only)))
        && rule
            .when
            .iter()
            .all(|c| condition_matches(c, req, http_only))
}

/// `values` (if any) match and `not_values` (if any) do not; an absent
/// value matches no positive list and every negative list.
fn lists_match(
    values: &[String],
    not_values: &[String],
    value: Option<&str>,
    eq: impl Fn(&str, &str) -> bool,
) -> bool {
    let any = |list: &[String]| value.is_some_and(|v| list.iter().any(|p| eq(p, v)));
    (values.is_empty() || any(values)) && (not_values.is_empty() || !any(not_values))
}

fn in_cidrs(list: &[String], ip: IpAddr) -> bool {
    list.iter()
        .any(|c| parse_cidr(c).is_ok_and(|(net, len)| cidr_contains(net, len, ip)))
}

fn cidr_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip.to_canonical()) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

fn ip_lists_match(values: &[String], not_values: &[String], ip: Option<IpAddr>) -> bool {
    (values.is_empty() || ip.is_some_and(|ip| in_cidrs(values, ip)))
        && (not_values.is_empty() || !ip.is_some_and(|ip| in_cidrs(not_values, ip)))
}

fn principal<'a>(req: &RequestAttrs<'a>) -> Option<&'a str> {
    req.peer_identity
        .map(|id| id.strip_prefix("spiffe://").unwrap_or(id))
}

fn source_matches(s: &Source, req: &RequestAttrs<'_>) -> bool {
    let principal = principal(req);
    let namespace = principal.and_then(identity_namespace);
    lists_match(
        &s.principals,
        &s.not_principals,
        principal,
        istio_value_matches,
    ) && lists_match(
        &s.namespaces,
        &s.not_namespaces,
        namespace,
        istio_value_matches,
    ) && ip_lists_match(&s.ip_blocks, &s.not_ip_blocks, req.source_ip)
        && ip_lists_match(&s.remote_ip_blocks, &s.not_remote_ip_blocks, req.source_ip)
}

fn operation_matches(o: &Operation, req: &RequestAttrs<'_>, http_only: bool) -> bool {
    let is_http = req.method.is_some();
    let http_field = |values: &[String], not_values: &[String], value: Option<&str>, ci: bool| {
        if values.is_empty() && not_values.is_empty() {
            true
        } else if !is_http {
            http_only
        } else if ci {
            lists_match(values, not_values, value, |p, v| {
                istio_value_matches(&p.to_ascii_lowercase(), &v.to_ascii_lowercase())
            })
        } else {
            lists_match(values, not_values, value, istio_value_matches)
        }
    };
    let port = req.port.to_string();
    http_field(&o.hosts, &o.not_hosts, req.host, true)
        && http_field(&o.methods, &o.not_methods, req.method, false)
        && http_field(&o.paths, &o.not_paths, req.path_only(), false)
        && lists_match(&o.ports, &o.not_ports, Some(&port), |p, v| p == v)
}

fn condition_matches(c: &Condition, req: &RequestAttrs<'_>, http_only: bool) -> bool {
    // Keys are validated when the policy is parsed.
    let Ok(key) = ConditionKey::parse(&c.key) else {
        return false;
    };
    match key {
        ConditionKey::SourceIp => ip_lists_match(&c.values, &c.not_values, req.source_ip),
        ConditionKey::SourceNamespace => lists_match(
            &c.values,
            &c.not_values,
            principal(req).and_then(identity_namespace),
            istio_value_matches,
        ),
        ConditionKey::SourcePrincipal => lists_match(
            &c.values,
            &c.not_values,
            principal(req),
            istio_value_matches,
        ),
        ConditionKey::DestinationPort => {
            let port = req.port.to_string();
            lists_match(&c.values, &c.not_values, Some(&port), |p, v| p == v)
        }
        ConditionKey::RequestHeader(name) => {
            if req.method.is_none() {
                http_only
            } else {
                lists_match(
                    &c.values,
                    &c.not_values,
                    req.header(&name),
                    istio_value_matches,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::Policies;
    use super::super::tests::{compile, policy};
    use super::*;

    const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bookinfo/sa/productpage";
    const EVIL: &str = "spiffe://cluster.local/ns/evil/sa/x";

    fn http<'a>(method: &'a str, path: &'a str, peer: Option<&'a str>) -> RequestAttrs<'a> {
        RequestAttrs {
            method: Some(method),
            path: Some(path),
            host: Some("reviews:9080"),
            port: 9080,
            peer_identity: peer,
            source_ip: Some("10.1.2.3".parse().unwrap()),
            ..Default::default()
        }
    }

    fn tcp(peer: Option<&str>) -> RequestAttrs<'_> {
        RequestAttrs {
            port: 9080,
            peer_identity: peer,
            ..Default::default()
        }
    }

    fn labels() -> Labels {
        [("app".to_owned(), "reviews".to_owned())].into()
    }

    #[test]
    fn table() {
        let ap = |spec: serde_json::Value| policy("AuthorizationPolicy", "bookinfo/p", spec);
        let allow_pp = json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/productpage"]}}]}]});
        let cases: Vec<(&str, Vec<pb::Policy>, RequestAttrs<'_>, bool)> = vec![
            ("no policy allows", vec![], http("GET", "/", None), true),
            (
                "empty ALLOW denies all",
                vec![ap(json!({}))],
                http("GET", "/", Some(PRODUCTPAGE)),
                false,
            ),
            (
                "empty ALLOW denies TCP",
                vec![ap(json!({"action": "ALLOW"}))],
                tcp(Some(PRODUCTPAGE)),
                false,
            ),
            (
                "empty DENY denies nothing",
                vec![ap(json!({"action": "DENY"}))],
                http("GET", "/", None),
                true,
            ),
            (
                "ALLOW rule {} allows all",
                vec![ap(json!({"rules": [{}]}))],
                http("GET", "/", None),
                true,
            ),
            (
                "principal allowed",
                vec![ap(allow_pp.clone())],
                http("GET", "/", Some(PRODUCTPAGE)),
                true,
            ),
            (
                "other principal denied",
                vec![ap(allow_pp.clone())],
                http("GET", "/", Some(EVIL)),
                false,
            ),
            (
                "plain text has no principal",
                vec![ap(allow_pp.clone())],
                http("GET", "/", None),
                false,
            ),
            (
                "DENY beats ALLOW",
                vec![
                    ap(allow_pp.clone()),
                    policy(
                        "AuthorizationPolicy",
                        "bookinfo/deny",
                        json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}),
                    ),
                ],
                http("DELETE", "/", Some(PRODUCTPAGE)),
                false,
            ),
            (
                "DENY not matching leaves ALLOW",
                vec![
                    ap(allow_pp.clone()),
                    policy(
                        "AuthorizationPolicy",
                        "bookinfo/deny",
                        json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}),
                    ),
                ],
                http("GET", "/", Some(PRODUCTPAGE)),
                true,
            ),
            (
                "notPrincipals deny others",
                vec![ap(
                    json!({"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["cluster.local/ns/bookinfo/*"]}}]}]}),
                )],
                http("GET", "/", Some(EVIL)),
                false,
            ),
            (
                "notPrincipals spares listed",
                vec![ap(
                    json!({"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["cluster.local/ns/bookinfo/*"]}}]}]}),
                )],
                http("GET", "/", Some(PRODUCTPAGE)),
                true,
            ),
            (
                "notPrincipals catches plain text",
                vec![ap(
                    json!({"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}),
                )],
                http("GET", "/", None),
                false,
            ),
            (
                "namespaces",
                vec![ap(
                    json!({"rules": [{"from": [{"source": {"namespaces": ["bookinfo"]}}]}]}),
                )],
                http("GET", "/", Some(PRODUCTPAGE)),
                true,
            ),
            (
                "notNamespaces",
                vec![ap(
                    json!({"rules": [{"from": [{"source": {"notNamespaces": ["evil"]}}]}]}),
                )],
                http("GET", "/", Some(EVIL)),
                false,
            ),
            (
                "prefix path",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"paths": ["/api/*"]}}]}]}),
                )],
                http("GET", "/api/v1?x=1", None),
                true,
            ),
            (
                "prefix path miss",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"paths": ["/api/*"]}}]}]}),
                )],
                http("GET", "/apix", None),
                false,
            ),
            (
                "suffix path",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"paths": ["*.png"]}}]}]}),
                )],
                http("GET", "/img/a.png", None),
                true,
            ),
            (
                "star path",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"paths": ["*"]}}]}]}),
                )],
                http("GET", "/anything", None),
                true,
            ),
            (
                "exact path with query",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"paths": ["/health"]}}]}]}),
                )],
                http("GET", "/health?full", None),
                true,
            ),
            (
                "notPaths",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"notPaths": ["/admin*"]}}]}]}),
                )],
                http("GET", "/admin/x", None),
                false,
            ),
            (
                "methods and ports",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["9080"]}}]}]}),
                )],
                http("GET", "/", None),
                true,
            ),
            (
                "notMethods",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"notMethods": ["POST"]}}]}]}),
                )],
                http("POST", "/", None),
                false,
            ),
            (
                "notPorts",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"notPorts": ["9080"]}}]}]}),
                )],
                tcp(None),
                false,
            ),
            (
                "hosts case-insensitive",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"hosts": ["Reviews*"]}}]}]}),
                )],
                http("GET", "/", None),
                true,
            ),
            (
                "ipBlocks",
                vec![ap(
                    json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.0/16"]}}]}]}),
                )],
                http("GET", "/", None),
                true,
            ),
            (
                "notIpBlocks",
                vec![ap(
                    json!({"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}]}]}),
                )],
                http("GET", "/", None),
                false,
            ),
            (
                "ALLOW with HTTP fields never matches TCP",
                vec![ap(
                    json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
                )],
                tcp(None),
                false,
            ),
            (
                "DENY with HTTP fields matches TCP",
                vec![ap(
                    json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}),
                )],
                tcp(None),
                false,
            ),
            (
                "when header",
                vec![ap(
                    json!({"rules": [{"when": [{"key": "request.headers[x-token]", "values": ["ok"]}]}]}),
                )],
                http("GET", "/", None),
                false,
            ),
            (
                "when source.namespace",
                vec![ap(
                    json!({"rules": [{"when": [{"key": "source.namespace", "notValues": ["evil"]}]}]}),
                )],
                http("GET", "/", Some(PRODUCTPAGE)),
                true,
            ),
            (
                "when destination.port",
                vec![ap(
                    json!({"rules": [{"when": [{"key": "destination.port", "values": ["80"]}]}]}),
                )],
                http("GET", "/", None),
                false,
            ),
            (
                "AUDIT has no effect",
                vec![ap(json!({"action": "AUDIT", "rules": [{}]}))],
                http("GET", "/", None),
                true,
            ),
            (
                "selector not matching",
                vec![ap(json!({"selector": {"matchLabels": {"app": "ratings"}}}))],
                http("GET", "/", None),
                true,
            ),
            (
                "root namespace applies mesh-wide",
                vec![policy(
                    "AuthorizationPolicy",
                    "istio-system/global",
                    json!({}),
                )],
                http("GET", "/", None),
                false,
            ),
            (
                "other namespace does not apply",
                vec![policy("AuthorizationPolicy", "other/p", json!({}))],
                http("GET", "/", None),
                true,
            ),
        ];
        for (why, resources, req, want) in cases {
            let d = compile(&resources).authorize("bookinfo", &labels(), &req);
            assert_eq!(d.is_allowed(), want, "{why}: {d:?}");
        }
    }

    #[test]
    fn deny_names_the_policy_and_reason() {
        let p = compile(&[
            policy(
                "AuthorizationPolicy",
                "bookinfo/a",
                json!({"rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}),
            ),
            policy(
                "AuthorizationPolicy",
                "bookinfo/b",
                json!({"rules": [{"from": [{"source": {"namespaces": ["y"]}}]}]}),
            ),
            policy(
                "AuthorizationPolicy",
                "bookinfo/no-delete",
                json!({"action": "DENY", "rules": [{}, {"to": [{"operation": {"methods": ["DELETE"]}}]}]}),
            ),
        ]);
        let d = p.authorize("bookinfo", &labels(), &http("GET", "/", Some(EVIL)));
        assert_eq!(
            d,
            Decision::Deny {
                policy: "bookinfo/no-delete".into(),
                reason: "rule 0 of DENY policy bookinfo/no-delete matches".into()
            }
        );
        let p = compile(&[
            policy(
                "AuthorizationPolicy",
                "bookinfo/a",
                json!({"rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}),
            ),
            policy(
                "AuthorizationPolicy",
                "bookinfo/b",
                json!({"rules": [{"from": [{"source": {"namespaces": ["y"]}}]}]}),
            ),
        ]);
        let Decision::Deny { policy, reason } =
            p.authorize("bookinfo", &labels(), &http("GET", "/", Some(EVIL)))
        else {
            panic!("allowed");
        };
        assert_eq!(policy, "bookinfo/a, bookinfo/b");
        assert!(reason.contains("no rule of the ALLOW policies"), "{reason}");
    }

    #[test]
    fn invalid_policy_fails_closed_for_what_it_selects() {
        let (p, errors) = Policies::from_resources(
            &[policy(
                "AuthorizationPolicy",
                "bookinfo/ext",
                json!({
                    "selector": {"matchLabels": {"app": "reviews"}}, "action": "CUSTOM", "provider": {"name": "opa"}
                }),
            )],
            "istio-system",
        );
        assert!(
            errors[0].1.contains("CUSTOM is not supported"),
            "{errors:?}"
        );
        let d = p.authorize("bookinfo", &labels(), &http("GET", "/", Some(PRODUCTPAGE)));
        assert!(
            matches!(&d, Decision::Deny { reason, .. } if reason.contains("invalid")),
            "{d:?}"
        );
        let other: Labels = [("app".to_owned(), "ratings".to_owned())].into();
        assert!(
            p.authorize("bookinfo", &other, &http("GET", "/", None))
                .is_allowed()
        );
    }

    #[test]
    fn cidrs() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(cidr_contains(ip("10.0.0.0"), 8, ip("10.255.0.1")));
        assert!(!cidr_contains(ip("10.0.0.0"), 8, ip("11.0.0.1")));
        assert!(cidr_contains(ip("0.0.0.0"), 0, ip("1.2.3.4")));
        assert!(cidr_contains(ip("10.0.0.1"), 32, ip("::ffff:10.0.0.1")));
        assert!(cidr_contains(ip("2001:db8::"), 32, ip("2001:db8:1::1")));
        assert!(!cidr_contains(ip("2001:db8::"), 32, ip("10.0.0.1")));
    }
}
