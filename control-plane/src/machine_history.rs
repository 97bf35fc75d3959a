//! `GetMachineHistory` and `GetMachineLog`: one machine across
//! deployments, for `procurator-ctl machine` and `procurator-ctl logs`.

use procurator_core::limits::{DEFAULT_PAGE_ROWS, MAX_PAGE_ROWS};
use procurator_core::{DeploymentId, MachineName};
use procurator_proto::v1::{
    GetMachineHistoryRequest, GetMachineHistoryResponse, GetMachineLogRequest, MachineLog,
    MachineState,
};
use tonic::Status;

use crate::api_error::ApiError;
use crate::store::{LogLookup, Store};

fn machine_name(machine: &str) -> Result<MachineName, Status> {
    MachineName::parse(machine).map_err(|e| Status::invalid_argument(format!("machine: {e}")))
}

pub async fn history(
    store: &Store,
    request: GetMachineHistoryRequest,
) -> Result<GetMachineHistoryResponse, Status> {
    let machine = machine_name(&request.machine)?;
    let before = match request.page_token.as_str() {
        "" => None,
        token => Some(token.parse::<i64>().ok().filter(|seq| *seq > 0).ok_or_else(|| {
            Status::invalid_argument(
                "page_token is not one this control plane handed out; pass the next_page_token of the page before, or none for the first page",
            )
        })?),
    };
    let size = match request.page_size {
        0 => DEFAULT_PAGE_ROWS,
        n => n.min(MAX_PAGE_ROWS),
    };
    let page = store
        .machine_history(machine, before, size)
        .await
        .map_err(ApiError::from)?;
    Ok(GetMachineHistoryResponse {
        entries: page.items,
        next_page_token: page.next_after.unwrap_or_default(),
    })
}

pub async fn log(store: &Store, request: GetMachineLogRequest) -> Result<MachineLog, Status> {
    let machine = machine_name(&request.machine)?;
    let deployment = match request.deployment_id.as_str() {
        "" => None,
        id => Some(DeploymentId::parse(id).map_err(ApiError::from)?),
    };
    let found = store
        .machine_log(machine.clone(), deployment.clone())
        .await
        .map_err(ApiError::from)?;
    match (found, deployment) {
        (LogLookup::Found(log), _) => Ok(log),
        (LogLookup::NoRow, Some(id)) => Err(Status::not_found(format!(
            "deployment {id} has no row for {machine}: `procurator-ctl machine {machine}` lists the deployments that do"
        ))),
        (LogLookup::NoRow, None) => Err(Status::not_found(format!(
            "no kept deployment has a row for {machine}: check the name with `procurator-ctl status`"
        ))),
        (LogLookup::NoOutput(row), _) => {
            let state = MachineState::try_from(row.state).unwrap_or(MachineState::Unspecified);
            let why = if state.is_final() {
                "its agent sent no output with its result (an agent older than this control plane sends none)"
            } else {
                "its agent has not sent its result yet; `procurator-ctl watch` follows it"
            };
            Err(Status::not_found(format!(
                "no output is kept for {machine} in deployment {} ({}): {why}",
                row.deployment_id,
                state.label()
            )))
        }
    }
}
