//! Certificates for the peer transport's mutual TLS: the cluster's certificate authority, node
//! certificates that bind a node id, and reading that identity back from a peer's certificate.
//!
//! A node's identity is the SAN URI `spiffe://<cluster id>/node/<node id>` of its certificate
//! (the SPIFFE ID form, so the same certificates work with SPIFFE-aware tooling). Every node
//! certificate is signed by the cluster's CA, carries both `serverAuth` and `clientAuth` (a node
//! dials and accepts), and also names the host's DNS names and IP addresses so that it can serve
//! the HTTP API over TLS. Keys are ECDSA P-256 (rcgen with ring).
//!
//! The CA's subject names its cluster (`O=<cluster id>`), so `herald cert node` issues for the
//! right cluster without being told. Private keys are written with mode 0600, and nothing is
//! overwritten unless asked to.
//!
//! This module only makes and reads certificates; `transport::tls` uses them on connections, and
//! `herald cert` (in `cli`) is the command line over it.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The CA certificate's file name in a CA directory (and the copy in a node's directory).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// A node certificate's file name in its directory.
pub const NODE_CERT_FILE: &str = "node.pem";
/// A node key's file name in its directory.
pub const NODE_KEY_FILE: &str = "node.key";

/// Default validity of a CA, in days (ten years).
pub const CA_DAYS: u32 = 3650;
/// Default validity of a node certificate, in days.
pub const NODE_DAYS: u32 = 365;

/// Why a certificate could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file exists and overwriting was not asked for.
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    /// Certificate generation or parsing failed.
    #[error("{what}: {message}")]
    Invalid {
        /// What was being done.
        what: String,
        /// What went wrong.
        message: String,
    },
}

fn invalid(what: impl Into<String>, message: impl fmt::Display) -> PkiError {
    PkiError::Invalid {
        what: what.into(),
        message: message.to_string(),
    }
}

/// The identity a node certificate binds: which node of which cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The cluster id.
    pub cluster: String,
    /// The node id (at least 1).
    pub node: u64,
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} of cluster {:?}", self.node, self.cluster)
    }
}

/// `spiffe://<cluster>/node/<id>`: the SAN URI that names a node.
pub fn spiffe_id(cluster: &str, node: u64) -> String {
    format!("spiffe://{cluster}/node/{node}")
}

/// Parses a [`spiffe_id`] back; `None` for any other URI.
pub fn parse_spiffe_id(uri: &str) -> Option<NodeIdentity> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (cluster, id) = rest.split_once("/node/")?;
    if cluster.is_empty() || !cluster_id_ok(cluster) || id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let node = id.parse().ok().filter(|n| *n > 0)?;
    Some(NodeIdentity {
        cluster: cluster.to_string(),
        node,
    })
}

/// Cluster ids that fit in a URI authority unchanged (the same rule as `cluster_id` itself).
fn cluster_id_ok(cluster: &str) -> bool {
    (1..=200).contains(&cluster.len())
        && cluster
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The node identity in a DER certificate: its one `spiffe://…/node/…` SAN URI. `None` when the
/// certificate does not parse, names no node, or names more than one (ambiguous, refused).
pub fn peer_identity(cert_der: &[u8]) -> Option<NodeIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut found = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(id) = parse_spiffe_id(uri) {
                if found.is_some() {
                    return None;
                }
                found = Some(id);
            }
        }
    }
    found
}

/// When a DER certificate expires, in Unix seconds.
pub fn not_after(cert_der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The first certificate of a PEM text, as DER.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    match rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(invalid("reading a PEM certificate", e)),
        None => Err(invalid("reading a PEM certificate", "no CERTIFICATE block found")),
    }
}

fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind the issuer's.
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    )
}

/// The cluster's certificate authority: its certificate and the key that signs node certificates.
pub struct Ca {
    /// The CA certificate, PEM.
    cert_pem: String,
    /// The CA key, PEM (kept to save it).
    key_pem: String,
    /// The cluster id named in the CA's subject.
    cluster: String,
    /// The signer.
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA for `cluster`, valid for [`CA_DAYS`].
    pub fn generate(cluster: &str) -> Result<Ca, PkiError> {
        Self::generate_for(cluster, CA_DAYS)
    }

