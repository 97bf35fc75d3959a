//! Showing a followed deployment: live bars on a terminal, one line per
//! event otherwise, NDJSON for scripts; a summary at the end.

mod frame;
mod json;
mod plain;
mod progress;
mod summary;
mod view;

use std::io::{IsTerminal as _, Write};

use anyhow::Context as _;
use procurator_proto::v1::Event;

pub use json::{copy_json, event_json, phase_json};
pub use view::DeploymentView;

use crate::output::OutputFormat;

/// Receives what `follow` learns, in order.
pub trait Renderer {
    /// Before the first event, with what `GetDeployment` said.
    fn start(&mut self, view: &DeploymentView) -> anyhow::Result<()>;
    /// After `view` took the event in.
    fn event(&mut self, ev: &Event, view: &DeploymentView) -> anyhow::Result<()>;
    /// Something the operator should know that is not an event (a reconnect).
    fn notice(&mut self, message: &str);
    /// `view` took in the deployment as `GetDeployment` and `ListMachines`
    /// tell it now (after a gap in the events), not event by event.
    fn replaced(&mut self, _view: &DeploymentView) {}
    /// The deployment ended.
    fn finish(&mut self, view: &DeploymentView) -> anyhow::Result<()>;
}

/// How the summary at the end lists machines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SummaryStyle {
    /// Every machine by name, not only the failed ones.
    pub all: bool,
}

/// The flags of every command that follows a deployment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FollowArgs {
    /// In the summary at the end, list every machine; by default the failed
    /// ones are listed and the rest counted per state.
    #[arg(long)]
    pub all: bool,
}

impl FollowArgs {
    pub fn style(&self) -> SummaryStyle {
        SummaryStyle { all: self.all }
    }
}

/// The renderer for `--output` and whatever stdout is.
pub fn for_output(format: OutputFormat, style: SummaryStyle) -> Box<dyn Renderer> {
    match format {
        OutputFormat::Json => Box::new(JsonRenderer {
            out: Box::new(std::io::stdout()),
        }),
        OutputFormat::Text if std::io::stdout().is_terminal() => {
            Box::new(progress::ProgressRenderer::new(style))
        }
        OutputFormat::Text => Box::new(PlainRenderer {
            out: Box::new(std::io::stdout()),
            style,
        }),
    }
}

/// One line per event, then the summary.
pub struct PlainRenderer {
    pub out: Box<dyn Write>,
    pub style: SummaryStyle,
}

impl Renderer for PlainRenderer {
    fn start(&mut self, _view: &DeploymentView) -> anyhow::Result<()> {
        Ok(())
    }

    fn event(&mut self, ev: &Event, view: &DeploymentView) -> anyhow::Result<()> {
        write_flush(&mut self.out, &plain::event_text(ev, view))
    }

    fn notice(&mut self, message: &str) {
        eprintln!("{message}");
    }

    fn finish(&mut self, view: &DeploymentView) -> anyhow::Result<()> {
        write_flush(
            &mut self.out,
            &format!("\n{}", summary::summary_text(view, self.style)),
        )
    }
}

/// One JSON object per event (NDJSON); the `finished` event is the summary.
pub struct JsonRenderer {
    pub out: Box<dyn Write>,
}

impl Renderer for JsonRenderer {
    fn start(&mut self, _view: &DeploymentView) -> anyhow::Result<()> {
        Ok(())
    }

    fn event(&mut self, ev: &Event, _view: &DeploymentView) -> anyhow::Result<()> {
        write_flush(&mut self.out, &format!("{}\n", json::event_json(ev)))
    }

    fn notice(&mut self, message: &str) {
        eprintln!("{message}");
    }

    fn finish(&mut self, _view: &DeploymentView) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Flushed per event: whoever reads our pipe (a CI log) sees it live.
fn write_flush(out: &mut dyn Write, text: &str) -> anyhow::Result<()> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use procurator_proto::v1::{
        DeploymentFinished, DeploymentState, MachineState, MachineUpdate, RolloutHalted,
        WaveStarted, event,
    };

