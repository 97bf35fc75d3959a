//! The dashboard's JSON, read from the control plane through the same
//! calls and in the same shapes as ctl's `--output json`: `/api/agents` as
//! `status`, `/api/deployments` as `deployments`, a deployment's summary
//! and one page of its rows, a machine's history as `machine`, a log as
//! `logs`; and a deployment's events as server-sent events, fed by `Watch`
//! and resumed from the browser's `Last-Event-ID` (the event's revision).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt as _};
use procurator_proto::v1::{
    Event, GetMachineLogRequest, ListDeploymentsRequest, ListMachinesRequest, WatchRequest, event,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Code;

use super::Dashboard;
use crate::command::{deployments, logs, machine, status};
use crate::connection::Connection;
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
        .route("/api/deployments/{id}/events", get(events))
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

/// `status` from the control plane, said as ctl says it.
fn refused(conn: &Connection, status: &tonic::Status, doing: &str) -> Failure {
    from_grpc(status, conn.error(status, doing).to_string())
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
        Err(status) => return Err(refused(&conn, &status, "listing deployments")),
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
        Err(status) => Err(refused(
            &conn,
            &status,
            &format!("listing the machines of {id}"),
        )),
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
        Err(status) => Err(refused(
            &conn,
            &status,
            &format!("reading the output of {name}"),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Events after this revision; `Last-Event-ID` wins when the browser
    /// reconnects by itself.
    #[serde(default)]
    from: u64,
}

/// The revision to resume after: the browser's `Last-Event-ID`, else `from`.
fn resume_from(headers: &HeaderMap, from: u64) -> u64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(from)
}

/// One event as SSE: `id` its revision (so a reconnect resumes after it),
/// `event` its type, `data` the JSON line `watch --output json` prints.
fn to_sse(ev: &Event) -> sse::Event {
    let kind = match &ev.kind {
        Some(event::Kind::Finished(_)) => "finished",
        _ => "update",
    };
    sse::Event::default()
        .id(ev.revision.to_string())
        .event(kind)
        .data(crate::render::event_json(ev).to_string())
}

async fn events(
    State(state): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>, Failure> {
    let from_revision = resume_from(&headers, query.from);
    // The stream runs without the connection's lock: other pages go on.
    let (mut client, url) = {
        let conn = state.conn.lock().await;
        (conn.client.clone(), conn.url.clone())
    };
    let request = WatchRequest {
        deployment_id: id.clone(),
        from_revision,
    };
    let stream = match client.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let message =
                crate::connection::describe_status(&status, &url, &format!("watching {id}"));
            return Err(from_grpc(&status, message));
        }
    };
    // A broken Watch ends the SSE stream with an `error` event; the browser
    // reconnects and resumes after the last id it got.
    let events = stream.map(move |item| {
        Ok(match item {
            Ok(ev) => to_sse(&ev),
            Err(status) => sse::Event::default()
                .event("error")
                .data(json!({ "error": status.message() }).to_string()),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn a_reconnect_resumes_after_the_last_event_id() {
        let mut headers = HeaderMap::new();
        assert_eq!(resume_from(&headers, 7), 7);
        headers.insert("last-event-id", HeaderValue::from_static("42"));
        assert_eq!(resume_from(&headers, 7), 42);
        headers.insert("last-event-id", HeaderValue::from_static("junk"));
        assert_eq!(resume_from(&headers, 7), 7);
    }
}
