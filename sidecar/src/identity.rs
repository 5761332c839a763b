//! The workload's identity: a key made here, a certificate from the control
//! plane's CSR API (Istio's `IstioCertificateService`), renewed at half
//! life by one task. The first request carries the bootstrap token; later
//! ones authenticate with the current certificate. A renewal failure keeps
//! the current certificate (retried with backoff) until it expires.

use std::sync::Arc;
use std::time::Duration;

use strait_ca::authority::{self, KeyAlgorithm};
use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust};
use strait_ca::{SpiffeId, TrustBundle, TrustDomain};
use strait_proto::istio::v1::auth::IstioCertificateRequest;
use strait_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;

/// A certificate chain (leaf first) and its PKCS#8 key.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Leaf first, then intermediates (no root), DER.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
    /// The leaf's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The leaf's validity.
    pub not_before: OffsetDateTime,
    /// The leaf's expiry.
    pub not_after: OffsetDateTime,
}

impl Identity {
    /// SHA-256 (hex) of the leaf, for XFCC's `Hash` and logs.
    pub fn leaf_sha256(&self) -> String {
        self.chain_der
            .first()
            .map(|d| strait_ca::tls::sha256_hex(d))
            .unwrap_or_default()
    }
}

/// The control plane's identity, which the sidecar requires of it.
pub fn control_plane_id(td: &TrustDomain) -> Result<SpiffeId, String> {
    SpiffeId::from_segments(td, &["ns", "strait-system", "sa", "controlplane"])
        .map_err(|e| e.to_string())
}

/// How to reach the CSR API.
#[derive(Clone)]
pub struct CsrClientConfig {
    /// The control plane, `host:port`.
    pub address: String,
    /// The mesh roots (to verify the control plane).
    pub bundle: TrustBundle,
    /// The identity to ask for.
    pub spiffe_id: SpiffeId,
    /// The bootstrap token.
    pub token: String,
    /// Requested lifetime.
    pub ttl: Duration,
}

/// A TLS client config for the control plane: its identity verified
/// against the bundle, with `client` as the client certificate if given.
pub fn control_plane_tls(
    bundle: &TrustBundle,
    client: Option<&Identity>,
) -> Result<rustls::ClientConfig, String> {
    let td = bundle
        .trust_domain()
        .cloned()
        .ok_or("the root bundle names no trust domain")?;
    control_plane_tls_with(&Trust::new(bundle.clone()), &td, client)
}

/// [`control_plane_tls`] verifying with `trust` (shared: it follows bundle
/// updates) for the control plane of trust domain `td`.
pub fn control_plane_tls_with(
    trust: &Trust,
    td: &strait_ca::TrustDomain,
    client: Option<&Identity>,
) -> Result<rustls::ClientConfig, String> {
    let verifier =
        SpiffeServerVerifier::new(trust.clone(), Accept::Ids([control_plane_id(td)?].into()));
    strait_ca::tls::client_config(
        verifier,
        client.map(|i| (i.chain_der.as_slice(), i.key_pkcs8.as_slice())),
        &[b"h2"],
    )
    .map_err(|e| e.to_string())
}

/// One CSR round trip: a new key, its CSR, the signed chain.
pub async fn request(
    cfg: &CsrClientConfig,
    current: Option<&Identity>,
) -> Result<Identity, String> {
    let key = authority::generate_key(KeyAlgorithm::EcdsaP256).map_err(|e| e.to_string())?;
    let csr = authority::leaf_csr(&cfg.spiffe_id, &[], &key).map_err(|e| e.to_string())?;
    let tls = control_plane_tls(&cfg.bundle, current)?;
    let channel = strait_broker::transport::channel_to(
        &cfg.address,
        strait_ca::tls::CONTROL_PLANE_SERVER_NAME,
        Arc::new(tls),
    )?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: i64::try_from(cfg.ttl.as_secs()).unwrap_or(i64::MAX),
        metadata: None,
    });
    if current.is_none() {
        let value = format!("Bearer {}", cfg.token.trim())
            .parse()
            .map_err(|_| "the token is not a valid header value".to_string())?;
        req.metadata_mut().insert("authorization", value);
    }
    let resp = client
        .create_certificate(req)
        .await
        .map_err(|s| format!("control plane {}: {}", cfg.address, s.message()))?
        .into_inner();
    let mut chain = Vec::new();
    for pem in &resp.cert_chain {
        let certs = strait_ca::pemfile::parse_certificates(pem.as_bytes())
            .map_err(|e| format!("the control plane sent a bad certificate: {e}"))?;
        chain.extend(certs);
    }
    let chain = presented_chain(chain);
    let leaf = chain
        .first()
        .ok_or("the control plane sent no certificate")?;
    let summary = strait_ca::cert::CertSummary::from_der(leaf).map_err(|e| e.to_string())?;
    let got = summary.spiffe_id.clone().unwrap_or_default();
    if got != cfg.spiffe_id.as_str() {
        return Err(format!(
            "the control plane issued {got:?}, not the requested {}",
            cfg.spiffe_id
        ));
    }
    let when = |s: &str| {
        OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("certificate time {s:?}: {e}"))
    };
    Ok(Identity {
        not_before: when(&summary.not_before)?,
        not_after: when(&summary.not_after)?,
        chain_der: chain,
        key_pkcs8: key.serialize_der(),
        spiffe_id: cfg.spiffe_id.clone(),
    })
}

