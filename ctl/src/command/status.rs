//! `procurator-ctl status`: the fleet's agents as the control plane sees them.

use procurator_proto::v1::{Agent, MachineState};
use serde_json::{Value, json};

use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};
use crate::{Outcome, format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only machines whose name matches (`web-*`).
    #[arg(long, value_name = "PATTERN")]
    pub name: Option<String>,

    /// Only connected agents.
    #[arg(long, conflicts_with = "disconnected")]
    pub connected: bool,

    /// Only agents not connected now.
    #[arg(long)]
    pub disconnected: bool,

    /// Show whole store paths, not their short form.
    #[arg(long)]
    pub wide: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let mut conn = conn.connect().await?;
    let connected = match (args.connected, args.disconnected) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let name = args.name.as_deref().unwrap_or_default();
    let mut agents = crate::pages::agents(&mut conn, name, connected).await?;
    agents.sort_by(|a, b| format::natural_order(&a.machine, &b.machine));
    match args.output.output {
        OutputFormat::Text => {
            output::print(&agents_table(&agents, procurator_core::now_ms(), args.wide))?;
            if let Some(hosts) = vm_hosts_table(&agents) {
                output::print(&format!("\n{hosts}"))?;
            }
        }
        OutputFormat::Json => {
            output::print_json(&Value::Array(agents.iter().map(agent_json).collect()))?
        }
    }
    Ok(Outcome::Success)
}

pub fn agents_table(agents: &[Agent], now_ms: i64, wide: bool) -> String {
    if agents.is_empty() {
        return "no agent has connected yet; start procurator-agent on a machine with its certificate\n"
            .to_owned();
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.machine.clone(),
                if a.connected { "yes" } else { "no" }.to_owned(),
                match a.current_system.as_str() {
                    "" => "-".to_owned(),
                    path if wide => path.to_owned(),
                    path => format::short_store_path(path),
                },
                if a.connected {
                    "now".to_owned()
                } else {
                    format::ago(now_ms, a.last_seen_ms)
                },
                format::expires(now_ms, a.certificate_not_after_ms),
                last_result(a),
            ]
        })
        .collect();
    output::table(
        &[
            "MACHINE",
            "CONNECTED",
            "CURRENT-SYSTEM",
            "LAST-SEEN",
            "CERT-EXPIRES",
            "LAST-RESULT",
        ],
        &rows,
    )
}

