//! Mutual TLS 1.3 on peer connections: the node's certificate material, the rustls
//! configurations built from it, their reload when the files change, and the stream type a
//! handshake yields.
//!
//! **Who is trusted.** A peer must present a certificate that chains to one of the CA
//! certificates in the node's CA file (several may be listed, to rotate the CA) and that names a
//! node of this cluster in its SAN URI (`spiffe://<cluster>/node/<id>`, see [`crate::pki`]).
//! Both sides check both things: the accepting side requires a client certificate (rustls's
//! WebPKI client verifier, so no certificate → no connection), and the dialing side checks the
//! server's chain with `PeerServerVerifier` (the chain only: nodes are not named by DNS, their
//! identity is the URI, which the handshake checks next). The node id a connection is
//! authenticated as is the one in the certificate; the handshake refuses a `Hello` that claims
//! another one (`handshake`).
//!
//! Only TLS 1.3 is offered, with ring's cipher suites, AES-128-GCM first (then AES-256-GCM and
//! ChaCha20-Poly1305): every frame between nodes is sealed, and AES-128 takes 10 rounds per block
//! where AES-256 takes 14 (ring's own order puts AES-256 first). Go's TLS, hence NATS, makes the
//! same choice on CPUs with AES instructions; AES-128-GCM is TLS 1.3's mandatory suite.
//!
//! **Reload.** [`PeerTls::reload_if_changed`] re-reads the three files and, when their content
//! changed, checks the new material exactly as at start, and swaps the
//! configurations for new connections; established connections keep their session. Bad new
//! material is refused with the reason and the old material stays in use. The peer bus calls it
//! every `reload_interval`. `herald_peer_tls_cert_not_after_seconds` says when the certificate in
//! use expires, and `herald_peer_tls_reloads_total{outcome}` counts reloads.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::record::{self, Sealed};
use crate::pki::{self, NodeIdentity};

/// The server name a dialer sends. Nodes are not identified by DNS names (the identity is the
/// certificate's SAN URI), so this is a constant that [`PeerServerVerifier`] does not check.
const SERVER_NAME: &str = "herald-peer";

/// Where a node's certificate material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate(s), PEM (several to rotate the CA).
    pub ca: PathBuf,
    /// This node's certificate (and any intermediates), PEM.
    pub cert: PathBuf,
    /// This node's private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Why certificate material was refused.
#[derive(Debug, thiserror::Error)]
#[error("peer TLS: {0}")]
pub struct TlsError(String);

impl TlsError {
    fn new(message: impl Into<String>) -> Self {
        TlsError(message.into())
    }
}

/// The node's peer TLS material and the rustls configurations made from it.
pub struct PeerTls {
    /// Who this node must be in its own certificate.
    identity: NodeIdentity,
    /// The files, when the material came from files (reloadable).
    files: Option<TlsFiles>,
    /// The files' contents when last read (compared by content: modification times can repeat
    /// within a clock tick, and a renewed certificate has the same size).
    stamp: Mutex<Option<Pems>>,
    /// The configurations new connections use.
    current: ArcSwap<Configs>,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("identity", &self.identity)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// One generation of configurations.
struct Configs {
    /// When the certificate expires (Unix seconds), if it parses.
    not_after: Option<i64>,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// The dialing side's certificate check (kept for tests that play a client by hand).
    #[cfg_attr(not(test), allow(dead_code))]
    verifier: Arc<PeerServerVerifier>,
}

impl PeerTls {
    /// Loads the material of node `node_id` of `cluster_id` from `files`, checking that the key
    /// matches the certificate, that the certificate chains to the CA, and that it names this
    /// node of this cluster.
    pub fn from_files(files: TlsFiles, cluster_id: &str, node_id: u64) -> Result<PeerTls, TlsError> {
        let identity = NodeIdentity {
            cluster: cluster_id.to_string(),
            node: node_id,
        };
        let pems = read_files(&files)?;
        let configs = build(&identity, &pems.0, &pems.1, &pems.2, Some(&files))?;
        record_expiry(&configs);
        Ok(PeerTls {
            identity,
            files: Some(files),
            stamp: Mutex::new(Some(pems)),
            current: ArcSwap::from_pointee(configs),
        })
    }

