//! `procurator-agent`: dials out to the control plane, pulls and activates
//! the closure this machine should run, rolls back on failure.

// A test that cannot set up should panic.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod activation;
mod config;
mod confirm;
mod connection;
mod credentials;
mod deployer;
mod desired;
mod detached;
mod health;
mod intent;
mod journal;
mod logbook;
mod outbox;
mod outcome;
mod reboot;
mod system;
#[cfg(test)]
mod testing;
mod vm;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use procurator_core::nix::Nix;
use procurator_proto::v1::{MachineState, VmAssignments, agent_message};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::activation::{Activator, Detached, Launcher, ProgressSink, Settings};
use crate::config::{Cli, Config, Credentials, VmmKind};
use crate::confirm::GrpcConfirmer;
use crate::connection::Dialer;
use crate::deployer::{Activity, Deployer};
use crate::intent::IntentPolicy;
use crate::journal::Journal;
use crate::outbox::Outbox;
use crate::system::SystemPaths;

/// Desired states waiting for the deployer; it takes them at once.
const INBOX_CAPACITY: usize = 16;
/// VM results waiting for the stream; a reconnect makes the host send them
/// again (its next set is reconciled and reported), so none is precious.
const VM_RESULTS_CAPACITY: usize = 256;

fn main() -> ExitCode {
    // The hidden activation runner: no configuration, no runtime, no logging
    // setup; it must work whatever state the agent's configuration is in.
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|first| first == detached::MODE) {
        return detached::main(argv);
    }
    let cli = Cli::parse();
    procurator_core::telemetry::init(cli.log_format, "info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// `context: error: cause`, leaving out causes their error already quotes.
fn report(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_cli(cli).context("the agent's configuration is not usable")?;
    if config.trusted_public_keys.is_empty() {
        tracing::warn!("no --trusted-public-key: no closure can be copied to this machine");
    }
    let intents = Arc::new(
        IntentPolicy::load(config.intent_public_keys.clone(), &config.state_dir)
            .context("the agent's record of accepted intents is not usable")?,
    );
    if intents.enforced() {
        tracing::info!(
            keys = %config.intent_public_keys.iter().map(|k| k.name()).collect::<Vec<_>>().join(" "),
            "acting only on deployments signed with these intent keys"
        );
    } else {
        tracing::warn!(
            "no --intent-public-key: this agent trusts the control plane for what it runs (health checks run as root); give it the public half of CI's intent key"
        );
    }
    let cancel = CancellationToken::new();
    watch_signals(cancel.clone())?;
    let material = match config.credentials {
        Credentials::Ready(ref material) => material.clone(),
        Credentials::Enroll {
            ref machine,
            ref token,
        } => {
            tracing::info!(machine = %machine, control_plane = %config.control_planes, "enrolling with the join token {}", token.path.display());
            credentials::enroll(
                &config.tls,
                &config.control_planes,
                machine,
                token,
                config.max_backoff,
                &cancel,
            )
            .await?;
            config
                .tls
                .load()
                .context("the certificate just installed cannot be loaded")?
        }
    };
    // Its first look, at once, says if the certificate expired or soon will.
    tokio::spawn(
        credentials::renewal::Renewer {
            files: config.tls.clone(),
            control_planes: config.control_planes.clone(),
            keepalive: config.keepalive,
        }
        .run(cancel.clone()),
    );

    let nix = Nix::new();
    let paths = SystemPaths::new(config.system_profile.clone());
    let outbox = Arc::new(Outbox::load(&config.state_dir));
    // systemd as PID 1 runs activations in transient units and can reboot.
    let systemd = std::path::Path::new("/run/systemd/system").exists();
    let activity = Arc::new(Activity::default());
    let endpoints = Arc::new(procurator_core::tls::EndpointCache::default());
    let activator = Arc::new(Activator {
        nix: nix.clone(),
        paths: paths.clone(),
        substituters: config.substituters.clone(),
        trusted_keys: config.trusted_public_keys.clone(),
        journal: Journal::new(&config.state_dir),
        settings: Settings {
            can_reboot: systemd,
            launcher: Launcher::Detached(Detached {
                exe: std::env::current_exe()
                    .context("cannot find the agent's own executable to run activations")?,
                systemd,
                dir: config.state_dir.join("activations"),
            }),
            ..Settings::default()
        },
        confirmer: Some(Arc::new(GrpcConfirmer {
            control_planes: config.control_planes.clone(),
            tls: config.tls.clone(),
            keepalive: config.keepalive,
            endpoints: endpoints.clone(),
        })),
    });
    tracing::info!(
        identity = %material.identity,
        control_plane = %config.control_planes,
        current_system = %paths.current_system().unwrap_or_default(),
        "starting"
    );

    // A deployment the last run did not finish is finished (or undone) first.
    let sink: ProgressSink = Arc::new({
        let outbox = outbox.clone();
        move |progress| outbox.progress(progress)
    });
    let allow_reboot = activator
        .journal
        .read()
        .ok()
        .flatten()
        .is_some_and(|entry| entry.plan.allow_reboot);
    if let Some(outcome) = activator.recover(&sink).await {
        tracing::info!(deployment = %outcome.deployment_id, state = %outcome.state, "recovered");
        let reboot = outcome.state == MachineState::Succeeded
            && outcome.reboot_required
            && allow_reboot
            && systemd;
        outbox.record(outcome.clone());
        if reboot {
            tokio::spawn(reboot::reboot_after_report(outbox.clone(), outcome));
        }
    }

    let (desired_tx, desired_rx) = tokio::sync::mpsc::channel(INBOX_CAPACITY);
    let deployer = Deployer {
        activator,
        outbox: outbox.clone(),
        activity: activity.clone(),
        intents: intents.clone(),
        machine: material.identity.name.clone(),
    };
    let deployer = tokio::spawn(deployer.run(desired_rx, cancel.clone()));
    // A VM host runs the VMs it is assigned; they outlive the agent, which
    // adopts them again from its journal when it restarts.
    let (vm_assignments, vm_results) = config
        .vm_host
        .as_ref()
        .map(|_| start_vm_host(&config, &nix, &intents, &cancel))
        .unzip();
    let working = activity.clone();
    let dialer = Dialer {
        control_planes: config.control_planes.clone(),
        tls: config.tls.clone(),
        material,
        keepalive: config.keepalive,
        endpoints,
        max_backoff: config.max_backoff,
        outbox,
        desired: desired_tx,
        paths,
        nix,
        vm_host: config.vm_host.clone(),
        vm_assignments,
        vm_results,
    };
    dialer.run(cancel.clone()).await;
    if working.active_deployment().is_some() {
        tracing::info!("waiting for the running activation to finish (signal again to stop now)");
    }
    deployer
        .await
        .context("the deployer stopped unexpectedly")?;
    tracing::info!("stopped");
    Ok(())
}

type VmResults = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<agent_message::Kind>>>;

/// Starts the VM runner of a VM host, on the VMM `--vmm` names: where the
/// control plane's assignments go, and where the host's results come from.
fn start_vm_host(
    config: &Config,
    nix: &Nix,
    intents: &Arc<IntentPolicy>,
    cancel: &CancellationToken,
) -> (tokio::sync::watch::Sender<Option<VmAssignments>>, VmResults) {
    let bridge = config.vm_bridge.clone();
    match config.vmm {
        VmmKind::Qemu => spawn_vm_runner(
            vm::qemu::Qemu {
                bridge,
                ..vm::qemu::Qemu::new(vm::qemu::Accel::detect())
            },
            config,
            nix,
            intents,
            cancel,
        ),
        VmmKind::CloudHypervisor => spawn_vm_runner(
            vm::cloud_hypervisor::CloudHypervisor {
                bridge,
                ..vm::cloud_hypervisor::CloudHypervisor::new()
            },
            config,
            nix,
            intents,
            cancel,
        ),
    }
}

fn spawn_vm_runner<V: vm::Vmm + 'static>(
    vmm: V,
    config: &Config,
    nix: &Nix,
    intents: &Arc<IntentPolicy>,
    cancel: &CancellationToken,
) -> (tokio::sync::watch::Sender<Option<VmAssignments>>, VmResults) {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let (results_tx, results_rx) = tokio::sync::mpsc::channel(VM_RESULTS_CAPACITY);
    let mut host = vm::host::VmHost::new(vmm, config.state_dir.join("vms"), "/".into());
    host.ready_timeout = config.vm_ready_timeout;
    let runner = vm::runner::Runner {
        host,
        nix: nix.clone(),
        substituters: config.substituters.clone(),
        trusted_public_keys: config.trusted_public_keys.clone(),
        intents: intents.clone(),
        results: Some(results_tx),
        outcomes: None,
        gc_roots: true,
    };
    tokio::spawn(runner.run(rx, cancel.clone()));
    (tx, Arc::new(tokio::sync::Mutex::new(results_rx)))
}

/// The first SIGTERM/SIGINT stops gracefully; a second one exits at once.
fn watch_signals(cancel: CancellationToken) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::info!("stopping");
                cancel.cancel();
            } else {
                tracing::warn!(
                    "stopping now; the journal finishes any deployment at the next start"
                );
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
