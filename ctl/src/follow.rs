//! Following one deployment through `Watch` until it ends, resuming after
//! a broken stream from the last revision seen.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use procurator_proto::v1::{Deployment, Event, GetDeploymentRequest, WatchRequest};
use tonic::{Code, Status};

use crate::Outcome;
use crate::connection::{Connection, is_retryable, status_detail};
use crate::pages::{RowFilter, deployment_with_rows};
use crate::render::{DeploymentView, Renderer};

/// How long to keep trying to get the stream back before giving up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follow `deployment_id` from events after `from_revision` until its
/// `DeploymentFinished` event; 0 if it succeeded, 3 if not.
pub async fn follow(
    conn: &mut Connection,
    deployment_id: &str,
    from_revision: u64,
    renderer: &mut dyn Renderer,
) -> anyhow::Result<Outcome> {
    let view = follow_view(conn, deployment_id, from_revision, renderer).await?;
    Ok(view.outcome())
}

/// [`follow`], returning what was learnt, for commands whose success is not
/// the deployment's (`cancel --wait`).
pub async fn follow_view(
    conn: &mut Connection,
    deployment_id: &str,
    from_revision: u64,
    renderer: &mut dyn Renderer,
) -> anyhow::Result<DeploymentView> {
    let deployment = deployment_with_rows(conn, deployment_id, &RowFilter::default()).await?;
    let mut view = DeploymentView::new(deployment_id);
    if from_revision == 0 {
        // The events replay the whole history: start from the machine names
        // alone and let them walk each machine forward.
        view.git_commit.clone_from(&deployment.git_commit);
        view.rollback_of.clone_from(&deployment.rollback_of);
        for m in &deployment.machines {
            view.machines.entry(m.machine.clone()).or_default();
        }
    } else {
        // Only what happened after `from_revision` comes: start from what the
        // control plane knows now. Whether it is finished, the stream says.
        view.merge(&deployment);
        view.finished = false;
        view.state = procurator_proto::v1::DeploymentState::Running;
    }
    renderer.start(&view)?;

    let mut last_revision = from_revision;
    let mut broken_since: Option<Instant> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let broke_with = match stream_until_finished(
            conn,
            &mut view,
            &mut last_revision,
            renderer,
            &mut broken_since,
        )
        .await?
        {
            StreamEnd::Finished => break,
            StreamEnd::Compacted { resume_from } => {
                if resume_from <= last_revision {
                    bail!(
                        "the control plane says events after revision {last_revision} are pruned, yet tells us to resume from {resume_from}; it is misbehaving"
                    );
                }
                renderer.notice(&format!(
                    "the control plane no longer holds this deployment's events after revision {last_revision} \
                     (pruned: see its --retain-events-days); showing the deployment as it is now and following from revision {resume_from}"
                ));
                let now = deployment_with_rows(conn, deployment_id, &RowFilter::default()).await?;
                view.merge(&now);
                renderer.replaced(&view);
                last_revision = resume_from;
                if view.finished {
                    break;
                }
                continue;
            }
            StreamEnd::Broken(status) => status,
        };
        if broken_since.is_none() {
            // A new outage: start again with a short wait.
            backoff = FIRST_BACKOFF;
        }
        let since = *broken_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= GIVE_UP_AFTER {
            bail!(
                "lost the stream from the control plane at {} and could not get it back for {} s: {}; \
                 the deployment goes on without us: follow it again with `procurator-ctl watch {deployment_id} --from-revision {last_revision}`",
                conn.url,
                GIVE_UP_AFTER.as_secs(),
                status_detail(&broke_with)
            );
        }
        let wait = jitter(backoff).min(GIVE_UP_AFTER.saturating_sub(since.elapsed()));
        renderer.notice(&format!(
            "lost the stream from the control plane ({}); reconnecting in {:.1} s from revision {last_revision}",
            status_detail(&broke_with),
            wait.as_secs_f64()
        ));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        // Given several, the next that answers; the event log is the same
        // on every replica, so the resume from `last_revision` holds.
        let was = conn.url.clone();
        match conn.move_on().await {
            Ok(()) if conn.url != was => {
                renderer.notice(&format!("following on the control plane at {}", conn.url));
            }
            Ok(()) => {}
            Err(e) => renderer.notice(&format!("{e}")),
        }
    }
    renderer.finish(&view)?;
    Ok(view)
}

enum StreamEnd {
    Finished,
    /// The events after `last_revision` were pruned: resume from here.
    Compacted {
        resume_from: u64,
    },
    /// Worth re-opening from `last_revision`.
    Broken(Status),
}