/// The agents that host VMs: what they offer, what is free, the VMs placed
/// on them; `None` when no agent hosts VMs.
pub fn vm_hosts_table(agents: &[Agent]) -> Option<String> {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .filter_map(|a| {
            let host = a.vm_host.as_ref()?;
            let free = a.vm_free.clone().unwrap_or_else(|| host.clone());
            Some(vec![
                a.machine.clone(),
                if a.connected { "yes" } else { "no" }.to_owned(),
                if host.vmm.is_empty() {
                    "-".to_owned()
                } else {
                    host.vmm.clone()
                },
                format!("{}/{}", cpus(free.milli_cpus), cpus(host.milli_cpus)),
                format!(
                    "{}/{} MiB",
                    free.memory_bytes >> 20,
                    host.memory_bytes >> 20
                ),
                if a.vms.is_empty() {
                    "-".to_owned()
                } else {
                    a.vms
                        .iter()
                        .map(|v| v.instance.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                if host.labels.is_empty() {
                    "-".to_owned()
                } else {
                    host.labels.join(",")
                },
            ])
        })
        .collect();
    (!rows.is_empty()).then(|| {
        output::table(
            &[
                "VM-HOST",
                "CONNECTED",
                "VMM",
                "FREE-CPUS",
                "FREE-MEMORY",
                "VMS",
                "LABELS",
            ],
            &rows,
        )
    })
}

/// `2`, `1.5`, `0.25`: thousandths of a CPU without trailing zeros.
fn cpus(milli: u64) -> String {
    let text = format!("{}.{:03}", milli / 1000, milli % 1000);
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// `rolled-back (checking) in d-1: health check … failed`, kept short.
fn last_result(a: &Agent) -> String {
    if a.last_deployment_id.is_empty() && a.last_state() == MachineState::Unspecified {
        return "-".to_owned();
    }
    let mut text = a.last_state().label().to_owned();
    if !a.last_deployment_id.is_empty() {
        text.push_str(&format!(" in {}", a.last_deployment_id));
    }
    if !a.last_reason.is_empty() {
        text.push_str(&format!(
            ": {}",
            format::truncate(a.last_reason.lines().next().unwrap_or(""), 60)
        ));
    }
    text
}

pub fn agent_json(a: &Agent) -> Value {
    let last_state = match a.last_state() {
        MachineState::Unspecified => Value::Null,
        s => s.label().into(),
    };
    json!({
        "machine": a.machine,
        "connected": a.connected,
        "currentSystem": a.current_system,
        "bootedSystem": a.booted_system,
        "agentVersion": a.agent_version,
        "nixVersion": a.nix_version,
        "lastSeen": format::rfc3339_or_null(a.last_seen_ms),
        "lastDeploymentId": a.last_deployment_id,
        "lastState": last_state,
        "lastReason": a.last_reason,
        "certificate": (!a.certificate_serial.is_empty()).then(|| json!({
            "serial": a.certificate_serial,
            "notAfter": format::rfc3339_or_null(a.certificate_not_after_ms),
        })),
        "vmHost": a.vm_host.as_ref().map(|h| json!({
            "cpus": h.milli_cpus as f64 / 1000.0,
            "memoryBytes": h.memory_bytes,
            "labels": h.labels,
            "vmm": h.vmm,
            "freeCpus": a.vm_free.as_ref().map(|f| f.milli_cpus as f64 / 1000.0),
            "freeMemoryBytes": a.vm_free.as_ref().map(|f| f.memory_bytes),
            "vms": a.vms.iter().map(|v| json!({ "instance": v.instance, "machine": v.machine })).collect::<Vec<_>>(),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_748_762_102_000;

    fn agents() -> Vec<Agent> {
        vec![
            Agent {
                machine: "worker-1".into(),
                connected: true,
                current_system: "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system".into(),
                last_seen_ms: NOW,
                last_deployment_id: "d-1".into(),
                last_state: MachineState::Succeeded as i32,
                certificate_serial: "4a3f".into(),
                certificate_not_after_ms: NOW + 29 * 86_400_000 + 1000,
                ..Default::default()
            },
            Agent {
                machine: "worker-2".into(),
                connected: false,
                last_seen_ms: NOW - 300_000,
                last_deployment_id: "d-1".into(),
                last_state: MachineState::RolledBack as i32,
                last_reason: "health check `true` failed\nmore".into(),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn the_table_has_one_row_per_agent() {
        let table = agents_table(&agents(), NOW, false);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].starts_with("MACHINE   CONNECTED  CURRENT-SYSTEM"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("worker-1  yes        0c5mfs2a…-"),
            "{table}"
        );
        assert!(
            lines[1].ends_with("now        in 29d        succeeded in d-1"),
            "{table}"
        );
        assert!(lines[2].contains(" -  "), "no certificate known: {table}");
        assert!(lines[2].contains(" no "), "{table}");
        assert!(lines[2].contains("5m ago"), "{table}");
        assert!(
            lines[2].ends_with("rolled-back in d-1: health check `true` failed"),
            "{table}"
        );
    }

    #[test]
    fn vm_hosts_get_a_table_of_their_own() {
        let mut all = agents();
        assert_eq!(vm_hosts_table(&all), None);
        all[1].vm_host = Some(procurator_proto::v1::VmHostCapacity {
            milli_cpus: 1500,
            memory_bytes: 6 << 30,
            labels: vec!["rack-1".into(), "ssd".into()],
            vmm: "qemu".into(),
        });
        all[1].vm_free = Some(procurator_proto::v1::VmHostCapacity {
            milli_cpus: 500,
            memory_bytes: 4 << 30,
            labels: Vec::new(),
            vmm: "qemu".into(),
        });
        all[1].vms = vec![procurator_proto::v1::VmPlacement {
            instance: "web-0".into(),
            machine: "web".into(),
            host: "worker-2".into(),
        }];
        let table = vm_hosts_table(&all).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(
            lines[0].starts_with("VM-HOST   CONNECTED  VMM   FREE-CPUS"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("worker-2  no         qemu  0.5/1.5    4096/6144 MiB  web-0"),
            "{table}"
        );
        assert!(lines[1].ends_with("rack-1,ssd"), "{table}");
        assert_eq!(cpus(2000), "2");
        assert_eq!(cpus(250), "0.25");
        let v = agent_json(&all[1]);
        assert_eq!(v["vmHost"]["cpus"], 1.5);
        assert_eq!(v["vmHost"]["labels"][1], "ssd");
        assert_eq!(v["vmHost"]["vmm"], "qemu");
        assert_eq!(v["vmHost"]["freeCpus"], 0.5);
        assert_eq!(v["vmHost"]["vms"][0]["instance"], "web-0");
        assert_eq!(agent_json(&all[0])["vmHost"], Value::Null);
    }

    #[test]
    fn no_agents_says_how_to_get_one() {
        assert!(agents_table(&[], NOW, false).contains("procurator-agent"));
    }

    #[test]
    fn json_uses_labels_and_rfc3339() {
        let v = agent_json(&agents()[1]);
        assert_eq!(v["machine"], "worker-2");
        assert_eq!(v["connected"], false);
        assert_eq!(v["lastState"], "rolled-back");
        assert_eq!(v["lastSeen"], "2025-06-01T07:10:02.000Z");
        assert_eq!(agent_json(&Agent::default())["lastSeen"], Value::Null);
        assert_eq!(v["certificate"], Value::Null);
        let v = agent_json(&agents()[0]);
        assert_eq!(v["certificate"]["serial"], "4a3f");
        assert_eq!(v["certificate"]["notAfter"], "2025-06-30T07:15:03.000Z");
    }
}
