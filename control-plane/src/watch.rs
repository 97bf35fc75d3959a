//! `DeploymentService.Watch`: the event log from a revision on, then live.
//!
//! Subscribe to committed events first, then read the backlog from the
//! store, then forward live events whose revision is past the last one sent.
//! Anything committed before the subscription is in the backlog; anything
//! after it arrives live; the revision check drops what is in both. A
//! subscriber that falls behind re-reads the store from its last revision.
//! So: no gaps, no duplicates.
//!
//! Bounded: a watcher holds at most [`QUEUE`] events here. One that reads
//! nothing for [`STALL_TIMEOUT`] while they wait is ended with
//! RESOURCE_EXHAUSTED saying so (a slot is kept free for that status), and
//! one that asks for pruned history gets OUT_OF_RANGE with the revision it
//! can resume from.

use std::time::Duration;

use procurator_core::DeploymentId;
use procurator_proto::v1::{Event, WatchRequest, event};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::api_error::ApiError;
use crate::store::{Compacted, Store};

/// Events read from the store per query while catching up.
const PAGE: usize = 500;
/// Events queued towards one watcher before the reader waits.
const QUEUE: usize = 64;
/// How long a full queue may go unread before the watcher is dropped.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

pub type Sender = mpsc::Sender<Result<Event, Status>>;

/// Validate the request and start following; the stream is fed by a task.
pub async fn start(
    store: &Store,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    request: WatchRequest,
) -> Result<ReceiverStream<Result<Event, Status>>, ApiError> {
    let deployment = match request.deployment_id.as_str() {
        "" => None,
        id => Some(DeploymentId::parse(id)?),
    };
    let live = store.subscribe();
    // Known after subscribing: a deployment already final here has its
    // finishing event in the backlog or at or before `from_revision`.
    let already_finished = match &deployment {
        Some(id) => match store.deployment_state(id.clone()).await? {
            Some(state) => state.is_final(),
            None => return Err(ApiError::NotFound(id.clone())),
        },
        None => false,
    };
    // One slot more than is ever filled with events: the status that ends
    // the stream always fits.
    let (tx, rx) = mpsc::channel(QUEUE + 1);
    let follower = Follower {
        store: store.clone(),
        deployment,
        last: request.from_revision,
        tx,
        shutdown: shutdown.clone(),
        stall_timeout: STALL_TIMEOUT,
    };
    tasks.spawn(follower.run(live, already_finished));
    Ok(ReceiverStream::new(rx))
}

struct Follower {
    store: Store,
    deployment: Option<DeploymentId>,
    /// The revision of the last event sent (or `from_revision`).
    last: u64,
    tx: Sender,
    shutdown: CancellationToken,
    stall_timeout: Duration,
}

/// Whether to keep following.
enum Flow {
    Continue,
    Stop,
}

