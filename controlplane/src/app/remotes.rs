//! Primary-remote: the config of the remote clusters this control plane
//! also serves, and the view each served cluster's proxies get.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{AppConfig, AppError, ConfigSource, RemoteError, Siblings};
use crate::dirwatch;
use crate::source::Config;

/// A remote cluster this control plane serves: its config, and its API
/// client in Kubernetes mode.
pub(super) struct OpenedRemote {
    pub(super) name: strait_ca::ClusterName,
    pub(super) config: watch::Receiver<Arc<Config>>,
    pub(super) api: Option<::kube::Client>,
}

/// The config of every remote cluster (`--remote`): a watched directory,
/// or in Kubernetes mode the API its kubeconfig names. A Kubernetes
/// remote's network (the network of its pods) is the
/// `topology.istio.io/network` label of its `strait-system` Namespace when
/// its API is first read (default: this cluster's); that API need not be
/// up for this to return ([`follow_kube_remote`]).
pub(super) async fn open_remotes(cfg: &AppConfig) -> Result<Vec<OpenedRemote>, AppError> {
    let mut out = Vec::new();
    for r in &cfg.remotes {
        let flag = |source: RemoteError| AppError::Remote {
            name: r.name.to_string(),
            config: r.config_dir.clone(),
            source: Box::new(source),
        };
        let (rx, api) = match &cfg.source {
            ConfigSource::Dir(_) => (
                dirwatch::watch_dir(r.config_dir.clone(), cfg.config_limits)
                    .map_err(|e| flag(e.into()))?,
                None,
            ),
            ConfigSource::Kube => {
                let client = kube_client(&r.config_dir).await.map_err(&flag)?;
                let rx = follow_kube_remote(r.name.clone(), client.clone(), cfg.network.clone());
                (rx, Some(client))
            }
        };
        out.push(OpenedRemote {
            name: r.name.clone(),
            config: rx,
            api,
        });
    }
    Ok(out)
}

/// The first wait before a remote's API is tried again, doubling up to
/// [`REMOTE_RETRY_MAX`].
const REMOTE_RETRY: Duration = Duration::from_secs(1);
const REMOTE_RETRY_MAX: Duration = Duration::from_secs(10);

