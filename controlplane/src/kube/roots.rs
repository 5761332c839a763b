//! The mesh roots in every namespace, as istiod puts `istio-ca-root-cert`
//! there: ConfigMap [`NAME`] with key [`KEY`], the PEM of every root the
//! cluster trusts (the broker's bundle, several during a root rotation).
//! A pod's sidecar (and the east-west gateway) mounts it to verify the
//! control plane on its first connection; after a rotation, pods started
//! later get the new roots without anyone copying them.
//!
//! What to apply is a pure function ([`namespaces`], [`desired`]);
//! [`spawn_publisher`] applies it server-side, labelled as strait's, when
//! a namespace appears or the roots change, and retries what failed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Value, json};
use strait_model::objects::{MANAGED_BY, MANAGED_BY_LABEL};
use tokio::sync::watch;

use crate::source::Config;

/// The ConfigMap's name in every namespace.
pub const NAME: &str = "strait-ca-root-cert";
/// Its key: the roots, PEM.
pub const KEY: &str = "root-cert.pem";
/// The cluster's own machinery, left alone (as Istio leaves it).
pub const SKIPPED: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];
/// How soon a failed apply is tried again.
const RETRY: Duration = Duration::from_secs(30);
/// How often every namespace's ConfigMap is applied again, changed or not:
/// one someone edited or deleted comes back (as istiod restores
/// istio-ca-root-cert).
pub const RESYNC: Duration = Duration::from_secs(300);

/// The namespaces of the config that get the roots.
pub fn namespaces(config: &Config) -> BTreeSet<String> {
    // Keys sort by kind first: the Namespaces are one run.
    let from = crate::source::ObjectKey {
        kind: "Namespace".to_string(),
        namespace: String::new(),
        name: String::new(),
    };
    config
        .objects
        .range(from..)
        .map(|(k, _)| k)
        .take_while(|k| k.kind == "Namespace")
        .filter(|k| !SKIPPED.contains(&k.name.as_str()))
        .map(|k| k.name.clone())
        .collect()
}

/// The ConfigMap to apply in each namespace, by namespace.
pub fn desired(namespaces: &BTreeSet<String>, roots_pem: &str) -> BTreeMap<String, Value> {
    namespaces
        .iter()
        .map(|ns| {
            let body = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": NAME,
                    "namespace": ns,
                    "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                },
                "data": {KEY: roots_pem},
            });
            (ns.clone(), body)
        })
        .collect()
}

/// Where and how [`spawn_publisher`] publishes the roots.
#[derive(Clone)]
pub struct Publisher {
    pub client: ::kube::Client,
    /// The server-side apply field manager.
    pub field_manager: String,
    /// The roots, PEM (read again at every change).
    pub roots_file: PathBuf,
    /// How often everything is applied again ([`RESYNC`]).
    pub resync: Duration,
    /// A MutatingWebhookConfiguration whose webhooks' `caBundle` is kept
    /// equal to the roots (the injection webhook is served with a
    /// certificate under them).
    pub webhook: Option<String>,
}

/// Keeps [`NAME`] current in every namespace of `config` (and the
/// webhook's `caBundle`), with the roots read again whenever `changed`
/// ticks (the trust the control plane serves changed), and applies them
/// all again every `resync`. Stops when `stop` resolves.
pub fn spawn_publisher<T: Send + Sync + 'static>(
    p: Publisher,
    mut config: watch::Receiver<Arc<Config>>,
    mut changed: watch::Receiver<T>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::pin!(stop);
        let mut next_resync = tokio::time::Instant::now() + p.resync;
        let params = PatchParams::apply(&p.field_manager).force();
        // What each namespace holds now, as far as this process applied it.
        let mut applied: BTreeMap<String, Value> = BTreeMap::new();
        let mut webhook_roots: Option<String> = None;
        // What the last pass worked from: most config changes (pods come
        // and go) touch neither the namespaces nor the roots.
        let mut last: Option<(BTreeSet<String>, String)> = None;
        loop {
            let roots = match std::fs::read_to_string(&p.roots_file) {
                Ok(r) if r.contains("BEGIN CERTIFICATE") => Some(r),
                Ok(_) => {
                    tracing::warn!(file = %p.roots_file.display(), "no root certificate to publish");
                    None
                }
                Err(e) => {
                    tracing::warn!(file = %p.roots_file.display(), error = %e, "roots not published");
                    None
                }
            };
            let mut failed = false;
            let input = roots.map(|r| (namespaces(&config.borrow_and_update()), r));
            if let Some((names, roots)) = input.filter(|i| last.as_ref() != Some(i)) {
                last = Some((names.clone(), roots.clone()));
                let wanted = desired(&names, &roots);
                applied.retain(|ns, _| wanted.contains_key(ns));
                for (ns, body) in wanted {
                    if applied.get(&ns) == Some(&body) {
                        continue;
                    }
                    let api: Api<ConfigMap> = Api::namespaced(p.client.clone(), &ns);
                    match api.patch(NAME, &params, &Patch::Apply(&body)).await {
                        Ok(_) => {
                            tracing::info!(namespace = %ns, configmap = NAME, "mesh roots published");
                            applied.insert(ns, body);
                        }
                        Err(e) => {
                            // A namespace being deleted refuses it; the
                            // next change or the retry decides.
                            tracing::warn!(namespace = %ns, configmap = NAME, error = %e, "mesh roots not published");
                            failed = true;
                        }
                    }
                }
                if let Some(name) = &p.webhook
                    && webhook_roots.as_deref() != Some(roots.as_str())
                {
                    match set_ca_bundle(&p.client, name, &roots).await {
                        Ok(()) => {
                            tracing::info!(webhook = %name, "webhook caBundle set to the mesh roots");
                            webhook_roots = Some(roots);
                        }
                        Err(e) => {
                            tracing::warn!(webhook = %name, error = %e, "webhook caBundle not set");
                            failed = true;
                        }
                    }
                }
            }
            if failed {
                // Not done: the retry (or the next change) passes again.
                last = None;
            }
            let retry = async {
                if failed {
                    tokio::time::sleep(RETRY).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = &mut stop => return,
                r = config.changed() => if r.is_err() { return },
                r = changed.changed() => if r.is_err() { return },
                () = retry => {}
                () = tokio::time::sleep_until(next_resync) => {
                    applied.clear();
                    webhook_roots = None;
                    last = None;
                    next_resync = tokio::time::Instant::now() + p.resync;
                }
            }
        }
    });
}

