//! The proxies' side of the workload CA: make a key here, send a CSR,
//! check what comes back, and keep the certificate renewed.
//!
//! One task per process owns the identity ([`IdentityManager`]): it asks
//! with the bootstrap token first, then renews at about half life with the
//! current certificate as TLS client authentication, backs off (with
//! jitter) when the control plane is away, keeps the old certificate until
//! it expires, and publishes every new one through a `watch` channel. The
//! private key never leaves the process: only the CSR is sent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use strait_ca::SpiffeId;
use strait_ca::authority::{self, KeyAlgorithm};
use strait_ca::pemfile::PemError;
use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust, TrustError};
use strait_proto::istio::v1::auth::IstioCertificateRequest;
use strait_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use crate::xds::TlsConfigError;

/// How long one certificate request may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest chain accepted from the CA.
pub const MAX_CHAIN_LEN: usize = 8;

/// A workload's certificate and key.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The leaf first, then its intermediates (the bundle root left out).
    pub chain_der: Vec<Vec<u8>>,
    /// The private key, PKCS#8 DER. Made in this process; never sent.
    pub key_pkcs8: Vec<u8>,
    pub spiffe_id: SpiffeId,
    /// When this process received the certificate (renewal is planned from
    /// here, not from the backdated `notBefore`).
    pub received: OffsetDateTime,
    /// When the chain stops verifying (the earliest `notAfter` on it).
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &self.chain_der.len())
            .field("received", &self.received)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// True while the certificate is still valid at `now`.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        now < self.not_after
    }

    /// `(chain, key)` as `strait_ca::tls::{server_config, client_config}`
    /// take them.
    pub fn pair(&self) -> (&[Vec<u8>], &[u8]) {
        (&self.chain_der, &self.key_pkcs8)
    }

    /// SHA-256 (hex) of the leaf, for XFCC's `Hash` and logs.
    pub fn leaf_sha256(&self) -> String {
        self.chain_der
            .first()
            .map(|d| strait_ca::tls::sha256_hex(d))
            .unwrap_or_default()
    }
}

/// Builds the TLS client config for a request to the CA: server
/// verification, and the client certificate when one is given (renewal).
pub type ClientTls =
    Arc<dyn Fn(Option<&Identity>) -> Result<rustls::ClientConfig, TlsConfigError> + Send + Sync>;

pub use strait_ca::control_plane_id;

/// The usual [`ClientTls`]: the server must present `server_id` under
/// `trust`; ALPN h2.
pub fn mesh_client_tls(trust: Trust, server_id: SpiffeId) -> ClientTls {
    Arc::new(move |identity: Option<&Identity>| {
        let verifier = SpiffeServerVerifier::new(
            trust.clone(),
            Accept::Ids(BTreeSet::from([server_id.clone()])),
        );
        strait_ca::tls::client_config(verifier, identity.map(Identity::pair), &[b"h2"])
            .map_err(Into::into)
    })
}

/// How the request proves who is asking.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// A bootstrap token, sent as `authorization: Bearer <token>`.
    Token(&'a str),
    /// The current certificate, as TLS client authentication.
    Certificate(&'a Identity),
}

impl Credential<'_> {
    fn label(&self) -> &'static str {
        match self {
            Credential::Token(_) => "token",
            Credential::Certificate(_) => "certificate",
        }
    }
}

/// Why a certificate request failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key or CSR generation failed: {0}")]
    Key(String),
    #[error("TLS client configuration: {0}")]
    Tls(#[source] TlsConfigError),
    #[error("workload token cannot be sent as metadata: {0}")]
    Token(String),
    #[error("CA at {address}: {message}")]
    Unreachable { address: String, message: String },
    #[error("CA at {address} refused the request ({code:?}): {message}")]
    Refused {
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("CA at {address} answered with a bad certificate chain: {source}")]
    BadResponse {
        address: String,
        #[source]
        source: ResponseError,
    },
    #[error("no credential to ask with: no valid certificate and no bootstrap token")]
    NoCredential,
}

