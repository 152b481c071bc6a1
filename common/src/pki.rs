//! The private CA and the certificates it issues (rcgen): one CA per installation, a certificate per
//! agent and per coordinator, the role and name carried in a `spiffe://bbupgrade/<role>/<name>` SAN URI,
//! and the CA's revocation list (`crl.pem`) that `bbupgrade pki revoke` adds to.

use crate::identity::{PeerIdentity, Role, validate_name};
use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

mod crl;
pub use crl::{Revocation, check_crl_of_ca};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA's revocation list, written by `pki init` (empty) and `pki revoke`.
pub const CRL_FILE: &str = "crl.pem";
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Agents are long-lived servers; 397 days is the most public CAs may issue for, too.
pub const AGENT_VALIDITY_DAYS: i64 = 397;
/// A coordinator certificate is an admin's credential: short-lived, re-issued each quarter.
pub const COORDINATOR_VALIDITY_DAYS: i64 = 90;
/// How long a CRL says it is good for. Verifiers here do not enforce it (an expired list must not
/// lock every coordinator out); it is informative for other tools.
pub const CRL_VALIDITY_DAYS: i64 = 3650;
/// Longest validity `--days` accepts.
pub const MAX_LEAF_VALIDITY_DAYS: i64 = 3650;

/// How long a certificate of `role` lasts unless `--days` says otherwise.
pub fn default_validity_days(role: Role) -> i64 {
    match role {
        Role::Agent => AGENT_VALIDITY_DAYS,
        Role::Coordinator => COORDINATOR_VALIDITY_DAYS,
    }
}

/// A CA certificate with its key, able to issue leaf certificates.
pub struct Ca {
    pub cert_pem: String,
    key: KeyPair,
}

/// A certificate and its private key, in PEM.
pub struct Issued {
    pub identity: PeerIdentity,
    pub cert_pem: String,
    pub key_pem: String,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub role: Role,
    pub name: String,
    /// DNS names or IP addresses the holder is reached at (agents).
    pub sans: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl IssueRequest {
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            role,
            name: name.into(),
            sans: Vec::new(),
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(default_validity_days(role)),
        }
    }

    /// Valid for `days` from now instead of the role's default.
    pub fn with_days(mut self, days: i64) -> Result<Self> {
        if !(1..=MAX_LEAF_VALIDITY_DAYS).contains(&days) {
            bail!("--days {days}: give a number of days from 1 to {MAX_LEAF_VALIDITY_DAYS}");
        }
        self.not_after = OffsetDateTime::now_utc() + Duration::days(days);
        Ok(self)
    }

    pub fn with_sans(mut self, sans: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.sans.extend(sans.into_iter().map(Into::into));
        self
    }
}

impl Issued {
    pub fn cert_der(&self) -> Result<Vec<u8>> {
        pem_to_der(&self.cert_pem)
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())
        .context("parsing a PEM certificate")?
        .to_vec())
}