/// Why a webhook's `caBundle` could not be set.
#[derive(Debug, thiserror::Error)]
enum CaBundleError {
    #[error("reading MutatingWebhookConfiguration {name}: {source}")]
    Get {
        name: String,
        #[source]
        source: ::kube::Error,
    },
    #[error("MutatingWebhookConfiguration {name} has no webhooks")]
    NoWebhooks { name: String },
    #[error("patching MutatingWebhookConfiguration {name}: {source}")]
    Patch {
        name: String,
        #[source]
        source: ::kube::Error,
    },
}

/// Sets every webhook's `caBundle` of the MutatingWebhookConfiguration
/// `name` to `roots` (a merge patch of its whole `webhooks` list, read
/// just before).
async fn set_ca_bundle(
    client: &::kube::Client,
    name: &str,
    roots: &str,
) -> Result<(), CaBundleError> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut mwc = api.get(name).await.map_err(|source| CaBundleError::Get {
        name: name.to_string(),
        source,
    })?;
    let mut webhooks = mwc.webhooks.take().unwrap_or_default();
    if webhooks.is_empty() {
        return Err(CaBundleError::NoWebhooks {
            name: name.to_string(),
        });
    }
    for w in &mut webhooks {
        w.client_config.ca_bundle = Some(k8s_openapi::ByteString(roots.as_bytes().to_vec()));
    }
    let patch = json!({"webhooks": webhooks});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|source| CaBundleError::Patch {
            name: name.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;
    use crate::source::{Object, ObjectKey};

    fn config_with(kinds_names: &[(&str, &str, &str)]) -> Config {
        let objects: BTreeMap<ObjectKey, Object> = kinds_names
            .iter()
            .map(|(kind, ns, name)| {
                (
                    ObjectKey {
                        kind: kind.to_string(),
                        namespace: ns.to_string(),
                        name: name.to_string(),
                    },
                    Object {
                        file: format!("kube://{kind}/{ns}/{name}").into(),
                        value: json!({"kind": kind}),
                    },
                )
            })
            .collect();
        Config {
            objects,
            rejections: Vec::new(),
        }
    }

    #[test]
    fn every_namespace_but_the_clusters_own_machinery_gets_the_roots() {
        let config = config_with(&[
            ("Namespace", "", "demo"),
            ("Namespace", "", "strait-system"),
            ("Namespace", "", "kube-system"),
            ("Namespace", "", "kube-public"),
            ("Namespace", "", "kube-node-lease"),
            ("Namespace", "", "local-path-storage"),
            // Other kinds name namespaces too, but only Namespaces count.
            ("Service", "ghost", "echo"),
        ]);
        assert_eq!(
            namespaces(&config),
            BTreeSet::from(["demo".to_string(), "strait-system".to_string()])
        );
    }

    #[test]
    fn each_namespace_gets_one_labelled_config_map_with_the_roots() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let ns = BTreeSet::from(["a".to_string(), "b".to_string()]);
        let d = desired(&ns, pem);
        assert_eq!(d.len(), 2);
        let a = &d["a"];
        assert_eq!(a["kind"], "ConfigMap");
        assert_eq!(a["metadata"]["name"], NAME);
        assert_eq!(a["metadata"]["namespace"], "a");
        assert_eq!(a["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(a["data"][KEY], pem);
        assert!(desired(&BTreeSet::new(), pem).is_empty());
    }
}
