//! QEMU: the same lifecycle as cloud-hypervisor for hosts without hardware
//! virtualisation (TCG) and for these test machines. One daemonized
//! `qemu-system-x86_64` per VM with a pid file and a QMP socket in the VM's
//! state folder, so a restarted agent finds it again. The host store is
//! shared over virtio-9p, built into QEMU, so no file-sharing daemon runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

use super::{STORE_TAG, VmError, VmSpec, Vmm};

const VMM: &str = "qemu";
/// QEMU daemonizes once the VM is set up; it writes its pid file first.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After `quit` or SIGKILL, how long the process may take to go.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation: slow, but it runs anywhere.
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` opens and the CPU has vmx or svm; TCG otherwise.
    pub fn detect() -> Self {
        let cpu_has_it = std::fs::read_to_string("/proc/cpuinfo")
            .map(|info| {
                info.split_whitespace()
                    .any(|flag| flag == "vmx" || flag == "svm")
            })
            .unwrap_or(false);
        let opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if cpu_has_it && opens {
            Self::Kvm
        } else {
            Self::Tcg
        }
    }
}

pub fn qmp_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("qmp.sock")
}

pub fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("qemu.pid")
}

/// Runs each VM in its own daemonized QEMU.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub program: PathBuf,
    pub accel: Accel,
    /// A command QEMU (and `ip`, for the bridge) runs under, e.g. `ip
    /// netns exec NS` so that taps live in another network namespace (the
    /// tests do).
    pub prefix: Vec<String>,
    /// The bridge every VM's tap joins, brought up, when set.
    pub bridge: Option<String>,
}

impl Qemu {
    pub fn new(accel: Accel) -> Self {
        Self {
            program: PathBuf::from("qemu-system-x86_64"),
            accel,
            prefix: Vec::new(),
            bridge: None,
        }
    }

    /// QMP `query-status`: e.g. `running`, `paused`, `shutdown`.
    #[cfg(test)]
    pub async fn status(&self, spec: &VmSpec) -> Result<String, VmError> {
        let mut qmp = Qmp::connect(&qmp_socket(&spec.state_dir)).await?;
        let reply = qmp.execute("query-status").await?;
        Ok(reply["status"].as_str().unwrap_or_default().to_owned())
    }
}

