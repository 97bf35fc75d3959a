//! The fleet PKI, made by the real `procurator-ctl pki`, and a Nix signing
//! key pair for the binary cache. Generated inside each test: no private key
//! is checked in.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::nixenv::NixEnv;

/// A certificate and its key.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A directory written by `procurator-ctl pki init` (docs/interfaces.md).
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// `procurator-ctl pki init --dir DIR`: a CA, the control plane's
    /// certificate and `operator-admin`.
    pub fn init(nix: &NixEnv, dir: &Path) -> Result<Self> {
        Self::init_with_sans(nix, dir, &[])
    }

    /// `pki init --san NAME…`: the control plane's certificate also names
    /// `sans` (e.g. its address inside a network namespace).
    pub fn init_with_sans(nix: &NixEnv, dir: &Path, sans: &[&str]) -> Result<Self> {
        let ctl = crate::bin("procurator-ctl")?;
        let dir_arg = dir.to_string_lossy().into_owned();
        let mut args = vec!["pki", "init", "--dir", dir_arg.as_str()];
        for san in sans {
            args.extend(["--san", san]);
        }
        nix.run(ctl.to_string_lossy().as_ref(), args)
            .context("procurator-ctl pki init")?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// `procurator-ctl pki issue --role ROLE --name NAME`.
    pub fn issue(&self, nix: &NixEnv, role: &str, name: &str) -> Result<Identity> {
        self.issue_with(nix, role, name, &[])
    }

    /// `procurator-ctl pki issue --role ROLE --name NAME EXTRA…`, e.g.
    /// `--vm-host --force` to make a machine's agent a VM host.
    pub fn issue_with(
        &self,
        nix: &NixEnv,
        role: &str,
        name: &str,
        extra: &[&str],
    ) -> Result<Identity> {
        let ctl = crate::bin("procurator-ctl")?;
        let dir_arg = self.dir.to_string_lossy().into_owned();
        let mut args = vec![
            "pki",
            "issue",
            "--dir",
            dir_arg.as_str(),
            "--role",
            role,
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        nix.run(ctl.to_string_lossy().as_ref(), args)
            .with_context(|| {
                format!(
                    "procurator-ctl pki issue --role {role} --name {name} {}",
                    extra.join(" ")
                )
            })?;
        let id = self.identity(role, name);
        anyhow::ensure!(
            id.cert.is_file(),
            "pki issue wrote no {}",
            id.cert.display()
        );
        Ok(id)
    }

    /// `procurator-ctl pki intermediate`: an issuing CA below the fleet CA,
    /// for the control plane to sign agents' certificates with.
    pub fn intermediate(&self, nix: &NixEnv) -> Result<Identity> {
        let ctl = crate::bin("procurator-ctl")?;
        let dir_arg = self.dir.to_string_lossy().into_owned();
        nix.run(
            ctl.to_string_lossy().as_ref(),
            ["pki", "intermediate", "--dir", dir_arg.as_str()],
        )
        .context("procurator-ctl pki intermediate")?;
        Ok(Identity {
            cert: self.dir.join("issuing-ca.crt"),
            key: self.dir.join("issuing-ca.key"),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The files `pki issue` writes for ROLE and NAME: `<role>-<name>.crt`/`.key`,
    /// or `control-plane.crt`/`.key` for the control plane's, whatever its name.
    pub fn identity(&self, role: &str, name: &str) -> Identity {
        if role == "control-plane" {
            return self.control_plane();
        }
        Identity {
            cert: self.dir.join(format!("{role}-{name}.crt")),
            key: self.dir.join(format!("{role}-{name}.key")),
        }
    }

    /// The operator certificate `pki init` makes.
    pub fn operator(&self) -> Identity {
        self.identity("operator", "admin")
    }

    pub fn control_plane(&self) -> Identity {
        Identity {
            cert: self.dir.join("control-plane.crt"),
            key: self.dir.join("control-plane.key"),
        }
    }

    pub fn agent(&self, machine: &str) -> Identity {
        self.identity("agent", machine)
    }
}

/// A binary-cache signing key pair (`nix key generate-secret`).
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub secret: PathBuf,
    /// `NAME:base64`, as `trusted-public-keys` wants it.
    pub public: String,
}

impl SigningKey {
    pub fn generate(nix: &NixEnv, dir: &Path, name: &str) -> Result<Self> {
        crate::mkdir(dir)?;
        let secret_key = nix
            .run("nix", ["key", "generate-secret", "--key-name", name])?
            .stdout;
        let secret = dir.join(format!("{name}.secret"));
        std::fs::write(&secret, &secret_key).context("writing the secret key")?;
        let mut cmd = nix.command("nix");
        cmd.args(["key", "convert-secret-to-public"]);
        cmd.stdin(std::fs::File::open(&secret)?);
        let out = cmd.output().context("nix key convert-secret-to-public")?;
        anyhow::ensure!(
            out.status.success(),
            "nix key convert-secret-to-public: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public = String::from_utf8(out.stdout)?.trim().to_owned();
        std::fs::write(dir.join(format!("{name}.public")), &public)?;
        Ok(Self { secret, public })
    }
}
