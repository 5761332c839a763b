//! The discovery server and client over loopback with real mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use strait_proxy_client::xds::{self, Resources, Validator, XdsClientConfig};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

const TD: &str = "cluster.local";
const NODE: &str = "sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(15);

fn identity(pki: &TestPki, id: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
    let (leaf, key_pem) = pki.leaf(id);
    let key = strait_ca::pemfile::parse_single(key_pem.as_bytes(), "PRIVATE KEY").unwrap();
    (vec![leaf, pki.intermediate.certificate_der().to_vec()], key)
}

fn snapshot(networks: &[(&str, &str)]) -> Arc<Snapshot> {
    let mut s = Snapshot::empty(Instant::now());
    for (name, gw) in networks {
        s.insert(
            type_url::NETWORK,
            name,
            &pb::Network {
                name: (*name).into(),
                gateways: vec![(*gw).into()],
                ..Default::default()
            },
        );
    }
    Arc::new(s)
}

/// A running discovery server; `stop` ends its streams and frees the port.
struct Server {
    xds: XdsServer,
    snapshots: watch::Sender<Arc<Snapshot>>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(pki: &TestPki, addr: SocketAddr, first: Arc<Snapshot>) -> (Server, SocketAddr) {
        // The port may still be held for a moment by the previous server.
        let deadline = Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "port busy, retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let local = listener.local_addr().unwrap();
        let trust = Trust::new(pki.bundle());
        let (chain, key) = identity(pki, "spiffe://cluster.local/ns/istio-system/sa/istiod");
        let verifier = SpiffeClientVerifier::new(trust.clone(), Accept::Any, false);
        let tls = strait_ca::tls::server_config(&chain, &key, verifier, &[b"h2"]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let incoming = TcpListenerStream::new(listener).then(move |tcp| {
            let acceptor = acceptor.clone();
            async move { acceptor.accept(tcp?).await }
        });
        let (snapshots, rx) = watch::channel(first);
        let mut registry = Registry::default();
        let xds = XdsServer::new(
            rx,
            trust,
            TrustDomain::new(TD).unwrap(),
            Metrics::new(&mut registry),
        );
        let (shutdown, stop) = oneshot::channel();
        let service = xds.service();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.await;
                })
                .await
                .unwrap();
        });
        (
            Server {
                xds,
                snapshots,
                shutdown,
                task,
            },
            local,
        )
    }

    async fn stop(self) {
        // Streams end when their snapshots end; then the server drains.
        drop(self.snapshots);
        let _ = self.shutdown.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops")
            .unwrap();
    }
}

fn client_tls(pki: &TestPki, id: Option<&str>) -> Arc<rustls::ClientConfig> {
    let trust = Trust::new(pki.bundle());
    let verifier = SpiffeServerVerifier::new(trust, Accept::Any);
    let ident = id.map(|id| identity(pki, id));
    let pair = ident.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
    Arc::new(strait_ca::tls::client_config(verifier, pair, &[b"h2"]).unwrap())
}

fn client_config(pki: &TestPki, addr: SocketAddr) -> XdsClientConfig {
    XdsClientConfig {
        address: addr.to_string(),
        tls: client_tls(pki, Some("spiffe://cluster.local/ns/demo/sa/echo")).into(),
        node_id: NODE.into(),
        cluster: "east".into(),
        network: "net-east".into(),
        types: vec![type_url::NETWORK, type_url::SERVICE],
    }
}

/// Refuses every Network named `bad`.
fn validator() -> Validator {
    Arc::new(|r: &Resources| {
        let nets = r
            .decode::<pb::Network>(type_url::NETWORK)
            .map_err(|e| vec![e])?;
        let bad: Vec<(String, String)> = nets
            .keys()
            .filter(|n| n.as_str() == "bad")
            .map(|n| {
                (
                    n.clone(),
                    "network name refused by the test validator".into(),
                )
            })
            .collect();
        if bad.is_empty() { Ok(()) } else { Err(bad) }
    })
}

fn gateways(r: &Resources) -> Vec<(String, String)> {
    r.decode::<pb::Network>(type_url::NETWORK)
        .unwrap()
        .into_iter()
        .map(|(n, net)| (n, net.gateways.join(",")))
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
        .collect()
}

async fn wait_for_resources(rx: &mut watch::Receiver<Arc<Resources>>, want: &[(&str, &str)]) {
    let want = pairs(want);
    tokio::time::timeout(WAIT, rx.wait_for(|r| gateways(r) == want))
        .await
        .unwrap_or_else(|_| panic!("client never held {want:?}"))
        .unwrap();
}

