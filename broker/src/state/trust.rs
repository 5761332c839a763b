//! Trust in the broker's state: what each cluster signs with and has
//! acknowledged, intermediate renewal, revocation, and the identities
//! bound to clusters (`--bind-identities-to-clusters`).

use std::collections::{BTreeMap, BTreeSet};

use strait_ca::cert::fingerprint_sha256;
use strait_ca::{ClusterName, Csr};
use time::OffsetDateTime;

use super::{
    BrokerState, ClusterRecord, Inner, META_BIND_IDENTITIES, META_DENIED, Membership, StateError,
    json, put_bundle_version,
};
use crate::store::{Batch, Table};

impl Inner {
    /// What each joined cluster runs, when identities are bound to
    /// clusters (`None` when they are not).
    pub fn cluster_identities(&self) -> Option<BTreeMap<String, BTreeSet<String>>> {
        self.bind_identities.then(|| {
            self.records
                .values()
                .filter(|r| r.membership == Membership::Joined)
                .map(|r| (r.name.clone(), r.service_accounts.clone()))
                .collect()
        })
    }
}

impl BrokerState {
    pub async fn ack(
        &self,
        cluster: &ClusterName,
        import_revision: u64,
        bundle_version: u64,
        intermediate_sha256: &str,
        now: OffsetDateTime,
    ) -> Result<(), StateError> {
        self.write(|inner| {
            let Some(r) = inner.records.get(cluster.as_str()).cloned() else {
                return Err(StateError::UnknownCluster(cluster.to_string()));
            };
            let installed = if intermediate_sha256.is_empty() {
                r.intermediate_installed_sha256.clone()
            } else {
                intermediate_sha256.to_string()
            };
            let installed_unix = if installed == r.intermediate_installed_sha256 {
                r.intermediate_installed_unix
            } else {
                now.unix_timestamp()
            };
            if r.import_revision_acked == import_revision
                && r.bundle_version_acked == bundle_version
                && r.intermediate_installed_sha256 == installed
            {
                return Ok(());
            }
            let r = ClusterRecord {
                import_revision_acked: import_revision,
                bundle_version_acked: bundle_version,
                intermediate_installed_sha256: installed,
                intermediate_installed_unix: installed_unix,
                ..r
            };
            let mut b = Batch::new();
            b.put(Table::Clusters, r.name.clone(), json(&r));
            self.commit(inner, &b)?;
            inner.records.insert(r.name.clone(), r);
            Ok(())
        })
        .await
    }

    /// Binds identities to clusters (`--bind-identities-to-clusters`) or
    /// not; a change from what is stored is a new bundle version.
    pub async fn set_bind_identities(&self, on: bool) -> Result<(), StateError> {
        self.write(|inner| {
            if inner.bind_identities == on {
                return Ok(());
            }
            let bundle_version = inner.bundle_version + 1;
            let mut b = Batch::new();
            b.put(
                Table::Meta,
                META_BIND_IDENTITIES,
                u8::from(on).to_string().into_bytes(),
            );
            put_bundle_version(&mut b, bundle_version);
            self.commit(inner, &b)?;
            inner.bind_identities = on;
            inner.bundle_version = bundle_version;
            self.revision_tx.send_modify(|_| {});
            Ok(())
        })
        .await
    }

    /// `straitctl trust rotate-intermediate`: the cluster is asked for a CSR
    /// on its sync stream (now, or when it next connects).
    pub async fn request_renewal(&self, name: &ClusterName) -> Result<(), StateError> {
        self.write(|inner| {
            let Some(r) = inner.records.get(name.as_str()).cloned() else {
                return Err(StateError::UnknownCluster(name.to_string()));
            };
            if r.membership != Membership::Joined {
                return Err(StateError::Invalid(format!(
                    "cluster {name} is {}, not joined",
                    r.membership.as_str()
                )));
            }
            let r = ClusterRecord {
                renew_requested: true,
                ..r
            };
            let mut b = Batch::new();
            b.put(Table::Clusters, r.name.clone(), json(&r));
            self.commit(inner, &b)?;
            inner.records.insert(r.name.clone(), r);
            self.revision_tx.send_modify(|_| {});
            Ok(())
        })
        .await
    }

