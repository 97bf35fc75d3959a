//! A replica's share of decisions taken anywhere. On a shared store the
//! scheduler run that moves a machine, the Cancel that stops it and the
//! placement that moves a VM may run on any replica, while the machine's
//! stream is held by one. Every replica reads every replica's events back
//! from the log (the store's follower publishes them) and sends what they
//! mean to the streams it holds. Sends are ordered and idempotent
//! ([`SendOrder`]): what this replica decided and sent at once is not sent
//! again, and an agent dedupes by deployment id whatever arrives twice.

use std::collections::{BTreeSet, HashMap};

use procurator_core::MachineName;
use procurator_proto::v1::{Event, MachineState, event};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;

use crate::connections::{dispatch_unless_sent, dispatch_vms, send_unless_overtaken};
use crate::dispatcher::Dispatcher;
use crate::store::{Outbound, SendOrder};

/// Events taken from the log in one go, so that a wave's worth of them
/// costs a few reads rather than one per machine.
const BURST: usize = 1024;

/// Deployments whose send order is remembered: the few that are running.
const ORDERS_KEPT: usize = 64;

/// Send this replica's streams what the log says, until `stop`.
pub async fn run(dispatcher: Dispatcher, stop: CancellationToken) {
    let mut events = dispatcher.store.subscribe();
    let mut orders = HashMap::new();
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            first = events.recv() => first,
        };
        let mut work = Work::default();
        match first {
            Ok(event) => work.note(&event),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "fell behind the event log; resending every stream held here its desired state"
                );
                work.everything = true;
            }
            Err(RecvError::Closed) => return,
        }
        while work.seen < BURST {
            match events.try_recv() {
                Ok(event) => work.note(&event),
                Err(TryRecvError::Lagged(_)) => work.everything = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if orders.len() > ORDERS_KEPT {
            orders.clear();
        }
        if let Err(e) = work.send(&dispatcher, &mut orders).await {
            tracing::warn!(error = %e, "could not act on the event log; agents get their desired state when they reconnect");
        }
    }
}

/// How a machine in the log is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Through the VM host it is placed on, if connected; else directly.
    HostIfPlaced,
    /// Directly: its host keeps the VM running (in place).
    Guest,
    /// Directly, with the cancel of its deployment.
    Cancel,
}

/// What a burst of events asks of this replica.
#[derive(Default)]
struct Work {
    seen: usize,
    /// Machines moved to SENT, with their deployment and closure: sent
    /// directly, or through the VM host they are placed on.
    sent: Vec<(MachineName, String, String)>,
    /// VM instances their hosts keep running: sent to the guest directly.
    in_place: Vec<(MachineName, String, String)>,
    /// Machines told to drop a cancelled deployment, with why.
    cancelled: Vec<(MachineName, String, String)>,
    /// VM placements changed: every VM host held here learns its set.
    placed: bool,
    /// Events were missed: every stream held here is brought up to date.
    everything: bool,
}

impl Work {
    fn note(&mut self, ev: &Event) {
        self.seen += 1;
        let name = |raw: &str| MachineName::parse(raw).ok();
        match &ev.kind {
            Some(event::Kind::Machine(u)) if u.state() == MachineState::Sent => {
                let Some(machine) = name(&u.machine) else {
                    return;
                };
                let list = if u.in_place {
                    &mut self.in_place
                } else {
                    &mut self.sent
                };
                list.push((machine, ev.deployment_id.clone(), u.closure.clone()));
            }
            Some(event::Kind::Cancelled(c)) => {
                for machine in c.in_flight.iter().filter_map(|m| name(m)) {
                    let id = ev.deployment_id.clone();
                    self.cancelled.push((machine, id, c.reason.clone()));
                }
            }
            Some(event::Kind::VmsPlaced(_)) => self.placed = true,
            _ => {}
        }
    }

    async fn send(
        self,
        dispatcher: &Dispatcher,
        orders: &mut HashMap<(String, bool), Option<SendOrder>>,
    ) -> Result<(), crate::store::StoreError> {
        let (store, connections) = (&dispatcher.store, &dispatcher.connections);
        let mut hosts = BTreeSet::new();
        // Read back from the store: after missed events.
        let mut resync = Vec::new();
        // Built from the events, each with its order.
        let mut direct = Vec::new();
        if self.everything {
            for (machine, conn) in connections.all() {
                if conn.vm_host {
                    hosts.insert(machine.clone());
                }
                resync.push(machine);
            }
        } else {
            // Held here, or possibly a VM instance on a host held here.
            let candidates: Vec<(MachineName, String, String)> = self
                .sent
                .into_iter()
                .filter(|(m, ..)| connections.get(m).is_some() || connections.holds_vm_hosts())
                .collect();
            let on_hosts: HashMap<MachineName, MachineName> = if candidates.is_empty() {
                HashMap::new()
            } else {
                let names = candidates.iter().map(|(m, ..)| m.clone()).collect();
                store.connected_hosts_of(names).await?.into_iter().collect()
            };
            let sends = candidates.into_iter().map(|c| (c, Via::HostIfPlaced));
            let in_place = self.in_place.into_iter().map(|c| (c, Via::Guest));
            let cancels = self.cancelled.into_iter().map(|c| (c, Via::Cancel));
            for ((machine, deployment, detail), via) in sends.chain(in_place).chain(cancels) {
                if via == Via::HostIfPlaced
                    && let Some(host) = on_hosts.get(&machine)
                {
                    // The host decides how the instance changes; a host held
                    // by another replica hears of it there.
                    if connections.get(host).is_some() {
                        hosts.insert(host.clone());
                    }
                    continue;
                }
                let Some(conn) = connections.get(&machine) else {
                    continue;
                };
                let cancel = via == Via::Cancel;
                let key = (deployment, cancel);
                let order = match orders.get(&key) {
                    Some(order) => *order,
                    None => {
                        let order = store.send_order(key.0.clone(), cancel).await?;
                        orders.insert(key.clone(), order);
                        order
                    }
                };
                let Some(order) = order else { continue };
                // Decided here and sent already: nothing to build or send.
                if conn.has_sent(order) {
                    continue;
                }
                let outbound = if cancel {
                    Outbound::Cancel {
                        deployment_id: key.0,
                        reason: detail,
                    }
                } else {
                    let desired = store
                        .desired_for_event(key.0, machine.clone(), detail)
                        .await?;
                    Outbound::Desired(desired)
                };
                direct.push((machine, conn, outbound, order));
            }
            if self.placed {
                for (machine, conn) in connections.all() {
                    if conn.vm_host {
                        hosts.insert(machine);
                    }
                }
            }
        }
        for (machine, conn, outbound, order) in direct {
            dispatcher.tasks.spawn(async move {
                send_unless_overtaken(&conn, &machine, outbound, order).await;
            });
        }
        for machine in resync {
            let Some(conn) = connections.get(&machine) else {
                continue;
            };
            let store = store.clone();
            dispatcher.tasks.spawn(async move {
                if let Err(e) = dispatch_unless_sent(&store, &conn, &machine).await {
                    tracing::warn!(machine = %machine, error = %e, "could not send a decision from the log; the agent gets it when it reconnects");
                }
            });
        }
        for host in hosts {
            let Some(conn) = connections.get(&host) else {
                continue;
            };
            let store = store.clone();
            dispatcher.tasks.spawn(async move {
                if let Err(e) = dispatch_vms(&store, &conn, &host).await {
                    tracing::warn!(host = %host, error = %e, "could not send VM assignments; the host gets them when it reconnects");
                }
            });
        }
        Ok(())
    }
}
