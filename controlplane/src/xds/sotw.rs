//! State-of-the-world ADS: each response carries every resource of the
//! subscription (an empty `resource_names` is a wildcard), versioned as a
//! set. A request answering the last nonce is an ACK (a NACK with
//! `error_detail`) and is answered only when it changes the subscription;
//! a request with no nonce is always answered, one with an older nonce is
//! stale and ignored. A new snapshot is pushed only when the subscription's
//! view (names and versions) changed.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::stream::{Answer, Ask, Reply, Variant, envoy_any, reply_of, view};
use crate::resources::Snapshot;

/// The state-of-the-world variant.
#[derive(Debug)]
pub(super) enum Sotw {}

/// One state-of-the-world stream's protocol state (the tests' name).
#[cfg(test)]
pub(super) type SotwStream = super::stream::Protocol<Sotw>;

/// The record of one subscribed type.
#[derive(Debug, Default)]
pub(super) struct SotwType {
    /// Empty: wildcard.
    pub(super) names: BTreeSet<String>,
    /// Nonce and (name → version) of the last response.
    pub(super) sent: Option<(String, BTreeMap<String, String>)>,
}

impl Variant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type Type = SotwType;
    const NAME: &'static str = "state of the world";

    fn ask(req: &DiscoveryRequest) -> Ask<'_> {
        Ask {
            type_url: &req.type_url,
            nonce: &req.response_nonce,
            version: &req.version_info,
            node: req.node.as_ref(),
        }
    }

    fn response_type(resp: &DiscoveryResponse) -> &str {
        &resp.type_url
    }

    fn reply(t: &mut SotwType, req: &DiscoveryRequest) -> Reply {
        reply_of(
            &req.response_nonce,
            t.sent.as_ref().map(|(n, _)| n.as_str()),
            req.error_detail.as_ref().map(|e| e.message.as_str()),
        )
    }

    fn subscribe(t: &mut SotwType, req: &DiscoveryRequest, reply: &Reply) -> Answer {
        if *reply == Reply::Stale {
            return Answer::No;
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let changed = names != t.names;
        t.names = names;
        if *reply == Reply::Initial || changed {
            Answer::Always
        } else {
            Answer::No
        }
    }

    fn respond(
        t: &mut SotwType,
        type_url: &str,
        snap: &Snapshot,
        nonce: u64,
        always: bool,
    ) -> Option<DiscoveryResponse> {
        let v = view(snap, type_url, t.names.is_empty(), &t.names);
        if !always {
            let (_, sent) = t.sent.as_ref()?;
            let changed = v.len() != sent.len()
                || v.iter()
                    .any(|(n, r)| sent.get(*n).is_none_or(|s| *s != r.version));
            if !changed {
                return None;
            }
        }
        let nonce = nonce.to_string();
        let versions: BTreeMap<String, String> = v
            .iter()
            .map(|(n, r)| ((*n).to_string(), r.version.clone()))
            .collect();
        let version_info =
            Snapshot::set_version(versions.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let resources = v.values().map(|r| envoy_any(r)).collect();
        t.sent = Some((nonce.clone(), versions));
        Some(DiscoveryResponse {
            version_info,
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        })
    }
}