#[tokio::test]
async fn the_client_follows_snapshots_and_a_refused_update_is_nacked() {
    let pki = TestPki::new(TD);
    let (server, addr) = Server::start(
        &pki,
        "127.0.0.1:0".parse().unwrap(),
        snapshot(&[("a", "gw-a:15443"), ("b", "gw-b:15443")]),
    )
    .await;
    let c = xds::spawn(client_config(&pki, addr), validator());
    let mut res = c.resources();
    wait_for_resources(&mut res, &[("a", "gw-a:15443"), ("b", "gw-b:15443")]).await;
    let mut state = c.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.synced))
        .await
        .expect("synced")
        .unwrap();
    assert!(server.xds.metrics().pushes(type_url::NETWORK) >= 1);
    assert_eq!(server.xds.metrics().connected(), 1);

    // An update reaches the client.
    server
        .snapshots
        .send(snapshot(&[("a", "gw-a2:15443"), ("c", "gw-c:15443")]))
        .unwrap();
    wait_for_resources(&mut res, &[("a", "gw-a2:15443"), ("c", "gw-c:15443")]).await;

    // A refused update is NACKed: the server records it, the client keeps
    // its last good resources.
    server
        .snapshots
        .send(snapshot(&[
            ("a", "gw-a2:15443"),
            ("bad", "x:1"),
            ("c", "gw-c:15443"),
            ("d", "gw-d:15443"),
        ]))
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let nack = loop {
        if let Some(n) = server.xds.nacks().get(NODE).cloned() {
            break n;
        }
        assert!(Instant::now() < deadline, "no NACK recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(nack.type_url, type_url::NETWORK);
    assert!(
        nack.error.contains("bad: network name refused"),
        "{}",
        nack.error
    );
    assert_eq!(server.xds.metrics().nacks(type_url::NETWORK), 1);
    assert_eq!(
        gateways(&res.borrow()),
        pairs(&[("a", "gw-a2:15443"), ("c", "gw-c:15443")]),
        "the last good set stays"
    );
    let s = state.borrow().clone();
    assert!(
        s.last_nack
            .as_ref()
            .is_some_and(|(t, e)| t == type_url::NETWORK && e.contains("bad")),
        "{s:?}"
    );

    // Fixed: the whole refused update goes through with the fix.
    server
        .snapshots
        .send(snapshot(&[
            ("a", "gw-a2:15443"),
            ("c", "gw-c:15443"),
            ("d", "gw-d:15443"),
        ]))
        .unwrap();
    wait_for_resources(
        &mut res,
        &[
            ("a", "gw-a2:15443"),
            ("c", "gw-c:15443"),
            ("d", "gw-d:15443"),
        ],
    )
    .await;
    drop(c);
    server.stop().await;
}

#[tokio::test]
async fn the_client_resumes_after_the_server_restarts() {
    let pki = TestPki::new(TD);
    let (server, addr) = Server::start(
        &pki,
        "127.0.0.1:0".parse().unwrap(),
        snapshot(&[("a", "gw-a:15443"), ("b", "gw-b:15443")]),
    )
    .await;
    let c = xds::spawn(client_config(&pki, addr), validator());
    let mut res = c.resources();
    wait_for_resources(&mut res, &[("a", "gw-a:15443"), ("b", "gw-b:15443")]).await;
    let mut state = c.state();
    server.stop().await;
    tokio::time::timeout(WAIT, state.wait_for(|s| !s.connected))
        .await
        .expect("client notices")
        .unwrap();
    assert_eq!(
        gateways(&res.borrow()),
        pairs(&[("a", "gw-a:15443"), ("b", "gw-b:15443")]),
        "kept while the control plane is away"
    );
    assert!(c.synced());

    let (server, _) = Server::start(
        &pki,
        addr,
        snapshot(&[("a", "gw-a:15443"), ("b", "gw-b2:15443")]),
    )
    .await;
    wait_for_resources(&mut res, &[("a", "gw-a:15443"), ("b", "gw-b2:15443")]).await;
    tokio::time::timeout(WAIT, state.wait_for(|s| s.connected))
        .await
        .expect("reconnected")
        .unwrap();
    drop(c);
    server.stop().await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = TestPki::new(TD);
    let (server, addr) = Server::start(
        &pki,
        "127.0.0.1:0".parse().unwrap(),
        snapshot(&[("a", "x:1")]),
    )
    .await;
    let channel =
        strait_runtime::transport::channel(&addr.to_string(), client_tls(&pki, None)).unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let req = DeltaDiscoveryRequest {
        type_url: type_url::NETWORK.into(),
        ..Default::default()
    };
    let status = ads
        .delta_aggregated_resources(tokio_stream::iter([req]))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("client certificate"),
        "{status:?}"
    );
    assert_eq!(server.xds.metrics().connected(), 0);

    // A certificate of another mesh does not pass the handshake either.
    let other = TestPki::new(TD);
    let (chain, key) = identity(&other, "spiffe://cluster.local/ns/demo/sa/echo");
    let foreign = strait_ca::tls::client_config(
        SpiffeServerVerifier::new(Trust::new(pki.bundle()), Accept::Any),
        Some((chain.as_slice(), key.as_slice())),
        &[b"h2"],
    )
    .unwrap();
    let channel = strait_runtime::transport::channel(&addr.to_string(), Arc::new(foreign)).unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let refused = match ads
        .delta_aggregated_resources(tokio_stream::iter([DeltaDiscoveryRequest::default()]))
        .await
    {
        Err(_) => true,
        Ok(resp) => resp.into_inner().message().await.is_err(),
    };
    assert!(refused, "a foreign certificate must not get a stream");
    server.stop().await;
}
