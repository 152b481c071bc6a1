//! Mutual TLS between coordinator and agents: loading PEM files (refusing private keys others can
//! read), the agent's server configuration and its coordinator-only gate, and the coordinator's
//! connector that accepts an agent only when its certificate names the node the inventory expects.
//! Both sides check the CA's revocation list when their config names one.

use crate::identity::{self, IdentityError, PeerIdentity};
use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::CertificateRevocationListDer;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

/// Where a party's CA, certificate and key live, and the CA's revocation list if it has one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `crl.pem` of `bbupgrade pki`: certificates on it are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// The PEM contents of [`TlsFiles`], read once.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The CA's revocation list, when configured.
    pub crl_pem: Option<Vec<u8>>,
}

impl TlsFiles {
    /// The files `bbupgrade pki` writes for a role and name in a PKI directory.
    pub fn in_pki_dir(dir: &Path, role: identity::Role, name: &str) -> Self {
        let (cert, key) = crate::pki::leaf_paths(dir, role, name);
        Self {
            ca: dir.join(crate::pki::CA_CERT_FILE),
            cert,
            key,
            crl: None,
        }
    }

    /// Reads and checks the files: a private key others can read, a certificate or CRL that does
    /// not parse, or a CRL of another CA is an error naming the file.
    pub fn load(&self) -> Result<TlsMaterial> {
        let read = |what: &str, p: &Path| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        crate::keyfile::check_private(&self.key)?;
        let m = TlsMaterial {
            ca_pem: read("CA certificate", &self.ca)?,
            cert_pem: read("certificate", &self.cert)?,
            key_pem: read("private key", &self.key)?,
            crl_pem: self
                .crl
                .as_deref()
                .map(|p| read("revocation list", p))
                .transpose()?,
        };
        if let Some(crl) = &self.crl {
            m.crls().with_context(|| format!("in {}", crl.display()))?;
            crate::pki::check_crl_of_ca(m.crl_pem.as_deref().unwrap_or_default(), &m.ca_pem)
                .with_context(|| {
                    format!(
                        "the revocation list {} is not one of the CA {}",
                        crl.display(),
                        self.ca.display()
                    )
                })?;
        }
        m.certs()
            .with_context(|| format!("in {}", self.cert.display()))?;
        m.roots()
            .with_context(|| format!("in {}", self.ca.display()))?;
        m.key()
            .with_context(|| format!("in {}", self.key.display()))?;
        Ok(m)
    }
}

impl TlsMaterial {
    fn certs(&self) -> Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .context("parsing PEM certificates")?;
        anyhow::ensure!(!certs.is_empty(), "no certificate found in PEM");
        Ok(certs)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(&self.key_pem).context("parsing the PEM private key")
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            roots
                .add(cert.context("parsing the CA PEM")?)
                .context("adding the CA certificate")?;
        }
        anyhow::ensure!(!roots.is_empty(), "no CA certificate found in PEM");
        Ok(roots)
    }

    fn crls(&self) -> Result<Vec<CertificateRevocationListDer<'static>>> {
        let Some(pem) = &self.crl_pem else {
            return Ok(Vec::new());
        };
        let crls = CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the PEM revocation list")?;
        anyhow::ensure!(!crls.is_empty(), "no revocation list found in PEM");
        Ok(crls)
    }

    /// The identity in our own certificate (to check an agent was given its own node's certificate).
    pub fn own_identity(&self) -> Result<PeerIdentity> {
        let certs = self.certs()?;
        Ok(identity::identity_of(&certs[0])?)
    }
}

