//! Who is on the other end of a connection: a role and a name, carried in the
//! certificate as a SAN URI `spiffe://procurator/<role>/<name>`. Never taken
//! from a request field.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::names::MachineName;

pub const URI_PREFIX: &str = "spiffe://procurator/";

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A machine's agent: receives its own desired state, reports progress.
    Agent,
    /// CI: submits deployments, reads state.
    Ci,
    /// A human operator: submits, reads, watches.
    Operator,
    /// The control plane's own server certificate.
    ControlPlane,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Agent, Role::Ci, Role::Operator, Role::ControlPlane];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Ci => "ci",
            Role::Operator => "operator",
            Role::ControlPlane => "control-plane",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The role and name a certificate was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    /// For agents this is the machine name; for others, who they are.
    pub name: MachineName,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the certificate carries no Procurator identity (a SAN URI {URI_PREFIX}<role>/<name>)")]
    Missing,
    #[error("the certificate carries more than one Procurator identity")]
    Ambiguous,
    #[error(
        "the certificate's identity {0:?} is not {URI_PREFIX}<role>/<name> with a known role and a valid name"
    )]
    Invalid(String),
}

impl Identity {
    pub fn new(role: Role, name: MachineName) -> Self {
        Self { role, name }
    }

    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.name)
    }

    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let invalid = || IdentityError::Invalid(uri.to_owned());
        let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(invalid)?;
        let (role, name) = rest.split_once('/').ok_or_else(invalid)?;
        let role = Role::parse(role).ok_or_else(invalid)?;
        let name = MachineName::parse(name).map_err(|_| invalid())?;
        Ok(Self { role, name })
    }

    /// Read the identity from a DER certificate (the peer's leaf).
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let mut found = None;
        for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(URI_PREFIX)
            {
                if found.is_some() {
                    return Err(IdentityError::Ambiguous);
                }
                found = Some(Self::from_uri(uri)?);
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let id = Identity::new(Role::Agent, MachineName::parse("worker-1").unwrap());
        assert_eq!(id.uri(), "spiffe://procurator/agent/worker-1");
        assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        for bad in [
            "spiffe://procurator/root/x",
            "spiffe://procurator/agent/",
            "spiffe://procurator/agent/a/b",
            "spiffe://other/agent/x",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad}");
        }
    }
}
