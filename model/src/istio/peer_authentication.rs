//! `PeerAuthentication` (`security.istio.io/v1`): whether inbound traffic
//! must be mutual TLS.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Errors, LabelSelector, Path, Validate};

/// The `spec` of a PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// The workloads it applies to; none means the whole namespace (or the
    /// mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// The mode for every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per workload port (the key is the port number as a string).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

/// `{ mode }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct MutualTls {
    /// The mode; unset inherits from the parent scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

lenient_enum! {
    /// `mtls.mode`.
    MtlsMode {
        /// Inherit from the parent scope (PERMISSIVE at the top).
        Unset = "UNSET",
        /// Plain text only.
        Disable = "DISABLE",
        /// mTLS or plain text.
        Permissive = "PERMISSIVE",
        /// mTLS only.
        Strict = "STRICT",
    }
}

impl PeerAuthentication {
    /// `portLevelMtls` with its keys as ports (after validation every key
    /// is one).
    pub fn port_level(&self) -> impl Iterator<Item = (u16, &MutualTls)> {
        self.port_level_mtls
            .iter()
            .filter_map(|(k, v)| k.parse::<u16>().ok().map(|p| (p, v)))
    }
}

impl Validate for PeerAuthentication {
    fn validate(&self, path: &Path, errors: &mut Errors) {
        if let Some(s) = &self.selector {
            s.validate(&path.field("selector"), errors);
        }
        let bad_mode = |m: &MutualTls| match &m.mode {
            Some(MtlsMode::Other(s)) => Some(format!(
                "{s:?} is not one of UNSET, DISABLE, PERMISSIVE, STRICT"
            )),
            _ => None,
        };
        if let Some(why) = self.mtls.as_ref().and_then(bad_mode) {
            errors.at(&path.field("mtls").field("mode"), why);
        }
        let p = path.field("portLevelMtls");
        if !self.port_level_mtls.is_empty()
            && self
                .selector
                .as_ref()
                .is_none_or(|s| s.match_labels.is_empty())
        {
            errors.at(
                &p,
                "needs a workload selector (Istio applies port-level mTLS per workload)",
            );
        }
        for (port, m) in &self.port_level_mtls {
            if !port.parse::<u16>().is_ok_and(|p| p > 0) {
                errors.at(&p.key(port), format!("{port:?} is not a port in 1..=65535"));
            }
            if let Some(why) = bad_mode(m) {
                errors.at(&p.key(port).field("mode"), why);
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
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9080": {"mode": "PERMISSIVE"}}
        });
        let Ok(IstioSpec::PeerAuthentication(pa)) = parse("PeerAuthentication", &spec) else {
            panic!("{:?}", parse("PeerAuthentication", &spec));
        };
        assert_eq!(pa.mtls.as_ref().unwrap().mode, Some(MtlsMode::Strict));
        assert_eq!(pa.port_level().map(|(p, _)| p).collect::<Vec<_>>(), [9080]);
        let again = serde_json::to_value(&pa).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn bad_inputs() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"mtls": {"mode": "strict"}}),
                "spec.mtls.mode: \"strict\" is not one of",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}}),
                "spec.portLevelMtls[\"http\"]: \"http\" is not a port",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"0": {"mode": "STRICT"}}}),
                "spec.portLevelMtls[\"0\"]",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"80": {"mode": "ON"}}}),
                "spec.portLevelMtls[\"80\"].mode: \"ON\"",
            ),
            (
                json!({"portLevelMtls": {"80": {"mode": "STRICT"}}}),
                "spec.portLevelMtls: needs a workload selector",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "v*"}}}),
                "spec.selector.matchLabels[\"app\"]: \"v*\": wildcards",
            ),
            (json!({"mtls": "STRICT"}), "spec: invalid type"),
        ];
        for (spec, want) in cases {
            let errs = parse("PeerAuthentication", &spec).expect_err(&spec.to_string());
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{spec}: want {want:?}, got {errs:?}"
            );
        }
    }
}
