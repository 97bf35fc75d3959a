//! `DeploymentService`: what CI and operators call.

use std::sync::Arc;

use procurator_core::artifact::ArtifactError;
use procurator_core::names::NameError;
use procurator_core::tls::require_role;
use procurator_core::{DeploymentArtifact, DeploymentId, Role};
use procurator_proto::v1::deployment_service_server::DeploymentService;
use procurator_proto::v1::{
    Deployment, Event, GetDeploymentRequest, ListAgentsRequest, ListAgentsResponse,
    ListDeploymentsRequest, ListDeploymentsResponse, SubmitRequest, SubmitResponse, WatchRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::connections::{Connections, dispatch};
use crate::store::{Store, StoreError};
use crate::watch;

/// Every DeploymentService RPC is for CI and operators, never agents.
const ROLES: &[Role] = &[Role::Ci, Role::Operator];

const DEFAULT_LIST_LIMIT: u32 = 50;
const MAX_LIST_LIMIT: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the deployment artifact is invalid: {0}")]
    InvalidArtifact(#[from] ArtifactError),
    #[error("{0}")]
    InvalidId(#[from] NameError),
    #[error("there is no deployment {0}; list them with `procurator-ctl deployments`")]
    NotFound(DeploymentId),
    #[error("the control plane is shutting down; retry")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidArtifact(_) | ApiError::InvalidId(_) => {
                Status::invalid_argument(e.to_string())
            }
            ApiError::NotFound(_) => Status::not_found(e.to_string()),
            ApiError::ShuttingDown => Status::unavailable(e.to_string()),
            ApiError::Store(e) => e.into(),
        }
    }
}

pub struct DeploymentSvc {
    pub store: Store,
    pub connections: Arc<Connections>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

#[tonic::async_trait]
impl DeploymentService for DeploymentSvc {
    /// INVALID_ARGUMENT (nothing stored), PERMISSION_DENIED, UNAUTHENTICATED,
    /// UNAVAILABLE (state store failure).
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = require_role(&request, ROLES)?;
        let json = request.into_inner().artifact_json;
        let artifact = DeploymentArtifact::from_json(json.as_bytes()).map_err(ApiError::from)?;
        let git_commit = artifact.git_commit.to_string();
        let submitted = self
            .store
            .submit(artifact, json, caller.name.to_string())
            .await
            .map_err(ApiError::from)?;
        if submitted.created {
            tracing::info!(
                deployment = %submitted.id,
                git_commit,
                submitted_by = %caller,
                machines = submitted.machines.len(),
                "deployment submitted"
            );
            // Committed; now hand each connected machine its new desired
            // state, one task each so a slow agent delays no other.
            for machine in &submitted.machines {
                let machine = machine.clone();
                let (store, connections) = (self.store.clone(), self.connections.clone());
                let span =
                    tracing::info_span!("dispatch", deployment = %submitted.id, machine = %machine);
                self.tasks.spawn(
                    async move {
                        if let Err(e) = dispatch(&store, &connections, &machine).await {
                            tracing::warn!(error = %e, "could not dispatch; the agent gets it when it reconnects");
                        }
                    }
                    .instrument(span),
                );
            }
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
        require_role(&request, ROLES)?;
        let id =
            DeploymentId::parse(&request.into_inner().deployment_id).map_err(ApiError::from)?;
        match self
            .store
            .get_deployment(id.clone())
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
        require_role(&request, ROLES)?;
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

    type WatchStream = ReceiverStream<Result<Event, Status>>;

    /// NOT_FOUND (unknown deployment), INVALID_ARGUMENT (malformed id),
    /// PERMISSION_DENIED, UNAUTHENTICATED, UNAVAILABLE (shutting down).
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        require_role(&request, ROLES)?;
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
        Ok(Response::new(stream))
    }

    /// PERMISSION_DENIED, UNAUTHENTICATED.
    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        require_role(&request, ROLES)?;
        let agents = self.store.list_agents().await.map_err(ApiError::from)?;
        Ok(Response::new(ListAgentsResponse { agents }))
    }
}
