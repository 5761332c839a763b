//! The cluster side of the Sync stream, as a long-running task: keeps a
//! stream to the broker (reconnecting with backoff), publishes the cluster's
//! exports (a snapshot, then deltas), applies and acknowledges imports,
//! installs trust bundle updates, and renews the cluster's intermediate when
//! the broker asks (a new key made here; only the CSR leaves).
//!
//! The local control plane embeds this; `strait cluster sync` runs it from
//! a static config file.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use strait_ca::authority::{self, Authority, KeyAlgorithm};
use strait_ca::{ClusterName, TrustBundle, TrustDomain, layout, pemfile};
use strait_model::mesh::{ExportedService, RemoteService, ServiceKey};
use strait_proto::strait::broker::v1 as pb;
use tokio::sync::watch;

use crate::client::{self, CACERTS_DIR, CLIENT_DIR, ClientError, SyncSession};
use crate::wire;

/// Where a cluster keeps the bundles of peered meshes: `<td>.pem` each.
pub const FEDERATED_DIR: &str = "federated";
/// The first wait before reconnecting to the broker.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The longest wait before reconnecting to the broker.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// When to reconnect to the broker, free of I/O and of the clock (times
/// come in as arguments): exponential back-off from [`BACKOFF_MIN`] to
/// [`BACKOFF_MAX`] while attempts fail, back to the minimum once a stream
/// synced (the broker acknowledged the exports or pushed imports, or the
/// exports were already in sync) or lived longer than the maximum. So a
/// cluster resyncs within [`BACKOFF_MIN`] of the broker's return after
/// each of several short outages, not after the back-off those outages
/// built up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    started: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            started: None,
        }
    }
}

impl Backoff {
    /// A connection attempt begins at `now`.
    pub fn attempt(&mut self, now: Instant) {
        self.started = Some(now);
    }

    /// The stream reached a successful exchange with the broker.
    pub fn synced(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The attempt begun last ended at `now` (failed, or the stream
    /// closed): how long to wait before the next one.
    pub fn ended(&mut self, now: Instant) -> Duration {
        if self
            .started
            .take()
            .is_some_and(|s| now.saturating_duration_since(s) > BACKOFF_MAX)
        {
            self.next = BACKOFF_MIN;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }
}

/// What the cluster imports, as last pushed by the broker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imports {
    pub revision: u64,
    pub epoch: String,
    pub services: BTreeMap<ServiceKey, Vec<RemoteService>>,
    /// SHA-256 fingerprints of deny-listed intermediates.
    pub denied_intermediates: BTreeSet<String>,
    pub bundle_version: u64,
    /// Whether a stream to the broker is up.
    pub connected: bool,
    /// Whether the broker acknowledged the latest exports.
    pub exports_acked: bool,
    /// Why the broker refuses this cluster for good (it was revoked), as
    /// the broker said it; `None` while it does not.
    pub refused: Option<String>,
    /// When the mesh binds identities to clusters: what each cluster runs
    /// (`<ns>/<sa>` by cluster name); `None` when it does not.
    pub cluster_identities: Option<BTreeMap<String, BTreeSet<String>>>,
}

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The joined cluster directory (`cacerts/`, `broker-client/`, `broker.json`).
    pub dir: PathBuf,
    /// East-west gateway addresses to publish (`host:port`).
    pub gateways: Vec<String>,
    /// The longest workload certificate the cluster's CA issues (`None`:
    /// not known; the broker then assumes [`crate::state::LEAF_MAX_TTL`]).
    pub leaf_ttl_max: Option<Duration>,
}

/// The exports the cluster wants published, keyed by service.
pub type Exports = BTreeMap<ServiceKey, ExportedService>;

pub struct Agent {
    config: AgentConfig,
    exports: watch::Receiver<Exports>,
    /// The identities this cluster runs (`<ns>/<sa>`), told to the broker;
    /// watched while `identities_live` (set by [`Agent::with_identities`],
    /// cleared when its sender is gone).
    identities: watch::Receiver<BTreeSet<String>>,
    identities_live: bool,
    imports: watch::Sender<Imports>,
    /// The export revision the broker acknowledged in this process's life.
    acked: Option<(u64, Exports)>,
    revision: u64,
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        exports: watch::Receiver<Exports>,
    ) -> (Self, watch::Receiver<Imports>) {
        let (tx, rx) = watch::channel(Imports::default());
        (
            Agent {
                config,
                exports,
                identities: watch::channel(BTreeSet::new()).1,
                identities_live: false,
                imports: tx,
                acked: None,
                revision: 0,
            },
            rx,
        )
    }

