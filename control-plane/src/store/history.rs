//! One machine across deployments: its row in each, newest first
//! (`GetMachineHistory`), and the output its agent sent with each result
//! (`GetMachineLog`).

use procurator_core::limits::{MAX_PAGE_BYTES, MAX_PAGE_ROWS};
use procurator_core::{DeploymentId, MachineName};
use procurator_proto::v1::{DeploymentState, MachineHistoryEntry, MachineLog};
use prost::Message as _;

use super::engine::{SqlExt as _, ToParam};
use super::paging::Page;
use super::queries::{machine_columns, machine_row};
use super::rows::machine_state;
use super::{Store, StoreError};

/// What [`Store::machine_log`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum LogLookup {
    Found(MachineLog),
    /// The deployment (or, without one, no kept deployment) has no row for
    /// the machine.
    NoRow,
    /// The row exists but no output was kept for it: no result yet, or an
    /// agent that sends none.
    NoOutput(MachineLog),
}

impl Store {
    /// Up to `size` of `machine`'s deployments submitted before the one
    /// numbered `before` (none: from the newest), newest first. The page
    /// token is the last entry's submission number.
    pub async fn machine_history(
        &self,
        machine: MachineName,
        before: Option<i64>,
        size: u32,
    ) -> Result<Page<MachineHistoryEntry>, StoreError> {
        let size = size.clamp(1, MAX_PAGE_ROWS);
        self.read(move |conn| {
            let sql = format!(
                "SELECT {}, d.seq, d.id, d.git_commit, d.submitted_by, d.created_ms, d.state,
                        m.started_ms,
                        EXISTS (SELECT 1 FROM machine_logs l
                                WHERE l.deployment_id = m.deployment_id AND l.machine = m.machine)
                 FROM machines m JOIN deployments d ON d.id = m.deployment_id
                 WHERE m.machine = ?1 AND d.seq < ?2
                 ORDER BY d.seq DESC LIMIT ?3",
                machine_columns("m.")
            );
            let rows: Vec<(i64, MachineHistoryEntry)> = conn.fetch_all(
                &sql,
                &[
                    &machine.as_str() as &dyn ToParam,
                    &before.unwrap_or(i64::MAX),
                    &(size + 1),
                ],
                |r| {
                    let entry = MachineHistoryEntry {
                        status: Some(machine_row(r)?),
                        deployment_id: r.get(14)?,
                        git_commit: r.get(15)?,
                        submitted_by: r.get(16)?,
                        created_at_ms: r.get(17)?,
                        deployment_state: DeploymentState::try_from(r.get::<i32>(18)?)
                            .unwrap_or(DeploymentState::Unspecified)
                            as i32,
                        started_at_ms: r.get(19)?,
                        has_log: r.get(20)?,
                    };
                    Ok((r.get(13)?, entry))
                },
            )?;
            let mut page = Page {
                items: Vec::new(),
                next_after: None,
            };
            let mut bytes = 0;
            let mut last_seq = None;
            for (seq, entry) in rows {
                let len = entry.encoded_len();
                let full = page.items.len() == size as usize
                    || (!page.items.is_empty() && bytes + len > MAX_PAGE_BYTES);
                if full {
                    page.next_after = last_seq.map(|s: i64| s.to_string());
                    break;
                }
                bytes += len;
                last_seq = Some(seq);
                page.items.push(entry);
            }
            Ok(page)
        })
        .await
    }

    /// The output `machine` sent for `deployment` (none: the newest
    /// deployment with output kept for it).
    pub async fn machine_log(
        &self,
        machine: MachineName,
        deployment: Option<DeploymentId>,
    ) -> Result<LogLookup, StoreError> {
        self.read(move |conn| {
            let name = machine.as_str();
            let found: Option<(String, i32, Option<String>)> = match &deployment {
                Some(id) => conn.fetch_opt(
                    "SELECT m.deployment_id, m.state, l.output FROM machines m
                     LEFT JOIN machine_logs l
                         ON l.deployment_id = m.deployment_id AND l.machine = m.machine
                     WHERE m.deployment_id = ?1 AND m.machine = ?2",
                    &[&id.as_str() as &dyn ToParam, &name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?,
                None => {
                    let newest = conn.fetch_opt(
                        "SELECT m.deployment_id, m.state, l.output FROM machine_logs l
                         JOIN machines m ON m.deployment_id = l.deployment_id AND m.machine = l.machine
                         JOIN deployments d ON d.id = l.deployment_id
                         WHERE l.machine = ?1 ORDER BY d.seq DESC LIMIT 1",
                        &[&name as &dyn ToParam],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )?;
                    match newest {
                        Some(found) => Some(found),
                        // Say whether the machine is known at all.
                        None => conn.fetch_opt(
                            "SELECT m.deployment_id, m.state, CAST(NULL AS TEXT) FROM machines m
                             JOIN deployments d ON d.id = m.deployment_id
                             WHERE m.machine = ?1 ORDER BY d.seq DESC LIMIT 1",
                            &[&name as &dyn ToParam],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                        )?,
                    }
                }
            };
            Ok(match found {
                None => LogLookup::NoRow,
                Some((deployment_id, state, output)) => {
                    let log = MachineLog {
                        machine: name.to_owned(),
                        deployment_id,
                        state: machine_state(state) as i32,
                        output: output.clone().unwrap_or_default(),
                    };
                    if output.is_some() {
                        LogLookup::Found(log)
                    } else {
                        LogLookup::NoOutput(log)
                    }
                }
            })
        })
        .await
    }

    /// How many outputs the store holds, of any deployment.
    #[cfg(test)]
    pub async fn kept_logs(&self) -> Result<i64, StoreError> {
        self.read(|conn| conn.fetch_one("SELECT count(*) FROM machine_logs", &[], |r| r.get(0)))
            .await
    }
}
