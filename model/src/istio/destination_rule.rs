//! `DestinationRule` (`networking.istio.io/v1`): subsets and traffic policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    Errors, Path, Validate, is_dns_label, is_host_name, validate_duration, validate_labels,
};

/// The `spec` of a DestinationRule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    /// The service host (FQDN, short name in the object's namespace, or
    /// `*.suffix`).
    #[serde(default)]
    pub host: String,
    /// Policy for every subset, unless the subset sets its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named groups of endpoints, by labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
}

/// A named group of a service's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// A DNS label, unique in the rule.
    #[serde(default)]
    pub name: String,
    /// Labels an endpoint must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's policy, field by field at the top level
    /// (`loadBalancer`, `connectionPool`, `outlierDetection`, `tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `trafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Endpoint selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Passive health checking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS towards the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
}

/// `loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// The algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    /// Not implemented: refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<serde_json::Value>,
    /// Locality-aware load balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<LocalityLbSetting>,
}

lenient_enum! {
    /// `loadBalancer.simple`.
    SimpleLb {
        /// Istio's default (LEAST_REQUEST).
        Unspecified = "UNSPECIFIED",
        /// Fewest requests in flight of two random endpoints (`LEAST_CONN`
        /// is Istio's deprecated alias).
        LeastRequest = "LEAST_REQUEST" | "LEAST_CONN",
        /// Uniformly random.
        Random = "RANDOM",
        /// The original destination address (not balanced).
        Passthrough = "PASSTHROUGH",
        /// In turn.
        RoundRobin = "ROUND_ROBIN",
    }
}

/// `localityLbSetting`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityLbSetting {
    /// Locality load balancing is on unless this is `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Region-to-region failover order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<Failover>,
    /// Label keys whose equal values define preferred tiers (not
    /// implemented beyond validation: strait uses locality tiers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_priority: Vec<String>,
    /// Not implemented: refused when set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribute: Vec<serde_json::Value>,
}

/// `failover[]`: when `from`'s endpoints are unhealthy, go to `to`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Failover {
    /// The caller's region.
    #[serde(default)]
    pub from: String,
    /// The region to fail over to.
    #[serde(default)]
    pub to: String,
}

/// `connectionPool`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    /// TCP limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettings>,
    /// HTTP limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
}

/// `connectionPool.tcp`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    /// Most connections to the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    /// TCP connect timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// How long a connection may carry nothing either way before it is
    /// closed (Istio's default 1h; `0s` turns it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// `connectionPool.http`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    /// Most requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<i64>,
    /// Most requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<i64>,
    /// Most requests over one connection (0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<i64>,
    /// Whether HTTP/1.1 from the app goes to the destination as HTTP/2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
}

lenient_enum! {
    /// `connectionPool.http.h2UpgradePolicy`.
    H2UpgradePolicy {
        /// The mesh's default (Istio's: do not upgrade).
        Default = "DEFAULT",
        /// HTTP/1.1 stays HTTP/1.1 between the sidecars.
        DoNotUpgrade = "DO_NOT_UPGRADE",
        /// HTTP/1.1 goes as HTTP/2 between the sidecars.
        Upgrade = "UPGRADE",
    }
}

/// `outlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx answers (and connect failures) in a row that eject an endpoint;
    /// Envoy's default 5, 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx_errors: Option<i64>,
    /// 502/503/504 (and connect failures) in a row that eject; unset or 0
    /// disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<i64>,
    /// Time between analysis sweeps (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Ejection time, multiplied by the times ejected (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Most endpoints ejected at once, in percent (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i64>,
}

/// `tls`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSettings {
    /// The TLS mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TlsMode>,
}

lenient_enum! {
    /// `tls.mode`.
    TlsMode {
        /// Plain text.
        Disable = "DISABLE",
        /// TLS, server authenticated.
        Simple = "SIMPLE",
        /// mTLS with given certificates.
        Mutual = "MUTUAL",
        /// mTLS with the workload identity (the mesh default).
        IstioMutual = "ISTIO_MUTUAL",
    }
}

impl Validate for DestinationRule {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if !is_host_name(&self.host) || self.host == "*" {
            errors.at(
                &path.field("host"),
                format!("{:?} is not a service host", self.host),
            );
        }
        if let Some(tp) = &self.traffic_policy {
            tp.validate(&path.field("trafficPolicy"), errors);
        }
        for (i, s) in self.subsets.iter().enumerate() {
            let p = path.field("subsets").index(i);
            if !is_dns_label(&s.name) {
                errors.at(&p.field("name"), format!("{:?} is not a DNS label", s.name));
            }
            if self.subsets[..i].iter().any(|o| o.name == s.name) {
                errors.at(&p.field("name"), format!("{:?} is defined twice", s.name));
            }
            validate_labels(&s.labels, &p.field("labels"), errors);
            if let Some(tp) = &s.traffic_policy {
                tp.validate(&p.field("trafficPolicy"), errors);
            }
        }
    }
}

