//! The cluster side of the Sync stream, as a long-running task: keeps a
//! stream to the broker (failing over between the addresses of its
//! replicas, reconnecting with backoff), publishes the cluster's
//! exports (a snapshot, then deltas), applies and acknowledges imports,
//! installs trust bundle updates, and renews the cluster's intermediate when
//! the broker asks (a new key made here; only the CSR leaves).
//!
//! The local control plane embeds this; `strait cluster sync` runs it from
//! a static config file.
//!
//! This module is the I/O: the stream, the files of the joined directory
//! (trust bundles, the renewed intermediate) and the watch channels. The
//! protocol state (what was sent and acknowledged, the imports assembled
//! from updates, what to send when) is the pure [`session::SyncState`];
//! which address to try is the pure [`Failover`], when the pure
//! [`Backoff`].

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use strait_ca::authority::{self, Authority, KeyAlgorithm};
use strait_ca::{ClusterName, TrustBundle, TrustDomain, layout, pemfile};
use strait_model::mesh::{ExportedService, RemoteService, ServiceKey};
use strait_proto::strait::broker::v1 as pb;
use tokio::sync::watch;

use crate::client::{self, CACERTS_DIR, CLIENT_DIR, ClientError, SyncSession};

mod backoff;
mod failover;
pub mod session;

pub use backoff::Backoff;
pub use failover::Failover;
use session::{ImportsDelta, Step, SyncState};

