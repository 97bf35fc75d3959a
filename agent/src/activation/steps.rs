//! The commands one deployment runs, each turned into a [`Failure`] that
//! says which command failed and how.

use std::time::Instant;

use procurator_core::StorePath;
use procurator_proto::v1::MachineState;

use super::{Deployment, switch_name};
use crate::health::{Check, run_check};
use crate::outcome::Failure;
use crate::system::{Goal, Profile};

impl Deployment<'_> {
    /// `nix copy --from` each substituter in turn (the agent's own first)
    /// until one has the closure, signed by a key the agent trusts.
    pub(super) async fn copy(&self, extra_substituters: &[String]) -> Result<(), Failure> {
        let activator = self.activator;
        let closure = &self.closure;
        let mut substituters: Vec<&str> = Vec::new();
        for s in activator.substituters.iter().chain(extra_substituters) {
            if !substituters.contains(&s.as_str()) {
                substituters.push(s);
            }
        }
        if substituters.is_empty() {
            return Err(Failure::new(
                MachineState::Copying,
                format!(
                    "no substituter to copy {closure} from: start the agent with --substituter, or give the deployment substituters"
                ),
                "",
            ));
        }
        self.report(MachineState::Copying, format!("copying {closure}"));
        let mut errors = Vec::new();
        let mut tail = String::new();
        for substituter in substituters {
            let message = format!("copying {closure} from {substituter}");
            let mut last_sent: Option<Instant> = None;
            let copied = activator
                .nix
                .copy_from(substituter, closure, &activator.trusted_keys, |progress| {
                    let due = last_sent
                        .is_none_or(|at| at.elapsed() >= activator.settings.progress_interval);
                    if due {
                        last_sent = Some(Instant::now());
                        self.report_copy(MachineState::Copying, message.clone(), Some(progress));
                    }
                })
                .await;
            match copied {
                Ok(last) => {
                    self.report_copy(
                        MachineState::Copying,
                        format!("copied {closure} from {substituter}"),
                        Some(last),
                    );
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(substituter, error = %e, "copy failed");
                    errors.push(format!("{substituter}: {e}"));
                    tail = e.tail().to_owned();
                }
            }
        }
        let hint = if activator.trusted_keys.is_empty() {
            " (the agent trusts no signing key: set --trusted-public-key)"
        } else {
            ""
        };
        Err(Failure::new(
            MachineState::Copying,
            format!(
                "could not copy {closure} from any substituter{hint}: {}",
                errors.join("; ")
            ),
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
            run_check(check, self.activator.settings.tail_lines, |attempt, how| {
                self.report(
                    MachineState::Checking,
                    format!("health check {n}/{total}: attempt {attempt} failed ({how})"),
                );
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
        match profile
            .activate(goal, settings.switch_timeout, settings.tail_lines)
            .await
        {
            Ok(out) if out.success() => {
                tracing::debug!(closure = %profile.closure(), goal = goal.as_str(), output = %out.tail, "activated");
                Ok(())
            }
            Ok(out) => Err(Failure::new(
                phase,
                format!(
                    "{} {} failed ({})",
                    switch_name(profile.closure()),
                    goal.as_str(),
                    out.status
                ),
                out.tail,
            )),
            Err(e) => Err(Failure::new(phase, e.to_string(), e.tail())),
        }
    }

    /// `nix-env -p <system profile> --set <closure>`.
    pub(super) async fn set_profile(
        &self,
        closure: &StorePath,
        phase: MachineState,
    ) -> Result<(), Failure> {
        let profile = &self.activator.paths.profile;
        self.activator
            .nix
            .set_profile(profile, closure)
            .await
            .map_err(|e| Failure::new(phase, e.to_string(), e.tail()))
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
}
