//! The broker's gRPC services: `Federation` (clusters) and `Admin`.
//!
//! Handlers authenticate the caller from its TLS client certificate, then
//! call into [`BrokerState`]; everything protocol-shaped (what to push when)
//! lives in the sync session below, everything stateful in `state`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_ca::cert::CertSummary;
use strait_ca::tls::TrustError;
use strait_ca::{ClusterName, SpiffeId};
use strait_model::mesh::{Locality, Network, RemoteService};
use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::reconcile::{ExportsChange, SyncError};
use crate::state::{BrokerState, ClusterRecord, Membership, StateError};
use crate::token::DEFAULT_TTL;
use crate::wire;

/// How often a sync session checks whether the cluster's intermediate is
/// due for renewal.
pub const RENEWAL_CHECK: Duration = Duration::from_secs(30);

/// How long a new Sync stream may take to say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is calling, from the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Cluster(ClusterName),
    Admin(String),
}

impl From<StateError> for Status {
    fn from(e: StateError) -> Self {
        match &e {
            StateError::Token(_) => Status::permission_denied(e.to_string()),
            StateError::Duplicate(..) => Status::already_exists(e.to_string()),
            StateError::UnknownCluster(_) => Status::not_found(e.to_string()),
            StateError::Revoked(_) => Status::permission_denied(e.to_string()),
            StateError::Invalid(_) | StateError::Sync(_) => Status::invalid_argument(e.to_string()),
            StateError::Issue(_) => Status::failed_precondition(e.to_string()),
            StateError::Rotation(_) => Status::failed_precondition(e.to_string()),
            StateError::Store(_) | StateError::Corrupt { .. } => Status::unavailable(e.to_string()),
        }
    }
}

/// Authenticates the caller of `req`. Cluster identities must come from
/// that cluster's own intermediate (subject `CN=<cluster>`), so a cluster's
/// CA cannot mint another cluster's identity; admin identities must be
/// issued by the root itself.
pub fn authenticate<T>(state: &BrokerState, req: &Request<T>) -> Result<Caller, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required for this call"))?;
    let svid = strait_ca::tls::peer_identity(&state.trust, &certs, OffsetDateTime::now_utc())
        .map_err(|e| match e {
            // The handshake let this chain through (the broker applies the
            // deny-list per call) so that a revoked cluster hears why.
            TrustError::Revoked { .. } => {
                tracing::warn!(peer = ?req.remote_addr(), error = %e, "refused a revoked cluster");
                Status::permission_denied(format!(
                    "this cluster is revoked: {e}; it can take part again only by joining with a new token"
                ))
            }
            e => Status::unauthenticated(format!("client certificate refused: {e}")),
        })?;
    let id: &SpiffeId = &svid.spiffe_id;
    let segments: Vec<&str> = id.segments().collect();
    match segments.as_slice() {
        ["strait", "cluster", name] => {
            let name = ClusterName::new(name)
                .map_err(|e| Status::unauthenticated(format!("{id}: {e}")))?;
            let issuer_ok = svid.path_len == 3
                && certs.len() == 2
                && strait_ca::authority::cluster_of_intermediate(
                    state.trust_domain.as_str(),
                    &svid.leaf_issuer,
                ) == Some(name.as_str());
            if !issuer_ok {
                return Err(Status::unauthenticated(format!(
                    "{id} must be issued by cluster {name}'s own intermediate"
                )));
            }
            Ok(Caller::Cluster(name))
        }
        ["strait", "admin", name] => {
            if svid.path_len != 2 {
                return Err(Status::unauthenticated(format!(
                    "{id} must be issued by the mesh root itself"
                )));
            }
            Ok(Caller::Admin((*name).to_string()))
        }
        _ => Err(Status::permission_denied(format!(
            "{id} has no role at the broker"
        ))),
    }
}

