//! The one swappable certificate a server presents: TLS handshakes pick
//! up whatever is current, so a renewed or re-issued certificate takes
//! effect without a restart and without touching open connections.

use std::sync::{Arc, RwLock};

use rustls::sign::CertifiedKey;

/// A certificate and key, swapped in place while serving. Empty until the
/// first [`ServingCert::set`] (a handshake then finds no certificate and
/// fails).
#[derive(Debug, Default)]
pub struct ServingCert(RwLock<Option<Arc<CertifiedKey>>>);

impl ServingCert {
    /// Holding `key` from the start.
    pub fn new(key: CertifiedKey) -> Self {
        ServingCert(RwLock::new(Some(Arc::new(key))))
    }

    /// Presents `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
    }

    /// The certificate presented now.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The chain presented now (leaf first), empty when none is set.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        self.current()
            .map(|k| k.cert.iter().map(|c| c.to_vec()).collect())
            .unwrap_or_default()
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// The same identity presented as a client (a broker calling its peers).
impl rustls::client::ResolvesClientCert for ServingCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}
