//! The CI commands evaluate the whole fleet in one evaluator and build it
//! with one `nix build`, and still name each machine that fails: on
//! generated flakes of many trivial machines, with a `nix` on PATH that
//! logs how it was called. `ci` with its control plane down builds nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use procurator_integration_tests::ci::{self, arg};
use procurator_integration_tests::{ControlPlane, NixEnv, Pki};
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
    let mut args = vec![
        "plan",
        "--flake",
        arg(flake).expect("utf-8"),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    ctl(nix, path, &args)
}

/// `procurator-ctl ARGS…` with `nix` on `path`, and no connection settings
/// but those in `args`.
fn ctl(nix: &NixEnv, path: &str, args: &[&str]) -> procurator_integration_tests::CmdOutput {
    let mut cmd = nix.command(procurator_integration_tests::bin("procurator-ctl").expect("ctl"));
    cmd.args(args)
        .env("PATH", path)
        .env_remove("PROCURATOR_CONTROL_PLANE");
    procurator_integration_tests::process::run_with_timeout(
        cmd,
        std::time::Duration::from_secs(600),
    )
    .expect("procurator-ctl")
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

/// `ci` asks the control plane what the fleet runs before anything else:
/// with it down, ci exits 1 having run no `nix build` (nor evaluated).
#[test]
fn ci_with_the_control_plane_down_builds_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nix = NixEnv::in_dir(&dir.path().join("nix")).expect("nix");
    let flake = dir.path().join("flake");
    generated_flake(&flake, 5, None, None);
    let (path, log) = logging_nix(dir.path());
    let pki = Pki::init(&nix, &dir.path().join("pki")).expect("pki");
    let ci_identity = pki.issue(&nix, "ci", "github").expect("ci cert");
    let mut control_plane =
        ControlPlane::start(&nix, &dir.path().join("cp"), &pki).expect("control plane");
    let url = control_plane.url().expect("url");
    control_plane.stop().expect("stop");

    let cache = dir.path().join("cache");
    let cache_uri = format!("file://{}", cache.display());
    let ca = pki.ca();
    let out = ctl(
        &nix,
        &path,
        &[
            "ci",
            "--flake",
            arg(&flake).expect("utf-8"),
            "--publish-to",
            &cache_uri,
            "--no-sign",
            "--git-commit",
            &procurator_integration_tests::commit_id(),
            "--control-plane",
            &url,
            "--tls-ca",
            arg(&ca).expect("utf-8"),
            "--tls-cert",
            arg(&ci_identity.cert).expect("utf-8"),
            "--tls-key",
            arg(&ci_identity.key).expect("utf-8"),
        ],
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("cannot reach the control plane")
            && out.stderr.contains("nothing was built or published"),
        "{out}"
    );
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !calls
            .lines()
            .any(|l| l.starts_with("build ") || l.starts_with("eval ")),
        "nothing evaluated or built: {calls}"
    );
    assert!(!cache.exists(), "nothing published: {out}");
}