/// Where a cluster keeps the bundles of peered meshes: `<td>.pem` each.
pub const FEDERATED_DIR: &str = "federated";
/// The first wait before reconnecting to the broker.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The longest wait before reconnecting to the broker.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a broker address may take to answer `Hello` with `Welcome`,
/// connecting included (which alone gives up after
/// [`strait_runtime::transport::CONNECT_TIMEOUT`]): a replica that accepts
/// connections but does not serve is left for the next address.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The Sync protocol state, across streams.
    sync: SyncState,
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
                sync: SyncState::default(),
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

    /// Runs until `shutdown` resolves; connection errors are retried, on
    /// the next broker address at once and, once every address failed,
    /// with backoff ([`Failover`], [`Backoff`]); never returned.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::default();
        let mut failover = Failover::default();
        loop {
            if failover.round_begins() {
                backoff.attempt(tokio::time::Instant::now().into_std());
            }
            // Read each time: the addresses come from broker.json.
            let addresses = client::read_broker_info(&self.config.dir)
                .map(|i| i.addresses)
                .unwrap_or_default();
            let len = addresses.len();
            let which = failover.current(len);
            let result = tokio::select! {
                r = self.session(which, &mut failover, &mut backoff) => r,
                () = &mut shutdown => return,
            };
            self.imports.send_modify(|i| i.connected = false);
            let address = addresses.get(which).map_or("-", String::as_str);
            let now = tokio::time::Instant::now().into_std();
            let delay = match result {
                Ok(()) => {
                    tracing::info!(address, "broker closed the sync stream");
                    failover.ended(len);
                    backoff.ended(now)
                }
                Err(ClientError::Refused(why)) => {
                    // Said once at error level; retried rarely, in case an
                    // operator restores the cluster's state. Every replica
                    // would say the same: the address stays.
                    if self.imports.borrow().refused.as_deref() != Some(why.as_str()) {
                        tracing::error!(reason = %why, "the broker refuses this cluster; it will not sync until it joins again");
                    }
                    self.imports.send_modify(|i| i.refused = Some(why));
                    failover.ended(len);
                    backoff.ended(now);
                    BACKOFF_MAX
                }
                Err(e) => {
                    let round_over = failover.failed(len);
                    let next = addresses
                        .get(failover.current(len))
                        .map_or("-", String::as_str);
                    if round_over && len <= 1 {
                        tracing::warn!(error = %e, address, "sync with the broker failed");
                        backoff.ended(now)
                    } else if round_over {
                        let delay = backoff.ended(now);
                        tracing::warn!(error = %e, address, next, retry_in = ?delay, "sync with the broker failed at every address; starting again from the one that last worked");
                        delay
                    } else {
                        tracing::warn!(error = %e, address, next, "sync with the broker failed; trying its next address");
                        Duration::ZERO
                    }
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut shutdown => return,
            }
        }
    }

    /// Changes the imports through `f` (a step of the protocol state) and
    /// publishes them if the step says it changed them.
    fn step(&mut self, f: impl FnOnce(&mut SyncState, &mut Imports) -> Step) -> Step {
        let sync = &mut self.sync;
        let mut step = Step::default();
        self.imports.send_if_modified(|i| {
            step = f(sync, i);
            step.publish
        });
        step
    }

    /// One Sync stream to broker address `which`, until it ends: the I/O
    /// around [`SyncState`].
    async fn session(
        &mut self,
        which: usize,
        failover: &mut Failover,
        backoff: &mut Backoff,
    ) -> Result<(), ClientError> {
        let (channel, info) = client::cluster_channel(&self.config.dir, which)?;
        self.identities.borrow_and_update();
        let (cluster, td) = info.identity()?;
        let hello = self.sync.hello(&self.imports.borrow(), self.info(&info));
        let mut session = tokio::time::timeout(OPEN_TIMEOUT, SyncSession::open(channel, hello))
            .await
            .map_err(|_| ClientError::NoWelcomeInTime(OPEN_TIMEOUT))??;
        failover.opened(info.addresses.len());
        self.imports.send_modify(|i| {
            i.connected = true;
            i.refused = None;
        });
        tracing::info!(cluster = %cluster, address = info.address(which).unwrap_or("-"), "sync stream to the broker open");
        let exports = &mut self.exports;
        let mut step = self.sync.welcome(session.broker_export_revision, || {
            exports.borrow_and_update().clone()
        });
        let mut pending_key: Option<rcgen::KeyPair> = None;
        loop {
            if step.synced {
                backoff.synced();
            }
            for m in step.send {
                session.send(m).await?;
            }
            step = tokio::select! {
                changed = self.identities.changed(), if self.identities_live => {
                    if changed.is_err() {
                        // The sender is gone: nothing will change any more.
                        self.identities_live = false;
                        Step::default()
                    } else {
                        self.identities.borrow_and_update();
                        Step::send(pb::sync_request::Msg::Info(self.info(&info)))
                    }
                }
                changed = self.exports.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let now = self.exports.borrow_and_update().clone();
                    self.step(|s, i| s.exports_changed(&now, i))
                }
                msg = session.recv() => {
                    let Some(msg) = msg? else {
                        return Ok(());
                    };
                    self.receive(msg, &cluster, &td, &mut pending_key)?
                }
            };
        }
    }

    /// What to do about one message from the broker: the file work it
    /// needs here, the protocol step in [`SyncState`].
    fn receive(
        &mut self,
        msg: pb::sync_response::Msg,
        cluster: &ClusterName,
        td: &TrustDomain,
        pending_key: &mut Option<rcgen::KeyPair>,
    ) -> Result<Step, ClientError> {
        use pb::sync_response::Msg;
        Ok(match msg {
            Msg::ExportsAck(a) => self.step(|s, i| s.exports_ack(&a, i)),
            Msg::Resync(r) => self.sync.resync(&r),
            Msg::Imports(u) => {
                let u = ImportsDelta::decode(&u).map_err(ClientError::Imports)?;
                let installed = self.installed_intermediate();
                self.step(|s, i| s.imports(u, installed, i))
            }
            Msg::Trust(t) => {
                let roots = self.install_trust(td, &t)?;
                let installed = self.installed_intermediate();
                let step = self.step(|s, i| s.trust(&t, installed, i));
                tracing::info!(version = t.bundle_version, roots, "trust bundle installed");
                step
            }
            Msg::Renew(r) => {
                tracing::info!(reason = %r.reason, "broker asked for a new intermediate");
                let key = authority::generate_key(KeyAlgorithm::EcdsaP256)?;
                let csr = authority::intermediate_csr(cluster, &key)?;
                *pending_key = Some(key);
                Step::send(pb::sync_request::Msg::Renew(pb::IntermediateCsr { csr }))
            }
            Msg::Intermediate(i) => {
                let Some(key) = pending_key.take() else {
                    tracing::warn!("the broker sent an intermediate nobody asked for; ignored");
                    return Ok(Step::default());
                };
                self.install_intermediate(cluster, td, &i, key)?;
                self.sync
                    .intermediate_installed(&self.imports.borrow(), self.installed_intermediate())
            }
            Msg::Welcome(_) => Step::default(),
        })
    }

    /// Fingerprint of the intermediate in the cluster's plug-in CA directory.
    fn installed_intermediate(&self) -> String {
        std::fs::read(self.config.dir.join(CACERTS_DIR).join(layout::CA_CERT))
            .ok()
            .and_then(|pem| pemfile::parse_certificates(&pem).ok())
            .and_then(|c| c.first().map(|d| strait_ca::cert::fingerprint_sha256(d)))
            .unwrap_or_default()
    }

    /// Writes the new bundle where the cluster's CA and broker client read
    /// it, and the peered meshes' bundles; returns how many roots the
    /// bundle has. (The deny-list and identities are published by the
    /// protocol step.)
    fn install_trust(&self, td: &TrustDomain, t: &pb::TrustUpdate) -> Result<usize, ClientError> {
        let roots = client::parse_pems(&t.trust_bundle, "trust bundle from the broker")?;
        let bundle = TrustBundle::new(Some(td.clone()), roots)?;
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
            let peer_td =
                TrustDomain::new(peer_td).map_err(|source| ClientError::FederatedTrustDomain {
                    value: peer_td.clone(),
                    source,
                })?;
            TrustBundle::from_pem(pem.as_bytes(), Some(peer_td.clone())).map_err(|source| {
                ClientError::FederatedBundle {
                    trust_domain: peer_td.clone(),
                    source,
                }
            })?;
            layout::write_public(&federated.join(format!("{peer_td}.pem")), pem)?;
        }
        Ok(bundle.roots().len())
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
        let chain = client::parse_pems(&i.intermediate_chain, "renewed intermediate")?;
        let ca = Authority::from_der(chain.clone(), key, Some(td)).map_err(|source| {
            ClientError::Intermediate {
                what: "renewed intermediate",
                source,
            }
        })?;
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
