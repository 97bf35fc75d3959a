//! The agents' open streams, at most one per machine, and sending a machine
//! its desired state over its stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use procurator_core::MachineName;
use procurator_proto::v1::{Cancel, ControlMessage, VmAssignments, control_message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{Outbound as ToSend, SendOrder, Store, StoreError};

/// The sending half of an agent's response stream.
pub type Outbound = mpsc::Sender<Result<ControlMessage, tonic::Status>>;

/// One agent stream.
#[derive(Clone)]
pub struct Conn {
    /// Distinguishes this stream from earlier and later ones of the same
    /// machine, on any replica: the store hands it out.
    pub generation: u64,
    pub tx: Outbound,
    /// Whether its Hello offered VM-host capacity.
    pub vm_host: bool,
    /// Held from reading the desired state until it is queued on the stream,
    /// so an older desired state can never overtake a newer one; holds the
    /// order of the newest message sent.
    send_lock: Arc<tokio::sync::Mutex<SendOrder>>,
    /// Fired when the stream is ending: a newer stream for the same machine
    /// took over, the control plane shuts down (a child of its token), or
    /// the agent hung up. Nothing waits on a closing stream.
    pub closing: CancellationToken,
}

impl Conn {
    pub fn new(generation: u64, tx: Outbound, vm_host: bool, shutdown: &CancellationToken) -> Self {
        Self {
            generation,
            tx,
            vm_host,
            send_lock: Arc::default(),
            closing: shutdown.child_token(),
        }
    }
}

impl Conn {
    /// Whether this stream has carried a message of `order` or a newer one;
    /// false while unsure (a send is under way).
    pub fn has_sent(&self, order: SendOrder) -> bool {
        self.send_lock.try_lock().is_ok_and(|last| *last >= order)
    }
}

#[derive(Default)]
pub struct Connections {
    streams: Mutex<HashMap<MachineName, Conn>>,
}

impl Connections {
    /// Make `conn` the machine's stream; the stream it replaces is told to
    /// end. Two streams racing through the handshake: the newer generation
    /// wins, whichever registers last.
    pub fn register(&self, machine: MachineName, conn: Conn) {
        let mut streams = self.lock();
        match streams.get(&machine) {
            Some(current) if current.generation > conn.generation => conn.closing.cancel(),
            _ => {
                if let Some(old) = streams.insert(machine, conn) {
                    old.closing.cancel();
                }
            }
        }
    }

    pub fn get(&self, machine: &MachineName) -> Option<Conn> {
        self.lock().get(machine).cloned()
    }

    /// How many streams are held here.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Every stream held here, by machine name.
    pub fn all(&self) -> Vec<(MachineName, Conn)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(machine, conn)| (machine.clone(), conn.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Whether any stream held here is a VM host's.
    pub fn holds_vm_hosts(&self) -> bool {
        self.lock().values().any(|conn| conn.vm_host)
    }

    /// End the machine's stream if it is older than `generation`: a newer
    /// one, on another replica, has replaced it. True if one was ended.
    pub fn close_if_older(&self, machine: &MachineName, generation: u64) -> bool {
        let streams = self.lock();
        match streams.get(machine) {
            Some(conn) if conn.generation < generation => {
                conn.closing.cancel();
                true
            }
            _ => false,
        }
    }

    /// End every stream held here; returns how many there were.
    pub fn close_all(&self) -> usize {
        let streams = self.lock();
        for conn in streams.values() {
            conn.closing.cancel();
        }
        streams.len()
    }

    /// Forget the machine's stream if it is still `generation`. False when a
    /// newer stream has taken over.
    pub fn remove_if_current(&self, machine: &MachineName, generation: u64) -> bool {
        let mut streams = self.lock();
        if streams
            .get(machine)
            .is_some_and(|c| c.generation == generation)
        {
            streams.remove(machine);
            true
        } else {
            false
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MachineName, Conn>> {
        // The map holds no invariant a panicking holder could have broken.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Send `machine` its desired state if it is connected and has one.
pub async fn dispatch(
    store: &Store,
    connections: &Connections,
    machine: &MachineName,
) -> Result<(), StoreError> {
    match connections.get(machine) {
        Some(conn) => dispatch_to(store, &conn, machine).await,
        None => Ok(()),
    }
}

/// Send the machine's current desired state (or the cancel of it) over
/// `conn`. Sending it again is harmless: the agent dedupes by deployment id.
pub async fn dispatch_to(
    store: &Store,
    conn: &Conn,
    machine: &MachineName,
) -> Result<(), StoreError> {
    dispatch_current(store, conn, machine, Again::Yes).await
}

/// [`dispatch_to`] unless the stream has carried that message, or a newer
/// one, already: for word from the log of what another replica, or this
/// one, decided.
pub async fn dispatch_unless_sent(
    store: &Store,
    conn: &Conn,
    machine: &MachineName,
) -> Result<(), StoreError> {
    dispatch_current(store, conn, machine, Again::No).await
}

/// Whether a message the stream carried already goes out again.
#[derive(PartialEq, Eq)]
enum Again {
    Yes,
    No,
}

async fn dispatch_current(
    store: &Store,
    conn: &Conn,
    machine: &MachineName,
    again: Again,
) -> Result<(), StoreError> {
    let mut last = tokio::select! {
        () = conn.closing.cancelled() => return Ok(()),
        last = conn.send_lock.lock() => last,
    };
    if conn.tx.is_closed() || conn.closing.is_cancelled() {
        // Do not mark it SENT for a stream that is gone; the next one gets it.
        return Ok(());
    }
    let Some((outbound, order)) = store.desired(machine.clone()).await? else {
        return Ok(());
    };
    if again == Again::No && order <= *last {
        return Ok(());
    }
    send(conn, machine, outbound).await;
    *last = (*last).max(order);
    Ok(())
}

/// Send a VM host the whole set of VM instances it should run. Read under
/// the stream's send lock, so an older set never overtakes a newer one.
pub async fn dispatch_vms(
    store: &Store,
    conn: &Conn,
    host: &MachineName,
) -> Result<(), StoreError> {
    let _in_order = tokio::select! {
        () = conn.closing.cancelled() => return Ok(()),
        last = conn.send_lock.lock() => last,
    };
    let vms = store.vm_assignments(host.clone()).await?;
    tracing::info!(host = %host, vms = vms.len(), "sending VM assignments");
    let message = ControlMessage {
        kind: Some(control_message::Kind::VmAssignments(VmAssignments { vms })),
    };
    tokio::select! {
        () = conn.closing.cancelled() => {}
        _ = conn.tx.send(Ok(message)) => {}
    }
    Ok(())
}

/// Send a message read earlier (the scheduler's batch) unless the stream
/// has since carried a newer one.
pub async fn send_unless_overtaken(
    conn: &Conn,
    machine: &MachineName,
    outbound: ToSend,
    order: SendOrder,
) {
    let mut last = tokio::select! {
        () = conn.closing.cancelled() => return,
        last = conn.send_lock.lock() => last,
    };
    if order <= *last {
        tracing::debug!(machine = %machine, "a newer message went first");
        return;
    }
    send(conn, machine, outbound).await;
    *last = order;
}

async fn send(conn: &Conn, machine: &MachineName, outbound: ToSend) {
    let kind = match outbound {
        ToSend::Desired(desired) => {
            tracing::info!(
                deployment = %desired.deployment_id,
                machine = %machine,
                closure = %desired.closure,
                "sending desired state"
            );
            control_message::Kind::DesiredState(desired)
        }
        ToSend::Cancel {
            deployment_id,
            reason,
        } => {
            tracing::info!(deployment = %deployment_id, machine = %machine, "sending cancel");
            control_message::Kind::Cancel(Cancel {
                deployment_id,
                reason,
            })
        }
    };
    let message = ControlMessage { kind: Some(kind) };
    let sent = tokio::select! {
        () = conn.closing.cancelled() => false,
        sent = conn.tx.send(Ok(message)) => sent.is_ok(),
    };
    if !sent {
        tracing::debug!(machine = %machine, "agent stream closed; it gets the desired state when it reconnects");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests {
    use super::*;

    fn conn(generation: u64) -> (Conn, mpsc::Receiver<Result<ControlMessage, tonic::Status>>) {
        let (tx, rx) = mpsc::channel(1);
        (
            Conn::new(generation, tx, false, &CancellationToken::new()),
            rx,
        )
    }

    #[tokio::test]
    async fn a_message_read_early_never_overtakes_a_newer_one() {
        let machine = MachineName::parse("worker-1").unwrap();
        let (conn, mut rx) = conn(1);
        let cancel = |id: &str| ToSend::Cancel {
            deployment_id: id.into(),
            reason: String::new(),
        };
        let received =
            |rx: &mut mpsc::Receiver<Result<ControlMessage, tonic::Status>>| match rx.try_recv() {
                Ok(Ok(ControlMessage {
                    kind: Some(control_message::Kind::Cancel(c)),
                })) => Some(c.deployment_id),
                _ => None,
            };
        // Deployment 2's cancel goes out; deployment 1's, read earlier, not.
        send_unless_overtaken(&conn, &machine, cancel("d-2"), SendOrder::of(2, true)).await;
        assert_eq!(received(&mut rx).as_deref(), Some("d-2"));
        send_unless_overtaken(&conn, &machine, cancel("d-1"), SendOrder::of(1, true)).await;
        assert_eq!(received(&mut rx), None);
        // Nor does deployment 2's desired state, after its cancel.
        send_unless_overtaken(
            &conn,
            &machine,
            cancel("d-2 again"),
            SendOrder::of(2, false),
        )
        .await;
        assert_eq!(received(&mut rx), None);
        // A newer deployment's does.
        send_unless_overtaken(&conn, &machine, cancel("d-3"), SendOrder::of(3, false)).await;
        assert_eq!(received(&mut rx).as_deref(), Some("d-3"));
    }

    #[test]
    fn a_newer_stream_replaces_the_older_one() {
        let connections = Connections::default();
        let machine = MachineName::parse("worker-1").unwrap();
        let (first, _rx1) = conn(1);
        let (second, _rx2) = conn(2);
        assert!(second.generation > first.generation);

        connections.register(machine.clone(), first.clone());
        connections.register(machine.clone(), second.clone());
        assert!(first.closing.is_cancelled());
        assert!(!second.closing.is_cancelled());

        // The old stream ending must not remove the new one.
        assert!(!connections.remove_if_current(&machine, first.generation));
        assert_eq!(
            connections.get(&machine).map(|c| c.generation),
            Some(second.generation)
        );
        assert!(connections.remove_if_current(&machine, second.generation));
        assert!(connections.get(&machine).is_none());

        // An older generation registering late is turned away at once.
        let (newer, _rx3) = conn(4);
        connections.register(machine.clone(), newer.clone());
        let (late, _rx4) = conn(3);
        connections.register(machine.clone(), late.clone());
        assert!(late.closing.is_cancelled());
        assert!(!newer.closing.is_cancelled());
        assert_eq!(
            connections.get(&machine).map(|c| c.generation),
            Some(newer.generation)
        );
    }
}
