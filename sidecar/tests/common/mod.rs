//! Test harness: a PKI, echo backends, sidecars on loopback ports, the
//! mesh resources that describe them, and small HTTP clients (`curl` and
//! hyper) to drive them.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use strait_ca::SpiffeId;
use strait_ca::testing::TestPki;
use strait_ca::tls::Trust;
use strait_proto::strait::mesh::v1 as pb;
use strait_sidecar::config::{MeshConfig, WorkloadRef};
use strait_sidecar::identity::Identity;
use strait_sidecar::{Options, OutboundPolicy, Shared};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

pub mod grpc;

pub const TD: &str = "cluster.local";
pub const ECHO: &str = "echo.demo.svc.cluster.local";

/// A SPIFFE ID of Istio's form in the test trust domain.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

/// A workload certificate for `id`, issued by the PKI's intermediate.
pub fn identity(pki: &TestPki, id: &str) -> Arc<Identity> {
    let (leaf, key_pem) = pki.leaf(id);
    let key = strait_ca::pemfile::parse_single(key_pem.as_bytes(), "PRIVATE KEY").unwrap();
    let now = time::OffsetDateTime::now_utc();
    Arc::new(Identity {
        chain_der: vec![leaf, pki.intermediate.certificate_der().to_vec()],
        key_pkcs8: key,
        spiffe_id: SpiffeId::parse(id).unwrap(),
        received: now,
        not_after: now + time::Duration::hours(1),
    })
}

/// The PKI's root as the local pushed TrustBundle.
pub fn bundle(pki: &TestPki) -> pb::TrustBundle {
    bundle_of(pki, true)
}

/// The PKI's root as a pushed TrustBundle of its trust domain.
pub fn bundle_of(pki: &TestPki, local: bool) -> pb::TrustBundle {
    pb::TrustBundle {
        trust_domain: pki.root.trust_domain().to_string(),
        roots_pem: vec![strait_ca::pemfile::encode(
            "CERTIFICATE",
            pki.root.root_der(),
        )],
        denied_intermediates: vec![],
        local,
        ..Default::default()
    }
}

/// An HTTP/1.1 app that answers `backend=<name>` and the request line and
/// headers it got, one per line. `/slow` waits 400 ms first.
pub async fn backend(name: &str) -> SocketAddr {
    backend_counted(name).await.0
}

/// [`backend`], with the number of requests it has started.
pub async fn backend_counted(name: &str) -> (SocketAddr, watch::Receiver<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = name.to_string();
    let (started_tx, started) = watch::channel(0u64);
    let started_tx = Arc::new(started_tx);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let name = name.clone();
            let started_tx = started_tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let name = name.clone();
                    started_tx.send_modify(|n| *n += 1);
                    async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                        }
                        let mut body = format!("backend={name}\n{} {}\n", req.method(), req.uri());
                        for (k, v) in req.headers() {
                            body.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, started)
}

/// The client sidecar `sleep` (service account `sleep`, its app a
/// [`backend`]), with no config yet.
pub async fn sleep_client(pki: &TestPki) -> Sidecar {
    Sidecar::start(
        "sleep",
        "demo",
        backend("sleep").await,
        identity(pki, &spiffe("demo", "sleep")),
        pki,
    )
    .await
}

/// A client sidecar (`sleep`, its app a [`backend`]) and one server
/// sidecar (`echo-v1`, service account `echo`) in front of `echo_app`,
/// with the mesh naming them pushed to both.
pub async fn sleep_and_echo(pki: &TestPki, echo_app: SocketAddr) -> (Sidecar, Sidecar, Mesh) {
    let client = sleep_client(pki).await;
    let server = Sidecar::start(
        "echo-v1",
        "demo",
        echo_app,
        identity(pki, &spiffe("demo", "echo")),
        pki,
    )
    .await;
    let mesh = Mesh::new(pki)
        .echo(
            vec![server.endpoint("v1", &spiffe("demo", "echo"))],
            &[spiffe("demo", "echo")],
        )
        .workload("sleep", "demo", &[("app", "sleep")])
        .workload("echo-v1", "demo", &[("app", "echo"), ("version", "v1")]);
    client.push(&mesh);
    server.push(&mesh);
    (client, server, mesh)
}

