//! Named contexts in procurator-ctl's config file select control planes; a
//! flag wins over its variable, which wins over the file; `config show`
//! says which did.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use procurator_integration_tests::process::run_with_timeout;
use procurator_integration_tests::{CmdOutput, ControlPlane, NixEnv, Pki};
use serde_json::{Value, json};

/// procurator-ctl with `config` as its config file, `env` as the only
/// PROCURATOR_* variables, and `args`.
fn ctl(config: &Path, env: &[(&str, &str)], args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(procurator_integration_tests::bin("procurator-ctl").expect("ctl"));
    for (var, _) in std::env::vars().filter(|(v, _)| v.starts_with("PROCURATOR_")) {
        cmd.env_remove(var);
    }
    cmd.env("PROCURATOR_CONFIG", config)
        .envs(env.iter().copied())
        .args(args);
    run_with_timeout(cmd, Duration::from_secs(60)).expect("procurator-ctl")
}

/// How many deployments the control plane the settings point at lists.
fn deployments(config: &Path, env: &[(&str, &str)], args: &[&str]) -> usize {
    let mut all = args.to_vec();
    all.extend(["deployments", "--output", "json"]);
    let out = ctl(config, env, &all);
    out.expect_code(0).expect("deployments");
    let list: Value = serde_json::from_str(&out.stdout).expect("json");
    list.as_array().map_or(0, Vec::len)
}

#[test]
fn contexts_select_control_planes_and_flags_beat_variables_beat_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nix = NixEnv::in_dir(&dir.path().join("nix")).expect("nix");
    let pki = Pki::init(&nix, &dir.path().join("pki")).expect("pki");
    let a = ControlPlane::start(&nix, &dir.path().join("cp-a"), &pki).expect("cp a");
    let b = ControlPlane::start(&nix, &dir.path().join("cp-b"), &pki).expect("cp b");
    let (url_a, url_b) = (a.url().expect("url"), b.url().expect("url"));
    let operator = pki.operator();
    // Paths relative to the file, as an operator would write them.
    std::fs::copy(pki.ca(), dir.path().join("ca.crt")).expect("ca");
    let config = dir.path().join("config.toml");
    let file = format!(
        "current-context = \"b\"\n\n\
         [contexts.a]\ncontrol-plane = \"{url_a}\"\ntls-ca = \"ca.crt\"\ntls-cert = \"{cert}\"\ntls-key = \"{key}\"\n\n\
         [contexts.b]\ncontrol-plane = [\"{url_b}\"]\ntls-ca = \"ca.crt\"\ntls-cert = \"{cert}\"\ntls-key = \"{key}\"\n",
        cert = operator.cert.display(),
        key = operator.key.display(),
    );
    std::fs::write(&config, file).expect("config");

    // One deployment, on a only.
    let artifact = dir.path().join("deployment.json");
    let closure = format!("/nix/store/{}-nixos-system-web-1", "a".repeat(32));
    let deployment = json!({
        "gitCommit": "3f2c1a9b8e7d6c5b4a3928170f6e5d4c3b2a1908",
        "blueprint": { "web-1": {
            "role": "web", "cpu": 1, "memory": { "amount": 1, "unit": "GB" },
            "deployment": { "addr": "192.0.2.1", "backend": "nixos" }
        }},
        "closures": { "web-1": closure },
    });
    std::fs::write(&artifact, deployment.to_string()).expect("artifact");
    let submitted = ctl(
        &config,
        &[],
        &[
            "--context",
            "a",
            "submit",
            artifact.to_str().expect("utf-8"),
        ],
    );
    submitted.expect_code(0).expect("submit to a");

    assert_eq!(deployments(&config, &[], &[]), 0, "current-context b");
    assert_eq!(deployments(&config, &[], &["--context", "a"]), 1);
    assert_eq!(deployments(&config, &[("PROCURATOR_CONTEXT", "a")], &[]), 1);
    assert_eq!(
        deployments(&config, &[("PROCURATOR_CONTEXT", "a")], &["--context", "b"]),
        0,
        "the flag over the variable"
    );
    let to_a = [("PROCURATOR_CONTROL_PLANE", url_a.as_str())];
    assert_eq!(
        deployments(&config, &to_a, &[]),
        1,
        "the variable over context b"
    );
    assert_eq!(
        deployments(&config, &to_a, &["--control-plane", &url_b]),
        0,
        "the flag over the variable"
    );

    let show = ctl(&config, &to_a, &["config", "show", "--output", "json"]);
    show.expect_code(0).expect("config show");
    let shown: Value = serde_json::from_str(&show.stdout).expect("json");
    assert_eq!(shown["context"], "b", "{shown}");
    assert_eq!(shown["contextFrom"], "current-context", "{shown}");
    let setting = |name: &str| &shown["settings"][name];
    assert_eq!(setting("control-plane")["value"], url_a.as_str(), "{shown}");
    assert_eq!(setting("control-plane")["from"]["kind"], "env", "{shown}");
    assert_eq!(setting("tls-ca")["from"]["kind"], "context", "{shown}");
    assert_eq!(
        setting("tls-ca")["value"],
        dir.path().join("ca.crt").display().to_string(),
        "{shown}"
    );
    assert_eq!(setting("intent-key")["from"]["kind"], "unset", "{shown}");
    let text = ctl(&config, &[], &["--context", "a", "config", "show"]);
    text.expect_code(0).expect("config show");
    assert!(
        text.stdout.contains("context: a (from --context)"),
        "{text}"
    );
    assert!(
        text.stdout
            .contains(&format!("context a in {}", config.display())),
        "{text}"
    );

    let unknown = ctl(&config, &[], &["--context", "prod", "status"]);
    assert_eq!(unknown.code, Some(1), "{unknown}");
    assert!(unknown.stderr.contains("it holds: a, b"), "{unknown}");
}