    /// Tells the broker the identities this cluster runs (`<ns>/<sa>`):
    /// in every `Hello`, and again whenever `identities` changes.
    #[must_use]
    pub fn with_identities(mut self, identities: watch::Receiver<BTreeSet<String>>) -> Self {
        self.identities = identities;
        self.identities_live = true;
        self
    }

    fn info(&self, info: &client::BrokerInfo) -> pb::ClusterInfo {
        pb::ClusterInfo {
            network: info.network.clone(),
            locality: info.locality.clone(),
            gateways: self.config.gateways.clone(),
            leaf_ttl_max_seconds: self.config.leaf_ttl_max.map_or(0, |t| t.as_secs()),
            service_accounts: self.identities.borrow().iter().cloned().collect(),
        }
    }

    /// Runs until `shutdown` resolves; connection errors are retried with
    /// backoff, never returned.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::default();
        loop {
            backoff.attempt(tokio::time::Instant::now().into_std());
            let result = tokio::select! {
                r = self.session(&mut backoff) => r,
                () = &mut shutdown => return,
            };
            self.imports.send_modify(|i| i.connected = false);
            let mut delay = backoff.ended(tokio::time::Instant::now().into_std());
            match result {
                Ok(()) => tracing::info!("broker closed the sync stream"),
                Err(ClientError::Refused(why)) => {
                    // Said once at error level; retried rarely, in case an
                    // operator restores the cluster's state.
                    if self.imports.borrow().refused.as_deref() != Some(why.as_str()) {
                        tracing::error!(reason = %why, "the broker refuses this cluster; it will not sync until it joins again");
                    }
                    self.imports.send_modify(|i| i.refused = Some(why));
                    delay = BACKOFF_MAX;
                }
                Err(e) => tracing::warn!(error = %e, "sync with the broker failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut shutdown => return,
            }
        }
    }

