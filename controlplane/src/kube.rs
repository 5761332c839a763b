//! The Kubernetes config source, and the write-back of imports to the API.
//!
//! [`watch_kube`] runs one `kube` watcher per resource (Services,
//! EndpointSlices, Pods, Nodes, Namespaces, and the Istio and MCS custom
//! resources, see [`store::SOURCES`]) and keeps a [`Config`] current, the
//! same model the directory source produces: every object is a document
//! read from the synthetic file `kube://<kind>/<namespace>/<name>`, judged
//! by [`Config::apply`], so a rejected object is named and keeps its last
//! good version. Pods that are workloads play the role of `WorkloadEntry`
//! objects ([`convert::pod_workload`]). A custom resource whose CRD is not
//! installed is an empty set (logged once); its watcher keeps retrying with
//! backoff, so installing the CRD later is picked up.
//!
//! [`apply_imports`] writes what the broker says this cluster imports with
//! server-side apply and deletes the objects strait applied before that are
//! no longer imported. [`roots::spawn_publisher`] keeps the mesh roots in a
//! ConfigMap of every namespace.

pub mod apply;
pub mod convert;
pub mod inject;
pub mod roots;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::watcher::{self, Event};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use apply::{ApplyFailure, ApplyReport, apply_imports};

use crate::source::{Config, Rejection};
use store::{Key, Msg, Source, Store};

/// How long after a change more changes are awaited before the config is
/// rebuilt.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How long [`watch_kube`] waits for every resource to be listed once.
pub const INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Who this control plane is, for the workloads it derives from pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// This cluster's name (the `strait.io/cluster` label of the
    /// `WorkloadEntry` documents made from pods).
    pub cluster: String,
    /// This cluster's network: the network of pods without a
    /// `topology.istio.io/network` label.
    pub network: String,
}

/// What can go wrong talking to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "the Kubernetes API did not list every watched resource within {}s; still waiting for: {}",
        timeout.as_secs(),
        pending.join(", ")
    )]
    InitialSync {
        timeout: Duration,
        pending: Vec<String>,
    },
    #[error("the Kubernetes config source stopped before its first config")]
    Stopped,
    #[error("{object}: cannot be serialized for the API: {source}")]
    Serialize {
        object: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{object}: apiVersion {api_version:?} is not <group>/<version>")]
    ApiVersion { object: String, api_version: String },
}

/// The sync progress the config task reports to [`watch_kube`].
#[derive(Debug, Clone, Default)]
struct Progress {
    synced: bool,
    pending: Vec<String>,
}

/// Starts watching the cluster's config and returns it, once every watched
/// resource has been listed (or found not installed), as a channel that
/// stays current (changes debounced by [`DEBOUNCE`]) until every receiver
/// is dropped, which stops the watchers.
pub async fn watch_kube(
    client: ::kube::Client,
    opts: KubeOptions,
) -> Result<watch::Receiver<Arc<Config>>, KubeError> {
    watch_kube_with(client, opts, INITIAL_SYNC_TIMEOUT).await
}

/// [`watch_kube`] with a chosen initial sync deadline.
pub async fn watch_kube_with(
    client: ::kube::Client,
    opts: KubeOptions,
    sync_timeout: Duration,
) -> Result<watch::Receiver<Arc<Config>>, KubeError> {
    let (msg_tx, msg_rx) = mpsc::channel(1024);
    let mut watchers = JoinSet::new();
    for (index, source) in store::SOURCES.iter().enumerate() {
        watchers.spawn(run_watcher(client.clone(), index, *source, msg_tx.clone()));
    }
    drop(msg_tx);
    let (config_tx, mut config_rx) = watch::channel(Arc::new(Config::default()));
    let (progress_tx, mut progress_rx) = watch::channel(Progress::default());
    tokio::spawn(run_config(
        Store::new(&store::SOURCES),
        opts,
        msg_rx,
        config_tx,
        progress_tx,
        watchers,
    ));
    let waited = tokio::time::timeout(sync_timeout, progress_rx.wait_for(|p| p.synced))
        .await
        .map(|r| r.is_ok());
    match waited {
        Ok(true) => {}
        Ok(false) => return Err(KubeError::Stopped),
        Err(_) => {
            return Err(KubeError::InitialSync {
                timeout: sync_timeout,
                pending: progress_rx.borrow().pending.clone(),
            });
        }
    }
    config_rx.mark_unchanged();
    Ok(config_rx)
}

