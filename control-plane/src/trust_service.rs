//! `TrustService`: operators make join tokens and revoke certificates.

use std::sync::Arc;
use std::time::Duration;

use procurator_core::certificate::{is_serial, normalize_serial};
use procurator_core::identity::Rpc;
use procurator_core::tls::require_role;
use procurator_core::{MachineName, Role};
use procurator_proto::v1::trust_service_server::TrustService;
use procurator_proto::v1::{
    CreateJoinTokenRequest, CreateJoinTokenResponse, ListRevocationsRequest,
    ListRevocationsResponse, Revocation, RevokeRequest,
};
use tonic::{Request, Response, Status};

use crate::enrollment::{DEFAULT_TOKEN_TTL, Enrollment, MAX_TOKEN_TTL, MIN_TOKEN_TTL};
use crate::revocations::Revocations;
use crate::store::{MAX_LIVE_TOKENS, RevokeError, Revoked, Store};

pub struct TrustSvc {
    pub store: Store,
    pub revocations: Arc<Revocations>,
    pub enrollment: Option<Arc<Enrollment>>,
}

#[tonic::async_trait]
impl TrustService for TrustSvc {
    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let operator = require_role(&request, Rpc::CreateJoinToken)?;
        if self.enrollment.is_none() {
            return Err(enrollment_off());
        }
        let CreateJoinTokenRequest {
            machine,
            ttl_secs,
            vm_host,
        } = request.into_inner();
        let machine = MachineName::parse(&machine)
            .map_err(|e| Status::invalid_argument(format!("machine: {e}")))?;
        let ttl = match ttl_secs {
            0 => DEFAULT_TOKEN_TTL,
            secs => Duration::from_secs(secs),
        };
        if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&ttl) {
            return Err(Status::invalid_argument(format!(
                "ttl: {} s is outside {} s to {} days",
                ttl.as_secs(),
                MIN_TOKEN_TTL.as_secs(),
                MAX_TOKEN_TTL.as_secs() / 86_400
            )));
        }
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let token = self
            .store
            .create_join_token(machine.clone(), vm_host, ttl_ms, operator.to_string())
            .await?
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "{MAX_LIVE_TOKENS} join tokens wait unused already; let some expire or be used"
                ))
            })?;
        tracing::info!(machine = %machine, vm_host, by = %operator, "join token created");
        Ok(Response::new(CreateJoinTokenResponse {
            token: token.token,
            machine: machine.to_string(),
            expires_at_ms: token.expires_ms,
        }))
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<Revocation>, Status> {
        let operator = require_role(&request, Rpc::Revoke)?;
        let RevokeRequest {
            role,
            name,
            serial,
            reason,
        } = request.into_inner();
        let revoked = match (name.is_empty(), serial.is_empty()) {
            (false, true) => {
                let role = Role::parse(&role)
                    .filter(|r| *r != Role::ControlPlane)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "role: {role:?} is not agent, ci or operator"
                        ))
                    })?;
                let name = MachineName::parse(&name)
                    .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
                Revoked::Identity(role, name)
            }
            (true, false) if is_serial(&serial) => Revoked::Serial(normalize_serial(&serial)),
            (true, false) => {
                return Err(Status::invalid_argument(format!(
                    "serial: {serial:?} is not a serial number (hex digits, colons allowed)"
                )));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "give either a role and name or a serial, not both and not neither",
                ));
            }
        };
        let reason =
            procurator_core::limits::clip(&reason, procurator_core::limits::MAX_REASON_BYTES);
        let revocation = self
            .store
            .revoke(revoked, reason, operator.to_string())
            .await
            .map_err(|e| match e {
                RevokeError::TooMany => Status::resource_exhausted(e.to_string()),
                RevokeError::Store(e) => e.into(),
            })?;
        // In force here at once; other replicas follow the event.
        self.revocations
            .replace(self.store.list_revocations().await?);
        tracing::warn!(
            role = revocation.role,
            name = revocation.name,
            serial = revocation.serial,
            reason = revocation.reason,
            by = %operator,
            "certificate revoked"
        );
        Ok(Response::new(revocation))
    }

    async fn list_revocations(
        &self,
        request: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        require_role(&request, Rpc::ListRevocations)?;
        Ok(Response::new(ListRevocationsResponse {
            revocations: self.store.list_revocations().await?,
        }))
    }
}

pub fn enrollment_off() -> Status {
    Status::failed_precondition(
        "enrollment is off on this control plane: start it with --issuing-ca-cert and --issuing-ca-key",
    )
}
