//! rustls certificate verifiers that speak SPIFFE: the peer's chain is
//! checked with [`crate::verify::verify_svid`] against a trust bundle that
//! can be swapped at run time (root rotation), optionally pinned to an
//! expected identity, and refused when an intermediate is deny-listed.
//!
//! Hostname checks do not apply in a mesh: the identity is the SPIFFE ID.
//! No sockets here; servers and clients build their configs from these.

/// The TLS server name proxies send to their control plane. Identities
/// are checked by SPIFFE ID, not by this name; it lets an east-west gateway
/// that exposes the control plane to remote clusters (primary-remote) tell
/// its connections from others, as Istio's `istiod.istio-system.svc` does.
pub const CONTROL_PLANE_SERVER_NAME: &str = "controlplane.strait-system.svc";

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use time::OffsetDateTime;

use crate::bundle::TrustBundle;
use crate::cert::fingerprint_sha256;
use crate::spiffe::SpiffeId;
use crate::verify::{VerifiedSvid, verify_svid};

/// The ring provider every strait TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The handshake signature checks every strait verifier shares (ring's
/// algorithms); custom verifiers implement the chain check themselves.
pub fn verify_tls12(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
}

/// See [`verify_tls12`].
pub fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
}

/// The signature schemes strait verifiers accept.
pub fn verify_schemes() -> Vec<SignatureScheme> {
    algorithms().supported_schemes()
}

