//! DestinationRule: subsets and the traffic policy towards a service.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use strait_model::istio::destination_rule::{self as dr, DestinationRule, SimpleLb};
use strait_model::istio::parse_duration;

use super::matcher::HostPattern;
use super::{Labels, RouteError, pick_best};

/// How endpoints are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbAlgorithm {
    /// In turn, by weight.
    RoundRobin,
    /// The less loaded of two random endpoints (Istio's default).
    #[default]
    LeastRequest,
    /// Uniformly random, by weight.
    Random,
    /// The original destination: the sidecar does not balance; when it
    /// must choose anyway it picks at random.
    Passthrough,
}

/// Locality-aware balancing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityPolicy {
    /// Whether locality failover is on (Istio: only in effect together with
    /// outlier detection).
    pub enabled: bool,
    /// `(from region, to region)` failover order.
    pub failover: Vec<(String, String)>,
}

impl Default for LocalityPolicy {
    fn default() -> Self {
        LocalityPolicy {
            enabled: true,
            failover: Vec::new(),
        }
    }
}

/// Passive health checking (Envoy's outlier detection, as Istio sets it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// 5xx answers or connect failures in a row that eject (0: off).
    pub consecutive_5xx: u32,
    /// 502/503/504 answers or connect failures in a row that eject (0: off).
    pub consecutive_gateway: u32,
    /// Analysis interval (kept for reporting; ejection here is immediate).
    pub interval: Duration,
    /// Ejection time, multiplied by how often the endpoint was ejected.
    pub base_ejection_time: Duration,
    /// Most endpoints ejected at once, in percent.
    pub max_ejection_percent: u32,
}

