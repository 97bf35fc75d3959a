//! Recording where VM instances run. When a deployment is submitted its VM
//! instances are placed ([`crate::placement`]) on the VM hosts known then,
//! keeping the previous placements that still hold; the result replaces the
//! placements table and is announced in a `VmsPlaced` event.

use std::collections::BTreeMap;

use procurator_core::artifact::Demand;
use procurator_core::{DeploymentArtifact, DeploymentId, MachineName};
use procurator_proto::v1::{
    MachineState, VmAssignment, VmHostCapacity, VmPlacement, VmUnplaced, VmsPlaced, event,
};

use super::engine::SqlExt as _;
use super::rows::to_sql;
use super::{Store, StoreError, Tx};
use crate::placement::{self, Host};

/// A VM host unseen for this long is gone, and its instances are placed
/// elsewhere; one that only reconnects meanwhile keeps them.
pub const HOST_GONE_AFTER_MS: i64 = 10 * 60 * 1000;

/// How the reason of a row whose VM instance has no host begins.
const UNPLACED_NOTE: &str = "not placed: ";

/// Place `artifact`'s VM instances and record it. Without a VM instance, or
/// without any VM host (the VMs' own agents deploy them in place), nothing
/// is placed and no event is written.
/// With `only_if_changed`, a placement equal to the stored one writes
/// nothing. True when something was written.
pub(super) fn place_vms(
    tx: &mut Tx<'_>,
    id: &DeploymentId,
    artifact: &DeploymentArtifact,
    only_if_changed: bool,
) -> Result<bool, StoreError> {
    let instances = artifact.vm_instances();
    if instances.is_empty() {
        let removed = tx.sql.exec("DELETE FROM placements", &[])?;
        return Ok(removed > 0);
    }
    let hosts = known_hosts(tx)?;
    if hosts.is_empty() {
        return Ok(false);
    }
    let previous: BTreeMap<MachineName, MachineName> = {
        tx.sql
            .fetch_all("SELECT instance, host FROM placements", &[], |r| {
                Ok((r.get::<String>(0)?, r.get::<String>(1)?))
            })?
            .into_iter()
            // A name that no longer parses is simply not kept.
            .filter_map(|(i, h)| Some((MachineName::parse(&i).ok()?, MachineName::parse(&h).ok()?)))
            .collect()
    };
    let placed = placement::place(&instances, &hosts, &previous);
    // Instances still without room were reported when they first had none.
    if only_if_changed && placed.assigned == previous {
        return Ok(false);
    }

    tx.sql.exec("DELETE FROM placements", &[])?;
    let machine_of: BTreeMap<&MachineName, (&MachineName, Demand)> = instances
        .iter()
        .map(|i| (&i.name, (&i.machine, i.demand)))
        .collect();
    let mut event = VmsPlaced::default();
    {
        for (instance, host) in &placed.assigned {
            let Some((machine, demand)) = machine_of.get(instance) else {
                continue;
            };
            tx.sql.exec(
                "INSERT INTO placements (instance, machine, host, milli_cpus, memory_bytes, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &[
                    &instance.as_str(),
                    &machine.as_str(),
                    &host.as_str(),
                    &to_sql(demand.milli_cpus),
                    &to_sql(demand.memory_bytes),
                    &tx.now,
                ],
            )?;
            event.placements.push(VmPlacement {
                instance: instance.to_string(),
                machine: machine.to_string(),
                host: host.to_string(),
            });
        }
    }
    // An unplaced instance's row waits, saying why, for a host with room;
    // one placed now loses that note.
    tx.sql.exec(
        "UPDATE machines SET reason = '', updated_ms = ?2
             WHERE deployment_id = ?1 AND state = ?3 AND reason LIKE ?4 || '%'",
        &[
            &id.as_str(),
            &tx.now,
            &(MachineState::Pending as i32),
            &UNPLACED_NOTE,
        ],
    )?;
    for (instance, reason) in placed.unplaced {
        let machine = machine_of
            .get(&instance)
            .map(|(m, _)| m.to_string())
            .unwrap_or_default();
        tracing::warn!(deployment = %id, %instance, %reason, "VM instance not placed");
        tx.sql.exec(
            "UPDATE machines SET reason = ?3, updated_ms = ?4
                 WHERE deployment_id = ?1 AND machine = ?2 AND state = ?5",
            &[
                &id.as_str(),
                &instance.as_str(),
                &format!("{UNPLACED_NOTE}{reason}"),
                &tx.now,
                &(MachineState::Pending as i32),
            ],
        )?;
        event.unplaced.push(VmUnplaced {
            instance: instance.to_string(),
            machine,
            reason,
        });
    }
    tx.emit(id.as_str(), event::Kind::VmsPlaced(event))?;
    Ok(true)
}

