//! Where each VM instance runs. Pure: given the VM hosts with their
//! capacity and where every instance ran before, it decides where every
//! instance runs now, and says why for each one it could not place.
//!
//! The rules, in order:
//! 1. Stable: an instance stays on its host while that host is connected and
//!    still has room for it (hosts shrink when their agent restarts with less).
//! 2. Spread: a new or moved instance goes to the host with the fewest
//!    instances of the same machine, so replicas land on different hosts
//!    while there are hosts to spare.
//! 3. Then the host with the most free memory, then the most free CPU, then
//!    the name: placements are deterministic.
//!
//! Larger instances are placed first (memory, then CPU), which packs better
//! than blueprint order when hosts are nearly full.

use std::collections::BTreeMap;

use procurator_core::MachineName;
use procurator_core::artifact::{Demand, VmInstance};

/// A connected VM host and what it offers to VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: MachineName,
    pub capacity: Demand,
    /// The VMM it runs ("cloud-hypervisor", "qemu"); empty takes any backend.
    pub vmm: String,
}

impl Host {
    /// Whether this host runs the VMM `instance`'s machine asks for.
    fn runs(&self, instance: &VmInstance) -> bool {
        self.vmm.is_empty() || self.vmm == instance.backend
    }
}

/// Where every instance runs, and the ones that could not be placed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Instance → host.
    pub assigned: BTreeMap<MachineName, MachineName>,
    /// Instance → why it has no host.
    pub unplaced: BTreeMap<MachineName, String>,
}

/// Place `instances` on `hosts`, keeping `previous` placements where they
/// still hold.
pub fn place(
    instances: &[VmInstance],
    hosts: &[Host],
    previous: &BTreeMap<MachineName, MachineName>,
) -> Placement {
    let mut free: BTreeMap<&MachineName, Demand> =
        hosts.iter().map(|h| (&h.name, h.capacity)).collect();
    // Instances of each machine already on each host, for spreading.
    let mut siblings: BTreeMap<(&MachineName, &MachineName), usize> = BTreeMap::new();
    let mut placement = Placement::default();

    // 1. Stable: keep what still fits, in name order.
    let mut to_place = Vec::new();
    for instance in instances {
        let kept = previous
            .get(&instance.name)
            .and_then(|before| hosts.iter().find(|h| &h.name == before))
            .filter(|h| h.runs(instance))
            .filter(|h| {
                free.get(&h.name)
                    .is_some_and(|room| instance.demand.fits(room))
            });
        match kept {
            Some(host) => assign(
                &mut placement,
                &mut free,
                &mut siblings,
                instance,
                &host.name,
            ),
            None => to_place.push(instance),
        }
    }

    // 2. and 3. The rest, largest first.
    to_place.sort_by(|a, b| {
        (b.demand.memory_bytes, b.demand.milli_cpus, &a.name).cmp(&(
            a.demand.memory_bytes,
            a.demand.milli_cpus,
            &b.name,
        ))
    });
    for instance in to_place {
        let best = hosts
            .iter()
            .filter(|h| h.runs(instance))
            .filter_map(|h| Some((h, *free.get(&h.name)?)))
            .filter(|(_, room)| instance.demand.fits(room))
            .min_by_key(|&(h, room)| {
                (
                    siblings
                        .get(&(&instance.machine, &h.name))
                        .copied()
                        .unwrap_or(0),
                    std::cmp::Reverse(room.memory_bytes),
                    std::cmp::Reverse(room.milli_cpus),
                    &h.name,
                )
            })
            .map(|(h, _)| h);
        match best {
            Some(host) => assign(
                &mut placement,
                &mut free,
                &mut siblings,
                instance,
                &host.name,
            ),
            None => {
                let why = unplaced_reason(instance, hosts, &free);
                placement.unplaced.insert(instance.name.clone(), why);
            }
        }
    }
    placement
}

fn assign<'a>(
    placement: &mut Placement,
    free: &mut BTreeMap<&'a MachineName, Demand>,
    siblings: &mut BTreeMap<(&'a MachineName, &'a MachineName), usize>,
    instance: &'a VmInstance,
    host: &'a MachineName,
) {
    if let Some(room) = free.get_mut(host) {
        *room = room.saturating_sub(&instance.demand);
    }
    *siblings.entry((&instance.machine, host)).or_default() += 1;
    placement
        .assigned
        .insert(instance.name.clone(), host.clone());
}