/// The options a test may change from their defaults.
pub struct Tuning {
    /// The drain deadline (5 s).
    pub drain: Duration,
    /// Allow-any.
    pub outbound_policy: OutboundPolicy,
    /// None.
    pub app_ports: Vec<u16>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            drain: Duration::from_secs(5),
            outbound_policy: OutboundPolicy::AllowAny,
            app_ports: vec![],
        }
    }
}

/// A running sidecar.
pub struct Sidecar {
    pub name: String,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub config: watch::Sender<Arc<MeshConfig>>,
    pub identity: watch::Sender<Option<Arc<Identity>>>,
    pub registry: Arc<Registry>,
    pub me: WorkloadRef,
    /// The running sidecar's state (its upstream pool, for one).
    pub shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sidecar {
    /// Binds both listeners on loopback port 0 and runs the sidecar for
    /// workload `name` in `ns`, with `id` as its certificate; the config
    /// is empty until [`Sidecar::push`].
    pub async fn start(
        name: &str,
        ns: &str,
        app: SocketAddr,
        id: Arc<Identity>,
        pki: &TestPki,
    ) -> Sidecar {
        let inbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(name, ns, app, id, pki, inbound).await
    }

    /// [`Sidecar::start`] with a drain deadline of `drain`.
    pub async fn start_with(
        name: &str,
        ns: &str,
        app: SocketAddr,
        id: Arc<Identity>,
        pki: &TestPki,
        drain: Duration,
    ) -> Sidecar {
        let inbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tuning = Tuning {
            drain,
            ..Tuning::default()
        };
        Self::start_opts(name, ns, app, id, pki, tuning, inbound).await
    }

    /// [`Sidecar::start`] with `inbound` as its mTLS listener.
    pub async fn start_on(
        name: &str,
        ns: &str,
        app: SocketAddr,
        id: Arc<Identity>,
        pki: &TestPki,
        inbound: TcpListener,
    ) -> Sidecar {
        Self::start_opts(name, ns, app, id, pki, Tuning::default(), inbound).await
    }

    /// Runs the sidecar with `inbound` as its mTLS listener. A test that
    /// checks the listener is closed binds it on a loopback address of
    /// its own: a port on 127.0.0.1 freed by one test may be bound by
    /// another running in parallel.
    pub async fn start_opts(
        name: &str,
        ns: &str,
        app: SocketAddr,
        id: Arc<Identity>,
        pki: &TestPki,
        tuning: Tuning,
        inbound: TcpListener,
    ) -> Sidecar {
        let Tuning {
            drain,
            outbound_policy,
            app_ports,
        } = tuning;
        let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let me = WorkloadRef {
            name: name.into(),
            namespace: ns.into(),
        };
        let (config_tx, config_rx) = watch::channel(Arc::new(MeshConfig::default()));
        let (id_tx, id_rx) = watch::channel(Some(id));
        let mut registry = Registry::default();
        let metrics = strait_sidecar::metrics::Metrics::new(&mut registry);
        let shared = Arc::new(Shared::new(
            Options {
                workload: me.clone(),
                inbound: inbound.local_addr().unwrap(),
                app,
                app_ports,
                outbound: outbound.local_addr().unwrap(),
                drain,
                outbound_policy,
            },
            config_rx,
            id_rx,
            Trust::new(pki.bundle()),
            metrics,
        ));
        let (stop_tx, stop_rx) = oneshot::channel();
        let s = Sidecar {
            name: name.into(),
            inbound: inbound.local_addr().unwrap(),
            outbound: outbound.local_addr().unwrap(),
            config: config_tx,
            identity: id_tx,
            registry: Arc::new(registry),
            me,
            shared: shared.clone(),
            stop: Some(stop_tx),
            task: None,
        };
        let task = tokio::spawn(strait_sidecar::run(shared, inbound, outbound, async {
            let _ = stop_rx.await;
        }));
        Sidecar {
            task: Some(task),
            ..s
        }
    }

    /// Pushes a config built from `mesh` (which must be accepted whole).
    pub fn push(&self, mesh: &Mesh) {
        let (cfg, errors) = MeshConfig::from_resources(
            mesh.services.clone(),
            mesh.workloads.clone(),
            mesh.policies.clone(),
            mesh.bundles.clone(),
            vec![],
            mesh.settings.clone(),
            &self.me,
        );
        assert!(errors.is_empty(), "{errors:?}");
        self.config.send_replace(Arc::new(cfg));
    }

    /// The `/stats/prometheus` text.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    /// Starts draining; resolves when the sidecar has stopped.
    pub async fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    /// The sidecar as an endpoint of a service.
    pub fn endpoint(&self, version: &str, identity: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: self.inbound.ip().to_string(),
            port: u32::from(self.inbound.port()),
            labels: HashMap::from([
                ("app".to_string(), "echo".to_string()),
                ("version".to_string(), version.to_string()),
            ]),
            cluster: "c1".into(),
            network: "net1".into(),
            identity: identity.into(),
            healthy: true,
            weight: 1,
            workload: self.name.clone(),
            ..Default::default()
        }
    }
}

