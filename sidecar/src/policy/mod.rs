//! Istio policy evaluation for the sidecar: pure functions over the policy
//! resources the control plane pushed. No I/O, no clock, no randomness of
//! its own: time (`Instant`) and random numbers (`f64` in `0..1`) are
//! arguments, so every decision is reproducible in tests.
//!
//! # Using it
//!
//! ```text
//! let (policies, errors) = Policies::from_resources(&pushed, "istio-system");
//! // errors: (resource name, reason) for each refused object → NACK detail
//!
//! // inbound, per connection / request:
//! policies.mtls_mode(ns, &labels, port)            -> MtlsMode
//! policies.authorize(ns, &labels, &attrs)          -> Decision
//!
//! // outbound, per request (HTTP) or connection (TCP, method = None):
//! let route = policies.route(client_ns, fqdn, port, &attrs)?;   // RouteDecision or RouteError (404)
//! let dest = route.pick(r)?;                                      // weighted destination, once per request
//! let tp = policies.traffic_policy(client_ns, &dest.host, dest.subset.as_deref())?;
//! let i = balancer.pick(&service.endpoints, tp.subset_labels.as_ref(), &tp, my_locality, now, r)?;
//! ... connect to endpoints[i] ...
//! balancer.report(&endpoint_key(&endpoints[i]), outcome, &tp, now);   // exactly once per pick
//! ```
//!
//! `route.fault.map(|f| f.apply(r1, r2))` gives the delay / abort to inject;
//! `route.timeout` and `route.retries` drive the request loop.
//!
//! # Semantics (Istio's)
//!
//! - Resource names are `<kind>/<namespace>/<name>`. A policy that does not
//!   parse or validate is reported and left out, except an
//!   `AuthorizationPolicy`: leaving one out could open access, so a refused
//!   one is kept as a DENY-everything policy for the workloads its selector
//!   picks (fail closed; the whole namespace when the selector is unreadable).
//! - PeerAuthentication: workload-level (selector) beats namespace-level
//!   beats mesh-level (root namespace, no selector); within a policy a
//!   `portLevelMtls` entry for the workload port beats `mtls`; `UNSET`
//!   inherits; PERMISSIVE when nothing says otherwise.
//! - AuthorizationPolicy: policies of the workload's namespace and of the
//!   root namespace whose selector matches apply. DENY first, then ALLOW:
//!   once any ALLOW policy applies, a request no ALLOW policy matches is
//!   denied; an ALLOW policy without rules matches nothing. On TCP, rules
//!   with HTTP-only conditions (methods, paths, hosts, request headers)
//!   never match for ALLOW and match as if those conditions were absent for
//!   DENY, as Istio does. AUDIT has no effect on the decision.
//! - VirtualService: applies to a host when one of its `hosts` is the FQDN,
//!   the short name in the VirtualService's namespace, or a `*.suffix`
//!   wildcard; an exact host beats a wildcard, a longer wildcard a shorter
//!   one, the caller's namespace other namespaces, then (namespace, name)
//!   order. The first matching `http[]` entry wins; no matching entry is a
//!   404 ([`RouteError::NoRoute`]); no VirtualService routes to the host
//!   itself with Istio's default retries.
//! - DestinationRule: picked like a VirtualService; a subset's policy
//!   overrides the top-level one field by field.

mod authz;
mod balancer;
mod matcher;
mod mtls;
mod route;
mod traffic;

use std::collections::BTreeMap;
use std::net::IpAddr;

use strait_model::istio::{self, IstioSpec};
use strait_proto::strait::mesh::v1 as pb;

pub use authz::Decision;
pub use balancer::{Balancer, Outcome, PickError, endpoint_key};
pub use matcher::RegexError;
pub use mtls::MtlsMode;
pub use route::{Destination, Fault, FaultAction, MatchError, RetryPolicy, RouteDecision};
pub use traffic::{LbAlgorithm, LocalityPolicy, OutlierPolicy, TrafficPolicy};

/// Workload labels.
pub type Labels = BTreeMap<String, String>;

/// The namespace of mesh-wide policies when none is configured.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// What is known about a request (or, with `method: None`, a TCP
/// connection) when policy is evaluated.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestAttrs<'a> {
    /// HTTP method; `None` for a TCP connection.
    pub method: Option<&'a str>,
    /// HTTP path, with or without the query string, normalized by the
    /// caller as the mesh says ([`strait_model::request_path`]): policy
    /// matches it as given.
    pub path: Option<&'a str>,
    /// `Host` / `:authority` (with or without `:port`).
    pub host: Option<&'a str>,
    /// The destination port (the service port outbound, the workload port
    /// inbound).
    pub port: u16,
    /// HTTP request headers.
    pub headers: Option<&'a http::HeaderMap>,
    /// The peer's SPIFFE ID (`spiffe://td/ns/x/sa/y`), when it presented a
    /// verified certificate.
    pub peer_identity: Option<&'a str>,
    /// The peer's address.
    pub source_ip: Option<IpAddr>,
    /// The calling workload's namespace (outbound: our own).
    pub source_namespace: Option<&'a str>,
    /// The calling workload's labels (outbound: our own).
    pub source_labels: Option<&'a Labels>,
}

