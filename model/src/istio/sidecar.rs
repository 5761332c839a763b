//! `Sidecar` (`networking.istio.io/v1`): which services a proxy sees.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Errors, Path, Validate, is_dns_label, is_host_name, validate_labels};

/// The `spec` of a Sidecar.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    /// The workloads it applies to; none means the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// What the workload may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressListener>,
}

/// `workloadSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `egress[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct EgressListener {
    /// `namespace/host` entries: namespace `*` (any), `.` (the Sidecar's
    /// own), `~` (none) or a name; host `*`, `*.suffix` or a name.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// One parsed `egress[].hosts` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressHost<'a> {
    /// `*`, `.`, `~` or a namespace name.
    pub namespace: &'a str,
    /// `*`, `*.suffix` or a host name.
    pub host: &'a str,
}

/// A bad `egress[].hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressHostError {
    #[error("{entry:?} is not of the form namespace/host")]
    NoSlash { entry: String },
    #[error("{entry:?}: namespace {namespace:?} is not *, ., ~ or a namespace name")]
    Namespace { entry: String, namespace: String },
    #[error("{entry:?}: {host:?} is not a host name")]
    Host { entry: String, host: String },
}

/// Splits and checks a `namespace/host` entry.
pub fn parse_egress_host(entry: &str) -> Result<EgressHost<'_>, EgressHostError> {
    let (namespace, host) = entry
        .split_once('/')
        .ok_or_else(|| EgressHostError::NoSlash {
            entry: entry.to_string(),
        })?;
    if !(matches!(namespace, "*" | "." | "~") || is_dns_label(namespace)) {
        return Err(EgressHostError::Namespace {
            entry: entry.to_string(),
            namespace: namespace.to_string(),
        });
    }
    if !is_host_name(host) {
        return Err(EgressHostError::Host {
            entry: entry.to_string(),
            host: host.to_string(),
        });
    }
    Ok(EgressHost { namespace, host })
}

impl Validate for Sidecar {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if let Some(w) = &self.workload_selector {
            validate_labels(
                &w.labels,
                &path.field("workloadSelector").field("labels"),
                errors,
            );
        }
        for (i, e) in self.egress.iter().enumerate() {
            let p = path.field("egress").index(i).field("hosts");
            if e.hosts.is_empty() {
                errors.at(&p, "at least one host is required");
            }
            for (j, h) in e.hosts.iter().enumerate() {
                if let Err(why) = parse_egress_host(h) {
                    errors.at(&p.index(j), why);
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
            "workloadSelector": {"labels": {"app": "productpage"}},
            "egress": [{"hosts": ["./*", "istio-system/*", "bookinfo/reviews.bookinfo.svc.cluster.local"]}]
        });
        let Ok(IstioSpec::Sidecar(sc)) = parse("Sidecar", &spec) else {
            panic!("{:?}", parse("Sidecar", &spec));
        };
        assert_eq!(
            parse_egress_host(&sc.egress[0].hosts[2]),
            Ok(EgressHost {
                namespace: "bookinfo",
                host: "reviews.bookinfo.svc.cluster.local"
            })
        );
        assert_eq!(serde_json::to_value(&sc).unwrap(), spec);
    }

    #[test]
    fn bad_inputs() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"egress": [{"hosts": ["reviews"]}]}),
                "spec.egress[0].hosts[0]: \"reviews\" is not of the form namespace/host",
            ),
            (
                json!({"egress": [{"hosts": ["Bad_NS/*"]}]}),
                "namespace \"Bad_NS\"",
            ),
            (
                json!({"egress": [{"hosts": ["./a..b"]}]}),
                "\"a..b\" is not a host name",
            ),
            (
                json!({"egress": [{"hosts": []}]}),
                "spec.egress[0].hosts: at least one host",
            ),
            (
                json!({"workloadSelector": {"labels": {"": "x"}}}),
                "spec.workloadSelector.labels[\"\"]",
            ),
        ];
        for (spec, want) in cases {
            let errs = parse("Sidecar", &spec).expect_err(&spec.to_string());
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{spec}: want {want:?}, got {errs:?}"
            );
        }
    }
}