fn non_negative(value: Option<i64>, path: &Path, errors: &mut Errors) {
    if let Some(v) = value
        && !(0..=i64::from(u32::MAX)).contains(&v)
    {
        errors.at(path, format!("{v} is not a count in 0..={}", u32::MAX));
    }
}

impl Validate for TrafficPolicy {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if let Some(lb) = &self.load_balancer {
            let p = path.field("loadBalancer");
            if let Some(SimpleLb::Other(s)) = &lb.simple {
                errors.at(
                    &p.field("simple"),
                    format!("{s:?} is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH"),
                );
            }
            if lb.consistent_hash.is_some() {
                errors.at(
                    &p.field("consistentHash"),
                    "consistentHash is not supported",
                );
            }
            if let Some(l) = &lb.locality_lb_setting {
                let p = p.field("localityLbSetting");
                if !l.distribute.is_empty() {
                    errors.at(&p.field("distribute"), "distribute is not supported");
                }
                for (i, f) in l.failover.iter().enumerate() {
                    let fp = p.field("failover").index(i);
                    if f.from.is_empty() || f.to.is_empty() {
                        errors.at(&fp, "both from and to are required");
                    } else if f.from == f.to {
                        errors.at(&fp, format!("from and to are the same region {:?}", f.from));
                    }
                    if f.from.contains('/') || f.to.contains('/') {
                        errors.at(&fp, "from and to are regions, not region/zone");
                    }
                }
                for (i, k) in l.failover_priority.iter().enumerate() {
                    if k.is_empty() {
                        errors.at(&p.field("failoverPriority").index(i), "must not be empty");
                    }
                }
            }
        }
        if let Some(cp) = &self.connection_pool {
            let p = path.field("connectionPool");
            if let Some(t) = &cp.tcp {
                let p = p.field("tcp");
                non_negative(t.max_connections, &p.field("maxConnections"), errors);
                validate_duration(&t.connect_timeout, &p.field("connectTimeout"), errors);
                // `0s` is allowed here: it turns the timeout off.
                if let Some(text) = &t.idle_timeout
                    && let Err(e) = super::parse_duration(text)
                {
                    errors.at(&p.field("idleTimeout"), e);
                }
            }
            if let Some(h) = &cp.http {
                let p = p.field("http");
                non_negative(
                    h.http1_max_pending_requests,
                    &p.field("http1MaxPendingRequests"),
                    errors,
                );
                non_negative(h.http2_max_requests, &p.field("http2MaxRequests"), errors);
                non_negative(
                    h.max_requests_per_connection,
                    &p.field("maxRequestsPerConnection"),
                    errors,
                );
                if let Some(H2UpgradePolicy::Other(v)) = &h.h2_upgrade_policy {
                    errors.at(
                        &p.field("h2UpgradePolicy"),
                        format!("{v:?} is not one of DEFAULT, DO_NOT_UPGRADE, UPGRADE"),
                    );
                }
            }
        }
        if let Some(od) = &self.outlier_detection {
            let p = path.field("outlierDetection");
            non_negative(
                od.consecutive5xx_errors,
                &p.field("consecutive5xxErrors"),
                errors,
            );
            non_negative(
                od.consecutive_gateway_errors,
                &p.field("consecutiveGatewayErrors"),
                errors,
            );
            validate_duration(&od.interval, &p.field("interval"), errors);
            validate_duration(&od.base_ejection_time, &p.field("baseEjectionTime"), errors);
            if let Some(m) = od.max_ejection_percent
                && !(0..=100).contains(&m)
            {
                errors.at(
                    &p.field("maxEjectionPercent"),
                    format!("{m} is not in 0..=100"),
                );
            }
        }
        if let Some(TlsMode::Other(m)) = self.tls.as_ref().and_then(|t| t.mode.as_ref()) {
            errors.at(
                &path.field("tls").field("mode"),
                format!("{m:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{IstioSpec, parse};
    use super::*;

    fn reviews() -> serde_json::Value {
        json!({
            "host": "reviews.bookinfo.svc.cluster.local",
            "exportTo": ["*"],
            "trafficPolicy": {
                "loadBalancer": {
                    "simple": "LEAST_CONN",
                    "localityLbSetting": {"enabled": true, "failover": [{"from": "us-east", "to": "us-west"}]}
                },
                "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "30ms", "idleTimeout": "0s"},
                                   "http": {"http1MaxPendingRequests": 10, "http2MaxRequests": 1000, "maxRequestsPerConnection": 10}},
                "outlierDetection": {"consecutive5xxErrors": 7, "consecutiveGatewayErrors": 3, "interval": "5m",
                                     "baseEjectionTime": "15m", "maxEjectionPercent": 50},
                "tls": {"mode": "ISTIO_MUTUAL"}
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}},
                {"name": "v3", "labels": {"version": "v3"}}
            ]
        })
    }

