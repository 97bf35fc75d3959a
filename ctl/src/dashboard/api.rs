//! The dashboard's JSON, read from the control plane through the same
//! calls and in the same shapes as ctl's `--output json`: `/api/agents` as
//! `status`, `/api/deployments` as `deployments`, a deployment's summary
//! and one page of its rows, a machine's history as `machine`, a log as
//! `logs`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use procurator_proto::v1::{GetMachineLogRequest, ListDeploymentsRequest, ListMachinesRequest};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Code;

use super::Dashboard;
use crate::command::{deployments, logs, machine, status};
use crate::format;

/// Deployments the history page lists.
const HISTORY: u32 = 50;
/// Rows of a deployment per page: the page shows one page at a time, so a
/// 10,000-machine deployment never becomes 10,000 rows in the browser.
const ROWS_PER_PAGE: u32 = 200;

type Shared = State<Arc<Dashboard>>;

pub fn routes() -> Router<Arc<Dashboard>> {
    Router::new()
        .route("/api/agents", get(agents))
        .route("/api/deployments", get(deployment_list))
        .route("/api/deployments/{id}", get(deployment))
        .route("/api/deployments/{id}/machines", get(machines))
        .route("/api/machines/{name}", get(history))
        .route("/api/machines/{name}/log", get(log))
}

/// An error as JSON, with the status the gRPC code maps to.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn from_grpc(status: &tonic::Status, message: String) -> Failure {
    let code = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_GATEWAY,
    };
    Failure(code, message)
}

fn other(e: &anyhow::Error) -> Failure {
    Failure(StatusCode::BAD_GATEWAY, format!("{e:#}"))
}

async fn agents(State(state): Shared) -> Result<Json<Value>, Failure> {
    let mut conn = state.conn.lock().await;
    let mut agents = crate::pages::agents(&mut conn, "", None)
        .await
        .map_err(|e| other(&e))?;
    agents.sort_by(|a, b| format::natural_order(&a.machine, &b.machine));
    Ok(Json(Value::Array(
        agents.iter().map(status::agent_json).collect(),
    )))
}

async fn deployment_list(State(state): Shared) -> Result<Json<Value>, Failure> {
    let mut conn = state.conn.lock().await;
    let request = ListDeploymentsRequest { limit: HISTORY };
    let listed = match conn.client.list_deployments(request).await {
        Ok(response) => response.into_inner().deployments,
        Err(status) => {
            return Err(from_grpc(
                &status,
                conn.error(&status, "listing deployments").to_string(),
            ));
        }
    };
    Ok(Json(Value::Array(
        listed.iter().map(deployments::summary_json).collect(),
    )))
}

async fn deployment(State(state): Shared, Path(id): Path<String>) -> Result<Json<Value>, Failure> {
    let mut conn = state.conn.lock().await;
    let found = crate::follow::get_deployment(&mut conn, &id)
        .await
        .map_err(|e| Failure(StatusCode::NOT_FOUND, format!("{e:#}")))?;
    Ok(Json(deployments::summary_json(&found)))
}

#[derive(Debug, Deserialize)]
struct RowsQuery {
    #[serde(default)]
    page_token: String,
    /// A state label (`failed`, `rolled-back`); none: every state.
    #[serde(default)]
    state: Option<String>,
}

async fn machines(
    State(state): Shared,
    Path(id): Path<String>,
    Query(query): Query<RowsQuery>,
) -> Result<Json<Value>, Failure> {
    let states = match query.state.as_deref() {
        None | Some("") => Vec::new(),
        Some(label) => vec![
            procurator_proto::v1::MachineState::from_label(label).ok_or_else(|| {
                Failure(
                    StatusCode::BAD_REQUEST,
                    format!("{label:?} is not a machine state"),
                )
            })? as i32,
        ],
    };
    let mut conn = state.conn.lock().await;
    let request = ListMachinesRequest {
        deployment_id: id.clone(),
        page_size: ROWS_PER_PAGE,
        page_token: query.page_token,
        states,
        ..ListMachinesRequest::default()
    };
    match conn.client.list_machines(request).await {
        Ok(response) => {
            let page = response.into_inner();
            Ok(Json(json!({
                "machines": page.machines.iter().map(deployments::machine_json).collect::<Vec<_>>(),
                "nextPageToken": deployments::non_empty(&page.next_page_token),
            })))
        }
        Err(status) => {
            let message = conn
                .error(&status, &format!("listing the machines of {id}"))
                .to_string();
            Err(from_grpc(&status, message))
        }
    }
}

async fn history(State(state): Shared, Path(name): Path<String>) -> Result<Json<Value>, Failure> {
    let mut conn = state.conn.lock().await;
    let entries = crate::pages::history(&mut conn, &name, 20)
        .await
        .map_err(|e| other(&e))?;
    Ok(Json(Value::Array(
        entries.iter().map(machine::entry_json).collect(),
    )))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    /// Empty: the newest deployment with output kept.
    #[serde(default)]
    deployment: String,
}

async fn log(
    State(state): Shared,
    Path(name): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Json<Value>, Failure> {
    let mut conn = state.conn.lock().await;
    let request = GetMachineLogRequest {
        machine: name.clone(),
        deployment_id: query.deployment,
    };
    match conn.client.get_machine_log(request).await {
        Ok(response) => Ok(Json(logs::log_json(&response.into_inner()))),
        Err(status) => {
            let message = conn
                .error(&status, &format!("reading the output of {name}"))
                .to_string();
            Err(from_grpc(&status, message))
        }
    }
}
