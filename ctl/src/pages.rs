//! Reading what the list RPCs page: every row of a deployment
//! (`ListMachines`), every agent (`ListAgents`), each filtered as asked;
//! a machine's deployments (`GetMachineHistory`).

use anyhow::{anyhow, bail};
use procurator_proto::v1::{
    Agent, Deployment, GetMachineHistoryRequest, ListAgentsRequest, ListMachinesRequest,
    MachineHistoryEntry, MachineState, MachineStatus,
};

use crate::connection::Connection;
use crate::follow::get_deployment;

/// Rows per page asked for: the most a control plane gives.
const PAGE_ROWS: u32 = procurator_core::limits::MAX_PAGE_ROWS;
/// More pages than this is a control plane that never ends its list: the
/// most rows a deployment may hold, at one row per page.
const MAX_PAGES: usize = procurator_core::limits::MAX_ROWS;

/// Which rows of a deployment to read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowFilter {
    pub states: Vec<MachineState>,
    pub waves: Vec<u32>,
    /// A name pattern (`web-*`); empty: every name.
    pub name: String,
}

/// Deployment `id`'s summary with its rows (those `filter` keeps).
pub async fn deployment_with_rows(
    conn: &mut Connection,
    id: &str,
    filter: &RowFilter,
) -> anyhow::Result<Deployment> {
    let mut deployment = get_deployment(conn, id).await?;
    deployment.machines = rows(conn, id, filter).await?;
    Ok(deployment)
}

pub async fn rows(
    conn: &mut Connection,
    id: &str,
    filter: &RowFilter,
) -> anyhow::Result<Vec<MachineStatus>> {
    let mut rows = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_PAGES {
        let request = ListMachinesRequest {
            deployment_id: id.to_owned(),
            page_size: PAGE_ROWS,
            page_token: page_token.clone(),
            states: filter.states.iter().map(|s| *s as i32).collect(),
            waves: filter.waves.clone(),
            name: filter.name.clone(),
        };
        let page = conn
            .client
            .list_machines(request)
            .await
            .map_err(|status| conn.error(&status, &format!("listing the machines of {id}")))?
            .into_inner();
        rows.extend(page.machines);
        if page.next_page_token.is_empty() {
            return Ok(rows);
        }
        page_token = next(conn, &page_token, page.next_page_token)?;
    }
    Err(endless(conn))
}

/// Every agent whose name matches `name` (empty: all), connected or not
/// as `connected` says.
pub async fn agents(
    conn: &mut Connection,
    name: &str,
    connected: Option<bool>,
) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_PAGES {
        let request = ListAgentsRequest {
            page_size: PAGE_ROWS,
            page_token: page_token.clone(),
            name: name.to_owned(),
            connected,
        };
        let page = conn
            .client
            .list_agents(request)
            .await
            .map_err(|status| conn.error(&status, "listing agents"))?
            .into_inner();
        agents.extend(page.agents);
        if page.next_page_token.is_empty() {
            return Ok(agents);
        }
        page_token = next(conn, &page_token, page.next_page_token)?;
    }
    Err(endless(conn))
}

/// `machine`'s newest `limit` deployments, newest first.
pub async fn history(
    conn: &mut Connection,
    machine: &str,
    limit: usize,
) -> anyhow::Result<Vec<MachineHistoryEntry>> {
    let mut entries = Vec::new();
    let mut page_token = String::new();
    while entries.len() < limit {
        let request = GetMachineHistoryRequest {
            machine: machine.to_owned(),
            page_size: u32::try_from(limit - entries.len())
                .unwrap_or(PAGE_ROWS)
                .min(PAGE_ROWS),
            page_token: page_token.clone(),
        };
        let page = conn
            .client
            .get_machine_history(request)
            .await
            .map_err(|status| conn.error(&status, &format!("reading the history of {machine}")))?
            .into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        // Tokens count down (submission numbers): one that does not would loop.
        let moved_on = match (
            page_token.parse::<u64>(),
            page.next_page_token.parse::<u64>(),
        ) {
            (_, Err(_)) => false,
            (Err(_), Ok(_)) => page_token.is_empty(),
            (Ok(before), Ok(after)) => after < before,
        };
        if !moved_on {
            bail!(
                "the control plane at {} answered with a page token that does not move on ({:?} after {page_token:?})",
                conn.url,
                page.next_page_token
            );
        }
        page_token = page.next_page_token;
    }
    entries.truncate(limit);
    Ok(entries)
}

/// Tokens are row names in order: one that does not move on would loop.
fn next(conn: &Connection, token: &str, next: String) -> anyhow::Result<String> {
    if next.as_str() <= token {
        bail!(
            "the control plane at {} answered with a page token that does not move on ({next:?} after {token:?})",
            conn.url
        );
    }
    Ok(next)
}

fn endless(conn: &Connection) -> anyhow::Error {
    anyhow!(
        "the control plane at {} listed more than {MAX_PAGES} pages; is it a Procurator control plane?",
        conn.url
    )
}