impl Follower {
    async fn run(mut self, mut live: broadcast::Receiver<Event>, already_finished: bool) {
        if let Flow::Stop = self.catch_up().await {
            return;
        }
        if already_finished {
            return;
        }
        loop {
            let received = tokio::select! {
                () = self.shutdown.cancelled() => return self.shutting_down(),
                () = self.tx.closed() => return,
                received = live.recv() => received,
            };
            let flow = match received {
                Ok(event) => self.offer(event).await,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "watcher fell behind; re-reading the event log");
                    self.catch_up().await
                }
                Err(broadcast::error::RecvError::Closed) => Flow::Stop,
            };
            if let Flow::Stop = flow {
                return;
            }
        }
    }

    /// Send everything in the store after `last`.
    async fn catch_up(&mut self) -> Flow {
        loop {
            let page = match self
                .store
                .watch_page(self.last, self.deployment.clone(), PAGE)
                .await
            {
                Ok(Ok(page)) => page,
                Ok(Err(compacted)) => {
                    self.end(compacted_status(compacted));
                    return Flow::Stop;
                }
                Err(e) => {
                    self.end(e.into());
                    return Flow::Stop;
                }
            };
            let full = page.len() == PAGE;
            for event in page {
                if let Flow::Stop = self.offer(event).await {
                    return Flow::Stop;
                }
            }
            if !full {
                return Flow::Continue;
            }
        }
    }

    /// Send `event` unless it was sent already or is not followed here.
    async fn offer(&mut self, event: Event) -> Flow {
        if event.revision <= self.last {
            return Flow::Continue;
        }
        if let Some(id) = &self.deployment
            && event.deployment_id != id.as_str()
        {
            return Flow::Continue;
        }
        let revision = event.revision;
        let ends =
            self.deployment.is_some() && matches!(event.kind, Some(event::Kind::Finished(_)));
        // Room for this event and the status that may have to follow it.
        let room = tokio::select! {
            () = self.shutdown.cancelled() => {
                self.shutting_down();
                return Flow::Stop;
            }
            room = tokio::time::timeout(self.stall_timeout, self.tx.reserve_many(2)) => room,
        };
        match room {
            Ok(Ok(mut permits)) => {
                if let Some(permit) = permits.next() {
                    permit.send(Ok(event));
                }
            }
            Ok(Err(_)) => return Flow::Stop, // the watcher hung up
            Err(_) => {
                tracing::info!(
                    last_revision = self.last,
                    "dropping a watcher that read nothing for {} s",
                    self.stall_timeout.as_secs()
                );
                self.end(Status::resource_exhausted(format!(
                    "this Watch was ended: its client read nothing for {} s while {QUEUE} events waited; \
                     watch again with from_revision {} to carry on",
                    self.stall_timeout.as_secs(),
                    self.last
                )));
                return Flow::Stop;
            }
        }
        self.last = revision;
        if ends { Flow::Stop } else { Flow::Continue }
    }

    fn shutting_down(&self) {
        self.end(ApiError::ShuttingDown.into());
    }

    /// End the stream with `status`; the slot kept free holds it.
    fn end(&self, status: Status) {
        let _ = self.tx.try_send(Err(status));
    }
}

