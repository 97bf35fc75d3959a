//! Who is on the other end of a connection: a role and a name, carried in the
//! certificate as a SAN URI `spiffe://procurator/<role>/<name>`. Never taken
//! from a request field.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::names::MachineName;

pub const URI_PREFIX: &str = "spiffe://procurator/";

/// The second SAN URI of an agent certificate that may host VMs
/// (`procurator-ctl pki issue --role agent --vm-host`): only such an agent
/// may offer capacity, have VM instances placed on it and report for them.
pub const VM_HOST_URI: &str = "urn:procurator:vm-host";

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A machine's agent: receives its own desired state, reports progress.
    Agent,
    /// CI: submits deployments, reads state.
    Ci,
    /// A human operator: also cancels and rolls back.
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
    /// The certificate carries [`VM_HOST_URI`] (agents only).
    pub vm_host: bool,
}

/// Every RPC of the control plane, with the roles that may call it: the one
/// table of who may do what (docs/interfaces.md shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Connect,
    Confirm,
    Submit,
    GetDeployment,
    ListDeployments,
    ListMachines,
    Watch,
    ListAgents,
    ListRunning,
    GetMachineHistory,
    GetMachineLog,
    Cancel,
    Rollback,
    PlanRollback,
    Enroll,
    Renew,
    CreateJoinToken,
    Revoke,
    ListRevocations,
}

impl Rpc {
    pub const ALL: [Rpc; 19] = [
        Rpc::Connect,
        Rpc::Confirm,
        Rpc::Submit,
        Rpc::GetDeployment,
        Rpc::ListDeployments,
        Rpc::ListMachines,
        Rpc::Watch,
        Rpc::ListAgents,
        Rpc::ListRunning,
        Rpc::GetMachineHistory,
        Rpc::GetMachineLog,
        Rpc::Cancel,
        Rpc::Rollback,
        Rpc::PlanRollback,
        Rpc::Enroll,
        Rpc::Renew,
        Rpc::CreateJoinToken,
        Rpc::Revoke,
        Rpc::ListRevocations,
    ];

    /// Who may call it. CI submits and reads; only a person may stop or
    /// undo a rollout, or say who may connect, so a leaked CI credential
    /// cannot. `Enroll` is for machines without a certificate: none is
    /// needed, the join token is the credential.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Rpc::Enroll => &[],
            Rpc::Connect | Rpc::Confirm | Rpc::Renew => &[Role::Agent],
            Rpc::Submit
            | Rpc::GetDeployment
            | Rpc::ListDeployments
            | Rpc::ListMachines
            | Rpc::Watch
            | Rpc::ListAgents
            | Rpc::ListRunning
            | Rpc::GetMachineHistory
            | Rpc::GetMachineLog => &[Role::Ci, Role::Operator],
            Rpc::Cancel
            | Rpc::Rollback
            | Rpc::PlanRollback
            | Rpc::CreateJoinToken
            | Rpc::Revoke
            | Rpc::ListRevocations => &[Role::Operator],
        }
    }

    /// `Service/Method`, as gRPC names it.
    pub fn path(self) -> &'static str {
        match self {
            Rpc::Connect => "AgentService/Connect",
            Rpc::Confirm => "AgentService/Confirm",
            Rpc::Submit => "DeploymentService/Submit",
            Rpc::GetDeployment => "DeploymentService/GetDeployment",
            Rpc::ListDeployments => "DeploymentService/ListDeployments",
            Rpc::ListMachines => "DeploymentService/ListMachines",
            Rpc::Watch => "DeploymentService/Watch",
            Rpc::ListAgents => "DeploymentService/ListAgents",
            Rpc::ListRunning => "DeploymentService/ListRunning",
            Rpc::GetMachineHistory => "DeploymentService/GetMachineHistory",
            Rpc::GetMachineLog => "DeploymentService/GetMachineLog",
            Rpc::Cancel => "DeploymentService/Cancel",
            Rpc::Rollback => "DeploymentService/Rollback",
            Rpc::PlanRollback => "DeploymentService/PlanRollback",
            Rpc::Enroll => "AgentService/Enroll",
            Rpc::Renew => "AgentService/Renew",
            Rpc::CreateJoinToken => "TrustService/CreateJoinToken",
            Rpc::Revoke => "TrustService/Revoke",
            Rpc::ListRevocations => "TrustService/ListRevocations",
        }
    }
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
        Self {
            role,
            name,
            vm_host: false,
        }
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
        Ok(Self::new(role, name))
    }

    /// Read the identity from a DER certificate (the peer's leaf).
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let mut found: Option<Self> = None;
        let mut vm_host = false;
        for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
            match name {
                GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => {
                    if found.is_some() {
                        return Err(IdentityError::Ambiguous);
                    }
                    found = Some(Self::from_uri(uri)?);
                }
                GeneralName::URI(uri) if *uri == VM_HOST_URI => vm_host = true,
                _ => {}
            }
        }
        let mut identity = found.ok_or(IdentityError::Missing)?;
        // Only an agent can host VMs, whatever else a certificate says.
        identity.vm_host = vm_host && identity.role == Role::Agent;
        Ok(identity)
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
    fn only_operators_cancel_and_roll_back() {
        for rpc in Rpc::ALL.into_iter().filter(|rpc| *rpc != Rpc::Enroll) {
            let roles = rpc.roles();
            assert!(!roles.contains(&Role::ControlPlane), "{rpc:?}");
            assert_eq!(
                roles.contains(&Role::Agent),
                rpc.path().starts_with("AgentService/"),
                "{rpc:?}"
            );
        }
        assert_eq!(Rpc::Cancel.roles(), [Role::Operator]);
        assert_eq!(Rpc::Rollback.roles(), [Role::Operator]);
        assert!(Rpc::Submit.roles().contains(&Role::Ci));
        assert_eq!(Rpc::Revoke.roles(), [Role::Operator]);
        assert_eq!(Rpc::CreateJoinToken.roles(), [Role::Operator]);
        assert!(Rpc::Enroll.roles().is_empty());
    }

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
