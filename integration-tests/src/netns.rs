//! Network namespaces for tests that need a network of their own: a control
//! plane behind a router that NATs the agents' traffic, and hosts whose
//! firewall can cut them off (docs NIX-TESTING.md, "A test host per agent").
//!
//! Only private test addresses (10.231.x.y) are used, and only inside
//! namespaces made here: the machine's own network, routes and firewall are
//! never touched. Veth pairs are created directly inside their namespaces,
//! and every namespace is deleted on drop, which takes its links, addresses,
//! routes and iptables rules with it.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result, bail};

use crate::ctl::CmdOutput;
use crate::process::run_with_timeout;

/// The control plane's address in [`NatNetwork`].
pub const CONTROL_PLANE_IP: &str = "10.231.1.2";
/// The router's address on the control plane's side: what the control
/// plane sees as every agent's address.
pub const ROUTER_CP_SIDE_IP: &str = "10.231.1.1";

/// Runs a command to completion and fails unless it exits 0.
pub fn run(program: &str, args: &[&str]) -> Result<CmdOutput> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(30))?;
    out.expect_code(0)?;
    Ok(out)
}

/// `ip netns exec NS PROGRAM ARGS…`, to completion; fails unless it exits 0.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<CmdOutput> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `ip netns exec NS PROGRAM`, unstarted: for clients run inside a namespace.
pub fn command(ns: Option<&str>, program: &std::path::Path) -> Command {
    match ns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// One namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A new namespace named `pt<pid>-<n>-<role>` (unique to this test
    /// process and call), with its loopback up.
    pub fn create(role: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("pt{}-{n}-{role}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> Result<CmdOutput> {
        exec(&self.name, program, args)
    }

    /// Like [`Self::exec`], but returns the output whatever the exit code.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> Result<CmdOutput> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        run_with_timeout(cmd, std::time::Duration::from_secs(30))
    }

    /// The iptables rules of one chain here (`iptables -S CHAIN`).
    pub fn iptables_rules(&self, table: &str, chain: &str) -> Result<String> {
        Ok(self.exec("iptables", &["-t", table, "-S", chain])?.stdout)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("deleting network namespace {}: {e:#}", self.name);
        }
    }
}

/// A veth pair from `a` (address `a_ip/24`) to `b` (`b_ip/24`), created
/// inside the two namespaces and brought up.
fn veth(a: &NetNs, a_if: &str, a_ip: &str, b: &NetNs, b_if: &str, b_ip: &str) -> Result<()> {
    run(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ],
    )
    .with_context(|| format!("a veth pair {}:{a_if} <-> {}:{b_if}", a.name, b.name))?;
    for (ns, ifname, ip) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
        ns.exec("ip", &["addr", "add", &format!("{ip}/24"), "dev", ifname])?;
        ns.exec("ip", &["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Three kinds of namespace: the control plane's, a router's, and one per
/// host, each host on a subnet of its own (10.231.(10+i).0/24) behind the
/// router. The router forwards and masquerades the hosts' subnets toward
/// the control plane's (10.231.1.0/24), and the control plane's namespace
/// has no route back to the hosts: only the router's address reaches it.
// Field order is drop order: hosts first, router last.
pub struct NatNetwork {
    pub hosts: Vec<(String, NetNs, String)>,
    pub control_plane: NetNs,
    pub router: NetNs,
}

impl NatNetwork {
    /// `hosts` are machine names; each gets a namespace and an address.
    pub fn create(hosts: &[&str]) -> Result<Self> {
        let router = NetNs::create("router")?;
        let control_plane = NetNs::create("cp")?;
        veth(
            &control_plane,
            "cp0",
            CONTROL_PLANE_IP,
            &router,
            "tocp",
            ROUTER_CP_SIDE_IP,
        )?;
        router.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
        let mut net = Self {
            hosts: Vec::new(),
            control_plane,
            router,
        };
        for (i, machine) in hosts.iter().enumerate() {
            let ns = NetNs::create(&format!("h{i}"))?;
            let subnet = 10 + i;
            let (host_ip, router_ip) = (format!("10.231.{subnet}.2"), format!("10.231.{subnet}.1"));
            veth(
                &ns,
                "eth0",
                &host_ip,
                &net.router,
                &format!("toh{i}"),
                &router_ip,
            )?;
            ns.exec("ip", &["route", "add", "default", "via", &router_ip])?;
            net.router.exec(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    &format!("10.231.{subnet}.0/24"),
                    "-j",
                    "MASQUERADE",
                ],
            )?;
            net.hosts.push((machine.to_string(), ns, host_ip));
        }
        Ok(net)
    }

    /// The namespace and address of a host.
    pub fn host(&self, machine: &str) -> Result<(&NetNs, &str)> {
        match self.hosts.iter().find(|(m, _, _)| m == machine) {
            Some((_, ns, ip)) => Ok((ns, ip.as_str())),
            None => bail!("no host {machine} in the NAT network"),
        }
    }
}
