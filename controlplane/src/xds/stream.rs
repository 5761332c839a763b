//! One ADS stream, generic over the wire format ([`Variant`]: state of
//! the world in `sotw`, delta in `delta`).
//!
//! - [`Protocol`]: the per-type bookkeeping of a stream (each subscribed
//!   type's record, the nonce counter): classifies each request (ACK,
//!   NACK, stale, new subscription) and says what a request or a new
//!   snapshot calls for. No I/O.
//! - [`Session`]: a stream's protocol and its node: authorizes the node id
//!   each request gives against the peer's SPIFFE ID ([`super::check_node`]),
//!   names the cluster to serve on the first request and scopes every
//!   snapshot for the node ([`super::scope`]). Fed requests and snapshots, it
//!   returns the responses to send. No I/O.
//! - [`serve`]: runs a session over a gRPC stream and the snapshot
//!   `watch`, logging and recording each reply ([`XdsServer::record`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use strait_ca::SpiffeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{XdsServer, node_cluster, node_of, scoped_view};
use crate::resources::{Snapshot, Versioned};

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

/// Classifies a request by the nonce it answers: `expected` is the nonce
/// of the last response, `error` the request's `error_detail.message`.
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

/// Whether a request is answered, after its subscription changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Not at all (an ACK or NACK alone, a stale nonce).
    No,
    /// When the client's view differs from what it holds.
    IfChanged,
    /// Always, even with nothing new (a new subscription).
    Always,
}

/// What the stream reads of every request, whatever the variant.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask<'a> {
    pub(super) type_url: &'a str,
    pub(super) nonce: &'a str,
    /// The version the client runs (state of the world), else empty.
    pub(super) version: &'a str,
    pub(super) node: Option<&'a Node>,
}

/// One wire format of ADS: its messages and its per-type bookkeeping.
pub(super) trait Variant: Send + Sync + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// The record of one subscribed type.
    type Type: Default + Send;
    /// For logs: `state of the world`, `delta`.
    const NAME: &'static str;

    /// Reads a request.
    fn ask(req: &Self::Request) -> Ask<'_>;
    /// The type URL of a response.
    fn response_type(resp: &Self::Response) -> &str;
    /// Classifies a request against its type's record (a NACK may undo
    /// what the record says the client holds).
    fn reply(t: &mut Self::Type, req: &Self::Request) -> Reply;
    /// Applies the request's subscription changes; says whether to answer.
    fn subscribe(t: &mut Self::Type, req: &Self::Request, reply: &Reply) -> Answer;
    /// The response, with nonce `nonce`, bringing the client of `type_url`
    /// to `snap` when its view changed since the last response (or
    /// `always`), recording it as sent.
    fn respond(
        t: &mut Self::Type,
        type_url: &str,
        snap: &Snapshot,
        nonce: u64,
        always: bool,
    ) -> Option<Self::Response>;
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

/// One stream's protocol state: the record of each type, by type URL,
/// and the last nonce given. No I/O.
pub(super) struct Protocol<V: Variant> {
    types: BTreeMap<String, V::Type>,
    nonce: u64,
}

impl<V: Variant> Default for Protocol<V> {
    fn default() -> Self {
        Protocol {
            types: BTreeMap::new(),
            nonce: 0,
        }
    }
}

impl<V: Variant> Protocol<V> {
    /// What `req` said, and the response it calls for given `snap`.
    pub(super) fn on_request(
        &mut self,
        req: &V::Request,
        snap: &Snapshot,
    ) -> (Reply, Option<V::Response>) {
        let type_url = V::ask(req).type_url;
        let t = self.types.entry(type_url.to_string()).or_default();
        let reply = V::reply(t, req);
        let resp = match V::subscribe(t, req, &reply) {
            Answer::No => None,
            Answer::IfChanged => next::<V>(&mut self.nonce, t, type_url, snap, false),
            Answer::Always => next::<V>(&mut self.nonce, t, type_url, snap, true),
        };
        (reply, resp)
    }

    /// Responses for every subscribed type whose view changed with `snap`.
    pub(super) fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<V::Response> {
        let nonce = &mut self.nonce;
        self.types
            .iter_mut()
            .filter_map(|(type_url, t)| next::<V>(nonce, t, type_url, snap, false))
            .collect()
    }
}

/// [`Variant::respond`] with the next nonce, taken only when it responds.
fn next<V: Variant>(
    nonce: &mut u64,
    t: &mut V::Type,
    type_url: &str,
    snap: &Snapshot,
    always: bool,
) -> Option<V::Response> {
    let resp = V::respond(t, type_url, snap, *nonce + 1, always)?;
    *nonce += 1;
    Some(resp)
}