impl RequestAttrs<'_> {
    /// The path without its query string.
    pub(crate) fn path_only(&self) -> Option<&str> {
        self.path.map(|p| p.split(['?', '#']).next().unwrap_or(p))
    }

    /// The first value of header `name` (lowercase), if valid UTF-8.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers?.get(name)?.to_str().ok()
    }
}

/// Why a request cannot be routed; `status()` is the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// VirtualServices apply to the host but none of their routes matches.
    #[error("no route of VirtualService {virtual_service} matches the request to {host}")]
    NoRoute {
        /// `<namespace>/<name>` of the VirtualService.
        virtual_service: String,
        /// The requested host.
        host: String,
    },
    /// A route names a subset no DestinationRule defines.
    #[error("subset {subset:?} of host {host} is not defined by any DestinationRule")]
    UnknownSubset {
        /// The destination host.
        host: String,
        /// The subset name.
        subset: String,
    },
    /// Every destination of the route has weight 0.
    #[error("every destination of the route has weight 0")]
    NoWeight,
}

impl RouteError {
    /// The HTTP status to answer with (404 no route, 503 otherwise).
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NoRoute { .. } => 404,
            RouteError::UnknownSubset { .. } | RouteError::NoWeight => 503,
        }
    }
}

/// Why a policy resource is refused: the reason in the NACK detail (and,
/// for an AuthorizationPolicy kept failing closed, in its denials).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The resource names no namespace.
    #[error("namespace is empty")]
    NoNamespace,
    /// `spec_json` does not parse.
    #[error("spec_json is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The spec does not validate as its kind: each problem found.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    /// A VirtualService match whose regex does not compile:
    /// `spec.http[route].match[index]`.
    #[error("spec.http[{route}].match[{index}].{source}")]
    Match {
        route: usize,
        index: usize,
        #[source]
        source: MatchError,
    },
}

/// The Istio policies in force, compiled for evaluation. Cheap to share
/// (`Arc<Policies>`) and rebuilt whole when the policy set changes.
#[derive(Debug, Default)]
pub struct Policies {
    root_namespace: String,
    peer_authentications: Vec<mtls::CompiledPeerAuthn>,
    authorizations: Vec<authz::CompiledAuthz>,
    virtual_services: Vec<route::CompiledVirtualService>,
    destination_rules: Vec<traffic::CompiledDestinationRule>,
}

impl Policies {
    /// Compiles `resources`. Returns the policies that are usable and, for
    /// each refused one, its resource name (`<kind>/<namespace>/<name>`)
    /// and why. `Sidecar` resources are validated but have no effect here.
    pub fn from_resources(
        resources: &[pb::Policy],
        root_namespace: &str,
    ) -> (Policies, Vec<(String, String)>) {
        let root = if root_namespace.is_empty() {
            DEFAULT_ROOT_NAMESPACE
        } else {
            root_namespace
        };
        let mut policies = Policies {
            root_namespace: root.to_owned(),
            ..Policies::default()
        };
        let mut errors = Vec::new();
        let mut sorted: Vec<&pb::Policy> = resources.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name))
        });
        for p in sorted {
            let name = format!("{}/{}/{}", p.kind, p.namespace, p.name);
            match policies.add(p) {
                Ok(()) => {}
                Err(why) => {
                    let why = why.to_string();
                    if p.kind == "AuthorizationPolicy" {
                        policies
                            .authorizations
                            .push(authz::CompiledAuthz::deny_all(p, &why));
                    }
                    errors.push((name, why));
                }
            }
        }
        (policies, errors)
    }

    fn add(&mut self, p: &pb::Policy) -> Result<(), PolicyError> {
        if p.namespace.is_empty() {
            return Err(PolicyError::NoNamespace);
        }
        let json: serde_json::Value =
            serde_json::from_str(&p.spec_json).map_err(PolicyError::NotJson)?;
        let spec = istio::parse(&p.kind, &json).map_err(PolicyError::Invalid)?;
        match spec {
            IstioSpec::PeerAuthentication(pa) => self
                .peer_authentications
                .push(mtls::CompiledPeerAuthn::new(&p.namespace, &pa)),
            IstioSpec::AuthorizationPolicy(ap) => self
                .authorizations
                .push(authz::CompiledAuthz::new(&p.namespace, &p.name, &ap)),
            IstioSpec::VirtualService(vs) => {
                self.virtual_services
                    .push(route::CompiledVirtualService::new(
                        &p.namespace,
                        &p.name,
                        &vs,
                    )?)
            }
            IstioSpec::DestinationRule(dr) => {
                self.destination_rules
                    .push(traffic::CompiledDestinationRule::new(
                        &p.namespace,
                        &p.name,
                        &dr,
                    ))
            }
            IstioSpec::Sidecar(_) => {}
        }
        Ok(())
    }

    /// The namespace whose selector-less policies apply mesh-wide.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The inbound mTLS mode of a workload in `ns` with `labels` on
    /// workload port `port`.
    pub fn mtls_mode(&self, ns: &str, labels: &Labels, port: u16) -> MtlsMode {
        mtls::mode(
            &self.peer_authentications,
            &self.root_namespace,
            ns,
            labels,
            port,
        )
    }

    /// Whether the workload in `ns` with `labels` admits `req`.
    pub fn authorize(&self, ns: &str, labels: &Labels, req: &RequestAttrs<'_>) -> Decision {
        authz::authorize(&self.authorizations, &self.root_namespace, ns, labels, req)
    }

    /// Where a request from a workload in `client_ns` to service `host`
    /// (an FQDN) on `port` goes.
    pub fn route(
        &self,
        client_ns: &str,
        host: &str,
        port: u16,
        req: &RequestAttrs<'_>,
    ) -> Result<RouteDecision, RouteError> {
        route::route(&self.virtual_services, client_ns, host, port, req)
    }

    /// The traffic policy for `host` (an FQDN) and optional `subset`, as
    /// seen from `client_ns`.
    pub fn traffic_policy(
        &self,
        client_ns: &str,
        host: &str,
        subset: Option<&str>,
    ) -> Result<std::sync::Arc<TrafficPolicy>, RouteError> {
        traffic::lookup(&self.destination_rules, client_ns, host, subset)
    }
}

