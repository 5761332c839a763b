//! What the discovery snapshot is built from, and the task that rebuilds
//! it: the trust (roots the broker installed, peered bundles, deny-list,
//! identities bound to clusters), the other networks the imports name, and
//! a stamp of the trust files that tells when they changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use strait_broker_client::agent::{FEDERATED_DIR, Imports};
use strait_broker_client::client::CACERTS_DIR;
use tokio::sync::watch;

use crate::resources::{self, ClusterContext, NetworkInput, NetworkMode, Snapshot, TrustInput};
use crate::source::Config;

/// PEM certificates of a file, one string each.
fn pem_certs(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    pem::parse_many(text.as_bytes())
        .map(|v| {
            v.into_iter()
                .filter(|p| p.tag() == "CERTIFICATE")
                .map(|p| pem::encode(&p))
                .collect()
        })
        .unwrap_or_default()
}

/// The trust to publish: this mesh's roots (as the broker installed them),
/// peered meshes' bundles, and the deny-list.
pub fn read_trust(state_dir: &Path, imports: &Imports) -> TrustInput {
    let mut federated = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(state_dir.join(FEDERATED_DIR)) {
        for e in rd.flatten() {
            let path = e.path();
            if let Some(td) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
            {
                let certs = pem_certs(&path);
                if !certs.is_empty() {
                    federated.insert(td.to_string(), certs);
                }
            }
        }
    }
    TrustInput {
        local_roots_pem: pem_certs(&state_dir.join(CACERTS_DIR).join("root-cert.pem")),
        federated,
        denied_intermediates: imports.denied_intermediates.clone(),
        cluster_identities: imports.cluster_identities.clone(),
    }
}

/// The other networks the imports name, with their gateways.
pub fn networks(own: &str, imports: &Imports, quic: bool) -> Vec<NetworkInput> {
    let mut by_name: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for remote in imports.services.values().flatten() {
        let net = remote.from.network.to_string();
        if net == own {
            continue;
        }
        let gws = by_name.entry(net).or_default();
        for g in &remote.from.gateways {
            gws.insert(g.to_string());
        }
    }
    by_name
        .into_iter()
        .map(|(name, gws)| {
            let gateways: Vec<String> = gws.into_iter().collect();
            NetworkInput {
                name,
                tunnels: if quic { gateways.clone() } else { Vec::new() },
                gateways,
                mode: if quic {
                    NetworkMode::Quic
                } else {
                    NetworkMode::Sni
                },
            }
        })
        .collect()
}

/// Modification times of the trust files, to notice the broker agent
/// installing a new bundle or intermediate.
pub fn trust_stamp(state_dir: &Path) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut files: Vec<PathBuf> = ["root-cert.pem", "ca-cert.pem", "cert-chain.pem"]
        .iter()
        .map(|f| state_dir.join(CACERTS_DIR).join(f))
        .collect();
    if let Ok(rd) = std::fs::read_dir(state_dir.join(FEDERATED_DIR)) {
        files.extend(rd.flatten().map(|e| e.path()));
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            (p, m)
        })
        .collect()
}

/// What a served cluster's snapshot takes from the clusters served with it
/// (primary-remote).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Siblings {
    /// The served cluster's network as its config says now, when it may
    /// differ from the one it was started with (a Kubernetes remote's is
    /// read from its API, which may be down when the control plane starts).
    pub network: Option<String>,
    /// The other networks: network → gateways.
    pub others: BTreeMap<String, Vec<String>>,
}

/// Keeps a snapshot channel current: rebuilds on config, imports and trust
/// changes (trust files are polled every second) and publishes a snapshot
/// only when it differs from the last one.
pub fn spawn_builder(
    ctx: ClusterContext,
    state_dir: PathBuf,
    quic: bool,
    mut config: watch::Receiver<Arc<Config>>,
    mut imports: watch::Receiver<Imports>,
    mut siblings: watch::Receiver<Siblings>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> watch::Receiver<Arc<Snapshot>> {
    let trust_dir = state_dir.clone();
    let build = move |config: &Config, imports: &Imports, siblings: &Siblings| {
        let moved;
        let ctx = match &siblings.network {
            Some(network) if *network != ctx.network => {
                moved = ClusterContext {
                    network: network.clone(),
                    ..ctx.clone()
                };
                &moved
            }
            _ => &ctx,
        };
        let trust = read_trust(&state_dir, imports);
        let mut nets = networks(&ctx.network, imports, quic);
        for (name, gateways) in &siblings.others {
            if !nets.iter().any(|n| &n.name == name) {
                nets.push(NetworkInput {
                    name: name.clone(),
                    gateways: gateways.clone(),
                    mode: NetworkMode::Sni,
                    tunnels: Vec::new(),
                });
            }
        }
        let (snap, warnings) = resources::build(ctx, config, &trust, &nets);
        (snap.with_created(Instant::now()), warnings)
    };
    let (first, warnings) = build(
        &config.borrow_and_update(),
        &imports.borrow_and_update(),
        &siblings.borrow_and_update(),
    );
    for w in &warnings {
        tracing::warn!(warning = %w, "left out of discovery");
    }
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut last_warnings = warnings;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut stamp = trust_stamp(&trust_dir);
        let mut siblings_open = true;
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                r = config.changed() => if r.is_err() { return },
                r = imports.changed() => if r.is_err() { return },
                r = siblings.changed(), if siblings_open => if r.is_err() {
                    siblings_open = false;
                    continue;
                },
                _ = tick.tick() => {
                    let now = trust_stamp(&trust_dir);
                    if now == stamp {
                        continue;
                    }
                    stamp = now;
                }
            }
            let (snap, warnings) = build(
                &config.borrow_and_update(),
                &imports.borrow_and_update(),
                &siblings.borrow_and_update(),
            );
            for w in &warnings {
                if !last_warnings.contains(w) {
                    tracing::warn!(warning = %w, "left out of discovery");
                }
            }
            last_warnings = warnings;
            tx.send_if_modified(|cur| {
                if **cur == snap {
                    false
                } else {
                    *cur = Arc::new(snap);
                    true
                }
            });
        }
    });
    rx
}
