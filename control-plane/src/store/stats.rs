//! Aggregates for the metrics endpoint: one grouped query per table, run at
//! scrape time, so a scrape costs the same however many machines there are.

use procurator_proto::v1::{DeploymentState, MachineState};

use super::engine::{Sql, SqlExt as _};
use super::{Store, StoreError};

/// What a scrape reports from the store.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub connected_agents: i64,
    pub deployments: Vec<(DeploymentState, i64)>,
    pub machines: Vec<(MachineState, i64)>,
    /// The highest revision in the event log (0 when it is empty).
    pub event_log_revision: i64,
}

impl Store {
    pub async fn fleet_stats(&self) -> Result<FleetStats, StoreError> {
        self.read(|conn| {
            let connected_agents = conn.fetch_one(
                "SELECT count(*) FROM agents WHERE connected != 0",
                &[],
                |r| r.get(0),
            )?;
            // The last revision given out, even when pruning left no event.
            let event_log_revision =
                conn.fetch_one("SELECT head FROM log_bounds WHERE id = 1", &[], |r| {
                    r.get(0)
                })?;
            let deployments = grouped(conn, "deployments")?
                .into_iter()
                .map(|(s, n)| {
                    let state =
                        DeploymentState::try_from(s).unwrap_or(DeploymentState::Unspecified);
                    (state, n)
                })
                .collect();
            let machines = grouped(conn, "machines")?
                .into_iter()
                .map(|(s, n)| {
                    let state = MachineState::try_from(s).unwrap_or(MachineState::Unspecified);
                    (state, n)
                })
                .collect();
            Ok(FleetStats {
                connected_agents,
                deployments,
                machines,
                event_log_revision,
            })
        })
        .await
    }
}

/// `state → count` of one table; `table` is one of ours, never input.
fn grouped(conn: &dyn Sql, table: &str) -> Result<Vec<(i32, i64)>, StoreError> {
    conn.fetch_all(
        &format!("SELECT state, count(*) FROM {table} GROUP BY state"),
        &[],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}
