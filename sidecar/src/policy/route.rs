//! VirtualService: where an outbound request goes.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use strait_model::istio::parse_duration;
use strait_model::istio::virtual_service::{
    HttpMatchRequest, HttpRoute, HttpRouteDestination, VirtualService,
};

use super::matcher::{HostPattern, RegexError, StringMatcher, qualify_host};
use super::{Labels, PolicyError, RequestAttrs, RouteError, pick_best};

/// One weighted destination of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Service FQDN (short names completed in the VirtualService's
    /// namespace).
    pub host: String,
    /// DestinationRule subset.
    pub subset: Option<String>,
    /// Service port; `None` keeps the requested port.
    pub port: Option<u16>,
    /// Share of the traffic (weights of a route sum to 100).
    pub weight: u32,
}

/// When and how often to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    /// Timeout of each try; `None`: the route timeout.
    pub per_try_timeout: Option<Duration>,
    /// Conditions (`5xx`, `gateway-error`, `connect-failure`, `reset`,
    /// `refused-stream`, `retriable-4xx`, `retriable-status-codes`,
    /// status codes as text, ...). Shared: a route's policy is copied
    /// into every request's decision.
    pub retry_on: Arc<BTreeSet<String>>,
}

impl Default for RetryPolicy {
    /// Istio's default when a route sets no `retries`: 2 attempts on
    /// connect-failure, refused-stream, unavailable, cancelled and 503.
    fn default() -> Self {
        static DEFAULT_RETRY_ON: LazyLock<Arc<BTreeSet<String>>> = LazyLock::new(|| {
            Arc::new(
                [
                    "connect-failure",
                    "refused-stream",
                    "unavailable",
                    "cancelled",
                    "retriable-status-codes",
                    "503",
                ]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            )
        });
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: DEFAULT_RETRY_ON.clone(),
        }
    }
}

impl RetryPolicy {
    fn has(&self, c: &str) -> bool {
        self.retry_on.contains(c)
    }

    /// Whether an answer with `status` is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        (status >= 500 && self.has("5xx"))
            || (matches!(status, 502..=504) && self.has("gateway-error"))
            || (status == 409 && self.has("retriable-4xx"))
            || self.has(&status.to_string())
    }

    /// Whether a failed connection attempt is retried.
    pub fn retries_connect_failure(&self) -> bool {
        self.has("connect-failure") || self.has("5xx") || self.has("gateway-error")
    }

    /// Whether a reset before the response is retried.
    pub fn retries_reset(&self) -> bool {
        self.has("reset") || self.has("5xx")
    }

    /// Whether an attempt that hit its per-try timeout is retried: as
    /// Envoy does, under `5xx` and `gateway-error` (a timeout is a 504).
    /// The route's own timeout ends all tries whatever this says.
    pub fn retries_per_try_timeout(&self) -> bool {
        self.has("5xx") || self.has("gateway-error")
    }

    /// Whether a stream refused by the server (HTTP/2 REFUSED_STREAM) is
    /// retried.
    pub fn retries_refused_stream(&self) -> bool {
        self.has("refused-stream") || self.has("5xx")
    }
}

/// Fault injection of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// Delay and the percentage of requests delayed.
    pub delay: Option<(Duration, f64)>,
    /// HTTP status and the percentage of requests aborted.
    pub abort: Option<(u16, f64)>,
}

/// What to inject into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultAction {
    /// Wait this long before proxying.
    pub delay: Option<Duration>,
    /// Answer with this status instead of proxying.
    pub abort: Option<u16>,
}

impl Fault {
    /// Decides with two random numbers in `0..1`: a fault at `p` percent
    /// fires when `r * 100 < p` (so 0% never fires, 100% always does).
    pub fn apply(&self, r_delay: f64, r_abort: f64) -> FaultAction {
        let fires = |r: f64, percent: f64| r * 100.0 < percent;
        FaultAction {
            delay: self
                .delay
                .filter(|(_, p)| fires(r_delay, *p))
                .map(|(d, _)| d),
            abort: self
                .abort
                .filter(|(_, p)| fires(r_abort, *p))
                .map(|(s, _)| s),
        }
    }
}

/// The outcome of [`Policies::route`](super::Policies::route).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    /// Weighted destinations (at least one).
    pub destinations: Vec<Destination>,
    /// Request timeout; `None`: no timeout (Istio's default).
    pub timeout: Option<Duration>,
    /// Retries.
    pub retries: RetryPolicy,
    /// Fault injection.
    pub fault: Option<Fault>,
    /// `http[].name` of the matched route.
    pub route_name: Option<String>,
    /// `<namespace>/<name>` of the VirtualService, if one applied.
    pub virtual_service: Option<String>,
}

