//! Test helpers for this and other crates (feature `testing`): a ready-made
//! root → cluster intermediate PKI and leaves issued from it. Panics on
//! failure, as test helpers do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use time::OffsetDateTime;

use crate::authority::{
    Authority, DEFAULT_INTERMEDIATE_VALIDITY, DEFAULT_LEAF_TTL, DEFAULT_ROOT_VALIDITY,
    KeyAlgorithm, RootOptions, generate_key, intermediate_csr, leaf_csr,
};
use crate::bundle::TrustBundle;
use crate::csr::Csr;
use crate::policy::AnyIdentityInTrustDomain;
use crate::spiffe::{ClusterName, SpiffeId, TrustDomain};

/// A root and one cluster intermediate (cluster `test`) of a trust domain.
pub struct TestPki {
    pub root: Authority,
    pub intermediate: Authority,
}

impl TestPki {
    pub fn new(trust_domain: &str) -> Self {
        Self::with_cluster(trust_domain, "test")
    }

    pub fn with_cluster(trust_domain: &str, cluster: &str) -> Self {
        let td = TrustDomain::new(trust_domain).expect("valid trust domain");
        let now = OffsetDateTime::now_utc();
        let root = Authority::create_root(
            &RootOptions {
                trust_domain: td.clone(),
                common_name: None,
                validity: DEFAULT_ROOT_VALIDITY,
                key_algorithm: KeyAlgorithm::EcdsaP256,
            },
            now,
        )
        .unwrap();
        let intermediate = intermediate_of(&root, cluster, now);
        TestPki { root, intermediate }
    }

    /// Another cluster of the same trust domain: the same root, a new
    /// intermediate for `cluster` (as two clusters of one mesh have).
    pub fn sibling(&self, cluster: &str) -> Self {
        let key = crate::pemfile::parse_private_key(self.root.key_pem().as_bytes()).unwrap();
        let root = Authority::from_der(self.root.chain().to_vec(), key, None).unwrap();
        let intermediate = intermediate_of(&root, cluster, OffsetDateTime::now_utc());
        TestPki { root, intermediate }
    }

    /// The bundle holding this PKI's root.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(
            Some(self.root.trust_domain().clone()),
            vec![self.root.root_der().to_vec()],
        )
        .unwrap()
    }

    /// A leaf for `id` from the intermediate: `(DER, key PEM)`.
    pub fn leaf(&self, id: &str) -> (Vec<u8>, String) {
        let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
        let id = SpiffeId::parse(id).unwrap();
        let csr = Csr::from_pem(leaf_csr(&id, &[], &key).unwrap().as_bytes()).unwrap();
        let issued = self
            .intermediate
            .issue_leaf(
                &csr,
                DEFAULT_LEAF_TTL,
                &AnyIdentityInTrustDomain,
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        (issued.der, key.serialize_pem())
    }

    /// `[leaf, intermediate]`, as a workload presents it.
    pub fn leaf_chain(&self, id: &str) -> Vec<Vec<u8>> {
        let (leaf, _) = self.leaf(id);
        vec![leaf, self.intermediate.certificate_der().to_vec()]
    }
}

/// A cluster intermediate issued by `root` at `now` (key made here).
pub fn intermediate_of(root: &Authority, cluster: &str, now: OffsetDateTime) -> Authority {
    let cluster = ClusterName::new(cluster).unwrap();
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = Csr::from_pem(intermediate_csr(&cluster, &key).unwrap().as_bytes()).unwrap();
    let cert = root
        .issue_intermediate(&csr, &cluster, DEFAULT_INTERMEDIATE_VALIDITY, now)
        .unwrap();
    let mut chain = vec![cert.der];
    chain.extend(root.chain().iter().cloned());
    Authority::from_der(chain, key, None).unwrap()
}
