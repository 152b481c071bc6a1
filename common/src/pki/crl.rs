//! The CA's certificate revocation list: `pki revoke` adds a certificate's serial number to
//! `crl.pem`, re-signed by the CA with a higher CRL number. The list itself is the record of what
//! was revoked, so nothing else has to be kept in sync with it.

use super::{CRL_FILE, CRL_VALIDITY_DAYS, Ca, leaf_paths, write_public};
use crate::identity::Role;
use anyhow::{Context, Result, bail};
use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, pem::PemObject};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// One revoked certificate, as the list records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Big-endian, without leading zeros.
    pub serial: Vec<u8>,
    pub revoked_at: OffsetDateTime,
}

/// What `pki revoke` did.
#[derive(Debug)]
pub struct Revocation {
    /// The certificate file whose serial was revoked.
    pub cert: PathBuf,
    pub serial_hex: String,
    /// It was already on the list (nothing changed but the CRL's dates).
    pub already_revoked: bool,
    pub crl: PathBuf,
    /// How many certificates the list now revokes.
    pub revoked_total: usize,
}

impl Ca {
    /// A CRL of this CA, in PEM, revoking `revoked`.
    pub(super) fn sign_crl(&self, revoked: &[RevokedSerial], number: u64) -> Result<String> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(CRL_VALIDITY_DAYS),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: r.revoked_at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .context("loading the CA as the CRL's issuer")?;
        params
            .signed_by(&issuer)
            .context("signing the CRL")?
            .pem()
            .context("encoding the CRL")
    }

    /// Adds the certificate of `name` (of `role`, or whichever role has one) in the PKI directory
    /// `dir` to `dir/crl.pem`. Copy the file to every agent (`[tls] crl`) and to the coordinator's
    /// inventory (`tls.crl`).
    pub fn revoke(&self, dir: &Path, role: Option<Role>, name: &str) -> Result<Revocation> {
        crate::identity::validate_name(name)?;
        let cert = find_cert(dir, role, name)?;
        let pem = std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
        let der = CertificateDer::from_pem_slice(&pem)
            .with_context(|| format!("parsing the certificate {}", cert.display()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("parsing the certificate {}: {e}", cert.display()))?;
        let ca_subject = ca_subject(&self.cert_pem)?;
        if parsed.issuer().as_raw() != ca_subject.as_slice() {
            bail!(
                "{} was not issued by the CA in {}; only this CA's certificates can be revoked here",
                cert.display(),
                dir.display()
            );
        }
        let serial = parsed.serial.to_bytes_be();
        let crl_path = dir.join(CRL_FILE);
        let (mut revoked, number) = match std::fs::read(&crl_path) {
            Ok(bytes) => read_crl(&bytes, &ca_subject)
                .with_context(|| format!("reading the revocation list {}", crl_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
            Err(e) => return Err(e).with_context(|| format!("reading {}", crl_path.display())),
        };
        let already_revoked = revoked.iter().any(|r| r.serial == serial);
        if !already_revoked {
            revoked.push(RevokedSerial {
                serial: serial.clone(),
                revoked_at: OffsetDateTime::now_utc(),
            });
        }
        write_public(&crl_path, &self.sign_crl(&revoked, number + 1)?)?;
        Ok(Revocation {
            cert,
            serial_hex: serial.iter().map(|b| format!("{b:02x}")).collect(),
            already_revoked,
            crl: crl_path,
            revoked_total: revoked.len(),
        })
    }
}

fn find_cert(dir: &Path, role: Option<Role>, name: &str) -> Result<PathBuf> {
    let roles = match role {
        Some(r) => vec![r],
        None => vec![Role::Agent, Role::Coordinator],
    };
    let found: Vec<PathBuf> = roles
        .iter()
        .map(|r| leaf_paths(dir, *r, name).0)
        .filter(|p| p.is_file())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no certificate of '{name}' in {} (looked for {}); revoke the name `pki issue` gave it",
            dir.display(),
            roles
                .iter()
                .map(|r| leaf_paths(dir, *r, name).0.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
        _ => bail!(
            "both an agent and a coordinator are called '{name}' in {}; say which with --role",
            dir.display()
        ),
    }
}

fn ca_subject(ca_pem: &str) -> Result<Vec<u8>> {
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("parsing the CA PEM")?;
    let (_, ca) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("parsing the CA certificate: {e}"))?;
    Ok(ca.subject().as_raw().to_vec())
}

/// The entries and CRL number of a PEM CRL, checked to be the CA's (issuer name; the signature is
/// checked by the TLS verifiers that use it).
fn read_crl(pem: &[u8], ca_subject: &[u8]) -> Result<(Vec<RevokedSerial>, u64)> {
    let der = CertificateRevocationListDer::from_pem_slice(pem).context("parsing the CRL PEM")?;
    let (_, crl) =
        x509_parser::parse_x509_crl(&der).map_err(|e| anyhow::anyhow!("parsing the CRL: {e}"))?;
    if crl.issuer().as_raw() != ca_subject {
        bail!("it was issued by '{}', not by this CA", crl.issuer());
    }
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n.clone()).ok())
        .unwrap_or(0);
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| {
            Ok(RevokedSerial {
                serial: r.user_certificate.to_bytes_be(),
                revoked_at: OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                    .context("a revocation date out of range")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((revoked, number))
}

/// Checks that a PEM CRL file is one of the CA `ca_pem`; for loading `[tls] crl` at start, so a
/// wrong file is an error there instead of every peer being refused later.
pub fn check_crl_of_ca(crl_pem: &[u8], ca_pem: &[u8]) -> Result<usize> {
    let ca = std::str::from_utf8(ca_pem).context("the CA PEM is not text")?;
    let mut subjects = Vec::new();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        let der = cert.context("parsing the CA PEM")?;
        let (_, c) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("parsing the CA certificate: {e}"))?;
        subjects.push(c.subject().as_raw().to_vec());
    }
    let mut last_err = None;
    for s in &subjects {
        match read_crl(crl_pem, s) {
            Ok((revoked, _)) => return Ok(revoked.len()),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no CA certificate to check the CRL against")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::IssueRequest;

    #[test]
    fn revoking_adds_to_the_list_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        ca.save(dir.path()).unwrap();
        let crl = std::fs::read(dir.path().join(CRL_FILE)).unwrap();
        assert_eq!(
            check_crl_of_ca(&crl, ca.cert_pem.as_bytes()).unwrap(),
            0,
            "pki init writes an empty list"
        );
        ca.issue(&IssueRequest::new(Role::Coordinator, "alice"))
            .unwrap()
            .save(dir.path())
            .unwrap();
        ca.issue(&IssueRequest::new(Role::Agent, "alice"))
            .unwrap()
            .save(dir.path())
            .unwrap();
        let e = ca.revoke(dir.path(), None, "alice").unwrap_err();
        assert!(e.to_string().contains("--role"), "{e:#}");
        let r = ca
            .revoke(dir.path(), Some(Role::Coordinator), "alice")
            .unwrap();
        assert!(!r.already_revoked);
        assert_eq!(r.revoked_total, 1);
        let again = ca
            .revoke(dir.path(), Some(Role::Coordinator), "alice")
            .unwrap();
        assert!(again.already_revoked);
        assert_eq!(again.revoked_total, 1);
        let r = ca.revoke(dir.path(), Some(Role::Agent), "alice").unwrap();
        assert_eq!(r.revoked_total, 2);
        let crl = std::fs::read(dir.path().join(CRL_FILE)).unwrap();
        assert_eq!(check_crl_of_ca(&crl, ca.cert_pem.as_bytes()).unwrap(), 2);
        let other = Ca::generate().unwrap();
        assert!(check_crl_of_ca(&crl, other.cert_pem.as_bytes()).is_err());
        assert!(ca.revoke(dir.path(), None, "nobody").is_err());
    }
}
