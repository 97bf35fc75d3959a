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
    bars: BTreeMap<String, ProgressBar>,
    width: usize,
}

impl ProgressRenderer {
    pub fn new() -> Self {
        Self {
            // stdout: we only get here when stdout is the terminal.
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
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
        // Keep the names in one column as machines appear.
        let width = name.chars().count();
        if width > self.width {
            self.width = width;
            for (name, bar) in &self.bars {
                bar.set_prefix(format!("{name:<width$}"));
            }
        } else {
            bar.set_prefix(format!("{name:<w$}", w = self.width));
        }
        bar
    }

    fn show(&mut self, name: &str, m: &MachineView) {
        let bar = self.bar(name);
        if m.state.is_final() {
            let (mark, template) = match m.state {
                MachineState::Succeeded | MachineState::Skipped => ("✔", DONE_OK),
                s if s.is_failure() => ("✘", DONE_FAILED),
                // Superseded or cancelled: neither.
                _ => ("–", DONE_OTHER),
            };
            bar.set_style(style(template));
            bar.finish_with_message(format!(
                "{mark} {}",
                state_text(m.state, m.failed_phase, &m.message, None)
            ));
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
        self.println(&header);
        for (name, m) in &view.machines {
            self.show(name, m);
        }
        Ok(())
    }

    fn event(&mut self, ev: &Event, view: &DeploymentView) -> anyhow::Result<()> {
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
            Some(event::Kind::Agent(_)) => self.println(&event_text(ev)),
            Some(event::Kind::Finished(_)) | None => {}
        }
        Ok(())
    }

    fn notice(&mut self, message: &str) {
        self.multi.suspend(|| eprintln!("{message}"));
    }

    fn finish(&mut self, view: &DeploymentView) -> anyhow::Result<()> {
        // The view may know more than the events said (a final GetDeployment).
        for (name, m) in &view.machines {
            self.show(name, m);
        }
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
        write_flush(&mut std::io::stdout(), &format!("\n{}", summary_text(view)))
    }
}
