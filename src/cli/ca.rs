//! `strait ca`: make and inspect the mesh's certificates from the command
//! line. Thin: every rule lives in `strait-ca`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use time::OffsetDateTime;

use strait_ca::authority::{self, Authority, KeyAlgorithm, RootOptions};
use strait_ca::cert::CertSummary;
use strait_ca::layout;
use strait_ca::pemfile;
use strait_ca::{AnyIdentityInTrustDomain, ClusterName, Csr, SpiffeId, TrustBundle, TrustDomain};

use super::{Rejected, UsageError, format_duration, parse_duration};

#[derive(Debug, Args)]
#[command(
    about = "Certificate authority: roots, cluster intermediates, workload certificates, bundles",
    after_help = "Examples:
  strait ca init-root --trust-domain example.org --out root
  strait ca issue-intermediate --root root --cluster east --out east/cacerts
  strait ca issue-workload --ca east/cacerts \\
      --spiffe-id spiffe://example.org/ns/shop/sa/cart --out cart
  strait ca verify --bundle root/root-cert.pem --chain cart/cert-chain.pem
  strait ca inspect east/cacerts/cert-chain.pem"
)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    InitRoot(InitRoot),
    IssueIntermediate(IssueIntermediate),
    Csr(CsrCmd),
    SignIntermediate(SignIntermediate),
    InstallIntermediate(InstallIntermediate),
    IssueWorkload(IssueWorkload),
    Verify(Verify),
    Inspect(Inspect),
    CheckId(CheckId),
    #[command(subcommand)]
    Bundle(BundleCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyAlg {
    /// ECDSA on P-256 with SHA-256.
    P256,
    /// ECDSA on P-384 with SHA-384.
    P384,
}

impl From<KeyAlg> for KeyAlgorithm {
    fn from(k: KeyAlg) -> Self {
        match k {
            KeyAlg::P256 => KeyAlgorithm::EcdsaP256,
            KeyAlg::P384 => KeyAlgorithm::EcdsaP384,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

/// Create a root CA: DIR/root-cert.pem and DIR/root-key.pem (mode 0600).
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  strait ca init-root --trust-domain example.org --out root --validity 10y"
)]
struct InitRoot {
    /// Trust domain of the mesh (e.g. cluster.local, prod.example.org).
    #[arg(long, value_name = "TD")]
    trust_domain: TrustDomain,
    /// Directory to write the root into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// How long the root is valid (e.g. 10y, 90d).
    #[arg(long, value_parser = parse_duration, default_value = "10y")]
    validity: Duration,
    /// Subject common name of the root.
    #[arg(long, value_name = "N", default_value = authority::DEFAULT_ROOT_COMMON_NAME)]
    common_name: String,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    key_algorithm: KeyAlg,
    /// Replace an existing root key in DIR.
    #[arg(long)]
    force: bool,
}

/// Issue a cluster intermediate from a root: writes an Istio plug-in CA
/// directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem); the
/// key is generated in the output directory.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  strait ca issue-intermediate --root root --cluster east --out east/cacerts"
)]
struct IssueIntermediate {
    /// Root directory (from `strait ca init-root`).
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Cluster name (a DNS label), put in the intermediate's subject.
    #[arg(long, value_name = "NAME")]
    cluster: ClusterName,
    /// Plug-in CA directory to write (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Validity, capped by the root's expiry.
    #[arg(long, value_parser = parse_duration, default_value = "1y")]
    validity: Duration,
    /// Replace an existing ca-key.pem in the output directory.
    #[arg(long)]
    force: bool,
}

/// Make a cluster intermediate key and CSR for an offline root:
/// DIR/ca-key.pem (0600) and DIR/ca-csr.pem. Sign the CSR where the root
/// lives with `sign-intermediate`, then `install-intermediate` here.
#[derive(Debug, Args)]
#[command(after_help = "Example (offline root):
  strait ca csr --cluster east --out east/cacerts                  # in the cluster
  strait ca sign-intermediate --root root \\
      --csr east/cacerts/ca-csr.pem --out east-chain.pem            # at the root
  strait ca install-intermediate --dir east/cacerts \\
      --chain east-chain.pem                                        # in the cluster")]
