//! The workload CA of the local control plane.
//!
//! - [`token`]: bootstrap tokens (`swt1.…`) with which a proxy gets its
//!   first certificate.
//! - [`service`]: [`WorkloadCa`], Istio's `IstioCertificateService` signing
//!   workload SVIDs with the cluster intermediate.
//!
//! The proxies' side (the task that gets and renews a proxy's certificate)
//! is `strait_proxy_client::identity`.
//! - [`serving_identity`]: the control plane's own serving certificate.

pub mod service;
pub mod token;

use std::time::Duration;

use strait_ca::authority::{self, IssueError, KeyAlgorithm};
use strait_ca::{AnyIdentityInTrustDomain, Authority, Csr, TrustDomain};
use time::OffsetDateTime;

pub use service::{CaError, TokenReviewers, TtlPolicy, WorkloadCa};
pub use strait_ca::control_plane_id;
pub use token::{Claims, TOKEN_KEY_FILE, TokenError, TokenIssuer, TokenKeyError};

/// Issues the control plane's serving certificate
/// (`spiffe://<td>/ns/strait-system/sa/controlplane`) from the cluster
/// intermediate; the key is made here and never written down. Returns the
/// chain (leaf, intermediate, root) and the PKCS#8 key.
pub fn serving_identity(
    authority: &Authority,
    td: &TrustDomain,
    ttl: Duration,
) -> Result<(Vec<Vec<u8>>, Vec<u8>), IssueError> {
    let id = control_plane_id(td);
    let key = authority::generate_key(KeyAlgorithm::EcdsaP256)?;
    // The DNS name too: the proxies ask for it as the TLS server name, and
    // the API server checks it on the injection webhook.
    let dns = [strait_ca::tls::CONTROL_PLANE_SERVER_NAME.to_string()];
    let csr = Csr::from_pem(authority::leaf_csr(&id, &dns, &key)?.as_bytes())?;
    let issued = authority.issue_leaf(
        &csr,
        ttl,
        &AnyIdentityInTrustDomain,
        OffsetDateTime::now_utc(),
    )?;
    let mut chain = vec![issued.der];
    chain.extend(authority.chain().iter().cloned());
    Ok((chain, key.serialize_der()))
}