/// What is wrong with the CA's answer ([`check_response`]).
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    /// The chain entry at this 1-based position.
    #[error("entry #{index}: {source}")]
    Pem {
        index: usize,
        #[source]
        source: PemError,
    },
    #[error("more than {MAX_CHAIN_LEN} certificates in the chain")]
    TooLong,
    #[error("no certificate in the answer")]
    Empty,
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error("the certificate is for {got}, but {asked} was asked for")]
    WrongId { got: SpiffeId, asked: SpiffeId },
    #[error("our own key does not load: {0}")]
    OwnKey(#[source] rustls::Error),
    #[error("the certificate does not carry the key we sent: {0}")]
    KeyMismatch(#[source] rustls::Error),
}

impl IdentityError {
    /// True when the CA refused who we are (the credential is no good), as
    /// opposed to being away or broken.
    pub fn is_auth_refusal(&self) -> bool {
        matches!(
            self,
            IdentityError::Refused {
                code: tonic::Code::Unauthenticated | tonic::Code::PermissionDenied,
                ..
            }
        )
    }
}

/// Asks the CA at `address` once for a certificate for `id`, with a key
/// made here. The answer must verify under `trust`, name `id` and carry our
/// public key.
pub async fn request_certificate(
    address: &str,
    tls: &ClientTls,
    trust: &Trust,
    id: &SpiffeId,
    credential: Credential<'_>,
    ttl: Option<Duration>,
) -> Result<Identity, IdentityError> {
    let key = authority::generate_key(KeyAlgorithm::EcdsaP256)
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    let csr = authority::leaf_csr(id, &[], &key).map_err(|e| IdentityError::Key(e.to_string()))?;
    let key_pkcs8 = key.serialize_der();

    let client_identity = match credential {
        Credential::Certificate(current) => Some(current),
        Credential::Token(_) => None,
    };
    let config = tls(client_identity).map_err(IdentityError::Tls)?;
    let unreachable = |message: String| IdentityError::Unreachable {
        address: address.to_string(),
        message,
    };
    let channel = strait_runtime::transport::channel_to(
        address,
        strait_ca::tls::CONTROL_PLANE_SERVER_NAME,
        Arc::new(config),
    )
    .map_err(|e| unreachable(e.to_string()))?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
        metadata: None,
    });
    if let Credential::Token(token) = credential {
        let value = format!("Bearer {}", token.trim()).parse().map_err(
            |e: tonic::metadata::errors::InvalidMetadataValue| IdentityError::Token(e.to_string()),
        )?;
        request.metadata_mut().insert("authorization", value);
    }
    request.set_timeout(REQUEST_TIMEOUT);
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.create_certificate(request))
        .await
        .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
                unreachable(status.message().to_string())
            }
            code => IdentityError::Refused {
                address: address.to_string(),
                code,
                message: status.message().to_string(),
            },
        })?;
    check_response(
        &response.into_inner().cert_chain,
        key_pkcs8,
        trust,
        id,
        OffsetDateTime::now_utc(),
    )
    .map_err(|source| IdentityError::BadResponse {
        address: address.to_string(),
        source,
    })
}

/// Checks the CA's answer (PEM chain, leaf first) against what we asked
/// for and the key we hold, and makes it an [`Identity`].
pub fn check_response(
    cert_chain: &[String],
    key_pkcs8: Vec<u8>,
    trust: &Trust,
    id: &SpiffeId,
    now: OffsetDateTime,
) -> Result<Identity, ResponseError> {
    let mut chain = Vec::new();
    for (i, pem) in cert_chain.iter().enumerate() {
        let certs = strait_ca::pemfile::parse_certificates(pem.as_bytes()).map_err(|source| {
            ResponseError::Pem {
                index: i + 1,
                source,
            }
        })?;
        chain.extend(certs);
        if chain.len() > MAX_CHAIN_LEN {
            return Err(ResponseError::TooLong);
        }
    }
    if chain.is_empty() {
        return Err(ResponseError::Empty);
    }
    let svid = trust.verify(&chain, now)?;
    if &svid.spiffe_id != id {
        return Err(ResponseError::WrongId {
            got: svid.spiffe_id,
            asked: id.clone(),
        });
    }
    let provider = strait_ca::tls::provider();
    let signing_key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key_pkcs8.clone(),
        )))
        .map_err(ResponseError::OwnKey)?;
    let leaf = vec![CertificateDer::from(chain[0].clone())];
    rustls::sign::CertifiedKey::new(leaf, signing_key)
        .keys_match()
        .map_err(ResponseError::KeyMismatch)?;
    let chain_der: Vec<Vec<u8>> = chain.into_iter().filter(|c| *c != svid.root).collect();
    Ok(Identity {
        chain_der,
        key_pkcs8,
        spiffe_id: svid.spiffe_id,
        received: now,
        not_after: svid.expires,
    })
}

/// Retry pacing when a request fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

/// When to renew: at 40–50 % of the life left when the certificate
/// arrived (`jitter` in `[0, 1)` spreads renewals of many proxies).
pub fn renewal_delay(identity: &Identity, jitter: f64) -> Duration {
    let life = duration_between(identity.received, identity.not_after);
    life.mul_f64(0.5 - 0.1 * jitter.clamp(0.0, 1.0))
}

