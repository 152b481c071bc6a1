//! Who a peer certificate names: the role and name in its `spiffe://bbupgrade/<role>/<name>` SAN URI.
//!
//! Every identity decision of the project is made here, and every refusal says why.

use std::fmt;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The trust domain in every bbupgrade SAN URI.
pub const SPIFFE_PREFIX: &str = "spiffe://bbupgrade/";

/// What a certificate holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The daemon on a Bitbucket node.
    Agent,
    /// The admin's CLI that drives agents.
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "coordinator" => Ok(Role::Coordinator),
            other => Err(IdentityError::UnknownRole(other.to_string())),
        }
    }
}

/// The role and name a certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

impl PeerIdentity {
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Self {
            role,
            name: name.into(),
        }
    }

    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        format!("{SPIFFE_PREFIX}{}/{}", self.role, self.name)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}'", self.role, self.name)
    }
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the peer presented no client certificate; bbupgrade requires mutual TLS with a certificate from its CA"
    )]
    NoCertificate,
    #[error("the peer certificate cannot be parsed: {0}")]
    Unparseable(String),
    #[error(
        "the peer certificate carries no bbupgrade identity (no SAN URI starting with {SPIFFE_PREFIX}); issue it with `bbupgrade pki issue`"
    )]
    NoIdentity,
    #[error("the peer certificate carries more than one bbupgrade identity: {0}")]
    Ambiguous(String),
    #[error("unknown role '{0}' (expected agent or coordinator)")]
    UnknownRole(String),
    #[error("invalid identity name '{0}': use letters, digits, '.', '-' and '_'")]
    InvalidName(String),
    #[error("the peer is {found}, but only {expected}-role peers are allowed here")]
    WrongRole { expected: Role, found: PeerIdentity },
    #[error(
        "the agent certificate names node '{found}', but the inventory expects node '{expected}' at this address"
    )]
    WrongNode { expected: String, found: String },
    #[error(
        "coordinator '{0}' is not in this agent's [tls] allowed_coordinators; add it there (and restart the agent) or use a listed coordinator's certificate"
    )]
    NotAllowed(String),
}

/// Names allowed in identities: they end up in URIs, file names and logs.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidName(name.to_string()))
    }
}

/// Parses `spiffe://bbupgrade/<role>/<name>`; `None` for URIs of other trust domains.
pub fn parse_uri(uri: &str) -> Option<Result<PeerIdentity, IdentityError>> {
    let rest = uri.strip_prefix(SPIFFE_PREFIX)?;
    Some((|| {
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::Unparseable(format!("SAN URI '{uri}' lacks a name")))?;
        let role: Role = role.parse()?;
        validate_name(name)?;
        Ok(PeerIdentity::new(role, name))
    })())
}

/// The identity in a DER certificate.
pub fn identity_of(cert_der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    let mut found = Vec::new();
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(parsed) = parse_uri(uri)
            {
                found.push(parsed?);
            }
        }
    }
    match found.len() {
        0 => Err(IdentityError::NoIdentity),
        1 => Ok(found.remove(0)),
        _ => Err(IdentityError::Ambiguous(
            found.iter().map(|p| p.uri()).collect::<Vec<_>>().join(", "),
        )),
    }
}

/// The agent's rule: only coordinator-role peers may call it.
pub fn require_coordinator(
    peer_certs: Option<&[impl AsRef<[u8]>]>,
) -> Result<PeerIdentity, IdentityError> {
    let leaf = peer_certs
        .and_then(|certs| certs.first())
        .ok_or(IdentityError::NoCertificate)?;
    let peer = identity_of(leaf.as_ref())?;
    if peer.role != Role::Coordinator {
        return Err(IdentityError::WrongRole {
            expected: Role::Coordinator,
            found: peer,
        });
    }
    Ok(peer)
}

/// The agent's rule with its config: a coordinator-role peer, and one of `allowed` when the agent
/// lists who may drive it.
pub fn require_allowed_coordinator(
    peer_certs: Option<&[impl AsRef<[u8]>]>,
    allowed: Option<&std::collections::BTreeSet<String>>,
) -> Result<PeerIdentity, IdentityError> {
    let peer = require_coordinator(peer_certs)?;
    match allowed {
        Some(names) if !names.contains(&peer.name) => Err(IdentityError::NotAllowed(peer.name)),
        _ => Ok(peer),
    }
}

/// The coordinator's rule: the agent must be the node the inventory names.
pub fn require_agent(cert_der: &[u8], expected_node: &str) -> Result<PeerIdentity, IdentityError> {
    let peer = identity_of(cert_der)?;
    if peer.role != Role::Agent {
        return Err(IdentityError::WrongRole {
            expected: Role::Agent,
            found: peer,
        });
    }
    if peer.name != expected_node {
        return Err(IdentityError::WrongNode {
            expected: expected_node.to_string(),
            found: peer.name,
        });
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_identity_uris() {
        assert_eq!(
            parse_uri("spiffe://bbupgrade/agent/node-1")
                .unwrap()
                .unwrap(),
            PeerIdentity::new(Role::Agent, "node-1")
        );
        assert!(parse_uri("spiffe://other/agent/x").is_none());
        assert!(matches!(
            parse_uri("spiffe://bbupgrade/admin/x").unwrap(),
            Err(IdentityError::UnknownRole(_))
        ));
        assert!(matches!(
            parse_uri("spiffe://bbupgrade/agent/a/b").unwrap(),
            Err(IdentityError::InvalidName(_))
        ));
        assert!(matches!(
            parse_uri("spiffe://bbupgrade/agent").unwrap(),
            Err(IdentityError::Unparseable(_))
        ));
    }

    #[test]
    fn names_are_restricted() {
        assert!(validate_name("node_1.dc-2").is_ok());
        for bad in ["", "a b", "a/b", "ä", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roles_and_nodes_are_checked() {
        let ca = crate::pki::Ca::generate().unwrap();
        let agent = ca
            .issue(&crate::pki::IssueRequest::new(Role::Agent, "n1"))
            .unwrap();
        let coord = ca
            .issue(&crate::pki::IssueRequest::new(Role::Coordinator, "admin"))
            .unwrap();
        let agent_der = agent.cert_der().unwrap();
        let coord_der = coord.cert_der().unwrap();
        assert_eq!(require_agent(&agent_der, "n1").unwrap().name, "n1");
        assert!(matches!(
            require_agent(&agent_der, "n2"),
            Err(IdentityError::WrongNode { .. })
        ));
        assert!(matches!(
            require_agent(&coord_der, "n1"),
            Err(IdentityError::WrongRole { .. })
        ));
        assert!(require_coordinator(Some(std::slice::from_ref(&coord_der))).is_ok());
        let err = require_coordinator(Some(&[agent_der])).unwrap_err();
        assert!(err.to_string().contains("agent 'n1'"), "{err}");
        assert_eq!(
            require_coordinator(None::<&[Vec<u8>]>).unwrap_err(),
            IdentityError::NoCertificate
        );
        let listed: std::collections::BTreeSet<String> = ["ci".to_string()].into();
        let only_ci = Some(&listed);
        assert!(matches!(
            require_allowed_coordinator(Some(std::slice::from_ref(&coord_der)), only_ci),
            Err(IdentityError::NotAllowed(n)) if n == "admin"
        ));
        assert!(require_allowed_coordinator(Some(std::slice::from_ref(&coord_der)), None).is_ok());
        let listed: std::collections::BTreeSet<String> = ["admin".to_string()].into();
        assert!(
            require_allowed_coordinator(Some(std::slice::from_ref(&coord_der)), Some(&listed))
                .is_ok()
        );
    }
}