struct CsrCmd {
    /// Cluster name (a DNS label), put in the CSR's subject CN.
    #[arg(long, value_name = "NAME")]
    cluster: ClusterName,
    /// Directory for the key and the CSR (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    key_algorithm: KeyAlg,
    /// Replace an existing ca-key.pem.
    #[arg(long)]
    force: bool,
}

/// Sign a cluster intermediate CSR with a root. Writes the chain
/// (intermediate, then root) to FILE. The cluster name is the CSR's CN.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  strait ca sign-intermediate --root root --csr east-ca-csr.pem --out east-chain.pem"
)]
struct SignIntermediate {
    /// Root directory (from `strait ca init-root`).
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// PEM CSR from `strait ca csr` (or openssl; CN = cluster name).
    #[arg(long, value_name = "FILE")]
    csr: PathBuf,
    /// File to write the intermediate's chain to.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Validity, capped by the root's expiry.
    #[arg(long, value_parser = parse_duration, default_value = "1y")]
    validity: Duration,
    /// Cluster name; must match the CSR's CN when the CSR has one.
    #[arg(long, value_name = "NAME")]
    cluster: Option<ClusterName>,
}

/// Complete a plug-in CA directory made by `strait ca csr` with the signed
/// chain: checks the chain fits the key there and writes ca-cert.pem,
/// cert-chain.pem and root-cert.pem.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  strait ca install-intermediate --dir east/cacerts --chain east-chain.pem"
)]
struct InstallIntermediate {
    /// The directory holding ca-key.pem.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Chain from `sign-intermediate` (intermediate first, root last).
    #[arg(long, value_name = "FILE")]
    chain: PathBuf,
    /// Roots to trust (root-cert.pem); default: the chain's root.
    #[arg(long, value_name = "FILE")]
    bundle: Option<PathBuf>,
}

/// Issue a workload certificate (X.509-SVID) from a plug-in CA directory:
/// writes cert-chain.pem (leaf, intermediate), key.pem (0600) and
/// root-cert.pem. The key is generated in the output directory.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  strait ca issue-workload --ca east/cacerts \\
      --spiffe-id spiffe://example.org/ns/shop/sa/cart --dns cart.shop.svc --out cart")]
struct IssueWorkload {
    /// Plug-in CA directory (from `issue-intermediate`) or root directory.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// The workload's SPIFFE ID (must be in the CA's trust domain).
    #[arg(long, value_name = "ID")]
    spiffe_id: SpiffeId,
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Lifetime, capped by the CA's expiry.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    ttl: Duration,
    /// DNS SAN to add (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// Trust domain of a CA certificate that names none (e.g. one made by
    /// Istio's tooling).
    #[arg(long, value_name = "TD")]
    trust_domain: Option<TrustDomain>,
    /// Replace an existing key.pem.
    #[arg(long)]
    force: bool,
}

/// Verify an X.509-SVID chain against a bundle. Exit 0 printing the SPIFFE
/// ID and expiry; exit 1 naming the failing certificate and the reason.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  strait ca verify --bundle root/root-cert.pem --chain cart/cert-chain.pem \\\n      --expect-id spiffe://example.org/ns/shop/sa/cart"
)]
struct Verify {
    /// Trusted roots: PEM (root-cert.pem) or a SPIFFE bundle (JSON).
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// The chain: leaf first, then intermediates (PEM).
    #[arg(long, value_name = "FILE")]
    chain: PathBuf,
    /// Also require this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    expect_id: Option<SpiffeId>,
    /// Require the leaf to be in this trust domain.
    #[arg(long, value_name = "TD")]
    trust_domain: Option<TrustDomain>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: Output,
}

/// Show every certificate in a PEM file (or SPIFFE bundle): subject,
/// issuer, SANs, SPIFFE ID, validity, CA/pathLen, SHA-256 fingerprint.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  strait ca inspect east/cacerts/cert-chain.pem -o json")]
struct Inspect {
    /// PEM file with one or more certificates, or a SPIFFE bundle (JSON).
    file: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: Output,
}

