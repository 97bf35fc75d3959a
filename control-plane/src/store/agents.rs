//! Agents: who is connected, what they run, what they last reported.

use procurator_core::MachineName;
use procurator_core::certificate::CertificateInfo;
use procurator_proto::v1::{
    Agent, AgentConnection, Hello, MachineState, VmHostCapacity, VmPlacement, event,
};

use super::engine::{Row, Sql, SqlExt as _};
use super::paging::{Page, PageQuery, collect};
use super::{Store, StoreError, Tx};

/// How often heartbeats are written: how stale an agent's `last_seen` may
/// be while it is connected (a disconnect is written at once).
pub const HEARTBEAT_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

impl Store {
    /// A stream for `machine` completed its handshake on this replica.
    /// Returns the connection's generation: higher than any before it, in
    /// the whole cluster, so that the newest stream wins wherever it landed
    /// and only it can mark the machine disconnected.
    ///
    /// An event is appended only when the agent is new or reports something
    /// other than it last did: an agent that reconnects in a loop rewrites
    /// its row and never grows the log.
    pub async fn agent_connected(
        &self,
        machine: MachineName,
        hello: Hello,
        certificate: Option<CertificateInfo>,
    ) -> Result<u64, StoreError> {
        let replica = self.replica();
        self.write(move |tx| {
            let vm_host = hello.vm_host.as_ref().map(prost::Message::encode_to_vec);
            let (cert_serial, cert_not_after_ms) = certificate
                .map(|c| (c.serial, c.not_after.saturating_mul(1000)))
                .unwrap_or_default();
            let before: Option<Reported> = tx.sql.fetch_opt(
                "SELECT current_system, booted_system, agent_version, nix_version, vm_host
                     FROM agents WHERE machine = ?1",
                &[&machine.as_str()],
                |r| {
                    Ok(Reported {
                        current_system: r.get(0)?,
                        booted_system: r.get(1)?,
                        agent_version: r.get(2)?,
                        nix_version: r.get(3)?,
                        vm_host: r.get(4)?,
                    })
                },
            )?;
            // Under the store's write lock: no other replica hands out the
            // same number.
            let generation: i64 = tx.sql.fetch_one(
                "SELECT COALESCE(MAX(generation), 0) + 1 FROM agents",
                &[],
                |r| r.get(0),
            )?;
            tx.sql.exec(
                "INSERT INTO agents (machine, connected, generation, current_system, booted_system,
                                     agent_version, nix_version, last_seen_ms, vm_host, replica,
                                     cert_serial, cert_not_after_ms)
                 VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (machine) DO UPDATE SET
                     connected = 1, generation = ?2, current_system = ?3, booted_system = ?4,
                     agent_version = ?5, nix_version = ?6, last_seen_ms = ?7, vm_host = ?8,
                     replica = ?9, cert_serial = ?10, cert_not_after_ms = ?11",
                &[
                    &machine.as_str(),
                    &generation,
                    &hello.current_system,
                    &hello.booted_system,
                    &hello.agent_version,
                    &hello.nix_version,
                    &tx.now,
                    &vm_host,
                    &replica,
                    &cert_serial,
                    &cert_not_after_ms,
                ],
            )?;
            let now = Reported {
                current_system: hello.current_system,
                booted_system: hello.booted_system,
                agent_version: hello.agent_version,
                nix_version: hello.nix_version,
                vm_host,
            };
            if before.as_ref() != Some(&now) {
                emit_connection(tx, &machine, now.current_system)?;
            }
            Ok(u64::try_from(generation).unwrap_or(0))
        })
        .await
    }

    /// The agent is alive and runs `current_system` (empty: unchanged).
    /// Kept in memory and written with every other agent's by
    /// [`Store::flush_heartbeats`]: at 10,000 agents a write per heartbeat
    /// would be hundreds of transactions a second for timestamps.
    pub fn agent_heartbeat(&self, machine: &MachineName, current_system: String) {
        let mut pending = self.heartbeats();
        let beat = pending.entry(machine.to_string()).or_default();
        beat.0 = procurator_core::now_ms();
        if !current_system.is_empty() {
            beat.1 = current_system;
        }
    }

    /// Write the heartbeats received since the last flush, in one write.
    pub async fn flush_heartbeats(&self) -> Result<usize, StoreError> {
        let pending = std::mem::take(&mut *self.heartbeats());
        if pending.is_empty() {
            return Ok(0);
        }
        self.write(move |tx| {
            for (machine, (at, current_system)) in &pending {
                tx.sql.exec(
                    "UPDATE agents SET last_seen_ms = ?2,
                         current_system = CASE WHEN ?3 = '' THEN current_system ELSE ?3 END
                     WHERE machine = ?1",
                    &[&machine.as_str(), at, &current_system.as_str()],
                )?;
            }
            Ok(pending.len())
        })
        .await
    }

    /// Flush heartbeats every [`HEARTBEAT_FLUSH`] until `stop`, then once more.
    pub async fn keep_heartbeats_flushed(self, stop: tokio_util::sync::CancellationToken) {
        let mut interval = tokio::time::interval(HEARTBEAT_FLUSH);
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                _ = interval.tick() => false,
            };
            if let Err(e) = self.flush_heartbeats().await {
                tracing::debug!(error = %e, "could not write heartbeats; they are written with the next");
            }
            if stopping {
                return;
            }
        }
    }

    fn heartbeats(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (i64, String)>> {
        // A map of timestamps: a panicking holder leaves nothing half-done.
        self.inner
            .heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Connection `generation` of `machine` ended. Returns false (and changes
    /// nothing) when a newer connection has taken over since. No event: who is
    /// connected is the agents table's to say (and the metrics' to count), so
    /// that a flapping agent cannot grow the log.
    pub async fn agent_disconnected(
        &self,
        machine: MachineName,
        generation: u64,
    ) -> Result<bool, StoreError> {
        self.write(move |tx| {
            let changed = tx.sql.exec(
                "UPDATE agents SET connected = 0, last_seen_ms = ?3
                 WHERE machine = ?1 AND generation = ?2 AND connected = 1",
                &[&machine.as_str(), &generation_to_sql(generation), &tx.now],
            )?;
            Ok(changed > 0)
        })
        .await
    }

    /// The highest connection generation handed out so far.
    pub async fn last_generation(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let last: i64 = conn.fetch_one(
                "SELECT COALESCE(MAX(generation), 0) FROM agents",
                &[],
                |r| r.get(0),
            )?;
            Ok(u64::try_from(last).unwrap_or(0))
        })
        .await
    }

    /// Streams of this replica's machines that a newer connection, on
    /// another replica, has replaced since generation `after`: each with
    /// that newer generation.
    pub async fn connected_elsewhere(
        &self,
        after: u64,
    ) -> Result<Vec<(MachineName, u64)>, StoreError> {
        let replica = self.replica();
        self.read(move |conn| {
            let rows: Vec<(String, i64)> = conn.fetch_all(
                "SELECT machine, generation FROM agents
                 WHERE generation > ?1 AND replica != ?2 ORDER BY generation",
                &[&generation_to_sql(after), &replica],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.into_iter()
                .map(|(machine, generation)| {
                    let machine = MachineName::parse(&machine)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    Ok((machine, u64::try_from(generation).unwrap_or(0)))
                })
                .collect()
        })
        .await
    }

    /// Every agent ever seen, by machine name.
    /// A page of agents in name order, only the connected (or the
    /// disconnected) ones when `connected` says.
    pub async fn list_agents(
        &self,
        query: PageQuery,
        connected: Option<bool>,
    ) -> Result<Page<Agent>, StoreError> {
        self.read(move |conn| {
            let filter = match connected {
                Some(true) => " AND connected = 1",
                Some(false) => " AND connected = 0",
                None => "",
            };
            let sql = format!(
                "SELECT machine, connected, current_system, booted_system, agent_version,
                        nix_version, last_seen_ms, last_deployment_id, last_state, last_reason,
                        vm_host, cert_serial, cert_not_after_ms
                 FROM agents WHERE machine > ?1 AND machine >= ?2{filter}
                 ORDER BY machine LIMIT ?3"
            );
            let mut page = collect(
                &query,
                |a: &Agent| &a.machine,
                |after, from, limit| conn.fetch_all(&sql, &[&after, &from, &limit], agent_row),
            )?;
            page.items = with_placements(conn, page.items)?;
            Ok(page)
        })
        .await
    }

    /// Every agent: for tests (the RPC pages them).
    #[cfg(test)]
    pub async fn all_agents(&self) -> Result<Vec<Agent>, StoreError> {
        let page = self
            .list_agents(
                PageQuery::first(procurator_core::limits::MAX_PAGE_ROWS),
                None,
            )
            .await?;
        assert!(page.next_after.is_none(), "more agents than one page holds");
        Ok(page.items)
    }
}

fn agent_row(r: &dyn Row) -> Result<Agent, StoreError> {
    Ok(Agent {
        machine: r.get(0)?,
        connected: r.get(1)?,
        current_system: r.get(2)?,
        booted_system: r.get(3)?,
        agent_version: r.get(4)?,
        nix_version: r.get(5)?,
        last_seen_ms: r.get(6)?,
        last_deployment_id: r.get(7)?,
        last_state: r.get(8)?,
        last_reason: r.get(9)?,
        vm_host: match r.get::<Option<Vec<u8>>>(10)? {
            None => None,
            Some(bytes) => Some(prost::Message::decode(bytes.as_slice()).map_err(|e| {
                StoreError::Corrupt(format!(
                    "an agent's VM-host capacity cannot be decoded: {e}"
                ))
            })?),
        },
        certificate_serial: r.get(11)?,
        certificate_not_after_ms: r.get(12)?,
        ..Default::default()
    })
}

/// Each VM host's instances, and what is left of its capacity.
fn with_placements(conn: &dyn Sql, mut agents: Vec<Agent>) -> Result<Vec<Agent>, StoreError> {
    let (Some(first), Some(last)) = (agents.first(), agents.last()) else {
        return Ok(agents);
    };
    let placed: Vec<(VmPlacement, i64, i64)> = conn.fetch_all(
        "SELECT instance, machine, host, milli_cpus, memory_bytes FROM placements
         WHERE host >= ?1 AND host <= ?2 ORDER BY instance",
        &[&first.machine.as_str(), &last.machine.as_str()],
        |r| {
            Ok((
                VmPlacement {
                    instance: r.get(0)?,
                    machine: r.get(1)?,
                    host: r.get(2)?,
                },
                r.get(3)?,
                r.get(4)?,
            ))
        },
    )?;
    for agent in &mut agents {
        let Some(capacity) = &agent.vm_host else {
            continue;
        };
        let mut free = VmHostCapacity {
            milli_cpus: capacity.milli_cpus,
            memory_bytes: capacity.memory_bytes,
            labels: Vec::new(),
            vmm: capacity.vmm.clone(),
        };
        for (vm, cpus, memory) in placed.iter().filter(|(vm, ..)| vm.host == agent.machine) {
            free.milli_cpus = free
                .milli_cpus
                .saturating_sub(u64::try_from(*cpus).unwrap_or(0));
            free.memory_bytes = free
                .memory_bytes
                .saturating_sub(u64::try_from(*memory).unwrap_or(0));
            agent.vms.push(vm.clone());
        }
        agent.vm_free = Some(free);
    }
    Ok(agents)
}

/// What an agent says about itself in its Hello, as stored.
#[derive(PartialEq, Eq)]
struct Reported {
    current_system: String,
    booted_system: String,
    agent_version: String,
    nix_version: String,
    vm_host: Option<Vec<u8>>,
}

/// The agent reported how a deployment ended on its machine.
pub(super) fn record_last_result(
    tx: &mut Tx<'_>,
    machine: &MachineName,
    deployment_id: &str,
    state: MachineState,
    reason: &str,
    current_system: &str,
) -> Result<(), StoreError> {
    tx.sql.exec(
        "UPDATE agents SET last_seen_ms = ?2, last_deployment_id = ?3, last_state = ?4,
             last_reason = ?5,
             current_system = CASE WHEN ?6 = '' THEN current_system ELSE ?6 END
         WHERE machine = ?1",
        &[
            &machine.as_str(),
            &tx.now,
            &deployment_id,
            &(state as i32),
            &reason,
            &current_system,
        ],
    )?;
    Ok(())
}

fn emit_connection(
    tx: &mut Tx<'_>,
    machine: &MachineName,
    current_system: String,
) -> Result<(), StoreError> {
    tx.emit(
        "",
        event::Kind::Agent(AgentConnection {
            machine: machine.to_string(),
            connected: true,
            current_system,
        }),
    )?;
    Ok(())
}

fn generation_to_sql(generation: u64) -> i64 {
    // Generations count connections, across restarts; they never get near i64::MAX.
    i64::try_from(generation).unwrap_or(i64::MAX)
}
