//! The commands one deployment runs, each turned into a [`Failure`] that
//! says which command failed and how.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use procurator_core::StorePath;
use procurator_proto::v1::MachineState;

use super::launch::Ended;
use super::{Deployment, Launcher, Verdict, switch_name};
use crate::detached::RunStatus;
use crate::health::{Check, run_check};
use crate::outcome::Failure;
use crate::system::{Goal, Profile};

/// How often a copy is tried before the deployment fails, and the pause
/// before the second attempt (doubled for the third).
const COPY_ATTEMPTS: u32 = 3;
const COPY_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Whether Nix refused a path for its signatures: `lacks a valid
/// signature` (Nix 2.8), `lacks a signature by a trusted key` (later).
pub(super) fn lacks_signature(nix_error: &str) -> bool {
    nix_error.contains("lacks a valid signature")
        || nix_error.contains("lacks a signature by a trusted key")
}

/// Nix's refusal of an unsigned or otherwise-signed path, in words that
/// say what this machine trusts and where the signature comes from.
pub(super) fn unsigned_reason(closure: &StorePath, trusted_keys: &[String]) -> String {
    let names: Vec<&str> = trusted_keys
        .iter()
        .map(|k| k.split_once(':').map_or(k.as_str(), |(name, _)| name))
        .collect();
    format!(
        "{closure} is not signed by a key this machine trusts (it trusts: {}); publish it signed with the matching secret key (procurator-ctl publish or ci --signing-key)",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    )
}