/// Check a SPIFFE ID against the SPIFFE specification. Exit 0 printing its
/// trust domain and path; exit 1 naming the broken rule.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  strait ca check-id spiffe://example.org/ns/shop/sa/cart")]
struct CheckId {
    /// The SPIFFE ID to check.
    id: String,
}

/// Convert trust bundles between PEM and the SPIFFE bundle format.
#[derive(Debug, Subcommand)]
enum BundleCommand {
    Export(BundleExport),
    Import(BundleImport),
}

/// Print a PEM bundle as a SPIFFE bundle (JWKS JSON) on stdout.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  strait ca bundle export --bundle root/root-cert.pem --trust-domain example.org --sequence 3 > example.org.json"
)]
struct BundleExport {
    /// PEM bundle (root-cert.pem).
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// Trust domain the bundle belongs to.
    #[arg(long, value_name = "TD")]
    trust_domain: TrustDomain,
    /// spiffe_sequence: bump it on every change of the bundle.
    #[arg(long, value_name = "N")]
    sequence: Option<u64>,
    /// spiffe_refresh_hint: how often consumers should refetch.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    refresh_hint: Option<Duration>,
}

/// Print the X.509 roots of a SPIFFE bundle (JSON) as PEM on stdout.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  strait ca bundle import example.org.json > root-cert.pem")]
struct BundleImport {
    /// SPIFFE bundle file (JSON).
    file: PathBuf,
}

