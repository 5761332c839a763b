//! One cluster's Sync stream, on the broker side: waits for `Hello`,
//! answers `Welcome`, then applies what the cluster sends (exports,
//! acknowledgements, info, renewal CSRs) and pushes what it lacks (trust,
//! renewal requests, imports) whenever the mesh revision moves, and every
//! [`RENEWAL_CHECK`] for renewals that fall due by the clock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_ca::ClusterName;
use strait_model::mesh::ServiceKey;
use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::metrics::Metrics;
use crate::reconcile::{ExportsChange, SyncError};
use crate::state::{BrokerState, StateError, TrustView};
use crate::wire;

/// How often a sync session checks whether the cluster's intermediate is
/// due for renewal.
pub const RENEWAL_CHECK: Duration = Duration::from_secs(30);

/// How long a new Sync stream may take to say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// One Sync stream of an authenticated member cluster.
pub(super) struct Session {
    state: Arc<BrokerState>,
    metrics: Arc<Metrics>,
    cluster: ClusterName,
    tx: mpsc::Sender<Result<pb::SyncResponse, Status>>,
    drain: strait_runtime::drain::Watch,
}

fn msg(m: pb::sync_response::Msg) -> Result<pb::SyncResponse, Status> {
    Ok(pb::SyncResponse { msg: Some(m) })
}

fn pem(der: &[u8]) -> String {
    strait_ca::pemfile::encode(strait_ca::pemfile::CERTIFICATE, der)
}

/// The trust update a cluster gets.
fn trust_pb(t: TrustView) -> pb::TrustUpdate {
    pb::TrustUpdate {
        bundle_version: t.bundle_version,
        trust_bundle: t.roots.iter().map(|d| pem(d)).collect(),
        denied_intermediates: t.denied.into_iter().collect(),
        federated_bundles: t.federated_bundles.into_iter().collect(),
        bind_identities: t.bind_identities,
        cluster_identities: t
            .cluster_identities
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
    }
}

impl Session {
    pub(super) fn new(
        state: Arc<BrokerState>,
        metrics: Arc<Metrics>,
        cluster: ClusterName,
        tx: mpsc::Sender<Result<pb::SyncResponse, Status>>,
        drain: strait_runtime::drain::Watch,
    ) -> Self {
        Session {
            state,
            metrics,
            cluster,
            tx,
            drain,
        }
    }

    async fn send(&self, m: pb::sync_response::Msg) -> bool {
        self.tx.send(msg(m)).await.is_ok()
    }

    async fn fail(&self, status: Status) {
        tracing::warn!(cluster = %self.cluster, error = %status.message(), "sync stream ended");
        let _ = self.tx.send(Err(status)).await;
    }

    pub(super) async fn run(self, mut inbound: Streaming<pb::SyncRequest>) {
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
        let have = self.state.export_revision(&self.cluster).await;
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
        let mut detached = self.state.detached();
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
                Some(why) = async { detached.wait_for(Option::is_some).await.ok().and_then(|w| w.clone()) } => {
                    let _ = self.tx.send(Err(Status::unavailable(format!(
                        "this broker replica cannot write ({why}); connect to another"
                    )))).await;
                    break;
                }
                () = self.drain.draining() => {
                    let _ = self.tx.send(Err(Status::unavailable("the broker is shutting down"))).await;
                    break;
                }
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
                        intermediate_chain: chain.iter().map(|d| pem(d)).collect(),
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
                self.metrics.set_exports(self.state.export_count().await);
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
        let Some(view) = self
            .state
            .push_view(
                &self.cluster,
                cursor.import_revision,
                cursor.same_epoch,
                cursor.bundle_version,
                OffsetDateTime::now_utc(),
            )
            .await
        else {
            return Err(Status::permission_denied(format!(
                "cluster {} is revoked",
                self.cluster
            )));
        };
        if let Some(t) = view.trust.map(trust_pb) {
            cursor.bundle_version = t.bundle_version;
            self.send(pb::sync_response::Msg::Trust(t)).await;
        }
        match view.renew {
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
        let mut update = view.imports;
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
    known: Option<BTreeSet<ServiceKey>>,
    import_revision: u64,
    same_epoch: bool,
    bundle_version: u64,
}