/// The `Federation` service.
pub struct FederationService {
    pub state: Arc<BrokerState>,
    pub metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        let joined = match self
            .state
            .join(&r.token, &r.csr, OffsetDateTime::now_utc())
            .await
        {
            Ok(j) => j,
            Err(e) => {
                self.metrics.join(false);
                tracing::warn!(?peer, error = %e, "join refused");
                return Err(e.into());
            }
        };
        self.metrics.join(true);
        tracing::info!(cluster = %joined.record.name, ?peer, "cluster joined");
        let pem = |d: &Vec<u8>| strait_ca::pemfile::encode(strait_ca::pemfile::CERTIFICATE, d);
        Ok(Response::new(pb::JoinResponse {
            cluster: joined.record.name.clone(),
            trust_domain: self.state.trust_domain.to_string(),
            network: joined.record.network.clone(),
            locality: joined.record.locality.clone(),
            intermediate_chain: joined.chain.iter().map(pem).collect(),
            trust_bundle: joined.bundle.roots().iter().map(pem).collect(),
            bundle_version: joined.bundle_version,
        }))
    }

    type SyncStream = ReceiverStream<Result<pb::SyncResponse, Status>>;

    async fn sync(
        &self,
        req: Request<Streaming<pb::SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let Caller::Cluster(name) = authenticate(&self.state, &req)? else {
            return Err(Status::permission_denied("Sync is for clusters"));
        };
        self.state.check_member(&name).await?;
        let (tx, rx) = mpsc::channel(32);
        let session = Session {
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            cluster: name,
            tx,
        };
        tokio::spawn(session.run(req.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Session {
    state: Arc<BrokerState>,
    metrics: Arc<Metrics>,
    cluster: ClusterName,
    tx: mpsc::Sender<Result<pb::SyncResponse, Status>>,
}

fn msg(m: pb::sync_response::Msg) -> Result<pb::SyncResponse, Status> {
    Ok(pb::SyncResponse { msg: Some(m) })
}

impl Session {
    async fn send(&self, m: pb::sync_response::Msg) -> bool {
        self.tx.send(msg(m)).await.is_ok()
    }

    async fn fail(&self, status: Status) {
        tracing::warn!(cluster = %self.cluster, error = %status.message(), "sync stream ended");
        let _ = self.tx.send(Err(status)).await;
    }

    async fn run(self, mut inbound: Streaming<pb::SyncRequest>) {
        let _connected = self.metrics.connected(&self.cluster);
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::SyncRequest {
                msg: Some(pb::sync_request::Msg::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                return self
                    .fail(Status::invalid_argument("the first message must be Hello"))
                    .await;
            }
            Ok(Err(e)) => return self.fail(e).await,
            Err(_) => {
                return self
                    .fail(Status::deadline_exceeded("no Hello within 10 s"))
                    .await;
            }
        };
        tracing::info!(
            cluster = %self.cluster,
            export_revision = hello.export_revision,
            import_revision = hello.import_revision,
            "sync stream opened"
        );
        if let Some(info) = &hello.info
            && let Err(s) = self.update_info(info).await
        {
            return self.fail(s).await;
        }
        // Up from here on: a withdrawn cluster is restored.
        let _live = match self.state.stream_opened(&self.cluster).await {
            Ok(live) => live,
            Err(e) => return self.fail(e.into()).await,
        };
        let have = {
            let inner = self.state.lock().await;
            inner
                .mesh
                .cluster(&self.cluster)
                .map_or(0, |c| c.export_revision)
        };
        if !self
            .send(pb::sync_response::Msg::Welcome(pb::Welcome {
                export_revision: have,
            }))
            .await
        {
            return;
        }
        let mut cursor = Cursor {
            renew_asked: false,
            known: None,
            import_revision: hello.import_revision,
            same_epoch: hello.import_epoch == self.state.epoch,
            bundle_version: hello.bundle_version,
        };
        let mut revisions = self.state.subscribe();
        // Renewal is due by the clock, not by any event: look every so often.
        let mut tick = tokio::time::interval(RENEWAL_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        if let Err(s) = self.push(&mut cursor).await {
            return self.fail(s).await;
        }
        loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(req)) => {
                        if let Err(s) = self.handle(req).await {
                            return self.fail(s).await;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(cluster = %self.cluster, error = %e, "sync stream broken");
                        break;
                    }
                },
                changed = revisions.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if let Err(s) = self.push(&mut cursor).await {
                        return self.fail(s).await;
                    }
                }
                _ = tick.tick() => {
                    if let Err(s) = self.push(&mut cursor).await {
                        return self.fail(s).await;
                    }
                }
                () = self.tx.closed() => break,
            }
        }
        tracing::info!(cluster = %self.cluster, "sync stream closed");
    }

    async fn update_info(&self, info_pb: &pb::ClusterInfo) -> Result<(), Status> {
        let info = wire::cluster_info(&self.cluster, &self.state.trust_domain, info_pb)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let leaf_ttl = (info_pb.leaf_ttl_max_seconds > 0)
            .then(|| Duration::from_secs(info_pb.leaf_ttl_max_seconds));
        let service_accounts = wire::service_accounts(&info_pb.service_accounts)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.state
            .apply_info(&self.cluster, info, leaf_ttl, service_accounts)
            .await?;
        Ok(())
    }

    async fn handle(&self, req: pb::SyncRequest) -> Result<(), Status> {
        use pb::sync_request::Msg;
        match req.msg {
            Some(Msg::Exports(u)) => self.exports(u).await,
            Some(Msg::Ack(a)) => {
                self.state
                    .ack(
                        &self.cluster,
                        a.import_revision,
                        a.bundle_version,
                        &a.intermediate_sha256,
                        OffsetDateTime::now_utc(),
                    )
                    .await?;
                Ok(())
            }
            Some(Msg::Info(info)) => self.update_info(&info).await,
            Some(Msg::Renew(r)) => {
                let chain = self
                    .state
                    .renew_intermediate(&self.cluster, &r.csr, OffsetDateTime::now_utc())
                    .await?;
                tracing::info!(cluster = %self.cluster, "intermediate renewed");
                self.send(pb::sync_response::Msg::Intermediate(
                    pb::IntermediateIssued {
                        intermediate_chain: chain
                            .iter()
                            .map(|d| strait_ca::pemfile::encode(strait_ca::pemfile::CERTIFICATE, d))
                            .collect(),
                    },
                ))
                .await;
                Ok(())
            }
            Some(Msg::Hello(_)) => Err(Status::invalid_argument("Hello may only come first")),
            None => Err(Status::invalid_argument("empty SyncRequest")),
        }
    }

    async fn exports(&self, u: pb::ExportsUpdate) -> Result<(), Status> {
        let started = Instant::now();
        let bad = |e: wire::WireError| {
            Status::invalid_argument(format!("exports update {}: {e}", u.revision))
        };
        let upserts = u
            .upserts
            .iter()
            .map(wire::exported_service)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let change = if u.snapshot {
            ExportsChange::Snapshot {
                revision: u.revision,
                services: upserts,
            }
        } else {
            ExportsChange::Delta {
                base: u.base_revision,
                revision: u.revision,
                upserts,
                removals: u
                    .removals
                    .iter()
                    .map(wire::service_key)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bad)?,
            }
        };
        match self.state.apply_exports(&self.cluster, change).await {
            Ok(_) => {
                self.metrics.sync_applied(started.elapsed());
                let total = {
                    let inner = self.state.lock().await;
                    inner
                        .mesh
                        .clusters()
                        .map(|(_, c)| c.exports.len())
                        .sum::<usize>()
                };
                self.metrics.set_exports(total);
                self.send(pb::sync_response::Msg::ExportsAck(pb::ExportsAck {
                    revision: u.revision,
                }))
                .await;
                Ok(())
            }
            Err(StateError::Sync(SyncError::BaseMismatch { have, base })) => {
                self.send(pb::sync_response::Msg::Resync(pb::ResyncExports {
                    have_revision: have,
                    reason: format!(
                        "delta base {base} does not match the broker's revision {have}"
                    ),
                }))
                .await;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends what the cluster lacks: trust first, then imports.
    async fn push(&self, cursor: &mut Cursor) -> Result<(), Status> {
        let (trust, update, renew) = {
            let inner = self.state.lock().await;
            let renew = match inner.records.get(self.cluster.as_str()) {
                Some(r) if r.membership == Membership::Joined => {
                    r.renewal_due(OffsetDateTime::now_utc())
                }
                _ => {
                    return Err(Status::permission_denied(format!(
                        "cluster {} is revoked",
                        self.cluster
                    )));
                }
            };
            let trust = (inner.bundle_version != cursor.bundle_version).then(|| pb::TrustUpdate {
                bundle_version: inner.bundle_version,
                trust_bundle: self
                    .state
                    .trust
                    .bundle()
                    .roots()
                    .iter()
                    .map(|d| strait_ca::pemfile::encode(strait_ca::pemfile::CERTIFICATE, d))
                    .collect(),
                denied_intermediates: inner.denied.iter().cloned().collect(),
                federated_bundles: self.state.peers.federated_bundles().into_iter().collect(),
                bind_identities: inner.bind_identities,
                cluster_identities: inner
                    .cluster_identities()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(c, names)| {
                        (
                            c,
                            pb::ServiceAccounts {
                                names: names.into_iter().collect(),
                            },
                        )
                    })
                    .collect(),
            });
            let update =
                inner
                    .mesh
                    .import_update(&self.cluster, cursor.import_revision, cursor.same_epoch);
            (trust, update, renew)
        };
        if let Some(t) = trust {
            cursor.bundle_version = t.bundle_version;
            self.send(pb::sync_response::Msg::Trust(t)).await;
        }
        match renew {
            Some(reason) if !cursor.renew_asked => {
                cursor.renew_asked = true;
                tracing::info!(cluster = %self.cluster, reason, "asking for a new intermediate");
                self.send(pb::sync_response::Msg::Renew(pb::RenewIntermediate {
                    reason: reason.to_string(),
                }))
                .await;
            }
            None => cursor.renew_asked = false,
            Some(_) => {}
        }
        let mut update = update;
        // Within one stream the broker knows what it sent since the last
        // snapshot: drop removals of keys the cluster never had (e.g. an
        // exporter's own withdrawn service). A resumed stream does not know,
        // and sends them all; removing an absent import is a no-op there.
        match (&mut cursor.known, update.snapshot) {
            (known, true) => *known = Some(update.upserts.keys().cloned().collect()),
            (Some(known), false) => {
                update.removals.retain(|k| known.contains(k));
                for k in &update.removals {
                    known.remove(k);
                }
                known.extend(update.upserts.keys().cloned());
            }
            (None, false) => {}
        }
        if update.is_empty() {
            cursor.import_revision = update.revision;
            return Ok(());
        }
        let pushed = pb::ImportsUpdate {
            revision: update.revision,
            epoch: self.state.epoch.clone(),
            snapshot: update.snapshot,
            upserts: update
                .upserts
                .iter()
                .map(|(k, r)| wire::imported_pb(k, r))
                .collect(),
            removals: update.removals.iter().map(wire::service_ref).collect(),
        };
        cursor.import_revision = update.revision;
        cursor.same_epoch = true;
        self.metrics.imports_pushed();
        self.send(pb::sync_response::Msg::Imports(pushed)).await;
        Ok(())
    }
}

struct Cursor {
    /// A RenewIntermediate was sent and its CSR has not come back yet.
    renew_asked: bool,
    /// Keys the cluster imports, when known (a snapshot was sent on this stream).
    known: Option<std::collections::BTreeSet<strait_model::mesh::ServiceKey>>,
    import_revision: u64,
    same_epoch: bool,
    bundle_version: u64,
}

/// The `Admin` service.
pub struct AdminService {
    pub state: Arc<BrokerState>,
    pub metrics: Arc<Metrics>,
    /// Broker addresses written into join tokens.
    pub advertise: Vec<String>,
    /// Peer API addresses written into peer tokens (empty: no peer API).
    pub peer_advertise: Vec<String>,
}

impl AdminService {
    fn admin<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match authenticate(&self.state, req)? {
            Caller::Admin(name) => Ok(name),
            Caller::Cluster(c) => Err(Status::permission_denied(format!(
                "cluster {c} may not use the admin API; use admin credentials"
            ))),
        }
    }

    fn status(&self, r: &ClusterRecord, exports: u32) -> pb::ClusterStatus {
        pb::ClusterStatus {
            name: r.name.clone(),
            network: r.network.clone(),
            locality: r.locality.clone(),
            state: r.membership.as_str().to_string(),
            connected: self.metrics.is_connected(&r.name),
            gateways: r
                .info
                .as_ref()
                .map(|i| i.gateways.iter().map(|g| g.to_string()).collect())
                .unwrap_or_default(),
            export_revision: r.export_revision,
            exports,
            import_revision_acked: r.import_revision_acked,
            bundle_version_acked: r.bundle_version_acked,
            intermediate_expires_unix: u64::try_from(r.intermediate_expires_unix).unwrap_or(0),
            intermediate_sha256: r.intermediate_sha256.clone(),
            withdrawn: r.withdrawn,
        }
    }

    async fn statuses(&self) -> Vec<pb::ClusterStatus> {
        let inner = self.state.lock().await;
        inner
            .records
            .values()
            .map(|r| {
                let exports = ClusterName::new(&r.name)
                    .ok()
                    .and_then(|n| inner.mesh.cluster(&n).map(|c| c.exports.len()))
                    .unwrap_or(0);
                self.status(r, u32::try_from(exports).unwrap_or(u32::MAX))
            })
            .collect()
    }
}

