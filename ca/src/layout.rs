//! On-disk layouts.
//!
//! - Root directory: `root-cert.pem`, `root-key.pem` (0600).
//! - Istio plug-in CA directory (so it can be handed to istiod as the
//!   `cacerts` secret): `ca-cert.pem`, `ca-key.pem` (0600), `root-cert.pem`
//!   (the bundle: every trusted root), `cert-chain.pem` (intermediate, then
//!   root).
//! - Workload directory: `cert-chain.pem` (leaf, then intermediate),
//!   `key.pem` (0600), `root-cert.pem` (the bundle).
//!
//! Files are written to a temporary name and renamed into place, so a reader
//! never sees half a file. A private key is never overwritten unless the
//! caller says so (`force`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::authority::{Authority, IssueError};
use crate::bundle::{BundleError, TrustBundle};
use crate::pemfile;
use crate::spiffe::TrustDomain;

pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const WORKLOAD_KEY: &str = "key.pem";
/// The CSR `strait ca csr` writes next to the key it made.
pub const CA_CSR: &str = "ca-csr.pem";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0}: a private key already exists; refusing to overwrite it (use --force to replace it)"
    )]
    KeyExists(PathBuf),
    #[error("{path}: {source}")]
    Issue {
        path: PathBuf,
        #[source]
        source: IssueError,
    },
    #[error("{path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("{path}: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: crate::pemfile::PemError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, LayoutError> {
    fs::read(path).map_err(io(path))
}

