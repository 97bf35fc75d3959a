//! `DeploymentService`: what CI and operators call.

use crate::api_error::ApiError;
use crate::dispatcher::Dispatcher;
use crate::machine_history;
use crate::revocations::Revocations;
use crate::store::{Cancelled, MachineQuery, PageQuery, RolledBack, Store, Submitted};
use crate::watch;
use futures::StreamExt as _;
use procurator_core::artifact::parse_selectors;
use procurator_core::certificate::CertificateInfo;
use procurator_core::identity::Rpc;
use procurator_core::limits::{DEFAULT_PAGE_ROWS, MAX_PAGE_ROWS};
use procurator_core::pattern::NamePattern;
use procurator_core::tls::require_role;
use procurator_core::{DeploymentArtifact, DeploymentId, MachineName};
use procurator_proto::v1::deployment_service_server::DeploymentService;
use procurator_proto::v1::{
    CancelRequest, Deployment, Event, GetDeploymentRequest, GetMachineHistoryRequest,
    GetMachineHistoryResponse, GetMachineLogRequest, ListAgentsRequest, ListAgentsResponse,
    ListDeploymentsRequest, ListDeploymentsResponse, ListMachinesRequest, ListMachinesResponse,
    ListRunningRequest, ListRunningResponse, MachineLog, MachineState, RollbackPlan,
    RollbackRequest, SubmitRequest, SubmitResponse, WatchRequest,
};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

const DEFAULT_LIST_LIMIT: u32 = 50;
const MAX_LIST_LIMIT: u32 = 1000;

pub struct DeploymentSvc {
    pub store: Store,
    pub dispatcher: Dispatcher,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub revocations: Arc<Revocations>,
}