fn rotation_status(report: &crate::state::RotationReport) -> pb::RotationStatus {
    let r = &report.rotation;
    let target = r.target.clone().unwrap_or_else(|| r.signing.clone());
    pb::RotationStatus {
        stage: r.stage.as_str().to_string(),
        aborting: r.aborting,
        bundle_version: report.bundle_version,
        signing_root: r.signing.clone(),
        target_root: r.target.clone().unwrap_or_default(),
        retiring_root: r.retiring.clone().unwrap_or_default(),
        roots: report
            .roots
            .iter()
            .map(|(fp, subject, expires)| pb::RootInfo {
                sha256: fp.clone(),
                subject: subject.clone(),
                expires_unix: u64::try_from(*expires).unwrap_or(0),
            })
            .collect(),
        clusters: report
            .clusters
            .iter()
            .map(|c| pb::ClusterRotation {
                name: c.name.clone(),
                bundle_version_acked: c.bundle_version_acked,
                bundle_acknowledged: c.bundle_version_acked >= report.bundle_version,
                intermediate_root: c.intermediate_root.clone(),
                on_target: c.intermediate_root == target,
            })
            .collect(),
        reissue_started_unix: u64::try_from(r.reissue_started_unix).unwrap_or(0),
        next_step: r.next_step().to_string(),
    }
}

