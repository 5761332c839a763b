//! Why an outbound request found no upstream to answer it, said so that
//! the one reading the access log or the client's answer can act on it:
//! a short code for `strait_sidecar_upstream_failures_total{reason}` and
//! a sentence naming the service, the subset and, behind another
//! network's gateway, the cluster. Pure: no I/O.

use strait_proto::strait::mesh::v1 as pb;

use crate::policy::{PickError, TrafficPolicy};

use super::upstream::{SendError, Target};

/// The code and the sentence for a request whose destination has no
/// endpoint to pick: `service`, `subset` (its labels in `tp`) and why the
/// balancer found none.
///
/// A subset whose labels no endpoint behind another network's gateway
/// carries is named as such: such an endpoint carries only the labels
/// every workload of its cluster shares (the export's `endpoint_labels`),
/// so a subset that tells that cluster's workloads apart cannot select
/// any of them from here.
pub(super) fn no_upstream(
    service: &pb::Service,
    subset: Option<&str>,
    tp: &TrafficPolicy,
    e: &PickError,
) -> (&'static str, String) {
    let code = match e {
        PickError::NoEndpoints => "no_endpoints",
        PickError::NoHealthyEndpoints(_) => "no_healthy_endpoints",
        PickError::AllEjected(_) => "all_ejected",
    };
    let named = subset.map(|s| format!(" subset {s}")).unwrap_or_default();
    let mut why = format!("no healthy upstream for {}{named}: {e}", service.hostname);
    if let (Some(labels), PickError::NoEndpoints) = (&tp.subset_labels, e) {
        let mut missed: Vec<&str> = service
            .endpoints
            .iter()
            .filter(|ep| ep.kind() == pb::endpoint::Kind::Gateway)
            .map(|ep| {
                if ep.cluster.is_empty() {
                    "?"
                } else {
                    ep.cluster.as_str()
                }
            })
            .collect();
        missed.sort_unstable();
        missed.dedup();
        if !missed.is_empty() {
            let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            why.push_str(&format!(
                "; the endpoints of cluster {} behind its gateway carry only the labels all its workloads share, not {}",
                missed.join(", "),
                wanted.join(",")
            ));
            return ("subset_not_exported", why);
        }
    }
    (code, why)
}

/// The code and the sentence for an attempt on endpoint `ep` (reached as
/// `target`) that failed with `e`.
pub(super) fn attempt_failure(
    e: &SendError,
    ep: &pb::Endpoint,
    target: &Target<'_>,
) -> (&'static str, String) {
    let why = format!("{e} ({})", target.address);
    match e {
        SendError::Closed(_) if ep.kind() == pb::endpoint::Kind::Gateway => {
            let cluster = if ep.cluster.is_empty() {
                "of another network"
            } else {
                ep.cluster.as_str()
            };
            (
                "gateway_refused",
                format!(
                    "upstream connect error: the east-west gateway of cluster {cluster} ({}) closed the connection for SNI {} during the TLS handshake, as it does for a service, port or subset it does not export (its strait_gateway_connections_total counts why)",
                    target.address,
                    target.sni()
                ),
            )
        }
        SendError::Connect(_) | SendError::Closed(_) => ("connect_failure", why),
        SendError::Reset(_) => ("reset", why),
        SendError::Timeout => ("timeout", why),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    fn gateway(cluster: &str) -> pb::Endpoint {
        pb::Endpoint {
            kind: pb::endpoint::Kind::Gateway as i32,
            address: "127.12.0.2".into(),
            port: 15443,
            cluster: cluster.into(),
            healthy: true,
            weight: 3,
            ..Default::default()
        }
    }

    fn service(endpoints: Vec<pb::Endpoint>) -> pb::Service {
        pb::Service {
            hostname: "echo.demo.svc.cluster.local".into(),
            endpoints,
            ..Default::default()
        }
    }

    fn subset(labels: &[(&str, &str)]) -> TrafficPolicy {
        TrafficPolicy {
            subset_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..TrafficPolicy::default()
        }
    }

    #[test]
    fn a_subset_no_remote_cluster_can_select_says_which_clusters() {
        let s = service(vec![gateway("west"), gateway("north"), gateway("west")]);
        let (code, why) = no_upstream(
            &s,
            Some("v2"),
            &subset(&[("version", "v2")]),
            &PickError::NoEndpoints,
        );
        assert_eq!(code, "subset_not_exported");
        assert!(
            why.contains("echo.demo.svc.cluster.local subset v2"),
            "{why}"
        );
        assert!(why.contains("cluster north, west behind"), "{why}");
        assert!(why.contains("version=v2"), "{why}");
    }

    #[test]
    fn local_endpoints_and_other_causes_keep_their_own_code() {
        let local = service(vec![pb::Endpoint {
            address: "10.0.0.1".into(),
            ..Default::default()
        }]);
        let (code, why) = no_upstream(
            &local,
            Some("v2"),
            &subset(&[("version", "v2")]),
            &PickError::NoEndpoints,
        );
        assert_eq!(code, "no_endpoints");
        assert!(!why.contains("gateway"), "{why}");
        let remote = service(vec![gateway("west")]);
        let tp = TrafficPolicy::default();
        assert_eq!(
            no_upstream(&remote, None, &tp, &PickError::NoHealthyEndpoints(2)).0,
            "no_healthy_endpoints"
        );
        assert_eq!(
            no_upstream(&remote, None, &tp, &PickError::AllEjected(1)).0,
            "all_ejected"
        );
    }

    #[test]
    fn a_gateway_closing_the_handshake_is_named_with_its_cluster_and_the_sni() {
        let s = service(vec![gateway("west")]);
        let tp = TrafficPolicy {
            tls: true,
            ..TrafficPolicy::default()
        };
        let t = Target::new(&s, &s.endpoints[0], 8080, None, &tp, Duration::from_secs(1));
        let closed = SendError::Closed("127.12.0.2:15443: TLS handshake: eof".into());
        let (code, why) = attempt_failure(&closed, &s.endpoints[0], &t);
        assert_eq!(code, "gateway_refused");
        assert!(
            why.contains("gateway of cluster west (127.12.0.2:15443)"),
            "{why}"
        );
        assert!(
            why.contains("outbound_.8080_._.echo.demo.svc.cluster.local"),
            "{why}"
        );
        // A sidecar that hangs up is a plain connect failure.
        let direct = pb::Endpoint {
            address: "10.0.0.1".into(),
            port: 15006,
            ..Default::default()
        };
        let t = Target::new(&s, &direct, 8080, Some("v1"), &tp, Duration::from_secs(1));
        assert_eq!(attempt_failure(&closed, &direct, &t).0, "connect_failure");
        assert_eq!(
            attempt_failure(&SendError::Timeout, &direct, &t).0,
            "timeout"
        );
    }

    #[test]
    fn the_sni_names_the_subset_only_for_endpoints_reached_directly() {
        let s = service(vec![gateway("west")]);
        let tp = TrafficPolicy::default();
        let via_gateway = Target::new(&s, &s.endpoints[0], 8080, Some("v2"), &tp, Duration::ZERO);
        assert_eq!(
            via_gateway.sni(),
            "outbound_.8080_._.echo.demo.svc.cluster.local"
        );
        let direct = pb::Endpoint {
            address: "10.0.0.1".into(),
            port: 15006,
            ..Default::default()
        };
        let t = Target::new(&s, &direct, 8080, Some("v2"), &tp, Duration::ZERO);
        assert_eq!(t.sni(), "outbound_.8080_.v2_.echo.demo.svc.cluster.local");
    }
}