impl Ca {
    /// A fresh CA.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A name of its own per CA: verifiers pick a certificate's issuer by name, so two CAs both
        // called "bbupgrade private CA" turn a certificate of the other one into a "bad signature"
        // instead of the "unknown issuer" it is.
        let id: String = key.public_key_raw()[1..9]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        dn.push(DnType::CommonName, format!("bbupgrade private CA {id}"));
        dn.push(DnType::OrganizationName, "bbupgrade");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads `ca.pem` and `ca.key` from a PKI directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path).with_context(|| {
            format!(
                "reading {}; run `bbupgrade pki init --dir {}` first",
                cert_path.display(),
                dir.display()
            )
        })?;
        crate::keyfile::check_private(&key_path)?;
        let key_pem = fs::read_to_string(&key_path)
            .with_context(|| format!("reading the CA key {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing the CA key {}", key_path.display()))?;
        Ok(Self { cert_pem, key })
    }

    /// Writes `ca.pem` (0644), `ca.key` (0600) and an empty `crl.pem` (0644); refuses to overwrite
    /// an existing CA.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            bail!(
                "{} already exists; refusing to replace the CA (every certificate it issued would stop working)",
                key_path.display()
            );
        }
        write_secret(&key_path, &self.key.serialize_pem())?;
        write_public(&dir.join(CA_CERT_FILE), &self.cert_pem)?;
        let crl = self.sign_crl(&[], 1)?;
        write_public(&dir.join(CRL_FILE), &crl)
    }

    /// Issues a leaf certificate for an agent or a coordinator.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued> {
        validate_name(&req.name)?;
        let identity = PeerIdentity::new(req.role, req.name.clone());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{} {}", req.role, req.name));
        dn.push(DnType::OrganizationName, "bbupgrade");
        params.distinguished_name = dn;
        params.subject_alt_names.push(SanType::URI(
            identity
                .uri()
                .try_into()
                .context("encoding the identity URI")?,
        ));
        for san in &req.sans {
            params.subject_alt_names.push(match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(san) => SanType::DnsName(san.clone().try_into()?),
                Err(_) => bail!("--san '{san}' is neither an IP address nor a DNS name"),
            });
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        // Agents are servers to the coordinator and, on a load-balancer host, clients of nothing
        // else; client auth is kept on them so a misused agent certificate reaches the identity
        // check and is refused with its role named, not with an opaque TLS alert.
        params.extended_key_usages = match req.role {
            Role::Agent => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Coordinator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.not_before = req.not_before;
        params.not_after = req.not_after;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a key")?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .context("loading the CA as issuer")?;
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing the certificate")?;
        Ok(Issued {
            identity,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        })
}

/// Where `pki issue` writes a certificate and key for a role and name.
pub fn leaf_paths(dir: &Path, role: Role, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{role}-{name}.pem")),
        dir.join(format!("{role}-{name}.key")),
    )
}

impl Issued {
    /// Writes `<role>-<name>.pem` (0644) and `.key` (0600) into a PKI directory; returns their
    /// paths. Refuses to replace an existing certificate or key (see [`Issued::save_replacing`]).
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let (cert, key) = leaf_paths(dir, self.identity.role, &self.identity.name);
        for p in [&cert, &key] {
            if fs::symlink_metadata(p).is_ok() {
                bail!(
                    "{} already exists; refusing to replace the certificate of {} (give --force to replace it, and `bbupgrade pki revoke` the old one if it may be in the wrong hands)",
                    p.display(),
                    self.identity
                );
            }
        }
        self.save_replacing(dir)
    }

    /// Like [`Issued::save`], replacing an existing certificate and key.
    pub fn save_replacing(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let (cert, key) = leaf_paths(dir, self.identity.role, &self.identity.name);
        write_secret(&key, &self.key_pem)?;
        write_public(&cert, &self.cert_pem)?;
        Ok((cert, key))
    }
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("key.tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Writes a certificate or CRL: 0644 whatever the umask (agents running as another user read it).
fn write_public(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("pem.tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // The umask may have taken bits away from (or, at 000, left group write on) the mode asked
    // for; set it on the handle.
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issues_into_a_directory_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        ca.save(dir.path()).unwrap();
        assert!(
            Ca::generate().unwrap().save(dir.path()).is_err(),
            "must not replace a CA"
        );
        let ca = Ca::load(dir.path()).unwrap();
        let issued = ca
            .issue(
                &IssueRequest::new(Role::Agent, "node-1").with_sans(["127.0.0.1", "node1.example"]),
            )
            .unwrap();
        let (cert, key) = issued.save(dir.path()).unwrap();
        for k in [key, dir.path().join(CA_KEY_FILE)] {
            assert_eq!(
                fs::metadata(&k).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let der = pem_to_der(&fs::read_to_string(cert).unwrap()).unwrap();
        assert_eq!(
            crate::identity::identity_of(&der).unwrap(),
            PeerIdentity::new(Role::Agent, "node-1")
        );
        assert!(
            ca.issue(&IssueRequest::new(Role::Agent, "bad/name"))
                .is_err()
        );
        assert!(
            ca.issue(&IssueRequest::new(Role::Agent, "n").with_sans(["not a name!"]))
                .is_err()
        );
    }
}
