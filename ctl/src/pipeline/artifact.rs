//! `deployment.json`: `{gitCommit, blueprint, closures}` put together from
//! what was built, validated as the control plane would, and written so
//! that the file is either whole or not there.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};
use procurator_core::DeploymentArtifact;
use procurator_core::artifact::GitCommit;
use procurator_core::atomic_file;
use serde_json::{Value, json};

use super::Evaluated;

/// The commit an artifact is stamped with: `gitCommit`, and `gitCommitTime`
/// (committer time, Unix seconds) when it is known, so the control plane can
/// refuse an artifact older than the one in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub sha: GitCommit,
    pub time: Option<i64>,
}

impl Commit {
    /// For artifacts that are only checked, never written (`plan`).
    pub fn placeholder() -> anyhow::Result<Self> {
        Ok(Self {
            sha: GitCommit::try_from("0".repeat(40)).map_err(|e| anyhow!("{e}"))?,
            time: None,
        })
    }
}

/// `--git-commit` (with `--git-commit-time`, else now: the time of signing)
/// if given, else `git -C DIR rev-parse HEAD` and the commit's committer
/// time. Always with a time, so the control plane can order the artifact.
pub fn resolve_commit(
    flake_dir: &Path,
    given: Option<&str>,
    given_time: Option<i64>,
) -> anyhow::Result<Commit> {
    if let Some(sha) = given {
        let sha =
            GitCommit::try_from(sha.trim().to_owned()).map_err(|e| anyhow!("--git-commit: {e}"))?;
        // Not from git: the time is what the caller says, or now.
        let now = procurator_core::now_ms() / 1000;
        return Ok(Commit {
            sha,
            time: Some(given_time.unwrap_or(now)),
        });
    }
    let sha = git(flake_dir, &["rev-parse", "HEAD"])?;
    let sha = GitCommit::try_from(sha).map_err(|e| anyhow!("git rev-parse HEAD printed {e}"))?;
    let time = git(flake_dir, &["show", "-s", "--format=%ct", "HEAD"])?;
    let time = time.parse::<i64>().map_err(|e| {
        anyhow!("git show -s --format=%ct HEAD printed {time:?}, not a Unix time: {e}")
    })?;
    Ok(Commit {
        sha,
        time: Some(time),
    })
}

