//! Who is on the other end of a control connection.
//!
//! Every node holds a certificate issued by the overlay's own CA that names
//! it: the subject's common name is its topology name and its organisation
//! says it is a node (`overlay node`); its alternative names are that name
//! and every address the topology gives it, so a peer dialling any of them
//! can check it. The operator's tools hold a certificate of the same CA
//! whose organisation is `overlay operator`. Control connections are TLS
//! with the client certificate optional: clients of a POP (viewers) have
//! none, nodes and operators present theirs, and each service decides from
//! [`Peer`] what the caller may do.
//!
//! `onode certs` writes the CA and the certificates into a folder (the
//! "TLS folder"); every node and tool is given that folder and picks its
//! own files from it by name.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use overlay_core::topology::Topology;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Organisation of node certificates.
pub const NODE_ORG: &str = "overlay node";
/// Organisation of operator certificates.
pub const OPERATOR_ORG: &str = "overlay operator";
/// The operator certificate's name in the TLS folder.
pub const OPERATOR: &str = "operator";
const CA_NAME: &str = "overlay CA";

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A node of the overlay, by its topology name.
    Node(String),
    /// An operator (admin tools).
    Operator(String),
    /// No certificate (a viewer), or TLS is off.
    Anonymous,
}

impl Peer {
    /// The peer of a request, from the client certificate the TLS layer
    /// verified against the CA (no verified certificate: anonymous).
    pub fn of<T>(request: &tonic::Request<T>) -> Peer {
        let Some(certs) = request.peer_certs() else { return Peer::Anonymous };
        certs.first().map(|der| Peer::from_der(der)).unwrap_or(Peer::Anonymous)
    }

    /// The peer a verified leaf certificate names.
    pub fn from_der(der: &[u8]) -> Peer {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Peer::Anonymous };
        let subject = cert.subject();
        let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
            it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
        };
        let name = first(&mut subject.iter_common_name());
        let org = first(&mut subject.iter_organization());
        match (org.as_deref(), name) {
            (Some(NODE_ORG), Some(name)) => Peer::Node(name),
            (Some(OPERATOR_ORG), Some(name)) => Peer::Operator(name),
            _ => Peer::Anonymous,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Node(n) => write!(f, "node {n}"),
            Peer::Operator(n) => write!(f, "operator {n}"),
            Peer::Anonymous => f.write_str("an unauthenticated caller"),
        }
    }
}

/// One party's TLS material, read from a TLS folder.
#[derive(Clone)]
pub struct Tls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the identity's certificate was issued to.
    pub name: Option<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish_non_exhaustive()
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

impl Tls {
    /// The CA alone: enough to check the servers one talks to (viewers).
    pub fn ca_only(dir: &Path) -> anyhow::Result<Tls> {
        Ok(Tls { ca: read(&dir.join("ca.pem")).context("TLS folder")?, identity: None, name: None })
    }

    /// The CA and the certificate issued to `name` (a node, or
    /// [`OPERATOR`] for the tools).
    pub fn load(dir: &Path, name: &str) -> anyhow::Result<Tls> {
        let mut tls = Tls::ca_only(dir)?;
        let cert = dir.join(format!("{name}.pem"));
        if !cert.exists() {
            bail!(
                "the TLS folder {} has no certificate for {name:?} ({} is missing): run `onode certs` for it",
                dir.display(),
                cert.display()
            );
        }
        let key = dir.join(format!("{name}.key"));
        let cert = read(&cert)?;
        let peer = pem_to_der(&cert).map(|der| Peer::from_der(&der));
        match peer {
            Some(Peer::Node(n) | Peer::Operator(n)) if n == name => {}
            other => bail!("{}/{name}.pem does not name {name:?} (it names {other:?})", dir.display()),
        }
        tls.identity = Some((cert, read(&key)?));
        tls.name = Some(name.to_string());
        Ok(tls)
    }

    /// The private key's PEM text (empty without an identity): the secret
    /// the bootstrapper derives link keys from.
    pub fn private_key(&self) -> &[u8] {
        self.identity.as_ref().map(|(_, key)| key.as_slice()).unwrap_or_default()
    }

    /// Server side: our certificate; callers may present one of the CA's.
    pub fn server_config(&self) -> anyhow::Result<ServerTlsConfig> {
        let (cert, key) = self.identity.as_ref().context("a TLS server needs a certificate")?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true))
    }

    /// Client side toward a server that must prove it is `server_name` (a
    /// node's topology name, or one of its addresses).
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca)).domain_name(server_name);
        match &self.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