/// The trust a verifier applies, shared and swappable: the bundle and the
/// SHA-256 fingerprints of deny-listed intermediates. Every change of what
/// it accepts bumps a generation that [`Trust::changes`] receivers see, so
/// that live connections can check their peers again
/// ([`crate::live::TrustWatch`]).
#[derive(Clone)]
pub struct Trust {
    inner: Arc<RwLock<TrustState>>,
    /// The generation: bumped only when bundle, deny-list or peered
    /// bundles actually change (pushing the same config again is no change).
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Trust {
    fn default() -> Self {
        Trust {
            inner: Arc::default(),
            generation: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

#[derive(Default)]
struct TrustState {
    bundle: Arc<TrustBundle>,
    denied: BTreeSet<String>,
    /// Bundles of peered trust domains, each only for its own identities.
    federated: std::collections::BTreeMap<String, Arc<TrustBundle>>,
    /// When set: the identities each cluster runs, by cluster name, and
    /// an own-domain leaf issued by cluster X's intermediate must be one
    /// of X's ([`ClusterIdentities`]).
    bindings: Option<Arc<ClusterIdentities>>,
}

/// The workload identities each cluster of the mesh runs, as `<ns>/<sa>`
/// by cluster name: with these set on a [`Trust`], a leaf of the own
/// trust domain issued by cluster X's intermediate (subject
/// `O=<td>, OU=strait clusters, CN=X`) verifies only if its SPIFFE ID is
/// `ns/<ns>/sa/<sa>` with `<ns>/<sa>` among X's, or X's own broker
/// identity `strait/cluster/X`, or in namespace `strait-system` (the
/// control plane and gateway identities every cluster runs). So the key
/// of one cluster's intermediate, stolen, cannot mint another cluster's
/// workloads. Leaves issued by a root directly (broker, admin) and peered
/// meshes' identities are not affected.
pub type ClusterIdentities = std::collections::BTreeMap<String, BTreeSet<String>>;

/// The namespace whose identities every cluster may issue.
pub const INFRA_NAMESPACE: &str = "strait-system";

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Trust")
    }
}

impl Trust {
    pub fn new(bundle: TrustBundle) -> Self {
        let t = Trust::default();
        t.set_bundle(bundle);
        t
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        match self.inner.read() {
            Ok(s) => s.bundle.clone(),
            Err(poisoned) => poisoned.into_inner().bundle.clone(),
        }
    }

    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.replace(|s| &mut s.bundle, Arc::new(bundle));
    }

    /// Replaces the deny-list (SHA-256 fingerprints, as `cert::fingerprint_sha256`).
    pub fn set_denied(&self, denied: impl IntoIterator<Item = String>) {
        self.replace(|s| &mut s.denied, denied.into_iter().collect());
    }

    /// Sets one part of the state to `value` and, when that changed it,
    /// tells [`Trust::changes`] receivers.
    fn replace<T: PartialEq>(&self, part: impl FnOnce(&mut TrustState) -> &mut T, value: T) {
        let changed = {
            let mut s = self.inner.write().unwrap_or_else(|p| p.into_inner());
            let slot = part(&mut s);
            let changed = *slot != value;
            *slot = value;
            changed
        };
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// A receiver of the trust's generation, which changes whenever what
    /// this trust accepts changes (bundle, deny-list, peered bundles). It
    /// starts with the current generation marked seen.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The current generation (see [`Trust::changes`]).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Turns the binding of identities to clusters on (with what each
    /// cluster runs) or off (`None`); see [`ClusterIdentities`].
    pub fn set_cluster_identities(&self, bindings: Option<ClusterIdentities>) {
        self.replace(|s| &mut s.bindings, bindings.map(Arc::new));
    }

    /// Replaces the bundles of peered trust domains (by trust domain name).
    /// A chain whose leaf names one of them is verified against that
    /// bundle alone; bundles are never merged.
    pub fn set_federated(&self, bundles: impl IntoIterator<Item = (String, TrustBundle)>) {
        let federated = bundles
            .into_iter()
            .map(|(td, b)| (td, Arc::new(b)))
            .collect();
        self.replace(|s| &mut s.federated, federated);
    }

    /// The trust domains this trust accepts identities of.
    pub fn trust_domains(&self) -> Vec<String> {
        let s = self.inner.read().unwrap_or_else(|p| p.into_inner());
        s.bundle
            .trust_domain()
            .map(|t| t.to_string())
            .into_iter()
            .chain(s.federated.keys().cloned())
            .collect()
    }

    /// Verifies a presented chain at `now`, deny-list included.
    pub fn verify(
        &self,
        chain: &[Vec<u8>],
        now: OffsetDateTime,
    ) -> Result<VerifiedSvid, TrustError> {
        self.verify_with(chain, now, Revocation::AtHandshake)
    }

    fn verify_with(
        &self,
        chain: &[Vec<u8>],
        now: OffsetDateTime,
        revocation: Revocation,
    ) -> Result<VerifiedSvid, TrustError> {
        let (bundle, denied, bindings) = {
            let s = self.inner.read().unwrap_or_else(|p| p.into_inner());
            // Only a trust with peered domains needs the leaf's domain
            // (parsed once more here); the common case skips it.
            let leaf_td = chain
                .first()
                .filter(|_| !s.federated.is_empty())
                .and_then(|d| crate::cert::CertSummary::from_der(d).ok())
                .and_then(|c| c.spiffe_id)
                .and_then(|id| SpiffeId::parse(&id).ok())
                .map(|id| id.trust_domain_str().to_string());
            let own = s.bundle.trust_domain().map(|t| t.to_string());
            let (bundle, bindings) = match leaf_td {
                Some(td)
                    if own.as_deref() != Some(td.as_str()) && s.federated.contains_key(&td) =>
                {
                    (s.federated[&td].clone(), None)
                }
                _ => (s.bundle.clone(), s.bindings.clone()),
            };
            (bundle, s.denied.clone(), bindings)
        };
        if revocation == Revocation::AtHandshake {
            for der in chain.iter().skip(1) {
                let fingerprint = fingerprint_sha256(der);
                if denied.contains(&fingerprint) {
                    let subject = crate::cert::CertSummary::from_der(der)
                        .map(|c| c.subject)
                        .unwrap_or_else(|_| "?".into());
                    return Err(TrustError::Revoked {
                        subject,
                        fingerprint,
                    });
                }
            }
        }
        let svid = verify_svid(chain, &bundle, now)?;
        if let Some(bindings) = bindings {
            check_binding(&svid, &bindings)?;
        }
        Ok(svid)
    }
}

/// The binding check of [`ClusterIdentities`] on a verified chain.
fn check_binding(svid: &VerifiedSvid, bindings: &ClusterIdentities) -> Result<(), TrustError> {
    // Leaf, intermediate, root: the only shape a cluster issues.
    if svid.path_len != 3 {
        return Ok(());
    }
    let td = svid.spiffe_id.trust_domain_str();
    let cluster = crate::authority::cluster_of_intermediate(td, &svid.leaf_issuer);
    let segments: Vec<&str> = svid.spiffe_id.segments().collect();
    let ok = cluster.is_some_and(|cluster| match segments.as_slice() {
        ["ns", ns, "sa", _] if *ns == INFRA_NAMESPACE => true,
        ["ns", ns, "sa", sa] => bindings
            .get(cluster)
            .is_some_and(|runs| runs.contains(&format!("{ns}/{sa}"))),
        ["strait", "cluster", name] => *name == cluster,
        _ => false,
    });
    if ok {
        return Ok(());
    }
    Err(TrustError::NotRunBy {
        cluster: cluster.map_or_else(
            || {
                format!(
                    "(an intermediate that names no cluster: {})",
                    svid.leaf_issuer
                )
            },
            str::to_string,
        ),
        id: svid.spiffe_id.to_string(),
    })
}

/// Why [`Trust::verify`] refused a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The TLS session carried no certificate.
    #[error("no client certificate")]
    NoCertificate,
    /// An intermediate of the chain is deny-listed: the cluster it belongs
    /// to was revoked.
    #[error("intermediate {subject} (SHA-256 {fingerprint}) is revoked")]
    Revoked {
        subject: String,
        fingerprint: String,
    },
    /// The chain does not verify under the bundle.
    #[error(transparent)]
    Chain(#[from] crate::verify::VerifyError),
    /// Identities are bound to clusters and the leaf's issuing cluster
    /// does not run it: the mark of a cluster CA key used elsewhere.
    #[error(
        "{id} is not an identity cluster {cluster} runs, but cluster {cluster}'s intermediate issued it"
    )]
    NotRunBy { cluster: String, id: String },
}

