//! The discovery server as `app::run` serves it (over
//! `strait_runtime::transport::tls_incoming`, client certificates optional
//! at TLS): a proxy's node id must name the namespace of its certificate.
//! The whole process (broker link, config directory, CSR, restarts) is
//! exercised end to end in the workspace's `tests/controlplane.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use futures::StreamExt;
use prometheus_client::registry::Registry;
use strait_ca::TrustDomain;
use strait_ca::testing::TestPki;
use strait_ca::tls::{Accept, SpiffeClientVerifier, SpiffeServerVerifier, Trust};
use strait_controlplane::resources::Snapshot;
use strait_controlplane::xds::{Metrics, XdsServer};
use strait_proto::strait::mesh::v1 as pb;
use strait_proto::strait::mesh::v1::type_url;
use tokio::sync::{oneshot, watch};

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(15);

fn identity(pki: &TestPki, id: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
    let (leaf, key_pem) = pki.leaf(id);
    let key = strait_ca::pemfile::parse_single(key_pem.as_bytes(), "PRIVATE KEY").unwrap();
    (vec![leaf, pki.intermediate.certificate_der().to_vec()], key)
}

/// Serves one Network resource the way `app::run` serves discovery; the
/// address and a stop handle.
async fn serve(pki: &TestPki) -> (String, oneshot::Sender<()>, watch::Sender<Arc<Snapshot>>) {
    let trust = Trust::new(pki.bundle());
    let (chain, key) = identity(
        pki,
        "spiffe://cluster.local/ns/strait-system/sa/controlplane",
    );
    let verifier = SpiffeClientVerifier::new(trust.clone(), Accept::Any, false);
    let tls = strait_ca::tls::server_config(&chain, &key, verifier, &[b"h2"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = strait_runtime::transport::tls_incoming(listener, Arc::new(tls));
    let mut snap = Snapshot::empty(Instant::now());
    snap.insert(
        type_url::NETWORK,
        "net-west",
        &pb::Network {
            name: "net-west".into(),
            gateways: vec!["192.0.2.1:15443".into()],
            ..Default::default()
        },
    );
    let (snapshots, rx) = watch::channel(Arc::new(snap));
    let mut registry = Registry::default();
    let xds = XdsServer::new(
        rx,
        trust,
        TrustDomain::new(TD).unwrap(),
        Metrics::new(&mut registry),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(xds.service())
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.await;
            }),
    );
    (addr, stop, snapshots)
}

/// Opens a delta stream as `peer` naming `node` (None: no node) and
/// returns the first answer: the resource names, or the refusal.
async fn first_answer(
    pki: &TestPki,
    addr: &str,
    peer: &str,
    node: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let trust = Trust::new(pki.bundle());
    let verifier = SpiffeServerVerifier::new(trust, Accept::Any);
    let (chain, key) = identity(pki, peer);
    let tls =
        strait_ca::tls::client_config(verifier, Some((&chain[..], &key[..])), &[b"h2"]).unwrap();
    let channel = strait_runtime::transport::channel(addr, Arc::new(tls)).unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let req = DeltaDiscoveryRequest {
        node: node.map(|id| Node {
            id: id.into(),
            ..Default::default()
        }),
        type_url: type_url::NETWORK.into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    };
    // Keep the request side open: a finished request stream would end the
    // server's stream before it answers.
    let requests = futures::stream::iter([req]).chain(futures::stream::pending());
    let mut inbound = tokio::time::timeout(WAIT, ads.delta_aggregated_resources(requests))
        .await
        .expect("an answer in time")?
        .into_inner();
    let resp = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("a first message in time")?
        .expect("the stream does not end silently");
    Ok(resp.resources.into_iter().map(|r| r.name).collect())
}

#[tokio::test]
async fn node_ids_must_name_the_namespace_of_the_client_certificate() {
    let pki = TestPki::new(TD);
    let (addr, stop, _snapshots) = serve(&pki).await;
    let echo = "spiffe://cluster.local/ns/demo/sa/echo";
    let gateway = "spiffe://cluster.local/ns/strait-system/sa/eastwest-gateway";
    let gateway_node =
        "gateway~127.0.0.1~eastwest-gateway.strait-system~strait-system.svc.cluster.local";

    // Matching namespaces are served.
    let names = first_answer(
        &pki,
        &addr,
        echo,
        Some("sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local"),
    )
    .await
    .unwrap();
    assert_eq!(names, ["net-west"]);
    let names = first_answer(&pki, &addr, gateway, Some(gateway_node))
        .await
        .unwrap();
    assert_eq!(names, ["net-west"]);

    // A workload asking for another namespace's view, or posing as the
    // gateway, is refused and told why.
    for node in [
        "sidecar~10.0.0.1~echo-1.kube-system~kube-system.svc.cluster.local",
        gateway_node,
    ] {
        let status = first_answer(&pki, &addr, echo, Some(node))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(node), "{status:?}");
        assert!(status.message().contains(echo), "{status:?}");
    }
    // The gateway cannot pose as a workload of `demo` either.
    let status = first_answer(
        &pki,
        &addr,
        gateway,
        Some("sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local"),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Garbage and a missing node are refused as bad requests.
    let status = first_answer(&pki, &addr, echo, Some("echo"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("\"echo\""), "{status:?}");
    let status = first_answer(&pki, &addr, echo, None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("node"), "{status:?}");

    let _ = stop.send(());
}
