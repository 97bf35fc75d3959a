//! Applying the rollout scheduler (`rollout::schedule`) to the store: every
//! decision is committed with its event before anything is sent, so the
//! schedule survives a restart. Also what one machine should be sent, and
//! re-opening a machine that was given up as unreachable.

use procurator_core::{DeploymentId, MachineName};
use procurator_proto::v1::{
    DeploymentState, DesiredState, MachineState, MachineUpdate, RolloutHalted, WaveStarted, event,
};

use super::deployments::finish_if_done;
use super::engine::{Sql, SqlExt as _};
use super::rows::{StoredWave, machine_state, parse_id, row, set_state};
use super::{Store, StoreError, Tx};
use crate::rollout::{self, Step, Stop};

/// Orders the messages of one machine's stream: a newer deployment's, and
/// a deployment's cancel after its desired state, come later. Lets a
/// message read early (in a batch) be dropped when a later one was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct SendOrder(u64);

impl SendOrder {
    pub(crate) fn of(deployment_seq: i64, cancel: bool) -> Self {
        Self(u64::try_from(deployment_seq).unwrap_or(0) * 2 + u64::from(cancel))
    }
}

fn desired_of(
    conn: &dyn Sql,
    artifacts: &super::artifacts::ArtifactCache,
    machine: &MachineName,
) -> Result<Option<(Outbound, SendOrder)>, StoreError> {
    let newest: Option<(String, String, i32, i64, String, i64)> = conn.fetch_opt(
        "SELECT m.deployment_id, m.closure, m.state, d.stopped, d.halted_reason, d.seq
             FROM machines m JOIN deployments d ON d.id = m.deployment_id
             WHERE m.machine = ?1 ORDER BY d.seq DESC LIMIT 1",
        &[&machine.as_str()],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )?;
    let Some((id, closure, state, stopped, reason, seq)) = newest else {
        return Ok(None);
    };
    if !rollout::is_in_flight(machine_state(state)) {
        return Ok(None);
    }
    if Stop::from_sql(stopped) == Some(Stop::Cancelled) {
        let cancel = Outbound::Cancel {
            deployment_id: id,
            reason,
        };
        return Ok(Some((cancel, SendOrder::of(seq, true))));
    }
    let artifact = artifacts.get(conn, &id)?;
    let desired = rollout::desired_state(&artifact, &id, machine, &closure);
    Ok(Some((
        Outbound::Desired(desired),
        SendOrder::of(seq, false),
    )))
}

/// A machine the scheduler just moved to SENT, with what to send it. Built
/// in the transaction that committed the move, so a wave of 10,000 is not
/// read back row by row before it goes out.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    pub machine: MachineName,
    pub outbound: Outbound,
    pub order: SendOrder,
    /// The connected VM host the row is placed on, if it is a VM instance:
    /// the host decides how it changes (restart, or in place by its own
    /// agent).
    pub host: Option<MachineName>,
}

/// Which running deployments a scheduler run looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every one: also what time decides (machines unreachable).
    Full,
    /// Those holding a machine not yet sent (PENDING): only they can start
    /// a wave, send or halt, so a result in a deployment whose machines are
    /// all sent costs one index probe, not a read of every row.
    Sendable,
}

/// What to send a machine over its stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    Desired(DesiredState),
    /// Its newest deployment was cancelled while it was in flight.
    Cancel {
        deployment_id: String,
        reason: String,
    },
}

impl Store {
    /// Run the scheduler over the running deployments in `scope`. Returns
    /// the machines that were just moved to SENT, with the desired states
    /// they must be sent now.
    pub async fn schedule(&self, scope: Scope) -> Result<Vec<Scheduled>, StoreError> {
        // Most results arrive with every machine sent: a read says so
        // without taking the write lock, which replicas share.
        if scope == Scope::Sendable
            && self
                .read(move |conn| in_scope(conn, scope))
                .await?
                .is_empty()
        {
            return Ok(Vec::new());
        }
        self.write(move |tx| schedule_all(tx, scope)).await
    }

    /// What `machine` should be sent on (re)connecting: its row in the newest
    /// deployment that names it, when that row is in flight. A PENDING row
    /// waits for the scheduler; a final one needs nothing.
    #[cfg(test)]
    pub async fn take_desired(&self, machine: MachineName) -> Result<Option<Outbound>, StoreError> {
        Ok(self.desired(machine).await?.map(|(outbound, _)| outbound))
    }