/// How long to wait after `failures` failed attempts in a row: doubling
/// from `initial` up to `max`, minus up to 20 % jitter, and (while a
/// certificate is still valid) at most half the time it has left, so that
/// several tries fit before it expires.
pub fn retry_delay(
    backoff: &Backoff,
    failures: u32,
    valid_for: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exp = backoff
        .initial
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
        .min(backoff.max);
    let delay = exp.mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0));
    match valid_for {
        Some(left) => delay.min((left / 2).max(Duration::from_millis(100))),
        None => delay,
    }
}

fn duration_between(from: OffsetDateTime, to: OffsetDateTime) -> Duration {
    Duration::try_from(to - from).unwrap_or(Duration::ZERO)
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    match SystemRandom::new().fill(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

/// What the identity task needs.
#[derive(Clone)]
pub struct IdentityConfig {
    /// The control plane's CA address, `host:port`.
    pub address: String,
    /// The identity to ask for.
    pub spiffe_id: SpiffeId,
    /// The mesh trust: verifies the CA's answers.
    pub trust: Trust,
    /// TLS towards the CA (see [`mesh_client_tls`]).
    pub tls: ClientTls,
    /// The bootstrap token for the first certificate (and when the current
    /// one has expired or is refused).
    pub token: Option<String>,
    /// A file to read the token from again at every use (a Kubernetes
    /// projected service account token is replaced before it expires, so
    /// the one read at start may be stale when it is needed again); `token`
    /// stands in when the file cannot be read.
    pub token_file: Option<std::path::PathBuf>,
    /// The TTL to ask for (`None`: the CA's default).
    pub ttl: Option<Duration>,
    pub backoff: Backoff,
}

impl std::fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("address", &self.address)
            .field("spiffe_id", &self.spiffe_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ttl", &self.ttl)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl IdentityConfig {
    /// A config with the usual TLS (the CA serves as the control plane's
    /// identity in `spiffe_id`'s trust domain) and default pacing.
    pub fn new(address: &str, spiffe_id: SpiffeId, trust: Trust, token: Option<String>) -> Self {
        let server = control_plane_id(&spiffe_id.trust_domain());
        IdentityConfig {
            address: address.to_string(),
            tls: mesh_client_tls(trust.clone(), server),
            spiffe_id,
            trust,
            token,
            token_file: None,
            ttl: None,
            backoff: Backoff::default(),
        }
    }
}

/// The identity of this process, kept current by one task.
#[derive(Debug)]
pub struct IdentityManager {
    rx: watch::Receiver<Option<Arc<Identity>>>,
    task: JoinHandle<()>,
}

impl IdentityManager {
    /// Starts the task. It stops when the manager is dropped.
    pub fn spawn(config: IdentityConfig) -> Self {
        let (tx, rx) = watch::channel(None);
        let span = tracing::info_span!("identity", id = %config.spiffe_id, ca = %config.address);
        let task = tokio::spawn(run(config, tx).instrument(span));
        IdentityManager { rx, task }
    }

    /// The current identity (`None` until the first certificate, and after
    /// one expired without renewal), and every change to it.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Identity>>> {
        self.rx.clone()
    }

    /// The current identity, if any.
    pub fn current(&self) -> Option<Arc<Identity>> {
        self.rx.borrow().clone()
    }
}

impl Drop for IdentityManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The token in `path`, or `None` (logged) when it cannot be read.
fn read_token(path: &std::path::Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
        Ok(_) => {
            tracing::warn!(file = %path.display(), "the token file is empty");
            None
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "the token file cannot be read");
            None
        }
    }
}