    fn hello(&self) -> Result<pb::Hello, ClientError> {
        let info: client::BrokerInfo =
            serde_json::from_slice(&layout::read(&self.config.dir.join(client::BROKER_FILE))?)
                .map_err(|e| ClientError::Setup(format!("broker.json: {e}")))?;
        let current = self.imports.borrow();
        Ok(pb::Hello {
            export_revision: self.revision,
            import_revision: current.revision,
            import_epoch: current.epoch.clone(),
            bundle_version: current.bundle_version,
            info: Some(self.info(&info)),
        })
    }

    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), ClientError> {
        let (channel, info) = client::cluster_channel(&self.config.dir)?;
        self.identities.borrow_and_update();
        let cluster =
            ClusterName::new(&info.cluster).map_err(|e| ClientError::Setup(e.to_string()))?;
        let td =
            TrustDomain::new(&info.trust_domain).map_err(|e| ClientError::Setup(e.to_string()))?;
        let mut session = SyncSession::open(channel, self.hello()?).await?;
        self.imports.send_modify(|i| {
            i.connected = true;
            i.refused = None;
        });
        tracing::info!(cluster = %cluster, "sync stream to the broker open");

        // Exports: in sync only if this process saw the broker acknowledge
        // exactly what it holds now; otherwise a snapshot.
        let mut sent: Exports = match &self.acked {
            Some((rev, map)) if *rev == session.broker_export_revision => {
                backoff.synced();
                map.clone()
            }
            _ => {
                let now = self.exports.borrow_and_update().clone();
                self.revision = self.revision.max(session.broker_export_revision) + 1;
                session
                    .send(pb::sync_request::Msg::Exports(pb::ExportsUpdate {
                        revision: self.revision,
                        base_revision: 0,
                        snapshot: true,
                        upserts: now.values().map(wire::exported_service_pb).collect(),
                        removals: vec![],
                    }))
                    .await?;
                now
            }
        };
        let mut in_flight: BTreeMap<u64, Exports> = BTreeMap::new();
        in_flight.insert(self.revision, sent.clone());
        let mut pending_key: Option<rcgen::KeyPair> = None;
        loop {
            tokio::select! {
                changed = self.identities.changed(), if self.identities_live => {
                    if changed.is_err() {
                        // The sender is gone: nothing will change any more.
                        self.identities_live = false;
                        continue;
                    }
                    self.identities.borrow_and_update();
                    session.send(pb::sync_request::Msg::Info(self.info(&info))).await?;
                }
                changed = self.exports.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let now = self.exports.borrow_and_update().clone();
                    let upserts: Vec<_> = now
                        .iter()
                        .filter(|(k, v)| sent.get(*k) != Some(*v))
                        .map(|(_, v)| wire::exported_service_pb(v))
                        .collect();
                    let removals: Vec<_> = sent
                        .keys()
                        .filter(|k| !now.contains_key(*k))
                        .map(wire::service_ref)
                        .collect();
                    if upserts.is_empty() && removals.is_empty() {
                        continue;
                    }
                    let base = self.revision;
                    self.revision += 1;
                    session
                        .send(pb::sync_request::Msg::Exports(pb::ExportsUpdate {
                            revision: self.revision,
                            base_revision: base,
                            snapshot: false,
                            upserts,
                            removals,
                        }))
                        .await?;
                    in_flight.insert(self.revision, now.clone());
                    sent = now;
                    self.imports.send_modify(|i| i.exports_acked = false);
                }
                msg = session.recv() => {
                    let Some(msg) = msg? else {
                        return Ok(());
                    };
                    use pb::sync_response::Msg;
                    match msg {
                        Msg::ExportsAck(a) => {
                            if let Some(map) = in_flight.remove(&a.revision) {
                                self.acked = Some((a.revision, map));
                            }
                            in_flight.retain(|r, _| *r > a.revision);
                            let current = a.revision == self.revision;
                            backoff.synced();
                            self.imports.send_modify(|i| i.exports_acked = current);
                        }
                        Msg::Resync(r) => {
                            tracing::info!(have = r.have_revision, reason = %r.reason, "broker asked for an exports snapshot");
                            self.revision = self.revision.max(r.have_revision) + 1;
                            in_flight.clear();
                            session
                                .send(pb::sync_request::Msg::Exports(pb::ExportsUpdate {
                                    revision: self.revision,
                                    base_revision: 0,
                                    snapshot: true,
                                    upserts: sent.values().map(wire::exported_service_pb).collect(),
                                    removals: vec![],
                                }))
                                .await?;
                            in_flight.insert(self.revision, sent.clone());
                        }
                        Msg::Imports(u) => {
                            self.apply_imports(&u)?;
                            backoff.synced();
                            let bundle_version = self.imports.borrow().bundle_version;
                            session
                                .send(pb::sync_request::Msg::Ack(pb::Ack {
                                    import_revision: u.revision,
                                    bundle_version,
                                    intermediate_sha256: self.installed_intermediate(),
                                }))
                                .await?;
                        }
                        Msg::Trust(t) => {
                            self.install_trust(&td, &t)?;
                            let import_revision = self.imports.borrow().revision;
                            session
                                .send(pb::sync_request::Msg::Ack(pb::Ack {
                                    import_revision,
                                    bundle_version: t.bundle_version,
                                    intermediate_sha256: self.installed_intermediate(),
                                }))
                                .await?;
                        }
                        Msg::Renew(r) => {
                            tracing::info!(reason = %r.reason, "broker asked for a new intermediate");
                            let key = authority::generate_key(KeyAlgorithm::EcdsaP256)
                                .map_err(|e| ClientError::Setup(e.to_string()))?;
                            let csr = authority::intermediate_csr(&cluster, &key)
                                .map_err(|e| ClientError::Setup(e.to_string()))?;
                            pending_key = Some(key);
                            session.send(pb::sync_request::Msg::Renew(pb::IntermediateCsr { csr })).await?;
                        }
                        Msg::Intermediate(i) => {
                            let Some(key) = pending_key.take() else {
                                tracing::warn!("the broker sent an intermediate nobody asked for; ignored");
                                continue;
                            };
                            self.install_intermediate(&cluster, &td, &i, key)?;
                            let (import_revision, bundle_version) = {
                                let i = self.imports.borrow();
                                (i.revision, i.bundle_version)
                            };
                            session
                                .send(pb::sync_request::Msg::Ack(pb::Ack {
                                    import_revision,
                                    bundle_version,
                                    intermediate_sha256: self.installed_intermediate(),
                                }))
                                .await?;
                        }
                        Msg::Welcome(_) => {}
                    }
                }
            }
        }
    }

    /// Fingerprint of the intermediate in the cluster's plug-in CA directory.
    fn installed_intermediate(&self) -> String {
        std::fs::read(self.config.dir.join(CACERTS_DIR).join(layout::CA_CERT))
            .ok()
            .and_then(|pem| pemfile::parse_certificates(&pem).ok())
            .and_then(|c| c.first().map(|d| strait_ca::cert::fingerprint_sha256(d)))
            .unwrap_or_default()
    }

    fn apply_imports(&self, u: &pb::ImportsUpdate) -> Result<(), ClientError> {
        let upserts = wire::imports(&u.upserts)
            .map_err(|e| ClientError::Setup(format!("imports from the broker: {e}")))?;
        let removals = u
            .removals
            .iter()
            .map(wire::service_key)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Setup(format!("imports from the broker: {e}")))?;
        self.imports.send_modify(|i| {
            if u.snapshot {
                i.services.clear();
            }
            for k in &removals {
                i.services.remove(k);
            }
            i.services.extend(upserts);
            i.revision = u.revision;
            i.epoch = u.epoch.clone();
        });
        tracing::info!(
            revision = u.revision,
            snapshot = u.snapshot,
            "imports applied"
        );
        Ok(())
    }

    /// Writes the new bundle where the cluster's CA and broker client read
    /// it, and publishes the deny-list.
    fn install_trust(&self, td: &TrustDomain, t: &pb::TrustUpdate) -> Result<(), ClientError> {
        let roots = t
            .trust_bundle
            .iter()
            .map(|p| pemfile::parse_certificates(p.as_bytes()).map(|mut v| v.remove(0)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Setup(format!("trust bundle from the broker: {e}")))?;
        let bundle = TrustBundle::new(Some(td.clone()), roots)
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        for dir in [CACERTS_DIR, CLIENT_DIR] {
            layout::write_public(
                &self.config.dir.join(dir).join(layout::ROOT_CERT),
                &bundle.to_pem(),
            )?;
        }
        // Peered meshes' roots, one file per trust domain, never merged
        // into the own bundle.
        let federated = self.config.dir.join(FEDERATED_DIR);
        if !t.federated_bundles.is_empty() {
            layout::ensure_dir(&federated)?;
        }
        for (peer_td, pem) in &t.federated_bundles {
            let peer_td = TrustDomain::new(peer_td)
                .map_err(|e| ClientError::Setup(format!("federated bundle: {e}")))?;
            TrustBundle::from_pem(pem.as_bytes(), Some(peer_td.clone()))
                .map_err(|e| ClientError::Setup(format!("federated bundle {peer_td}: {e}")))?;
            layout::write_public(&federated.join(format!("{peer_td}.pem")), pem)?;
        }
        self.imports.send_modify(|i| {
            i.bundle_version = t.bundle_version;
            i.denied_intermediates = t.denied_intermediates.iter().cloned().collect();
            i.cluster_identities = t.bind_identities.then(|| {
                t.cluster_identities
                    .iter()
                    .map(|(c, s)| (c.clone(), s.names.iter().cloned().collect()))
                    .collect()
            });
        });
        tracing::info!(
            version = t.bundle_version,
            roots = bundle.roots().len(),
            "trust bundle installed"
        );
        Ok(())
    }

    /// Replaces the cluster's intermediate with the renewed one (after
    /// checking it fits the key made for it), and re-issues the broker
    /// client certificate under it.
    fn install_intermediate(
        &self,
        cluster: &ClusterName,
        td: &TrustDomain,
        i: &pb::IntermediateIssued,
        key: rcgen::KeyPair,
    ) -> Result<(), ClientError> {
        let chain = i
            .intermediate_chain
            .iter()
            .map(|p| pemfile::parse_certificates(p.as_bytes()).map(|mut v| v.remove(0)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Setup(format!("renewed intermediate: {e}")))?;
        let ca = Authority::from_der(chain.clone(), key, Some(td))
            .map_err(|e| ClientError::Setup(format!("renewed intermediate: {e}")))?;
        let cacerts = self.config.dir.join(CACERTS_DIR);
        let bundle = layout::load_bundle(&cacerts.join(layout::ROOT_CERT), Some(td.clone()))?;
        // An explicit renewal: the old key is replaced on purpose.
        layout::write_plugin_ca(&cacerts, &chain, Some(&ca.key_pem()), &bundle, true)?;
        client::issue_client_cert(&ca, cluster, &bundle, &self.config.dir.join(CLIENT_DIR))?;
        tracing::info!(
            expires = %ca.not_after(),
            "intermediate renewed; new workload certificates chain to it"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waits of `n` attempts that each fail at once (broker down).
    fn refused(b: &mut Backoff, t: &mut Instant, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                b.attempt(*t);
                let d = b.ended(*t);
                *t += d;
                d
            })
            .collect()
    }

    #[test]
    fn refused_attempts_back_off_exponentially_up_to_the_max() {
        let (mut b, mut t) = (Backoff::default(), Instant::now());
        let waits = refused(&mut b, &mut t, 8);
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
    }

    #[test]
    fn a_short_stream_that_synced_resets_the_backoff() {
        let (mut b, mut t) = (Backoff::default(), Instant::now());
        // Repeated short broker outages: each time a few refused attempts,
        // then a stream that syncs and lives one second.
        for outage in 0..5 {
            refused(&mut b, &mut t, 4);
            b.attempt(t);
            b.synced();
            t += Duration::from_secs(1);
            assert_eq!(
                b.ended(t),
                BACKOFF_MIN,
                "outage {outage}: the first retry after a synced stream"
            );
        }
    }

    #[test]
    fn a_stream_that_never_synced_keeps_backing_off() {
        let (mut b, mut t) = (Backoff::default(), Instant::now());
        refused(&mut b, &mut t, 3);
        // Opened, but the broker ended it before any exchange completed.
        b.attempt(t);
        t += Duration::from_millis(50);
        assert_eq!(b.ended(t), Duration::from_millis(1600));
    }

    #[test]
    fn a_long_lived_stream_resets_the_backoff_too() {
        let (mut b, mut t) = (Backoff::default(), Instant::now());
        refused(&mut b, &mut t, 6);
        b.attempt(t);
        t += BACKOFF_MAX + Duration::from_secs(1);
        assert_eq!(b.ended(t), BACKOFF_MIN);
    }
}
