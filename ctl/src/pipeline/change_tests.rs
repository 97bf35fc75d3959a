use std::collections::BTreeMap;

use std::path::Path;

use procurator_core::DeploymentArtifact;
use procurator_proto::v1::RunningMachine;
use serde_json::json;

use super::*;

const OLD: &str = "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-a";
const NEW: &str = "/nix/store/1c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-a";

fn spec(timeout: u32) -> Value {
    json!({
        "role": "worker", "cpu": 2.0, "memory": {"amount": 4.0, "unit": "GB"},
        "labels": ["worker"], "replicas": 1,
        "deployment": {
            "addr": "10.0.0.1", "backend": "nixos",
            "healthChecks": [{"command": "true", "timeout": timeout, "interval": 1}]
        }
    })
}

/// An artifact (previous) or what a build produced (new) from
/// `(machine, closure, health-check timeout)`.
fn machines(list: &[(&str, &str, u32)]) -> (Value, Value) {
    let blueprint: serde_json::Map<String, Value> = list
        .iter()
        .map(|(m, _, t)| ((*m).to_owned(), spec(*t)))
        .collect();
    let closures: serde_json::Map<String, Value> = list
        .iter()
        .map(|(m, c, _)| ((*m).to_owned(), (*c).into()))
        .collect();
    (blueprint.into(), closures.into())
}

fn previous(list: &[(&str, &str, u32)]) -> Baseline {
    let (blueprint, closures) = machines(list);
    let artifact = json!({ "gitCommit": "3f2c1a9", "blueprint": blueprint, "closures": closures });
    let artifact = DeploymentArtifact::from_json(artifact.to_string().as_bytes()).unwrap();
    Baseline::from_artifact(Path::new("deployment.json"), &artifact)
}

fn built(list: &[(&str, &str, u32)]) -> Evaluated {
    let (blueprint, closures) = machines(list);
    Evaluated {
        specs: serde_json::from_value(blueprint.clone()).unwrap(),
        closures: serde_json::from_value::<BTreeMap<MachineName, StorePath>>(closures).unwrap(),
        blueprint,
    }
}

fn changes(plan: &Plan) -> Vec<(&str, Change)> {
    plan.machines
        .iter()
        .map(|m| (m.name.as_str(), m.change))
        .collect()
}

#[test]
fn without_a_previous_deployment_every_machine_is_added() {
    let plan = Plan::compare(
        &Baseline::nothing(),
        &built(&[("a", NEW, 5), ("b", OLD, 5)]),
    );
    assert_eq!(changes(&plan), [("a", Change::Added), ("b", Change::Added)]);
    assert!(plan.changed());
    assert_eq!(plan.machines[0].previous, None);
}

#[test]
fn the_same_closures_and_blueprint_are_no_change() {
    let list = [("a", OLD, 5), ("b", NEW, 5)];
    let plan = Plan::compare(&previous(&list), &built(&list));
    assert_eq!(
        changes(&plan),
        [("a", Change::Unchanged), ("b", Change::Unchanged)]
    );
    assert!(!plan.changed());
    assert_eq!(plan.verdict(), "nothing changed");
    assert_eq!(plan.json()["changed"], false);
}

#[test]
fn only_the_machine_with_a_new_closure_changed() {
    let before = previous(&[("a", OLD, 5), ("b", OLD, 5)]);
    let plan = Plan::compare(&before, &built(&[("a", NEW, 5), ("b", OLD, 5)]));
    assert_eq!(
        changes(&plan),
        [("a", Change::Closure), ("b", Change::Unchanged)]
    );
    assert_eq!(
        plan.machines[0].previous.as_ref().map(StorePath::as_str),
        Some(OLD)
    );
    assert_eq!(plan.verdict(), "1 of 2 machines changed");
}

#[test]
fn a_blueprint_change_with_the_same_closure_is_a_change() {
    let before = previous(&[("a", OLD, 5)]);
    let plan = Plan::compare(&before, &built(&[("a", OLD, 30)]));
    assert_eq!(changes(&plan), [("a", Change::Blueprint)]);
    assert!(plan.changed());
    // A new closure wins over a blueprint change: it says more.
    let plan = Plan::compare(&before, &built(&[("a", NEW, 30)]));
    assert_eq!(changes(&plan), [("a", Change::Closure)]);
}

#[test]
fn added_and_removed_machines_are_changes() {
    let before = previous(&[("a", OLD, 5), ("gone", OLD, 5)]);
    let plan = Plan::compare(&before, &built(&[("a", OLD, 5), ("new", NEW, 5)]));
    assert_eq!(
        changes(&plan),
        [
            ("a", Change::Unchanged),
            ("gone", Change::Removed),
            ("new", Change::Added)
        ]
    );
    let gone = &plan.machines[1];
    assert_eq!(gone.closure, None);
    assert_eq!(gone.previous.as_ref().map(StorePath::as_str), Some(OLD));
}

#[test]
fn json_rows_have_the_documented_keys() {
    let before = previous(&[("a", OLD, 5)]);
    let mut plan = Plan::compare(&before, &built(&[("a", NEW, 5)]));
    plan.machines[0].closure_size = Some(4040);
    assert_eq!(
        plan.json(),
        json!({
            "changed": true,
            "comparedWith": {"source": "previous", "file": "deployment.json", "gitCommit": "3f2c1a9"},
            "machines": [{
                "name": "a", "previous": OLD, "closure": NEW,
                "change": "closure", "closureSize": 4040
            }]
        })
    );
}