fn unplaced_reason(
    instance: &VmInstance,
    hosts: &[Host],
    free: &BTreeMap<&MachineName, Demand>,
) -> String {
    if hosts.is_empty() {
        return format!(
            "needs {}; no VM host is connected (start an agent with --vm-host on a machine with cloud-hypervisor or QEMU)",
            instance.demand
        );
    }
    let able: Vec<&Host> = hosts.iter().filter(|h| h.runs(instance)).collect();
    if able.is_empty() {
        let vmms: std::collections::BTreeSet<&str> = hosts.iter().map(|h| h.vmm.as_str()).collect();
        return format!(
            "its backend is {:?}, and no connected VM host runs it (they run {}); start a host agent with --vmm {} or change the machine's deployment.backend",
            instance.backend,
            vmms.into_iter().collect::<Vec<_>>().join(", "),
            instance.backend
        );
    }
    let biggest = able
        .iter()
        .map(|h| (&h.name, h.capacity))
        .max_by_key(|(name, c)| (c.memory_bytes, c.milli_cpus, std::cmp::Reverse(*name)));
    if let Some((name, capacity)) = biggest
        && !instance.demand.fits(&capacity)
    {
        return format!(
            "needs {}, more than any VM host has (the largest, {name}, has {capacity}); give it less or add a larger host",
            instance.demand
        );
    }
    let most_free = free
        .iter()
        .filter(|(name, _)| able.iter().any(|h| &h.name == **name))
        .max_by_key(|(name, f)| (f.memory_bytes, f.milli_cpus, std::cmp::Reverse(**name)))
        .map(|(name, f)| format!("{name} has {f} free"))
        .unwrap_or_default();
    format!(
        "needs {}; no VM host has that much free ({most_free}); add a host or give the fleet's VMs less",
        instance.demand
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn m(name: &str) -> MachineName {
        MachineName::parse(name).unwrap()
    }

    fn host(name: &str, cpus: u64, gib: u64) -> Host {
        Host {
            name: m(name),
            capacity: Demand {
                milli_cpus: cpus * 1000,
                memory_bytes: gib * GIB,
            },
            vmm: "cloud-hypervisor".into(),
        }
    }

    fn instances(machine: &str, replicas: u32, cpus: u64, gib: u64) -> Vec<VmInstance> {
        procurator_core::artifact::instance_names(&m(machine), replicas)
            .unwrap()
            .into_iter()
            .zip(0..)
            .map(|(name, replica)| VmInstance {
                name,
                machine: m(machine),
                replica,
                demand: Demand {
                    milli_cpus: cpus * 1000,
                    memory_bytes: gib * GIB,
                },
                backend: "cloud-hypervisor".into(),
            })
            .collect()
    }

    /// What is left of each host after its instances.
    fn free(
        p: &Placement,
        hosts: &[Host],
        instances: &[VmInstance],
    ) -> BTreeMap<MachineName, Demand> {
        let demand: BTreeMap<&MachineName, Demand> =
            instances.iter().map(|i| (&i.name, i.demand)).collect();
        hosts
            .iter()
            .map(|host| {
                let used = p
                    .assigned
                    .iter()
                    .filter(|(_, on)| **on == host.name)
                    .filter_map(|(instance, _)| demand.get(instance))
                    .fold(Demand::default(), |sum, d| Demand {
                        milli_cpus: sum.milli_cpus + d.milli_cpus,
                        memory_bytes: sum.memory_bytes + d.memory_bytes,
                    });
                (host.name.clone(), host.capacity.saturating_sub(&used))
            })
            .collect()
    }

    fn on(p: &Placement, instance: &str) -> Option<String> {
        p.assigned.get(&m(instance)).map(|h| h.to_string())
    }

    #[test]
    fn replicas_go_to_different_hosts_with_room() {
        let hosts = [host("host-a", 4, 8), host("host-b", 4, 8)];
        let mut all = instances("web", 2, 1, 2);
        all.extend(instances("db", 1, 2, 4));
        let p = place(&all, &hosts, &BTreeMap::new());
        assert!(p.unplaced.is_empty(), "{p:?}");
        assert_ne!(on(&p, "web-0"), on(&p, "web-1"));
        // db, the largest, went first to the emptiest host (by name on a tie).
        assert_eq!(on(&p, "db").as_deref(), Some("host-a"));
        let free = free(&p, &hosts, &all);
        let used: u64 = hosts
            .iter()
            .map(|h| h.capacity.memory_bytes - free[&h.name].memory_bytes)
            .sum();
        assert_eq!(used, 8 * GIB);
    }

    #[test]
    fn a_placement_is_stable_while_its_host_is_there_and_has_room() {
        let hosts = [host("host-a", 8, 16), host("host-b", 8, 16)];
        let all = instances("web", 2, 1, 2);
        let mut previous = BTreeMap::new();
        // Both on host-b before, though spreading would split them now.
        previous.insert(m("web-0"), m("host-b"));
        previous.insert(m("web-1"), m("host-b"));
        let p = place(&all, &hosts, &previous);
        assert_eq!(on(&p, "web-0").as_deref(), Some("host-b"));
        assert_eq!(on(&p, "web-1").as_deref(), Some("host-b"));

        // host-b gone: both move, and spread again.
        let p = place(&all, &hosts[..1], &previous);
        assert_eq!(on(&p, "web-0").as_deref(), Some("host-a"));
        assert_eq!(on(&p, "web-1").as_deref(), Some("host-a"));

        // host-b back but too small for both: the first keeps its place.
        let small = [host("host-a", 8, 16), host("host-b", 1, 2)];
        let p = place(&all, &small, &previous);
        assert_eq!(on(&p, "web-0").as_deref(), Some("host-b"));
        assert_eq!(on(&p, "web-1").as_deref(), Some("host-a"));
    }

    #[test]
    fn what_does_not_fit_is_reported_with_the_reason() {
        let none = place(&instances("web", 1, 1, 1), &[], &BTreeMap::new());
        assert!(none.assigned.is_empty());
        assert!(none.unplaced[&m("web")].contains("no VM host is connected"));

        let hosts = [host("host-a", 2, 4)];
        let huge = place(&instances("big", 1, 1, 64), &hosts, &BTreeMap::new());
        let why = &huge.unplaced[&m("big")];
        assert!(why.contains("more than any VM host has"), "{why}");
        assert!(why.contains("host-a"), "{why}");

        // Three replicas of 2 GiB on a 4 GiB host: two fit, one is reported.
        let full = place(&instances("web", 3, 1, 2), &hosts, &BTreeMap::new());
        assert_eq!(full.assigned.len(), 2, "{full:?}");
        let (which, why) = full.unplaced.iter().next().unwrap();
        assert_eq!(which.as_str(), "web-2");
        assert!(why.contains("no VM host has that much free"), "{why}");
    }

    #[test]
    fn a_vm_goes_only_to_a_host_running_its_backend() {
        let qemu_host = Host {
            vmm: "qemu".into(),
            ..host("host-q", 8, 64)
        };
        let hosts = [host("host-c", 2, 4), qemu_host.clone()];
        let mut on_qemu = instances("lab", 1, 1, 1);
        on_qemu[0].backend = "qemu".into();
        let mut wanted = instances("web", 1, 1, 1);
        wanted.extend(on_qemu.clone());
        let p = place(&wanted, &hosts, &BTreeMap::new());
        // host-q has more room, yet only lab may go there.
        assert_eq!(p.assigned[&m("lab")], m("host-q"));
        assert_eq!(p.assigned[&m("web")], m("host-c"));

        // A placement on a host that now runs another VMM does not hold.
        let previous = BTreeMap::from([(m("lab"), m("host-c"))]);
        let moved = place(&on_qemu, &hosts, &previous);
        assert_eq!(moved.assigned[&m("lab")], m("host-q"));

        // No host runs it: the reason says which VMM is missing.
        let p = place(&on_qemu, &hosts[..1], &BTreeMap::new());
        let why = &p.unplaced[&m("lab")];
        assert!(why.contains("\"qemu\""), "{why}");
        assert!(why.contains("--vmm qemu"), "{why}");
        assert!(why.contains("cloud-hypervisor"), "{why}");

        // An agent that does not say (an older one) takes any backend.
        let any = Host {
            vmm: String::new(),
            ..host("host-old", 2, 4)
        };
        let p = place(&on_qemu, &[any], &BTreeMap::new());
        assert_eq!(p.assigned[&m("lab")], m("host-old"));
    }

    #[test]
    fn fractional_cpus_add_up_exactly() {
        let hosts = [host("host-a", 1, 64)];
        let mut tenths = Vec::new();
        for i in 0..10 {
            tenths.push(VmInstance {
                name: m(&format!("tiny-{i}")),
                machine: m("tiny"),
                replica: i,
                demand: Demand {
                    milli_cpus: 100,
                    memory_bytes: GIB,
                },
                backend: "cloud-hypervisor".into(),
            });
        }
        let p = place(&tenths, &hosts, &BTreeMap::new());
        assert_eq!(p.assigned.len(), 10, "{p:?}");
    }
}