impl Store {
    /// Place the newest deployment's VM instances again, as when it was
    /// submitted: a VM host has come (back), and instances that had no room
    /// may have some now. True when the placement changed (and a
    /// `VmsPlaced` event says how).
    pub async fn replace_vms(&self) -> Result<bool, StoreError> {
        self.write(|tx| {
            let newest: Option<String> = tx.sql.fetch_opt(
                "SELECT id FROM deployments ORDER BY seq DESC LIMIT 1",
                &[],
                |r| r.get(0),
            )?;
            let Some(id) = newest else {
                return Ok(false);
            };
            let id = super::rows::parse_id(&id)?;
            let artifact = tx.artifacts.get(&*tx.sql, id.as_str())?;
            place_vms(tx, &id, &artifact, true)
        })
        .await
    }

    /// What `host` should run: each instance placed on it with the closure
    /// of its newest row that was sent (or succeeded). A row still waiting
    /// for its wave is not run yet; a failed one is not run at all.
    pub async fn vm_assignments(&self, host: MachineName) -> Result<Vec<VmAssignment>, StoreError> {
        let artifacts = self.inner.artifacts.clone();
        self.read(move |conn| {
            let rows = conn.fetch_all(&ASSIGNMENTS_QUERY, &[&host.as_str()], |r| {
                Ok(VmAssignment {
                    instance: r.get(0)?,
                    machine: r.get(1)?,
                    milli_cpus: u64::try_from(r.get::<i64>(2)?).unwrap_or(0),
                    memory_bytes: u64::try_from(r.get::<i64>(3)?).unwrap_or(0),
                    closure: r.get::<Option<String>>(4)?.unwrap_or_default(),
                    deployment_id: r.get::<Option<String>>(5)?.unwrap_or_default(),
                    guest_agent_connected: r.get(6)?,
                    no_auto_rollback: false,
                    intent: String::new(),
                })
            })?;
            // An instance with nothing sent yet runs nothing yet.
            let mut rows: Vec<VmAssignment> =
                rows.into_iter().filter(|a| !a.closure.is_empty()).collect();
            // autoRollback and the statement as the deployment whose
            // closure it runs says.
            for row in &mut rows {
                let artifact = artifacts.get(conn, &row.deployment_id)?;
                if let Some(spec) = MachineName::parse(&row.machine)
                    .ok()
                    .and_then(|m| artifact.blueprint.get(&m))
                {
                    row.no_auto_rollback = !spec.deployment.auto_rollback;
                }
                if let Some(statement) = MachineName::parse(&row.instance)
                    .ok()
                    .and_then(|i| artifact.statement(&i))
                {
                    row.intent = statement.as_str().to_owned();
                }
            }
            Ok(rows)
        })
        .await
    }

    /// The distinct VM hosts `instances` are placed on (an instance not
    /// placed, or a plain machine, has none).
    pub async fn hosts_of(
        &self,
        instances: Vec<MachineName>,
    ) -> Result<Vec<MachineName>, StoreError> {
        self.read(move |conn| {
            let mut hosts = std::collections::BTreeSet::new();
            for instance in &instances {
                if let Some(host) = conn.fetch_opt(
                    "SELECT host FROM placements WHERE instance = ?1",
                    &[&instance.as_str()],
                    |r| r.get::<String>(0),
                )? {
                    hosts.insert(host);
                }
            }
            hosts
                .into_iter()
                .map(|h| MachineName::parse(&h).map_err(|e| StoreError::Corrupt(e.to_string())))
                .collect()
        })
        .await
    }

