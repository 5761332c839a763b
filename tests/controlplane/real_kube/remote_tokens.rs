//! Primary-remote: a remote cluster's proxies authenticate with their own
//! cluster's service-account tokens, which only the remote's API server
//! can review. The primary reviews them there (as istiod does with its
//! remote secrets): by the cluster a caller names in its `ClusterID`
//! metadata (Istio's proxies send it), or, for a caller that names none,
//! by its own API and then each remote's. Before, the primary asked only
//! its own API server, which refused every remote token: no pod of a
//! remote cluster could get a certificate.

use std::sync::Arc;

use strait_ca::SpiffeId;
use strait_ca::authority::{self, KeyAlgorithm};
use strait_proto::istio::v1::auth::IstioCertificateRequest;
use strait_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

use super::*;
use crate::real_kube_faults::{east_serving_remote, remote_objects, two_api_servers};

/// A CSR for `bookinfo/<account>` sent to `cp`'s CSR API with `token`,
/// and `cluster` as the `ClusterID` metadata when given: the PEM chain,
/// or the refusal's message.
async fn ask(
    cp: &ControlPlane,
    account: &str,
    token: &str,
    cluster: Option<&str>,
) -> Result<Vec<String>, String> {
    let td = cp.trust_domain();
    let id = SpiffeId::workload(&td, "bookinfo", account).unwrap();
    let key = authority::generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = authority::leaf_csr(&id, &[], &key).unwrap();
    let tls = ca::mesh_client_tls(cp.trust(), ca::control_plane_id(&td))(None).unwrap();
    let channel = strait_runtime::transport::channel_to(
        &cp.listen,
        strait_ca::tls::CONTROL_PLANE_SERVER_NAME,
        Arc::new(tls),
    )
    .unwrap();
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    let md = request.metadata_mut();
    md.insert("authorization", format!("Bearer {token}").parse().unwrap());
    if let Some(cluster) = cluster {
        md.insert("clusterid", cluster.parse().unwrap());
    }
    IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .map(|r| r.into_inner().cert_chain)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_clusters_tokens_are_reviewed_by_its_own_api_server() {
    let s = Scratch::new();
    let Some((api, remote)) = two_api_servers(&s) else {
        return;
    };
    remote_objects(&remote);
    let broker = Broker::start(&s.path("broker"), TD);
    let east = east_serving_remote(&s, &broker, &api, &remote);
    let token = remote.token("bookinfo", "bookinfo-ratings", "istio-ca", 600);

    // A strait proxy names no cluster: east's API refuses the token, the
    // remote's accepts it.
    let chain = ask(&east, "bookinfo-ratings", &token, None)
        .await
        .expect("a remote pod's token, no ClusterID");
    let leaf = strait_ca::pemfile::parse_certificates(chain.concat().as_bytes()).unwrap();
    let leaf = strait_ca::cert::CertSummary::from_der(&leaf[0]).unwrap();
    assert_eq!(
        leaf.spiffe_id,
        Some(format!("spiffe://{TD}/ns/bookinfo/sa/bookinfo-ratings")),
        "the leaf's SPIFFE ID"
    );
    // The proxy-client path the sidecar takes (the chain checked against
    // the mesh trust) gets it too.
    certificate_with(&east, "bookinfo-ratings", &token)
        .await
        .expect("the sidecar's request with a remote token");

    // Named cluster: reviewed there only.
    ask(&east, "bookinfo-ratings", &token, Some("remote"))
        .await
        .expect("ClusterID remote");
    let own = ask(&east, "bookinfo-ratings", &token, Some("east"))
        .await
        .expect_err("a remote token said to be east's");
    assert!(own.contains("Unauthenticated"), "{own}");
    let unknown = ask(&east, "bookinfo-ratings", &token, Some("nowhere"))
        .await
        .expect_err("a cluster the primary does not serve");
    assert!(
        unknown.contains("\"nowhere\"") && unknown.contains("not one this control plane serves"),
        "{unknown}"
    );

    // What the remote's API refuses is refused: another audience, and a
    // token for one account asking for another.
    let other = remote.token("bookinfo", "bookinfo-ratings", "other", 600);
    let refused = ask(&east, "bookinfo-ratings", &other, None)
        .await
        .expect_err("a remote token of another audience");
    assert!(refused.contains("Unauthenticated"), "{refused}");
    remote.apply(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: other, namespace: bookinfo}\n",
    );
    let wrong = ask(&east, "other", &token, None)
        .await
        .expect_err("bookinfo-ratings' token asking for account other");
    assert!(
        wrong.contains("PermissionDenied") || wrong.contains("Unauthenticated"),
        "{wrong}"
    );
}
