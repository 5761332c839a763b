//! `VirtualService` (`networking.istio.io/v1`): HTTP and TCP routing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    Errors, Path, Percent, StringMatch, Validate, is_dns_label, is_host_name, validate_duration,
    validate_labels, validate_port,
};

/// The `spec` of a VirtualService.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    /// Hosts the routes apply to: FQDNs, short names (in the object's
    /// namespace) or `*.suffix` wildcards.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways the routes apply to (ignored by the sidecar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// HTTP routes, evaluated in order; the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    /// TCP routes (the first one applies; `match` is not implemented).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
}

/// One `http[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Name of the route, for logs and metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions, ORed; empty matches every request.
    #[serde(rename = "match", default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    /// Request timeout, e.g. `1.5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjection>,
    /// Not implemented: refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<serde_json::Value>,
    /// Not implemented: refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<serde_json::Value>,
}

/// One `match[]` entry of an HTTP route: all set conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    /// Name of the match, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// The request method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// The `:authority` / `Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Request headers by lowercase name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// The port the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Labels the calling workload must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Namespace of the calling workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Match `uri` case-insensitively.
    #[serde(default)]
    pub ignore_uri_case: bool,
}

/// A weighted destination of an HTTP route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    /// Where to send the request.
    pub destination: Destination,
    /// Share of the traffic, 0..=100; omitted means 100 for a single
    /// destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// A weighted destination of a TCP route.
pub type RouteDestination = HttpRouteDestination;

/// A service (and optionally subset and port) to send traffic to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The service host (FQDN or short name).
    #[serde(default)]
    pub host: String,
    /// A subset named by a DestinationRule of `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The port of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

/// `{ number }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct PortSelector {
    /// Port number.
    #[serde(default)]
    pub number: i64,
}

/// `retries`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    /// Retries after the first try (0 disables retries).
    #[serde(default)]
    pub attempts: i64,
    /// Timeout of each try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Comma-separated retry conditions (Envoy's `x-envoy-retry-on`, gRPC
    /// status names, or HTTP status codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
}

/// The retry conditions `retryOn` may name, besides HTTP status codes.
pub const RETRY_ON: [&str; 15] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