impl Default for OutlierPolicy {
    /// Envoy's and Istio's defaults.
    fn default() -> Self {
        OutlierPolicy {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// The effective policy towards one service (and subset).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrafficPolicy {
    /// `<namespace>/<name>` of the DestinationRule, if one applies.
    pub destination_rule: Option<std::sync::Arc<str>>,
    /// The subset's labels when a subset was asked for.
    pub subset_labels: Option<Labels>,
    /// Endpoint selection.
    pub lb: LbAlgorithm,
    /// Locality-aware balancing.
    pub locality: LocalityPolicy,
    /// TCP connect timeout (Istio's default 10s when `None`).
    pub connect_timeout: Option<Duration>,
    /// How long a TCP connection may carry nothing either way (Istio's
    /// default 1h when `None`; zero: no timeout).
    pub tcp_idle_timeout: Option<Duration>,
    /// Most connections to the service.
    pub max_connections: Option<u32>,
    /// Most requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// Most requests in flight.
    pub max_requests: Option<u32>,
    /// Most requests over one connection (`None` or 0: unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// Passive health checking; `None`: off.
    pub outlier: Option<OutlierPolicy>,
    /// Send the app's HTTP/1.1 to the destination's sidecar as HTTP/2
    /// (`h2UpgradePolicy: UPGRADE`). Off by default, as in Istio: HTTP/1.1
    /// stays HTTP/1.1 between the sidecars, over pooled keep-alive
    /// connections. HTTP/2 from the app always goes as HTTP/2.
    pub h2_upgrade: bool,
    /// Whether to originate mTLS (`ISTIO_MUTUAL`, the default) or not
    /// (`DISABLE`); `SIMPLE`/`MUTUAL` are reported as `true` too (strait
    /// only originates mesh mTLS).
    pub tls: bool,
}

/// A DestinationRule with its policies worked out when the config arrives,
/// so that a request only looks one up: no duration parsing, label copies
/// or field-by-field merging per request.
#[derive(Debug)]
pub(crate) struct CompiledDestinationRule {
    namespace: String,
    name: String,
    host: HostPattern,
    /// The mesh defaults with the rule's top-level `trafficPolicy` applied.
    top: Arc<TrafficPolicy>,
    /// Each subset by name (the first of a repeated name wins): `top` with
    /// the subset's labels and its own `trafficPolicy` applied.
    subsets: Vec<(String, Arc<TrafficPolicy>)>,
}

impl CompiledDestinationRule {
    pub(crate) fn new(namespace: &str, name: &str, rule: &DestinationRule) -> Self {
        let mut top = TrafficPolicy {
            destination_rule: Some(format!("{namespace}/{name}").into()),
            ..default_policy().as_ref().clone()
        };
        if let Some(p) = &rule.traffic_policy {
            apply(&mut top, p);
        }
        let subsets = rule
            .subsets
            .iter()
            .map(|s| {
                let mut policy = TrafficPolicy {
                    subset_labels: Some(s.labels.clone()),
                    ..top.clone()
                };
                if let Some(p) = &s.traffic_policy {
                    apply(&mut policy, p);
                }
                (s.name.clone(), Arc::new(policy))
            })
            .collect();
        CompiledDestinationRule {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            host: HostPattern::new(&rule.host, namespace),
            top: Arc::new(top),
            subsets,
        }
    }
}

/// The policy towards a host no DestinationRule names: Istio's defaults
/// (mesh mTLS on).
fn default_policy() -> &'static Arc<TrafficPolicy> {
    static DEFAULT: LazyLock<Arc<TrafficPolicy>> = LazyLock::new(|| {
        Arc::new(TrafficPolicy {
            tls: true,
            ..TrafficPolicy::default()
        })
    });
    &DEFAULT
}

fn count(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

fn duration(d: &Option<String>) -> Option<Duration> {
    d.as_deref().and_then(|d| parse_duration(d).ok())
}

/// Applies the fields `p` sets onto `out` (so a subset's policy overrides
/// the top-level one field by field).
fn apply(out: &mut TrafficPolicy, p: &dr::TrafficPolicy) {
    if let Some(lb) = &p.load_balancer {
        out.lb = match lb.simple {
            Some(SimpleLb::RoundRobin) => LbAlgorithm::RoundRobin,
            Some(SimpleLb::Random) => LbAlgorithm::Random,
            Some(SimpleLb::Passthrough) => LbAlgorithm::Passthrough,
            _ => LbAlgorithm::LeastRequest,
        };
        if let Some(l) = &lb.locality_lb_setting {
            out.locality = LocalityPolicy {
                enabled: l.enabled != Some(false),
                failover: l
                    .failover
                    .iter()
                    .map(|f| (f.from.clone(), f.to.clone()))
                    .collect(),
            };
        }
    }
    if let Some(cp) = &p.connection_pool {
        if let Some(t) = &cp.tcp {
            out.max_connections = count(t.max_connections);
            out.connect_timeout = duration(&t.connect_timeout);
            out.tcp_idle_timeout = t
                .idle_timeout
                .as_deref()
                .and_then(|d| parse_duration(d).ok());
        }
        if let Some(h) = &cp.http {
            out.max_pending_requests = count(h.http1_max_pending_requests);
            out.max_requests = count(h.http2_max_requests);
            out.max_requests_per_connection = count(h.max_requests_per_connection);
            // As the other `http` fields: a subset's `http` replaces the
            // top level's whole (DEFAULT: the mesh's, do not upgrade).
            out.h2_upgrade = h.h2_upgrade_policy == Some(dr::H2UpgradePolicy::Upgrade);
        }
    }
    if let Some(od) = &p.outlier_detection {
        let d = OutlierPolicy::default();
        out.outlier = Some(OutlierPolicy {
            consecutive_5xx: count(od.consecutive5xx_errors).unwrap_or(d.consecutive_5xx),
            consecutive_gateway: count(od.consecutive_gateway_errors)
                .unwrap_or(d.consecutive_gateway),
            interval: duration(&od.interval).unwrap_or(d.interval),
            base_ejection_time: duration(&od.base_ejection_time).unwrap_or(d.base_ejection_time),
            max_ejection_percent: count(od.max_ejection_percent).unwrap_or(d.max_ejection_percent),
        });
    }
    if let Some(mode) = p.tls.as_ref().and_then(|t| t.mode.as_ref()) {
        out.tls = !matches!(mode, dr::TlsMode::Disable);
    }
}

pub(crate) fn lookup(
    all: &[CompiledDestinationRule],
    client_ns: &str,
    host: &str,
    subset: Option<&str>,
) -> Result<Arc<TrafficPolicy>, RouteError> {
    let candidates = all.iter().filter_map(|r| {
        Some((
            r.host.specificity(host)?,
            r.namespace.as_str(),
            r.name.as_str(),
            r,
        ))
    });
    let rule = pick_best(candidates, client_ns);
    let found = match (rule, subset) {
        (None, None) => Some(default_policy()),
        (Some(rule), None) => Some(&rule.top),
        (None, Some(_)) => None,
        (Some(rule), Some(name)) => rule
            .subsets
            .iter()
            .find_map(|(n, p)| (n == name).then_some(p)),
    };
    found.cloned().ok_or_else(|| RouteError::UnknownSubset {
        host: host.to_owned(),
        subset: subset.unwrap_or_default().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{compile, policy};
    use super::*;

    const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

    fn rules() -> super::super::Policies {
        compile(&[policy(
            "DestinationRule",
            "bookinfo/reviews",
            json!({
                "host": "reviews",
                "trafficPolicy": {
                    "loadBalancer": {"simple": "RANDOM"},
                    "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "250ms", "idleTimeout": "24h"}},
                    "outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "1m"}
                },
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"},
                     "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}, "tls": {"mode": "DISABLE"}}}
                ]
            }),
        )])
    }

    #[test]
    fn subset_overrides_top_level() {
        let p = rules();
        let top = p.traffic_policy("bookinfo", REVIEWS, None).unwrap();
        assert_eq!(top.lb, LbAlgorithm::Random);
        assert_eq!(top.subset_labels, None);
        assert_eq!(top.connect_timeout, Some(Duration::from_millis(250)));
        assert_eq!(top.tcp_idle_timeout, Some(Duration::from_secs(86400)));
        let od = top.outlier.unwrap();
        assert_eq!(
            (
                od.consecutive_5xx,
                od.base_ejection_time,
                od.max_ejection_percent
            ),
            (3, Duration::from_secs(60), 10)
        );
        let v2 = p.traffic_policy("other", REVIEWS, Some("v2")).unwrap();
        assert_eq!(v2.lb, LbAlgorithm::RoundRobin);
        assert_eq!(
            v2.max_connections,
            Some(100),
            "top-level fields not overridden stay"
        );
        assert!(!v2.tls);
        assert_eq!(
            v2.subset_labels,
            Some([("version".to_owned(), "v2".to_owned())].into())
        );
        assert_eq!(v2.destination_rule.as_deref(), Some("bookinfo/reviews"));
    }

    #[test]
    fn h2_upgrade_policy_is_off_by_default_and_subsets_override_it() {
        let p = compile(&[policy(
            "DestinationRule",
            "bookinfo/reviews",
            json!({
                "host": "reviews",
                "trafficPolicy": {"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}},
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"},
                     "trafficPolicy": {"connectionPool": {"http": {"h2UpgradePolicy": "DO_NOT_UPGRADE"}}}},
                    {"name": "v3", "labels": {"version": "v3"},
                     "trafficPolicy": {"connectionPool": {"http": {"h2UpgradePolicy": "DEFAULT"}}}}
                ]
            }),
        )]);
        let upgrade = |subset| {
            p.traffic_policy("bookinfo", REVIEWS, subset)
                .unwrap()
                .h2_upgrade
        };
        assert!(upgrade(None));
        assert!(upgrade(Some("v1")));
        assert!(!upgrade(Some("v2")));
        // A subset's `http` settings replace the top level's, as the
        // other fields there do: DEFAULT is the mesh default.
        assert!(!upgrade(Some("v3")));
        assert!(
            !compile(&[])
                .traffic_policy("a", REVIEWS, None)
                .unwrap()
                .h2_upgrade
        );
    }

    #[test]
    fn a_request_gets_the_policy_worked_out_with_the_config() {
        let p = rules();
        for subset in [None, Some("v1"), Some("v2")] {
            let a = p.traffic_policy("bookinfo", REVIEWS, subset).unwrap();
            let b = p.traffic_policy("other", REVIEWS, subset).unwrap();
            assert!(Arc::ptr_eq(&a, &b), "{subset:?}: made again per lookup");
        }
        let none = compile(&[]);
        let a = none.traffic_policy("a", REVIEWS, None).unwrap();
        let b = none
            .traffic_policy("b", "other.b.svc.cluster.local", None)
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn missing_subset_is_a_clear_503() {
        let p = rules();
        let err = p
            .traffic_policy("bookinfo", REVIEWS, Some("v3"))
            .unwrap_err();
        assert_eq!(err.status(), 503);
        assert_eq!(
            err.to_string(),
            "subset \"v3\" of host reviews.bookinfo.svc.cluster.local is not defined by any DestinationRule"
        );
        let err = p
            .traffic_policy("bookinfo", "ratings.bookinfo.svc.cluster.local", Some("v1"))
            .unwrap_err();
        assert!(matches!(err, RouteError::UnknownSubset { .. }));
    }

    #[test]
    fn no_rule_gives_defaults() {
        let p = compile(&[]);
        let t = p.traffic_policy("a", REVIEWS, None).unwrap();
        assert_eq!(
            *t,
            TrafficPolicy {
                tls: true,
                ..TrafficPolicy::default()
            }
        );
        assert_eq!(t.lb, LbAlgorithm::LeastRequest);
        assert!(t.outlier.is_none());
    }
}