impl Deployment<'_> {
    /// `nix copy --from` each substituter in turn (the agent's own first)
    /// until one has the closure, signed by a key the agent trusts.
    pub(super) async fn copy(&self) -> Result<(), Failure> {
        let activator = self.activator;
        let closure = &self.closure;
        let mut substituters: Vec<&str> = Vec::new();
        for s in &activator.substituters {
            if !substituters.contains(&s.as_str()) {
                substituters.push(s);
            }
        }
        if substituters.is_empty() {
            return Err(Failure::new(
                MachineState::Copying,
                format!(
                    "no substituter to copy {closure} from: start the agent with --substituter"
                ),
                "",
            ));
        }
        self.report(MachineState::Copying, format!("copying {closure}"));
        let mut errors = Vec::new();
        let mut tail = String::new();
        // A copy interrupted (the agent killed mid-copy, a cache that hiccups)
        // is retried a few times before the deployment fails: nothing has
        // changed on the machine yet, so trying again is always safe.
        for attempt in 1..=COPY_ATTEMPTS {
            if attempt > 1 {
                tokio::time::sleep(COPY_RETRY_DELAY * (attempt - 1)).await;
                self.report(
                    MachineState::Copying,
                    format!("copying {closure}, attempt {attempt} of {COPY_ATTEMPTS}"),
                );
            }
            errors.clear();
            for &substituter in &substituters {
                let message = format!("copying {closure} from {substituter}");
                let mut last_sent: Option<Instant> = None;
                let copied = activator
                    .nix
                    .copy_from(substituter, closure, &activator.trusted_keys, |progress| {
                        let due = last_sent
                            .is_none_or(|at| at.elapsed() >= activator.settings.progress_interval);
                        if due {
                            last_sent = Some(Instant::now());
                            self.report_copy(
                                MachineState::Copying,
                                message.clone(),
                                Some(progress),
                            );
                        }
                    })
                    .await;
                match copied {
                    Ok(last) => {
                        let copied = format!(
                            "nix copy --from {substituter} {closure}: copied {} paths, {} bytes",
                            last.paths_done, last.bytes_done
                        );
                        self.log(&copied, "");
                        self.report_copy(
                            MachineState::Copying,
                            format!("copied {closure} from {substituter}"),
                            Some(last),
                        );
                        return Ok(());
                    }
                    Err(e) => {
                        self.log(
                            &format!("nix copy --from {substituter} {closure}: failed"),
                            &format!("{e}\n{}", e.tail()),
                        );
                        tracing::warn!(substituter, error = %e, "copy failed");
                        errors.push(format!("{substituter}: {e}"));
                        tail = e.tail().to_owned();
                    }
                }
            }
        }
        let hint = if activator.trusted_keys.is_empty() {
            " (the agent trusts no signing key: set --trusted-public-key)"
        } else {
            ""
        };
        let reason = if errors.iter().any(|e| lacks_signature(e)) {
            unsigned_reason(closure, &activator.trusted_keys)
        } else {
            format!("could not copy {closure} from any substituter{hint}")
        };
        Err(Failure::new(
            MachineState::Copying,
            format!("{reason}: {}", errors.join("; ")),
            tail,
        ))
    }

    /// Runs every health check; the first that never passes fails the phase.
    pub(super) async fn check(&self, checks: &[Check]) -> Result<(), Failure> {
        let total = checks.len();
        for (i, check) in checks.iter().enumerate() {
            let n = i + 1;
            self.report(
                MachineState::Checking,
                format!("health check {n}/{total}: {}", check.command),
            );
            run_check(check, self.activator.settings.tail_lines, |attempt| {
                let verdict = if attempt.passed { "passed" } else { "failed" };
                self.log(
                    &format!(
                        "health check {n}/{total} `{}`, attempt {}: {verdict} ({})",
                        check.command, attempt.n, attempt.how
                    ),
                    attempt.output,
                );
                if !attempt.passed {
                    self.report(
                        MachineState::Checking,
                        format!(
                            "health check {n}/{total}: attempt {} failed ({})",
                            attempt.n, attempt.how
                        ),
                    );
                }
            })
            .await
            .map_err(|f| Failure::new(MachineState::Checking, f.reason, f.tail))?;
        }
        Ok(())
    }

    /// `<closure>/bin/switch-to-configuration <goal>`, failing `phase` if it
    /// does not exit 0 in time.
    pub(super) async fn switch(
        &self,
        profile: &Profile,
        goal: Goal,
        phase: MachineState,
    ) -> Result<(), Failure> {
        let settings = &self.activator.settings;
        let command = format!("{} {}", switch_name(profile.closure()), goal.as_str());
        let ended = match &settings.launcher {
            Launcher::Child => match profile
                .activate(goal, settings.switch_timeout, settings.tail_lines)
                .await
            {
                Ok(out) => Ended {
                    status: Ok(RunStatus {
                        code: out.status.code(),
                        signal: out.status.signal(),
                        error: None,
                    }),
                    tail: out.tail,
                    output: out.output,
                },
                Err(e) => {
                    self.log(&format!("{command}: {e}"), e.output());
                    return Err(Failure::new(phase, e.to_string(), e.tail()));
                }
            },
            Launcher::Detached(how) => {
                let program =
                    Path::new(profile.closure().as_str()).join("bin/switch-to-configuration");
                self.run_detached(how, &program, &[goal.as_str()], phase)
                    .await?
            }
        };
        self.judge(ended, &command, phase)
    }

    /// `nix-env -p <system profile> --set <closure>`.
    pub(super) async fn set_profile(
        &self,
        closure: &StorePath,
        phase: MachineState,
    ) -> Result<(), Failure> {
        let profile = &self.activator.paths.profile;
        let command = format!("nix-env -p {} --set {closure}", profile.display());
        match self.activator.nix.set_profile(profile, closure).await {
            Ok(()) => {
                self.log(&format!("{command}: done"), "");
                Ok(())
            }
            Err(e) => {
                self.log(&format!("{command}: failed"), &format!("{e}\n{}", e.tail()));
                Err(Failure::new(phase, e.to_string(), e.tail()))
            }
        }
    }

    /// `switch-to-configuration test` exiting 0 is not enough: the closure
    /// must be what runs now.
    pub(super) fn expect_running(
        &self,
        closure: &StorePath,
        phase: MachineState,
    ) -> Result<(), Failure> {
        let current = self.current_system();
        if current == closure.as_str() {
            return Ok(());
        }
        let now = if current.is_empty() {
            "nothing".to_owned()
        } else {
            current
        };
        Err(Failure::new(
            phase,
            format!(
                "{} test exited 0 but {} points at {now}",
                switch_name(closure),
                self.activator.paths.current_system.display()
            ),
            "",
        ))
    }

    /// `STATE_DIR/gcroots/deploying`: the closure from the copy until it is
    /// committed or rolled back.
    fn gc_root(&self) -> std::path::PathBuf {
        self.activator.journal.state_dir().join("gcroots/deploying")
    }

    /// Keeps the copied closure from a garbage collection until the end. A
    /// failure is only logged: the window it leaves open is small.
    /// Registers the closure as a GC root in the background: a garbage
    /// collection must not take it between the copy and the profile switch.
    pub(super) fn spawn_gc_root(&self) -> tokio::task::JoinHandle<()> {
        let link = self.gc_root();
        let nix = self.activator.nix.clone();
        let closure = self.closure.clone();
        tokio::spawn(async move {
            let added = match link.parent().map(std::fs::create_dir_all) {
                Some(Err(e)) => Err(e.to_string()),
                _ => nix
                    .add_root(&link, &closure)
                    .await
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = added {
                tracing::warn!(error = %e, "cannot register the closure as a GC root");
            }
        })
    }

    pub(super) fn remove_gc_root(&self) {
        match std::fs::remove_file(self.gc_root()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(error = %e, "cannot remove the GC root of the deployment");
            }
            _ => {}
        }
    }

    /// CONFIRMING: the control plane must confirm over a new connection
    /// before the profile moves; a refusal or silence rolls back.
    pub(super) async fn confirm(&self, timeout: Duration) -> Result<(), Failure> {
        let Some(confirmer) = self.activator.confirmer.clone() else {
            tracing::warn!("no way to confirm connectivity here; skipping CONFIRMING");
            return Ok(());
        };
        self.report(
            MachineState::Confirming,
            "asking the control plane to confirm over a new connection".into(),
        );
        let verdict = confirmer
            .confirm(&self.entry.deployment_id, &self.entry.closure, timeout)
            .await;
        let heard = match &verdict {
            Verdict::Confirmed => "confirmed".to_owned(),
            Verdict::Refused(reason) => format!("refused: {reason}"),
            Verdict::NoAnswer(last) => format!("no answer within {} s: {last}", timeout.as_secs()),
        };
        self.log(&format!("confirmation over a new connection: {heard}"), "");
        match verdict {
            Verdict::Confirmed => Ok(()),
            Verdict::Refused(reason) => Err(Failure::new(MachineState::Confirming, reason, "")),
            Verdict::NoAnswer(last) => {
                let previous = self
                    .previous
                    .as_ref()
                    .map_or_else(|| "the previous system".to_owned(), ToString::to_string);
                Err(Failure::new(
                    MachineState::Confirming,
                    format!(
                        "no confirmation from the control plane within {} s over a new connection: the new system may have cut this machine off; rolled back to {previous}",
                        timeout.as_secs()
                    ),
                    format!("last attempt: {last}"),
                ))
            }
        }
    }
}

impl Deployment<'_> {
    /// A finished `switch-to-configuration` as the phase's result, logged.
    pub(super) fn judge(
        &self,
        ended: Ended,
        command: &str,
        phase: MachineState,
    ) -> Result<(), Failure> {
        let how = match &ended.status {
            Ok(status) => status.describe(),
            Err(why) => why.clone(),
        };
        self.log(&format!("{command}: {how}"), &ended.output);
        judge(ended, command, phase)
    }
}

fn judge(ended: Ended, command: &str, phase: MachineState) -> Result<(), Failure> {
    match ended.status {
        Ok(status) if status.success() => {
            tracing::debug!(command, output = %ended.tail, "activated");
            Ok(())
        }
        Ok(status) => Err(Failure::new(
            phase,
            format!("{command} failed ({})", status.describe()),
            ended.tail,
        )),
        Err(why) => Err(Failure::new(phase, format!("{command}: {why}"), ended.tail)),
    }
}
