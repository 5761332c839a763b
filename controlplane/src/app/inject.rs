//! The sidecar injection webhook's listener (`--inject-listen`): HTTPS,
//! `POST /inject` with an `AdmissionReview`, answered by
//! [`crate::kube::inject::review`]. It is served with the control plane's
//! own certificate, which names `controlplane.strait-system.svc`; the API
//! server verifies it against the MutatingWebhookConfiguration's
//! `caBundle` (the mesh roots).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::ServingCert;
use crate::kube::inject::{InjectConfig, MAX_REVIEW, review};

/// Where the webhook listens and what it injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectServe {
    pub listen: SocketAddr,
    pub config: InjectConfig,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// `strait_inject_reviews_total{outcome}`: admission reviews answered,
/// by outcome (`injected`, `unchanged`, `refused`).
#[derive(Debug, Clone, Default)]
pub struct InjectMetrics {
    reviews: Family<OutcomeLabel, Counter>,
}

impl InjectMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = InjectMetrics::default();
        registry.sub_registry_with_prefix("strait_inject").register(
            "reviews",
            "Admission reviews the injection webhook answered, by outcome (injected, unchanged, refused)",
            m.reviews.clone(),
        );
        m
    }

    fn count(&self, outcome: &'static str) {
        self.reviews.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// TLS for the webhook: the control plane's certificate, no client
/// certificate (the API server sends none), HTTP/2 or HTTP/1.1.
pub fn server_tls(cert: Arc<ServingCert>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the webhook until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: Arc<InjectConfig>,
    metrics: InjectMetrics,
) {
    use futures::StreamExt;
    let mut incoming = strait_runtime::transport::tls_incoming(listener, tls);
    while let Some(conn) = incoming.next().await {
        let Ok(tls) = conn else {
            continue;
        };
        let config = config.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let config = config.clone();
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &config, &metrics).await) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    config: &InjectConfig,
    metrics: &InjectMetrics,
) -> Response<String> {
    if req.uri().path() != "/inject" {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("{} is not served here: POST /inject\n", req.uri().path()),
        );
    }
    if req.method() != http::Method::POST {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "POST an AdmissionReview to /inject\n".into(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            metrics.count("refused");
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                format!(
                    "the AdmissionReview could not be read (at most {MAX_REVIEW} bytes): {e}\n"
                ),
            );
        }
    };
    match review(&body, config) {
        Ok(answer) => {
            let injected = answer["response"].get("patch").is_some();
            metrics.count(if injected { "injected" } else { "unchanged" });
            tracing::info!(injected, "admission review answered");
            respond(StatusCode::OK, "application/json", answer.to_string())
        }
        Err(e) => {
            metrics.count("refused");
            tracing::warn!(error = %e, "admission review refused");
            respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"))
        }
    }
}

/// A response with `status`, a content type and `body`.
fn respond(status: StatusCode, content_type: &str, body: String) -> http::Response<String> {
    let mut r = http::Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}