/// A Kubernetes remote's config, from its API: empty until the API has
/// been read once, then kept current (its watchers ride out later
/// outages, keeping the last config). The API need not be reachable now:
/// a remote's API down must not keep the primary from serving its own
/// cluster (istiod refuses to start then, istio#33564), so its network and
/// first listing are tried in the background, again with backoff until
/// they succeed. Stops when every receiver is dropped.
fn follow_kube_remote(
    name: strait_ca::ClusterName,
    client: ::kube::Client,
    default_network: String,
) -> watch::Receiver<Arc<Config>> {
    let (tx, rx) = watch::channel(Arc::new(Config::default()));
    tokio::spawn(async move {
        let mut delay = REMOTE_RETRY;
        let mut config = loop {
            let attempt = async {
                let network = kube_network(&client, &default_network).await?;
                tracing::info!(cluster = %name, %network, "reading a remote cluster from its Kubernetes API");
                let opts = crate::kube::KubeOptions {
                    cluster: name.to_string(),
                    network,
                };
                Ok::<_, RemoteError>(crate::kube::watch_kube(client.clone(), opts).await?)
            };
            let error = tokio::select! {
                r = attempt => match r {
                    Ok(config) => break config,
                    Err(e) => e,
                },
                () = tx.closed() => return,
            };
            tracing::warn!(
                cluster = %name, error = %error, retry_in = ?delay,
                "remote cluster's Kubernetes API not read; served without its config until it is"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = tx.closed() => return,
            }
            delay = (delay * 2).min(REMOTE_RETRY_MAX);
        };
        loop {
            tx.send_replace(config.borrow_and_update().clone());
            tokio::select! {
                r = config.changed() => if r.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    rx
}

/// A client of the API a kubeconfig file names (its current context).
async fn kube_client(kubeconfig: &Path) -> Result<::kube::Client, RemoteError> {
    let kc = ::kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config =
        ::kube::Config::from_custom_kubeconfig(kc, &::kube::config::KubeConfigOptions::default())
            .await?;
    ::kube::Client::try_from(config).map_err(RemoteError::Client)
}

/// The `topology.istio.io/network` label of the cluster's `strait-system`
/// Namespace, else `default`.
async fn kube_network(client: &::kube::Client, default: &str) -> Result<String, RemoteError> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: ::kube::Api<Namespace> = ::kube::Api::all(client.clone());
    let ns = api
        .get_opt(crate::remote::SYSTEM_NAMESPACE)
        .await
        .map_err(|source| RemoteError::Namespace {
            namespace: crate::remote::SYSTEM_NAMESPACE,
            source,
        })?;
    Ok(ns
        .and_then(|n| n.metadata.labels)
        .and_then(|l| l.get(crate::remote::NETWORK_LABEL).cloned())
        .unwrap_or_else(|| default.to_string()))
}

/// One served cluster's name, network, config view and sibling networks.
pub(super) type Served = (
    String,
    String,
    watch::Receiver<Arc<Config>>,
    watch::Receiver<Siblings>,
);

/// The views of every served cluster (this one first, then the remotes of
/// `remotes`), kept current as any of their configs change. Without
/// remotes, this cluster's view is its config as is.
pub(super) fn spawn_views(
    me: strait_model::mesh::ClusterInfo,
    clusterset_ips: Option<strait_model::imports::vips::VipRange>,
    remotes: Vec<(strait_ca::ClusterName, watch::Receiver<Arc<Config>>)>,
    own: watch::Receiver<Arc<Config>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Vec<Served> {
    use crate::remote::{Member, remote_info, sibling_networks, view};
    if remotes.is_empty() {
        // No siblings, ever: the sender goes, which the builder takes as
        // "no more changes".
        let (_, siblings) = watch::channel(Siblings::default());
        return vec![(me.name.to_string(), me.network.to_string(), own, siblings)];
    }
    let mut configs = vec![own];
    let mut names = Vec::new();
    for (name, rx) in remotes {
        names.push(name);
        configs.push(rx);
    }
    let members = move |configs: &mut [watch::Receiver<Arc<Config>>]| {
        let mut out = vec![Member {
            info: me.clone(),
            config: configs[0].borrow_and_update().clone(),
        }];
        for (name, rx) in names.iter().zip(configs[1..].iter_mut()) {
            let config = rx.borrow_and_update().clone();
            let info = match remote_info(name, &me.trust_domain, &me.network, &config) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(error = %e, "remote cluster's network: using the primary's");
                    remote_info(name, &me.trust_domain, &me.network, &Config::default())
                        .unwrap_or_else(|_| me.clone())
                }
            };
            out.push(Member { info, config });
        }
        out
    };
    let views = move |m: &[Member]| -> Vec<(Config, Siblings)> {
        (0..m.len())
            .map(|i| {
                let (v, warnings) = view(m, i, clusterset_ips.as_ref());
                for w in warnings {
                    tracing::warn!(cluster = %m[i].info.name, warning = %w, "served cluster view");
                }
                let siblings = Siblings {
                    network: Some(m[i].info.network.to_string()),
                    others: sibling_networks(m, i),
                };
                (v, siblings)
            })
            .collect()
    };
    let first = members(&mut configs);
    let mut senders = Vec::new();
    let mut out = Vec::new();
    for (m, (v, sib)) in first.iter().zip(views(&first)) {
        let (vtx, vrx) = watch::channel(Arc::new(v));
        let (stx, srx) = watch::channel(sib);
        senders.push((vtx, stx));
        out.push((
            m.info.name.to_string(),
            m.info.network.to_string(),
            vrx,
            srx,
        ));
    }
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let changed =
                futures::future::select_all(configs.iter_mut().map(|c| Box::pin(c.changed())));
            tokio::select! {
                () = &mut shutdown => return,
                (r, _, _) = changed => if r.is_err() { return },
            }
            let now = members(&mut configs);
            for ((vtx, stx), (v, sib)) in senders.iter().zip(views(&now)) {
                vtx.send_if_modified(|cur| {
                    if **cur == v {
                        false
                    } else {
                        *cur = Arc::new(v);
                        true
                    }
                });
                stx.send_if_modified(|cur| {
                    if *cur == sib {
                        false
                    } else {
                        *cur = sib;
                        true
                    }
                });
            }
        }
    });
    out
}

/// Kubernetes mode: the API servers that review service-account tokens
/// (this cluster's, and each remote cluster's for its own proxies).
pub(super) fn token_reviewers(
    cluster: &impl std::fmt::Display,
    own: Option<&::kube::Client>,
    remotes: &[OpenedRemote],
) -> Option<crate::ca::TokenReviewers> {
    let reviewers = crate::ca::TokenReviewers::new(cluster.to_string(), own?.clone());
    Some(
        remotes
            .iter()
            .fold(reviewers, |r, remote| match &remote.api {
                Some(api) => r.with_remote(remote.name.to_string(), api.clone()),
                None => r,
            }),
    )
}