fn peer_info(state: &BrokerState, p: &crate::peer::PeerRecord) -> pb::PeerInfo {
    pb::PeerInfo {
        mesh: p.mesh.clone(),
        trust_domain: p.trust_domain.clone(),
        addresses: p.addresses.clone(),
        connected: state.peers.is_connected(&p.mesh),
        services_imported: u32::try_from(p.services.len()).unwrap_or(u32::MAX),
        roots: strait_ca::TrustBundle::from_spiffe_json(p.bundle.as_bytes(), None)
            .map_or(0, |b| u32::try_from(b.roots().len()).unwrap_or(0)),
        direction: p.direction.clone(),
    }
}

fn cluster_arg(name: &str) -> Result<ClusterName, Status> {
    ClusterName::new(name).map_err(|e| Status::invalid_argument(format!("cluster: {e}")))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn add_cluster(
        &self,
        req: Request<pb::AddClusterRequest>,
    ) -> Result<Response<pb::AddClusterResponse>, Status> {
        let admin = self.admin(&req)?;
        let r = req.into_inner();
        let name = cluster_arg(&r.name)?;
        let network = Network::new(&r.network)
            .map_err(|e| Status::invalid_argument(format!("network: {e}")))?;
        let locality = if r.locality.is_empty() {
            None
        } else {
            Some(
                Locality::parse(&r.locality)
                    .map_err(|e| Status::invalid_argument(format!("locality: {e}")))?,
            )
        };
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_TTL,
            s => Duration::from_secs(s),
        };
        let token = self
            .state
            .add_cluster(
                &name,
                &network,
                locality.as_ref(),
                ttl,
                self.advertise.clone(),
                OffsetDateTime::now_utc(),
            )
            .await?;
        tracing::info!(%admin, cluster = %name, "join token issued");
        Ok(Response::new(pb::AddClusterResponse {
            token: token.encode(),
            expires_unix: token.expires_unix,
        }))
    }

    async fn list_clusters(
        &self,
        req: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        self.admin(&req)?;
        Ok(Response::new(pb::ListClustersResponse {
            clusters: self.statuses().await,
        }))
    }

    async fn get_cluster(
        &self,
        req: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.admin(&req)?;
        let name = req.into_inner().name;
        self.statuses()
            .await
            .into_iter()
            .find(|s| s.name == name)
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!("cluster {name:?} is not known to this broker"))
            })
    }

    async fn revoke_cluster(
        &self,
        req: Request<pb::RevokeClusterRequest>,
    ) -> Result<Response<pb::RevokeClusterResponse>, Status> {
        let admin = self.admin(&req)?;
        let name = cluster_arg(&req.into_inner().name)?;
        self.state.revoke(&name).await?;
        tracing::warn!(%admin, cluster = %name, "cluster revoked");
        Ok(Response::new(pb::RevokeClusterResponse {}))
    }

    async fn list_exports(
        &self,
        req: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        self.admin(&req)?;
        let filter = req.into_inner().cluster;
        let inner = self.state.lock().await;
        let exports = inner
            .mesh
            .clusters()
            .filter(|(n, _)| filter.is_empty() || n.as_str() == filter)
            .flat_map(|(n, c)| {
                c.exports.values().map(move |s| pb::ExportEntry {
                    cluster: n.to_string(),
                    service: Some(wire::exported_service_pb(s)),
                })
            })
            .collect();
        Ok(Response::new(pb::ListExportsResponse { exports }))
    }

    async fn show_imports(
        &self,
        req: Request<pb::ShowImportsRequest>,
    ) -> Result<Response<pb::ShowImportsResponse>, Status> {
        self.admin(&req)?;
        let name = cluster_arg(&req.into_inner().cluster)?;
        let inner = self.state.lock().await;
        let Some(importer) = inner.mesh.cluster(&name) else {
            return Err(Status::not_found(format!("cluster {name} has not joined")));
        };
        let imports = inner.mesh.imports_for(&name);
        let remotes: Vec<RemoteService> = imports.values().flatten().cloned().collect();
        let objects = strait_model::imports::import_objects(&importer.info, &remotes, &[]);
        let yaml = objects
            .to_yaml()
            .map_err(|e| Status::internal(format!("rendering imports: {e}")))?;
        Ok(Response::new(pb::ShowImportsResponse {
            revision: inner.mesh.revision(),
            imports: imports
                .iter()
                .map(|(k, r)| wire::imported_pb(k, r))
                .collect(),
            yaml,
        }))
    }

    async fn rotate_intermediate(
        &self,
        req: Request<pb::RotateIntermediateRequest>,
    ) -> Result<Response<pb::RotateIntermediateResponse>, Status> {
        let admin = self.admin(&req)?;
        let name = cluster_arg(&req.into_inner().cluster)?;
        self.state.request_renewal(&name).await?;
        tracing::info!(%admin, cluster = %name, "intermediate rotation requested");
        Ok(Response::new(pb::RotateIntermediateResponse {
            requested_now: self.metrics.is_connected(name.as_str()),
        }))
    }

    async fn rotate_root(
        &self,
        req: Request<pb::RotateRootRequest>,
    ) -> Result<Response<pb::RotationStatus>, Status> {
        let admin = self.admin(&req)?;
        let r = req.into_inner();
        let step = crate::state::RotateStep::parse(&r.step)?;
        let report = self
            .state
            .rotate_root(step, r.force, OffsetDateTime::now_utc())
            .await?;
        if step != crate::state::RotateStep::Status {
            tracing::warn!(%admin, step = %r.step, stage = report.rotation.stage.as_str(), "root rotation step");
        }
        Ok(Response::new(rotation_status(&report)))
    }

    async fn peer_token(
        &self,
        req: Request<pb::PeerTokenRequest>,
    ) -> Result<Response<pb::PeerTokenResponse>, Status> {
        let admin = self.admin(&req)?;
        let ttl = match req.get_ref().ttl_seconds {
            0 => DEFAULT_TTL,
            s => Duration::from_secs(s),
        };
        let token = self
            .state
            .peer_token(self.peer_advertise.clone(), ttl, OffsetDateTime::now_utc())
            .await?;
        tracing::info!(%admin, "peer token issued");
        Ok(Response::new(pb::PeerTokenResponse {
            token: token.encode(),
            expires_unix: token.e,
        }))
    }

    async fn peer_establish(
        &self,
        req: Request<pb::PeerEstablishRequest>,
    ) -> Result<Response<pb::PeerInfo>, Status> {
        let admin = self.admin(&req)?;
        let record = self
            .state
            .establish_peer(&req.get_ref().token, self.peer_advertise.clone())
            .await?;
        tracing::info!(%admin, mesh = %record.mesh, trust_domain = %record.trust_domain, "mesh peered (outbound)");
        crate::peer::spawn_puller(self.state.clone(), record.mesh.clone());
        Ok(Response::new(peer_info(&self.state, &record)))
    }

    async fn list_peers(
        &self,
        req: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        self.admin(&req)?;
        Ok(Response::new(pb::ListPeersResponse {
            peers: self
                .state
                .peers
                .list()
                .iter()
                .map(|p| peer_info(&self.state, p))
                .collect(),
        }))
    }

    async fn trust_status(
        &self,
        req: Request<pb::TrustStatusRequest>,
    ) -> Result<Response<pb::TrustStatusResponse>, Status> {
        self.admin(&req)?;
        let roots = self
            .state
            .trust
            .bundle()
            .roots()
            .iter()
            .filter_map(|d| CertSummary::from_der(d).ok())
            .map(|s| pb::RootInfo {
                sha256: s.sha256_fingerprint,
                subject: s.subject,
                expires_unix: time::OffsetDateTime::parse(
                    &s.not_after,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_or(0, |t| u64::try_from(t.unix_timestamp()).unwrap_or(0)),
            })
            .collect();
        let report = self
            .state
            .rotate_root(
                crate::state::RotateStep::Status,
                false,
                OffsetDateTime::now_utc(),
            )
            .await?;
        Ok(Response::new(pb::TrustStatusResponse {
            trust_domain: self.state.trust_domain.to_string(),
            bundle_version: report.bundle_version,
            roots,
            clusters: self.statuses().await,
            rotation: Some(rotation_status(&report)),
        }))
    }
}