    /// Issues a new intermediate for a joined cluster's CSR (its subject CN
    /// must be the cluster's name); returns the chain.
    pub async fn renew_intermediate(
        &self,
        name: &ClusterName,
        csr_pem: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<u8>>, StateError> {
        let csr = Csr::from_pem(csr_pem.as_bytes())?;
        self.write(|inner| {
            let Some(r) = inner.records.get(name.as_str()).cloned() else {
                return Err(StateError::UnknownCluster(name.to_string()));
            };
            if r.membership != Membership::Joined {
                return Err(StateError::Revoked(name.to_string()));
            }
            if csr.common_name() != Some(name.as_str()) {
                return Err(StateError::Invalid(format!(
                    "the renewal CSR names {:?}, not cluster {name}",
                    csr.common_name().unwrap_or_default()
                )));
            }
            let signer = self.signer();
            let issued = signer.issue_intermediate(&csr, name, self.intermediate_validity, now)?;
            let r = ClusterRecord {
                intermediate_sha256: fingerprint_sha256(&issued.der),
                intermediate_expires_unix: issued.not_after.unix_timestamp(),
                intermediate_not_before_unix: issued.not_before.unix_timestamp(),
                renew_requested: false,
                intermediate_root_sha256: fingerprint_sha256(signer.root_der()),
                ..r
            };
            let mut b = Batch::new();
            b.put(Table::Clusters, r.name.clone(), json(&r));
            self.commit(inner, &b)?;
            inner.records.insert(r.name.clone(), r);
            let mut chain = vec![issued.der];
            chain.extend(signer.chain().iter().cloned());
            Ok(chain)
        })
        .await
    }

    /// `straitctl cluster revoke`: removes the cluster and its exports from
    /// every importer and deny-lists its intermediate.
    pub async fn revoke(&self, name: &ClusterName) -> Result<(), StateError> {
        self.write(|inner| {
            let Some(r) = inner.records.get(name.as_str()).cloned() else {
                return Err(StateError::UnknownCluster(name.to_string()));
            };
            if r.membership == Membership::Revoked {
                return Err(StateError::Revoked(name.to_string()));
            }
            let mut denied = inner.denied.clone();
            if !r.intermediate_sha256.is_empty() {
                denied.insert(r.intermediate_sha256.clone());
            }
            let revoked = ClusterRecord {
                membership: Membership::Revoked,
                ..r
            };
            let bundle_version = inner.bundle_version + 1;
            let mut b = Batch::new();
            b.put(Table::Meta, META_DENIED, json(&denied));
            put_bundle_version(&mut b, bundle_version);
            // Tokens of this cluster that were never used die with it.
            for t in inner
                .tokens
                .values()
                .filter(|t| t.cluster == name.as_str() && !t.used)
            {
                b.delete(Table::Tokens, t.id.clone());
            }
            if inner.mesh.cluster(name).is_some() {
                let plan = inner.mesh.plan_remove(name)?;
                self.commit_plan(inner, plan, b, Some(revoked.clone()))?;
            } else {
                b.put(Table::Clusters, revoked.name.clone(), json(&revoked));
                self.commit(inner, &b)?;
                inner.records.insert(revoked.name.clone(), revoked.clone());
            }
            inner
                .tokens
                .retain(|_, t| t.cluster != name.as_str() || t.used);
            inner.denied = denied.clone();
            inner.bundle_version = bundle_version;
            self.trust.set_denied(denied);
            // Wake every stream so that it pushes the new deny-list.
            self.revision_tx.send_modify(|_| {});
            Ok(())
        })
        .await
    }
}
