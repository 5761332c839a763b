//! The cluster's side of the Sync protocol as a state machine, free of I/O
//! (no sockets, files or clock): the I/O loop in [`super::Agent`] feeds it
//! the broker's messages and the local export changes, and it says what to
//! send and updates the imports to publish.
//!
//! What it keeps:
//! - the export revision of the last update sent, and the revision (with
//!   its exports) the broker acknowledged in this process's life: a stream
//!   opened to a broker that holds exactly that revision is in sync at
//!   once; any other broker revision gets a snapshot of the current exports;
//! - per stream, the exports last sent (deltas are diffs against them) and
//!   the updates in flight (sent, not yet acknowledged);
//! - the imports, assembled from the broker's snapshots and deltas, the
//!   trust state it pushed, and whether the latest exports are acknowledged.
//!
//! Every `ImportsUpdate` and `TrustUpdate` is acknowledged (`Ack`) with the
//! import revision and bundle version then held.

use std::collections::BTreeMap;

use pb::sync_request::Msg;
use strait_model::mesh::{RemoteService, ServiceKey};
use strait_proto::strait::broker::v1 as pb;

use super::{Exports, Imports};
use crate::wire::{self, WireError};

/// What one step asks of the I/O loop.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Step {
    /// Messages to send to the broker, in order.
    pub send: Vec<Msg>,
    /// The stream reached a successful exchange with the broker (see
    /// [`super::Backoff::synced`]).
    pub synced: bool,
    /// The step changed the imports: publish them.
    pub publish: bool,
}

impl Step {
    /// A step that only sends `msg`.
    pub(crate) fn send(msg: Msg) -> Self {
        Step {
            send: vec![msg],
            ..Step::default()
        }
    }
}

/// An imports update from the broker, converted to the mesh model.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportsDelta {
    pub revision: u64,
    pub epoch: String,
    /// True: `upserts` replaces everything imported before.
    pub snapshot: bool,
    pub upserts: BTreeMap<ServiceKey, Vec<RemoteService>>,
    pub removals: Vec<ServiceKey>,
}

