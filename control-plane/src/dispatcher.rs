//! Runs the rollout scheduler and sends what it decided: after every submit,
//! result, connect and cancel, and once a second so that offline machines
//! become unreachable on time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use procurator_core::MachineName;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::connections::{Connections, dispatch, dispatch_vms, send_unless_overtaken};
use crate::store::{Scheduled, Scope, Store, StoreError};

/// How often the scheduler runs without a trigger.
pub const TICK: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Dispatcher {
    pub store: Store,
    pub connections: Arc<Connections>,
    pub tasks: TaskTracker,
    kicks: Arc<Kicks>,
    /// Whether this process runs the periodic tick: always alone, the
    /// oldest live one of replicas (their liveness says which). Kicks after
    /// submits, results and connects run wherever they happen.
    ticking: Arc<std::sync::atomic::AtomicBool>,
}

/// Coalesces kicks: a scheduler run reads every row of every running
/// deployment it looks at, so 10,000 results each running it would cost
/// O(n²). One run at a time, and a run answers every kick made before it
/// started; a full run also answers the kicks that only asked for sends.
#[derive(Default)]
struct Kicks {
    /// Kicks asked for so far; each kick's number is its position.
    requested: AtomicU64,
    /// Every kick up to this number has been answered by a finished run.
    answered: AtomicU64,
    /// The same for kicks that asked for a full run.
    full_requested: AtomicU64,
    full_answered: AtomicU64,
    running: tokio::sync::Mutex<()>,
}

impl Dispatcher {
    pub fn new(store: Store, connections: Arc<Connections>, tasks: TaskTracker) -> Self {
        Self {
            store,
            connections,
            tasks,
            kicks: Arc::default(),
            ticking: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// Say whether this replica runs the periodic tick; true if that changed.
    pub fn set_ticking(&self, ticking: bool) -> bool {
        self.ticking.swap(ticking, Ordering::Relaxed) != ticking
    }

    /// Run the scheduler over the running deployments that hold machines
    /// not yet sent (its decisions are committed), then send each machine
    /// it picked its desired state: what a submit, a result or a connect
    /// may have made possible. Deployments with every machine sent are left
    /// to the periodic tick, whose full run finds the unreachable ones, so
    /// 10,000 results do not each re-read 10,000 rows.
    /// Returns once a run that started after this call has finished, so the
    /// caller's committed changes were scheduled; concurrent callers share runs.
    pub async fn kick(&self) -> Result<(), StoreError> {
        self.run(Scope::Sendable).await
    }

    /// [`Self::kick`] over every running deployment: also what the clock
    /// or a lost replica decides (machines unreachable).
    pub async fn kick_full(&self) -> Result<(), StoreError> {
        self.run(Scope::Full).await
    }

    async fn run(&self, scope: Scope) -> Result<(), StoreError> {
        let kicks = &self.kicks;
        let mine = kicks.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mine_full = match scope {
            Scope::Full => kicks.full_requested.fetch_add(1, Ordering::SeqCst) + 1,
            Scope::Sendable => 0,
        };
        let _one_at_a_time = kicks.running.lock().await;
        if kicks.answered.load(Ordering::SeqCst) >= mine
            && kicks.full_answered.load(Ordering::SeqCst) >= mine_full
        {
            return Ok(());
        }
        // Every kick asked for by now committed its changes before asking.
        let covers = kicks.requested.load(Ordering::SeqCst);
        let covers_full = kicks.full_requested.load(Ordering::SeqCst);
        let scope = if kicks.full_answered.load(Ordering::SeqCst) < covers_full {
            Scope::Full
        } else {
            Scope::Sendable
        };
        let machines = self.store.schedule(scope).await?;
        self.send_many(machines);
        kicks.answered.fetch_max(covers, Ordering::SeqCst);
        if scope == Scope::Full {
            kicks.full_answered.fetch_max(covers_full, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Send `machine` what it should have now, in its own task so that a
    /// slow agent delays no other.
    pub fn send(&self, machine: MachineName) {
        let (store, connections) = (self.store.clone(), self.connections.clone());
        let span = tracing::info_span!("dispatch", machine = %machine);
        self.tasks.spawn(
            async move {
                if let Err(e) = dispatch(&store, &connections, &machine).await {
                    tracing::warn!(error = %e, "could not dispatch; the agent gets it when it reconnects");
                }
            }
            .instrument(span),
        );
    }

    /// Send every connected VM host its VM assignments, each in its own task.
    pub async fn send_vm_assignments(&self) -> Result<(), StoreError> {
        for host in self.store.connected_vm_hosts().await? {
            self.spawn_dispatch_vms(host);
        }
        Ok(())
    }

    /// Send each scheduled machine its desired state, in a task per machine
    /// so that a slow agent delays no other. A VM instance placed on a
    /// connected host goes through the host, which restarts it or leaves
    /// the change to the guest's own agent (`VmInPlace`).
    fn send_many(&self, scheduled: Vec<Scheduled>) {
        let mut hosts = std::collections::BTreeSet::new();
        for Scheduled {
            machine,
            outbound,
            order,
            host,
        } in scheduled
        {
            if let Some(host) = host {
                // A host held by another replica hears of it from the log.
                if self.connections.get(&host).is_some() {
                    hosts.insert(host);
                }
                continue;
            }
            let Some(conn) = self.connections.get(&machine) else {
                continue;
            };
            self.tasks.spawn(async move {
                send_unless_overtaken(&conn, &machine, outbound, order).await;
            });
        }
        for host in hosts {
            self.spawn_dispatch_vms(host);
        }
    }

    /// Send `host` its VM assignments in a task of its own, if it is connected.
    pub fn spawn_dispatch_vms(&self, host: MachineName) {
        let Some(conn) = self.connections.get(&host) else {
            return;
        };
        let store = self.store.clone();
        self.tasks.spawn(async move {
            if let Err(e) = dispatch_vms(&store, &conn, &host).await {
                tracing::warn!(host = %host, error = %e, "could not send VM assignments; the host gets them when it reconnects");
            }
        });
    }

    /// Kick the scheduler every [`TICK`] until `shutdown`.
    pub async fn tick(self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            // Two replicas ticking at once (while the tick moves) only run
            // the scheduler twice, one after the other.
            if !self.ticking.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = self.kick_full().await {
                tracing::warn!(error = %e, "the scheduler failed; retrying on the next tick");
            }
        }
    }
}