/// The chain a workload presents: what the CA sent (leaf first), without
/// a trailing self-signed root (the peer's trust anchor, not sent).
pub fn presented_chain(mut chain: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let self_signed = |der: &[u8]| {
        strait_ca::cert::CertSummary::from_der(der).is_ok_and(|c| c.is_ca && c.subject == c.issuer)
    };
    if chain.len() > 1 && chain.last().is_some_and(|d| self_signed(d)) {
        chain.pop();
    }
    chain
}

/// When to renew: half way through the certificate's life.
pub fn renew_at(id: &Identity) -> OffsetDateTime {
    id.not_before + (id.not_after - id.not_before) / 2
}

/// Gets a first identity, then renews it at half life until the receiver
/// side is gone. The channel holds `None` until the first certificate.
pub fn spawn(cfg: CsrClientConfig) -> watch::Receiver<Option<Arc<Identity>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        let mut current: Option<Arc<Identity>> = None;
        loop {
            if let Some(id) = &current {
                let wait = (renew_at(id) - OffsetDateTime::now_utc())
                    .try_into()
                    .unwrap_or(Duration::ZERO);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return,
                }
            }
            match request(&cfg, current.as_deref()).await {
                Ok(id) => {
                    tracing::info!(
                        id = %id.spiffe_id,
                        not_after = %id.not_after.format(&Rfc3339).unwrap_or_default(),
                        "workload certificate {}",
                        if current.is_some() { "renewed" } else { "issued" }
                    );
                    let id = Arc::new(id);
                    current = Some(id.clone());
                    backoff = Duration::from_millis(200);
                    if tx.send(Some(id)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "certificate request failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    // An expired certificate cannot renew itself: start over
                    // with the token.
                    if current
                        .as_ref()
                        .is_some_and(|c| c.not_after <= OffsetDateTime::now_utc())
                    {
                        current = None;
                    }
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_a_trailing_root_is_dropped_from_the_chain() {
        let pki = strait_ca::testing::TestPki::new("cluster.local");
        let chain = pki.leaf_chain("spiffe://cluster.local/ns/demo/sa/echo");
        let root = pki.root.root_der().to_vec();
        let with_root = [chain.clone(), vec![root.clone()]].concat();
        assert_eq!(presented_chain(with_root), chain);
        assert_eq!(presented_chain(chain.clone()), chain);
        assert_eq!(
            presented_chain(vec![chain[0].clone()]),
            vec![chain[0].clone()]
        );
        // A lone root stays (nothing else to present), garbage is kept as is.
        assert_eq!(presented_chain(vec![root.clone()]), vec![root]);
        let junk = vec![chain[0].clone(), b"not DER".to_vec()];
        assert_eq!(presented_chain(junk.clone()), junk);
    }

    #[test]
    fn renewal_is_due_at_half_life() {
        let nb = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let id = Identity {
            chain_der: vec![b"leaf".to_vec()],
            key_pkcs8: vec![],
            spiffe_id: SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            not_before: nb,
            not_after: nb + time::Duration::hours(24),
        };
        assert_eq!(renew_at(&id), nb + time::Duration::hours(12));
        assert_eq!(id.leaf_sha256(), strait_ca::tls::sha256_hex(b"leaf"));
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(
            control_plane_id(&td).unwrap().as_str(),
            "spiffe://cluster.local/ns/strait-system/sa/controlplane"
        );
    }
}