/// The agent's TLS: its certificate, and client certificates verified against the CA (and its
/// revocation list). A client without a certificate still completes the handshake so
/// [`CoordinatorGate`] can refuse it with a reason the caller sees, instead of an opaque alert.
pub fn agent_server_config(m: &TlsMaterial) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(m.roots()?), provider.clone())
            .allow_unauthenticated();
    let crls = m.crls()?;
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier
        .build()
        .context("building the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.certs()?, m.key()?)
        .context("loading the agent's certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What identifies a version of a file, to notice it was replaced.
type FileStamp = (std::time::SystemTime, u64, u64);

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The agent's server configuration, rebuilt when its CRL file changes: a `crl.pem` copied to the
/// node after `pki revoke` applies to new connections without a restart. A replacement that does
/// not load (unreadable, another CA's) is logged and the list loaded before stays in force.
pub struct AgentServerConfig {
    material: TlsMaterial,
    crl_file: Option<PathBuf>,
    current: std::sync::Mutex<(Option<FileStamp>, Arc<rustls::ServerConfig>)>,
}

impl AgentServerConfig {
    /// `material` as loaded at start (its CRL from `crl_file`, when set).
    pub fn new(material: TlsMaterial, crl_file: Option<PathBuf>) -> Result<Self> {
        let seen = crl_file.as_deref().and_then(stamp);
        let config = Arc::new(agent_server_config(&material)?);
        Ok(Self {
            material,
            crl_file,
            current: std::sync::Mutex::new((seen, config)),
        })
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.crl_file {
            let now = stamp(path);
            if now != cur.0 {
                cur.0 = now;
                match self.reload(path) {
                    Ok((config, revoked)) => {
                        tracing::info!(crl = %path.display(), revoked, "loaded the changed revocation list");
                        cur.1 = Arc::new(config);
                    }
                    Err(e) => tracing::error!(
                        crl = %path.display(),
                        error = format!("{e:#}"),
                        "the revocation list changed but cannot be used; the one loaded before stays in force"
                    ),
                }
            }
        }
        cur.1.clone()
    }

    fn reload(&self, path: &Path) -> Result<(rustls::ServerConfig, usize)> {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let revoked = crate::pki::check_crl_of_ca(&pem, &self.material.ca_pem)?;
        let m = TlsMaterial {
            crl_pem: Some(pem),
            ..self.material.clone()
        };
        Ok((agent_server_config(&m)?, revoked))
    }
}

/// The agent's gate: only coordinator-role peers pass, and only the listed ones when the agent's
/// config lists them (`[tls] allowed_coordinators`).
#[derive(Clone, Debug, Default)]
pub struct CoordinatorGate {
    allowed: Option<Arc<BTreeSet<String>>>,
}

impl CoordinatorGate {
    /// `None`: any coordinator of the CA.
    pub fn new(allowed: Option<impl IntoIterator<Item = String>>) -> Self {
        Self {
            allowed: allowed.map(|names| Arc::new(names.into_iter().collect())),
        }
    }

    /// Who the peer is, if it may drive this agent.
    pub fn admit(
        &self,
        peer_certs: Option<&[impl AsRef<[u8]>]>,
    ) -> Result<PeerIdentity, IdentityError> {
        identity::require_allowed_coordinator(peer_certs, self.allowed.as_deref())
    }

    /// The gate as a tonic interceptor.
    #[allow(clippy::result_large_err)]
    pub fn intercept(&self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let certs = req.peer_certs();
        match self.admit(certs.as_deref().map(|c| c.as_slice())) {
            Ok(peer) => {
                tracing::debug!(%peer, "accepted peer");
                Ok(req)
            }
            Err(e) => {
                tracing::warn!(reason = %e, remote = ?req.remote_addr(), "refused a peer");
                Err(match e {
                    IdentityError::NoCertificate => tonic::Status::unauthenticated(e.to_string()),
                    _ => tonic::Status::permission_denied(e.to_string()),
                })
            }
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies an agent's certificate: signed by our CA, valid now, not revoked, and naming the
/// expected node. Host names are not checked: the node identity in the SAN URI is what the
/// coordinator trusts.
#[derive(Debug)]
struct AgentVerifier {
    roots: RootCertStore,
    crls: Vec<webpki::CertRevocationList<'static>>,
    expected_node: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl AgentVerifier {
    /// rustls' chain check takes no CRLs (and its verifier with CRLs insists on a host name), so
    /// revocation is checked with webpki directly, after the chain passed.
    fn check_revocation(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        if self.crls.is_empty() {
            return Ok(());
        }
        let crls: Vec<&webpki::CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = webpki::RevocationOptionsBuilder::new(&crls)
            .map_err(|_| rustls::Error::General("no revocation list".into()))?
            .with_depth(webpki::RevocationCheckDepth::EndEntity)
            .build();
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("parsing the agent certificate: {e}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(revocation),
            None,
        )
        .map(|_| ())
        .map_err(|e| match e {
            webpki::Error::CertRevoked => {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            }
            webpki::Error::UnknownRevocationStatus => {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownRevocationStatus)
            }
            other => rustls::Error::General(format!("checking revocation: {other}")),
        })
    }
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        self.check_revocation(end_entity, intermediates, now)?;
        identity::require_agent(end_entity, &self.expected_node)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The coordinator's rustls client configuration for one agent.
pub fn agent_client_config(m: &TlsMaterial, expected_node: &str) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let crls = m
        .crls()?
        .iter()
        .map(|der| {
            webpki::OwnedCertRevocationList::from_der(der.as_ref())
                .map(webpki::CertRevocationList::from)
                .map_err(|e| anyhow::anyhow!("parsing the revocation list: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let verifier = AgentVerifier {
        roots: m.roots()?,
        crls,
        expected_node: expected_node.to_string(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(m.certs()?, m.key()?)
        .context("loading the client certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Opens a gRPC channel to the agent at `addr` (`host:port`), over mutual TLS, accepting it only if
/// its certificate names `expected_node`. Fails within `connect_timeout` when the agent is away.
pub async fn connect_agent(
    addr: &str,
    m: &TlsMaterial,
    expected_node: &str,
    connect_timeout: Duration,
) -> Result<Channel> {
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(agent_client_config(m, expected_node)?));
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .with_context(|| format!("agent address '{addr}' must be host:port"))?;
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("agent host '{host}' is not a valid name or address"))?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("agent address '{addr}'"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let target = addr.to_string();
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let mut tls = connector.connect(server_name, tcp).await?;
            await_server_verdict(&mut tls).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }));
    let channel = tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer from the agent at {addr} within {connect_timeout:?}")
        })?
        .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
        .with_context(|| format!("connecting to the agent of node '{expected_node}' at {addr}"))?;
    Ok(channel)
}

/// How long to wait after the handshake for the agent's verdict on our certificate.
const VERDICT_WAIT_MS: u64 = 2000;

/// In TLS 1.3 the client's handshake is over before the server has checked the client's
/// certificate; a refusal (expired, unknown CA) arrives as an alert after it, and whether the caller
/// then sees that alert or a bare "broken pipe" depends on timing. So read what the agent sends
/// first (its session tickets, or the alert) into the connection's own buffers, where HTTP/2 finds
/// it later, and fail with the alert. Gives up waiting after [`VERDICT_WAIT_MS`].
async fn await_server_verdict(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
) -> std::io::Result<()> {
    struct TryRead<'a>(&'a TcpStream);
    impl std::io::Read for TryRead<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.try_read(buf)
        }
    }
    let (tcp, conn) = tls.get_mut();
    if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Ok(());
    }
    let wait = async {
        loop {
            tcp.readable().await?;
            match conn.read_tls(&mut TryRead(tcp)) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the agent closed the connection right after the handshake",
                    ));
                }
                Ok(_) => {
                    conn.process_new_packets()
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(Duration::from_millis(VERDICT_WAIT_MS), wait).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// An error with its sources, one line: TLS and transport errors hide the reason deep in the chain.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        src = s.source();
    }
    parts.join(": ")
}