pub fn run(args: CaArgs) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    match args.command {
        CaCommand::InitRoot(a) => init_root(a, now),
        CaCommand::IssueIntermediate(a) => issue_intermediate(a, now),
        CaCommand::Csr(a) => csr(a),
        CaCommand::SignIntermediate(a) => sign_intermediate(a, now),
        CaCommand::InstallIntermediate(a) => install_intermediate(a, now),
        CaCommand::IssueWorkload(a) => issue_workload(a, now),
        CaCommand::Verify(a) => verify(a, now),
        CaCommand::Inspect(a) => inspect(a),
        CaCommand::CheckId(a) => check_id(a),
        CaCommand::Bundle(BundleCommand::Export(a)) => bundle_export(a),
        CaCommand::Bundle(BundleCommand::Import(a)) => bundle_import(a),
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn init_root(a: InitRoot, now: OffsetDateTime) -> Result<()> {
    // Refuse before generating anything.
    layout::check_key_absent(&a.out, layout::ROOT_KEY, a.force)?;
    let root = Authority::create_root(
        &RootOptions {
            trust_domain: a.trust_domain.clone(),
            common_name: Some(a.common_name.clone()),
            validity: a.validity,
            key_algorithm: a.key_algorithm.into(),
        },
        now,
    )?;
    layout::write_root(&a.out, &root, a.force)?;
    println!(
        "root CA {:?} for trust domain {} valid until {} ({})",
        a.common_name,
        a.trust_domain,
        rfc3339(root.not_after()),
        format_duration(a.validity),
    );
    println!("  {}", a.out.join(layout::ROOT_CERT).display());
    println!(
        "  {} (private, mode 0600)",
        a.out.join(layout::ROOT_KEY).display()
    );
    Ok(())
}

fn issue_intermediate(a: IssueIntermediate, now: OffsetDateTime) -> Result<()> {
    let root = layout::load_root(&a.root, None)?;
    let bundle = layout::load_bundle(&a.root.join(layout::ROOT_CERT), None)?;
    layout::check_key_absent(&a.out, layout::CA_KEY, a.force)?;
    // The key is made here, for the cluster; only its CSR meets the root.
    let key = authority::generate_key(KeyAlgorithm::default())?;
    let csr = Csr::from_pem(authority::intermediate_csr(&a.cluster, &key)?.as_bytes())?;
    let issued = root.issue_intermediate(&csr, &a.cluster, a.validity, now)?;
    let mut chain = vec![issued.der.clone()];
    chain.extend(root.chain().iter().cloned());
    layout::write_plugin_ca(&a.out, &chain, Some(&key.serialize_pem()), &bundle, a.force)?;
    print_plugin_ca(
        &a.out,
        &a.cluster,
        issued.not_after,
        a.validity,
        root.not_after(),
    );
    Ok(())
}

fn print_plugin_ca(
    dir: &Path,
    cluster: &ClusterName,
    not_after: OffsetDateTime,
    asked: Duration,
    root_expiry: OffsetDateTime,
) {
    let capped = if not_after == root_expiry {
        " (capped by the root's expiry)"
    } else {
        ""
    };
    println!(
        "intermediate CA for cluster {cluster} valid until {}{capped}; asked for {}",
        rfc3339(not_after),
        format_duration(asked)
    );
    for (name, note) in [
        (layout::CA_CERT, ""),
        (layout::CA_KEY, " (private, mode 0600)"),
        (layout::CERT_CHAIN, " (intermediate, root)"),
        (layout::ROOT_CERT, " (trust bundle)"),
    ] {
        println!("  {}{note}", dir.join(name).display());
    }
}

fn csr(a: CsrCmd) -> Result<()> {
    layout::ensure_dir(&a.out)?;
    layout::check_key_absent(&a.out, layout::CA_KEY, a.force)?;
    let key = authority::generate_key(a.key_algorithm.into())?;
    let csr = authority::intermediate_csr(&a.cluster, &key)?;
    layout::write_key(&a.out.join(layout::CA_KEY), &key.serialize_pem(), a.force)?;
    layout::write_public(&a.out.join(layout::CA_CSR), &csr)?;
    println!("key and CSR for cluster {}:", a.cluster);
    println!(
        "  {} (private, mode 0600: keep it here)",
        a.out.join(layout::CA_KEY).display()
    );
    println!(
        "  {} (send this to the root's keeper)",
        a.out.join(layout::CA_CSR).display()
    );
    Ok(())
}

fn sign_intermediate(a: SignIntermediate, now: OffsetDateTime) -> Result<()> {
    let root = layout::load_root(&a.root, None)?;
    let csr_pem = layout::read(&a.csr)?;
    let csr = Csr::from_pem(&csr_pem).with_context(|| a.csr.display().to_string())?;
    let cluster = match (&a.cluster, csr.common_name()) {
        (Some(c), _) => c.clone(),
        (None, Some(cn)) => ClusterName::new(cn).with_context(|| {
            format!(
                "{}: subject CN {cn:?} is not a cluster name",
                a.csr.display()
            )
        })?,
        (None, None) => {
            return Err(UsageError(format!(
                "{}: the CSR has no subject CN; pass --cluster",
                a.csr.display()
            ))
            .into());
        }
    };
    let issued = root
        .issue_intermediate(&csr, &cluster, a.validity, now)
        .with_context(|| a.csr.display().to_string())?;
    let mut chain = vec![issued.der.as_slice()];
    chain.extend(root.chain().iter().map(Vec::as_slice));
    layout::write_public(&a.out, &pemfile::encode_certificates(chain))?;
    println!(
        "intermediate CA for cluster {cluster} ({}) valid until {}",
        csr.key_description(),
        rfc3339(issued.not_after)
    );
    println!("  {} (intermediate, root)", a.out.display());
    Ok(())
}

fn install_intermediate(a: InstallIntermediate, now: OffsetDateTime) -> Result<()> {
    let chain = pemfile::parse_certificates(&layout::read(&a.chain)?)
        .with_context(|| a.chain.display().to_string())?;
    let key_path = a.dir.join(layout::CA_KEY);
    let key = pemfile::parse_private_key(&layout::read(&key_path)?)
        .with_context(|| key_path.display().to_string())?;
    let ca = Authority::from_der(chain.clone(), key, None)
        .with_context(|| format!("{} does not fit {}", a.chain.display(), key_path.display()))?;
    let bundle = match &a.bundle {
        Some(path) => layout::load_bundle(path, Some(ca.trust_domain().clone()))?,
        None => TrustBundle::new(
            Some(ca.trust_domain().clone()),
            vec![ca.root_der().to_vec()],
        )?,
    };
    if !bundle.roots().iter().any(|r| r.as_slice() == ca.root_der()) {
        return Err(anyhow::anyhow!(
            "{}: does not contain the root the chain ends with",
            a.bundle.as_deref().unwrap_or(Path::new("bundle")).display()
        ));
    }
    layout::write_plugin_ca(&a.dir, &chain, None, &bundle, false)?;
    let summary = CertSummary::from_der(ca.certificate_der()).map_err(anyhow::Error::msg)?;
    let expires_in = ca.not_after() - now;
    println!(
        "installed intermediate {} (expires {}, in {} days)",
        summary.subject,
        summary.not_after,
        expires_in.whole_days()
    );
    for name in [layout::CA_CERT, layout::CERT_CHAIN, layout::ROOT_CERT] {
        println!("  {}", a.dir.join(name).display());
    }
    Ok(())
}

fn issue_workload(a: IssueWorkload, now: OffsetDateTime) -> Result<()> {
    let ca = if a.ca.join(layout::CA_KEY).exists() {
        layout::load_plugin_ca(&a.ca, a.trust_domain.as_ref())?
    } else if a.ca.join(layout::ROOT_KEY).exists() {
        layout::load_root(&a.ca, a.trust_domain.as_ref())?
    } else {
        return Err(UsageError(format!(
            "--ca {}: neither a plug-in CA directory ({}) nor a root directory ({})",
            a.ca.display(),
            layout::CA_KEY,
            layout::ROOT_KEY
        ))
        .into());
    };
    let bundle = layout::load_bundle(&a.ca.join(layout::ROOT_CERT), None)?;
    layout::check_key_absent(&a.out, layout::WORKLOAD_KEY, a.force)?;
    let key = authority::generate_key(KeyAlgorithm::default())?;
    // Through a real CSR, so the same rules apply as for a remote caller.
    let csr = Csr::from_pem(authority::leaf_csr(&a.spiffe_id, &a.dns, &key)?.as_bytes())?;
    let leaf = ca.issue_leaf(&csr, a.ttl, &AnyIdentityInTrustDomain, now)?;
    // cert-chain.pem: the leaf, then the CA's chain without the root.
    let intermediates = &ca.chain()[..ca.chain().len() - 1];
    layout::write_workload(
        &a.out,
        &leaf.der,
        intermediates,
        &key.serialize_pem(),
        &bundle,
        a.force,
    )?;
    println!(
        "workload certificate for {} valid until {}",
        a.spiffe_id,
        rfc3339(leaf.not_after)
    );
    for (name, note) in [
        (layout::CERT_CHAIN, " (leaf, intermediate)"),
        (layout::WORKLOAD_KEY, " (private, mode 0600)"),
        (layout::ROOT_CERT, " (trust bundle)"),
    ] {
        println!("  {}{note}", a.out.join(name).display());
    }
    Ok(())
}

fn verify(a: Verify, now: OffsetDateTime) -> Result<()> {
    let bundle = layout::load_bundle(&a.bundle, a.trust_domain.clone())?;
    let chain = pemfile::parse_certificates(&layout::read(&a.chain)?)
        .with_context(|| a.chain.display().to_string())?;
    let result = strait_ca::verify_svid(&chain, &bundle, now).and_then(|svid| {
        if let Some(expected) = &a.expect_id {
            strait_ca::verify::expect_id(&svid, expected)?;
        }
        Ok(svid)
    });
    match result {
        Ok(svid) => {
            let expires = rfc3339(svid.expires);
            let root = strait_ca::cert::fingerprint_sha256(&svid.root);
            match a.output {
                Output::Text => {
                    println!("spiffe_id: {}", svid.spiffe_id);
                    println!("expires: {expires}");
                    println!("root_sha256: {root}");
                }
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "valid": true,
                        "spiffe_id": svid.spiffe_id,
                        "expires": expires,
                        "root_sha256": root,
                    })
                ),
            }
            Ok(())
        }
        Err(e) => {
            if a.output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({ "valid": false, "reason": e.to_string() })
                );
            }
            Err(Rejected(format!("invalid: {}: {e}", a.chain.display())).into())
        }
    }
}

