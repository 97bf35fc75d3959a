//! The live view on a terminal: a frame (`frame.rs`) redrawn in place a few
//! times a second, never taller or wider than the terminal, measured again
//! at every redraw so a resize takes effect at once. Waves, halts and
//! reconnects are printed above it and scroll away; the summary replaces it
//! at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use procurator_proto::v1::{Event, event};

use super::frame::frame;
use super::plain::event_text;
use super::summary::summary_text;
use super::view::DeploymentView;
use super::{Renderer, SummaryStyle, write_flush};

/// How often the frame is drawn: elapsed times and spinners move, and a
/// burst of events costs one redraw, not one each.
const REDRAW: Duration = Duration::from_millis(150);

pub struct ProgressRenderer {
    screen: Arc<Mutex<Screen>>,
    stop: Arc<AtomicBool>,
    painter: Option<JoinHandle<()>>,
    style: SummaryStyle,
}

/// What is on the terminal, and what to draw next.
struct Screen {
    view: DeploymentView,
    /// Lines of the frame now on the terminal, the cursor at the end of the last.
    drawn: usize,
    /// The terminal's size when the frame was drawn.
    size: (usize, usize),
    tick: usize,
    dirty: bool,
}

impl ProgressRenderer {
    pub fn new(style: SummaryStyle) -> Self {
        Self {
            screen: Arc::new(Mutex::new(Screen {
                view: DeploymentView::new(""),
                drawn: 0,
                size: (0, 0),
                tick: 0,
                dirty: true,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            painter: None,
            style,
        }
    }

    fn screen(&self) -> MutexGuard<'_, Screen> {
        lock(&self.screen)
    }

    fn stop_painting(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(painter) = self.painter.take() {
            // A painter that panicked has nothing left to draw.
            let _ = painter.join();
        }
    }
}

fn lock(screen: &Mutex<Screen>) -> MutexGuard<'_, Screen> {
    // A panic while drawing leaves a screen that can be drawn again.
    screen
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Screen {
    /// Rows and columns now; 24×80 when the terminal does not say.
    fn measure() -> (usize, usize) {
        let (rows, cols) = console::Term::stdout().size();
        match (rows, cols) {
            (0, _) | (_, 0) => (24, 80),
            (rows, cols) => (usize::from(rows), usize::from(cols)),
        }
    }

    /// Removes the frame, leaving the cursor where it began.
    fn erase(&mut self, out: &mut impl std::io::Write) {
        if self.drawn == 0 {
            return;
        }
        let _ = write!(out, "\r");
        if self.drawn > 1 {
            let _ = write!(out, "\x1b[{}A", self.drawn - 1);
        }
        let _ = write!(out, "\x1b[J");
        self.drawn = 0;
    }

    fn draw(&mut self, out: &mut impl std::io::Write) {
        let size = Self::measure();
        if size != self.size && self.drawn > 0 {
            // Narrower, the old lines wrapped into rows we cannot count:
            // start from a clean screen.
            let _ = write!(out, "\x1b[2J\x1b[H");
            self.drawn = 0;
        }
        self.size = size;
        self.erase(out);
        let lines = frame(
            &self.view,
            procurator_core::now_ms(),
            size.0,
            size.1,
            self.tick,
        );
        let _ = write!(out, "{}", lines.join("\n"));
        let _ = out.flush();
        self.drawn = lines.len();
        self.dirty = false;
    }

    /// `text` above the frame, which is drawn again below it.
    fn println(&mut self, out: &mut impl std::io::Write, text: &str) {
        self.erase(out);
        for line in text.trim_end().lines() {
            let _ = writeln!(
                out,
                "{}",
                console::truncate_str(line, self.size.1.max(2) - 1, "…")
            );
        }
        self.draw(out);
    }
}

fn paint(screen: Arc<Mutex<Screen>>, stop: Arc<AtomicBool>) {
    let mut ticks = 0usize;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(REDRAW);
        ticks += 1;
        let mut screen = lock(&screen);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // The spinner turns and the clock moves every few redraws.
        if ticks.is_multiple_of(4) {
            screen.tick += 1;
            screen.dirty = true;
        }
        if screen.dirty || Screen::measure() != screen.size {
            screen.draw(&mut std::io::stdout().lock());
        }
    }
}

impl Renderer for ProgressRenderer {
    fn start(&mut self, view: &DeploymentView) -> anyhow::Result<()> {
        {
            let mut screen = self.screen();
            screen.view = view.clone();
            screen.draw(&mut std::io::stdout().lock());
        }
        let (screen, stop) = (self.screen.clone(), self.stop.clone());
        self.painter = Some(std::thread::spawn(move || paint(screen, stop)));
        Ok(())
    }

    fn event(&mut self, ev: &Event, _view: &DeploymentView) -> anyhow::Result<()> {
        let mut screen = self.screen();
        // A copy of the fold, so that an event costs no copy of the fleet.
        screen.view.apply(ev);
        screen.dirty = true;
        // Connections and certificates are not printed: one line each would
        // scroll the view away on a large fleet (`watch --output json` has them).
        if let Some(
            event::Kind::WaveStarted(_)
            | event::Kind::Halted(_)
            | event::Kind::VmsPlaced(_)
            | event::Kind::Cancelled(_),
        ) = &ev.kind
        {
            let text = event_text(ev, &screen.view);
            screen.println(&mut std::io::stdout().lock(), &text);
        }
        Ok(())
    }

    fn replaced(&mut self, view: &DeploymentView) {
        let mut screen = self.screen();
        screen.view = view.clone();
        screen.dirty = true;
    }

    fn notice(&mut self, message: &str) {
        let mut screen = self.screen();
        let mut out = std::io::stdout().lock();
        screen.erase(&mut out);
        eprintln!("{message}");
        screen.draw(&mut out);
    }

    fn finish(&mut self, view: &DeploymentView) -> anyhow::Result<()> {
        self.stop_painting();
        let mut screen = self.screen();
        screen.erase(&mut std::io::stdout().lock());
        write_flush(&mut std::io::stdout(), &summary_text(view, self.style))
    }
}

impl Drop for ProgressRenderer {
    fn drop(&mut self) {
        self.stop_painting();
    }
}
