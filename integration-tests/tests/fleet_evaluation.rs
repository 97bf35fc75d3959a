//! The CI commands evaluate the whole fleet in one evaluator and build it
//! with one `nix build`, and still name each machine that fails: on
//! generated flakes of many trivial machines, with a `nix` on PATH that
//! logs how it was called.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use procurator_integration_tests::NixEnv;
use procurator_integration_tests::ci::{self, arg};
use serde_json::Value;

/// Writes a flake of `count` machines `m-0`…; machine `eval_error` throws
/// when evaluated, `build_error`'s builder exits 1.
fn generated_flake(
    dir: &Path,
    count: usize,
    eval_error: Option<usize>,
    build_error: Option<usize>,
) {
    std::fs::create_dir_all(dir).expect("dir");
    let special =
        |index: Option<usize>| index.map_or_else(|| "null".to_owned(), |i| format!("\"m-{i}\""));
    let flake = format!(
        r#"{{
  outputs = {{ self }}:
    let
      names = builtins.genList (i: "m-${{toString i}}") {count};
      machine = i: {{
        role = "worker"; cpu = 1; memory = {{ amount = 1; unit = "GB"; }};
        deployment = {{ addr = "10.0.${{toString (i / 250)}}.${{toString (i - i / 250 * 250 + 1)}}"; backend = "nixos"; }};
      }};
      evalError = {eval_error};
      buildError = {build_error};
      toplevel = name:
        if name == evalError then throw "machine ${{name}} does not evaluate on purpose"
        else builtins.derivation {{
          name = "nixos-system-${{name}}";
          system = "x86_64-linux";
          builder = "/bin/sh";
          args = [ "-c" (if name == buildError
            then "echo the builder of ${{name}} fails on purpose >&2; exit 1"
            else "echo ${{name}} > $out") ];
        }};
    in {{
      blueprintJSON = builtins.listToAttrs (builtins.genList (i: {{ name = "m-${{toString i}}"; value = machine i; }}) {count});
      nixosConfigurations = builtins.listToAttrs (map (name: {{
        inherit name;
        value.config.system.build.toplevel = toplevel name;
      }}) names);
    }};
}}
"#,
        eval_error = special(eval_error),
        build_error = special(build_error),
    );
    std::fs::write(dir.join("flake.nix"), flake).expect("flake.nix");
}

/// A `nix` that logs each call's arguments, one line each, then runs the
/// real one: PATH for `procurator-ctl`, and the log.
fn logging_nix(dir: &Path) -> (String, PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let log = dir.join("nix-calls.log");
    let real = which("nix");
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
        log.display(),
        real.display()
    );
    let wrapper = bin.join("nix");
    std::fs::write(&wrapper, script).expect("wrapper");
    let mut permissions = std::fs::metadata(&wrapper).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&wrapper, permissions).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (path, log)
}

fn which(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no {program} on PATH"))
}

/// `plan --output json EXTRA…` with `nix` on `path`; the whole output.
fn plan(
    nix: &NixEnv,
    flake: &Path,
    path: &str,
    extra: &[&str],
) -> procurator_integration_tests::CmdOutput {
    let mut cmd = nix.command(procurator_integration_tests::bin("procurator-ctl").expect("ctl"));
    cmd.args([
        "plan",
        "--flake",
        arg(flake).expect("utf-8"),
        "--output",
        "json",
    ])
    .args(extra)
    .env("PATH", path);
    procurator_integration_tests::process::run_with_timeout(
        cmd,
        std::time::Duration::from_secs(600),
    )
    .expect("plan")
}

/// How many machines the output lists as built.
fn built_listed(out: &procurator_integration_tests::CmdOutput) -> usize {
    out.stderr
        .lines()
        .filter(|l| l.starts_with("built m-"))
        .count()
}

fn closures(plan: &Value) -> BTreeMap<String, String> {
    plan["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_owned(),
                m["closure"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn thirty_machines_take_one_evaluator_and_one_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nix = NixEnv::in_dir(&dir.path().join("nix")).expect("nix");
    let flake = dir.path().join("flake");
    generated_flake(&flake, 30, None, None);
    let (path, log) = logging_nix(dir.path());

    let out = plan(&nix, &flake, &path, &[]);
    out.expect_code(0).expect("plan");
    let planned = closures(&ci::stdout_json(&out).expect("json"));
    assert_eq!(planned.len(), 30, "{out}");
    let calls = std::fs::read_to_string(&log).expect("log");
    let count = |verb: &str| calls.lines().filter(|l| l.starts_with(verb)).count();
    assert_eq!(count("eval "), 1, "one evaluator: {calls}");
    assert_eq!(count("build "), 1, "one build: {calls}");

    // The same closures as each machine built on its own.
    for (machine, closure) in &planned {
        let installable = format!(
            "{}#nixosConfigurations.\"{machine}\".config.system.build.toplevel",
            flake.display()
        );
        let built = nix
            .run("nix", ["build", "--no-link", "--json", &installable])
            .expect("nix build");
        let built: Value = serde_json::from_str(&built.stdout).expect("json");
        assert_eq!(built[0]["outputs"]["out"], closure.as_str(), "{machine}");
    }

    // Shared among evaluators, the same again.
    let path = std::env::var("PATH").unwrap_or_default();
    let out = plan(&nix, &flake, &path, &["--eval-workers", "3"]);
    out.expect_code(0).expect("plan with 3 evaluators");
    assert_eq!(closures(&ci::stdout_json(&out).expect("json")), planned);
}

#[test]
fn a_machine_that_does_not_evaluate_or_build_is_named_and_the_rest_built() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nix = NixEnv::in_dir(&dir.path().join("nix")).expect("nix");
    let path = std::env::var("PATH").unwrap_or_default();

    let flake = dir.path().join("eval");
    generated_flake(&flake, 10, Some(3), None);
    let out = plan(&nix, &flake, &path, &[]);
    assert_eq!(out.code, Some(4), "{out}");
    assert!(
        out.stderr.contains("machine m-3")
            && out
                .stderr
                .contains("machine m-3 does not evaluate on purpose"),
        "{out}"
    );
    let built = built_listed(&out);
    assert_eq!(built, 9, "the other 9 are built and listed: {out}");
    assert!(!out.stderr.contains("built m-3:"), "{out}");

    let flake = dir.path().join("build");
    generated_flake(&flake, 10, None, Some(7));
    let out = plan(&nix, &flake, &path, &[]);
    assert_eq!(out.code, Some(5), "{out}");
    assert!(
        out.stderr.contains("machine m-7 failed to build")
            && out.stderr.contains("the builder of m-7 fails on purpose"),
        "{out}"
    );
    let built = built_listed(&out);
    assert_eq!(built, 9, "{out}");
}