    /// The order of what deployment `id` sends its machines (a cancel:
    /// `cancel`); `None` if there is no such deployment.
    pub async fn send_order(
        &self,
        id: String,
        cancel: bool,
    ) -> Result<Option<SendOrder>, StoreError> {
        self.read(move |conn| {
            let seq: Option<i64> =
                conn.fetch_opt("SELECT seq FROM deployments WHERE id = ?1", &[&id], |r| {
                    r.get(0)
                })?;
            Ok(seq.map(|seq| SendOrder::of(seq, cancel)))
        })
        .await
    }

    /// The desired state a SENT event of deployment `id` stands for:
    /// built from the event's closure and the deployment's artifact (read
    /// once per deployment), not from the machine's row, so that a wave of
    /// 10,000 decided on another replica costs no read per machine.
    pub async fn desired_for_event(
        &self,
        id: String,
        machine: MachineName,
        closure: String,
    ) -> Result<DesiredState, StoreError> {
        let artifacts = self.inner.artifacts.clone();
        let artifact = match artifacts.cached(&id) {
            Some(artifact) => artifact,
            None => {
                let id = id.clone();
                self.read(move |conn| artifacts.get(conn, &id)).await?
            }
        };
        Ok(rollout::desired_state(&artifact, &id, &machine, &closure))
    }

    /// [`Store::take_desired`] with the message's [`SendOrder`].
    pub async fn desired(
        &self,
        machine: MachineName,
    ) -> Result<Option<(Outbound, SendOrder)>, StoreError> {
        let artifacts = self.inner.artifacts.clone();
        self.read(move |conn| desired_of(conn, &artifacts, &machine))
            .await
    }

