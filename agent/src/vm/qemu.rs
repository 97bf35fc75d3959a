//! QEMU: the same lifecycle as cloud-hypervisor for hosts without hardware
//! virtualisation (TCG) and for these test machines. One daemonized
//! `qemu-system-x86_64` per VM with a pid file and a QMP socket in the VM's
//! state folder, so a restarted agent finds it again. The host store is
//! shared over virtio-9p, built into QEMU, so no file-sharing daemon runs.

use std::path::PathBuf;

use super::{STORE_TAG, VmSpec};

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

pub fn qmp_socket(spec: &VmSpec) -> PathBuf {
    spec.state_dir.join("qmp.sock")
}

pub fn pid_file(spec: &VmSpec) -> PathBuf {
    spec.state_dir.join("qemu.pid")
}

/// The whole VM on one command line.
pub fn argv(spec: &VmSpec, accel: Accel) -> Vec<String> {
    let (accel, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let path = |p: PathBuf| p.display().to_string();
    vec![
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
        "-netdev".into(),
        format!("tap,id=net0,ifname={},script=no,downscript=no", spec.tap),
        "-device".into(),
        format!("virtio-net-pci,netdev=net0,mac={}", spec.mac),
        "-virtfs".into(),
        format!("local,path=/nix/store,mount_tag={STORE_TAG},security_model=none,readonly=on"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_socket(spec).display()),
        "-pidfile".into(),
        path(pid_file(spec)),
        // A guest that powers off or panics ends its QEMU, as on cloud-hypervisor.
        "-no-reboot".into(),
        "-daemonize".into(),
    ]
}

#[cfg(test)]
mod tests {
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