/// Where a [`SpiffeClientVerifier`] applies the deny-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// In the handshake: a revoked peer never gets a session.
    AtHandshake,
    /// Not in the handshake: the server checks each call with
    /// [`peer_identity`] (which applies it) and can tell a revoked peer
    /// that it is revoked, where a failed handshake tells it nothing a
    /// client can act on (in TLS 1.3 the client's handshake is over before
    /// the server's alert arrives). Only for servers that authenticate
    /// every call, as the broker does.
    PerCall,
}

fn chain_of(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Vec<Vec<u8>> {
    std::iter::once(end_entity)
        .chain(intermediates.iter())
        .map(|c| c.as_ref().to_vec())
        .collect()
}

fn to_time(now: UnixTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(now.as_secs() as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn tls_error(msg: impl fmt::Display) -> rustls::Error {
    rustls::Error::General(msg.to_string())
}

/// Which identities a verifier accepts.
#[derive(Debug, Clone)]
pub enum Accept {
    /// Any SVID of the bundle's trust domain(s).
    Any,
    /// Exactly these IDs.
    Ids(BTreeSet<SpiffeId>),
    /// IDs whose path starts with this prefix (e.g. `/strait/cluster/`).
    PathPrefix(String),
}

/// A verified peer whose identity an [`Accept`] does not let in; the
/// message is the TLS rejection's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer identity {0} is not accepted here")]
pub struct NotAccepted(pub SpiffeId);

impl Accept {
    fn check(&self, id: &SpiffeId) -> Result<(), NotAccepted> {
        let ok = match self {
            Accept::Any => true,
            Accept::Ids(ids) => ids.contains(id),
            Accept::PathPrefix(p) => id.path().starts_with(p.as_str()),
        };
        if ok {
            Ok(())
        } else {
            Err(NotAccepted(id.clone()))
        }
    }
}

/// Server side: verifies client certificates as SVIDs.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Trust,
    accept: Accept,
    mandatory: bool,
    revocation: Revocation,
}

impl SpiffeClientVerifier {
    /// `mandatory: false` lets clients without a certificate through the
    /// handshake (e.g. a cluster joining with a token); the application
    /// then decides per call.
    pub fn new(trust: Trust, accept: Accept, mandatory: bool) -> Arc<Self> {
        Arc::new(SpiffeClientVerifier {
            trust,
            accept,
            mandatory,
            revocation: Revocation::AtHandshake,
        })
    }

    /// [`SpiffeClientVerifier::new`] applying the deny-list as
    /// `revocation` says.
    pub fn with_revocation(
        trust: Trust,
        accept: Accept,
        mandatory: bool,
        revocation: Revocation,
    ) -> Arc<Self> {
        Arc::new(SpiffeClientVerifier {
            trust,
            accept,
            mandatory,
            revocation,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let svid = self
            .trust
            .verify_with(
                &chain_of(end_entity, intermediates),
                to_time(now),
                self.revocation,
            )
            .map_err(tls_error)?;
        self.accept.check(&svid.spiffe_id).map_err(tls_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

/// Client side: verifies the server's certificate as an SVID, or (for a
/// cluster joining with a token) only checks that the server's chain ends at
/// a root with the pinned SHA-256 and verifies under that root.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    mode: ServerMode,
}

#[derive(Debug)]
enum ServerMode {
    Trusted {
        trust: Trust,
        accept: Accept,
    },
    /// Lowercase hex SHA-256 of the root's DER.
    Pinned {
        root_sha256: String,
    },
}

impl SpiffeServerVerifier {
    pub fn new(trust: Trust, accept: Accept) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            mode: ServerMode::Trusted { trust, accept },
        })
    }

    /// Trust on first use, pinned: the server must present its root, and the
    /// root's SHA-256 must be `root_sha256` (lowercase hex).
    pub fn pinned(root_sha256: &str) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            mode: ServerMode::Pinned {
                root_sha256: root_sha256.to_ascii_lowercase(),
            },
        })
    }
}