    /// A new CA for `cluster`, valid for `days`.
    pub fn generate_for(cluster: &str, days: u32) -> Result<Ca, PkiError> {
        if !cluster_id_ok(cluster) {
            return Err(invalid(
                "making a CA",
                format!("{cluster:?} is not a valid cluster id (letters, digits, `.`, `_`, `-`)"),
            ));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("herald cluster CA ({cluster})"));
        dn.push(DnType::OrganizationName, cluster);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = validity(days);
        let key = KeyPair::generate().map_err(|e| invalid("generating the CA key", e))?;
        let cert = params.self_signed(&key).map_err(|e| invalid("signing the CA", e))?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            cluster: cluster.to_string(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let der = first_cert_der(cert_pem)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| invalid("reading the CA certificate", e))?;
        if !cert.is_ca() {
            return Err(invalid("reading the CA certificate", "it is not a CA certificate"));
        }
        let cluster = cert
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .filter(|c| cluster_id_ok(c))
            .ok_or_else(|| {
                invalid(
                    "reading the CA certificate",
                    "its subject names no cluster (O=<cluster id>); make the CA with `herald cert ca`",
                )
            })?
            .to_string();
        let key = KeyPair::from_pem(key_pem).map_err(|e| invalid("reading the CA key", e))?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(invalid(
                "reading the CA key",
                "the key does not belong to the CA certificate",
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| invalid("reading the CA certificate", e))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            cluster,
            issuer,
        })
    }

    /// Loads `dir/ca.pem` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert = read(&dir.join(CA_CERT_FILE), "cannot read the CA certificate")?;
        let key = read(&dir.join(CA_KEY_FILE), "cannot read the CA key")?;
        Ca::from_pem(&cert, &key)
    }

    /// Writes `dir/ca.pem` and `dir/ca.key` (mode 0600), creating `dir`; refuses to replace
    /// existing files unless `force`.
    pub fn save(&self, dir: &Path, force: bool) -> Result<(), PkiError> {
        write_pair(dir, (CA_CERT_FILE, &self.cert_pem), (CA_KEY_FILE, &self.key_pem), force)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The cluster this CA was made for.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// A certificate for node `node` of this CA's cluster, valid for `days`, naming `dns` and
    /// `ips` as well (for HTTP TLS).
    pub fn issue_node(&self, node: u64, dns: &[String], ips: &[IpAddr], days: u32) -> Result<NodeCert, PkiError> {
        if node == 0 {
            return Err(invalid("issuing a node certificate", "node ids start at 1"));
        }
        let what = format!("issuing the certificate of node {node}");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("herald node {node}"));
        dn.push(DnType::OrganizationName, self.cluster.as_str());
        params.distinguished_name = dn;
        let uri = spiffe_id(&self.cluster, node);
        params
            .subject_alt_names
            .push(SanType::URI(uri.clone().try_into().map_err(|e| invalid(&what, e))?));
        for name in dns {
            let name = name
                .clone()
                .try_into()
                .map_err(|e| invalid(&what, format!("DNS name {name:?}: {e}")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(days);
        let key = KeyPair::generate().map_err(|e| invalid(&what, e))?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| invalid(&what, e))?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
            identity: NodeIdentity {
                cluster: self.cluster.clone(),
                node,
            },
        })
    }
}

/// A node's certificate and key, with a copy of the CA certificate that signed it.
#[derive(Clone)]
pub struct NodeCert {
    /// The node certificate, PEM.
    pub cert_pem: String,
    /// The node's private key, PEM.
    pub key_pem: String,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// Who the certificate names.
    pub identity: NodeIdentity,
}

