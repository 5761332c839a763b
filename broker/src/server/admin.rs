//! The `Admin` service (straitctl's API, admin identities only): clusters
//! and their join tokens, exports and imports, trust and root rotation,
//! peering; and the protobuf views of what it reports.

use std::sync::Arc;
use std::time::Duration;

use strait_ca::ClusterName;
use strait_ca::cert::CertSummary;
use strait_model::mesh::{Locality, Network, RemoteService};
use strait_proto::strait::broker::v1 as pb;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::{Caller, authenticate};
use crate::metrics::Metrics;
use crate::state::{BrokerState, ClusterRecord};
use crate::token::DEFAULT_TTL;
use crate::wire;

/// The `Admin` service.
pub struct AdminService {
    pub state: Arc<BrokerState>,
    pub metrics: Arc<Metrics>,
    /// Broker addresses written into join tokens.
    pub advertise: Vec<String>,
    /// Peer API addresses written into peer tokens (empty: no peer API).
    pub peer_advertise: Vec<String>,
    /// How the store is named in `BrokerStatus`.
    pub store: String,
    /// This replica's part among several on one etcd (none: the only one).
    #[cfg(feature = "etcd")]
    pub replication: Option<crate::ha::Replication>,
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
        self.state
            .cluster_records()
            .await
            .iter()
            .map(|(r, exports)| self.status(r, u32::try_from(*exports).unwrap_or(u32::MAX)))
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
        let exports = self
            .state
            .exports(&filter)
            .await
            .iter()
            .map(|(n, s)| pb::ExportEntry {
                cluster: n.to_string(),
                service: Some(wire::exported_service_pb(s)),
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
        let Some(imports) = self.state.imports_of(&name).await else {
            return Err(Status::not_found(format!("cluster {name} has not joined")));
        };
        let remotes: Vec<RemoteService> = imports.services.values().flatten().cloned().collect();
        let objects = strait_model::imports::import_objects(&imports.info, &remotes, &[]);
        let yaml = objects
            .to_yaml()
            .map_err(|e| Status::internal(format!("rendering imports: {e}")))?;
        Ok(Response::new(pb::ShowImportsResponse {
            revision: imports.revision,
            imports: imports
                .services
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
        let record = crate::peer::establish(
            &self.state,
            &req.get_ref().token,
            self.peer_advertise.clone(),
        )
        .await?;
        tracing::info!(%admin, mesh = %record.mesh, trust_domain = %record.trust_domain, "mesh peered (outbound)");
        crate::peer::spawn_puller(self.state.clone(), record.mesh.clone());
        Ok(Response::new(peer_info(&self.state, &record)))
    }

    async fn broker_status(
        &self,
        req: Request<pb::BrokerStatusRequest>,
    ) -> Result<Response<pb::BrokerStatusResponse>, Status> {
        self.admin(&req)?;
        #[cfg_attr(not(feature = "etcd"), allow(unused_mut))]
        let mut out = pb::BrokerStatusResponse {
            store: self.store.clone(),
            role: "single".into(),
            store_revision: self.state.store_revision().await,
            mesh_revision: *self.state.subscribe().borrow(),
            detached: self.state.detached().borrow().clone().unwrap_or_default(),
            ..Default::default()
        };
        #[cfg(feature = "etcd")]
        if let Some(r) = &self.replication {
            out.replica = r.id().to_string();
            out.role = r.role().borrow().name().to_string();
            let list = r
                .replicas()
                .await
                .map_err(|e| Status::unavailable(format!("listing the replicas in etcd: {e}")))?;
            out.replicas = list
                .replicas
                .into_iter()
                .map(|x| pb::ReplicaStatus {
                    leader: list.leader.as_deref() == Some(x.id.as_str()),
                    id: x.id,
                    address: x.address,
                    since_unix: x.since_unix,
                })
                .collect();
        }
        Ok(Response::new(out))
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