/// Lowercase hex SHA-256, the pin format of join tokens.
pub fn sha256_hex(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = chain_of(end_entity, intermediates);
        match &self.mode {
            ServerMode::Trusted { trust, accept } => {
                let svid = trust.verify(&chain, to_time(now)).map_err(tls_error)?;
                accept.check(&svid.spiffe_id).map_err(tls_error)?;
            }
            ServerMode::Pinned { root_sha256 } => {
                let root = chain
                    .iter()
                    .find(|der| sha256_hex(der) == *root_sha256)
                    .ok_or_else(|| {
                        tls_error(format!(
                            "the server presented no root with SHA-256 {root_sha256} (wrong broker, or a token of another mesh)"
                        ))
                    })?;
                let bundle = TrustBundle::new(None, vec![root.clone()]).map_err(tls_error)?;
                verify_svid(&chain, &bundle, to_time(now)).map_err(tls_error)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

/// A certificate chain and its PKCS#8 key, as rustls wants them.
pub fn identity(
    chain: &[Vec<u8>],
    key_pkcs8: &[u8],
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    (certs, key)
}

/// A TLS 1.3 server config with SPIFFE client verification and ALPN.
pub fn server_config(
    chain: &[Vec<u8>],
    key_pkcs8: &[u8],
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let (certs, key) = identity(chain, key_pkcs8);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// A TLS 1.3 client config with SPIFFE server verification, an optional
/// client identity, and ALPN.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    identity_pair: Option<(&[Vec<u8>], &[u8])>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity_pair {
        Some((chain, key)) => {
            let (certs, key) = identity(chain, key);
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// The verified identity of a peer from the certificates a TLS session saw.
pub fn peer_identity(
    trust: &Trust,
    certs: &[CertificateDer<'_>],
    now: OffsetDateTime,
) -> Result<VerifiedSvid, TrustError> {
    if certs.is_empty() {
        return Err(TrustError::NoCertificate);
    }
    let chain: Vec<Vec<u8>> = certs.iter().map(|c| c.as_ref().to_vec()).collect();
    trust.verify(&chain, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn bound_identities_must_be_run_by_the_issuing_cluster() {
        let east = TestPki::with_cluster("td", "east");
        let west = east.sibling("west");
        let trust = Trust::new(east.bundle());
        let payments_by_west = west.leaf_chain("spiffe://td/ns/shop/sa/payments");
        // Unbound (the default): any cluster may issue any identity.
        assert!(trust.verify(&payments_by_west, now()).is_ok());

        let rx = trust.changes();
        trust.set_cluster_identities(Some(ClusterIdentities::from([
            (
                "east".to_string(),
                BTreeSet::from(["shop/payments".to_string()]),
            ),
            (
                "west".to_string(),
                BTreeSet::from(["demo/client".to_string()]),
            ),
        ])));
        assert!(
            rx.has_changed().unwrap(),
            "live connections are checked again"
        );
        // West's key minting east's payments: refused, naming both.
        let err = trust.verify(&payments_by_west, now()).unwrap_err();
        assert!(
            matches!(err, TrustError::NotRunBy { ref cluster, .. } if cluster == "west"),
            "{err}"
        );
        assert!(
            err.to_string().contains("spiffe://td/ns/shop/sa/payments"),
            "{err}"
        );
        // What each runs, its own broker identity, and infrastructure pass.
        for (pki, id) in [
            (&east, "spiffe://td/ns/shop/sa/payments"),
            (&west, "spiffe://td/ns/demo/sa/client"),
            (&west, "spiffe://td/strait/cluster/west"),
            (&west, "spiffe://td/ns/strait-system/sa/gateway"),
        ] {
            assert!(trust.verify(&pki.leaf_chain(id), now()).is_ok(), "{id}");
        }
        for (pki, id) in [
            (&west, "spiffe://td/strait/cluster/east"),
            (&east, "spiffe://td/ns/demo/sa/client"),
            (&west, "spiffe://td/ns/demo/sa/other"),
        ] {
            assert!(trust.verify(&pki.leaf_chain(id), now()).is_err(), "{id}");
        }
        // A cluster the map does not know runs nothing.
        let north = east.sibling("north");
        assert!(
            trust
                .verify(&north.leaf_chain("spiffe://td/ns/demo/sa/client"), now())
                .is_err()
        );
        // Off again.
        trust.set_cluster_identities(None);
        assert!(trust.verify(&payments_by_west, now()).is_ok());
    }

    #[test]
    fn trust_verifies_and_denies() {
        let pki = TestPki::new("td");
        let trust = Trust::new(pki.bundle());
        let chain = pki.leaf_chain("spiffe://td/strait/cluster/east");
        let svid = trust.verify(&chain, now()).unwrap();
        assert_eq!(svid.spiffe_id.as_str(), "spiffe://td/strait/cluster/east");
        trust.set_denied([fingerprint_sha256(&chain[1])]);
        let err = trust.verify(&chain, now()).unwrap_err();
        assert!(matches!(err, TrustError::Revoked { .. }), "{err}");
        assert!(err.to_string().contains("is revoked"), "{err}");
        trust.set_denied([]);
        let other = TestPki::new("td");
        trust.set_bundle(other.bundle());
        assert!(trust.verify(&chain, now()).is_err());
    }

    #[test]
    fn generation_moves_only_on_change() {
        let pki = TestPki::new("td");
        let peer = TestPki::new("peer.example");
        let trust = Trust::new(pki.bundle());
        let mut rx = trust.changes();
        let g0 = trust.generation();
        // The same values again: no change.
        trust.set_bundle(pki.bundle());
        trust.set_denied([]);
        trust.set_federated([]);
        assert_eq!(trust.generation(), g0);
        assert!(!rx.has_changed().unwrap());
        trust.set_denied(["ab".to_string()]);
        assert_eq!(trust.generation(), g0 + 1);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        trust.set_denied(["ab".to_string()]);
        assert!(!rx.has_changed().unwrap(), "same deny-list");
        trust.set_federated([("peer.example".to_string(), peer.bundle())]);
        trust.set_federated([("peer.example".to_string(), peer.bundle())]);
        assert_eq!(trust.generation(), g0 + 2);
        trust.set_bundle(TestPki::new("td").bundle());
        assert_eq!(trust.generation(), g0 + 3);
        // Clones share the generation.
        trust.clone().set_federated([]);
        assert_eq!(trust.generation(), g0 + 4);
    }

    #[test]
    fn federated_bundles_stay_per_trust_domain() {
        let own = TestPki::new("own.example");
        let peer = TestPki::new("peer.example");
        let trust = Trust::new(own.bundle());
        let peer_chain = peer.leaf_chain("spiffe://peer.example/ns/a/sa/b");
        assert!(
            trust.verify(&peer_chain, now()).is_err(),
            "unknown trust domain"
        );
        trust.set_federated([("peer.example".to_string(), peer.bundle())]);
        assert_eq!(trust.trust_domains(), ["own.example", "peer.example"]);
        let svid = trust.verify(&peer_chain, now()).unwrap();
        assert_eq!(svid.spiffe_id.trust_domain_str(), "peer.example");
        // Own identities still verify against the own bundle only.
        let own_chain = own.leaf_chain("spiffe://own.example/ns/a/sa/b");
        assert!(trust.verify(&own_chain, now()).is_ok());
        let rogue = TestPki::new("own.example");
        assert!(
            trust
                .verify(&rogue.leaf_chain("spiffe://own.example/ns/a/sa/b"), now())
                .is_err()
        );
    }

    #[test]
    fn accept_rules() {
        let id = SpiffeId::parse("spiffe://td/strait/cluster/east").unwrap();
        assert!(Accept::Any.check(&id).is_ok());
        assert!(
            Accept::PathPrefix("/strait/cluster/".into())
                .check(&id)
                .is_ok()
        );
        assert!(
            Accept::PathPrefix("/strait/admin/".into())
                .check(&id)
                .is_err()
        );
        assert!(Accept::Ids([id.clone()].into()).check(&id).is_ok());
        assert_eq!(
            Accept::Ids(BTreeSet::new())
                .check(&id)
                .unwrap_err()
                .to_string(),
            "peer identity spiffe://td/strait/cluster/east is not accepted here",
            "the TLS rejection's text"
        );
    }

    #[test]
    fn configs_build() {
        let pki = TestPki::new("td");
        let (leaf, key_pem) = pki.leaf("spiffe://td/ns/a/sa/b");
        let key = crate::pemfile::parse_private_key(key_pem.as_bytes()).unwrap();
        let chain = vec![leaf, pki.intermediate.certificate_der().to_vec()];
        let trust = Trust::new(pki.bundle());
        let v = SpiffeClientVerifier::new(trust.clone(), Accept::Any, true);
        server_config(&chain, &key.serialize_der(), v, &[b"h2"]).unwrap();
        let sv = SpiffeServerVerifier::new(trust, Accept::Any);
        client_config(sv, Some((&chain, &key.serialize_der())), &[b"h2"]).unwrap();
        client_config(SpiffeServerVerifier::pinned(&"0".repeat(64)), None, &[]).unwrap();
    }
}
