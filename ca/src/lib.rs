//! strait's certificate authority: SPIFFE identities, keys, CSRs,
//! certificates, signing policy, trust bundles and chain verification, and
//! the on-disk layouts Istio uses. No network code lives here.
//!
//! The hierarchy is root (one per trust domain; two during a rotation) →
//! per-cluster intermediate (pathLen 0, issued from a CSR: the cluster's key
//! never leaves it) → X.509-SVID leaves (24 h by default, issued from CSRs
//! under a [`policy::SigningPolicy`]).
//!
//! ```
//! use strait_ca::{authority::*, csr::Csr, policy::AnyIdentityInTrustDomain, spiffe::*};
//! use strait_ca::{bundle::TrustBundle, verify::verify_svid};
//! let now = time::OffsetDateTime::now_utc();
//! let td = TrustDomain::new("example.org").unwrap();
//! let root = Authority::create_root(&RootOptions {
//!     trust_domain: td.clone(), common_name: None,
//!     validity: DEFAULT_ROOT_VALIDITY, key_algorithm: KeyAlgorithm::EcdsaP256 }, now).unwrap();
//! let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
//! let id = SpiffeId::workload(&td, "shop", "cart").unwrap();
//! let csr = Csr::from_pem(leaf_csr(&id, &[], &key).unwrap().as_bytes()).unwrap();
//! let leaf = root.issue_leaf(&csr, DEFAULT_LEAF_TTL, &AnyIdentityInTrustDomain, now).unwrap();
//! let bundle = TrustBundle::new(Some(td), vec![root.root_der().to_vec()]).unwrap();
//! let svid = verify_svid(&[leaf.der], &bundle, now).unwrap();
//! assert_eq!(svid.spiffe_id, id);
//! ```

pub mod authority;
pub mod bundle;
pub mod cert;
pub mod csr;
pub mod layout;
pub mod live;
pub mod pemfile;
pub mod policy;
pub mod spiffe;
pub mod tls;
pub mod verify;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod pki_tests;

pub use authority::{Authority, IssueError, Issued, KeyAlgorithm};
pub use bundle::TrustBundle;
pub use csr::Csr;
pub use policy::{AnyIdentityInTrustDomain, Entitled, SigningPolicy};
pub use spiffe::{ClusterName, SpiffeId, TrustDomain, control_plane_id};
pub use verify::{VerifiedSvid, VerifyError, verify_svid};