impl HttpRetry {
    /// The `retryOn` conditions, trimmed, empty ones dropped.
    pub fn retry_on(&self) -> Vec<&str> {
        self.retry_on
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// `fault`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpFaultInjection {
    /// Delay a share of the requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    /// Fail a share of the requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

/// `fault.delay`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delay {
    /// How long to delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_delay: Option<String>,
    /// Share of the requests delayed; omitted means 100%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// `fault.abort`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Abort {
    /// The HTTP status to answer with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i64>,
    /// Share of the requests aborted; omitted means 100%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// One `tcp[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    /// Conditions: not implemented, refused when set.
    #[serde(rename = "match", default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<serde_json::Value>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

impl Validate for VirtualService {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        let hosts = path.field("hosts");
        if self.hosts.is_empty() {
            errors.at(&hosts, "at least one host is required");
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if !is_host_name(h) {
                errors.at(&hosts.index(i), format!("{h:?} is not a host name"));
            }
        }
        if self.http.is_empty() && self.tcp.is_empty() {
            errors.at(path, "one of http or tcp routes is required");
        }
        for (i, r) in self.http.iter().enumerate() {
            r.validate(&path.field("http").index(i), errors);
        }
        for (i, r) in self.tcp.iter().enumerate() {
            let p = path.field("tcp").index(i);
            if !r.matches.is_empty() {
                errors.at(&p.field("match"), "TCP route matches are not supported");
            }
            validate_routes(&r.route, &p.field("route"), errors);
        }
    }
}

impl Validate for HttpRoute {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if self.redirect.is_some() {
            errors.at(&path.field("redirect"), "redirect is not supported");
        }
        if self.direct_response.is_some() {
            errors.at(
                &path.field("directResponse"),
                "directResponse is not supported",
            );
        }
        for (i, m) in self.matches.iter().enumerate() {
            m.validate(&path.field("match").index(i), errors);
        }
        validate_routes(&self.route, &path.field("route"), errors);
        validate_duration(&self.timeout, &path.field("timeout"), errors);
        if let Some(r) = &self.retries {
            let p = path.field("retries");
            if !(0..=100).contains(&r.attempts) {
                errors.at(
                    &p.field("attempts"),
                    format!("{} is not in 0..=100", r.attempts),
                );
            }
            validate_duration(&r.per_try_timeout, &p.field("perTryTimeout"), errors);
            for cond in r.retry_on() {
                let known = RETRY_ON.contains(&cond)
                    || cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !known {
                    errors.at(
                        &p.field("retryOn"),
                        format!(
                            "{cond:?} is not a retry condition ({} or an HTTP status)",
                            RETRY_ON.join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(f) = &self.fault {
            let p = path.field("fault");
            if let Some(d) = &f.delay {
                let p = p.field("delay");
                if d.fixed_delay.is_none() {
                    errors.at(&p.field("fixedDelay"), "is required");
                }
                validate_duration(&d.fixed_delay, &p.field("fixedDelay"), errors);
                if let Some(pc) = &d.percentage {
                    pc.validate(&p.field("percentage"), errors);
                }
            }
            if let Some(a) = &f.abort {
                let p = p.field("abort");
                match a.http_status {
                    None => errors.at(
                        &p.field("httpStatus"),
                        "is required (gRPC aborts are not supported)",
                    ),
                    Some(s) if !(200..=599).contains(&s) => errors.at(
                        &p.field("httpStatus"),
                        format!("{s} is not an HTTP status in 200..=599"),
                    ),
                    Some(_) => {}
                }
                if let Some(pc) = &a.percentage {
                    pc.validate(&p.field("percentage"), errors);
                }
            }
        }
    }
}

impl Validate for HttpMatchRequest {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        for (name, m) in [
            ("uri", &self.uri),
            ("method", &self.method),
            ("authority", &self.authority),
        ] {
            if let Some(m) = m {
                m.validate(&path.field(name), errors);
            }
        }
        for (name, m) in &self.headers {
            let p = path.field("headers").key(name);
            if name.is_empty()
                || name
                    .bytes()
                    .any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace())
            {
                errors.at(&p, format!("{name:?} is not a lowercase header name"));
            }
            m.validate(&p, errors);
        }
        if let Some(port) = self.port {
            validate_port(port, &path.field("port"), errors);
        }
        validate_labels(&self.source_labels, &path.field("sourceLabels"), errors);
    }
}

fn validate_routes(routes: &[HttpRouteDestination], path: &Path, errors: &mut Errors) {
    if routes.is_empty() {
        errors.at(path, "at least one destination is required");
        return;
    }
    let mut total = 0i64;
    for (i, r) in routes.iter().enumerate() {
        let p = path.index(i);
        let d = &r.destination;
        if !is_host_name(&d.host) || d.host.starts_with('*') {
            errors.at(
                &p.field("destination").field("host"),
                format!("{:?} is not a service host", d.host),
            );
        }
        if let Some(s) = &d.subset
            && !is_dns_label(s)
        {
            errors.at(
                &p.field("destination").field("subset"),
                format!("{s:?} is not a DNS label"),
            );
        }
        if let Some(port) = d.port {
            validate_port(
                port.number,
                &p.field("destination").field("port").field("number"),
                errors,
            );
        }
        match r.weight {
            Some(w) if !(0..=100).contains(&w) => {
                errors.at(&p.field("weight"), format!("{w} is not in 0..=100"))
            }
            Some(w) => total += w,
            None => {}
        }
    }
    if routes.len() > 1 && total != 100 {
        errors.at(path, format!("weights sum to {total}, not 100"));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{IstioSpec, parse};

    fn reviews() -> serde_json::Value {
        json!({
            "hosts": ["reviews"],
            "gateways": ["mesh"],
            "exportTo": ["."],
            "http": [
                {
                    "name": "jason",
                    "match": [{"headers": {"end-user": {"exact": "jason"}}, "uri": {"prefix": "/reviews"}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                    "fault": {"delay": {"fixedDelay": "7s", "percentage": {"value": 100.0}}}
                },
                {
                    "route": [
                        {"destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}}, "weight": 80},
                        {"destination": {"host": "reviews", "subset": "v3"}, "weight": 20}
                    ],
                    "timeout": "1.5s",
                    "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,connect-failure, refused-stream,503"},
                    "mirror": {"host": "x"}
                }
            ],
            "tcp": [{"route": [{"destination": {"host": "mongo.db.svc.cluster.local", "port": {"number": 27017}}}]}]
        })
    }

    #[test]
    fn bookinfo_round_trip() {
        let Ok(IstioSpec::VirtualService(vs)) = parse("VirtualService", &reviews()) else {
            panic!("{:?}", parse("VirtualService", &reviews()));
        };
        assert_eq!(vs.http[1].route[0].weight, Some(80));
        assert_eq!(
            vs.http[1].retries.as_ref().unwrap().retry_on(),
            ["5xx", "connect-failure", "refused-stream", "503"]
        );
        assert_eq!(
            vs.http[0].matches[0].headers["end-user"].kind(),
            super::super::StringMatchKind::Exact("jason")
        );
        let again = serde_json::to_value(&vs).unwrap();
        assert_eq!(
            parse("VirtualService", &again),
            Ok(IstioSpec::VirtualService(vs))
        );
    }

    #[test]
    fn bad_inputs() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"http": [{"route": [{"destination": {"host": "a"}}]}]}),
                "spec.hosts: at least one host",
            ),
            (
                json!({"hosts": ["a b"], "http": [{"route": [{"destination": {"host": "a"}}]}]}),
                "spec.hosts[0]: \"a b\" is not a host name",
            ),
            (json!({"hosts": ["a"]}), "spec: one of http or tcp"),
            (
                json!({"hosts": ["a"], "http": [{"route": []}]}),
                "spec.http[0].route: at least one destination",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [
                {"destination": {"host": "a"}, "weight": 105},
                {"destination": {"host": "b"}, "weight": -5}]}]}),
                "spec.http[0].route[1].weight: -5 is not in 0..=100",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [
                {"destination": {"host": "a"}, "weight": 50},
                {"destination": {"host": "b"}, "weight": 30}]}]}),
                "spec.http[0].route: weights sum to 80, not 100",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a", "subset": "V_1"}}]}]}),
                "spec.http[0].route[0].destination.subset: \"V_1\" is not a DNS label",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": ""}}]}]}),
                "spec.http[0].route[0].destination.host: \"\" is not a service host",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a", "port": {"number": 70000}}}]}]}),
                "destination.port.number: 70000 is not a port",
            ),
            (
                json!({"hosts": ["a"], "http": [{"timeout": "1.5", "route": [{"destination": {"host": "a"}}]}]}),
                "spec.http[0].timeout: \"1.5\" is not a duration",
            ),
            (
                json!({"hosts": ["a"], "http": [{"retries": {"attempts": 2, "retryOn": "5xx,teapot"}, "route": [{"destination": {"host": "a"}}]}]}),
                "spec.http[0].retries.retryOn: \"teapot\" is not a retry condition",
            ),
            (
                json!({"hosts": ["a"], "http": [{"retries": {"attempts": -1}, "route": [{"destination": {"host": "a"}}]}]}),
                "spec.http[0].retries.attempts: -1",
            ),
            (
                json!({"hosts": ["a"], "http": [{"fault": {"abort": {"httpStatus": 42}}, "route": [{"destination": {"host": "a"}}]}]}),
                "spec.http[0].fault.abort.httpStatus: 42",
            ),
            (
                json!({"hosts": ["a"], "http": [{"fault": {"abort": {"grpcStatus": "UNAVAILABLE"}}, "route": [{"destination": {"host": "a"}}]}]}),
                "fault.abort.httpStatus: is required",
            ),
            (
                json!({"hosts": ["a"], "http": [{"fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 101}}}, "route": [{"destination": {"host": "a"}}]}]}),
                "fault.delay.percentage.value: 101 is not in 0..=100",
            ),
            (
                json!({"hosts": ["a"], "http": [{"fault": {"delay": {"percentage": {"value": 1}}}, "route": [{"destination": {"host": "a"}}]}]}),
                "fault.delay.fixedDelay: is required",
            ),
            (
                json!({"hosts": ["a"], "http": [{"match": [{"uri": {"exact": "/", "prefix": "/"}}], "route": [{"destination": {"host": "a"}}]}]}),
                "spec.http[0].match[0].uri: only one of",
            ),
            (
                json!({"hosts": ["a"], "http": [{"match": [{"uri": {"regex": ""}}], "route": [{"destination": {"host": "a"}}]}]}),
                "spec.http[0].match[0].uri.regex: must not be empty",
            ),
            (
                json!({"hosts": ["a"], "http": [{"match": [{"headers": {"X-User": {"exact": "a"}}}], "route": [{"destination": {"host": "a"}}]}]}),
                "headers[\"X-User\"]: \"X-User\" is not a lowercase header name",
            ),
            (
                json!({"hosts": ["a"], "http": [{"match": [{"port": 0}], "route": [{"destination": {"host": "a"}}]}]}),
                "spec.http[0].match[0].port: 0 is not a port",
            ),
            (
                json!({"hosts": ["a"], "http": [{"redirect": {"uri": "/x"}}]}),
                "spec.http[0].redirect: redirect is not supported",
            ),
            (
                json!({"hosts": ["a"], "tcp": [{"match": [{"port": 1}], "route": [{"destination": {"host": "a"}}]}]}),
                "spec.tcp[0].match: TCP route matches",
            ),
            (
                json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}, "weight": "ten"}]}]}),
                "spec: invalid type: string \"ten\"",
            ),
        ];
        for (spec, want) in cases {
            let errs = parse("VirtualService", &spec).expect_err(&spec.to_string());
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{spec}: want {want:?}, got {errs:?}"
            );
        }
    }
}