impl RouteDecision {
    /// Picks a destination by weight with `r` in `0..1`; `None` when every
    /// weight is 0.
    pub fn pick(&self, r: f64) -> Option<&Destination> {
        let total: u64 = self.destinations.iter().map(|d| u64::from(d.weight)).sum();
        if total == 0 {
            return None;
        }
        // r in 0..1 maps to a point in 0..total.
        let point = ((r.clamp(0.0, 1.0) * total as f64) as u64).min(total - 1);
        let mut acc = 0u64;
        self.destinations.iter().find(|d| {
            acc += u64::from(d.weight);
            point < acc
        })
    }
}

#[derive(Debug)]
struct CompiledMatch {
    uri: Option<StringMatcher>,
    ignore_uri_case: bool,
    method: Option<StringMatcher>,
    authority: Option<StringMatcher>,
    headers: Vec<(String, StringMatcher)>,
    port: Option<u16>,
    source_labels: Labels,
    source_namespace: Option<String>,
}

#[derive(Debug)]
struct CompiledRoute {
    matches: Vec<CompiledMatch>,
    decision: RouteDecision,
}

#[derive(Debug)]
pub(crate) struct CompiledVirtualService {
    namespace: String,
    name: String,
    hosts: Vec<HostPattern>,
    http: Vec<CompiledRoute>,
    tcp: Option<RouteDecision>,
}

fn destinations(routes: &[HttpRouteDestination], ns: &str) -> Vec<Destination> {
    routes
        .iter()
        .map(|r| Destination {
            host: qualify_host(&r.destination.host, ns),
            subset: r.destination.subset.clone(),
            port: r
                .destination
                .port
                .and_then(|p| u16::try_from(p.number).ok()),
            // Validation keeps weights in 0..=100; a single route without
            // a weight takes everything.
            weight: r
                .weight
                .map_or(if routes.len() == 1 { 100 } else { 0 }, |w| {
                    u32::try_from(w).unwrap_or(0)
                }),
        })
        .collect()
}

fn duration(d: &Option<String>) -> Option<Duration> {
    d.as_deref().and_then(|d| parse_duration(d).ok())
}

/// A match condition whose regex does not compile: the field (`uri`,
/// `headers["x-user"]`) and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}.regex: {source}")]
pub struct MatchError {
    field: String,
    #[source]
    source: RegexError,
}

impl CompiledMatch {
    fn new(m: &HttpMatchRequest) -> Result<Self, MatchError> {
        let compile = |m: &Option<strait_model::istio::StringMatch>, ci: bool, field: &str| {
            m.as_ref()
                .map(|m| {
                    StringMatcher::compile(m, ci).map_err(|source| MatchError {
                        field: field.to_owned(),
                        source,
                    })
                })
                .transpose()
        };
        Ok(CompiledMatch {
            uri: compile(&m.uri, m.ignore_uri_case, "uri")?,
            ignore_uri_case: m.ignore_uri_case,
            method: compile(&m.method, false, "method")?,
            authority: compile(&m.authority, false, "authority")?,
            headers: m
                .headers
                .iter()
                .map(|(k, v)| {
                    let matcher =
                        StringMatcher::compile(v, false).map_err(|source| MatchError {
                            field: format!("headers[{k:?}]"),
                            source,
                        })?;
                    Ok((k.clone(), matcher))
                })
                .collect::<Result<_, MatchError>>()?,
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        })
    }

    fn matches(&self, port: u16, req: &RequestAttrs<'_>) -> bool {
        let opt = |m: &Option<StringMatcher>, v: Option<&str>| {
            m.as_ref().is_none_or(|m| v.is_some_and(|v| m.matches(v)))
        };
        let path = req.path_only().map(|p| {
            if self.ignore_uri_case {
                p.to_ascii_lowercase()
            } else {
                p.to_owned()
            }
        });
        opt(&self.uri, path.as_deref())
            && opt(&self.method, req.method)
            && opt(&self.authority, req.host)
            && self
                .headers
                .iter()
                .all(|(name, m)| req.header(name).is_some_and(|v| m.matches(v)))
            && self.port.is_none_or(|p| p == port)
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| req.source_namespace == Some(ns))
            && self.source_labels.iter().all(|(k, v)| {
                req.source_labels
                    .and_then(|l| l.get(k))
                    .is_some_and(|l| l == v)
            })
    }
}

