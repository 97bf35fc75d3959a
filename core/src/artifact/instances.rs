//! A blueprint machine with a VM backend runs as `replicas` VM instances,
//! each on a VM host. Instance names are stable, so a placement and an
//! instance's own agent keep their identity across deployments: the
//! machine's own name for one replica, `NAME-0`, `NAME-1`, … for more.

use std::collections::BTreeMap;

use super::{DeploymentArtifact, MachineSpec};
use crate::limits::{MAX_REPLICAS, MAX_ROWS};
use crate::names::MachineName;
use crate::store_path::StorePath;

/// The backends whose machines are VMs run by a VM host's agent.
pub const VM_BACKENDS: [&str; 2] = ["cloud-hypervisor", "qemu"];

/// A VM's memory is a whole number of these: cloud-hypervisor refuses to
/// boot a size that is not a multiple of its page size or its huge-page
/// size (2 MiB on x86_64), and QEMU takes whole MiB.
pub const VM_MEMORY_ALIGNMENT: u64 = 2 << 20;

/// `bytes` rounded up to [`VM_MEMORY_ALIGNMENT`]: what a VM asking for
/// `bytes` gets, is placed with and is shown with.
pub fn vm_memory_bytes(bytes: u64) -> u64 {
    bytes
        .div_ceil(VM_MEMORY_ALIGNMENT)
        .checked_mul(VM_MEMORY_ALIGNMENT)
        .unwrap_or(u64::MAX / VM_MEMORY_ALIGNMENT * VM_MEMORY_ALIGNMENT)
}

/// What one VM instance needs from its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    /// Thousandths of a vCPU, so fractional CPUs add up exactly.
    pub milli_cpus: u64,
    pub memory_bytes: u64,
}

impl Demand {
    pub fn of(spec: &MachineSpec) -> Self {
        Self {
            milli_cpus: (f64::from(spec.cpu) * 1000.0).round() as u64,
            memory_bytes: vm_memory_bytes(spec.memory.bytes()),
        }
    }

    /// Whether `self` fits into `free`.
    pub fn fits(&self, free: &Demand) -> bool {
        self.milli_cpus <= free.milli_cpus && self.memory_bytes <= free.memory_bytes
    }

    pub fn saturating_sub(&self, used: &Demand) -> Demand {
        Demand {
            milli_cpus: self.milli_cpus.saturating_sub(used.milli_cpus),
            memory_bytes: self.memory_bytes.saturating_sub(used.memory_bytes),
        }
    }
}

impl std::fmt::Display for Demand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} vCPU and {} MiB",
            self.milli_cpus as f64 / 1000.0,
            self.memory_bytes >> 20
        )
    }
}

/// One VM instance of a blueprint machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInstance {
    pub name: MachineName,
    /// The blueprint machine it is a replica of; its closure is the machine's.
    pub machine: MachineName,
    pub replica: u32,
    pub demand: Demand,
    /// The machine's `deployment.backend`: the VMM its host must run.
    pub backend: String,
}

impl MachineSpec {
    /// Whether this machine is a VM run by a VM host.
    pub fn is_vm(&self) -> bool {
        VM_BACKENDS.contains(&self.deployment.backend.as_str())
    }
}

/// The names of `machine`'s instances: the machine's own name for one
/// replica, `NAME-0` … `NAME-{n-1}` for more. Errors when a name would be
/// longer than a machine name may be.
pub fn instance_names(machine: &MachineName, replicas: u32) -> Result<Vec<MachineName>, String> {
    if replicas == 1 {
        return Ok(vec![machine.clone()]);
    }
    (0..replicas)
        .map(|i| {
            let name = format!("{machine}-{i}");
            MachineName::parse(&name).map_err(|_| {
                format!(
                    "blueprint.{machine}.replicas: replica name {name:?} is longer than 63 characters; shorten the machine's name"
                )
            })
        })
        .collect()
}

/// One row of a deployment: a machine, or one VM instance of a machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Target<'a> {
    /// The row's name: the machine's, or the instance's.
    pub name: MachineName,
    pub machine: &'a MachineName,
    pub spec: &'a MachineSpec,
    pub closure: &'a StorePath,
}