fn pem_to_der(pem: &[u8]) -> Option<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    Some(p.contents)
}

/// What `onode certs` wrote.
pub struct Issued {
    pub dir: PathBuf,
    pub new_ca: bool,
    pub names: Vec<String>,
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates (or reuses) the CA in `dir` and issues a certificate to every
/// node of `topology` and to the operator, valid for `days`.
pub fn issue(topology: &Topology, dir: &Path, days: u32, new_ca: bool) -> anyhow::Result<Issued> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let reuse = !new_ca && ca_pem.exists() && ca_key.exists();
    let params = ca_params()?;
    let key = if reuse {
        let text = std::fs::read_to_string(&ca_key).with_context(|| format!("cannot read {}", ca_key.display()))?;
        KeyPair::from_pem(&text).with_context(|| format!("{} is not a private key", ca_key.display()))?
    } else {
        let key = KeyPair::generate()?;
        let mut params = params.clone();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days.max(1)) * 10);
        let cert = params.self_signed(&key)?;
        write_private(&ca_key, &key.serialize_pem())?;
        std::fs::write(&ca_pem, cert.pem()).with_context(|| format!("cannot write {}", ca_pem.display()))?;
        key
    };
    let issuer = Issuer::new(params, key);
    let mut names = Vec::new();
    let mut leaf = |name: &str, org: &str, alt: Vec<String>, server: bool| -> anyhow::Result<()> {
        let mut params = CertificateParams::new(alt).with_context(|| format!("names of {name}"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, org);
        params.distinguished_name = dn;
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days.max(1)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).with_context(|| format!("cannot write {}", path.display()))?;
        names.push(name.to_string());
        Ok(())
    };
    for node in topology.nodes() {
        if node.name == OPERATOR || node.name == "ca" {
            bail!("a node may not be called {:?}: the TLS folder uses that name", node.name);
        }
        let mut alt = vec![node.name.clone()];
        let addrs: std::collections::BTreeSet<IpAddr> = node.names.iter().chain(&node.pop).copied().collect();
        alt.extend(addrs.iter().map(IpAddr::to_string));
        leaf(&node.name, NODE_ORG, alt, true)?;
    }
    leaf(OPERATOR, OPERATOR_ORG, vec![OPERATOR.to_string()], false)?;
    Ok(Issued { dir: dir.to_path_buf(), new_ca: !reuse, names })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::parse(
            r#"{"s1": {"neighbours": ["10.0.0.2"], "names": ["10.0.0.1"]},
                "o1": {"neighbours": ["10.0.0.1s"], "names": ["10.0.0.2", "10.0.1.1"], "pop": ["10.0.1.1"]}}"#,
        )
        .unwrap()
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("onode-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn issued_certificates_name_their_holders() {
        let dir = tempdir("names");
        let issued = issue(&topology(), &dir, 30, false).unwrap();
        assert!(issued.new_ca);
        assert_eq!(issued.names, ["o1", "s1", "operator"]);
        let tls = Tls::load(&dir, "o1").unwrap();
        assert_eq!(tls.name.as_deref(), Some("o1"));
        let der = pem_to_der(&std::fs::read(dir.join("o1.pem")).unwrap()).unwrap();
        assert_eq!(Peer::from_der(&der), Peer::Node("o1".into()));
        let der = pem_to_der(&std::fs::read(dir.join("operator.pem")).unwrap()).unwrap();
        assert_eq!(Peer::from_der(&der), Peer::Operator("operator".into()));
        // The CA itself is nobody.
        let der = pem_to_der(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
        assert_eq!(Peer::from_der(&der), Peer::Anonymous);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join("ca.key")).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "the CA key is private");
        // A second run keeps the CA, so certificates issued before stay valid.
        let ca = std::fs::read(dir.join("ca.pem")).unwrap();
        assert!(!issue(&topology(), &dir, 30, false).unwrap().new_ca);
        assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_certificate_for_another_name_is_refused_at_load() {
        let dir = tempdir("swap");
        issue(&topology(), &dir, 30, false).unwrap();
        std::fs::copy(dir.join("s1.pem"), dir.join("o1.pem")).unwrap();
        let err = Tls::load(&dir, "o1").err().unwrap().to_string();
        assert!(err.contains("does not name \"o1\""), "{err}");
        let err = Tls::load(&dir, "o9").err().unwrap().to_string();
        assert!(err.contains("no certificate for \"o9\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