    /// Of `instances`, those placed on a connected VM host, each with it.
    /// One query for all: VM instances are few, machines may be 10,000.
    pub async fn connected_hosts_of(
        &self,
        instances: Vec<MachineName>,
    ) -> Result<Vec<(MachineName, MachineName)>, StoreError> {
        self.read(move |conn| {
            let placed: std::collections::HashMap<String, String> = conn
                .fetch_all(
                    "SELECT p.instance, p.host FROM placements p
                     JOIN agents h ON h.machine = p.host WHERE h.connected = 1",
                    &[],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?
                .into_iter()
                .collect();
            let mut found = Vec::new();
            for instance in &instances {
                if let Some(host) = placed.get(instance.as_str()) {
                    let host =
                        MachineName::parse(host).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    found.push((instance.clone(), host));
                }
            }
            Ok(found)
        })
        .await
    }

    /// A VM host decided `instance` needs no restart for `deployment_id`:
    /// its row says so (it stays SENT; the guest's agent reports from here).
    pub async fn note_in_place(
        &self,
        instance: MachineName,
        deployment_id: DeploymentId,
        host: MachineName,
    ) -> Result<bool, StoreError> {
        self.write(move |tx| {
            let Some((closure, state)) = super::rows::row(tx, &deployment_id, &instance)?
            else {
                return Ok(false);
            };
            if state != procurator_proto::v1::MachineState::Sent {
                return Ok(false);
            }
            let update = procurator_proto::v1::MachineUpdate {
                machine: instance.to_string(),
                state: state as i32,
                closure,
                message: format!(
                    "in place: the same kernel, initrd and command line, so {host} keeps the VM running and its own agent switches it"
                ),
                in_place: true,
                ..Default::default()
            };
            tx.emit(deployment_id.as_str(), event::Kind::Machine(update))?;
            Ok(true)
        })
        .await
    }

    /// The connected agents that host VMs.
    pub async fn connected_vm_hosts(&self) -> Result<Vec<MachineName>, StoreError> {
        self.read(|conn| {
            let names = conn.fetch_all(
                "SELECT machine FROM agents WHERE connected = 1 AND vm_host IS NOT NULL ORDER BY machine",
                &[],
                |r| r.get::<String>(0),
            )?;
            names
                .iter()
                .map(|n| MachineName::parse(n).map_err(|e| StoreError::Corrupt(e.to_string())))
                .collect()
        })
        .await
    }
}

/// Each instance placed on host `?1`, with the closure and deployment of
/// its newest row in a runnable state, and whether its own agent is up.
static ASSIGNMENTS_QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use procurator_proto::v1::MachineState as S;
    let runnable = [
        S::Sent,
        S::Copying,
        S::Activating,
        S::Checking,
        S::Confirming,
        S::Committing,
        S::Succeeded,
        S::Skipped,
    ]
    .map(|s| (s as i32).to_string())
    .join(", ");
    let newest = |column: &str| {
        format!(
            "(SELECT m.{column} FROM machines m JOIN deployments d ON d.id = m.deployment_id
              WHERE m.machine = p.instance AND m.state IN ({runnable})
              ORDER BY d.seq DESC LIMIT 1)"
        )
    };
    format!(
        "SELECT p.instance, p.machine, p.milli_cpus, p.memory_bytes, {}, {},
                COALESCE((SELECT a.connected FROM agents a WHERE a.machine = p.instance), 0)
         FROM placements p WHERE p.host = ?1 ORDER BY p.instance",
        newest("closure"),
        newest("deployment_id")
    )
});

/// VM hosts that are connected or were seen within [`HOST_GONE_AFTER_MS`].
fn known_hosts(tx: &Tx<'_>) -> Result<Vec<Host>, StoreError> {
    let rows: Vec<(String, Vec<u8>)> = tx.sql.fetch_all(
        "SELECT machine, vm_host FROM agents
         WHERE vm_host IS NOT NULL AND (connected = 1 OR last_seen_ms >= ?1)
         ORDER BY machine",
        &[&(tx.now - HOST_GONE_AFTER_MS)],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    rows.into_iter()
        .map(|(name, bytes)| {
            let capacity: VmHostCapacity = prost::Message::decode(bytes.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("the VM capacity of {name}: {e}")))?;
            Ok(Host {
                name: MachineName::parse(&name).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                capacity: Demand {
                    milli_cpus: capacity.milli_cpus,
                    memory_bytes: capacity.memory_bytes,
                },
                vmm: capacity.vmm,
            })
        })
        .collect()
}
