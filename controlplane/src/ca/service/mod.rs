//! The workload CA: Istio's `IstioCertificateService` signing workload
//! X.509-SVIDs with the cluster's intermediate.
//!
//! Who may ask, and for what:
//! - a caller with a client certificate that verifies under the mesh trust
//!   (renewal) gets its own SPIFFE ID, nothing else; only Istio workload
//!   identities (`spiffe://<td>/ns/<ns>/sa/<sa>`) of this trust domain are
//!   issued here;
//! - a caller without one must send `authorization: Bearer <token>` with a
//!   workload token ([`super::token`]) and gets the token's identity;
//! - in Kubernetes mode ([`WorkloadCa::with_token_review`]), the bearer may
//!   instead be a Kubernetes service-account token for the audience
//!   [`KUBE_AUDIENCE`] (as Istio's proxies send it), checked with a
//!   `TokenReview` by the API server of the caller's cluster (a primary's
//!   remote clusters' too: [`TokenReviewers`]); the caller gets
//!   `spiffe://<td>/ns/<ns>/sa/<sa>` of the account that API server names.
//!
//! The CSR must prove possession of its key and ask for exactly that
//! identity as its only SAN. The authority is swappable at run time: the
//! broker link renews the intermediate.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use strait_ca::authority::{DEFAULT_LEAF_TTL, IssueError};
use strait_ca::policy::{Entitled, LeafRequest, PolicyError, SigningPolicy};
use strait_ca::tls::Trust;
use strait_ca::{Authority, Csr, SpiffeId, TrustDomain};
use strait_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use strait_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use time::OffsetDateTime;
use tonic::{Code, Request, Response, Status};

use super::token::TokenIssuer;
pub use review::TokenReviewers;

/// The largest request the service decodes (a CSR is under 2 KiB).
pub const MAX_REQUEST_BYTES: usize = 128 * 1024;
/// Default upper bound on a workload certificate's TTL.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long the certificates the CA issues live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// When the request asks for none (or for a non-positive one).
    pub default: Duration,
    /// The cap on what a request may ask for.
    pub max: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            default: DEFAULT_LEAF_TTL,
            max: DEFAULT_MAX_TTL,
        }
    }
}

impl TtlPolicy {
    /// The TTL to issue for a request's `validity_duration` (seconds):
    /// the default when it is not positive, capped at the maximum. (The
    /// authority further caps it at its own chain's expiry.)
    pub fn effective(&self, requested_secs: i64) -> Duration {
        let wanted = match u64::try_from(requested_secs) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => self.default,
        };
        wanted.min(self.max)
    }
}

/// Why the CA could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("TTL policy: the default {default:?} and the maximum {max:?} must be positive")]
    ZeroTtl { default: Duration, max: Duration },
    #[error(
        "the new intermediate is for trust domain {new:?}, but this CA signs for {current:?}; \
         keeping the current one"
    )]
    TrustDomainChanged { current: String, new: String },
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    auth: &'static str,
}

/// The CA's Prometheus metrics (`strait_ca_*`).
#[derive(Debug)]
struct Metrics {
    issued: Family<MethodLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    issue_seconds: Histogram,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            issued: Family::default(),
            refused: Family::default(),
            issue_seconds: Histogram::new(exponential_buckets(0.0002, 2.0, 14)),
        };
        let r = registry.sub_registry_with_prefix("strait_ca");
        r.register(
            "certificates_issued",
            "Workload certificates issued, by how the caller authenticated (token, certificate)",
            m.issued.clone(),
        );
        r.register(
            "requests_refused",
            "Certificate requests refused, by reason",
            m.refused.clone(),
        );
        r.register(
            "issue_seconds",
            "Time to authenticate, check and sign one certificate request",
            m.issue_seconds.clone(),
        );
        m
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A workload token (first certificate).
    Token,
    /// A client certificate of the mesh (renewal).
    Certificate,
    /// A Kubernetes service-account token (first certificate, Kubernetes
    /// mode).
    KubernetesToken,
}

impl AuthMethod {
    fn label(self) -> &'static str {
        match self {
            AuthMethod::Token => "token",
            AuthMethod::Certificate => "certificate",
            AuthMethod::KubernetesToken => "kubernetes_token",
        }
    }
}

/// A refused request: the gRPC code, a metric reason and a message that
/// names what was asked and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            reason,
            message: message.into(),
        }
    }

    fn status(&self) -> Status {
        Status::new(self.code, self.message.clone())
    }
}