/// The resources a test pushes.
#[derive(Clone, Default)]
pub struct Mesh {
    pub services: Vec<pb::Service>,
    pub workloads: Vec<pb::Workload>,
    pub policies: Vec<pb::Policy>,
    pub bundles: Vec<pb::TrustBundle>,
    /// The mesh-wide settings (none: the defaults).
    pub settings: Vec<pb::MeshSettings>,
}

impl Mesh {
    pub fn new(pki: &TestPki) -> Mesh {
        Mesh {
            bundles: vec![bundle(pki)],
            ..Mesh::default()
        }
    }

    /// `echo.demo` on port 8080 with these endpoints and server identities.
    pub fn echo(mut self, endpoints: Vec<pb::Endpoint>, identities: &[String]) -> Mesh {
        self.services.push(pb::Service {
            hostname: ECHO.into(),
            namespace: "demo".into(),
            name: "echo".into(),
            aliases: vec!["echo.demo.svc.clusterset.local".into(), "echo.demo".into()],
            ports: vec![pb::Port {
                name: "http".into(),
                port: 8080,
                protocol: "http".into(),
                target_port: 0,
            }],
            identities: identities.to_vec(),
            exported: false,
            endpoints,
            addresses: vec![],
        });
        self
    }

    /// A workload of cluster `c1` (how a sidecar learns its cluster and labels).
    pub fn workload(mut self, name: &str, ns: &str, labels: &[(&str, &str)]) -> Mesh {
        self.workloads.push(pb::Workload {
            name: name.into(),
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cluster: "c1".into(),
            ..Default::default()
        });
        self
    }

    pub fn policy(mut self, kind: &str, ns: &str, name: &str, spec: serde_json::Value) -> Mesh {
        self.policies
            .retain(|p| !(p.kind == kind && p.namespace == ns && p.name == name));
        self.policies.push(pb::Policy {
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
            spec_json: spec.to_string(),
            generation: 1,
        });
        self
    }
}

/// What `curl` got: status (0 when no HTTP answer) and body.
#[derive(Debug)]
pub struct Curl {
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

/// Runs `curl -sS` with `args`, printing the status on a last line.
pub async fn curl(args: &[&str]) -> Curl {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    Curl {
        status: status.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// `curl -x http://<proxy> <url>`.
pub async fn via_proxy(proxy: SocketAddr, url: &str, extra: &[&str]) -> Curl {
    let p = format!("http://{proxy}");
    let mut args = vec!["-x", p.as_str()];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args).await
}

/// A keep-alive HTTP/1.1 client to an outbound proxy, for many requests.
pub struct ProxyClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl ProxyClient {
    pub async fn connect(proxy: SocketAddr) -> ProxyClient {
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        ProxyClient { sender }
    }

    /// `GET <url>` in absolute form: (status, body, headers).
    pub async fn get(&mut self, url: &str) -> (u16, String, http::HeaderMap) {
        self.sender.ready().await.unwrap();
        let req = hyper::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).to_string(), headers)
    }
}

/// `backend=<name>` from an echo body.
pub fn backend_of(body: &str) -> Option<&str> {
    body.lines().find_map(|l| l.strip_prefix("backend="))
}

/// The value of `header` in an echo body.
pub fn header_in<'a>(body: &'a str, header: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{header}: ")))
}