impl Vmm for Qemu {
    /// A fresh console log and sockets in its state folder, then QEMU,
    /// which returns once the VM runs in the background.
    async fn start(&self, spec: &VmSpec) -> Result<Pid, VmError> {
        let state = |path: &Path, source| VmError::State {
            path: path.to_owned(),
            source,
        };
        tokio::fs::create_dir_all(&spec.state_dir)
            .await
            .map_err(|e| state(&spec.state_dir, e))?;
        for stale in [
            qmp_socket(&spec.state_dir),
            pid_file(&spec.state_dir),
            spec.serial_log(),
        ] {
            match tokio::fs::remove_file(&stale).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(state(&stale, e)),
            }
        }
        let mut args = argv(spec, self.accel);
        args[0] = self.program.display().to_string();
        let mut args = self.prefix.iter().cloned().chain(args);
        let program = args.next().unwrap_or_default();
        let launched = tokio::process::Command::new(&program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output();
        let output = tokio::time::timeout(START_TIMEOUT, launched)
            .await
            .map_err(|_| VmError::Timeout {
                vmm: VMM,
                what: "start the VM",
                secs: START_TIMEOUT.as_secs(),
                log: spec.serial_log(),
            })?
            .map_err(|source| VmError::Spawn { program, source })?;
        if !output.status.success() {
            return Err(VmError::Api {
                vmm: VMM,
                request: "start".into(),
                message: format!(
                    "{} exited with {}: {}",
                    self.program.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        let pid = self
            .pid(&spec.state_dir)
            .await
            .ok_or_else(|| VmError::Api {
                vmm: VMM,
                request: "start".into(),
                message: format!(
                    "QEMU started but {} names no running QEMU of this VM",
                    pid_file(&spec.state_dir).display()
                ),
            })?;
        if let Some(bridge) = &self.bridge {
            super::join_bridge(VMM, &self.prefix, spec, bridge).await?;
        }
        Ok(pid)
    }

    /// Its pid file names a live process whose command line has this VM's
    /// pid file (a reused pid does not).
    async fn pid(&self, state_dir: &Path) -> Option<Pid> {
        let text = tokio::fs::read_to_string(pid_file(state_dir)).await.ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
        let ours = pid_file(state_dir).display().to_string();
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == ours.as_bytes())
            .then_some(Pid::from_raw(pid))
    }

    /// The ACPI power button, then after `grace` QMP `quit`, then SIGKILL.
    async fn stop(&self, state_dir: &Path, grace: Duration) -> Result<(), VmError> {
        let Some(pid) = self.pid(state_dir).await else {
            return Ok(());
        };
        if let Ok(mut qmp) = Qmp::connect(&qmp_socket(state_dir)).await {
            let _ = qmp.execute("system_powerdown").await;
            if exited(pid, grace).await {
                return Ok(());
            }
            let _ = qmp.execute("quit").await;
        }
        if exited(pid, EXIT_TIMEOUT).await {
            return Ok(());
        }
        let _ = kill(pid, Signal::SIGKILL);
        if exited(pid, EXIT_TIMEOUT).await {
            Ok(())
        } else {
            Err(VmError::Timeout {
                vmm: VMM,
                what: "exit after SIGKILL",
                secs: EXIT_TIMEOUT.as_secs(),
                log: state_dir.join("console.log"),
            })
        }
    }
}

/// Polls until `pid` is gone, for at most `timeout`.
async fn exited(pid: Pid, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Signal 0 checks existence; a zombie of ours does not linger,
        // since QEMU daemonized away from us.
        if kill(pid, None).is_err() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A QMP session: newline-delimited JSON on the VM's QMP socket.
struct Qmp {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    writer: tokio::net::unix::OwnedWriteHalf,
    socket: PathBuf,
}

impl Qmp {
    async fn connect(socket: &Path) -> Result<Self, VmError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| VmError::Api {
                vmm: VMM,
                request: "QMP connect".into(),
                message: format!("{}: {e}", socket.display()),
            })?;
        let (read, writer) = stream.into_split();
        let mut qmp = Self {
            lines: BufReader::new(read).lines(),
            writer,
            socket: socket.to_owned(),
        };
        // The greeting, then capabilities negotiation.
        qmp.next_message().await?;
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    async fn execute(&mut self, command: &str) -> Result<Value, VmError> {
        let error = |message: String| VmError::Api {
            vmm: VMM,
            request: format!("QMP {command}"),
            message,
        };
        let mut line = json!({ "execute": command }).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| error(format!("cannot send on {}: {e}", self.socket.display())))?;
        loop {
            let message = self.next_message().await?;
            // Asynchronous events (SHUTDOWN, POWERDOWN, …) come in between.
            if message.get("event").is_some() {
                continue;
            }
            if let Some(failure) = message.get("error") {
                return Err(error(
                    failure["desc"].as_str().unwrap_or("failed").to_owned(),
                ));
            }
            return Ok(message.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    async fn next_message(&mut self) -> Result<Value, VmError> {
        let error = |message: String| VmError::Api {
            vmm: VMM,
            request: "QMP".into(),
            message,
        };
        let line = self
            .lines
            .next_line()
            .await
            .map_err(|e| error(format!("cannot read {}: {e}", self.socket.display())))?
            .ok_or_else(|| error("QEMU closed the QMP socket".into()))?;
        serde_json::from_str(&line).map_err(|e| error(format!("a malformed message {line:?}: {e}")))
    }
}

/// The whole VM on one command line.
pub fn argv(spec: &VmSpec, accel: Accel) -> Vec<String> {
    let (accel, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let path = |p: PathBuf| p.display().to_string();
    let mut args: Vec<String> = vec![
        "qemu-system-x86_64".into(),
        "-name".into(),
        format!("guest={},process=procurator-vm-{}", spec.name, spec.name),
        // q35: `-M microvm` hangs under TCG.
        "-machine".into(),
        format!("q35,accel={accel}"),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory_bytes.div_ceil(1 << 20)),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-kernel".into(),
        path(spec.kernel.clone()),
        "-initrd".into(),
        path(spec.initrd.clone()),
        "-append".into(),
        spec.cmdline.clone(),
        "-serial".into(),
        format!("file:{}", spec.serial_log().display()),
    ];
    if let Some(nic) = &spec.nic {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net0,ifname={},script=no,downscript=no", nic.tap),
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={}", nic.mac),
        ]);
    }
    args.extend([
        "-virtfs".into(),
        format!("local,path=/nix/store,mount_tag={STORE_TAG},security_model=none,readonly=on"),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            qmp_socket(&spec.state_dir).display()
        ),
        "-pidfile".into(),
        path(pid_file(&spec.state_dir)),
        // A guest that powers off, reboots or panics ends its QEMU, so the
        // host sees at once that it did not come up (cloud-hypervisor boots
        // it again instead, and says so on its event monitor).
        "-no-reboot".into(),
        "-daemonize".into(),
    ]);
    args
}

#[cfg(test)]
pub(crate) mod tests {
    use procurator_core::store_path::StorePath;

    use super::super::tests::spec;
    use super::*;

    #[test]
    fn the_command_line_boots_the_closure_with_its_devices() {
        let s = spec();
        let args = argv(&s, Accel::Tcg);
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(args[0], "qemu-system-x86_64");
        assert_eq!(after("-machine"), "q35,accel=tcg");
        assert_eq!(after("-smp"), "2");
        assert_eq!(after("-m"), "512M");
        assert_eq!(after("-kernel"), format!("{}/kernel", s.closure));
        assert_eq!(after("-append"), s.cmdline);
        assert_eq!(
            after("-serial"),
            "file:/var/lib/procurator/vms/web-0/console.log"
        );
        assert!(after("-netdev").contains("ifname=pvm0123456789ab,"));
        assert!(after("-virtfs").contains("mount_tag=nix-store"));
        assert!(after("-virtfs").contains("readonly=on"));
        assert_eq!(after("-pidfile"), "/var/lib/procurator/vms/web-0/qemu.pid");
        // -nographic cannot be combined with -daemonize.
        assert!(!args.iter().any(|a| a == "-nographic"));
        assert_eq!(argv(&s, Accel::Kvm)[after_index(&args, "-cpu")], "host");
    }

    /// Kills the VM's QEMU if a test ends before stopping it.
    pub(crate) struct KillOnDrop(pub(crate) PathBuf);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Ok(text) = std::fs::read_to_string(&self.0)
                && let Ok(pid) = text.trim().parse()
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// A guest's initrd: busybox and an `/init` that prints the readiness
    /// line with the closure named on the kernel command line every 2 s
    /// (the kernel's messages may cut into one).
    pub(crate) fn guest_initrd(dir: &Path) -> PathBuf {
        let root = dir.join("initrd-root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("/bin/busybox (busybox-static; run scripts/setup.sh)");
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox mkdir -p /proc\n\
             /bin/busybox mount -t proc proc /proc\n\
             for word in $(/bin/busybox cat /proc/cmdline); do\n\
               case \"$word\" in procurator.closure=*) closure=\"${{word#procurator.closure=}}\";; esac\n\
             done\n\
             while true; do echo \"{READY}$closure\"; /bin/busybox sleep 2; done\n",
            READY = crate::vm::READY_PREFIX
        );
        std::fs::write(root.join("init"), init).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let initrd = dir.join("initrd");
        let packed = std::process::Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && /bin/busybox find . | /bin/busybox cpio -o -H newc > \"$2\"")
            .args(["sh", root.to_str().unwrap(), initrd.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(packed.success(), "packing the initrd failed");
        initrd
    }

    #[tokio::test]
    async fn a_vm_boots_its_closure_reports_ready_is_found_again_and_stops() {
        let kernel = Path::new("/var/cache/procurator/test-kernel/vmlinuz");
        assert!(
            kernel.exists(),
            "{} is missing: run scripts/setup.sh, which unpacks Debian's cloud kernel there",
            kernel.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let closure =
            StorePath::parse("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-vm-test")
                .unwrap();
        let spec = VmSpec {
            name: procurator_core::MachineName::parse("vm-test").unwrap(),
            kernel: kernel.to_owned(),
            initrd: guest_initrd(dir.path()),
            cmdline: crate::vm::cmdline(&closure, "panic=-1"),
            closure,
            vcpus: 1,
            memory_bytes: 256 << 20,
            // A tap needs a network namespace of its own; the host agent's
            // tests give it one.
            nic: None,
            state_dir: dir.path().join("vms/vm-test"),
        };
        let qemu = Qemu::new(Accel::detect());
        let _guard = KillOnDrop(pid_file(&spec.state_dir));

        let pid = qemu.start(&spec).await.unwrap();
        crate::vm::wait_ready(&spec, Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(qemu.status(&spec).await.unwrap(), "running");
        // As a restarted agent would: found by its pid file, not started twice.
        assert_eq!(qemu.pid(&spec.state_dir).await, Some(pid));

        // The guest ignores the power button (no acpid): QMP quit ends it.
        qemu.stop(&spec.state_dir, Duration::from_millis(500))
            .await
            .unwrap();
        assert_eq!(qemu.pid(&spec.state_dir).await, None);
        assert!(kill(pid, None).is_err(), "QEMU {pid} is still running");
        // Stopping what is not running is not an error.
        qemu.stop(&spec.state_dir, Duration::from_millis(500))
            .await
            .unwrap();
    }

    #[test]
    fn kvm_is_used_only_where_the_cpu_has_it() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let cpu_has_it = info
            .split_whitespace()
            .any(|flag| flag == "vmx" || flag == "svm");
        if !cpu_has_it {
            assert_eq!(Accel::detect(), Accel::Tcg);
        }
    }

    fn after_index(args: &[String], flag: &str) -> usize {
        args.iter().position(|a| a == flag).unwrap() + 1
    }
}
