//! Delta ADS: responses carry only what changed (and the names removed).
//! The first request of a type with no names (or `*`) subscribes to
//! everything; `*` in `resource_names_unsubscribe` ends that.
//! `initial_resource_versions` says what a resuming client holds. The
//! first request of each type is always answered, even with nothing; an
//! ACK or NACK alone is not. A NACK undoes the record of that response, so
//! that its resources go again with the next change.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::stream::{Answer, Ask, Reply, Variant, envoy_any, view};
use crate::resources::{Snapshot, Versioned};

/// The delta variant.
#[derive(Debug)]
pub(super) enum Delta {}

/// One delta stream's protocol state (the tests' name).
#[cfg(test)]
pub(super) type DeltaStream = super::stream::Protocol<Delta>;

/// The record of one subscribed type.
#[derive(Debug, Default)]
pub(super) struct DeltaType {
    pub(super) started: bool,
    pub(super) wildcard: bool,
    pub(super) names: BTreeSet<String>,
    /// What the client holds, as far as the server knows: name → version.
    pub(super) known: BTreeMap<String, String>,
    /// Per response nonce: the previous `known` entries it changed.
    pub(super) undo: BTreeMap<u64, Vec<(String, Option<String>)>>,
}

impl Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type Type = DeltaType;
    const NAME: &'static str = "delta";

    fn ask(req: &DeltaDiscoveryRequest) -> Ask<'_> {
        Ask {
            type_url: &req.type_url,
            nonce: &req.response_nonce,
            version: "",
            node: req.node.as_ref(),
        }
    }

    fn response_type(resp: &DeltaDiscoveryResponse) -> &str {
        &resp.type_url
    }

    fn reply(t: &mut DeltaType, req: &DeltaDiscoveryRequest) -> Reply {
        if req.response_nonce.is_empty() {
            return Reply::Initial;
        }
        let n = match req.response_nonce.parse::<u64>() {
            Ok(n) if t.undo.contains_key(&n) => n,
            _ => return Reply::Stale,
        };
        let undo = t.undo.remove(&n).unwrap_or_default();
        // Older responses are settled by this answer.
        t.undo.retain(|k, _| *k > n);
        match &req.error_detail {
            Some(e) => {
                for (name, prev) in undo.into_iter().rev() {
                    match prev {
                        Some(v) => t.known.insert(name, v),
                        None => t.known.remove(&name),
                    };
                }
                Reply::Nack(e.message.clone())
            }
            None => Reply::Ack,
        }
    }

    fn subscribe(t: &mut DeltaType, req: &DeltaDiscoveryRequest, _reply: &Reply) -> Answer {
        let first = !t.started;
        if first {
            t.started = true;
            t.wildcard = req.resource_names_subscribe.is_empty();
            for (name, version) in &req.initial_resource_versions {
                t.known.insert(name.clone(), version.clone());
            }
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                t.wildcard = true;
            } else {
                t.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                t.wildcard = false;
            } else {
                t.names.remove(name);
            }
        }
        if !t.wildcard {
            let names = &t.names;
            t.known.retain(|n, _| names.contains(n));
        }
        // An ACK or NACK alone is not answered (after a NACK, the refused
        // resources go again with the next change, not at once).
        let resubscribed =
            !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        if first {
            Answer::Always
        } else if resubscribed {
            Answer::IfChanged
        } else {
            Answer::No
        }
    }

    fn respond(
        t: &mut DeltaType,
        type_url: &str,
        snap: &Snapshot,
        nonce: u64,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        if !t.started {
            return None;
        }
        let v = view(snap, type_url, t.wildcard, &t.names);
        let updated: Vec<(&str, &Versioned)> = v
            .iter()
            .filter(|(n, r)| t.known.get(**n) != Some(&r.version))
            .map(|(n, r)| (*n, *r))
            .collect();
        let removed: Vec<String> = t
            .known
            .keys()
            .filter(|n| !v.contains_key(n.as_str()))
            .cloned()
            .collect();
        if updated.is_empty() && removed.is_empty() && !always {
            return None;
        }
        let mut undo = Vec::new();
        let mut resources = Vec::new();
        for (name, r) in updated {
            undo.push((
                name.to_string(),
                t.known.insert(name.to_string(), r.version.clone()),
            ));
            resources.push(Resource {
                name: name.to_string(),
                version: r.version.clone(),
                resource: Some(envoy_any(r)),
                ..Default::default()
            });
        }
        for name in &removed {
            undo.push((name.clone(), t.known.remove(name)));
        }
        t.undo.insert(nonce, undo);
        Some(DeltaDiscoveryResponse {
            system_version_info: Snapshot::set_version(
                v.iter().map(|(n, r)| (*n, r.version.as_str())),
            ),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: nonce.to_string(),
            ..Default::default()
        })
    }
}