/// `git -C DIR ARGS…`'s trimmed stdout, or an error saying how to do without git.
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let advice = "run it inside a git checkout of the flake, or pass --git-commit SHA";
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .with_context(|| format!("cannot run git to find the flake's commit; {advice}"))?;
    if !output.status.success() {
        bail!(
            "cannot tell which commit {} is at: `git -C {} {}` failed: {}; {advice}",
            dir.display(),
            dir.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The artifact as it will be written and submitted: the blueprint (and
/// `rollout`, from `--rollout`) exactly as given. Parsed back with
/// [`DeploymentArtifact::from_json`], so what is written is what the control
/// plane accepts.
pub fn render(
    commit: &Commit,
    rollout: Option<&Value>,
    evaluated: &Evaluated,
) -> anyhow::Result<(DeploymentArtifact, String)> {
    let mut value = json!({
        "gitCommit": commit.sha.as_str(),
        "blueprint": evaluated.blueprint,
        "closures": evaluated.closures,
    });
    if let Some(time) = commit.time {
        value["gitCommitTime"] = time.into();
    }
    if let Some(rollout) = rollout {
        value["rollout"] = rollout.clone();
    }
    let mut text = serde_json::to_string_pretty(&value).context("cannot serialize the artifact")?;
    text.push('\n');
    let artifact = DeploymentArtifact::from_json(text.as_bytes())
        .context("the deployment artifact would not be valid; nothing was written")?;
    Ok((artifact, text))
}

/// Writes `text` to `path` so that a reader sees the old file or the new
/// one, never half of one.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    atomic_file::write_atomically(path, text.as_bytes(), atomic_file::PUBLIC).with_context(|| {
        format!(
            "cannot write {}; check that its directory exists and is writable",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use procurator_core::{MachineName, StorePath};

    use super::*;

    fn evaluated() -> Evaluated {
        let blueprint = json!({
            "worker-1": {
                "role": "worker", "cpu": 2, "memory": {"amount": 4, "unit": "GB"},
                "deployment": {"addr": "10.0.0.1", "backend": "nixos"}
            }
        });
        let m = MachineName::parse("worker-1").unwrap();
        let closure =
            StorePath::parse("/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1")
                .unwrap();
        Evaluated {
            specs: serde_json::from_value(blueprint.clone()).unwrap(),
            closures: BTreeMap::from([(m, closure)]),
            blueprint,
        }
    }

    fn commit(time: Option<i64>) -> Commit {
        Commit {
            sha: GitCommit::try_from("3F2C1A9".to_owned()).unwrap(),
            time,
        }
    }

    #[test]
    fn the_blueprint_is_written_as_evaluated() {
        let (artifact, text) = render(&commit(None), None, &evaluated()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Not normalized: no defaults (replicas, sshPort) were added.
        assert_eq!(value["blueprint"], evaluated().blueprint);
        assert_eq!(value["gitCommit"], "3f2c1a9");
        assert_eq!(artifact.blueprint.len(), 1);
        assert_eq!(value.get("gitCommitTime"), None);
        assert_eq!(value.get("rollout"), None);
    }

    #[test]
    fn commit_time_and_rollout_are_written_and_checked() {
        let rollout = json!({"waves": [{"name": "canary", "machines": ["worker-1"]}]});
        let (artifact, text) =
            render(&commit(Some(1_748_762_102)), Some(&rollout), &evaluated()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["gitCommitTime"], 1_748_762_102);
        assert_eq!(value["rollout"], rollout);
        assert_eq!(artifact.git_commit_time, Some(1_748_762_102));
        assert_eq!(artifact.waves()[0].name, "canary");

        let unknown = json!({"waves": [{"name": "canary", "machines": ["worker-9"]}]});
        let err = render(&commit(None), Some(&unknown), &evaluated()).unwrap_err();
        assert!(format!("{err:#}").contains("worker-9"), "{err:#}");
    }

    #[test]
    fn a_commit_from_git_has_its_committer_time() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .env("GIT_COMMITTER_DATE", "@1748762102 +0000")
                .env("GIT_AUTHOR_DATE", "@1748762102 +0000")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(ok, "git {args:?}");
        };
        if Command::new("git").arg("--version").output().is_err() {
            return; // No git here: nothing to test against.
        }
        run(&["init", "-q"]);
        run(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ]);
        let commit = resolve_commit(dir.path(), None, None).unwrap();
        assert_eq!(commit.time, Some(1_748_762_102));
        assert_eq!(commit.sha.as_str().len(), 40);
        let given = resolve_commit(dir.path(), Some("abcdef0"), None).unwrap();
        let now = procurator_core::now_ms() / 1000;
        let time = given.time.unwrap();
        assert!(
            (now - 5..=now).contains(&time),
            "a given commit is stamped now: {time}"
        );
        let given = resolve_commit(dir.path(), Some("abcdef0"), Some(5)).unwrap();
        assert_eq!(given.time, Some(5));
    }

    #[test]
    fn a_given_commit_is_checked() {
        let err = resolve_commit(Path::new("/"), Some("not-a-sha"), None).unwrap_err();
        assert!(err.to_string().contains("--git-commit"), "{err}");
        let ok = resolve_commit(Path::new("/"), Some("abcdef0"), None).unwrap();
        assert_eq!(ok.sha.as_str(), "abcdef0");
    }

    #[test]
    fn without_git_the_error_says_to_pass_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_commit(dir.path(), None, None).unwrap_err();
        assert!(format!("{err:#}").contains("--git-commit"), "{err:#}");
    }

    #[test]
    fn writing_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deployment.json");
        std::fs::write(&path, "old").unwrap();
        write_atomically(&path, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
        let err = write_atomically(&dir.path().join("missing/deployment.json"), "x").unwrap_err();
        assert!(
            err.to_string()
                .contains("check that its directory exists and is writable"),
            "{err}"
        );
    }
}