async fn run(config: IdentityConfig, tx: watch::Sender<Option<Arc<Identity>>>) {
    let mut current: Option<Arc<Identity>> = None;
    let mut failures: u32 = 0;
    // Set when the CA refused our certificate: the next try uses the token.
    let mut token_next = false;
    loop {
        let now = OffsetDateTime::now_utc();
        if current.as_ref().is_some_and(|c| !c.is_valid_at(now)) {
            tracing::warn!("certificate expired before it could be renewed");
            current = None;
            tx.send_replace(None);
        }
        let wants_token = token_next || current.is_none();
        let file_token = match &config.token_file {
            Some(path) if wants_token => read_token(path),
            _ => None,
        };
        let token = file_token.as_deref().or(config.token.as_deref());
        let credential = match (&current, token) {
            (_, Some(t)) if wants_token => Credential::Token(t),
            (Some(c), _) => Credential::Certificate(c),
            (None, _) => {
                tracing::error!(error = %IdentityError::NoCredential, "identity task stops");
                return;
            }
        };
        let method = credential.label();
        let attempt = request_certificate(
            &config.address,
            &config.tls,
            &config.trust,
            &config.spiffe_id,
            credential,
            config.ttl,
        );
        let result = tokio::select! {
            r = attempt => r,
            () = tx.closed() => return,
        };
        let delay = match result {
            Ok(identity) => {
                failures = 0;
                token_next = false;
                let delay = renewal_delay(&identity, jitter());
                tracing::info!(
                    auth = method,
                    not_after = %identity.not_after,
                    renew_in = ?delay,
                    "workload certificate received"
                );
                let identity = Arc::new(identity);
                current = Some(identity.clone());
                tx.send_replace(Some(identity));
                delay
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                // A refused certificate makes the token the next try (and
                // a refused token the certificate again, while it lasts).
                if e.is_auth_refusal() {
                    token_next = method == "certificate" && config.token.is_some();
                }
                let now = OffsetDateTime::now_utc();
                let valid_for = current.as_ref().map(|c| duration_between(now, c.not_after));
                let delay = retry_delay(&config.backoff, failures, valid_for, jitter());
                tracing::warn!(
                    error = %e,
                    auth = method,
                    failures,
                    retry_in = ?delay,
                    "certificate request failed; keeping the current certificate"
                );
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_ca::TrustDomain;

    fn identity(received: i64, not_after: i64) -> Identity {
        let td = TrustDomain::new("td").unwrap();
        Identity {
            chain_der: vec![],
            key_pkcs8: vec![],
            spiffe_id: SpiffeId::workload(&td, "a", "b").unwrap(),
            received: OffsetDateTime::from_unix_timestamp(received).unwrap(),
            not_after: OffsetDateTime::from_unix_timestamp(not_after).unwrap(),
        }
    }

    #[test]
    fn renews_between_forty_and_fifty_percent_of_life() {
        let id = identity(1000, 2000);
        assert_eq!(renewal_delay(&id, 0.0), Duration::from_secs(500));
        assert_eq!(renewal_delay(&id, 1.0), Duration::from_secs(400));
        assert_eq!(renewal_delay(&id, 7.0), Duration::from_secs(400), "clamped");
        // Already past its expiry: renew at once.
        assert_eq!(renewal_delay(&identity(3000, 2000), 0.5), Duration::ZERO);
    }

    #[test]
    fn retry_backs_off_and_stays_within_validity() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        };
        let cases = [
            // failures, valid_for, jitter, expected
            (1, None, 0.0, Duration::from_secs(1)),
            (2, None, 0.0, Duration::from_secs(2)),
            (3, None, 0.0, Duration::from_secs(4)),
            (10, None, 0.0, Duration::from_secs(30)),
            (u32::MAX, None, 0.0, Duration::from_secs(30)),
            (3, None, 1.0, Duration::from_millis(3200)),
            (
                10,
                Some(Duration::from_secs(20)),
                0.0,
                Duration::from_secs(10),
            ),
            (10, Some(Duration::ZERO), 0.0, Duration::from_millis(100)),
        ];
        for (failures, valid_for, jitter, want) in cases {
            assert_eq!(
                retry_delay(&b, failures, valid_for, jitter),
                want,
                "failures={failures} valid_for={valid_for:?} jitter={jitter}"
            );
        }
    }

    #[test]
    fn jitter_is_a_fraction() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut id = identity(0, 10);
        id.key_pkcs8 = b"SECRETKEY".to_vec();
        assert!(!format!("{id:?}").contains("SECRETKEY"));
        let cfg = IdentityConfig::new(
            "127.0.0.1:1",
            id.spiffe_id.clone(),
            Trust::default(),
            Some("swt1.SECRETTOKEN".into()),
        );
        assert!(!format!("{cfg:?}").contains("SECRETTOKEN"));
    }

    #[test]
    fn auth_refusals_are_told_apart() {
        let refused = |code| IdentityError::Refused {
            address: "x".into(),
            code,
            message: String::new(),
        };
        assert!(refused(tonic::Code::Unauthenticated).is_auth_refusal());
        assert!(refused(tonic::Code::PermissionDenied).is_auth_refusal());
        assert!(!refused(tonic::Code::InvalidArgument).is_auth_refusal());
        assert!(
            !IdentityError::Unreachable {
                address: "x".into(),
                message: String::new()
            }
            .is_auth_refusal()
        );
    }
}
