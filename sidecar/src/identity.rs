//! The workload's identity as the data path uses it (the one [`Identity`]
//! type, the proxy client's), and TLS towards the control plane. Getting
//! and renewing it is the control plane client's
//! (`strait_proxy_client::identity::IdentityManager`, one task per
//! process: a key made here, Istio's CSR API, the bootstrap token first,
//! renewal at about half life with jitter, the CA verified with the trust
//! that follows the pushed bundles through root rotations).

use strait_ca::TrustBundle;
use strait_ca::tls::{Accept, SpiffeServerVerifier, Trust};

pub use strait_ca::control_plane_id;
pub use strait_proxy_client::identity::Identity;

/// Why no TLS client config for the control plane could be made.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneTlsError {
    /// The bundle says no trust domain, so the control plane's identity
    /// is unknown.
    #[error("the root bundle names no trust domain")]
    NoTrustDomain,
    /// rustls refused the config (the client certificate or key).
    #[error("{0}")]
    Config(#[from] rustls::Error),
}

/// A TLS client config for the control plane: its identity verified
/// against the bundle, with `client` as the client certificate if given.
pub fn control_plane_tls(
    bundle: &TrustBundle,
    client: Option<&Identity>,
) -> Result<rustls::ClientConfig, ControlPlaneTlsError> {
    let td = bundle
        .trust_domain()
        .cloned()
        .ok_or(ControlPlaneTlsError::NoTrustDomain)?;
    control_plane_tls_with(&Trust::new(bundle.clone()), &td, client)
}

/// [`control_plane_tls`] verifying with `trust` (shared: it follows bundle
/// updates) for the control plane of trust domain `td`.
pub fn control_plane_tls_with(
    trust: &Trust,
    td: &strait_ca::TrustDomain,
    client: Option<&Identity>,
) -> Result<rustls::ClientConfig, ControlPlaneTlsError> {
    let verifier =
        SpiffeServerVerifier::new(trust.clone(), Accept::Ids([control_plane_id(td)].into()));
    strait_ca::tls::client_config(
        verifier,
        client.map(|i| (i.chain_der.as_slice(), i.key_pkcs8.as_slice())),
        &[b"h2"],
    )
    .map_err(ControlPlaneTlsError::Config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use strait_ca::{SpiffeId, TrustDomain};
    use time::OffsetDateTime;

    #[test]
    fn the_leaf_hash_and_the_control_planes_identity() {
        let id = Identity {
            chain_der: vec![b"leaf".to_vec()],
            key_pkcs8: vec![],
            spiffe_id: SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            received: OffsetDateTime::from_unix_timestamp(0).unwrap(),
            not_after: OffsetDateTime::from_unix_timestamp(1_000_000).unwrap(),
        };
        assert_eq!(id.leaf_sha256(), strait_ca::tls::sha256_hex(b"leaf"));
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(
            control_plane_id(&td).as_str(),
            "spiffe://cluster.local/ns/strait-system/sa/controlplane"
        );
    }
}