impl fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCert")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl NodeCert {
    /// Writes `dir/node.pem`, `dir/node.key` (mode 0600) and `dir/ca.pem`, creating `dir`;
    /// refuses to replace existing files unless `force`.
    pub fn save(&self, dir: &Path, force: bool) -> Result<(), PkiError> {
        if !force {
            let ca = dir.join(CA_CERT_FILE);
            if ca.exists() {
                return Err(PkiError::Exists(ca));
            }
        }
        write_pair(
            dir,
            (NODE_CERT_FILE, &self.cert_pem),
            (NODE_KEY_FILE, &self.key_pem),
            force,
        )?;
        write_file(&dir.join(CA_CERT_FILE), &self.ca_pem, false, true)
    }

    /// The paths [`save`](Self::save) writes in `dir`: (CA certificate, node certificate, key).
    pub fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join(CA_CERT_FILE),
            dir.join(NODE_CERT_FILE),
            dir.join(NODE_KEY_FILE),
        )
    }
}

fn read(path: &Path, what: &'static str) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn write_pair(dir: &Path, cert: (&str, &str), key: (&str, &str), force: bool) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        what: "cannot create the directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let (cert_path, key_path) = (dir.join(cert.0), dir.join(key.0));
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(PkiError::Exists(p.clone()));
            }
        }
    }
    write_file(&key_path, key.1, true, force)?;
    write_file(&cert_path, cert.1, false, force)
}

/// Writes `text` to `path` (0600 when `secret`), replacing it only when `replace`.
fn write_file(path: &Path, text: &str, secret: bool, replace: bool) -> Result<(), PkiError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let io = |source| PkiError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => PkiError::Exists(path.to_path_buf()),
        _ => io(e),
    })?;
    #[cfg(unix)]
    if secret {
        // An existing file keeps its mode on open: make sure a replaced key is private too.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_and_cluster() {
        let ca = Ca::generate("prod-eu").expect("ca");
        let node = ca
            .issue_node(7, &["herald-6".into()], &["127.0.0.1".parse().unwrap()], 30)
            .expect("node");
        let der = first_cert_der(&node.cert_pem).expect("der");
        assert_eq!(
            peer_identity(&der),
            Some(NodeIdentity {
                cluster: "prod-eu".into(),
                node: 7
            })
        );
        let left = not_after(&der).expect("parses") - time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(
            (30 * 86_400 - 60..=30 * 86_400).contains(&left),
            "valid for 30 days: {left} s left"
        );
        // The CA itself names no node.
        assert_eq!(peer_identity(&first_cert_der(ca.cert_pem()).unwrap()), None);
    }

    #[test]
    fn spiffe_ids_round_trip_and_others_are_refused() {
        assert_eq!(
            parse_spiffe_id(&spiffe_id("c-1.x", 42)),
            Some(NodeIdentity {
                cluster: "c-1.x".into(),
                node: 42
            })
        );
        for bad in [
            "spiffe://c/node/0",
            "spiffe://c/node/",
            "spiffe://c/node/1x",
            "spiffe:///node/1",
            "https://c/node/1",
            "spiffe://c/user/1",
            "spiffe://a/b/node/1",
        ] {
            assert_eq!(parse_spiffe_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_saved_ca_loads_back_and_keeps_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("blue").unwrap();
        ca.save(dir.path(), false).unwrap();
        let again = Ca::save(&ca, dir.path(), false).unwrap_err();
        assert!(matches!(again, PkiError::Exists(_)), "{again}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.cluster(), "blue");
        let node = loaded.issue_node(2, &[], &[], 1).unwrap();
        assert_eq!(node.identity.cluster, "blue");
        assert_eq!(node.ca_pem, ca.cert_pem());
    }

    #[test]
    fn a_ca_with_a_foreign_key_is_refused() {
        let a = Ca::generate("a").unwrap();
        let b = Ca::generate("a").unwrap();
        let err = Ca::from_pem(a.cert_pem(), &b.key_pem).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let node = a.issue_node(1, &[], &[], 1).unwrap();
        let err = Ca::from_pem(&node.cert_pem, &node.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn invalid_cluster_ids_are_refused() {
        assert!(Ca::generate("a/b").is_err());
        assert!(Ca::generate("").is_err());
    }
}
