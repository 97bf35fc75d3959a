//! The VM fixture (`fixtures/vm-fleet`): bare-metal test hosts whose agents
//! run VMs under real QEMU (TCG), guests that boot a real kernel, and ways to
//! see from outside what runs on a host: its QEMU processes, its taps, what
//! each guest said on its console.
//!
//! Each host lives in a network namespace of its own ([`FleetOptions::nat`]),
//! so the taps QEMU makes are the host's and go with it; and in a PID
//! namespace whose init is the agent's supervisor, so a killed agent leaves
//! its VMs running, as `KillMode=process` does on a real host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::fixture::Closures;
use crate::fleet::{Fleet, FleetOptions};
use crate::host::TestHost;

/// Debian's cloud kernel, unpacked by scripts/setup.sh.
pub const GUEST_KERNEL: &str = "/var/cache/procurator/test-kernel/vmlinuz";
/// busybox-static: the guests' whole userspace.
pub const GUEST_BUSYBOX: &str = "/bin/busybox";
/// What a guest prints once up (the agent's `vm::READY_PREFIX`).
pub const READY_PREFIX: &str = "procurator-ready ";
/// Every VM host runs QEMU (cloud-hypervisor needs hardware virtualisation)
/// and offers room for two of the fixture's VMs (1 vCPU, 256 MiB each), no
/// more.
pub const VM_HOST_ARGS: [&str; 7] = [
    "--vm-host",
    "--vmm",
    "qemu",
    "--vm-cpus",
    "2",
    "--vm-memory-mib",
    "640",
];

/// The VM fixture flake's source directory.
pub fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vm-fleet")
}

/// A fleet of the VM fixture: a test host for each of `hosts` (VM hosts,
/// their agents supervised and started with [`VM_HOST_ARGS`]) and of
/// `guests` (test hosts standing in for the inside of a VM with an agent of
/// its own, started plainly). Every agent is connected when it returns.
pub fn start(hosts: &[&str], guests: &[&str]) -> Result<Fleet> {
    for file in [GUEST_KERNEL, GUEST_BUSYBOX] {
        if !Path::new(file).is_file() {
            bail!(
                "{file} is missing: run scripts/setup.sh, which installs the VM test guests' parts"
            );
        }
    }
    let machines: Vec<String> = hosts.iter().chain(guests).map(|m| m.to_string()).collect();
    let mut fleet = Fleet::start_from(
        &source(),
        &machines,
        FleetOptions {
            initial_settings: serde_json::json!({ "generation": 1 }),
            agents: Vec::new(),
            nat: true,
            supervised: hosts.iter().map(|h| h.to_string()).collect(),
            flake_files: vec![
                (GUEST_KERNEL.into(), "guest/vmlinuz".into()),
                (GUEST_BUSYBOX.into(), "guest/busybox".into()),
            ],
            // Hosts and guests act only on what CI signed.
            signed: true,
        },
    )?;
    for host in hosts {
        // Only a certificate marked so may offer VM capacity.
        fleet
            .pki
            .issue_with(&fleet.nix, "agent", host, &["--vm-host", "--force"])?;
        fleet.start_agent_with(host, &VM_HOST_ARGS)?;
    }
    for guest in guests {
        fleet.start_agent(guest)?;
    }
    fleet.wait_connected(&machines)?;
    Ok(fleet)
}

/// Writes `settings` (which say with `present` which machines the blueprint
/// has), builds and publishes those machines' closures and writes their
/// deployment artifact.
pub fn prepare(fleet: &Fleet, settings: &Value) -> Result<(Closures, PathBuf)> {
    fleet.fixture.write_settings(settings)?;
    let present: Vec<String> = settings["present"]
        .as_array()
        .context("the VM tests' settings name the machines present")?
        .iter()
        .filter_map(|m| m.as_str().map(str::to_owned))
        .collect();
    let closures = fleet.fixture.build_machines(&fleet.nix, &present)?;
    fleet.publish(&closures)?;
    let (artifact, _) = crate::scenario::write_artifact(fleet, &closures, &serde_json::json!({}))?;
    Ok((closures, artifact))
}

/// Where the agent of `host` keeps the state of VM `instance`.
pub fn state_dir(host: &TestHost, instance: &str) -> PathBuf {
    host.dir().join("state/vms").join(instance)
}

/// The QEMU processes (pids as this machine sees them) running VM
/// `instance` of `host`, found by the state folder on their command line.
pub fn qemu_pids(host: &TestHost, instance: &str) -> Vec<i32> {
    qemu_pids_under(&state_dir(host, instance))
}

/// The one QEMU process of `instance` on `host`; fails on none or several.
pub fn qemu_pid(host: &TestHost, instance: &str) -> Result<i32> {
    match qemu_pids(host, instance).as_slice() {
        [pid] => Ok(*pid),
        pids => bail!(
            "{instance} on {}: expected one QEMU process, found {pids:?}",
            host.name()
        ),
    }
}

/// Every QEMU process started by `host`'s agent, whatever VM it runs.
pub fn all_qemu_pids(host: &TestHost) -> Vec<i32> {
    qemu_pids_under(&host.dir().join("state/vms"))
}

/// QEMU processes with a path under `dir` on their command line.
fn qemu_pids_under(dir: &Path) -> Vec<i32> {
    let marker = format!("{}/", dir.display());
    processes()
        .into_iter()
        .filter(|(_, args)| {
            args.first().is_some_and(|a| a.contains("qemu-system"))
                && args.iter().any(|a| a.contains(&marker))
        })
        .map(|(pid, _)| pid)
        .collect()
}

fn processes() -> Vec<(i32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, args))
        })
        .collect()
}

/// The tap devices in `host`'s network namespace (the agent names them
/// `pvm…`).
pub fn taps(host: &TestHost) -> Result<Vec<String>> {
    let netns = host
        .netns()
        .context("VM hosts live in a network namespace of their own")?;
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-o", "link", "show"])
        .output()
        .context("running ip link show")?;
    if !out.status.success() {
        bail!(
            "ip -n {netns} link show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name.starts_with("pvm"))
        .collect())
}

/// The closure guest `instance` last said it booted on its console.
pub fn reported_closure(host: &TestHost, instance: &str) -> Option<String> {
    let console = std::fs::read_to_string(state_dir(host, instance).join("console.log")).ok()?;
    console.lines().rev().find_map(|line| {
        let rest = &line[line.find(READY_PREFIX)? + READY_PREFIX.len()..];
        let closure = rest.split_whitespace().next()?;
        // Kernel messages can cut into the line; only a whole path counts.
        (closure.len() > "/nix/store/".len() + 33 && closure.starts_with("/nix/store/"))
            .then(|| closure.to_owned())
    })
}

/// Instance → host, as `ListAgents` says the control plane placed them.
pub fn placements(fleet: &Fleet) -> Result<BTreeMap<String, String>> {
    let mut placed = BTreeMap::new();
    for agent in fleet.agents()? {
        let host = agent["machine"].as_str().unwrap_or_default().to_owned();
        for vm in agent["vms"].as_array().into_iter().flatten() {
            if let Some(instance) = vm["instance"].as_str()
                && let Some(other) = placed.insert(instance.to_owned(), host.clone())
            {
                bail!("{instance} is placed on both {other} and {host}");
            }
        }
    }
    Ok(placed)
}