impl CompiledRoute {
    /// Compiles `r`, the `index`th of `spec.http` of VirtualService
    /// `vs_id` in `ns`.
    fn new(vs_id: &str, ns: &str, index: usize, r: &HttpRoute) -> Result<Self, PolicyError> {
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| {
                CompiledMatch::new(m).map_err(|source| PolicyError::Match {
                    route: index,
                    index: i,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let retries = match &r.retries {
            None => RetryPolicy::default(),
            Some(r) => RetryPolicy {
                attempts: u32::try_from(r.attempts).unwrap_or(0),
                per_try_timeout: duration(&r.per_try_timeout),
                retry_on: Arc::new(r.retry_on().into_iter().map(str::to_owned).collect()),
            },
        };
        let fault = r.fault.as_ref().map(|f| Fault {
            delay: f.delay.as_ref().and_then(|d| {
                Some((
                    duration(&d.fixed_delay)?,
                    d.percentage.map_or(100.0, |p| p.value),
                ))
            }),
            abort: f.abort.as_ref().and_then(|a| {
                Some((
                    u16::try_from(a.http_status?).ok()?,
                    a.percentage.map_or(100.0, |p| p.value),
                ))
            }),
        });
        Ok(CompiledRoute {
            matches,
            decision: RouteDecision {
                destinations: destinations(&r.route, ns),
                timeout: duration(&r.timeout),
                retries,
                fault,
                route_name: r.name.clone(),
                virtual_service: Some(vs_id.to_owned()),
            },
        })
    }
}

impl CompiledVirtualService {
    pub(crate) fn new(
        namespace: &str,
        name: &str,
        vs: &VirtualService,
    ) -> Result<Self, PolicyError> {
        let id = format!("{namespace}/{name}");
        let http = vs
            .http
            .iter()
            .enumerate()
            .map(|(i, r)| CompiledRoute::new(&id, namespace, i, r))
            .collect::<Result<Vec<_>, _>>()?;
        let tcp = vs.tcp.first().map(|t| RouteDecision {
            destinations: destinations(&t.route, namespace),
            timeout: None,
            retries: RetryPolicy {
                attempts: 0,
                per_try_timeout: None,
                retry_on: Arc::default(),
            },
            fault: None,
            route_name: None,
            virtual_service: Some(id.clone()),
        });
        Ok(CompiledVirtualService {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            hosts: vs
                .hosts
                .iter()
                .map(|h| HostPattern::new(h, namespace))
                .collect(),
            http,
            tcp,
        })
    }

    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

pub(crate) fn route(
    all: &[CompiledVirtualService],
    client_ns: &str,
    host: &str,
    port: u16,
    req: &RequestAttrs<'_>,
) -> Result<RouteDecision, RouteError> {
    let is_tcp = req.method.is_none();
    let candidates = all.iter().filter_map(|vs| {
        // A VirtualService without routes of the request's protocol does
        // not apply to it.
        if (is_tcp && vs.tcp.is_none()) || (!is_tcp && vs.http.is_empty()) {
            return None;
        }
        let best = vs.hosts.iter().filter_map(|h| h.specificity(host)).max()?;
        Some((best, vs.namespace.as_str(), vs.name.as_str(), vs))
    });
    let Some(vs) = pick_best(candidates, client_ns) else {
        return Ok(default_route(host, is_tcp));
    };
    if is_tcp && let Some(t) = &vs.tcp {
        return Ok(t.clone());
    }
    vs.http
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(port, req)))
        .map(|r| r.decision.clone())
        .ok_or_else(|| RouteError::NoRoute {
            virtual_service: vs.id(),
            host: host.to_owned(),
        })
}

fn default_route(host: &str, is_tcp: bool) -> RouteDecision {
    RouteDecision {
        destinations: vec![Destination {
            host: host.to_owned(),
            subset: None,
            port: None,
            weight: 100,
        }],
        timeout: None,
        retries: if is_tcp {
            RetryPolicy {
                attempts: 0,
                per_try_timeout: None,
                retry_on: Arc::default(),
            }
        } else {
            RetryPolicy::default()
        },
        fault: None,
        route_name: None,
        virtual_service: None,
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use serde_json::json;

    use super::super::tests::{compile, policy};
    use super::*;

    const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

    fn get<'a>(path: &'a str, headers: Option<&'a HeaderMap>) -> RequestAttrs<'a> {
        RequestAttrs {
            method: Some("GET"),
            path: Some(path),
            port: 9080,
            headers,
            ..Default::default()
        }
    }

    fn bookinfo() -> Vec<strait_proto::strait::mesh::v1::Policy> {
        vec![policy(
            "VirtualService",
            "bookinfo/reviews",
            json!({
                "hosts": ["reviews"],
                "http": [
                    {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                     "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                     "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 0}}}},
                    {"name": "api", "match": [{"uri": {"prefix": "/API"}, "ignoreUriCase": true}, {"uri": {"regex": "/v[0-9]+/.*"}}],
                     "route": [{"destination": {"host": "ratings.bookinfo.svc.cluster.local", "port": {"number": 9081}}}],
                     "timeout": "1.5s", "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "gateway-error,reset"}},
                    {"name": "split", "match": [{"method": {"exact": "GET"}}],
                     "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                               {"destination": {"host": "reviews", "subset": "v3"}, "weight": 20}],
                     "fault": {"delay": {"fixedDelay": "2s", "percentage": {"value": 50}}}}
                ],
                "tcp": [{"route": [{"destination": {"host": "reviews", "port": {"number": 9090}}}]}]
            }),
        )]
    }

    #[test]
    fn first_matching_route_wins() {
        let p = compile(&bookinfo());
        let mut jason = HeaderMap::new();
        jason.insert("end-user", "jason".parse().unwrap());
        let cases: Vec<(RequestAttrs<'_>, Option<&str>, &str, Option<&str>)> = vec![
            (get("/", Some(&jason)), Some("jason"), REVIEWS, Some("v2")),
            (
                get("/api/x", Some(&jason)),
                Some("jason"),
                REVIEWS,
                Some("v2"),
            ),
            (
                get("/api/x?q=1", None),
                Some("api"),
                "ratings.bookinfo.svc.cluster.local",
                None,
            ),
            (
                get("/v2/x", None),
                Some("api"),
                "ratings.bookinfo.svc.cluster.local",
                None,
            ),
            (get("/v2", None), Some("split"), REVIEWS, Some("v1")),
            (
                RequestAttrs {
                    port: 9080,
                    ..Default::default()
                },
                None,
                REVIEWS,
                None,
            ),
        ];
        for (req, name, host, subset) in cases {
            let d = p.route("bookinfo", REVIEWS, 9080, &req).unwrap();
            assert_eq!(d.route_name.as_deref(), name, "{req:?}");
            assert_eq!(d.destinations[0].host, host, "{req:?}");
            assert_eq!(d.destinations[0].subset.as_deref(), subset, "{req:?}");
        }
        let api = p
            .route("bookinfo", REVIEWS, 9080, &get("/API", None))
            .unwrap();
        assert_eq!(api.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(api.retries.attempts, 3);
        assert_eq!(
            api.retries.per_try_timeout,
            Some(Duration::from_millis(500))
        );
        assert!(api.retries.retries_status(503) && !api.retries.retries_status(500));
        assert!(api.retries.retries_connect_failure() && api.retries.retries_reset());
        assert_eq!(api.destinations[0].port, Some(9081));
        let tcp = p
            .route("bookinfo", REVIEWS, 9090, &RequestAttrs::default())
            .unwrap();
        assert_eq!(tcp.destinations[0].port, Some(9090));
    }

    #[test]
    fn which_failures_each_retry_on_condition_retries() {
        let policy = |conds: &[&str]| RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: Arc::new(conds.iter().map(|c| (*c).to_string()).collect()),
        };
        // (retryOn, connect failure, reset, per-try timeout, 500, 503)
        let cases: [(&[&str], [bool; 5]); 6] = [
            (&["5xx"], [true, true, true, true, true]),
            (&["gateway-error"], [true, false, true, false, true]),
            (&["connect-failure"], [true, false, false, false, false]),
            (&["reset"], [false, true, false, false, false]),
            (&["503"], [false, false, false, false, true]),
            (&[], [false, false, false, false, false]),
        ];
        for (conds, want) in cases {
            let r = policy(conds);
            let got = [
                r.retries_connect_failure(),
                r.retries_reset(),
                r.retries_per_try_timeout(),
                r.retries_status(500),
                r.retries_status(503),
            ];
            assert_eq!(got, want, "retryOn {conds:?}");
        }
        // Istio's default retries connect failures and 503, not timeouts.
        let d = RetryPolicy::default();
        assert!(d.retries_connect_failure() && d.retries_status(503));
        assert!(!d.retries_per_try_timeout());
    }

    #[test]
    fn no_matching_route_is_a_404_naming_the_virtual_service() {
        let p = compile(&bookinfo());
        let req = RequestAttrs {
            method: Some("POST"),
            path: Some("/"),
            port: 9080,
            ..Default::default()
        };
        let err = p.route("bookinfo", REVIEWS, 9080, &req).unwrap_err();
        assert_eq!(err.status(), 404);
        assert!(err.to_string().contains("bookinfo/reviews"), "{err}");
    }

    #[test]
    fn host_selection() {
        let p = compile(&[
            policy(
                "VirtualService",
                "bookinfo/wild",
                json!({"hosts": ["*.bookinfo.svc.cluster.local"],
                "http": [{"name": "wild", "route": [{"destination": {"host": "x.bookinfo.svc.cluster.local"}}]}]}),
            ),
            policy(
                "VirtualService",
                "other/exact",
                json!({"hosts": ["reviews.bookinfo.svc.cluster.local"],
                "http": [{"name": "exact", "route": [{"destination": {"host": "reviews.bookinfo.svc.cluster.local"}}]}]}),
            ),
            policy(
                "VirtualService",
                "other/short",
                json!({"hosts": ["ratings"],
                "http": [{"name": "short", "route": [{"destination": {"host": "ratings"}}]}]}),
            ),
        ]);
        let name = |host: &str| {
            p.route("bookinfo", host, 80, &get("/", None))
                .unwrap()
                .route_name
        };
        assert_eq!(
            name(REVIEWS).as_deref(),
            Some("exact"),
            "exact beats wildcard"
        );
        assert_eq!(
            name("details.bookinfo.svc.cluster.local").as_deref(),
            Some("wild")
        );
        assert_eq!(
            name("ratings.bookinfo.svc.cluster.local").as_deref(),
            Some("wild"),
            "short name is of its own namespace"
        );
        assert_eq!(
            name("ratings.other.svc.cluster.local").as_deref(),
            Some("short")
        );
        let d = p
            .route(
                "bookinfo",
                "ratings.other.svc.cluster.local",
                80,
                &get("/", None),
            )
            .unwrap();
        assert_eq!(d.destinations[0].host, "ratings.other.svc.cluster.local");
        let none = p
            .route(
                "bookinfo",
                "mongo.db.svc.cluster.local",
                80,
                &get("/", None),
            )
            .unwrap();
        assert_eq!(
            none.destinations,
            [Destination {
                host: "mongo.db.svc.cluster.local".into(),
                subset: None,
                port: None,
                weight: 100
            }]
        );
        assert_eq!(none.retries, RetryPolicy::default());
        assert_eq!(none.virtual_service, None);
    }

    #[test]
    fn weights_80_20() {
        let p = compile(&bookinfo());
        let d = p
            .route("bookinfo", REVIEWS, 9080, &get("/x", None))
            .unwrap();
        let mut counts = [0u32; 2];
        for i in 0..1000 {
            let picked = d.pick(f64::from(i) / 1000.0).unwrap();
            counts[usize::from(picked.subset.as_deref() == Some("v3"))] += 1;
        }
        assert_eq!(counts, [800, 200]);
        assert_eq!(d.pick(0.0).unwrap().subset.as_deref(), Some("v1"));
        assert_eq!(d.pick(0.7999).unwrap().subset.as_deref(), Some("v1"));
        assert_eq!(d.pick(0.8).unwrap().subset.as_deref(), Some("v3"));
        assert_eq!(d.pick(1.0).unwrap().subset.as_deref(), Some("v3"));
        let zero = RouteDecision {
            destinations: vec![Destination {
                weight: 0,
                ..d.destinations[0].clone()
            }],
            ..d
        };
        assert_eq!(zero.pick(0.5), None);
    }

    #[test]
    fn faults() {
        let p = compile(&bookinfo());
        let mut jason = HeaderMap::new();
        jason.insert("end-user", "jason".parse().unwrap());
        let zero = p
            .route("bookinfo", REVIEWS, 9080, &get("/", Some(&jason)))
            .unwrap()
            .fault
            .unwrap();
        for r in [0.0, 0.5, 0.999_999] {
            assert_eq!(zero.apply(r, r), FaultAction::default(), "0% never fires");
        }
        let half = p
            .route("bookinfo", REVIEWS, 9080, &get("/x", None))
            .unwrap()
            .fault
            .unwrap();
        assert_eq!(half.apply(0.49, 0.0).delay, Some(Duration::from_secs(2)));
        assert_eq!(half.apply(0.5, 0.0).delay, None);
        let full = Fault {
            delay: None,
            abort: Some((503, 100.0)),
        };
        assert_eq!(full.apply(0.0, 0.999_999).abort, Some(503));
        // The VirtualService is removed: no stale fault.
        let empty = compile(&[]);
        assert_eq!(
            empty
                .route("bookinfo", REVIEWS, 9080, &get("/x", None))
                .unwrap()
                .fault,
            None
        );
    }
}