/// A certificate the CA issued: the PEM chain (leaf, intermediates, root)
/// and facts for logs.
#[derive(Debug, Clone)]
pub struct Signed {
    pub spiffe_id: SpiffeId,
    pub not_after: OffsetDateTime,
    pub cert_chain: Vec<String>,
}

struct Inner {
    authority: RwLock<Arc<Authority>>,
    trust_domain: TrustDomain,
    trust: Trust,
    tokens: Option<TokenIssuer>,
    /// Kubernetes mode: service-account tokens are checked with these
    /// API servers' TokenReview.
    token_review: std::sync::OnceLock<TokenReviewers>,
    ttl: TtlPolicy,
    metrics: Metrics,
}

/// The workload CA service. Cheap to clone (shared state).
#[derive(Clone)]
pub struct WorkloadCa {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WorkloadCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCa")
            .field("trust_domain", &self.inner.trust_domain)
            .field("ttl", &self.inner.ttl)
            .field("tokens", &self.inner.tokens.is_some())
            .finish_non_exhaustive()
    }
}

impl WorkloadCa {
    /// A CA signing with `authority` for its trust domain. `trust` decides
    /// which client certificates may renew (the mesh bundle; peered
    /// domains' identities are refused here anyway); `tokens` checks
    /// bootstrap tokens (`None`: only renewals are served). Refuses a TTL
    /// policy with a zero bound.
    pub fn new(
        authority: Authority,
        trust: Trust,
        tokens: Option<TokenIssuer>,
        ttl: TtlPolicy,
        registry: &mut Registry,
    ) -> Result<Self, CaError> {
        if ttl.default.is_zero() || ttl.max.is_zero() {
            return Err(CaError::ZeroTtl {
                default: ttl.default,
                max: ttl.max,
            });
        }
        Ok(WorkloadCa {
            inner: Arc::new(Inner {
                trust_domain: authority.trust_domain().clone(),
                authority: RwLock::new(Arc::new(authority)),
                trust,
                tokens,
                token_review: std::sync::OnceLock::new(),
                ttl,
                metrics: Metrics::new(registry),
            }),
        })
    }

    /// Also accepts Kubernetes service-account tokens, checked with a
    /// `TokenReview` by `reviewers` (set once; later calls are ignored).
    pub fn with_token_review(self, reviewers: TokenReviewers) -> Self {
        let _ = self.inner.token_review.set(reviewers);
        self
    }

    /// The bearer token to check with a TokenReview: in Kubernetes mode,
    /// a caller without a client certificate whose token is not one of
    /// ours.
    fn kube_token<'a>(
        &self,
        peer_certs: Option<&[CertificateDer<'_>]>,
        authorization: Option<&'a [u8]>,
    ) -> Option<(&TokenReviewers, &'a str)> {
        let client = self.inner.token_review.get()?;
        if peer_certs.is_some_and(|c| !c.is_empty()) {
            return None;
        }
        let token = bearer_token(authorization?).ok()?;
        (!token.starts_with(super::token::PREFIX)).then_some((client, token))
    }

    /// Signs with `authority` from now on (the intermediate was renewed).
    /// Refuses one of another trust domain.
    pub fn set_authority(&self, authority: Authority) -> Result<(), CaError> {
        if authority.trust_domain() != &self.inner.trust_domain {
            return Err(CaError::TrustDomainChanged {
                current: self.inner.trust_domain.to_string(),
                new: authority.trust_domain().to_string(),
            });
        }
        let mut slot = self
            .inner
            .authority
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *slot = Arc::new(authority);
        Ok(())
    }

