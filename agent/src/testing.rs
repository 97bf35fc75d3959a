//! Test hosts: NixOS-shaped closures built with real Nix whose
//! `switch-to-configuration` moves links in a temporary directory, and a
//! signed `file://` cache to copy them from.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use procurator_core::StorePath;
use procurator_core::nix::Nix;
use procurator_proto::v1::{MachineState, Progress};

use crate::activation::{Activator, ProgressSink, Settings};
use crate::journal::Journal;
use crate::system::SystemPaths;

const NIX_CONF: &str = "experimental-features = nix-command flakes
build-users-group =
substituters =
sandbox = true
sandbox-paths = /bin/sh=/bin/busybox
";

/// How a fixture closure's `switch-to-configuration` behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    pub fail_test: bool,
    pub fail_boot: bool,
    /// `kernel`, `initrd` and `kernel-modules` link into a kernel package
    /// built from this content (the same content: the same store path).
    pub kernel: Option<&'static str>,
    /// `test` prints a line, waits, prints another and waits again.
    pub slow_test: bool,
}

pub struct Host {
    pub dir: tempfile::TempDir,
    pub nix: Nix,
    pub paths: SystemPaths,
    pub cache: String,
    pub public_key: String,
    secret_key: PathBuf,
}

impl Host {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("nix.conf"), NIX_CONF).unwrap();
        std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let nix = Nix::new().with_env("NIX_CONF_DIR", &conf);
        let paths = SystemPaths {
            current_system: dir.path().join("current-system"),
            booted_system: dir.path().join("booted-system"),
            profile: dir.path().join("profiles/system"),
        };
        let secret_key = dir.path().join("cache.sk");
        let secret = nix_stdout(
            &conf,
            &["key", "generate-secret", "--key-name", "test-cache-1"],
            b"",
        )
        .await;
        std::fs::write(&secret_key, &secret).unwrap();
        let public_key = nix_stdout(&conf, &["key", "convert-secret-to-public"], &secret).await;
        let cache = format!("file://{}", dir.path().join("cache").display());
        Host {
            nix,
            paths,
            cache,
            public_key: String::from_utf8(public_key).unwrap().trim().into(),
            secret_key,
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Builds a system closure named after `tag`, publishes it to the
    /// host's signed cache and returns it.
    pub async fn system(&self, tag: &str, behaviour: Behaviour) -> StorePath {
        let dir = self.dir.path().display();
        let fail_test = if behaviour.fail_test {
            format!("echo 'activation of {tag} failed' >&2; exit 4;")
        } else {
            String::new()
        };
        let slow_test = if behaviour.slow_test {
            "echo 'first half'; sleep 1; echo 'second half'; sleep 1;"
        } else {
            ""
        };
        let fail_boot = if behaviour.fail_boot {
            format!("echo 'boot entry for {tag} failed' >&2; exit 5;")
        } else {
            String::new()
        };
        let (kernel_let, kernel_links) = match behaviour.kernel {
            Some(content) => (
                format!(
                    r#"let kernel = builtins.derivation {{
  name = "linux-{content}";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "mkdir -p $out/lib/modules; echo {content} > $out/bzImage; echo {content} > $out/initrd" ];
}}; in "#
                ),
                "ln -s ${kernel}/bzImage $out/kernel; ln -s ${kernel}/initrd $out/initrd; ln -s ${kernel}/lib $out/kernel-modules",
            ),
            None => (String::new(), ""),
        };
        // `$out` is expanded while building, `\$1` when the script runs.
        let expr = format!(
            r#"{kernel_let}builtins.derivation {{
  name = "nixos-system-{tag}";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" ''
    mkdir -p $out/bin
    cat > $out/bin/switch-to-configuration <<EOF
    #!/bin/sh
    echo "{tag} \$1" >> {dir}/calls
    case "\$1" in
      test|switch) {slow_test} {fail_test} ln -sfn $out {dir}/current-system ;;
    esac
    case "\$1" in
      boot|switch) {fail_boot} ln -sfn $out {dir}/boot-entry ;;
    esac
    EOF
    chmod +x $out/bin/switch-to-configuration
    echo {tag} > $out/nixos-version
    {kernel_links}
  '' ];
}}"#
        );
        let built = self
            .nix
            .build(&["--impure", "--expr", &expr])
            .await
            .unwrap();
        let closure = built.into_iter().next().unwrap();
        let signed = format!("{}?secret-key={}", self.cache, self.secret_key.display());
        self.nix
            .copy_to(&signed, std::slice::from_ref(&closure))
            .await
            .unwrap();
        closure
    }

    /// Makes `closure` the running system, as if it had been booted.
    pub fn run(&self, closure: &StorePath) {
        let link = &self.paths.current_system;
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(closure.as_str(), link).unwrap();
    }

    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn resolve(&self, name: &str) -> Option<String> {
        crate::system::resolve(&self.path(name))
    }

    pub fn activator(&self) -> Activator {
        Activator {
            nix: self.nix.clone(),
            paths: self.paths.clone(),
            substituters: vec![self.cache.clone()],
            trusted_keys: vec![self.public_key.clone()],
            journal: Journal::new(&self.path("state")),
            settings: Settings::default(),
            confirmer: None,
        }
    }
}

/// A progress sink that remembers everything.
pub fn recorder() -> (ProgressSink, Arc<Mutex<Vec<Progress>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink: ProgressSink = Arc::new({
        let seen = seen.clone();
        move |p| seen.lock().unwrap().push(p)
    });
    (sink, seen)
}

/// The states of `progress`, without repeats in a row.
pub fn states(progress: &Mutex<Vec<Progress>>) -> Vec<MachineState> {
    let mut states: Vec<MachineState> = progress
        .lock()
        .unwrap()
        .iter()
        .map(Progress::state)
        .collect();
    states.dedup();
    states
}

async fn nix_stdout(conf: &Path, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new("nix")
        .args(args)
        .env("NIX_CONF_DIR", conf)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "nix {args:?} failed");
    out.stdout
}

/// Waits until `condition` holds, failing the test after a deadline.
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