    /// Material given as PEM text (embedding, tests), checked like [`from_files`](Self::from_files);
    /// never reloaded.
    pub fn from_pem(ca: &str, cert: &str, key: &str, cluster_id: &str, node_id: u64) -> Result<PeerTls, TlsError> {
        let identity = NodeIdentity {
            cluster: cluster_id.to_string(),
            node: node_id,
        };
        let configs = build(&identity, ca, cert, key, None)?;
        record_expiry(&configs);
        Ok(PeerTls {
            identity,
            files: None,
            stamp: Mutex::new(None),
            current: ArcSwap::from_pointee(configs),
        })
    }

    /// The files this material is reloaded from, if any.
    pub fn files(&self) -> Option<&TlsFiles> {
        self.files.as_ref()
    }

    /// Re-reads the files when one of them changed since the last read, and uses the new material
    /// for new connections when it passes the same checks as at start. `Ok(true)`: reloaded;
    /// `Ok(false)`: nothing changed (or no files); `Err`: the new material is refused (the old one
    /// stays in use, and the same change is not reported again).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let pems = read_files(files)?;
        {
            let mut last = self.stamp.lock().unwrap_or_else(PoisonError::into_inner);
            if last.as_ref() == Some(&pems) {
                return Ok(false);
            }
            *last = Some(pems.clone());
        }
        let configs = match build(&self.identity, &pems.0, &pems.1, &pems.2, Some(files)) {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(super::TLS_RELOADS_TOTAL, "outcome" => "refused").increment(1);
                return Err(e);
            }
        };
        record_expiry(&configs);
        metrics::counter!(super::TLS_RELOADS_TOTAL, "outcome" => "ok").increment(1);
        self.current.store(Arc::new(configs));
        Ok(true)
    }

    /// The node's current client and server configurations (tests that drive rustls directly).
    #[cfg(test)]
    pub(crate) fn configs(&self) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let c = self.current.load();
        (c.client.clone(), c.server.clone())
    }

    /// A client configuration that trusts the cluster CA like a node but presents no certificate
    /// (for tests of that refusal).
    #[cfg(test)]
    pub(crate) fn anonymous_client(&self) -> Arc<ClientConfig> {
        let verifier = self.current.load().verifier.clone();
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// Runs the client side of the TLS handshake on `stream`.
    pub(crate) async fn connect<S>(&self, stream: S) -> io::Result<Sealed<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.current.load().client.clone();
        let name = ServerName::try_from(SERVER_NAME).expect("a valid constant server name");
        record::connect(config, name, stream).await
    }

    /// Runs the server side of the TLS handshake on `stream`.
    pub(crate) async fn accept<S>(&self, stream: S) -> io::Result<Sealed<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.current.load().server.clone();
        record::accept(config, stream).await
    }
}

fn record_expiry(configs: &Configs) {
    if let Some(t) = configs.not_after {
        metrics::gauge!(super::TLS_CERT_NOT_AFTER).set(t as f64);
    }
}