fn compacted_status(compacted: Compacted) -> Status {
    let Compacted { asked, resume_from } = compacted;
    let mut status = Status::out_of_range(format!(
        "events after revision {asked} have been pruned from the event log (the control plane keeps \
         --retain-events-days of events and the newest --retain-deployments deployments); \
         the oldest revision to resume from is {resume_from}: read the current state \
         (GetDeployment, ListAgents), then watch with from_revision {resume_from}"
    ));
    if let Ok(value) = resume_from.to_string().parse() {
        status
            .metadata_mut()
            .insert(procurator_proto::RESUME_REVISION_METADATA, value);
    }
    status
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests {
    use procurator_proto::v1::{ActivationResult, MachineState};

    use super::*;
    use crate::test_support::artifact;

    /// More than a subscription holds.
    const EVENTS: usize = crate::store::BROADCAST_CAPACITY_FOR_TESTS + 100;

    #[tokio::test]
    async fn a_lagging_watcher_rereads_the_log_without_gaps_or_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let shutdown = CancellationToken::new();
        // A queue of one: the follower blocks after the first event, so its
        // subscription overflows while the events below are published.
        let (tx, mut rx) = mpsc::channel(2);
        let follower = Follower {
            store: store.clone(),
            deployment: None,
            last: 0,
            tx,
            shutdown: shutdown.clone(),
            stall_timeout: STALL_TIMEOUT,
        };
        let task = tokio::spawn(follower.run(store.subscribe(), false));
        store.emit_test_events(EVENTS).await.unwrap();

        let mut revisions = Vec::new();
        while revisions.len() < EVENTS {
            revisions.push(rx.recv().await.unwrap().unwrap().revision);
        }
        assert_eq!(revisions, (1..=EVENTS as u64).collect::<Vec<u64>>());

        // Live again after catching up.
        store.emit_test_events(1).await.unwrap();
        assert_eq!(
            rx.recv().await.unwrap().unwrap().revision,
            EVENTS as u64 + 1
        );
        shutdown.cancel();
        let ended = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Unavailable);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_watcher_that_does_not_read_is_dropped_and_told_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.emit_test_events(5).await.unwrap();
        // Room for one event and the closing status.
        let (tx, mut rx) = mpsc::channel(2);
        let follower = Follower {
            store: store.clone(),
            deployment: None,
            last: 0,
            tx,
            shutdown: CancellationToken::new(),
            stall_timeout: Duration::from_millis(100),
        };
        // Nobody reads: the follower gives up by itself.
        follower.run(store.subscribe(), false).await;
        assert_eq!(rx.recv().await.unwrap().unwrap().revision, 1);
        let dropped = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(dropped.code(), tonic::Code::ResourceExhausted);
        assert!(
            dropped
                .message()
                .contains("with from_revision 1 to carry on"),
            "{dropped:?}"
        );
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_watch_of_pruned_history_is_told_where_to_resume() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 1..=3 {
            let (parsed, json) = artifact(&format!("{i:040x}"), &[("web-1", &format!("s{i}"))]);
            store
                .submit(parsed, json, "ci".into(), false, Vec::new())
                .await
                .unwrap();
        }
        let keep_one = crate::store::Retention {
            deployments: 1,
            ..Default::default()
        };
        store
            .prune(keep_one, &CancellationToken::new())
            .await
            .unwrap();
        let resume = store.log_bounds().await.unwrap().pruned;

        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let from_one = WatchRequest {
            deployment_id: String::new(),
            from_revision: 1,
        };
        let mut stream = start(&store, &shutdown, &tasks, from_one)
            .await
            .unwrap()
            .into_inner();
        let refused = stream.recv().await.unwrap().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::OutOfRange);
        assert!(
            refused
                .message()
                .contains(&format!("the oldest revision to resume from is {resume}")),
            "{refused:?}"
        );
        let told = refused
            .metadata()
            .get(procurator_proto::RESUME_REVISION_METADATA)
            .unwrap();
        assert_eq!(told.to_str().unwrap(), resume.to_string());
        assert!(stream.recv().await.is_none());

        // From there it follows.
        let from_resume = WatchRequest {
            deployment_id: String::new(),
            from_revision: resume,
        };
        let mut stream = start(&store, &shutdown, &tasks, from_resume)
            .await
            .unwrap()
            .into_inner();
        store.emit_test_events(1).await.unwrap();
        assert!(stream.recv().await.unwrap().unwrap().revision > resume);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn watching_a_finished_deployment_sends_the_rest_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (parsed, json) = artifact("abcdef0", &[("web-1", "sys")]);
        let submitted = store
            .submit(parsed, json, "ci".into(), false, Vec::new())
            .await
            .unwrap();
        let id = submitted.id;
        let result = ActivationResult {
            state: MachineState::Succeeded as i32,
            ..Default::default()
        };
        let machine = "web-1".parse().unwrap();
        store
            .record_result(machine, id.clone(), MachineState::Succeeded, result)
            .await
            .unwrap();
        store.emit_test_events(3).await.unwrap(); // other events must not show up

        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let all = WatchRequest {
            deployment_id: id.to_string(),
            from_revision: 0,
        };
        let mut stream = start(&store, &shutdown, &tasks, all)
            .await
            .unwrap()
            .into_inner();
        let mut kinds = Vec::new();
        while let Some(event) = stream.recv().await {
            let event = event.unwrap();
            assert_eq!(event.deployment_id, id.as_str());
            kinds.push(event.kind.unwrap());
        }
        assert!(matches!(kinds.first(), Some(event::Kind::Submitted(_))));
        assert!(matches!(kinds.last(), Some(event::Kind::Finished(_))));

        // Resuming after the finishing event: nothing more, and the stream ends.
        let latest = store.events_after(0, Some(id.clone()), 100).await.unwrap();
        let resume = WatchRequest {
            deployment_id: id.to_string(),
            from_revision: latest.last().unwrap().revision,
        };
        let mut stream = start(&store, &shutdown, &tasks, resume)
            .await
            .unwrap()
            .into_inner();
        assert!(stream.recv().await.is_none());
    }
}
