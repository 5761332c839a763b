//! One ADS stream's bookkeeping, state of the world and delta: what each
//! subscribed type was last sent, what a request says about it (ACK, NACK,
//! a new subscription), and the response the next snapshot calls for.

use super::*;

/// What a request said about the previous response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    /// No nonce: a new subscription or a reconnect.
    Initial,
    Ack,
    Nack(String),
    /// A nonce other than the last one: superseded, ignored.
    Stale,
}

pub(super) fn reply_of(nonce: &str, expected: Option<&str>, error: Option<&str>) -> Reply {
    if nonce.is_empty() {
        Reply::Initial
    } else if Some(nonce) != expected {
        Reply::Stale
    } else {
        match error {
            Some(e) => Reply::Nack(e.to_string()),
            None => Reply::Ack,
        }
    }
}

pub(super) fn envoy_any(v: &Versioned) -> Any {
    Any {
        type_url: v.resource.type_url.clone(),
        value: v.resource.value.clone(),
    }
}

/// The resources of `type_url` a subscription sees.
pub(super) fn view<'a>(
    snap: &'a Snapshot,
    type_url: &str,
    wildcard: bool,
    names: &BTreeSet<String>,
) -> BTreeMap<&'a str, &'a Versioned> {
    snap.resources(type_url)
        .map(|all| {
            all.iter()
                .filter(|(n, _)| wildcard || names.contains(*n))
                .map(|(n, v)| (n.as_str(), v))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, Default)]
pub(super) struct SotwType {
    /// Empty: wildcard.
    pub(super) names: BTreeSet<String>,
    /// Nonce and (name → version) of the last response.
    pub(super) sent: Option<(String, BTreeMap<String, String>)>,
}

/// One state-of-the-world stream's protocol state. No I/O.
#[derive(Debug, Default)]
pub(super) struct SotwStream {
    pub(super) types: BTreeMap<String, SotwType>,
    pub(super) nonce: u64,
}

impl SotwStream {
    pub(super) fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        snap: &Snapshot,
    ) -> (Reply, Option<DiscoveryResponse>) {
        let t = self.types.entry(req.type_url.clone()).or_default();
        let reply = reply_of(
            &req.response_nonce,
            t.sent.as_ref().map(|(n, _)| n.as_str()),
            req.error_detail.as_ref().map(|e| e.message.as_str()),
        );
        if reply == Reply::Stale {
            return (reply, None);
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let changed = names != t.names;
        t.names = names;
        let respond = reply == Reply::Initial || changed;
        let resp = respond.then(|| self.respond(&req.type_url, snap));
        (reply, resp)
    }

    pub(super) fn respond(&mut self, type_url: &str, snap: &Snapshot) -> DiscoveryResponse {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let t = self.types.entry(type_url.to_string()).or_default();
        let v = view(snap, type_url, t.names.is_empty(), &t.names);
        let versions: BTreeMap<String, String> = v
            .iter()
            .map(|(n, r)| ((*n).to_string(), r.version.clone()))
            .collect();
        let version_info =
            Snapshot::set_version(versions.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let resources = v.values().map(|r| envoy_any(r)).collect();
        t.sent = Some((nonce.clone(), versions));
        DiscoveryResponse {
            version_info,
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        }
    }

    /// Responses for every subscribed type whose view changed.
    pub(super) fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<DiscoveryResponse> {
        let stale: Vec<String> = self
            .types
            .iter()
            .filter(|(type_url, t)| {
                let Some((_, sent)) = &t.sent else {
                    return false;
                };
                let now = view(snap, type_url, t.names.is_empty(), &t.names);
                now.len() != sent.len()
                    || now
                        .iter()
                        .any(|(n, r)| sent.get(*n).is_none_or(|v| *v != r.version))
            })
            .map(|(t, _)| t.clone())
            .collect();
        stale.iter().map(|t| self.respond(t, snap)).collect()
    }
}

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

/// One delta stream's protocol state. No I/O.
#[derive(Debug, Default)]
pub(super) struct DeltaStream {
    pub(super) types: BTreeMap<String, DeltaType>,
    pub(super) nonce: u64,
}

impl DeltaStream {
    pub(super) fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> (Reply, Option<DeltaDiscoveryResponse>) {
        let t = self.types.entry(req.type_url.clone()).or_default();
        let reply = if req.response_nonce.is_empty() {
            Reply::Initial
        } else {
            match req.response_nonce.parse::<u64>() {
                Ok(n) if t.undo.contains_key(&n) => {
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
                _ => Reply::Stale,
            }
        };
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
        if !first && !resubscribed {
            return (reply, None);
        }
        let resp = self.diff(&req.type_url, snap, first);
        (reply, resp)
    }

    /// The response bringing the client of `type_url` to `snap`, if it
    /// differs (or `always`).
    pub(super) fn diff(
        &mut self,
        type_url: &str,
        snap: &Snapshot,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let t = self.types.get_mut(type_url)?;
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
        self.nonce += 1;
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
        t.undo.insert(self.nonce, undo);
        Some(DeltaDiscoveryResponse {
            system_version_info: Snapshot::set_version(
                v.iter().map(|(n, r)| (*n, r.version.as_str())),
            ),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: self.nonce.to_string(),
            ..Default::default()
        })
    }

    pub(super) fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<DeltaDiscoveryResponse> {
        let started: Vec<String> = self
            .types
            .iter()
            .filter(|(_, t)| t.started)
            .map(|(k, _)| k.clone())
            .collect();
        started
            .iter()
            .filter_map(|t| self.diff(t, snap, false))
            .collect()
    }
}
