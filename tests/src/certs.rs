//! The environment's PKI: one CA, the API server's serving certificate, an admin client
//! certificate (`system:masters`), the real node's kubelet and kube-proxy client certificates and the
//! service-account signing key, written as PEM files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Paths of the PEM files of one environment.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// The kubelet of the real node ([`crate::real_node::NODE_NAME`]), as the Node authorizer
    /// wants it: `system:node:<name>` in `system:nodes`.
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    /// The real node's kube-proxy: `system:kube-proxy`, which the built-in
    /// `system:node-proxier` binding authorizes.
    pub proxy_cert: PathBuf,
    pub proxy_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_public_key: PathBuf,
}

/// The in-cluster names of the API server (`kubernetes.default.svc`, its service IP) as well
/// as the loopback names clients use.
const SERVING_NAMES: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "10.96.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

impl Pki {
    /// Generate every key and certificate into `dir`.
    pub fn generate(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, pem: String| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };

        let ca = new_ca("gpumarket-env-ca")?;
        let ca_cert_path = write("ca.crt", ca.cert)?;
        let ca_key_path = write("ca.key", ca.key)?;
        let issuer = ca.issuer;
        let (serving_cert, serving_key) = serving("kube-apiserver", SERVING_NAMES, &issuer)?;

        let client = |name: &str, organization: &str| -> Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.distinguished_name.push(DnType::OrganizationName, organization);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        let (admin_cert, admin_key) = client("gpumarket-admin", "system:masters")?;
        let node_user = format!("system:node:{}", crate::real_node::NODE_NAME);
        let (node_cert, node_key) = client(&node_user, "system:nodes")?;
        let (proxy_cert, proxy_key) = client("system:kube-proxy", "gpumarket-env")?;

        let service_account = KeyPair::generate()?;
        Ok(Pki {
            ca_cert: ca_cert_path,
            ca_key: ca_key_path,
            serving_cert: write("apiserver.crt", serving_cert)?,
            serving_key: write("apiserver.key", serving_key)?,
            admin_cert: write("admin.crt", admin_cert)?,
            admin_key: write("admin.key", admin_key)?,
            node_cert: write("node.crt", node_cert)?,
            node_key: write("node.key", node_key)?,
            proxy_cert: write("kube-proxy.crt", proxy_cert)?,
            proxy_key: write("kube-proxy.key", proxy_key)?,
            service_account_key: write("service-account.key", service_account.serialize_pem())?,
            service_account_public_key: write(
                "service-account.pub",
                service_account.public_key_pem(),
            )?,
        })
    }
}

/// A CA: its certificate and key (PEM), and what signs with it.
struct Ca {
    cert: String,
    key: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> Result<Ca> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?.pem();
    Ok(Ca { cert, key: key.serialize_pem(), issuer: Issuer::new(params, key) })
}

/// A serving certificate of `common_name` for `names` (IP addresses or DNS names), signed by
/// `issuer`, and its key (PEM).
fn serving(
    common_name: &str,
    names: &[&str],
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName((*name).try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}

/// A TLS identity of its own for a server that clients reach at `address`, which the API
/// server's certificate does not name: a new CA, and a serving certificate signed by it.
pub struct ServingIdentity {
    /// What clients trust (PEM).
    pub ca_cert: String,
    /// The server's certificate and key (PEM).
    pub cert: String,
    pub key: String,
}

impl ServingIdentity {
    pub fn generate(common_name: &str, address: &str) -> Result<ServingIdentity> {
        let ca = new_ca(&format!("{common_name}-ca"))?;
        let (cert, key) = serving(common_name, &[address], &ca.issuer)?;
        Ok(ServingIdentity { ca_cert: ca.cert, cert, key })
    }
}
