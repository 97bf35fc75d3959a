//! Whether a committed closure is fully in effect only after a reboot, and
//! the reboot itself when the blueprint allows it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use procurator_core::nix::run_captured;
use tokio::process::Command;
use tokio::time::Instant;

use crate::outbox::Outbox;
use crate::outcome::Outcome;
use crate::system::resolve;

/// What `switch-to-configuration test` cannot change on a running system.
const BOOT_PARTS: [&str; 3] = ["kernel", "initrd", "kernel-modules"];
/// The reboot waits this long at most for the result to reach the control
/// plane; it is kept in `results.json` and sent after the boot otherwise.
const REPORT_WAIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(500);

/// "kernel, initrd" when those of `closure` differ from `booted`'s
/// (`readlink -f` of each; missing on both sides is equal), `None` when none do.
pub fn reboot_reason(closure: &Path, booted: &Path) -> Option<String> {
    let differ: Vec<&str> = BOOT_PARTS
        .into_iter()
        .filter(|part| resolve(&closure.join(part)) != resolve(&booted.join(part)))
        .collect();
    (!differ.is_empty()).then(|| differ.join(", "))
}

/// Reboots once `outcome` was delivered (or after [`REPORT_WAIT`]).
pub async fn reboot_after_report(outbox: Arc<Outbox>, outcome: Outcome) {
    let deadline = Instant::now() + REPORT_WAIT;
    while !outbox.is_delivered(&outcome) && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    tracing::warn!(deployment = %outcome.deployment_id, reason = %outcome.reboot_reason, "rebooting: the new closure needs it");
    let mut command = Command::new("systemctl");
    command.arg("reboot");
    match run_captured(command, Some(Duration::from_secs(60)), 20).await {
        Ok(out) if out.success() => {}
        Ok(out) => {
            tracing::error!(status = %out.status, output = %out.tail, "systemctl reboot failed")
        }
        Err(e) => tracing::error!(error = %e, "cannot run systemctl reboot"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Behaviour, Host};

    #[tokio::test]
    async fn kernel_initrd_and_modules_are_compared_with_the_booted_system() {
        let host = Host::new().await;
        let plain = host.system("plain", Behaviour::default()).await;
        let kernel_a = host
            .system(
                "kernel-a",
                Behaviour {
                    kernel: Some("a"),
                    ..Behaviour::default()
                },
            )
            .await;
        let kernel_a_again = host
            .system(
                "kernel-a-again",
                Behaviour {
                    kernel: Some("a"),
                    ..Behaviour::default()
                },
            )
            .await;
        let kernel_b = host
            .system(
                "kernel-b",
                Behaviour {
                    kernel: Some("b"),
                    ..Behaviour::default()
                },
            )
            .await;
        let path = |p: &procurator_core::StorePath| Path::new(p.as_str()).to_owned();
        // Missing on both sides: equal.
        assert_eq!(reboot_reason(&path(&plain), &path(&plain)), None);
        // The same kernel (the same store path) from two systems: equal.
        assert_eq!(
            reboot_reason(&path(&kernel_a_again), &path(&kernel_a)),
            None
        );
        assert_eq!(
            reboot_reason(&path(&kernel_b), &path(&kernel_a)).as_deref(),
            Some("kernel, initrd, kernel-modules")
        );
        // Missing on one side only: a difference.
        assert_eq!(
            reboot_reason(&path(&kernel_a), &path(&plain)).as_deref(),
            Some("kernel, initrd, kernel-modules")
        );
    }

    #[tokio::test]
    async fn a_succeeded_result_says_whether_a_reboot_is_needed() {
        use procurator_proto::v1::MachineState;
        let host = Host::new().await;
        let kernel = |k| Behaviour {
            kernel: Some(k),
            ..Behaviour::default()
        };
        let booted = host.system("booted", kernel("a")).await;
        let same_kernel = host.system("same-kernel", kernel("a")).await;
        let new_kernel = host.system("new-kernel", kernel("b")).await;
        host.run(&booted);
        std::os::unix::fs::symlink(booted.as_str(), &host.paths.booted_system).unwrap();
        let activator = host.activator();
        let (sink, _) = crate::testing::recorder();
        let desired = |closure: &procurator_core::StorePath| crate::desired::Desired {
            deployment_id: procurator_core::DeploymentId::parse("d-1").unwrap(),
            closure: closure.clone(),
            health_checks: Vec::new(),
            auto_rollback: true,
            confirm_timeout: Duration::ZERO,
            allow_reboot: true,
        };
        let outcome = activator.run(&desired(&same_kernel), &sink).await;
        assert_eq!(
            (outcome.state, outcome.reboot_required),
            (MachineState::Succeeded, false)
        );
        let outcome = activator.run(&desired(&new_kernel), &sink).await;
        assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
        assert!(outcome.reboot_required);
        assert_eq!(outcome.reboot_reason, "kernel, initrd, kernel-modules");
        let proto = outcome.to_proto();
        assert!(proto.reboot_required);
        assert_eq!(proto.reboot_reason, "kernel, initrd, kernel-modules");
    }
}
