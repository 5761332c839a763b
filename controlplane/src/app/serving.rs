//! The control plane's own TLS identity and trust while it serves: its
//! serving certificate (swapped without a restart), the intermediate it
//! issues with, and the trust bundles, reloaded when the state directory
//! changes.

use super::*;
pub use strait_runtime::tls::ServingCert;

/// Issues a serving certificate from `authority`.
pub fn issue_serving(authority: &Authority, td: &TrustDomain) -> Result<ServingCert, ServingError> {
    Ok(ServingCert::new(certified_key(authority, td)?))
}

/// Re-issues `serving` from `authority` (renewal, or a new intermediate).
pub fn renew_serving(
    serving: &ServingCert,
    authority: &Authority,
    td: &TrustDomain,
) -> Result<(), ServingError> {
    serving.set(certified_key(authority, td)?);
    Ok(())
}

fn certified_key(
    authority: &Authority,
    td: &TrustDomain,
) -> Result<rustls::sign::CertifiedKey, ServingError> {
    let (chain, key) =
        crate::ca::serving_identity(authority, td, SERVING_TTL).map_err(ServingError::Issue)?;
    let (certs, key) = strait_ca::tls::identity(&chain, &key);
    let signer = strait_ca::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(ServingError::Key)?;
    Ok(rustls::sign::CertifiedKey::new(certs, signer))
}

/// The TLS config of the discovery and CSR port: TLS 1.3, h2, the
/// swappable serving certificate, and client certificates verified when
/// presented but optional (a proxy's first CSR comes with a token instead;
/// discovery refuses a stream without one).
pub fn server_tls(
    cert: Arc<ServingCert>,
    trust: Trust,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let verifier = SpiffeClientVerifier::new(trust, Accept::Any, false);
    let mut config = rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Loads the cluster's intermediate (the plug-in CA directory the broker
/// link keeps current).
pub fn load_authority(state_dir: &Path, td: &TrustDomain) -> Result<Authority, ServingError> {
    let dir = state_dir.join(CACERTS_DIR);
    strait_ca::layout::load_plugin_ca(&dir, Some(td)).map_err(|source| ServingError::Authority {
        dir,
        source: Box::new(source),
    })
}

/// Keeps `trust` (who may call the control plane) current with the roots,
/// peered bundles and deny-list the broker link installs.
pub(super) fn refresh_trust(trust: &Trust, state_dir: &Path, td: &TrustDomain, imports: &Imports) {
    let root = state_dir.join(CACERTS_DIR).join("root-cert.pem");
    match strait_ca::layout::load_bundle(&root, Some(td.clone())) {
        Ok(b) => trust.set_bundle(b),
        Err(e) => tracing::warn!(error = %e, "trust bundle not reloaded"),
    }
    let mut fed = Vec::new();
    if let Ok(rd) = std::fs::read_dir(state_dir.join(FEDERATED_DIR)) {
        for e in rd.flatten() {
            let path = e.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
            else {
                continue;
            };
            if let Ok(ftd) = TrustDomain::new(name)
                && let Ok(b) = strait_ca::layout::load_bundle(&path, Some(ftd))
            {
                fed.push((name.to_string(), b));
            }
        }
    }
    trust.set_federated(fed);
    trust.set_denied(imports.denied_intermediates.iter().cloned());
    trust.set_cluster_identities(imports.cluster_identities.clone());
}

/// Reloads the intermediate after the trust files changed: when it is a
/// new one, the CA signs with it and the serving certificate is re-issued
/// from it.
pub(super) fn reload_authority(
    ca: &crate::ca::WorkloadCa,
    serving: &ServingCert,
    state_dir: &Path,
    td: &TrustDomain,
    renew_at: &mut Instant,
    renew_every: Duration,
) {
    let authority = match load_authority(state_dir, td) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "intermediate not reloaded");
            return;
        }
    };
    if authority.chain() == ca.authority().chain() {
        return;
    }
    tracing::info!("the cluster intermediate changed; signing with the new one");
    if let Err(e) = renew_serving(serving, &authority, td) {
        tracing::error!(error = %e, "serving certificate not re-issued from the new intermediate");
    } else {
        *renew_at = Instant::now() + renew_every;
    }
    if let Err(e) = ca.set_authority(authority) {
        tracing::error!(error = %e, "new intermediate refused");
    }
}