/// The node identity of the peer of a TLS connection: from its first certificate.
pub(crate) fn identity_of(certs: Option<&[CertificateDer<'_>]>) -> Option<NodeIdentity> {
    certs?.first().and_then(|c| pki::peer_identity(c))
}

type Pems = (String, String, String);

fn read_files(files: &TlsFiles) -> Result<Pems, TlsError> {
    let read = |p: &Path, what: &str| {
        std::fs::read_to_string(p).map_err(|e| TlsError::new(format!("cannot read the {what} {}: {e}", p.display())))
    };
    Ok((
        read(&files.ca, "CA certificate file")?,
        read(&files.cert, "node certificate file")?,
        read(&files.key, "node key file")?,
    ))
}

/// The ring provider with its TLS 1.3 suites only, AES-128-GCM first (see the module docs).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// Checks the material and builds both configurations.
fn build(
    identity: &NodeIdentity,
    ca: &str,
    cert: &str,
    key: &str,
    files: Option<&TlsFiles>,
) -> Result<Configs, TlsError> {
    let name = |pick: fn(&TlsFiles) -> &PathBuf, what: &str| match files {
        Some(f) => format!("{what} {}", pick(f).display()),
        None => what.to_string(),
    };
    let ca_name = name(|f| &f.ca, "the CA file");
    let cert_name = name(|f| &f.cert, "the certificate file");
    let key_name = name(|f| &f.key, "the key file");

    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        let c = c.map_err(|e| TlsError::new(format!("{ca_name}: {e}")))?;
        roots
            .add(c)
            .map_err(|e| TlsError::new(format!("{ca_name}: not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::new(format!("{ca_name} holds no certificate")));
    }
    let roots = Arc::new(roots);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::new(format!("{cert_name}: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::new(format!("{cert_name} holds no certificate")));
    };
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| TlsError::new(format!("{key_name}: {e}")))?;

    // The certificate must name this node of this cluster…
    match pki::peer_identity(leaf) {
        Some(id) if id == *identity => {}
        Some(id) => {
            return Err(TlsError::new(format!(
                "{cert_name} is for {id}, but this is {identity}; issue one with `herald cert node --id {}`",
                identity.node
            )))
        }
        None => {
            return Err(TlsError::new(format!(
                "{cert_name} names no herald node (a SAN URI {}); issue one with `herald cert node`",
                pki::spiffe_id(&identity.cluster, identity.node)
            )))
        }
    }
    // …and chain to the CA, which is what every peer will check.
    let provider = provider();
    let verifier = PeerServerVerifier {
        roots: roots.clone(),
        provider: provider.clone(),
    };
    verifier
        .verify_chain(leaf, &chain[1..], UnixTime::now())
        .map_err(|e| TlsError::new(format!("{cert_name} is not accepted by {ca_name}: {e}")))?;

    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::new(format!("{ca_name}: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::new(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::new(format!("{key_name} does not fit {cert_name}: {e}")))?;
    // After the handshake `record` seals the records itself; peers never resume a session.
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = 0;
    let not_after = pki::not_after(leaf);
    let verifier = Arc::new(verifier);
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::new(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::new(format!("{key_name} does not fit {cert_name}: {e}")))?;
    client.enable_secret_extraction = true;
    client.resumption = rustls::client::Resumption::disabled();
    Ok(Configs {
        not_after,
        client: Arc::new(client),
        server: Arc::new(server),
        verifier,
    })
}

/// The dialing side's check of the accepting node's certificate: it must chain to the cluster CA
/// and be valid for server authentication now. The name is not checked (nodes are dialed by
/// address, and their identity is the SAN URI, which the handshake compares with the node id it
/// dialed).
#[derive(Debug)]
struct PeerServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl PeerServerVerifier {
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_chain(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A peer connection's stream after the handshake: TLS, or plaintext with `--insecure-peers`.
pub enum PeerStream<S> {
    /// Plaintext (insecure peers, loopback only).
    Plain(S),
    /// Mutual TLS 1.3, its records sealed and opened by [`Sealed`].
    Tls(Box<Sealed<S>>),
}

impl<S> fmt::Debug for PeerStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerStream::Plain(_) => "PeerStream::Plain",
            PeerStream::Tls(_) => "PeerStream::Tls",
        })
    }
}

impl<S> PeerStream<S> {
    /// The underlying stream (to move a socket between runtimes; never to read or write it).
    pub fn io_mut(&mut self) -> &mut S {
        match self {
            PeerStream::Plain(s) => s,
            PeerStream::Tls(t) => t.get_mut(),
        }
    }

    /// Whether the connection is encrypted and mutually authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, PeerStream::Tls(_))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PeerStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PeerStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PeerStream::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerStream::Plain(s) => s.is_write_vectored(),
            PeerStream::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;

    fn material(ca: &Ca, node: u64) -> (String, String, String) {
        let n = ca.issue_node(node, &[], &[], 1).expect("issue");
        (n.ca_pem, n.cert_pem, n.key_pem)
    }

    #[test]
    fn material_for_another_node_or_cluster_or_ca_is_refused_at_load() {
        let ca = Ca::generate("c").unwrap();
        let (ca_pem, cert, key) = material(&ca, 2);
        PeerTls::from_pem(&ca_pem, &cert, &key, "c", 2).expect("its own material loads");
        let err = PeerTls::from_pem(&ca_pem, &cert, &key, "c", 3).unwrap_err().to_string();
        assert!(err.contains("is for node 2") && err.contains("--id 3"), "{err}");
        let err = PeerTls::from_pem(&ca_pem, &cert, &key, "other", 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster \"c\""), "{err}");
        let stranger = Ca::generate("c").unwrap();
        let err = PeerTls::from_pem(stranger.cert_pem(), &cert, &key, "c", 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not accepted"), "{err}");
        let (_, _, other_key) = material(&ca, 2);
        let err = PeerTls::from_pem(&ca_pem, &cert, &other_key, "c", 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[tokio::test]
    async fn two_nodes_agree_on_tls_1_3_with_aes_128_gcm_and_each_sees_the_others_id() {
        let ca = Ca::generate("c").unwrap();
        let (ca_pem, cert, key) = material(&ca, 1);
        let dialer = PeerTls::from_pem(&ca_pem, &cert, &key, "c", 1).unwrap();
        let (ca_pem, cert, key) = material(&ca, 2);
        let acceptor = PeerTls::from_pem(&ca_pem, &cert, &key, "c", 2).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, server) = tokio::join!(dialer.connect(a), acceptor.accept(b));
        let (client, server) = (client.expect("client side"), server.expect("server side"));
        for conn in [&client, &server] {
            // Sealed is TLS 1.3 only (the handshake fails otherwise).
            assert_eq!(conn.cipher_suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        }
        let id = |c: &Sealed<_>| identity_of(c.peer_certificates()).map(|i| i.node);
        assert_eq!(id(&client), Some(2));
        assert_eq!(id(&server), Some(1));
    }

    #[test]
    fn changed_files_are_reloaded_and_bad_ones_keep_the_old_material() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("c").unwrap();
        let node = ca.issue_node(1, &[], &[], 1).unwrap();
        node.save(dir.path(), false).unwrap();
        let (ca_path, cert, key) = pki::NodeCert::paths(dir.path());
        let tls = PeerTls::from_files(
            TlsFiles {
                ca: ca_path,
                cert: cert.clone(),
                key: key.clone(),
            },
            "c",
            1,
        )
        .unwrap();
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed");
        let before = Arc::as_ptr(&tls.current.load().client);
        let renewed = ca.issue_node(1, &[], &[], 2).unwrap();
        renewed.save(dir.path(), true).unwrap();
        assert!(tls.reload_if_changed().unwrap(), "a renewed certificate is picked up");
        assert_ne!(before, Arc::as_ptr(&tls.current.load().client));
        // A certificate for another node is refused and the renewed one stays.
        let wrong = ca.issue_node(9, &[], &[], 3).unwrap();
        wrong.save(dir.path(), true).unwrap();
        let kept = Arc::as_ptr(&tls.current.load().client);
        assert!(tls.reload_if_changed().is_err());
        assert_eq!(kept, Arc::as_ptr(&tls.current.load().client));
        assert!(
            !tls.reload_if_changed().unwrap(),
            "the same bad change is reported once"
        );
    }
}