#[tonic::async_trait]
impl DeploymentService for DeploymentSvc {
    /// INVALID_ARGUMENT (nothing stored), PERMISSION_DENIED, UNAUTHENTICATED,
    /// UNAVAILABLE (state store failure).
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = require_role(&request, Rpc::Submit)?;
        let SubmitRequest {
            artifact_json: json,
            force,
            on,
        } = request.into_inner();
        let received = std::time::Instant::now();
        let artifact = DeploymentArtifact::from_json(json.as_bytes()).map_err(ApiError::from)?;
        let on = parse_selectors(&on)
            .and_then(|on| artifact.selected_targets(&on).map(|_| on))
            .map_err(|e| Status::invalid_argument(format!("on: {e}")))?;
        let parsed_ms = received.elapsed().as_millis();
        let git_commit = artifact.git_commit.to_string();
        let submitted = self
            .store
            .submit(artifact, json, caller.name.to_string(), force, on)
            .await
            .map_err(ApiError::from)?;
        if submitted.created {
            tracing::info!(
                deployment = %submitted.id,
                git_commit,
                submitted_by = %caller,
                machines = submitted.machines.len(),
                force,
                parsed_ms,
                stored_ms = received.elapsed().as_millis(),
                "deployment submitted"
            );
            self.started(&submitted).await;
            tracing::info!(
                deployment = %submitted.id,
                answered_ms = received.elapsed().as_millis(),
                "deployment scheduled"
            );
        } else {
            tracing::info!(deployment = %submitted.id, submitted_by = %caller, "artifact submitted again");
        }
        Ok(Response::new(SubmitResponse {
            deployment_id: submitted.id.to_string(),
            created: submitted.created,
            revision: submitted.revision,
        }))
    }

    /// NOT_FOUND, INVALID_ARGUMENT (malformed id), PERMISSION_DENIED, UNAUTHENTICATED.
    async fn get_deployment(
        &self,
        request: Request<GetDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        require_role(&request, Rpc::GetDeployment)?;
        let id =
            DeploymentId::parse(&request.into_inner().deployment_id).map_err(ApiError::from)?;
        match self
            .store
            .deployment_summary(id.clone())
            .await
            .map_err(ApiError::from)?
        {
            Some(deployment) => Ok(Response::new(deployment)),
            None => Err(ApiError::NotFound(id).into()),
        }
    }

    /// Newest first. PERMISSION_DENIED, UNAUTHENTICATED.
    async fn list_deployments(
        &self,
        request: Request<ListDeploymentsRequest>,
    ) -> Result<Response<ListDeploymentsResponse>, Status> {
        require_role(&request, Rpc::ListDeployments)?;
        let limit = match request.into_inner().limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        };
        let deployments = self
            .store
            .list_deployments(limit)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListDeploymentsResponse { deployments }))
    }

    /// NOT_FOUND, INVALID_ARGUMENT (malformed id, token or pattern),
    /// PERMISSION_DENIED, UNAUTHENTICATED.
    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        require_role(&request, Rpc::ListMachines)?;
        let ListMachinesRequest {
            deployment_id,
            page_size,
            page_token,
            states,
            waves,
            name,
        } = request.into_inner();
        let id = DeploymentId::parse(&deployment_id).map_err(ApiError::from)?;
        let states = states
            .into_iter()
            .map(|s| {
                MachineState::try_from(s).map_err(|_| {
                    Status::invalid_argument(format!("states: {s} is not a machine state"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let query = MachineQuery {
            page: page_query(page_size, page_token, &name)?,
            states,
            waves,
        };
        match self
            .store
            .list_machines(id.clone(), query)
            .await
            .map_err(ApiError::from)?
        {
            Some(page) => Ok(Response::new(ListMachinesResponse {
                machines: page.items,
                next_page_token: page.next_after.unwrap_or_default(),
            })),
            None => Err(ApiError::NotFound(id).into()),
        }
    }

    type WatchStream = futures::stream::BoxStream<'static, Result<Event, Status>>;

    /// NOT_FOUND (unknown deployment), INVALID_ARGUMENT (malformed id),
    /// PERMISSION_DENIED, UNAUTHENTICATED, UNAVAILABLE (shutting down).
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        require_role(&request, Rpc::Watch)?;
        let certificate = request
            .peer_certs()
            .and_then(|certs| CertificateInfo::from_der(certs.first()?.as_ref()).ok());
        if self.shutdown.is_cancelled() {
            return Err(ApiError::ShuttingDown.into());
        }
        let stream = watch::start(
            &self.store,
            &self.shutdown,
            &self.tasks,
            request.into_inner(),
        )
        .await?;
        let Some(certificate) = certificate else {
            return Ok(Response::new(stream.boxed()));
        };
        // A watcher whose certificate is revoked is cut off.
        let revocations = self.revocations.clone();
        let (revoked_tx, revoked_rx) = tokio::sync::oneshot::channel();
        let revoked = async move {
            let refusal = revocations.until_revoked(&certificate).await;
            let _ = revoked_tx.send(refusal);
        };
        let refusal = futures::stream::once(revoked_rx).filter_map(|refusal| async move {
            refusal.ok().map(|r| Err(Status::permission_denied(r)))
        });
        Ok(Response::new(
            stream.take_until(Box::pin(revoked)).chain(refusal).boxed(),
        ))
    }

    /// INVALID_ARGUMENT (a malformed token or pattern), PERMISSION_DENIED, UNAUTHENTICATED.
    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        require_role(&request, Rpc::ListAgents)?;
        let ListAgentsRequest {
            page_size,
            page_token,
            name,
            connected,
        } = request.into_inner();
        let page = self
            .store
            .list_agents(page_query(page_size, page_token, &name)?, connected)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListAgentsResponse {
            agents: page.items,
            next_page_token: page.next_after.unwrap_or_default(),
        }))
    }

    /// NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION (already finished),
    /// PERMISSION_DENIED, UNAUTHENTICATED.
    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let caller = require_role(&request, Rpc::Cancel)?;
        let CancelRequest {
            deployment_id,
            reason,
        } = request.into_inner();
        let id = DeploymentId::parse(&deployment_id).map_err(ApiError::from)?;
        let reason = match reason.trim() {
            "" => format!("cancelled by {}", caller.name),
            why => format!("cancelled by {}: {why}", caller.name),
        };
        match self
            .store
            .cancel(id.clone(), reason.clone())
            .await
            .map_err(ApiError::from)?
        {
            Cancelled::NotFound => return Err(ApiError::NotFound(id).into()),
            Cancelled::AlreadyFinished(state) => {
                return Err(ApiError::AlreadyFinished {
                    id,
                    state: state.to_string(),
                }
                .into());
            }
            Cancelled::Done { in_flight } => {
                tracing::info!(deployment = %id, %reason, in_flight = in_flight.len(), "deployment cancelled");
                // Committed; the machines in flight are told to drop it.
                for machine in in_flight {
                    self.dispatcher.send(machine);
                }
            }
        }
        match self
            .store
            .deployment_summary(id.clone())
            .await
            .map_err(ApiError::from)?
        {
            Some(deployment) => Ok(Response::new(deployment)),
            None => Err(ApiError::NotFound(id).into()),
        }
    }

    /// NOT_FOUND (no such deployment, or nothing to roll back to),
    /// INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED.
    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = require_role(&request, Rpc::Rollback)?;
        let RollbackRequest {
            to_deployment_id,
            intents,
        } = request.into_inner();
        let to = target(&to_deployment_id)?;
        let signed = !intents.is_empty();
        let submitted = match self
            .store
            .rollback(to, caller.name.to_string(), intents.into_iter().collect())
            .await
            .map_err(ApiError::from)?
        {
            RolledBack::NotFound(why) => return Err(ApiError::NothingToRollBackTo(why).into()),
            RolledBack::Invalid(why) => return Err(ApiError::InvalidIntents(why).into()),
            RolledBack::Done(submitted) => submitted,
        };
        tracing::info!(deployment = %submitted.id, submitted_by = %caller, signed, "rollback submitted");
        self.started(&submitted).await;
        Ok(Response::new(SubmitResponse {
            deployment_id: submitted.id.to_string(),
            created: true,
            revision: submitted.revision,
        }))
    }

    /// As for Rollback; changes nothing.
    async fn plan_rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<RollbackPlan>, Status> {
        require_role(&request, Rpc::PlanRollback)?;
        let to = target(&request.into_inner().to_deployment_id)?;
        match self.store.plan_rollback(to).await.map_err(ApiError::from)? {
            Ok(target) => Ok(Response::new(RollbackPlan {
                to_deployment_id: target.id,
                git_commit: target.git_commit,
                artifact_json: target.artifact_json,
            })),
            Err(why) => Err(ApiError::NothingToRollBackTo(why).into()),
        }
    }

    /// INVALID_ARGUMENT (a malformed page token), PERMISSION_DENIED, UNAUTHENTICATED.
    async fn list_running(
        &self,
        request: Request<ListRunningRequest>,
    ) -> Result<Response<ListRunningResponse>, Status> {
        require_role(&request, Rpc::ListRunning)?;
        let ListRunningRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let query = page_query(page_size, page_token, "")?;
        let page = self
            .store
            .running(query.after, query.size)
            .await
            .map_err(ApiError::from)?;
        let (deployment_id, git_commit) = page.in_force.unwrap_or_default();
        Ok(Response::new(ListRunningResponse {
            machines: page.machines,
            next_page_token: page.next_after.unwrap_or_default(),
            deployment_id,
            git_commit,
        }))
    }

    /// INVALID_ARGUMENT (a malformed name or token), PERMISSION_DENIED, UNAUTHENTICATED.
    async fn get_machine_history(
        &self,
        request: Request<GetMachineHistoryRequest>,
    ) -> Result<Response<GetMachineHistoryResponse>, Status> {
        require_role(&request, Rpc::GetMachineHistory)?;
        machine_history::history(&self.store, request.into_inner())
            .await
            .map(Response::new)
    }

    /// NOT_FOUND (no row, or no output kept), INVALID_ARGUMENT,
    /// PERMISSION_DENIED, UNAUTHENTICATED.
    async fn get_machine_log(
        &self,
        request: Request<GetMachineLogRequest>,
    ) -> Result<Response<MachineLog>, Status> {
        require_role(&request, Rpc::GetMachineLog)?;
        machine_history::log(&self.store, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// A list RPC's page: the token is the last row name of the page before,
/// the size 0 means the default, the pattern is a name glob.
fn page_query(size: u32, token: String, name: &str) -> Result<PageQuery, Status> {
    if !token.is_empty() && MachineName::parse(&token).is_err() {
        return Err(Status::invalid_argument(
            "page_token is not one this control plane handed out; pass the next_page_token of the page before, or none for the first page",
        ));
    }
    let name = match name {
        "" => None,
        text => Some(
            NamePattern::parse(text).map_err(|e| Status::invalid_argument(format!("name: {e}")))?,
        ),
    };
    Ok(PageQuery {
        after: token,
        size: match size {
            0 => DEFAULT_PAGE_ROWS,
            n => n.min(MAX_PAGE_ROWS),
        },
        name,
    })
}

/// A rollback's target: the id given, or `None` for the default.
fn target(id: &str) -> Result<Option<DeploymentId>, ApiError> {
    match id {
        "" => Ok(None),
        id => Ok(Some(DeploymentId::parse(id)?)),
    }
}

impl DeploymentSvc {
    /// A new deployment is committed: schedule its first wave.
    async fn started(&self, submitted: &Submitted) {
        if let Err(e) = self.dispatcher.kick().await {
            // Stored all the same; the next tick or connect schedules it.
            tracing::warn!(deployment = %submitted.id, error = %e, "could not schedule the deployment yet");
        }
        // The placements may have changed: every VM host learns its set.
        if let Err(e) = self.dispatcher.send_vm_assignments().await {
            tracing::warn!(deployment = %submitted.id, error = %e, "could not send VM assignments yet");
        }
    }
}