    /// The authority signing now.
    pub fn authority(&self) -> Arc<Authority> {
        self.inner
            .authority
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// The tonic service, with a request size limit.
    pub fn service(&self) -> IstioCertificateServiceServer<WorkloadCa> {
        IstioCertificateServiceServer::new(self.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Who the caller is: the SPIFFE ID of its client certificate if it
    /// presented one, else the identity of its bearer token.
    pub fn authenticate(
        &self,
        peer_certs: Option<&[CertificateDer<'_>]>,
        authorization: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<(SpiffeId, AuthMethod), Refusal> {
        let td = &self.inner.trust_domain;
        if let Some(certs) = peer_certs.filter(|c| !c.is_empty()) {
            let svid =
                strait_ca::tls::peer_identity(&self.inner.trust, certs, now).map_err(|e| {
                    Refusal::new(
                        Code::Unauthenticated,
                        "bad_client_certificate",
                        format!("client certificate refused: {e}"),
                    )
                })?;
            let id = svid.spiffe_id;
            if id.trust_domain_str() != td.as_str() || id.workload_parts().is_none() {
                return Err(Refusal::new(
                    Code::PermissionDenied,
                    "not_a_workload",
                    format!(
                        "{id} cannot renew here: this CA issues only workload identities \
                         spiffe://{td}/ns/<namespace>/sa/<service account>"
                    ),
                ));
            }
            return Ok((id, AuthMethod::Certificate));
        }
        let Some(header) = authorization else {
            return Err(Refusal::new(
                Code::Unauthenticated,
                "no_credentials",
                "present a client certificate of the mesh (renewal) or \
                 `authorization: Bearer <workload token>` (first certificate)",
            ));
        };
        let token = bearer_token(header)
            .map_err(|e| Refusal::new(Code::Unauthenticated, "bad_token", e.to_string()))?;
        let Some(tokens) = &self.inner.tokens else {
            return Err(Refusal::new(
                Code::Unauthenticated,
                "bad_token",
                "this CA accepts no workload tokens; renew with a client certificate",
            ));
        };
        let claims = tokens.verify(token, now).map_err(|e| {
            Refusal::new(
                Code::Unauthenticated,
                "bad_token",
                format!("workload token refused: {e}"),
            )
        })?;
        let id = claims.spiffe_id(td).map_err(|e| {
            Refusal::new(
                Code::Unauthenticated,
                "bad_token",
                format!("workload token refused: {e}"),
            )
        })?;
        tracing::debug!(workload = %claims.workload, %id, "workload token accepted");
        Ok((id, AuthMethod::Token))
    }

    /// Signs `csr_pem` for `allowed` (the authenticated identity), if the
    /// CSR asks for exactly that identity.
    pub fn sign(
        &self,
        allowed: &SpiffeId,
        csr_pem: &str,
        validity_secs: i64,
        now: OffsetDateTime,
    ) -> Result<Signed, Refusal> {
        let csr = Csr::from_pem(csr_pem.as_bytes())
            .map_err(|e| Refusal::new(Code::InvalidArgument, "bad_csr", e.to_string()))?;
        check_sans(csr.sans(), allowed)?;
        let ttl = self.inner.ttl.effective(validity_secs);
        let authority = self.authority();
        let policy = OnlyIdentity(Entitled {
            identities: BTreeSet::from([allowed.clone()]),
            max_ttl: Some(self.inner.ttl.max),
        });
        let issued = authority
            .issue_leaf(&csr, ttl, &policy, now)
            .map_err(|e| issue_refusal(&e))?;
        let mut cert_chain = vec![issued.pem()];
        cert_chain.extend(
            authority
                .chain()
                .iter()
                .map(|der| strait_ca::pemfile::encode(strait_ca::pemfile::CERTIFICATE, der)),
        );
        Ok(Signed {
            spiffe_id: allowed.clone(),
            not_after: issued.not_after,
            cert_chain,
        })
    }

    async fn handle(
        &self,
        req: &Request<IstioCertificateRequest>,
        now: OffsetDateTime,
    ) -> Result<(Signed, AuthMethod), Refusal> {
        let certs = req.peer_certs();
        let certs = certs.as_deref().map(Vec::as_slice);
        let authorization = req.metadata().get("authorization").map(|v| v.as_bytes());
        let (id, method) = match self.kube_token(certs, authorization) {
            Some((reviewers, token)) => {
                let cluster = req
                    .metadata()
                    .get(review::CLUSTER_ID)
                    .and_then(|v| v.to_str().ok());
                let id = reviewers
                    .review(&self.inner.trust_domain, cluster, token)
                    .await?;
                (id, AuthMethod::KubernetesToken)
            }
            None => self.authenticate(certs, authorization, now)?,
        };
        let body = req.get_ref();
        let signed = self.sign(&id, &body.csr, body.validity_duration, now)?;
        Ok((signed, method))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for WorkloadCa {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let peer = req.remote_addr();
        let result = self.handle(&req, OffsetDateTime::now_utc()).await;
        let metrics = &self.inner.metrics;
        metrics
            .issue_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((signed, method)) => {
                metrics
                    .issued
                    .get_or_create(&MethodLabel {
                        auth: method.label(),
                    })
                    .inc();
                tracing::info!(
                    peer = ?peer,
                    id = %signed.spiffe_id,
                    auth = method.label(),
                    not_after = %signed.not_after,
                    "workload certificate issued"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: signed.cert_chain,
                }))
            }
            Err(refusal) => {
                metrics
                    .refused
                    .get_or_create(&ReasonLabel {
                        reason: refusal.reason,
                    })
                    .inc();
                tracing::info!(
                    peer = ?peer,
                    reason = refusal.reason,
                    error = %refusal.message,
                    "certificate request refused"
                );
                Err(refusal.status())
            }
        }
    }
}

/// The audience of the Kubernetes service-account tokens the CA accepts
/// (Istio's: proxies mount a projected token for it).
pub const KUBE_AUDIENCE: &str = "istio-ca";

/// A TokenReview's username that names no service account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user {username:?} is not a service account (system:serviceaccount:<namespace>:<name>)")]
pub struct NotServiceAccount {
    pub username: String,
}

/// The namespace and service account of a TokenReview's username,
/// `system:serviceaccount:<namespace>:<name>`.
pub fn service_account_of(username: &str) -> Result<(&str, &str), NotServiceAccount> {
    let bad = || NotServiceAccount {
        username: username.to_string(),
    };
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(bad)?;
    match rest.split_once(':') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => Ok((ns, sa)),
        _ => Err(bad()),
    }
}

/// Why an `authorization` header carries no bearer token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("the authorization header is not text")]
    NotText(#[source] std::str::Utf8Error),
    #[error("the authorization header must be `Bearer <workload token>`")]
    Shape,
    #[error("the authorization scheme must be Bearer, not {scheme:?}")]
    Scheme { scheme: String },
}

/// The token of an `authorization: Bearer <token>` value.
pub fn bearer_token(header: &[u8]) -> Result<&str, BearerError> {
    let value = std::str::from_utf8(header).map_err(BearerError::NotText)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(BearerError::Shape)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(BearerError::Scheme {
            scheme: scheme.to_string(),
        });
    }
    // `value` was trimmed, so what follows the space is not empty.
    Ok(token.trim_start())
}

/// The CSR must ask for `allowed` as its one URI SAN, and nothing else.
fn check_sans(sans: &strait_ca::cert::Sans, allowed: &SpiffeId) -> Result<(), Refusal> {
    let denied = |asked: String| {
        Refusal::new(
            Code::PermissionDenied,
            "wrong_identity",
            format!("the CSR asks for {asked}; this caller may only get {allowed}"),
        )
    };
    match sans.uris.as_slice() {
        [one] if one == allowed.as_str() => {}
        [] => return Err(denied("no URI SAN".into())),
        uris => return Err(denied(format!("URI SANs {}", uris.join(", ")))),
    }
    let others: Vec<&str> = sans
        .dns
        .iter()
        .chain(&sans.ips)
        .chain(&sans.other)
        .map(String::as_str)
        .collect();
    if !others.is_empty() {
        return Err(denied(format!("{allowed} and also {}", others.join(", "))));
    }
    Ok(())
}

/// Exactly one identity and no DNS names: a workload gets its SPIFFE ID
/// and nothing a hostname-verifying client would trust.
struct OnlyIdentity(Entitled);

impl SigningPolicy for OnlyIdentity {
    fn authorize(&self, request: &LeafRequest<'_>) -> Result<(), PolicyError> {
        self.0.authorize(request)?;
        if !request.dns_names.is_empty() {
            return Err(PolicyError::NotEntitled {
                id: request.spiffe_id.clone(),
                reason: format!(
                    "workloads get no DNS names (asked for {})",
                    request.dns_names.join(", ")
                ),
            });
        }
        Ok(())
    }
}

fn issue_refusal(e: &IssueError) -> Refusal {
    match e {
        IssueError::Csr(_) => Refusal::new(Code::InvalidArgument, "bad_csr", e.to_string()),
        IssueError::Policy(
            PolicyError::NotEntitled { .. } | PolicyError::ForeignTrustDomain { .. },
        ) => Refusal::new(Code::PermissionDenied, "wrong_identity", e.to_string()),
        IssueError::Policy(_) => Refusal::new(Code::InvalidArgument, "bad_csr", e.to_string()),
        IssueError::CaNotValid { .. } => Refusal::new(
            Code::Unavailable,
            "ca_not_valid",
            format!("the cluster intermediate cannot sign now: {e}"),
        ),
        _ => Refusal::new(Code::Internal, "signing_failed", e.to_string()),
    }
}

mod review;
#[cfg(test)]
mod tests;