fn object_key(obj: &DynamicObject) -> Key {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

fn receive(source: &Source, mut obj: DynamicObject) -> (Key, store::Object) {
    let key = object_key(&obj);
    obj.metadata.managed_fields = None;
    let object = match serde_json::to_value(obj) {
        Ok(v) => store::receive(source, v),
        Err(e) => store::Object::Invalid(format!("cannot be read: {e}")),
    };
    (key, object)
}

/// One resource's watcher: API events → [`Msg`]s, until the config task
/// goes away.
async fn run_watcher(client: ::kube::Client, index: usize, source: Source, tx: mpsc::Sender<Msg>) {
    let gvk = GroupVersionKind::gvk(source.group, source.version, source.kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, source.plural);
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let kind = source.kind;
    let mut missing_logged = false;
    while let Some(item) = stream.next().await {
        let msg = match item {
            Ok(Event::Init) => Msg::Init(index),
            Ok(Event::InitApply(obj)) => {
                let (key, object) = receive(&source, obj);
                Msg::InitApply(index, key, object)
            }
            Ok(Event::InitDone) => {
                if missing_logged {
                    tracing::info!(kind, "resource now served; watching it");
                    missing_logged = false;
                }
                Msg::InitDone(index)
            }
            Ok(Event::Apply(obj)) => {
                let (key, object) = receive(&source, obj);
                Msg::Apply(index, key, object)
            }
            Ok(Event::Delete(obj)) => Msg::Delete(index, object_key(&obj)),
            Err(watcher::Error::InitialListFailed(::kube::Error::Api(status)))
                if source.optional && status.code == 404 =>
            {
                if !missing_logged {
                    tracing::info!(
                        kind,
                        api_version = %source.api_version(),
                        "resource not served (CRD not installed?); treated as empty"
                    );
                    missing_logged = true;
                }
                Msg::Missing(index)
            }
            Err(e) => {
                tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
                Msg::Failed(index, e.to_string())
            }
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

/// Logs the rejections that are new since the previous config.
fn log_rejections(previous: &[Rejection], now: &[Rejection]) {
    for r in now {
        if !previous.contains(r) {
            tracing::warn!(rejection = %r, "config object rejected; its last good version stays in force");
        }
    }
}

/// Folds watcher events into the store and publishes a new config,
/// debounced, once every source is synced. Owns the watchers: they stop
/// when this returns (every config receiver dropped).
async fn run_config(
    mut store: Store,
    opts: KubeOptions,
    mut rx: mpsc::Receiver<Msg>,
    tx: watch::Sender<Arc<Config>>,
    progress: watch::Sender<Progress>,
    _watchers: JoinSet<()>,
) {
    let mut published = false;
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            () = tx.closed() => return,
        };
        let Some(first) = first else { return };
        let mut changed = store.handle(first);
        let deadline = tokio::time::Instant::now() + DEBOUNCE;
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => changed |= store.handle(m),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !store.synced() {
            progress.send_replace(Progress {
                synced: false,
                pending: store.pending(),
            });
            continue;
        }
        if !changed && published {
            continue;
        }
        let (files, skipped) = store.files(&opts.cluster, &opts.network);
        for ((ns, name), why) in &skipped {
            tracing::trace!(pod = %format!("{ns}/{name}"), reason = %why, "pod is not a workload");
        }
        let previous = tx.borrow().clone();
        let next = previous.apply(&files);
        log_rejections(&previous.rejections, &next.rejections);
        if !published || next != *previous {
            tracing::info!(
                objects = next.objects.len(),
                rejected = next.rejections.len(),
                "config from the Kubernetes API"
            );
            tx.send_replace(Arc::new(next));
        }
        if !published {
            published = true;
            progress.send_replace(Progress {
                synced: true,
                pending: Vec::new(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use serde_json::json;

    use super::*;
    use store::SOURCES;

    fn index(kind: &str) -> usize {
        SOURCES.iter().position(|s| s.kind == kind).unwrap()
    }

    fn service(name: &str) -> Msg {
        let i = index("Service");
        let object = store::receive(
            &SOURCES[i],
            json!({"metadata": {"name": name, "namespace": "ns"},
                "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}}),
        );
        Msg::Apply(i, ("ns".into(), name.into()), object)
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_once_synced_and_debounces_changes() {
        let (msg_tx, msg_rx) = mpsc::channel(16);
        let (config_tx, mut config_rx) = watch::channel(Arc::new(Config::default()));
        let (progress_tx, mut progress_rx) = watch::channel(Progress::default());
        tokio::spawn(run_config(
            Store::new(&SOURCES),
            KubeOptions {
                cluster: "c".into(),
                network: "n".into(),
            },
            msg_rx,
            config_tx,
            progress_tx,
            JoinSet::new(),
        ));
        for i in 1..SOURCES.len() {
            msg_tx.send(Msg::Missing(i)).await.unwrap();
        }
        msg_tx
            .send(Msg::Failed(0, "connection refused".into()))
            .await
            .unwrap();
        progress_rx
            .wait_for(|p| !p.pending.is_empty())
            .await
            .unwrap();
        assert_eq!(
            progress_rx.borrow().pending,
            vec!["v1 Namespace (connection refused)"]
        );
        assert!(!config_rx.has_changed().unwrap(), "nothing before sync");

        msg_tx.send(Msg::Missing(0)).await.unwrap();
        config_rx.changed().await.unwrap();
        assert!(config_rx.borrow_and_update().objects.is_empty());
        assert!(progress_rx.borrow().synced);

        // Two changes within the debounce window: one new config.
        msg_tx.send(service("a")).await.unwrap();
        tokio::time::sleep(DEBOUNCE / 2).await;
        msg_tx.send(service("b")).await.unwrap();
        config_rx.changed().await.unwrap();
        assert_eq!(config_rx.borrow_and_update().objects.len(), 2);
        tokio::time::sleep(DEBOUNCE * 5).await;
        assert!(!config_rx.has_changed().unwrap(), "one config for both");

        // A change that changes nothing publishes nothing.
        msg_tx.send(service("a")).await.unwrap();
        tokio::time::sleep(DEBOUNCE * 5).await;
        assert!(!config_rx.has_changed().unwrap());
    }
}