/// Writes `data` to `path` atomically with the given mode. Refuses to replace
/// an existing file when `keep_existing` is set.
fn write_atomic(
    path: &Path,
    data: &[u8],
    mode: u32,
    keep_existing: bool,
) -> Result<(), LayoutError> {
    if keep_existing && path.exists() {
        return Err(LayoutError::KeyExists(path.to_path_buf()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        // The mode above is filtered by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a private key (mode 0600); never replaces one unless `force`.
pub fn write_key(path: &Path, pem: &str, force: bool) -> Result<(), LayoutError> {
    write_atomic(path, pem.as_bytes(), 0o600, !force)
}

/// Writes a public file (certificates, CSRs, bundles; mode 0644).
pub fn write_public(path: &Path, data: &str) -> Result<(), LayoutError> {
    write_atomic(path, data.as_bytes(), 0o644, false)
}

/// Creates `dir` (and parents) if missing.
pub fn ensure_dir(dir: &Path) -> Result<(), LayoutError> {
    fs::create_dir_all(dir).map_err(io(dir))
}

/// Fails early when `dir/name` holds a key and `force` is not set, before
/// any work (or any other file) is done.
pub fn check_key_absent(dir: &Path, name: &str, force: bool) -> Result<(), LayoutError> {
    let path = dir.join(name);
    if !force && path.exists() {
        return Err(LayoutError::KeyExists(path));
    }
    Ok(())
}

/// Writes a root CA directory.
pub fn write_root(dir: &Path, root: &Authority, force: bool) -> Result<(), LayoutError> {
    ensure_dir(dir)?;
    check_key_absent(dir, ROOT_KEY, force)?;
    write_key(&dir.join(ROOT_KEY), &root.key_pem(), force)?;
    write_public(
        &dir.join(ROOT_CERT),
        &pemfile::encode(pemfile::CERTIFICATE, root.certificate_der()),
    )
}

/// Loads a root CA directory (`root-cert.pem` must hold the root first; any
/// further certificates there are ignored for signing).
pub fn load_root(dir: &Path, td: Option<&TrustDomain>) -> Result<Authority, LayoutError> {
    let cert_path = dir.join(ROOT_CERT);
    let key_path = dir.join(ROOT_KEY);
    let certs =
        pemfile::parse_certificates(&read(&cert_path)?).map_err(|e| LayoutError::Issue {
            path: cert_path.clone(),
            source: IssueError::Pem("certificate", e),
        })?;
    let key = pemfile::parse_private_key(&read(&key_path)?).map_err(|e| LayoutError::Issue {
        path: key_path.clone(),
        source: IssueError::Pem("key", e),
    })?;
    let first = certs.into_iter().take(1).collect();
    Authority::from_der(first, key, td).map_err(|source| LayoutError::Issue {
        path: dir.to_path_buf(),
        source,
    })
}

/// The root bundle of a root directory: every certificate in `root-cert.pem`.
pub fn load_bundle(path: &Path, td: Option<TrustDomain>) -> Result<TrustBundle, LayoutError> {
    TrustBundle::parse(&read(path)?, td).map_err(|source| LayoutError::Bundle {
        path: path.to_path_buf(),
        source,
    })
}

/// The mesh roots in `path` and their trust domain: strait's CA
/// certificates name it (URI SAN `spiffe://<td>`); the first root's is the
/// mesh's.
pub fn load_root_cert(path: &Path) -> Result<(TrustDomain, TrustBundle), LayoutError> {
    let certs =
        crate::pemfile::parse_certificates(&read(path)?).map_err(|source| LayoutError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    let td = certs
        .first()
        .and_then(|der| crate::cert::CertSummary::from_der(der).ok())
        .and_then(|c| c.spiffe_id)
        .and_then(|id| TrustDomain::new(id.trim_start_matches("spiffe://")).ok())
        .ok_or_else(|| LayoutError::Inconsistent {
            path: path.to_path_buf(),
            reason: "the root names no trust domain (URI SAN spiffe://<trust domain>)".into(),
        })?;
    let bundle = load_bundle(path, Some(td.clone()))?;
    Ok((td, bundle))
}

/// A workload's credentials: its chain (leaf first), its PKCS#8 key and
/// the bundle it trusts.
pub type Credentials = (Vec<Vec<u8>>, Vec<u8>, TrustBundle);

/// Reads a credentials directory ([`CERT_CHAIN`], [`WORKLOAD_KEY`],
/// [`ROOT_CERT`]), naming the file at fault.
pub fn read_credentials(dir: &Path) -> Result<Credentials, LayoutError> {
    let pem = |path: PathBuf| move |source| LayoutError::Pem { path, source };
    let chain_path = dir.join(CERT_CHAIN);
    let key_path = dir.join(WORKLOAD_KEY);
    let chain = crate::pemfile::parse_certificates(&read(&chain_path)?).map_err(pem(chain_path))?;
    let key = crate::pemfile::parse_private_key(&read(&key_path)?).map_err(pem(key_path))?;
    let bundle = load_bundle(&dir.join(ROOT_CERT), None)?;
    Ok((chain, key.serialize_der(), bundle))
}

/// Writes an Istio plug-in CA directory. `chain` is the intermediate then
/// its issuers up to the root; `key_pem` is written only when given (the key
/// may already be in place from `strait ca csr`).
pub fn write_plugin_ca(
    dir: &Path,
    chain: &[Vec<u8>],
    key_pem: Option<&str>,
    bundle: &TrustBundle,
    force: bool,
) -> Result<(), LayoutError> {
    ensure_dir(dir)?;
    let Some(ca) = chain.first() else {
        return Err(LayoutError::Inconsistent {
            path: dir.join(CERT_CHAIN),
            reason: "empty certificate chain".into(),
        });
    };
    if let Some(key) = key_pem {
        check_key_absent(dir, CA_KEY, force)?;
        write_key(&dir.join(CA_KEY), key, force)?;
    }
    write_public(
        &dir.join(CA_CERT),
        &pemfile::encode(pemfile::CERTIFICATE, ca),
    )?;
    write_public(
        &dir.join(CERT_CHAIN),
        &pemfile::encode_certificates(chain.iter().map(Vec::as_slice)),
    )?;
    write_public(&dir.join(ROOT_CERT), &bundle.to_pem())
}

/// Loads an Istio plug-in CA directory as a signing authority, checking that
/// `ca-cert.pem` is the first certificate of `cert-chain.pem`, that the key
/// fits, and that the chain's root is in `root-cert.pem`.
pub fn load_plugin_ca(dir: &Path, td: Option<&TrustDomain>) -> Result<Authority, LayoutError> {
    let chain_path = dir.join(CERT_CHAIN);
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let chain =
        pemfile::parse_certificates(&read(&chain_path)?).map_err(|e| LayoutError::Issue {
            path: chain_path.clone(),
            source: IssueError::Pem("chain", e),
        })?;
    let ca = pemfile::parse_certificates(&read(&cert_path)?).map_err(|e| LayoutError::Issue {
        path: cert_path.clone(),
        source: IssueError::Pem("certificate", e),
    })?;
    if ca.first() != chain.first() {
        return Err(LayoutError::Inconsistent {
            path: cert_path,
            reason: format!("is not the first certificate of {CERT_CHAIN}"),
        });
    }
    let key = pemfile::parse_private_key(&read(&key_path)?).map_err(|e| LayoutError::Issue {
        path: key_path.clone(),
        source: IssueError::Pem("key", e),
    })?;
    let authority = Authority::from_der(chain, key, td).map_err(|source| LayoutError::Issue {
        path: dir.to_path_buf(),
        source,
    })?;
    let bundle_path = dir.join(ROOT_CERT);
    let bundle = load_bundle(&bundle_path, None)?;
    if !bundle
        .roots()
        .iter()
        .any(|r| r.as_slice() == authority.root_der())
    {
        return Err(LayoutError::Inconsistent {
            path: bundle_path,
            reason: format!("does not contain the root that {CERT_CHAIN} ends with"),
        });
    }
    Ok(authority)
}

/// Writes a workload directory: `cert-chain.pem` = leaf then the issuing
/// CA's chain without its root, `key.pem`, `root-cert.pem` = bundle.
pub fn write_workload(
    dir: &Path,
    leaf_der: &[u8],
    intermediates: &[Vec<u8>],
    key_pem: &str,
    bundle: &TrustBundle,
    force: bool,
) -> Result<(), LayoutError> {
    ensure_dir(dir)?;
    check_key_absent(dir, WORKLOAD_KEY, force)?;
    write_key(&dir.join(WORKLOAD_KEY), key_pem, force)?;
    let chain = std::iter::once(leaf_der).chain(intermediates.iter().map(Vec::as_slice));
    write_public(&dir.join(CERT_CHAIN), &pemfile::encode_certificates(chain))?;
    write_public(&dir.join(ROOT_CERT), &bundle.to_pem())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn root_dir_round_trip_and_key_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = TestPki::new("td");
        write_root(tmp.path(), &pki.root, false).unwrap();
        assert_eq!(mode(&tmp.path().join(ROOT_KEY)), 0o600);
        let back = load_root(tmp.path(), None).unwrap();
        assert_eq!(back.certificate_der(), pki.root.certificate_der());
        assert_eq!(back.trust_domain().as_str(), "td");
    }

    #[test]
    fn never_overwrites_a_key_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        let first = TestPki::new("td");
        write_root(tmp.path(), &first.root, false).unwrap();
        let second = TestPki::new("td");
        let err = write_root(tmp.path(), &second.root, false).unwrap_err();
        assert!(matches!(err, LayoutError::KeyExists(_)), "{err}");
        assert!(err.to_string().contains("--force"));
        // Nothing changed: the old pair still loads and matches.
        let kept = load_root(tmp.path(), None).unwrap();
        assert_eq!(kept.certificate_der(), first.root.certificate_der());
        write_root(tmp.path(), &second.root, true).unwrap();
        let replaced = load_root(tmp.path(), None).unwrap();
        assert_eq!(replaced.certificate_der(), second.root.certificate_der());
    }

    #[test]
    fn plugin_ca_round_trip_and_consistency_checks() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = TestPki::new("td");
        let bundle = pki.bundle();
        write_plugin_ca(
            tmp.path(),
            pki.intermediate.chain(),
            Some(&pki.intermediate.key_pem()),
            &bundle,
            false,
        )
        .unwrap();
        assert_eq!(mode(&tmp.path().join(CA_KEY)), 0o600);
        let ca = load_plugin_ca(tmp.path(), None).unwrap();
        assert_eq!(ca.certificate_der(), pki.intermediate.certificate_der());

        // A bundle without the chain's root is refused.
        let other = TestPki::new("td");
        write_public(&tmp.path().join(ROOT_CERT), &other.bundle().to_pem()).unwrap();
        let err = load_plugin_ca(tmp.path(), None).unwrap_err();
        assert!(
            err.to_string().contains("does not contain the root"),
            "{err}"
        );
        write_public(&tmp.path().join(ROOT_CERT), &bundle.to_pem()).unwrap();

        // ca-cert.pem that is not the chain's first certificate is refused.
        write_public(
            &tmp.path().join(CA_CERT),
            &pemfile::encode(pemfile::CERTIFICATE, other.intermediate.certificate_der()),
        )
        .unwrap();
        let err = load_plugin_ca(tmp.path(), None).unwrap_err();
        assert!(
            err.to_string().contains("not the first certificate"),
            "{err}"
        );

        // A key that does not fit the certificate is refused.
        write_public(
            &tmp.path().join(CA_CERT),
            &pemfile::encode(pemfile::CERTIFICATE, pki.intermediate.certificate_der()),
        )
        .unwrap();
        write_key(
            &tmp.path().join(CA_KEY),
            &other.intermediate.key_pem(),
            true,
        )
        .unwrap();
        let err = load_plugin_ca(tmp.path(), None).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load_root(tmp.path(), None).unwrap_err().to_string();
        assert!(err.contains(ROOT_CERT), "{err}");
        let err = load_plugin_ca(tmp.path(), None).unwrap_err().to_string();
        assert!(err.contains(CERT_CHAIN), "{err}");
    }

    #[test]
    fn workload_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = TestPki::new("td");
        let (leaf, key) = pki.leaf("spiffe://td/ns/a/sa/b");
        let intermediates = &pki.intermediate.chain()[..1];
        write_workload(tmp.path(), &leaf, intermediates, &key, &pki.bundle(), false).unwrap();
        assert_eq!(mode(&tmp.path().join(WORKLOAD_KEY)), 0o600);
        let chain =
            pemfile::parse_certificates(&read(&tmp.path().join(CERT_CHAIN)).unwrap()).unwrap();
        assert_eq!(
            chain,
            vec![leaf.clone(), pki.intermediate.certificate_der().to_vec()]
        );
        let err = write_workload(tmp.path(), &leaf, intermediates, &key, &pki.bundle(), false);
        assert!(matches!(err, Err(LayoutError::KeyExists(_))));
    }
}