fn inspect(a: Inspect) -> Result<()> {
    let data = layout::read(&a.file)?;
    let ders = if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        TrustBundle::parse(&data, None)
            .with_context(|| a.file.display().to_string())?
            .roots()
            .to_vec()
    } else {
        pemfile::parse_certificates(&data).with_context(|| a.file.display().to_string())?
    };
    let summaries = ders
        .iter()
        .enumerate()
        .map(|(i, d)| {
            CertSummary::from_der(d)
                .map_err(|e| anyhow::anyhow!("{}: certificate #{}: {e}", a.file.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = std::io::stdout().lock();
    if a.output == Output::Json {
        serde_json::to_writer_pretty(&mut out, &summaries)?;
        writeln!(out)?;
        return Ok(());
    }
    for (i, s) in summaries.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        writeln!(out, "Certificate #{}", i + 1)?;
        let none = "(none)".to_string();
        let or_none = |v: &str| {
            if v.is_empty() {
                none.clone()
            } else {
                v.to_string()
            }
        };
        let mut sans: Vec<String> = s.sans.uris.iter().map(|u| format!("URI:{u}")).collect();
        sans.extend(s.sans.dns.iter().map(|d| format!("DNS:{d}")));
        sans.extend(s.sans.ips.iter().map(|d| format!("IP:{d}")));
        sans.extend(s.sans.other.iter().cloned());
        let ca = match (s.is_ca, s.path_len) {
            (true, Some(n)) => format!("yes, pathLen {n}"),
            (true, None) => "yes, no pathLen limit".to_string(),
            (false, _) => "no".to_string(),
        };
        let rows = [
            ("Subject", or_none(&s.subject)),
            ("Issuer", or_none(&s.issuer)),
            ("Serial", s.serial.clone()),
            (
                "SPIFFE ID",
                s.spiffe_id.clone().unwrap_or_else(|| none.clone()),
            ),
            ("SANs", or_none(&sans.join(", "))),
            ("Not before", s.not_before.clone()),
            ("Not after", s.not_after.clone()),
            ("CA", ca),
            ("Key usage", or_none(&s.key_usage.join(", "))),
            ("Ext key usage", or_none(&s.extended_key_usage.join(", "))),
            ("Public key", s.public_key.clone()),
            (
                "Self-signed",
                if s.self_signed { "yes" } else { "no" }.to_string(),
            ),
            ("SHA-256", s.sha256_fingerprint.clone()),
        ];
        for (k, v) in rows {
            writeln!(out, "  {:<14} {v}", format!("{k}:"))?;
        }
    }
    Ok(())
}

fn check_id(a: CheckId) -> Result<()> {
    match SpiffeId::parse(&a.id) {
        Ok(id) => {
            println!("trust_domain: {}", id.trust_domain_str());
            println!("path: {}", id.path());
            if let Some((ns, sa)) = id.workload_parts() {
                println!("namespace: {ns}");
                println!("service_account: {sa}");
            }
            Ok(())
        }
        Err(e) => Err(Rejected(format!("invalid SPIFFE ID {:?}: {e}", a.id)).into()),
    }
}

fn bundle_export(a: BundleExport) -> Result<()> {
    let mut bundle = layout::load_bundle(&a.bundle, Some(a.trust_domain))?;
    if let Some(seq) = a.sequence {
        bundle.set_sequence(seq);
    }
    if let Some(hint) = a.refresh_hint {
        bundle.set_refresh_hint(hint);
    }
    println!("{}", bundle.to_spiffe_json()?);
    Ok(())
}

fn bundle_import(a: BundleImport) -> Result<()> {
    let data = layout::read(&a.file)?;
    let bundle =
        TrustBundle::from_spiffe_json(&data, None).with_context(|| a.file.display().to_string())?;
    print!("{}", bundle.to_pem());
    Ok(())
}