    use super::*;

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn events() -> Vec<Event> {
        let at = 1_748_762_102_000;
        let machine = |revision, state: MachineState| Event {
            revision,
            at_ms: at,
            deployment_id: "d-1".into(),
            kind: Some(event::Kind::Machine(MachineUpdate {
                machine: "worker-1".into(),
                state: state as i32,
                ..Default::default()
            })),
        };
        vec![
            machine(2, MachineState::Activating),
            machine(3, MachineState::Succeeded),
            Event {
                revision: 4,
                at_ms: at,
                deployment_id: "d-1".into(),
                kind: Some(event::Kind::Finished(DeploymentFinished {
                    state: DeploymentState::Succeeded as i32,
                    summary: [("SUCCEEDED".to_owned(), 1)].into(),
                })),
            },
        ]
    }

    fn drive(renderer: &mut dyn Renderer) -> DeploymentView {
        let mut view = DeploymentView::new("d-1");
        renderer.start(&view).unwrap();
        for ev in events() {
            view.apply(&ev);
            renderer.event(&ev, &view).unwrap();
        }
        renderer.finish(&view).unwrap();
        view
    }

    #[test]
    fn plain_output_is_one_line_per_event_then_the_summary() {
        let out = Captured::default();
        drive(&mut PlainRenderer {
            out: Box::new(out.clone()),
            style: SummaryStyle::default(),
        });
        assert_eq!(
            out.text(),
            "07:15:02 worker-1 activating\n\
             07:15:02 worker-1 succeeded\n\
             07:15:02 d-1 succeeded: 1 succeeded\n\
             \n\
             deployment d-1 succeeded: 1 of 1 machines ok, 0 failed\n\
             \x20 1 succeeded: worker-1\n"
        );
    }

    #[test]
    fn a_halted_rollout_reads_as_such_from_wave_to_summary() {
        let at = 1_748_762_102_000;
        let ev = |revision, kind| Event {
            revision,
            at_ms: at,
            deployment_id: "d-1".into(),
            kind: Some(kind),
        };
        let machine = |name: &str, state: MachineState| {
            event::Kind::Machine(MachineUpdate {
                machine: name.into(),
                state: state as i32,
                ..Default::default()
            })
        };
        let out = Captured::default();
        let mut renderer = PlainRenderer {
            out: Box::new(out.clone()),
            style: SummaryStyle::default(),
        };
        let mut view = DeploymentView::new("d-1");
        view.machines.entry("worker-2".into()).or_default();
        for e in [
            ev(
                1,
                event::Kind::WaveStarted(WaveStarted {
                    index: 0,
                    total: 2,
                    name: "canary".into(),
                    machines: vec!["worker-1".into()],
                }),
            ),
            ev(2, machine("worker-1", MachineState::Failed)),
            ev(
                3,
                event::Kind::Halted(RolloutHalted {
                    reason: "1 machine failed, the failure budget is 0".into(),
                    failed_machines: vec!["worker-1".into()],
                }),
            ),
            ev(4, machine("worker-2", MachineState::Cancelled)),
            ev(
                5,
                event::Kind::Finished(DeploymentFinished {
                    state: DeploymentState::Halted as i32,
                    summary: Default::default(),
                }),
            ),
        ] {
            view.apply(&e);
            renderer.event(&e, &view).unwrap();
        }
        renderer.finish(&view).unwrap();
        assert_eq!(
            out.text(),
            "07:15:02 wave 1/2 canary started: worker-1\n\
             07:15:02 worker-1 failed\n\
             07:15:02 rollout halted: 1 machine failed, the failure budget is 0 (worker-1); 1 machine left as it was\n\
             07:15:02 worker-2 cancelled\n\
             07:15:02 d-1 halted\n\
             \n\
             deployment d-1 halted: 0 of 2 machines ok, 1 failed\n\
             \x20 halted: 1 machine failed, the failure budget is 0 (worker-1)\n\
             \x20 worker-1  failed\n\
             \x20 1 cancelled: worker-2\n"
        );
        assert_eq!(crate::failure::exit_code(&Ok(view.outcome())), 3);
    }

    #[test]
    fn json_output_is_one_parseable_object_per_line() {
        let out = Captured::default();
        drive(&mut JsonRenderer {
            out: Box::new(out.clone()),
        });
        let lines: Vec<serde_json::Value> = out
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["state"], "activating");
        assert_eq!(lines[2]["type"], "finished");
        assert_eq!(lines[2]["revision"], 4);
    }
}