    /// The agent of `machine` is back: if its newest row had been given up
    /// as UNREACHABLE, re-open it and mark it SENT (the caller sends it), so
    /// the machine converges; the deployment runs again until that row is
    /// final. True when a row was re-opened.
    pub async fn reopen_unreachable(&self, machine: MachineName) -> Result<bool, StoreError> {
        self.write(move |tx| {
            let newest: Option<(String, i32, i64)> = tx.sql.fetch_opt(
                "SELECT m.deployment_id, m.state, d.stopped FROM machines m
                     JOIN deployments d ON d.id = m.deployment_id
                     WHERE m.machine = ?1 ORDER BY d.seq DESC LIMIT 1",
                &[&machine.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let Some((id, state, stopped)) = newest else {
                return Ok(false);
            };
            // A cancelled deployment is not run after all.
            if machine_state(state) != MachineState::Unreachable
                || Stop::from_sql(stopped) == Some(Stop::Cancelled)
            {
                return Ok(false);
            }
            let id = parse_id(&id)?;
            tx.sql.exec(
                "UPDATE deployments SET state = ?2, finished_ms = 0 WHERE id = ?1",
                &[&id.as_str(), &(DeploymentState::Running as i32)],
            )?;
            tx.sql.exec(
                "UPDATE machines SET reason = '' WHERE deployment_id = ?1 AND machine = ?2",
                &[&id.as_str(), &machine.as_str()],
            )?;
            update(
                tx,
                &id,
                &machine,
                MachineState::Pending,
                "the agent is back: re-opened".into(),
            )?;
            update(
                tx,
                &id,
                &machine,
                MachineState::Sent,
                "sent to the agent".into(),
            )?;
            Ok(true)
        })
        .await
    }
}

/// Move a row to `state` and record it in the event log.
fn update(
    tx: &mut Tx<'_>,
    id: &DeploymentId,
    machine: &MachineName,
    state: MachineState,
    message: String,
) -> Result<(), StoreError> {
    let closure = row(tx, id, machine)?.map(|(c, _)| c).unwrap_or_default();
    set_state(tx, id, machine, state)?;
    emit_state(tx, id, machine, state, message, closure)
}

/// The event of a row's move to `state` (the row itself moved by the caller).
fn emit_state(
    tx: &mut Tx<'_>,
    id: &DeploymentId,
    machine: &MachineName,
    state: MachineState,
    message: String,
    closure: String,
) -> Result<(), StoreError> {
    let update = MachineUpdate {
        machine: machine.to_string(),
        state: state as i32,
        closure,
        message,
        ..Default::default()
    };
    tx.emit(id.as_str(), event::Kind::Machine(update))?;
    Ok(())
}

fn schedule_all(tx: &mut Tx<'_>, scope: Scope) -> Result<Vec<Scheduled>, StoreError> {
    let mut send = Vec::new();
    for id in in_scope(&*tx.sql, scope)? {
        send.extend(schedule_one(tx, &parse_id(&id)?)?);
    }
    Ok(send)
}

/// The running deployments in `scope`, oldest first.
fn in_scope(conn: &dyn Sql, scope: Scope) -> Result<Vec<String>, StoreError> {
    let running = DeploymentState::Running as i32;
    match scope {
        Scope::Full => conn.fetch_all(
            "SELECT id FROM deployments WHERE state = ?1 ORDER BY seq",
            &[&running],
            |r| r.get(0),
        ),
        // A probe of (deployment_id, state) per running deployment, not a
        // join over every deployment's rows.
        Scope::Sendable => conn.fetch_all(
            "SELECT d.id FROM deployments d WHERE d.state = ?1 AND EXISTS
                 (SELECT 1 FROM machines m WHERE m.deployment_id = d.id AND m.state = ?2)
             ORDER BY d.seq",
            &[&running, &(MachineState::Pending as i32)],
            |r| r.get(0),
        ),
    }
}

fn schedule_one(tx: &mut Tx<'_>, id: &DeploymentId) -> Result<Vec<Scheduled>, StoreError> {
    let (stopped, started_wave, wave_started_ms, waves, seq): (i64, Option<i64>, i64, String, i64) =
        tx.sql
            .fetch_one(
                "SELECT stopped, started_wave, wave_started_ms, waves, seq FROM deployments WHERE id = ?1",
                &[&id.as_str()],
                |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            },
            )?;
    let artifact = tx.artifacts.get(&*tx.sql, id.as_str())?;
    let settings = artifact.rollout();
    let waves: Vec<StoredWave> = serde_json::from_str(&waves)
        .map_err(|e| StoreError::Corrupt(format!("the waves of {id} cannot be read: {e}")))?;
    // Each placed VM instance's host, from the same read as the rows.
    let mut host_of: std::collections::HashMap<String, String> = Default::default();
    let rows: Vec<rollout::Row> = {
        tx.sql.fetch_all(
            // A VM instance is reachable through its own agent or, without
            // one, through the VM host it is placed on. (CASE, not OR and a
            // two-argument MAX: the same SQL in every engine.)
            "SELECT m.machine, m.wave, m.state,
                    CASE WHEN COALESCE(a.connected, 0) != 0 OR COALESCE(h.connected, 0) != 0
                         THEN 1 ELSE 0 END,
                    CASE WHEN COALESCE(a.last_seen_ms, 0) > COALESCE(h.last_seen_ms, 0)
                         THEN COALESCE(a.last_seen_ms, 0) ELSE COALESCE(h.last_seen_ms, 0) END,
                    p.host, COALESCE(h.connected, 0)
             FROM machines m
             LEFT JOIN agents a ON a.machine = m.machine
             LEFT JOIN placements p ON p.instance = m.machine
             LEFT JOIN agents h ON h.machine = p.host
             WHERE m.deployment_id = ?1 ORDER BY m.machine",
            &[&id.as_str()],
            |r| {
                let connected: Option<bool> = r.get(3)?;
                let last_seen: Option<i64> = r.get(4)?;
                let machine: String = r.get(0)?;
                // Only a connected host can take the change; without one
                // the instance's own agent does.
                if let Some(host) = r.get::<Option<String>>(5)?
                    && r.get::<bool>(6)?
                {
                    host_of.insert(machine.clone(), host);
                }
                Ok(rollout::Row {
                    machine,
                    wave: u32::try_from(r.get::<i64>(1)?).unwrap_or(u32::MAX),
                    state: machine_state(r.get(2)?),
                    disconnected_since: match connected {
                        Some(true) => None,
                        _ => Some(last_seen.unwrap_or(0)),
                    },
                })
            },
        )?
    };
    let limits = rollout::Limits {
        max_in_flight: settings.max_in_flight,
        failure_budget: settings.failure_budget,
        unreachable_after_ms: i64::from(settings.unreachable_after_secs()) * 1000,
    };
    let progress = rollout::Progress {
        started_wave: started_wave.and_then(|w| u32::try_from(w).ok()),
        wave_started_ms,
        stopped: Stop::from_sql(stopped).is_some(),
        opened_ms: tx.opened_ms,
    };
    let steps = rollout::schedule(&rows, limits, progress, tx.now);
    // A wave starting sends to many machines at once: their closures (for
    // the events) in one read rather than one lookup each.
    let mut closures: std::collections::HashMap<String, String> =
        if steps.iter().filter(|s| matches!(s, Step::Send(_))).count() > 1 {
            tx.sql
                .fetch_all(
                    "SELECT machine, closure FROM machines WHERE deployment_id = ?1",
                    &[&id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?
                .into_iter()
                .collect()
        } else {
            Default::default()
        };
    let mut send = Vec::new();
    let mut sent_rows: Vec<String> = Vec::new();
    let mut halted_by = String::new();
    for step in steps {
        match step {
            Step::WaveStarted(index) => {
                tx.sql.exec(
                    "UPDATE deployments SET started_wave = ?2, wave_started_ms = ?3 WHERE id = ?1",
                    &[&id.as_str(), &index, &tx.now],
                )?;
                let wave = waves.get(index as usize).cloned().unwrap_or(StoredWave {
                    name: format!("wave {index}"),
                    machines: Vec::new(),
                });
                let started = WaveStarted {
                    index,
                    total: u32::try_from(waves.len()).unwrap_or(u32::MAX),
                    name: wave.name,
                    machines: wave.machines,
                };
                tx.emit(id.as_str(), event::Kind::WaveStarted(started))?;
            }
            Step::Unreachable { machine, secs } => {
                let machine = name(&machine)?;
                let reason = format!("no agent connected for {secs} s");
                tx.sql.exec(
                    "UPDATE machines SET reason = ?3 WHERE deployment_id = ?1 AND machine = ?2",
                    &[&id.as_str(), &machine.as_str(), &reason],
                )?;
                update(tx, id, &machine, MachineState::Unreachable, reason)?;
            }
            Step::Halted { failed } => {
                halted_by = failed.join(", ");
                let reason = format!(
                    "rollout halted: {} machine(s) failed ({halted_by}), more than the failure budget of {}",
                    failed.len(),
                    settings.failure_budget
                );
                tx.sql.exec(
                    "UPDATE deployments SET stopped = ?2, halted_reason = ?3 WHERE id = ?1",
                    &[&id.as_str(), &Stop::to_sql(Some(Stop::Halted)), &reason],
                )?;
                let halted = RolloutHalted {
                    reason,
                    failed_machines: failed,
                };
                tx.emit(id.as_str(), event::Kind::Halted(halted))?;
            }
            Step::Cancel(machine) => {
                let machine = name(&machine)?;
                let reason =
                    format!("rollout halted: the failure budget was used up by {halted_by}");
                tx.sql.exec(
                    "UPDATE machines SET reason = ?3 WHERE deployment_id = ?1 AND machine = ?2",
                    &[&id.as_str(), &machine.as_str(), &reason],
                )?;
                update(tx, id, &machine, MachineState::Cancelled, reason)?;
            }
            Step::Send(raw) => {
                let machine = name(&raw)?;
                let closure = match closures.remove(&raw) {
                    Some(closure) => closure,
                    None => row(tx, id, &machine)?.map(|(c, _)| c).unwrap_or_default(),
                };
                let desired = rollout::desired_state(&artifact, id.as_str(), &machine, &closure);
                // The row moves with the others sent, after the loop.
                sent_rows.push(raw.clone());
                let message = "sent to the agent".to_owned();
                emit_state(tx, id, &machine, MachineState::Sent, message, closure)?;
                let host = host_of.get(&raw).map(|h| name(h)).transpose()?;
                send.push(Scheduled {
                    machine,
                    outbound: Outbound::Desired(desired),
                    order: SendOrder::of(seq, false),
                    host,
                });
            }
        }
    }
    // A wave of 10,000 in a few statements, not 10,000.
    let keys: Vec<&str> = sent_rows.iter().map(String::as_str).collect();
    tx.sql.update_where_in(
        "UPDATE machines SET state = ?1, updated_ms = ?2 WHERE deployment_id = ?3",
        &[&(MachineState::Sent as i32), &tx.now, &id.as_str()],
        "machine",
        &keys,
    )?;
    finish_if_done(tx, id.as_str())?;
    Ok(send)
}

fn name(raw: &str) -> Result<MachineName, StoreError> {
    MachineName::parse(raw).map_err(|e| StoreError::Corrupt(e.to_string()))
}