    #[test]
    fn bookinfo_round_trip() {
        let Ok(IstioSpec::DestinationRule(dr)) = parse("DestinationRule", &reviews()) else {
            panic!("{:?}", parse("DestinationRule", &reviews()));
        };
        let lb = dr
            .traffic_policy
            .as_ref()
            .unwrap()
            .load_balancer
            .as_ref()
            .unwrap();
        assert_eq!(lb.simple, Some(SimpleLb::LeastRequest));
        assert_eq!(
            dr.subsets[1]
                .traffic_policy
                .as_ref()
                .unwrap()
                .load_balancer
                .as_ref()
                .unwrap()
                .simple,
            Some(SimpleLb::RoundRobin)
        );
        let od = dr
            .traffic_policy
            .as_ref()
            .unwrap()
            .outlier_detection
            .as_ref()
            .unwrap();
        assert_eq!(od.consecutive5xx_errors, Some(7));
        let again = serde_json::to_value(&dr).unwrap();
        assert_eq!(
            parse("DestinationRule", &again),
            Ok(IstioSpec::DestinationRule(dr))
        );
    }

    #[test]
    fn bad_inputs() {
        let tp = |p: serde_json::Value| json!({"host": "a", "trafficPolicy": p});
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (json!({}), "spec.host: \"\" is not a service host"),
            (
                json!({"host": "*"}),
                "spec.host: \"*\" is not a service host",
            ),
            (
                json!({"host": "a", "subsets": [{"name": "v_1"}]}),
                "spec.subsets[0].name: \"v_1\" is not a DNS label",
            ),
            (
                json!({"host": "a", "subsets": [{"name": "v1"}, {"name": "v1"}]}),
                "spec.subsets[1].name: \"v1\" is defined twice",
            ),
            (
                json!({"host": "a", "subsets": [{"name": "v1", "trafficPolicy": {"tls": {"mode": "NONE"}}}]}),
                "spec.subsets[0].trafficPolicy.tls.mode: \"NONE\" is not one of",
            ),
            (
                tp(json!({"loadBalancer": {"simple": "FASTEST"}})),
                "spec.trafficPolicy.loadBalancer.simple: \"FASTEST\" is not one of",
            ),
            (
                tp(json!({"loadBalancer": {"consistentHash": {"httpHeaderName": "x"}}})),
                "consistentHash is not supported",
            ),
            (
                tp(
                    json!({"loadBalancer": {"localityLbSetting": {"failover": [{"from": "a", "to": "a"}]}}}),
                ),
                "localityLbSetting.failover[0]: from and to are the same region",
            ),
            (
                tp(json!({"loadBalancer": {"localityLbSetting": {"failover": [{"from": "a"}]}}})),
                "localityLbSetting.failover[0]: both from and to",
            ),
            (
                tp(
                    json!({"loadBalancer": {"localityLbSetting": {"distribute": [{"from": "a/*"}]}}}),
                ),
                "distribute is not supported",
            ),
            (
                tp(json!({"connectionPool": {"tcp": {"maxConnections": -1}}})),
                "spec.trafficPolicy.connectionPool.tcp.maxConnections: -1",
            ),
            (
                tp(json!({"connectionPool": {"tcp": {"connectTimeout": "soon"}}})),
                "connectTimeout: \"soon\" is not a duration",
            ),
            (
                tp(json!({"connectionPool": {"tcp": {"idleTimeout": "forever"}}})),
                "tcp.idleTimeout: \"forever\" is not a duration",
            ),
            (
                tp(json!({"connectionPool": {"http": {"http2MaxRequests": -3}}})),
                "http.http2MaxRequests: -3",
            ),
            (
                tp(json!({"connectionPool": {"http": {"h2UpgradePolicy": "ALWAYS"}}})),
                "http.h2UpgradePolicy: \"ALWAYS\" is not one of DEFAULT, DO_NOT_UPGRADE, UPGRADE",
            ),
            (
                tp(json!({"outlierDetection": {"maxEjectionPercent": 150}})),
                "outlierDetection.maxEjectionPercent: 150 is not in 0..=100",
            ),
            (
                tp(json!({"outlierDetection": {"baseEjectionTime": "0s"}})),
                "baseEjectionTime: \"0s\" is shorter than 1ms",
            ),
            (
                tp(json!({"outlierDetection": {"consecutive5xxErrors": "many"}})),
                "spec: invalid type",
            ),
        ];
        for (spec, want) in cases {
            let errs = parse("DestinationRule", &spec).expect_err(&spec.to_string());
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{spec}: want {want:?}, got {errs:?}"
            );
        }
    }
}
