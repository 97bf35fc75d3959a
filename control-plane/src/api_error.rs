//! What a `DeploymentService` call can fail with, and the status each
//! failure is answered with.

use procurator_core::DeploymentId;
use procurator_core::artifact::ArtifactError;
use procurator_core::names::NameError;
use tonic::Status;

use crate::store::{StoreError, SubmitError};

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
    #[error("the artifact is stale: {0}")]
    Stale(String),
    #[error("deployment {id} already finished ({state}); there is nothing to cancel")]
    AlreadyFinished { id: DeploymentId, state: String },
    #[error("{0}")]
    NothingToRollBackTo(String),
    #[error("the rollback's statements do not fit its target: {0}")]
    InvalidIntents(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidArtifact(_) | ApiError::InvalidId(_) | ApiError::InvalidIntents(_) => {
                Status::invalid_argument(e.to_string())
            }
            ApiError::NotFound(_) | ApiError::NothingToRollBackTo(_) => {
                Status::not_found(e.to_string())
            }
            ApiError::Stale(_) | ApiError::AlreadyFinished { .. } => {
                Status::failed_precondition(e.to_string())
            }
            ApiError::ShuttingDown => Status::unavailable(e.to_string()),
            ApiError::Store(e) => e.into(),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Stale(_) => ApiError::Stale(e.to_string()),
            SubmitError::Store(e) => ApiError::Store(e),
        }
    }
}