impl DeploymentArtifact {
    /// Every row a deployment of this artifact tracks, by name: its
    /// machines, each VM machine as its instances.
    pub fn targets(&self) -> Vec<Target<'_>> {
        let mut targets: Vec<Target<'_>> = self
            .blueprint
            .iter()
            .filter_map(|(machine, spec)| {
                let closure = self.closures.get(machine)?;
                let names = if spec.is_vm() {
                    // Checked on parse: the names are valid.
                    instance_names(machine, spec.replicas).unwrap_or_default()
                } else {
                    vec![machine.clone()]
                };
                Some(names.into_iter().map(move |name| Target {
                    name,
                    machine,
                    spec,
                    closure,
                }))
            })
            .flatten()
            .collect();
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        targets
    }

    /// The blueprint machine behind a row: the machine itself, or the
    /// machine an instance is a replica of.
    pub fn machine_of(&self, row: &MachineName) -> Option<(&MachineName, &MachineSpec)> {
        if let Some((machine, spec)) = self.blueprint.get_key_value(row) {
            return Some((machine, spec));
        }
        // `NAME-i`, as instance_names writes it: a lookup, not a scan, since
        // this runs for every row of a rollout.
        let (machine, index) = row.as_str().rsplit_once('-')?;
        let index: u32 = index.parse().ok()?;
        let (machine, spec) = self
            .blueprint
            .get_key_value(&MachineName::parse(machine).ok()?)?;
        (spec.is_vm()
            && spec.replicas > 1
            && index < spec.replicas
            && format!("{machine}-{index}") == row.as_str())
        .then_some((machine, spec))
    }

    /// Every VM instance of the blueprint, by machine then replica.
    pub fn vm_instances(&self) -> Vec<VmInstance> {
        self.blueprint
            .iter()
            .filter(|(_, spec)| spec.is_vm())
            .flat_map(|(machine, spec)| {
                let demand = Demand::of(spec);
                let backend = &spec.deployment.backend;
                // Checked on parse: the names are valid.
                let names = instance_names(machine, spec.replicas).unwrap_or_default();
                names
                    .into_iter()
                    .zip(0u32..)
                    .map(move |(name, replica)| VmInstance {
                        name,
                        machine: machine.clone(),
                        replica,
                        demand,
                        backend: backend.clone(),
                    })
            })
            .collect()
    }

    /// The replica rules: at least one replica, several only for VMs, and
    /// every instance name distinct from every machine and other instance.
    pub(super) fn check_replicas(&self) -> Result<(), String> {
        // Counted before a single instance name is built.
        let mut rows: u64 = 0;
        for (machine, spec) in &self.blueprint {
            if spec.replicas > MAX_REPLICAS {
                return Err(format!(
                    "blueprint.{machine}.replicas: {} replicas; at most {MAX_REPLICAS} are allowed",
                    spec.replicas
                ));
            }
            rows += u64::from(spec.replicas.max(1));
        }
        if rows > MAX_ROWS as u64 {
            return Err(format!(
                "blueprint: {rows} machines and VM instances; at most {MAX_ROWS} are allowed in one deployment"
            ));
        }
        let mut owner: BTreeMap<MachineName, &MachineName> = BTreeMap::new();
        for (machine, spec) in &self.blueprint {
            if spec.replicas == 0 {
                return Err(format!(
                    "blueprint.{machine}.replicas: must be at least 1; remove the machine from the blueprint to run none"
                ));
            }
            if spec.replicas > 1 && !spec.is_vm() {
                return Err(format!(
                    "blueprint.{machine}.replicas: {} replicas need a VM backend ({}), but the backend is {:?}",
                    spec.replicas,
                    VM_BACKENDS.join(" or "),
                    spec.deployment.backend
                ));
            }
            for name in instance_names(machine, spec.replicas)? {
                if let Some(other) = owner.insert(name.clone(), machine) {
                    return Err(format!(
                        "blueprint.{machine}: its instance {name:?} has the same name as {}; rename one of the machines",
                        if other == &name {
                            format!("the machine {other:?}")
                        } else {
                            format!("an instance of {other:?}")
                        }
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn vm_memory_is_rounded_up_to_2_mib() {
        const MIB: u64 = 1 << 20;
        for asked in [
            2_000_000_000,
            1_500_000_000,
            512 * MIB + 1,
            1_000_000_000,
            1,
        ] {
            let given = vm_memory_bytes(asked);
            assert_eq!(given % (2 * MIB), 0, "{asked} -> {given}");
            assert!(
                given >= asked && given - asked < 2 * MIB,
                "{asked} -> {given}"
            );
        }
        assert_eq!(vm_memory_bytes(2_000_000_000), 954 * 2 * MIB);
        assert_eq!(vm_memory_bytes(512 * MIB), 512 * MIB);
        assert_eq!(vm_memory_bytes(512 * MIB + 1), 514 * MIB);
        assert_eq!(vm_memory_bytes(0), 0);
        assert_eq!(vm_memory_bytes(u64::MAX), u64::MAX / (2 * MIB) * (2 * MIB));
    }

    fn machine(backend: &str, replicas: u32, cpu: f64, mib: u32) -> Value {
        json!({
            "role": "worker", "cpu": cpu, "memory": { "amount": mib, "unit": "MiB" },
            "replicas": replicas,
            "deployment": { "addr": "10.0.0.1", "backend": backend }
        })
    }

    fn artifact(machines: &[(&str, Value)]) -> Result<DeploymentArtifact, String> {
        let closure = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system";
        let blueprint: serde_json::Map<String, Value> = machines
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect();
        let closures: serde_json::Map<String, Value> = machines
            .iter()
            .map(|(n, _)| ((*n).to_owned(), json!(closure)))
            .collect();
        let v = json!({
            "gitCommit": "0123456789abcdef0123456789abcdef01234567",
            "blueprint": blueprint, "closures": closures
        });
        DeploymentArtifact::from_json(v.to_string().as_bytes()).map_err(|e| e.to_string())
    }

    fn names(instances: &[VmInstance]) -> Vec<&str> {
        instances.iter().map(|i| i.name.as_str()).collect()
    }

    #[test]
    fn one_replica_keeps_the_machine_name_and_more_are_numbered() {
        let a = artifact(&[
            ("db", machine("cloud-hypervisor", 1, 2.0, 2048)),
            ("web", machine("qemu", 3, 0.5, 512)),
            ("metal", machine("nixos", 1, 8.0, 65536)),
        ])
        .unwrap();
        let instances = a.vm_instances();
        assert_eq!(names(&instances), ["db", "web-0", "web-1", "web-2"]);
        assert_eq!(instances[2].machine.as_str(), "web");
        assert_eq!(instances[2].replica, 1);
        assert_eq!(
            instances[1].demand,
            Demand {
                milli_cpus: 500,
                memory_bytes: 512 << 20
            }
        );
    }

    #[test]
    fn rows_are_the_machines_with_vm_machines_as_their_instances() {
        let a = artifact(&[
            ("db", machine("cloud-hypervisor", 1, 2.0, 2048)),
            ("web", machine("qemu", 2, 0.5, 512)),
            ("metal", machine("nixos", 1, 8.0, 65536)),
        ])
        .unwrap();
        let targets = a.targets();
        let rows: Vec<(&str, &str)> = targets
            .iter()
            .map(|t| (t.name.as_str(), t.machine.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                ("db", "db"),
                ("metal", "metal"),
                ("web-0", "web"),
                ("web-1", "web")
            ]
        );
        let m = |n: &str| MachineName::parse(n).unwrap();
        assert_eq!(
            a.machine_of(&m("web-1")).map(|(n, _)| n.as_str()),
            Some("web")
        );
        assert_eq!(a.machine_of(&m("db")).map(|(n, _)| n.as_str()), Some("db"));
        assert_eq!(a.machine_of(&m("web-2")), None);
        assert_eq!(
            a.machine_of(&m("web")),
            Some((&m("web"), &a.blueprint[&m("web")]))
        );
    }

    #[test]
    fn replica_mistakes_are_refused_with_the_field_and_the_fix() {
        let zero = artifact(&[("web", machine("qemu", 0, 1.0, 512))]).unwrap_err();
        assert!(
            zero.contains("blueprint.web.replicas: must be at least 1"),
            "{zero}"
        );

        let metal = artifact(&[("web", machine("nixos", 2, 1.0, 512))]).unwrap_err();
        assert!(metal.contains("2 replicas need a VM backend"), "{metal}");
        assert!(metal.contains("\"nixos\""), "{metal}");

        let clash = artifact(&[
            ("web", machine("qemu", 2, 1.0, 512)),
            ("web-1", machine("qemu", 1, 1.0, 512)),
        ])
        .unwrap_err();
        assert!(clash.contains("\"web-1\""), "{clash}");
        assert!(clash.contains("rename one of the machines"), "{clash}");

        let long = "a".repeat(62);
        let too_long = artifact(&[(long.as_str(), machine("qemu", 2, 1.0, 512))]).unwrap_err();
        assert!(too_long.contains("longer than 63 characters"), "{too_long}");
    }
}
