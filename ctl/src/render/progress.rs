//! The live view on a terminal: one line per machine, its phase with a
//! spinner, a byte bar while copying, a tick or a cross at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use procurator_proto::v1::{Event, MachineState, event};

use super::plain::{copy_text, event_text, state_text};
use super::summary::summary_text;
use super::view::{DeploymentView, MachineView};
use super::{Renderer, write_flush};

const TICK: Duration = Duration::from_millis(120);

pub struct ProgressRenderer {
    multi: MultiProgress,
    /// The line above the machines naming the wave being rolled out.
    header: Option<ProgressBar>,
    bars: BTreeMap<String, ProgressBar>,
    /// The name column's width the prefixes were last set for.
    width: usize,
}

impl ProgressRenderer {
    pub fn new() -> Self {
        Self {
            // stdout: we only get here when stdout is the terminal.
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            header: None,
            bars: BTreeMap::new(),
            width: 0,
        }
    }

    fn bar(&mut self, name: &str) -> ProgressBar {
        if let Some(bar) = self.bars.get(name) {
            return bar.clone();
        }
        let bar = self.multi.add(ProgressBar::new(0));
        bar.set_style(style(SPINNER));
        bar.enable_steady_tick(TICK);
        self.bars.insert(name.to_owned(), bar.clone());
        bar
    }

    /// Every machine again: after a new machine widened the name column, or
    /// at the start and the end.
    fn show_all(&mut self, view: &DeploymentView) {
        self.width = view.name_width();
        for (name, m) in &view.machines {
            self.show(name, m);
        }
    }

    /// The current wave, in a line kept above the machines.
    fn show_wave(&mut self, view: &DeploymentView) {
        let Some(text) = wave_header(view) else {
            return;
        };
        let header = self.header.get_or_insert_with(|| {
            let bar = self.multi.insert(0, ProgressBar::new(0));
            bar.set_style(style(HEADER));
            bar
        });
        header.set_message(text);
    }

    fn show(&mut self, name: &str, m: &MachineView) {
        let bar = self.bar(name);
        bar.set_prefix(prefix(name, m, self.width));
        if m.state.is_final() {
            let (mark, template) = match m.state {
                s if s.is_success() => ("✔", DONE_OK),
                s if s.is_failure() => ("✘", DONE_FAILED),
                // Superseded or cancelled: neither.
                _ => ("–", DONE_OTHER),
            };
            bar.set_style(style(template));
            let mut text = format!(
                "{mark} {}",
                state_text(m.state, m.failed_phase, &m.message, None)
            );
            if m.reboot_required {
                text.push_str(" (reboot required)");
            }
            bar.finish_with_message(text);
            return;
        }
        match (&m.copy, m.state) {
            (Some(copy), MachineState::Copying) => {
                bar.set_style(style(COPYING));
                bar.set_length(copy.bytes_expected.max(copy.bytes_done).max(1));
                bar.set_position(copy.bytes_done);
                bar.set_message(format!("copying {}", copy_text(copy)));
            }
            _ => {
                bar.set_style(style(SPINNER));
                bar.set_message(state_text(m.state, m.failed_phase, &m.message, None));
            }
        }
    }

    fn println(&self, text: &str) {
        // Printed above the bars; if the terminal is gone there is no one to tell.
        let _ = self.multi.println(text.trim_end());
    }
}

/// `worker-1  wave 2`: the name in a column, then the machine's wave (counted
/// from 1, as `watch` prints waves) when the deployment has waves.
fn prefix(name: &str, m: &MachineView, width: usize) -> String {
    match m.wave {
        Some(wave) => format!("{name:<width$}  wave {}", wave + 1),
        None => format!("{name:<width$}"),
    }
}

/// `wave 2/3 canary`, or None before any wave started.
fn wave_header(view: &DeploymentView) -> Option<String> {
    let w = view.wave.as_ref()?;
    let mut text = format!("wave {}/{}", w.index + 1, w.total);
    if !w.name.is_empty() {
        text.push(' ');
        text.push_str(&w.name);
    }
    Some(text)
}

const HEADER: &str = "{wide_msg:.bold}";
const SPINNER: &str = "{prefix} {spinner:.cyan} {wide_msg}";
const COPYING: &str = "{prefix} {spinner:.cyan} [{bar:24.cyan/blue}] {wide_msg}";
const DONE_OK: &str = "{prefix}   {wide_msg:.green}";
const DONE_FAILED: &str = "{prefix}   {wide_msg:.red}";
const DONE_OTHER: &str = "{prefix}   {wide_msg:.yellow}";

fn style(template: &str) -> ProgressStyle {
    // The templates are constants; should one not parse, a plain bar still works.
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("=> ")
}

impl Renderer for ProgressRenderer {
    fn start(&mut self, view: &DeploymentView) -> anyhow::Result<()> {
        let mut header = format!("following deployment {}", view.id);
        if !view.git_commit.is_empty() {
            header.push_str(&format!(
                " (commit {})",
                crate::format::short_commit(&view.git_commit)
            ));
        }
        if !view.rollback_of.is_empty() {
            header.push_str(&format!(", rollback of {}", view.rollback_of));
        }
        self.println(&header);
        self.show_wave(view);
        self.show_all(view);
        Ok(())
    }

    fn event(&mut self, ev: &Event, view: &DeploymentView) -> anyhow::Result<()> {
        if view.name_width() != self.width {
            self.show_all(view);
        }
        match &ev.kind {
            Some(event::Kind::Submitted(s)) => {
                for name in &s.machines {
                    if let Some(m) = view.machines.get(name) {
                        self.show(name, m);
                    }
                }
            }
            Some(event::Kind::Machine(u)) => {
                if let Some(m) = view.machines.get(&u.machine) {
                    self.show(&u.machine, m);
                }
            }
            // Connections matter while waiting for agents: say so above the bars.
            Some(event::Kind::Agent(_) | event::Kind::Certificate(_)) => {
                self.println(&event_text(ev, view))
            }
            Some(event::Kind::WaveStarted(w)) => {
                self.println(&event_text(ev, view));
                self.show_wave(view);
                for name in &w.machines {
                    if let Some(m) = view.machines.get(name) {
                        self.show(name, m);
                    }
                }
            }
            Some(
                event::Kind::Halted(_) | event::Kind::VmsPlaced(_) | event::Kind::Cancelled(_),
            ) => self.println(&event_text(ev, view)),
            Some(event::Kind::Finished(_)) | None => {}
        }
        Ok(())
    }

    fn notice(&mut self, message: &str) {
        self.multi.suspend(|| eprintln!("{message}"));
    }

    fn finish(&mut self, view: &DeploymentView) -> anyhow::Result<()> {
        // The view may know more than the events said (a final GetDeployment).
        self.show_all(view);
        if let Some(header) = &self.header {
            header.finish();
        }
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
        write_flush(&mut std::io::stdout(), &format!("\n{}", summary_text(view)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::view::WaveView;

    #[test]
    fn machines_show_their_wave_and_the_header_the_current_one() {
        let mut view = DeploymentView::new("d-1");
        assert_eq!(wave_header(&view), None);
        view.wave = Some(WaveView {
            index: 1,
            total: 3,
            name: "canary".into(),
        });
        assert_eq!(wave_header(&view).as_deref(), Some("wave 2/3 canary"));
        let m = MachineView {
            wave: Some(1),
            ..Default::default()
        };
        assert_eq!(prefix("w1", &m, 8), "w1        wave 2");
        assert_eq!(prefix("w1", &MachineView::default(), 4), "w1  ");
    }
}