impl ImportsDelta {
    pub fn decode(u: &pb::ImportsUpdate) -> Result<Self, WireError> {
        Ok(ImportsDelta {
            revision: u.revision,
            epoch: u.epoch.clone(),
            snapshot: u.snapshot,
            upserts: wire::imports(&u.upserts)?,
            removals: u
                .removals
                .iter()
                .map(wire::service_key)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// The Sync protocol state of a cluster, across the streams of one process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SyncState {
    /// The export revision of the last update sent.
    revision: u64,
    /// The export revision the broker acknowledged in this process's life,
    /// and the exports it stands for.
    acked: Option<(u64, Exports)>,
    /// This stream: the exports last sent (what the broker holds once the
    /// updates in flight are applied).
    sent: Exports,
    /// This stream: updates sent and not acknowledged yet, by revision.
    in_flight: BTreeMap<u64, Exports>,
}

fn snapshot(revision: u64, exports: &Exports) -> Msg {
    Msg::Exports(pb::ExportsUpdate {
        revision,
        base_revision: 0,
        snapshot: true,
        upserts: exports.values().map(wire::exported_service_pb).collect(),
        removals: vec![],
    })
}

fn ack(import_revision: u64, bundle_version: u64, intermediate_sha256: String) -> Msg {
    Msg::Ack(pb::Ack {
        import_revision,
        bundle_version,
        intermediate_sha256,
    })
}

impl SyncState {
    /// The export revision of the last update sent (0: none yet).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The `Hello` that opens a stream, for a cluster holding `imports`.
    pub fn hello(&self, imports: &Imports, info: pb::ClusterInfo) -> pb::Hello {
        pb::Hello {
            export_revision: self.revision,
            import_revision: imports.revision,
            import_epoch: imports.epoch.clone(),
            bundle_version: imports.bundle_version,
            info: Some(info),
        }
    }

    /// The broker's `Welcome` opened a stream: it holds export revision
    /// `broker_revision`. In sync when this process saw the broker
    /// acknowledge exactly that revision (then `current` is not asked for):
    /// updates sent on an earlier stream and lost with it (never
    /// acknowledged) are sent again, as one delta against what the broker
    /// holds. Otherwise a snapshot of `current()` under a new revision.
    pub fn welcome(&mut self, broker_revision: u64, current: impl FnOnce() -> Exports) -> Step {
        let mut step = Step::default();
        match &self.acked {
            Some((rev, map)) if *rev == broker_revision => {
                step.synced = true;
                let last_sent = std::mem::replace(&mut self.sent, map.clone());
                // The broker stored nothing above its revision: the lost
                // updates' revisions are free again.
                self.revision = broker_revision;
                self.in_flight = BTreeMap::from([(self.revision, self.sent.clone())]);
                step.send.extend(self.delta(&last_sent));
            }
            _ => {
                let now = current();
                self.revision = self.revision.max(broker_revision) + 1;
                step.send.push(snapshot(self.revision, &now));
                self.sent = now;
                self.in_flight = BTreeMap::from([(self.revision, self.sent.clone())]);
            }
        }
        step
    }

    /// The cluster's exports are now `now`: a delta of what changed since
    /// the last update sent, if anything did.
    pub fn exports_changed(&mut self, now: &Exports, imports: &mut Imports) -> Step {
        let Some(delta) = self.delta(now) else {
            return Step::default();
        };
        imports.exports_acked = false;
        Step {
            send: vec![delta],
            synced: false,
            publish: true,
        }
    }

    /// The update from the exports last sent to `now` under the next
    /// revision (recorded as sent and in flight), or `None` when equal.
    fn delta(&mut self, now: &Exports) -> Option<Msg> {
        let upserts: Vec<_> = now
            .iter()
            .filter(|(k, v)| self.sent.get(*k) != Some(*v))
            .map(|(_, v)| wire::exported_service_pb(v))
            .collect();
        let removals: Vec<_> = self
            .sent
            .keys()
            .filter(|k| !now.contains_key(*k))
            .map(wire::service_ref)
            .collect();
        if upserts.is_empty() && removals.is_empty() {
            return None;
        }
        let base = self.revision;
        self.revision += 1;
        self.in_flight.insert(self.revision, now.clone());
        self.sent = now.clone();
        Some(Msg::Exports(pb::ExportsUpdate {
            revision: self.revision,
            base_revision: base,
            snapshot: false,
            upserts,
            removals,
        }))
    }

    /// The broker stored the exports update `a.revision` (and every one
    /// before it).
    pub fn exports_ack(&mut self, a: &pb::ExportsAck, imports: &mut Imports) -> Step {
        if let Some(map) = self.in_flight.remove(&a.revision) {
            self.acked = Some((a.revision, map));
        }
        self.in_flight.retain(|r, _| *r > a.revision);
        imports.exports_acked = a.revision == self.revision;
        Step {
            send: vec![],
            synced: true,
            publish: true,
        }
    }

    /// The broker cannot apply a delta: a snapshot of the exports last
    /// sent, under a revision above both sides'.
    pub fn resync(&mut self, r: &pb::ResyncExports) -> Step {
        tracing::info!(have = r.have_revision, reason = %r.reason, "broker asked for an exports snapshot");
        self.revision = self.revision.max(r.have_revision) + 1;
        self.in_flight.clear();
        self.in_flight.insert(self.revision, self.sent.clone());
        Step::send(snapshot(self.revision, &self.sent))
    }

    /// The broker's imports update `u`, applied to `imports` and
    /// acknowledged; `intermediate`: the fingerprint of the installed
    /// intermediate, for the `Ack`.
    pub fn imports(
        &mut self,
        u: ImportsDelta,
        intermediate: String,
        imports: &mut Imports,
    ) -> Step {
        if u.snapshot {
            imports.services.clear();
        }
        for k in &u.removals {
            imports.services.remove(k);
        }
        imports.services.extend(u.upserts);
        imports.revision = u.revision;
        imports.epoch = u.epoch;
        tracing::info!(
            revision = u.revision,
            snapshot = u.snapshot,
            "imports applied"
        );
        Step {
            send: vec![ack(u.revision, imports.bundle_version, intermediate)],
            synced: true,
            publish: true,
        }
    }

    /// The broker's trust update `t`, once its bundles are installed:
    /// published and acknowledged.
    pub fn trust(
        &mut self,
        t: &pb::TrustUpdate,
        intermediate: String,
        imports: &mut Imports,
    ) -> Step {
        imports.bundle_version = t.bundle_version;
        imports.denied_intermediates = t.denied_intermediates.iter().cloned().collect();
        imports.cluster_identities = t.bind_identities.then(|| {
            t.cluster_identities
                .iter()
                .map(|(c, s)| (c.clone(), s.names.iter().cloned().collect()))
                .collect()
        });
        Step {
            send: vec![ack(imports.revision, t.bundle_version, intermediate)],
            synced: false,
            publish: true,
        }
    }

    /// A renewed intermediate was installed: acknowledged with its
    /// fingerprint `intermediate`.
    pub fn intermediate_installed(&self, imports: &Imports, intermediate: String) -> Step {
        Step::send(ack(imports.revision, imports.bundle_version, intermediate))
    }
}

#[cfg(test)]
mod tests;
