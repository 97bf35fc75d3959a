//! One machine's row and the conversions between stored values and the
//! domain's: shared by every part of the store that reads or moves rows.

use procurator_core::{DeploymentId, MachineName};
use procurator_proto::v1::MachineState;

use super::engine::SqlExt as _;
use super::{StoreError, Tx};

/// A wave as stored with its deployment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct StoredWave {
    pub name: String,
    pub machines: Vec<String>,
}

/// The closure and state of one machine's row.
pub(super) fn row(
    tx: &Tx<'_>,
    id: &DeploymentId,
    machine: &MachineName,
) -> Result<Option<(String, MachineState)>, StoreError> {
    tx.sql.fetch_opt(
        "SELECT closure, state FROM machines WHERE deployment_id = ?1 AND machine = ?2",
        &[&id.as_str(), &machine.as_str()],
        |r| Ok((r.get(0)?, machine_state(r.get(1)?))),
    )
}

pub(super) fn set_state(
    tx: &Tx<'_>,
    id: &DeploymentId,
    machine: &MachineName,
    state: MachineState,
) -> Result<(), StoreError> {
    tx.sql.exec(
        "UPDATE machines SET state = ?3, updated_ms = ?4 WHERE deployment_id = ?1 AND machine = ?2",
        &[&id.as_str(), &machine.as_str(), &(state as i32), &tx.now],
    )?;
    Ok(())
}

/// The codes of the machine states that are final (or, `false`, not), as
/// an SQL list for `state IN (…)`.
fn state_codes(final_: bool) -> String {
    (0..=i32::from(u8::MAX))
        .filter_map(|n| MachineState::try_from(n).ok())
        .filter(|s| s.is_final() == final_)
        .map(|s| (s as i32).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `state IN (FINAL_STATES)`: the row is final.
pub(super) static FINAL_STATES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| state_codes(true));
/// `state IN (UNFINISHED_STATES)`: the row is pending or in flight.
pub(super) static UNFINISHED_STATES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| state_codes(false));

pub(super) fn machine_state(value: i32) -> MachineState {
    MachineState::try_from(value).unwrap_or(MachineState::Unspecified)
}

pub(super) fn parse_id(id: &str) -> Result<DeploymentId, StoreError> {
    DeploymentId::parse(id).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn from_sql(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
