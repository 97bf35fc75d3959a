//! VM hosts: an agent started with `--vm-host` runs the VM instances the
//! control plane places on its machine, one VMM process per VM, behind
//! [`Vmm`]: cloud-hypervisor (`--vmm cloud-hypervisor`, the default for
//! production, with one virtiofsd per VM) or QEMU (`--vmm qemu`, with KVM
//! where the CPU has it, TCG elsewhere, so the whole path also runs on
//! machines without hardware virtualisation).
//!
//! A VM boots straight from its system closure: the closure's `kernel` and
//! `initrd`, `init=<closure>/init` and the closure's `kernel-params` on the
//! command line, the host's `/nix/store` shared read-only, a tap device, and
//! the serial console written to a log file. Everything a VM leaves behind
//! lives in its state folder, so removing a VM is removing that folder (and
//! its tap).

pub mod cloud_hypervisor;
pub mod host;
#[cfg(test)]
mod openapi;
pub mod qemu;
pub mod runner;

use std::path::{Path, PathBuf};

use std::time::Duration;

use nix::unistd::Pid;
use procurator_core::MachineName;
use procurator_core::artifact::Demand;
use procurator_core::store_path::StorePath;

/// The tag the guest mounts the host's store by.
pub const STORE_TAG: &str = "nix-store";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("the closure {closure} has no {file}: is it a NixOS system closure?")]
    NotASystem { closure: String, file: &'static str },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}; is it installed and on PATH?")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{vmm} {request}: {message}")]
    Api {
        vmm: &'static str,
        request: String,
        message: String,
    },
    #[error("{vmm} did not {what} within {secs} s; see {log}")]
    Timeout {
        vmm: &'static str,
        what: &'static str,
        secs: u64,
        log: PathBuf,
    },
    #[error("cannot prepare {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM {name} stopped before it reported ready; see {log}")]
    Exited { name: String, log: PathBuf },
    #[error("the guest {name} reset before it reported ready ({why}); see {log}")]
    Reset {
        name: String,
        why: String,
        log: PathBuf,
    },
    #[error("the guest {name} came up unhealthy: {why} (see {log})")]
    Unhealthy {
        name: String,
        why: String,
        log: PathBuf,
    },
    #[error("the guest {name} reported booting {reported}, not {expected}")]
    WrongClosure {
        name: String,
        reported: String,
        expected: String,
    },
}

/// One VM per process, started, found again and stopped by the VM's spec.
pub trait Vmm: Send + Sync {
    /// Boot `spec`; returns once the VMM runs it in the background.
    fn start(&self, spec: &VmSpec) -> impl Future<Output = Result<Pid, VmError>> + Send;
    /// The process running the VM whose state folder is `state_dir`, if
    /// any (after an agent restart too).
    fn pid(&self, state_dir: &Path) -> impl Future<Output = Option<Pid>> + Send;
    /// Power that VM off, forcefully after `grace`; Ok once nothing runs.
    fn stop(
        &self,
        state_dir: &Path,
        grace: Duration,
    ) -> impl Future<Output = Result<(), VmError>> + Send;
    /// How often the guest of the VM in `state_dir` has reset (rebooted, or
    /// panicked with `panic=N`) since it was started, and what said so last.
    /// A VMM whose process ends on a reset (QEMU with `-no-reboot`) reports
    /// none: its exit says it.
    fn resets(&self, state_dir: &Path) -> impl Future<Output = Resets> + Send {
        let _ = state_dir;
        async { Resets::default() }
    }
}

/// A guest's resets since its VM started (see [`Vmm::resets`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resets {
    pub count: u32,
    /// What said so, the last time.
    pub last: Option<String>,
}

