//! The `Federation` service, for the clusters of this mesh: `Join` spends
//! a join token for an intermediate; `Sync` authenticates the cluster and
//! hands the stream to a [`Session`].

use std::sync::Arc;

use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::session::Session;
use super::{Caller, authenticate};
use crate::metrics::Metrics;
use crate::state::BrokerState;

/// The `Federation` service.
pub struct FederationService {
    pub state: Arc<BrokerState>,
    pub metrics: Arc<Metrics>,
    /// Sync streams end when the drain starts, so that clusters reconnect
    /// (to another broker address they know) rather than hold the
    /// shutdown up.
    pub drain: strait_runtime::drain::Watch,
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
        if let Some(why) = self.state.detached().borrow().clone() {
            return Err(Status::unavailable(format!(
                "this broker replica cannot write ({why}); connect to another"
            )));
        }
        self.state.check_member(&name).await?;
        let (tx, rx) = mpsc::channel(32);
        let session = Session::new(
            self.state.clone(),
            self.metrics.clone(),
            name,
            tx,
            self.drain.clone(),
        );
        tokio::spawn(session.run(req.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