/// Open one `Watch` and read it until the deployment finishes or the stream breaks.
async fn stream_until_finished(
    conn: &mut Connection,
    view: &mut DeploymentView,
    last_revision: &mut u64,
    renderer: &mut dyn Renderer,
    broken_since: &mut Option<Instant>,
) -> anyhow::Result<StreamEnd> {
    let request = WatchRequest {
        deployment_id: view.id.clone(),
        from_revision: *last_revision,
    };
    let mut stream = match conn.client.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return ended_with(conn, status),
    };
    // The control plane answered: the outage, if there was one, is over.
    if broken_since.take().is_some() {
        renderer.notice(&format!(
            "reconnected; following from revision {last_revision}"
        ));
    }
    loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                if !take(view, last_revision, &ev) {
                    continue;
                }
                renderer.event(&ev, view)?;
                if view.finished {
                    return Ok(StreamEnd::Finished);
                }
            }
            Ok(None) => {
                // The server ended the stream without the event that finishes
                // the deployment (e.g. it finished before --from-revision):
                // ask for its state rather than wait for an event that was sent long ago.
                let now = get_deployment(conn, &view.id).await?;
                if now.state().is_final() {
                    let now = deployment_with_rows(conn, &view.id, &RowFilter::default()).await?;
                    view.merge(&now);
                    return Ok(StreamEnd::Finished);
                }
                return Ok(StreamEnd::Broken(Status::unavailable(
                    "the stream ended early",
                )));
            }
            Err(status) => return ended_with(conn, status),
        }
    }
}

/// What a Watch that failed with `status` means for following on.
fn ended_with(conn: &Connection, status: Status) -> anyhow::Result<StreamEnd> {
    if status.code() == Code::OutOfRange
        && let Some(resume_from) = status
            .metadata()
            .get(procurator_proto::RESUME_REVISION_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    {
        return Ok(StreamEnd::Compacted { resume_from });
    }
    if is_retryable(&status) {
        return Ok(StreamEnd::Broken(status));
    }
    Err(conn.error(&status, "following the deployment"))
}

/// Fold `ev` into the view unless it was seen already (after a reconnect the
/// server should not repeat events; if it does, they are dropped here).
fn take(view: &mut DeploymentView, last_revision: &mut u64, ev: &Event) -> bool {
    if ev.revision <= *last_revision
        || (!ev.deployment_id.is_empty() && ev.deployment_id != view.id)
    {
        return false;
    }
    *last_revision = ev.revision;
    view.apply(ev);
    true
}

pub async fn get_deployment(conn: &mut Connection, id: &str) -> anyhow::Result<Deployment> {
    let request = GetDeploymentRequest {
        deployment_id: id.to_owned(),
    };
    match conn.client.get_deployment(request).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) if status.code() == Code::NotFound => Err(anyhow!(
            "the control plane knows no deployment {id:?}: list them with `procurator-ctl deployments`"
        )),
        Err(status) => Err(conn.error(&status, &format!("looking up deployment {id}"))),
    }
}

/// ±25 %, so that many watchers of one restarted control plane do not all
/// come back at the same instant.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.75..1.25))
}

#[cfg(test)]
mod tests {
    use procurator_proto::v1::{MachineState, MachineUpdate, event};

    use super::*;

    fn ev(revision: u64, deployment_id: &str, state: MachineState) -> Event {
        Event {
            revision,
            at_ms: 0,
            deployment_id: deployment_id.into(),
            kind: Some(event::Kind::Machine(MachineUpdate {
                machine: "a".into(),
                state: state as i32,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn events_already_seen_are_dropped() {
        let mut view = DeploymentView::new("d-1");
        let mut last = 5;
        assert!(!take(
            &mut view,
            &mut last,
            &ev(5, "d-1", MachineState::Copying)
        ));
        assert!(take(
            &mut view,
            &mut last,
            &ev(6, "d-1", MachineState::Activating)
        ));
        assert_eq!(last, 6);
        assert!(!take(
            &mut view,
            &mut last,
            &ev(6, "d-1", MachineState::Failed)
        ));
        assert_eq!(view.machines["a"].state, MachineState::Activating);
    }

    #[test]
    fn events_of_other_deployments_are_ignored() {
        let mut view = DeploymentView::new("d-1");
        let mut last = 0;
        assert!(!take(
            &mut view,
            &mut last,
            &ev(1, "d-2", MachineState::Failed)
        ));
        assert!(view.machines.is_empty());
    }

    #[test]
    fn jitter_stays_near_the_backoff() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(4));
            assert!(
                d >= Duration::from_secs(3) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
    }
}