/// Orders candidate objects that apply to a host: most specific host first,
/// then the caller's namespace, then (namespace, name).
pub(crate) fn pick_best<'a, T>(
    candidates: impl Iterator<Item = (usize, &'a str, &'a str, &'a T)>,
    client_ns: &str,
) -> Option<&'a T> {
    candidates
        .max_by(|a, b| {
            (a.0, a.1 == client_ns)
                .cmp(&(b.0, b.1 == client_ns))
                .then_with(|| (b.1, b.2).cmp(&(a.1, a.2)))
        })
        .map(|c| c.3)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A policy resource from a kind, `ns/name` and a JSON spec.
    pub(crate) fn policy(kind: &str, ns_name: &str, spec: serde_json::Value) -> pb::Policy {
        let (ns, name) = ns_name.split_once('/').unwrap();
        pb::Policy {
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
            spec_json: spec.to_string(),
            generation: 1,
        }
    }

    pub(crate) fn compile(resources: &[pb::Policy]) -> Policies {
        let (p, errors) = Policies::from_resources(resources, "istio-system");
        assert!(errors.is_empty(), "{errors:?}");
        p
    }

    #[test]
    fn bad_resources_are_reported_by_name_and_the_rest_kept() {
        let resources = [
            policy(
                "VirtualService",
                "bookinfo/bad",
                serde_json::json!({"hosts": []}),
            ),
            policy(
                "DestinationRule",
                "bookinfo/good",
                serde_json::json!({"host": "reviews"}),
            ),
            pb::Policy {
                kind: "PeerAuthentication".into(),
                namespace: "bookinfo".into(),
                name: "garbled".into(),
                spec_json: "{not json".into(),
                generation: 1,
            },
            policy("Gateway", "bookinfo/gw", serde_json::json!({})),
            policy(
                "VirtualService",
                "bookinfo/badregex",
                serde_json::json!({"hosts": ["a"], "http": [{"match": [{"uri": {"regex": "(["}}],
                    "route": [{"destination": {"host": "a"}}]}]}),
            ),
        ];
        let (p, errors) = Policies::from_resources(&resources, "");
        assert_eq!(p.root_namespace(), "istio-system");
        assert_eq!(p.destination_rules.len(), 1);
        let names: Vec<&str> = errors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Gateway/bookinfo/gw",
                "PeerAuthentication/bookinfo/garbled",
                "VirtualService/bookinfo/bad",
                "VirtualService/bookinfo/badregex"
            ]
        );
        assert!(errors[1].1.contains("not JSON"), "{errors:?}");
        assert!(errors[2].1.contains("spec.hosts"), "{errors:?}");
        assert!(
            errors[3].1.contains("spec.http[0].match[0].uri.regex"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_bad_regex_is_named_by_its_route_match_and_field() {
        let vs = policy(
            "VirtualService",
            "bookinfo/headers",
            serde_json::json!({"hosts": ["a"], "http": [
                {"route": [{"destination": {"host": "a"}}]},
                {"match": [{"uri": {"prefix": "/"}}, {"headers": {"x-user": {"regex": "(["}}}],
                 "route": [{"destination": {"host": "a"}}]}]}),
        );
        let (_, errors) = Policies::from_resources(&[vs], "");
        assert_eq!(errors.len(), 1, "{errors:?}");
        let why = &errors[0].1;
        assert!(
            why.starts_with(
                "spec.http[1].match[1].headers[\"x-user\"].regex: \"([\" does not compile: "
            ),
            "{why}"
        );
    }
}
