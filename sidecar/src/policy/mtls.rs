//! PeerAuthentication: the inbound mTLS mode.

use strait_model::istio::LabelSelector;
use strait_model::istio::peer_authentication::{self as pa, PeerAuthentication};

use super::Labels;

/// Whether an inbound connection must be mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// mTLS only: plain text is refused.
    Strict,
    /// mTLS or plain text (Istio's default).
    Permissive,
    /// Plain text only (mTLS is not terminated).
    Disable,
}

#[derive(Debug)]
pub(crate) struct CompiledPeerAuthn {
    namespace: String,
    /// `None`: namespace (or mesh) wide.
    selector: Option<LabelSelector>,
    mode: Option<MtlsMode>,
    ports: Vec<(u16, Option<MtlsMode>)>,
}

fn convert(m: &pa::MutualTls) -> Option<MtlsMode> {
    match m.mode.as_ref()? {
        pa::MtlsMode::Strict => Some(MtlsMode::Strict),
        pa::MtlsMode::Permissive => Some(MtlsMode::Permissive),
        pa::MtlsMode::Disable => Some(MtlsMode::Disable),
        pa::MtlsMode::Unset | pa::MtlsMode::Other(_) => None,
    }
}

impl CompiledPeerAuthn {
    pub(crate) fn new(namespace: &str, spec: &PeerAuthentication) -> Self {
        CompiledPeerAuthn {
            namespace: namespace.to_owned(),
            selector: spec.selector.clone().filter(|s| !s.match_labels.is_empty()),
            mode: spec.mtls.as_ref().and_then(convert),
            ports: spec.port_level().map(|(p, m)| (p, convert(m))).collect(),
        }
    }

    fn mode_for(&self, port: u16) -> Option<MtlsMode> {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .and_then(|(_, m)| *m)
            .or(self.mode)
    }
}

pub(crate) fn mode(
    all: &[CompiledPeerAuthn],
    root: &str,
    ns: &str,
    labels: &Labels,
    port: u16,
) -> MtlsMode {
    // Policies are kept sorted by (namespace, name): the first of a scope
    // wins, as Istio picks the oldest and strait has no creation time.
    let workload = all
        .iter()
        .find(|p| p.namespace == ns && p.selector.as_ref().is_some_and(|s| s.matches(labels)));
    let namespace = all
        .iter()
        .find(|p| p.namespace == ns && p.selector.is_none());
    let mesh = all
        .iter()
        .find(|p| p.namespace == root && p.selector.is_none());
    workload
        .and_then(|p| p.mode_for(port))
        .or_else(|| namespace.and_then(|p| p.mode))
        .or_else(|| mesh.and_then(|p| p.mode))
        .unwrap_or(MtlsMode::Permissive)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{compile, policy};
    use super::*;

    fn labels(app: &str) -> Labels {
        [("app".to_owned(), app.to_owned())].into()
    }

    #[test]
    fn precedence() {
        let p = compile(&[
            policy(
                "PeerAuthentication",
                "istio-system/mesh",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            policy(
                "PeerAuthentication",
                "legacy/ns",
                json!({"mtls": {"mode": "PERMISSIVE"}}),
            ),
            policy(
                "PeerAuthentication",
                "legacy/db",
                json!({
                    "selector": {"matchLabels": {"app": "db"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"8080": {"mode": "DISABLE"}, "9090": {"mode": "UNSET"}}
                }),
            ),
            policy(
                "PeerAuthentication",
                "inherit/ns",
                json!({"mtls": {"mode": "UNSET"}}),
            ),
            policy(
                "PeerAuthentication",
                "inherit/web",
                json!({
                    "selector": {"matchLabels": {"app": "web"}},
                    "portLevelMtls": {"80": {"mode": "DISABLE"}}
                }),
            ),
        ]);
        let cases = [
            ("default", "x", 80, MtlsMode::Strict, "mesh-wide STRICT"),
            (
                "legacy",
                "web",
                80,
                MtlsMode::Permissive,
                "namespace beats mesh",
            ),
            (
                "legacy",
                "db",
                80,
                MtlsMode::Strict,
                "workload beats namespace",
            ),
            (
                "legacy",
                "db",
                8080,
                MtlsMode::Disable,
                "port level beats workload",
            ),
            (
                "legacy",
                "db",
                9090,
                MtlsMode::Strict,
                "UNSET port inherits workload",
            ),
            (
                "inherit",
                "x",
                80,
                MtlsMode::Strict,
                "UNSET namespace inherits mesh",
            ),
            (
                "inherit",
                "web",
                80,
                MtlsMode::Disable,
                "port level without mtls",
            ),
            (
                "inherit",
                "web",
                81,
                MtlsMode::Strict,
                "other port falls to mesh",
            ),
        ];
        for (ns, app, port, want, why) in cases {
            assert_eq!(p.mtls_mode(ns, &labels(app), port), want, "{why}");
        }
        let none = compile(&[]);
        assert_eq!(none.mtls_mode("a", &labels("b"), 1), MtlsMode::Permissive);
    }

    #[test]
    fn workload_policy_of_another_namespace_does_not_apply() {
        let p = compile(&[policy(
            "PeerAuthentication",
            "other/db",
            json!({
                "selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "DISABLE"}
            }),
        )]);
        assert_eq!(
            p.mtls_mode("legacy", &labels("db"), 80),
            MtlsMode::Permissive
        );
    }
}