/// One stream's protocol and node. No I/O.
pub(super) struct Session<V: Variant> {
    peer: SpiffeId,
    peer_name: String,
    /// The node id the stream gave (checked against `peer`).
    node: Option<String>,
    protocol: Protocol<V>,
}

impl<V: Variant> Session<V> {
    /// A stream of the proxy whose certificate is `peer`.
    pub(super) fn new(peer: SpiffeId) -> Self {
        Session {
            peer_name: peer.to_string(),
            peer,
            node: None,
            protocol: Protocol::default(),
        }
    }

    /// The peer's SPIFFE ID.
    pub(super) fn peer(&self) -> &str {
        &self.peer_name
    }

    /// The node id, or the peer's SPIFFE ID before the stream names one.
    pub(super) fn node(&self) -> &str {
        self.node.as_deref().unwrap_or(&self.peer_name)
    }

    /// Authorizes the node `req` names (the first request must name one;
    /// later ones may leave it out or repeat it). On the stream's first
    /// request, returns the cluster the node names (its snapshots are
    /// served); `Err` is the status that ends the stream.
    pub(super) fn admit(&mut self, req: &V::Request) -> Result<Option<String>, Status> {
        let node = V::ask(req).node;
        let first = self.node.is_none();
        node_of(node, &self.peer, &mut self.node)?;
        Ok(first.then(|| node_cluster(node)))
    }

    /// What an admitted `req` said, and the response it calls for given
    /// `snap` (as scoped for the node).
    pub(super) fn on_request(
        &mut self,
        req: &V::Request,
        snap: &Arc<Snapshot>,
    ) -> (Reply, Option<V::Response>) {
        let view = scoped_view(snap, self.node.as_deref());
        self.protocol.on_request(req, &view)
    }

    /// The responses a new snapshot calls for (as scoped for the node).
    pub(super) fn on_snapshot(&mut self, snap: &Arc<Snapshot>) -> Vec<V::Response> {
        let view = scoped_view(snap, self.node.as_deref());
        self.protocol.on_snapshot(&view)
    }
}

/// How long a stream may wait for room in its response queue before the
/// proxy is considered stuck and the stream ends.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

async fn send<T>(tx: &mpsc::Sender<Result<T, Status>>, msg: T) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, tx.send(Ok(msg))).await,
        Ok(Ok(()))
    )
}

/// Ends a stream with `status`.
async fn refuse<T>(tx: &mpsc::Sender<Result<T, Status>>, peer: &str, status: Status) {
    tracing::warn!(peer, error = %status.message(), "discovery stream refused");
    let _ = tx.send(Err(status)).await;
}

/// Serves the stream of `peer` (authenticated) whose requests are
/// `inbound`, in a task; returns its responses.
pub(super) fn serve<V: Variant>(
    server: XdsServer,
    peer: SpiffeId,
    inbound: Streaming<V::Request>,
) -> ReceiverStream<Result<V::Response, Status>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(drive(server, Session::<V>::new(peer), inbound, tx));
    ReceiverStream::new(rx)
}

async fn drive<V: Variant>(
    server: XdsServer,
    mut session: Session<V>,
    mut inbound: Streaming<V::Request>,
    tx: mpsc::Sender<Result<V::Response, Status>>,
) {
    let _connected = server.connected();
    let peer = session.peer().to_string();
    let mut snaps = server.inner.snapshots.clone();
    tracing::info!(peer, "discovery stream ({}) opened", V::NAME);
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let req = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = session.node(), error = %e, "discovery stream failed");
                        break;
                    }
                };
                let admitted = session.admit(&req).and_then(|cluster| match cluster {
                    Some(cluster) => server.snapshots_of(&cluster).map(|rx| snaps = rx),
                    None => Ok(()),
                });
                if let Err(status) = admitted {
                    refuse(&tx, &peer, status).await;
                    break;
                }
                let snap = snaps.borrow().clone();
                let (reply, resp) = session.on_request(&req, &snap);
                server.record(session.node(), &peer, &V::ask(&req), &reply);
                if let Some(resp) = resp {
                    let t = V::response_type(&resp).to_string();
                    if !send(&tx, resp).await { break; }
                    server.pushed(&t, None);
                }
            }
            changed = snaps.changed() => {
                if changed.is_err() { break; }
                let snap = snaps.borrow_and_update().clone();
                for resp in session.on_snapshot(&snap) {
                    let t = V::response_type(&resp).to_string();
                    if !send(&tx, resp).await { return; }
                    server.pushed(&t, Some(&snap));
                }
            }
            () = tx.closed() => break,
        }
    }
    tracing::info!(node = session.node(), "discovery stream closed");
}

#[cfg(test)]
mod tests;
