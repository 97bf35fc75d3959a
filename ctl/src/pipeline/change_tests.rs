use std::collections::BTreeMap;

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

fn previous(list: &[(&str, &str, u32)]) -> DeploymentArtifact {
    let (blueprint, closures) = machines(list);
    let artifact = json!({ "gitCommit": "3f2c1a9", "blueprint": blueprint, "closures": closures });
    DeploymentArtifact::from_json(artifact.to_string().as_bytes()).unwrap()
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
    let plan = Plan::compare(None, &built(&[("a", NEW, 5), ("b", OLD, 5)]));
    assert_eq!(changes(&plan), [("a", Change::Added), ("b", Change::Added)]);
    assert!(plan.changed());
    assert_eq!(plan.machines[0].previous, None);
}

#[test]
fn the_same_closures_and_blueprint_are_no_change() {
    let list = [("a", OLD, 5), ("b", NEW, 5)];
    let plan = Plan::compare(Some(&previous(&list)), &built(&list));
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
    let plan = Plan::compare(Some(&before), &built(&[("a", NEW, 5), ("b", OLD, 5)]));
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
    let plan = Plan::compare(Some(&before), &built(&[("a", OLD, 30)]));
    assert_eq!(changes(&plan), [("a", Change::Blueprint)]);
    assert!(plan.changed());
    // A new closure wins over a blueprint change: it says more.
    let plan = Plan::compare(Some(&before), &built(&[("a", NEW, 30)]));
    assert_eq!(changes(&plan), [("a", Change::Closure)]);
}

#[test]
fn added_and_removed_machines_are_changes() {
    let before = previous(&[("a", OLD, 5), ("gone", OLD, 5)]);
    let plan = Plan::compare(Some(&before), &built(&[("a", OLD, 5), ("new", NEW, 5)]));
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
    let mut plan = Plan::compare(Some(&before), &built(&[("a", NEW, 5)]));
    plan.machines[0].closure_size = Some(4040);
    assert_eq!(
        plan.json(),
        json!({
            "changed": true,
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
    let mut plan = Plan::compare(Some(&before), &built(&[("a", NEW, 5), ("b", NEW, 5)]));
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
    let err = load_previous(Path::new("/nonexistent/deployment.json")).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("--previous /nonexistent/deployment.json"),
        "{err}"
    );
    assert!(err.contains("leave --previous out"), "{err}");
}
