//! Reading what the list RPCs page: every row of a deployment
//! (`ListMachines`), every agent (`ListAgents`), each filtered as asked.

use anyhow::{anyhow, bail};
use procurator_proto::v1::{
    Agent, Deployment, ListAgentsRequest, ListMachinesRequest, MachineState, MachineStatus,
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