/// `ip link set dev TAP master BRIDGE up` under `prefix`: the VMM makes
/// the VM's tap (QEMU leaves it down, cloud-hypervisor brings it up at
/// `vm.boot`), but neither joins it to a bridge.
pub(crate) async fn join_bridge(
    vmm: &'static str,
    prefix: &[String],
    spec: &VmSpec,
    bridge: &str,
) -> Result<(), VmError> {
    let Some(nic) = &spec.nic else {
        return Ok(());
    };
    let mut args = prefix
        .iter()
        .cloned()
        .chain(["ip", "link", "set", "dev", &nic.tap, "master", bridge, "up"].map(str::to_owned));
    let program = args.next().unwrap_or_default();
    let output = tokio::process::Command::new(&program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| VmError::Spawn { program, source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(VmError::Api {
            vmm,
            request: format!("attaching {} to {bridge}", nic.tap),
            message: format!(
                "ip exited with {}: {}; does the bridge {bridge} exist?",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// The line a guest prints on its serial console once it is up:
/// `procurator-ready <the closure it booted>`.
pub const READY_PREFIX: &str = "procurator-ready ";
/// The line a guest prints instead when it came up unhealthy (e.g. with a
/// failed unit): `procurator-unhealthy <the closure it booted> <why>`.
pub const UNHEALTHY_PREFIX: &str = "procurator-unhealthy ";

/// Waits until the guest's console log says it booted `spec.closure`.
pub async fn wait_ready(spec: &VmSpec, timeout: std::time::Duration) -> Result<(), VmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let log = tokio::fs::read_to_string(spec.serial_log())
            .await
            .unwrap_or_default();
        match readiness(&log, spec.closure.as_str()) {
            Readiness::Ready => return Ok(()),
            Readiness::Unhealthy(why) => {
                return Err(VmError::Unhealthy {
                    name: spec.name.to_string(),
                    why,
                    log: spec.serial_log(),
                });
            }
            Readiness::Other(reported) => {
                return Err(VmError::WrongClosure {
                    name: spec.name.to_string(),
                    reported,
                    expected: spec.closure.to_string(),
                });
            }
            Readiness::NotYet => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VmError::Timeout {
                vmm: "the guest",
                what: "report that it is ready",
                secs: timeout.as_secs(),
                log: spec.serial_log(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    Ready,
    /// The guest booted the closure and says it is not healthy, and why.
    Unhealthy(String),
    /// A clean readiness line naming another closure.
    Other(String),
    NotYet,
}

/// What a console log says. The kernel writes to the same console, so a
/// readiness line may be cut into by its messages: a line naming the
/// expected closure counts wherever it stands; one naming another closure
/// counts only when nothing else is on the line (a cut one could be a
/// truncated path). Guests repeat the line, so a cut one is followed by a
/// clean one. Only whole lines count: the log is read while the guest
/// writes it, and its last line may be half there.
fn readiness(log: &str, expected: &str) -> Readiness {
    let whole = log.rfind('\n').map_or("", |end| &log[..=end]);
    let mut other = None;
    for line in whole.lines() {
        if let Some(at) = line.find(UNHEALTHY_PREFIX)
            && let Some(why) = line[at + UNHEALTHY_PREFIX.len()..].strip_prefix(expected)
        {
            let why = why.trim();
            return Readiness::Unhealthy(if why.is_empty() {
                "no reason given".to_owned()
            } else {
                why.to_owned()
            });
        }
        let Some(at) = line.find(READY_PREFIX) else {
            continue;
        };
        let rest = &line[at + READY_PREFIX.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "/+-._?=".contains(c)))
            .unwrap_or(rest.len());
        let (path, after) = rest.split_at(end);
        if path == expected {
            return Readiness::Ready;
        }
        if after.trim().is_empty() && at == 0 {
            other = Some(path.to_owned());
        }
    }
    other.map_or(Readiness::NotYet, Readiness::Other)
}

/// A VM's network card, attached to a tap device on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub tap: String,
    pub mac: String,
}

/// Everything needed to boot one VM instance from a closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub name: MachineName,
    pub closure: StorePath,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Its network card; every VM a host runs has one.
    pub nic: Option<Nic>,
    /// Where its sockets, pid files and console log live.
    pub state_dir: PathBuf,
}

impl VmSpec {
    /// The spec of instance `name` running `closure`, which must be a NixOS
    /// system closure (it has `kernel`, `initrd`, `init`). Its files are
    /// read at `root`: the closure's own path, unless the host's store lives
    /// under another root.
    pub fn new(
        name: MachineName,
        closure: StorePath,
        root: &Path,
        demand: Demand,
        state_root: &Path,
    ) -> Result<Self, VmError> {
        for file in ["kernel", "initrd", "init"] {
            if !root.join(file).exists() {
                return Err(VmError::NotASystem {
                    closure: closure.to_string(),
                    file,
                });
            }
        }
        let params_path = root.join("kernel-params");
        let params = match std::fs::read_to_string(&params_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(VmError::Read {
                    path: params_path,
                    source,
                });
            }
        };
        Ok(Self {
            kernel: root.join("kernel"),
            initrd: root.join("initrd"),
            cmdline: cmdline(&closure, &params),
            // At least one vCPU; a fraction of a CPU is a host scheduling
            // share, not a smaller CPU.
            vcpus: u32::try_from(demand.milli_cpus.div_ceil(1000).max(1)).unwrap_or(u32::MAX),
            // Rounded again: a statement signed before the rule, or by another
            // tool, must not give a size the VMM refuses to boot.
            memory_bytes: procurator_core::artifact::vm_memory_bytes(demand.memory_bytes),
            nic: Some(Nic {
                tap: tap_name(&name),
                mac: mac_address(&name),
            }),
            state_dir: state_root.join(name.as_str()),
            name,
            closure,
        })
    }

    /// Why moving to `other` needs the VM restarted, if it does: the
    /// guest's own agent can switch anything else in place.
    pub fn restart_reason(&self, other: &VmSpec) -> Option<&'static str> {
        let (old, new) = (kernel_identity(self), kernel_identity(other));
        if old.0 != new.0 {
            Some("its kernel changed")
        } else if old.1 != new.1 {
            Some("its initrd changed")
        } else if old.2 != new.2 {
            Some("its kernel command line changed")
        } else if self.vcpus != other.vcpus || self.memory_bytes != other.memory_bytes {
            Some("its vCPUs or memory changed")
        } else {
            None
        }
    }

    pub fn serial_log(&self) -> PathBuf {
        self.state_dir.join("console.log")
    }
}

/// What a restart is needed for: the kernel, the initrd and the command
/// line except the closure's own path in `init=` (which changes with every
/// closure and is switched in place by the guest's agent).
fn kernel_identity(spec: &VmSpec) -> (PathBuf, PathBuf, String) {
    let kernel = std::fs::canonicalize(&spec.kernel).unwrap_or_else(|_| spec.kernel.clone());
    let initrd = std::fs::canonicalize(&spec.initrd).unwrap_or_else(|_| spec.initrd.clone());
    let params = spec
        .cmdline
        .split_whitespace()
        .filter(|p| !p.starts_with("init=") && !p.starts_with("procurator.closure="))
        .collect::<Vec<_>>()
        .join(" ");
    (kernel, initrd, params)
}

/// The kernel command line: the closure's own parameters, the serial
/// console, and the closure's `init`. `procurator.closure=` tells the guest
/// what it booted, for its readiness report.
pub(crate) fn cmdline(closure: &StorePath, params: &str) -> String {
    let mut words: Vec<String> = params.split_whitespace().map(str::to_owned).collect();
    if !words.iter().any(|w| w.starts_with("console=")) {
        words.push("console=ttyS0".into());
    }
    words.push(format!("init={closure}/init"));
    words.push(format!("procurator.closure={closure}"));
    words.join(" ")
}

/// A tap name of at most 15 bytes (IFNAMSIZ - 1), stable for the instance.
pub fn tap_name(name: &MachineName) -> String {
    format!("pvm{:012x}", fnv1a(name.as_str()) & 0xffff_ffff_ffff)
}

/// A locally administered unicast MAC, stable for the instance.
pub fn mac_address(name: &MachineName) -> String {
    let h = fnv1a(name.as_str()).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[3], h[4], h[5], h[6], h[7]
    )
}

/// FNV-1a: stable across releases and platforms, unlike std's hasher.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn spec() -> VmSpec {
        let closure =
            StorePath::parse("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-0")
                .unwrap();
        VmSpec {
            name: MachineName::parse("web-0").unwrap(),
            kernel: PathBuf::from(format!("{closure}/kernel")),
            initrd: PathBuf::from(format!("{closure}/initrd")),
            cmdline: cmdline(&closure, "loglevel=4 console=ttyS0"),
            closure,
            vcpus: 2,
            memory_bytes: 512 << 20,
            nic: Some(Nic {
                tap: "pvm0123456789ab".into(),
                mac: "02:00:00:00:00:01".into(),
            }),
            state_dir: PathBuf::from("/var/lib/procurator/vms/web-0"),
        }
    }

    #[test]
    fn the_command_line_boots_the_closure_and_names_it() {
        let s = spec();
        assert_eq!(
            s.cmdline,
            format!(
                "loglevel=4 console=ttyS0 init={0}/init procurator.closure={0}",
                s.closure
            )
        );
        let closure = s.closure.clone();
        assert!(cmdline(&closure, "").starts_with("console=ttyS0 init="));
    }

    #[test]
    fn a_spec_is_read_from_a_system_closure() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("system");
        std::fs::create_dir(&system).unwrap();
        let closure = spec().closure;
        let demand = Demand {
            milli_cpus: 1500,
            memory_bytes: 1 << 30,
        };
        let name = MachineName::parse("db").unwrap();
        let state = dir.path().join("vms");
        let missing = VmSpec::new(name.clone(), closure.clone(), &system, demand, &state);
        let error = missing.unwrap_err().to_string();
        assert!(error.contains("has no kernel"), "{error}");

        for file in ["kernel", "initrd", "init"] {
            std::fs::write(system.join(file), "").unwrap();
        }
        std::fs::write(system.join("kernel-params"), "loglevel=4 quiet\n").unwrap();
        let s = VmSpec::new(name, closure.clone(), &system, demand, &state).unwrap();
        assert_eq!(s.kernel, system.join("kernel"));
        assert_eq!(s.vcpus, 2, "1.5 CPUs is 2 vCPUs");
        assert_eq!(s.memory_bytes, 1 << 30);
        assert_eq!(s.state_dir, state.join("db"));
        assert_eq!(s.serial_log(), state.join("db/console.log"));
        assert!(
            s.cmdline
                .starts_with("loglevel=4 quiet console=ttyS0 init="),
            "{}",
            s.cmdline
        );
    }

    #[tokio::test]
    async fn readiness_is_the_console_line_naming_the_booted_closure() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.state_dir = dir.path().to_owned();
        let short = std::time::Duration::from_millis(300);
        let silent = wait_ready(&s, short).await.unwrap_err().to_string();
        assert!(
            silent.contains("did not report that it is ready"),
            "{silent}"
        );

        std::fs::write(
            s.serial_log(),
            "Linux version 6.1\nprocurator-ready /nix/store/1123456789abcdfghijklmnpqrsvwxyz-old\n",
        )
        .unwrap();
        let wrong = wait_ready(&s, short).await.unwrap_err().to_string();
        assert!(
            wrong.contains("reported booting /nix/store/1123"),
            "{wrong}"
        );

        let ready = format!("boot noise\n{READY_PREFIX}{}\r\n", s.closure);
        std::fs::write(s.serial_log(), ready).unwrap();
        wait_ready(&s, short).await.unwrap();
    }

    #[test]
    fn a_readiness_line_cut_into_by_the_kernel_still_counts_when_it_names_the_closure() {
        let expected = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-b";
        let cut = format!("{READY_PREFIX}{expected}[    2.392159] tsc: Refined TSC clocksource\n");
        assert_eq!(readiness(&cut, expected), Readiness::Ready);
        let inside = format!("[    1.0] random: crng init done{READY_PREFIX}{expected}\n");
        assert_eq!(readiness(&inside, expected), Readiness::Ready);
        // A path cut short is no verdict; a clean line naming another is.
        let truncated = format!(
            "{READY_PREFIX}/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-sys[ 2.1] x\n"
        );
        assert_eq!(readiness(&truncated, expected), Readiness::NotYet);
        let other = "/nix/store/1123456789abcdfghijklmnpqrsvwxyz-nixos-system-a";
        let clean = format!("{READY_PREFIX}{other}\r\n");
        assert_eq!(
            readiness(&clean, expected),
            Readiness::Other(other.to_owned())
        );
        assert_eq!(readiness("booting\n", expected), Readiness::NotYet);
        // The log is read while the guest writes it: a last line without
        // its newline may be a path half written, and waits.
        let half = format!("booting\n{READY_PREFIX}/nix/store/1123456789abcd");
        assert_eq!(readiness(&half, expected), Readiness::NotYet);
        assert_eq!(
            readiness(
                &format!("{half}fghijklmnpqrsvwxyz-nixos-system-a\n"),
                expected
            ),
            Readiness::Other("/nix/store/1123456789abcdfghijklmnpqrsvwxyz-nixos-system-a".into())
        );
        // A guest that came up with a failed unit says so, and why.
        let unhealthy = format!(
            "{UNHEALTHY_PREFIX}{expected} degraded: nginx.service failed\r\n{READY_PREFIX}{other}\n"
        );
        assert_eq!(
            readiness(&unhealthy, expected),
            Readiness::Unhealthy("degraded: nginx.service failed".into())
        );
        // ... only about the closure it was asked to boot.
        let stale = format!("{UNHEALTHY_PREFIX}{other} degraded\n{READY_PREFIX}{expected}\n");
        assert_eq!(readiness(&stale, expected), Readiness::Ready);
    }

    #[test]
    fn taps_and_macs_are_stable_short_and_distinct() {
        let a = MachineName::parse("web-0").unwrap();
        let b = MachineName::parse("web-1").unwrap();
        assert_eq!(tap_name(&a), tap_name(&a));
        assert_ne!(tap_name(&a), tap_name(&b));
        assert!(tap_name(&a).len() <= 15, "{}", tap_name(&a));
        assert_ne!(mac_address(&a), mac_address(&b));
        let first = u8::from_str_radix(&mac_address(&a)[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10, "locally administered, unicast");
    }

    #[test]
    fn only_kernel_initrd_parameters_and_size_changes_need_a_restart() {
        let old = spec();
        let mut userspace_only = old.clone();
        let other =
            StorePath::parse("/nix/store/1123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-0")
                .unwrap();
        userspace_only.cmdline = cmdline(&other, "loglevel=4 console=ttyS0");
        userspace_only.closure = other;
        assert_eq!(old.restart_reason(&userspace_only), None);

        let mut new_kernel = old.clone();
        new_kernel.kernel =
            PathBuf::from("/nix/store/2123456789abcdfghijklmnpqrsvwxyz-linux/bzImage");
        assert_eq!(old.restart_reason(&new_kernel), Some("its kernel changed"));

        let mut new_params = old.clone();
        new_params.cmdline = cmdline(&old.closure, "loglevel=7 console=ttyS0");
        assert_eq!(
            old.restart_reason(&new_params),
            Some("its kernel command line changed")
        );

        let mut bigger = old.clone();
        bigger.memory_bytes *= 2;
        assert_eq!(
            old.restart_reason(&bigger),
            Some("its vCPUs or memory changed")
        );
    }
}
