//! What the tests of the CI commands (`plan`, `publish`, `artifact`, `ci`)
//! share: `procurator-ctl` run with a test's own Nix environment and no
//! control plane, a flake whose machine fails to build or evaluate, and
//! readers for the commands' JSON.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::ctl::{CLIENT_TIMEOUT, CmdOutput};
use crate::nixenv::NixEnv;
use crate::pki::Pki;
use crate::process::run_with_timeout;

/// `procurator-ctl ARGS…` with `nix`'s configuration and cache from `nix`,
/// and no connection settings (plan, publish and artifact need none).
pub fn ctl(nix: &NixEnv, args: &[&str]) -> Result<CmdOutput> {
    let mut cmd = nix.command(crate::bin("procurator-ctl")?);
    cmd.args(args)
        .env_remove("PROCURATOR_CONTROL_PLANE")
        .env_remove("PROCURATOR_TLS_CA")
        .env_remove("PROCURATOR_TLS_CERT")
        .env_remove("PROCURATOR_TLS_KEY");
    run_with_timeout(cmd, CLIENT_TIMEOUT)
}

/// Every fixture machine with the same `change`.
pub fn all_machines(change: &str) -> BTreeMap<String, String> {
    crate::MACHINES
        .iter()
        .map(|m| (m.to_string(), change.to_owned()))
        .collect()
}

/// `plan --flake DIR [--previous FILE] --output json`, which must exit 0.
pub fn plan_json(nix: &NixEnv, flake: &Path, previous: Option<&Path>) -> Result<Value> {
    let mut args = vec!["plan", "--flake", arg(flake)?, "--output", "json"];
    if let Some(previous) = previous {
        args.extend(["--previous", arg(previous)?]);
    }
    let out = ctl(nix, &args)?;
    out.expect_code(0)?;
    stdout_json(&out)
}

/// `artifact --flake DIR --out FILE` with a fresh commit id; must exit 0.
pub fn write_artifact(nix: &NixEnv, flake: &Path, out: &Path) -> Result<()> {
    let commit = crate::commit_id();
    let args = [
        "artifact",
        "--flake",
        arg(flake)?,
        "--out",
        arg(out)?,
        "--git-commit",
        &commit,
    ];
    ctl(nix, &args)?.expect_code(0)?;
    Ok(())
}

/// A path as an argument.
pub fn arg(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// How a failing machine fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breakage {
    /// Its toplevel throws while being evaluated.
    Evaluation,
    /// Its toplevel's builder exits 1.
    Build,
}

/// Writes into `dir` a one-machine flake (`broken`) with a valid blueprint
/// whose toplevel fails as `how` says. No git there: a plain `path:` flake.
pub fn write_broken_flake(dir: &Path, how: Breakage) -> Result<()> {
    crate::mkdir(dir)?;
    let toplevel = match how {
        Breakage::Evaluation => r#"throw "machine broken does not evaluate on purpose""#,
        Breakage::Build => {
            r#"builtins.derivation {
        name = "nixos-system-broken";
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" "echo the builder of broken fails on purpose >&2; exit 1" ];
      }"#
        }
    };
    let flake = format!(
        r#"{{
  outputs = {{ self }}: {{
    blueprintJSON.broken = {{
      role = "worker"; cpu = 1; memory = {{ amount = 1; unit = "GB"; }};
      deployment = {{ addr = "10.231.0.99"; backend = "nixos"; }};
    }};
    nixosConfigurations.broken.config.system.build.toplevel =
      {toplevel};
  }};
}}
"#
    );
    std::fs::write(dir.join("flake.nix"), flake).context("writing the broken flake")
}

/// Runs `artifact` and `ci` (against the control plane at `control_plane`,
/// which `ci` asks what the fleet runs before it builds) on a broken flake;
/// each must exit `code`, show `message` without ANSI colour, and leave no
/// artifact and no cache.
pub fn fails_without_artifact(
    nix: &NixEnv,
    pki: &Pki,
    control_plane: &str,
    flake: &Path,
    code: i32,
    message: &str,
) -> Result<()> {
    let out_file = flake.join("deployment.json");
    let (out, flake_arg) = (arg(&out_file)?, arg(flake)?);
    let commit = crate::commit_id();
    let (ci_identity, ca) = (pki.identity("ci", "github"), pki.ca());
    let cache = format!("file://{}", flake.join("cache").display());
    let artifact = vec![
        "artifact",
        "--flake",
        flake_arg,
        "--out",
        out,
        "--git-commit",
        &commit,
    ];
    let mut ci = vec![
        "ci",
        "--flake",
        flake_arg,
        "--publish-to",
        &cache,
        "--out",
        out,
    ];
    ci.extend(["--git-commit", &commit, "--control-plane", control_plane]);
    ci.extend(["--tls-ca", arg(&ca)?, "--tls-cert", arg(&ci_identity.cert)?]);
    ci.extend(["--tls-key", arg(&ci_identity.key)?]);
    for args in [artifact, ci] {
        let result = ctl(nix, &args)?;
        result.expect_code(code)?;
        ensure!(result.stderr.contains(message), "no {message:?}: {result}");
        ensure!(!result.all().contains('\u{1b}'), "ANSI codes: {result:?}");
        if args[0] == "ci" {
            ensure!(
                result.stderr.contains("without --signing-key"),
                "ci without --signing-key warns: {result}"
            );
        }
        ensure!(!out_file.exists(), "an artifact was left behind: {result}");
        ensure!(
            !flake.join("cache").exists(),
            "something was published: {result}"
        );
    }
    Ok(())
}

/// Machine name -> `change` of `plan --output json` (or of `ci`'s summary).
pub fn changes(plan: &Value) -> Result<BTreeMap<String, String>> {
    plan.get("machines")
        .and_then(Value::as_array)
        .with_context(|| format!("no machines in {plan}"))?
        .iter()
        .map(|m| {
            let name = m.get("name").and_then(Value::as_str);
            let change = m.get("change").and_then(Value::as_str);
            match (name, change) {
                (Some(n), Some(c)) => Ok((n.to_owned(), c.to_owned())),
                _ => anyhow::bail!("a machine without name or change: {m}"),
            }
        })
        .collect()
}

/// The one JSON object a command printed on stdout.
pub fn stdout_json(out: &CmdOutput) -> Result<Value> {
    serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("stdout is not one JSON object: {out}"))
}
