//! Kubernetes mode: service-account tokens checked with a `TokenReview`
//! by the API server of the cluster the caller runs in.
//!
//! A primary-remote control plane serves proxies of several clusters, and
//! a remote cluster's tokens are signed by that cluster's API server, not
//! the primary's: they are reviewed by the remote's API (as istiod does
//! with its remote secrets). A caller that names its cluster (Istio's
//! proxies send gRPC metadata `ClusterID`) is reviewed by that cluster's
//! API only; one that does not is reviewed by this cluster's API first,
//! then by each remote's, and gets the first acceptance. Either way the
//! identity is `spiffe://<td>/ns/<ns>/sa/<sa>` of the account the
//! reviewing API server names: namespace sameness across the clusters of
//! a mesh, as in Istio.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use strait_ca::{SpiffeId, TrustDomain};
use tonic::Code;

use super::{KUBE_AUDIENCE, Refusal, service_account_of};

/// The gRPC metadata key a caller names its cluster with (Istio's
/// `ClusterID`; gRPC metadata keys are lowercase on the wire).
pub const CLUSTER_ID: &str = "clusterid";

/// The API servers tokens are reviewed with: this cluster's first, then
/// the remote clusters' this control plane serves.
#[derive(Clone)]
pub struct TokenReviewers {
    clusters: Vec<(String, ::kube::Client)>,
}

impl TokenReviewers {
    /// Reviews with `own`, the API of the cluster named `cluster`.
    pub fn new(cluster: impl Into<String>, own: ::kube::Client) -> Self {
        TokenReviewers {
            clusters: vec![(cluster.into(), own)],
        }
    }

    /// Also reviews the tokens of remote cluster `name` with its API.
    pub fn with_remote(mut self, name: impl Into<String>, client: ::kube::Client) -> Self {
        self.clusters.push((name.into(), client));
        self
    }

    /// The identity of `token`: reviewed by the API of `cluster` when the
    /// caller named one, else by each API in turn until one accepts it.
    /// Refused with the first API's answer when none does.
    pub async fn review(
        &self,
        td: &TrustDomain,
        cluster: Option<&str>,
        token: &str,
    ) -> Result<SpiffeId, Refusal> {
        if let Some(name) = cluster {
            let Some((_, client)) = self.clusters.iter().find(|(n, _)| n == name) else {
                let known: Vec<&str> = self.clusters.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Refusal::new(
                    Code::Unauthenticated,
                    "unknown_cluster",
                    format!(
                        "Kubernetes token refused: the caller's cluster {name:?} (metadata \
                         ClusterID) is not one this control plane serves ({known:?})"
                    ),
                ));
            };
            return review(client, td, token).await;
        }
        let mut first = None;
        for (name, client) in &self.clusters {
            match review(client, td, token).await {
                Ok(id) => return Ok(id),
                Err(refusal) => {
                    tracing::debug!(cluster = %name, reason = %refusal.message, "token not accepted by this cluster's API");
                    first.get_or_insert(refusal);
                }
            }
        }
        Err(first.unwrap_or_else(|| {
            Refusal::new(
                Code::Unauthenticated,
                "bad_token",
                "Kubernetes token refused: no API server to review it",
            )
        }))
    }
}

/// The identity of a service-account token, asked of one API server.
async fn review(
    client: &::kube::Client,
    td: &TrustDomain,
    token: &str,
) -> Result<SpiffeId, Refusal> {
    let api: ::kube::Api<TokenReview> = ::kube::Api::all(client.clone());
    let ask = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![KUBE_AUDIENCE.to_string()]),
        },
        ..Default::default()
    };
    let answer = api
        .create(&::kube::api::PostParams::default(), &ask)
        .await
        .map_err(|e| {
            Refusal::new(
                Code::Unavailable,
                "token_review_failed",
                format!("the Kubernetes API could not review the token: {e}"),
            )
        })?;
    let status = answer.status.unwrap_or_default();
    let refused = |why: String| {
        Refusal::new(
            Code::Unauthenticated,
            "bad_token",
            format!("Kubernetes token refused: {why}"),
        )
    };
    if status.authenticated != Some(true) {
        return Err(refused(
            status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated by the API server".to_string()),
        ));
    }
    if let Some(audiences) = status.audiences.filter(|a| !a.is_empty())
        && !audiences.iter().any(|a| a == KUBE_AUDIENCE)
    {
        return Err(refused(format!(
            "issued for audiences {audiences:?}, not {KUBE_AUDIENCE:?}"
        )));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    let (ns, sa) = service_account_of(&username).map_err(|e| refused(e.to_string()))?;
    SpiffeId::workload(td, ns, sa).map_err(|e| refused(format!("{username}: {e}")))
}