#[test]
fn the_table_has_one_row_per_machine() {
    let before = previous(&[("a", OLD, 5)]);
    let mut plan = Plan::compare(&before, &built(&[("a", NEW, 5), ("b", NEW, 5)]));
    plan.machines[0].closure_size = Some(4040);
    let table = plan.table();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("MACHINE"));
    assert!(lines[1].contains(OLD) && lines[1].contains(NEW) && lines[1].contains("yes"));
    assert!(lines[1].ends_with("3.9 KiB"), "{table}");
    assert!(
        lines[2].contains("added") && lines[2].ends_with('-'),
        "{table}"
    );
}

#[test]
fn a_missing_previous_file_is_an_error_that_says_what_to_do() {
    let err = Baseline::load_previous(Path::new("/nonexistent/deployment.json")).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("--previous /nonexistent/deployment.json"),
        "{err}"
    );
    assert!(err.contains("leave --previous out"), "{err}");
}

/// A `ListRunning` row: `closure` and the health-check timeout of its
/// blueprint entry, if any deployment that ran there is known.
fn running(name: &str, closure: &str, timeout: Option<u32>, in_force: bool) -> RunningMachine {
    RunningMachine {
        machine: name.into(),
        blueprint_machine: name.into(),
        closure: closure.into(),
        spec_json: timeout.map(|t| spec(t).to_string()).unwrap_or_default(),
        in_force,
        ..RunningMachine::default()
    }
}

fn fleet(rows: Vec<RunningMachine>) -> Baseline {
    Baseline::from_rows(Some(("d-1".into(), "3f2c1a9".into())), rows).unwrap()
}

#[test]
fn against_the_fleet_what_runs_is_what_counts() {
    // a: rolled back to OLD; b: runs NEW already; c: nothing known runs
    // there (its deployment was cancelled); d: never seen; gone: in force,
    // no longer in the blueprint; stray: an agent in no deployment in force;
    // e: an agent no kept deployment reached.
    let before = fleet(vec![
        running("a", OLD, Some(5), true),
        running("b", NEW, Some(5), true),
        running("c", "", None, true),
        running("gone", OLD, Some(5), true),
        running("stray", OLD, None, false),
        running("e", OLD, None, false),
    ]);
    let new = built(&[
        ("a", NEW, 5),
        ("b", NEW, 5),
        ("c", NEW, 5),
        ("d", NEW, 5),
        ("e", NEW, 5),
    ]);
    let plan = Plan::compare(&before, &new);
    assert_eq!(
        changes(&plan),
        [
            ("a", Change::Closure),
            ("b", Change::Unchanged),
            ("c", Change::Added),
            ("d", Change::Added),
            ("e", Change::Added),
            ("gone", Change::Removed),
        ]
    );
    let previous = |i: usize| plan.machines[i].previous.as_ref().map(StorePath::as_str);
    assert_eq!(previous(0), Some(OLD));
    assert_eq!((previous(2), previous(3)), (None, None));
    assert_eq!(previous(4), Some(OLD), "what e's agent reported");
    assert_eq!(
        plan.json()["comparedWith"],
        json!({"source": "fleet", "deploymentId": "d-1", "gitCommit": "3f2c1a9"})
    );
}

#[test]
fn against_the_fleet_a_new_health_check_is_a_change() {
    let before = fleet(vec![running("a", NEW, Some(5), true)]);
    let plan = Plan::compare(&before, &built(&[("a", NEW, 30)]));
    assert_eq!(changes(&plan), [("a", Change::Blueprint)]);
}

#[test]
fn a_vm_machine_is_unchanged_only_when_every_instance_is() {
    let mut vm = spec(5);
    vm["replicas"] = 2.into();
    vm["deployment"]["backend"] = "cloud-hypervisor".into();
    let new = Evaluated {
        specs: serde_json::from_value(json!({ "web": vm })).unwrap(),
        closures: serde_json::from_value(json!({ "web": NEW })).unwrap(),
        blueprint: json!({ "web": vm }),
    };
    let instance = |name: &str, closure: &str| RunningMachine {
        machine: name.into(),
        blueprint_machine: "web".into(),
        closure: closure.into(),
        spec_json: vm.to_string(),
        in_force: true,
        ..RunningMachine::default()
    };
    let same = fleet(vec![instance("web-0", NEW), instance("web-1", NEW)]);
    assert_eq!(
        changes(&Plan::compare(&same, &new)),
        [("web", Change::Unchanged)]
    );
    let one_rolled_back = fleet(vec![instance("web-0", NEW), instance("web-1", OLD)]);
    let plan = Plan::compare(&one_rolled_back, &new);
    assert_eq!(changes(&plan), [("web", Change::Closure)]);
    assert_eq!(
        plan.machines[0].previous.as_ref().map(StorePath::as_str),
        Some(OLD)
    );
    let one_missing = fleet(vec![instance("web-0", NEW)]);
    assert_eq!(
        changes(&Plan::compare(&one_missing, &new)),
        [("web", Change::Blueprint)]
    );
}

#[test]
fn a_row_the_control_plane_got_wrong_is_named() {
    let err = Baseline::from_rows(
        None,
        vec![running("a", "/tmp/not-a-store-path", None, true)],
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("machine \"a\" with an invalid closure"),
        "{err:#}"
    );
}
