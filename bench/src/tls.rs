//! TLS for the benchmark's peers: which Herald peer transport a scenario runs (`--herald-peers`),
//! and NATS with TLS on its client connections and routes, with certificates from Herald's CA.
//!
//! Herald's node processes get their certificates from `herald::harness` (a CA in
//! `<cluster dir>/tls/`, one certificate per node). So that both systems trust the same root, the
//! NATS servers' certificates and the benchmark client's certificate are issued by that same CA
//! (`herald::pki::Ca::issue_node`: EKUs serverAuth and clientAuth, SANs DNS `localhost` and IP
//! 127.0.0.1, which is what a route to `127.0.0.1:port` and a client of `127.0.0.1` verify).
//! When no Herald cluster runs with mTLS (`--herald-peers plaintext`), a throwaway CA is made.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use herald::pki::{Ca, NodeCert};

/// Which Herald peer transport a scenario runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HeraldPeers {
    /// Mutual TLS 1.3 between nodes (the default of `herald::harness`, and of production).
    Mtls,
    /// Plaintext, unauthenticated peers (`--insecure-peers`, loopback only).
    Plaintext,
    /// Both, as two clusters measured in the same run, alternating.
    Both,
}

impl HeraldPeers {
    /// The clusters to start, the primary one first: `true` for plaintext (`--insecure-peers`).
    pub(super) fn variants(self) -> &'static [bool] {
        match self {
            HeraldPeers::Mtls => &[false],
            HeraldPeers::Plaintext => &[true],
            HeraldPeers::Both => &[false, true],
        }
    }
}

/// How a Herald variant is named in output: `herald` is mTLS (the default) unless it is alone
/// and plaintext.
pub(super) fn variant_name(insecure: bool) -> &'static str {
    if insecure {
        "herald-plaintext"
    } else {
        "herald-mtls"
    }
}

/// The CA directory the harness keeps in a cluster's directory.
pub(super) fn harness_ca_dir(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("tls")
}

/// PEM files of one TLS identity: the CA certificate to trust, the certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct TlsFiles {
    pub(super) ca: PathBuf,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

/// Node ids of the NATS certificates (their SPIFFE URI means nothing to NATS; the ids only keep
/// them apart from Herald's nodes 1, 2, 3).
const NATS_SERVER_ID_BASE: u64 = 100;
const NATS_CLIENT_ID: u64 = 200;

/// Issues the certificates of `servers` NATS servers and of the benchmark's NATS client under
/// `dir` (`dir/n<i>/`, `dir/client/`): the servers' files, then the client's.
pub(super) fn issue_nats(ca: &Ca, dir: &Path, servers: usize) -> Result<(Vec<TlsFiles>, TlsFiles), String> {
    let dns = ["localhost".to_string()];
    let ips = [IpAddr::from([127, 0, 0, 1])];
    let issue = |id: u64, sub: &str| -> Result<TlsFiles, String> {
        let out = dir.join(sub);
        ca.issue_node(id, &dns, &ips, herald::pki::NODE_DAYS)
            .and_then(|c| c.save(&out, true))
            .map_err(|e| format!("NATS certificate {}: {e}", out.display()))?;
        let (ca, cert, key) = NodeCert::paths(&out);
        Ok(TlsFiles { ca, cert, key })
    };
    let servers = (1..=servers)
        .map(|i| issue(NATS_SERVER_ID_BASE + i as u64, &format!("n{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((servers, issue(NATS_CLIENT_ID, "client")?))
}

/// A nats-server `tls { … }` block, indented by `indent` spaces: the server's certificate, the CA
/// that client (or route) certificates must chain to, and `verify: true` (a peer must present
/// one). The handshake timeout is 5 s, not the default 0.5 s: two cores under full load.
pub(super) fn nats_tls_block(indent: usize, f: &TlsFiles) -> String {
    let pad = " ".repeat(indent);
    format!(
        "{pad}tls {{\n{pad}  cert_file: {:?}\n{pad}  key_file: {:?}\n{pad}  ca_file: {:?}\n{pad}  verify: true\n{pad}  timeout: 5\n{pad}}}\n",
        f.cert.display().to_string(),
        f.key.display().to_string(),
        f.ca.display().to_string(),
    )
}

/// Whether a node's log shows the peer transport it was asked for: a node with plaintext peers
/// warns "insecure peers" at start, a node with mTLS does not.
pub(super) fn log_shows_peers(log: &str, insecure: bool) -> bool {
    log.contains("insecure peers") == insecure
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_blocks_name_the_files_and_require_client_certificates() {
        let f = TlsFiles {
            ca: "/t/ca.pem".into(),
            cert: "/t/n1/node.pem".into(),
            key: "/t/n1/node.key".into(),
        };
        let b = nats_tls_block(2, &f);
        assert!(b.starts_with("  tls {\n"), "{b}");
        assert!(b.contains("    cert_file: \"/t/n1/node.pem\"\n"), "{b}");
        assert!(b.contains("    key_file: \"/t/n1/node.key\"\n"), "{b}");
        assert!(b.contains("    ca_file: \"/t/ca.pem\"\n"), "{b}");
        assert!(b.contains("    verify: true\n"), "{b}");
        assert!(b.ends_with("  }\n"), "{b}");
    }

    #[test]
    fn nats_certificates_come_from_the_given_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("herald").unwrap();
        let (servers, client) = issue_nats(&ca, dir.path(), 3).unwrap();
        assert_eq!(servers.len(), 3);
        for f in servers.iter().chain([&client]) {
            assert_eq!(std::fs::read_to_string(&f.ca).unwrap(), ca.cert_pem());
            let pem = std::fs::read_to_string(&f.cert).unwrap();
            let der = herald::pki::first_cert_der(&pem).unwrap();
            assert_eq!(herald::pki::peer_identity(&der).unwrap().cluster, "herald");
            assert!(f.key.is_file());
        }
        assert_ne!(servers[0].cert, servers[1].cert);
    }

    #[test]
    fn variants_put_mtls_first_and_logs_tell_the_transport() {
        assert_eq!(HeraldPeers::Both.variants(), &[false, true]);
        assert_eq!(HeraldPeers::Mtls.variants(), &[false]);
        assert_eq!(HeraldPeers::Plaintext.variants(), &[true]);
        let warned = "WARN herald::node: insecure peers: the peer transport is plaintext";
        assert!(log_shows_peers(warned, true) && !log_shows_peers(warned, false));
        assert!(log_shows_peers("INFO listening", false));
        assert_eq!(variant_name(false), "herald-mtls");
    }
}
