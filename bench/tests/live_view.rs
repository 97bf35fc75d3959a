//! `procurator-ctl watch` in a real terminal (tmux) over a deployment of 60
//! simulated agents against the real control plane: 40 succeed, 2 fail,
//! 18 stay in the middle of their copy. At 80×24 and after a resize to
//! 200×50 the screen (`tmux capture-pane`) never holds more lines than the
//! terminal, the totals are right, the failed rows come first and every
//! row is in natural order (`m-2` before `m-10`).
//!
//! Needs `cargo build --workspace --bins` (ctl and the control plane) and
//! tmux (scripts/setup.sh installs it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use procurator_integration_tests::{Fleet, FleetOptions, wait_for};
use serde_json::{Value, json};

const SUCCEEDING: usize = 40;
const FAILING: usize = 2;
const COPYING: usize = 18;
const MACHINES: usize = SUCCEEDING + FAILING + COPYING;

/// A tmux server of our own, ended (with everything in it) on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The visible screen, one string per row, trailing blank rows kept.
    fn screen(&self) -> Vec<String> {
        self.run(&["capture-pane", "-p", "-t", "live"])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

/// Simulated agents (`procurator-bench swarm-agents`), killed on drop.
struct Agents(Child);

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agents(ca_dir: &Path, url: &str, first: usize, count: usize, behaviour: &[&str]) -> Agents {
    let child = Command::new(env!("CARGO_BIN_EXE_procurator-bench"))
        .args(["swarm-agents", "--url", url, "--prefix", "m"])
        .arg("--ca-dir")
        .arg(ca_dir)
        .args(["--first", &first.to_string(), "--count", &count.to_string()])
        .args(behaviour)
        // They run until their stdin closes: held open until the drop.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting simulated agents");
    Agents(child)
}

fn artifact() -> Value {
    let mut artifact = procurator_integration_tests::simulated::artifact("m", MACHINES, 1, 0);
    // The two failures must not halt the rollout before the copies start.
    artifact["rollout"]["failureBudget"] = json!(FAILING);
    artifact
}

/// The rows of the machine table on `screen`: each row's first word.
fn machine_rows(screen: &[String]) -> Vec<String> {
    let Some(title) = screen.iter().position(|l| l.starts_with("MACHINE ")) else {
        return Vec::new();
    };
    screen[title + 1..]
        .iter()
        .filter(|l| l.starts_with("m-"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn check_screen(screen: &[String], rows: usize, cols: usize) -> Vec<String> {
    let text = screen.join("\n");
    assert!(
        screen.len() <= rows,
        "{} lines on a {rows}-row terminal:\n{text}",
        screen.len()
    );
    for line in screen {
        assert!(line.chars().count() <= cols, "wider than {cols}: {line:?}");
    }
    assert!(
        text.contains(&format!(
            "{SUCCEEDING}/{MACHINES} ok · {FAILING} failed · {COPYING} in flight"
        )),
        "totals:\n{text}"
    );
    assert!(
        text.contains(&format!(
            "{COPYING} copying · {SUCCEEDING} succeeded · {FAILING} rolled-back"
        )),
        "per state:\n{text}"
    );
    let rows = machine_rows(screen);
    // Failed first (m-40, m-41), then in flight from m-42, in natural order.
    assert_eq!(rows[..2], ["m-40", "m-41"], "failed rows first:\n{text}");
    let numbers: Vec<usize> = rows[2..]
        .iter()
        .map(|r| r.trim_start_matches("m-").parse().expect("m-N"))
        .collect();
    let mut sorted = numbers.clone();
    sorted.sort_unstable();
    assert_eq!(numbers, sorted, "natural order:\n{text}");
    assert!(numbers.first() == Some(&42), "{text}");
    rows
}

#[test]
fn the_live_view_fits_the_terminal_and_shows_failures_first() {
    let fleet = Fleet::start_with(FleetOptions {
        agents: Vec::new(),
        ..FleetOptions::default()
    })
    .expect("control plane");
    let url = fleet.control_plane.url().expect("url");
    let ca_dir = fleet.pki.dir().to_owned();
    let _ok = agents(&ca_dir, &url, 0, SUCCEEDING, &[]);
    let _failing = agents(&ca_dir, &url, SUCCEEDING, FAILING, &["--failure-rate", "1"]);
    let _copying = agents(
        &ca_dir,
        &url,
        SUCCEEDING + FAILING,
        COPYING,
        &["--copy-delay-ms", "600000"],
    );

    let ctl = fleet.ctl().expect("ctl");
    // Every agent connected first: each is sent its desired state at once.
    wait_for("60 agents connected", Duration::from_secs(60), || {
        let shown = ctl.run(&["status", "--connected", "--output", "json"])?;
        let agents: Value = serde_json::from_str(&shown.stdout)?;
        Ok((agents.as_array().map(Vec::len) == Some(MACHINES)).then_some(()))
    })
    .expect("the simulated agents connect");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("deployment.json");
    std::fs::write(&path, artifact().to_string()).expect("write the artifact");
    let submitted = ctl
        .run(&["submit", path.to_str().expect("utf-8"), "--output", "json"])
        .expect("submit");
    submitted.expect_code(0).expect("submitted");
    let id = serde_json::from_str::<Value>(&submitted.stdout).expect("JSON")["deploymentId"]
        .as_str()
        .expect("an id")
        .to_owned();
    // Every machine where the test wants it before the terminal looks.
    wait_for(
        "42 results and 18 copies under way",
        Duration::from_secs(60),
        || {
            let shown = ctl.run(&["deployments", &id, "--output", "json"])?;
            let d: Value = serde_json::from_str(&shown.stdout)?;
            let counts = &d["machineCounts"];
            Ok((counts["succeeded"] == SUCCEEDING
                && counts["rolled-back"] == FAILING
                && counts["copying"] == COPYING)
                .then_some(()))
        },
    )
    .expect("the deployment reaches its mix");

    // ctl as an operator runs it, in a terminal of its own.
    let script = dir.path().join("watch.sh");
    let mut env = String::new();
    for (key, value) in ctl.command().get_envs() {
        if let Some(value) = value {
            env.push_str(&format!(
                "export {}='{}'\n",
                key.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
    }
    let ctl_bin = procurator_integration_tests::bin("procurator-ctl").expect("ctl");
    std::fs::write(
        &script,
        format!("#!/bin/sh\n{env}exec {} watch {id}\n", ctl_bin.display()),
    )
    .expect("script");
    let tmux = Tmux {
        socket: dir.path().join("tmux.sock"),
    };
    let script_arg = script.display().to_string();
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "live",
        "-x",
        "80",
        "-y",
        "24",
        "sh",
        &script_arg,
    ]);

    let small = wait_for("the live view at 80x24", Duration::from_secs(30), || {
        let screen = tmux.screen();
        let text = screen.join("\n");
        Ok((text.contains("in flight") && machine_rows(&screen).len() > 2).then_some(screen))
    })
    .expect("the live view draws");
    let rows = check_screen(&small, 24, 80);
    // 20 rows do not fit in 24 lines with the header: the rest is counted.
    assert!(rows.len() < FAILING + COPYING, "{small:#?}");
    let hidden = FAILING + COPYING - rows.len();
    assert!(
        small
            .join("\n")
            .contains(&format!("… {hidden} more in flight")),
        "{small:#?}"
    );
    let copying_row = small.iter().find(|l| l.starts_with("m-42 ")).expect("m-42");
    assert!(copying_row.contains("50% 2.0 KiB/4.0 KiB"), "{copying_row}");
    let failed_row = small.iter().find(|l| l.starts_with("m-40 ")).expect("m-40");
    assert!(
        failed_row.contains("simulated activation failure"),
        "{failed_row}"
    );

    tmux.run(&["resize-window", "-t", "live", "-x", "200", "-y", "50"]);
    let large = wait_for("the live view at 200x50", Duration::from_secs(30), || {
        let screen = tmux.screen();
        Ok((machine_rows(&screen).len() == FAILING + COPYING).then_some(screen))
    })
    .expect("every row after the resize");
    check_screen(&large, 50, 200);
    assert!(!large.join("\n").contains("more in flight"), "{large:#?}");
}
