//! `procurator-ctl pki init|issue`: the fleet's CA and its certificates
//! (docs/interfaces.md, "Files of the fleet PKI").

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use procurator_core::Role;
use procurator_core::pki::{self, InitFiles, IssuedFiles};

use crate::{Outcome, output};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a fleet CA, the control plane's server certificate and an
    /// operator certificate.
    Init(InitArgs),
    /// Issue a certificate signed by the fleet CA: a client's, or the
    /// control plane's own (renewed, or with another --san).
    Issue(IssueArgs),
    /// Make an issuing CA below the fleet CA (issuing-ca.crt, .key) for the
    /// control plane to sign agents' certificates with, so that ca.key can
    /// stay offline.
    Intermediate(IntermediateArgs),
}

#[derive(Debug, clap::Args)]
pub struct IntermediateArgs {
    /// The directory holding the fleet CA (from `pki init`).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,

    /// Replace an existing issuing CA.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Where to write the CA and the certificates (created if missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,

    /// Another name or IP address the control plane is reached at, besides
    /// localhost, 127.0.0.1 and ::1 (repeatable).
    #[arg(long, value_name = "NAME")]
    pub san: Vec<String>,

    /// The name of the first operator's certificate.
    #[arg(long, value_name = "NAME", default_value = "admin")]
    pub operator: String,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The directory holding the fleet CA (from `pki init`).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,

    /// What the certificate's holder may do.
    #[arg(long, value_enum)]
    pub role: IssueRole,

    /// Who it is; for an agent, the machine's name in the blueprint.
    /// Required but for the control plane (default: control-plane).
    #[arg(long, value_name = "NAME", required_if_eq_any = [("role", "agent"), ("role", "ci"), ("role", "operator")])]
    pub name: Option<String>,

    /// A DNS name or IP address to add to the certificate (repeatable);
    /// the control plane's is also valid for localhost, 127.0.0.1 and ::1.
    #[arg(long, value_name = "S")]
    pub san: Vec<String>,

    /// Replace an existing certificate and key of the same name.
    #[arg(long)]
    pub force: bool,

    /// Let this agent host VMs: only an agent whose certificate says so may
    /// offer VM capacity (`procurator-agent --vm-host`).
    #[arg(long)]
    pub vm_host: bool,
}

/// The roles a certificate can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IssueRole {
    /// The control plane's server certificate (`control-plane.crt`), as
    /// `pki init` made it: to renew it or change its names (`--force`
    /// replaces the old one; a running control plane reloads it).
    ControlPlane,
    /// A machine's agent.
    Agent,
    /// CI: submits deployments.
    Ci,
    /// A person: submits, watches, inspects.
    Operator,
}

impl IssueRole {
    pub fn role(self) -> Role {
        match self {
            IssueRole::ControlPlane => Role::ControlPlane,
            IssueRole::Agent => Role::Agent,
            IssueRole::Ci => Role::Ci,
            IssueRole::Operator => Role::Operator,
        }
    }
}

pub fn run(command: Command) -> anyhow::Result<Outcome> {
    let text = match command {
        Command::Init(args) => {
            let files = pki::init(&args.dir, &args.san, &args.operator)?;
            init_text(&args.dir, &args.san, &files)
        }
        Command::Issue(args) => {
            let role = args.role.role();
            let name = args.name.as_deref().unwrap_or(pki::CONTROL_PLANE_NAME);
            let identity = pki::identity(role, name, args.vm_host)?;
            let sans = match role {
                Role::ControlPlane => pki::server_sans(&args.san),
                _ => args.san,
            };
            let files = pki::issue_for(&args.dir, &identity, &sans, args.force)?;
            issue_text(&args.dir, &files, &sans)
        }
        Command::Intermediate(args) => {
            let files = pki::intermediate(&args.dir, args.force)?;
            intermediate_text(&args.dir, &files)
        }
    };
    output::print(&text)?;
    Ok(Outcome::Success)
}

fn init_text(dir: &Path, sans: &[String], files: &InitFiles) -> String {
    let names = pki::server_sans(sans);
    let cp = &files.control_plane;
    let op = &files.operator;
    let mut out = String::new();
    let _ = writeln!(out, "Created the fleet PKI in {}:", dir.display());
    let _ = writeln!(
        out,
        "  {}  the fleet CA certificate: every party trusts it",
        files.ca_cert.display()
    );
    let _ = writeln!(
        out,
        "  {}  the CA's key (mode 0600): it can mint any identity; keep it offline",
        files.ca_key.display()
    );
    let _ = writeln!(
        out,
        "  {}, {}  the control plane's server certificate, valid for {}",
        cp.cert.display(),
        cp.key.display(),
        names.join(", ")
    );
    let _ = writeln!(
        out,
        "  {}, {}  {}",
        op.cert.display(),
        op.key.display(),
        op.identity
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "Next steps:");
    let _ = writeln!(out, "  1. Start the control plane:");
    let _ = writeln!(
        out,
        "       procurator-control-plane --tls-ca {} --tls-cert {} --tls-key {}",
        files.ca_cert.display(),
        cp.cert.display(),
        cp.key.display()
    );
    let _ = writeln!(
        out,
        "  2. Issue a certificate for each machine's agent (NAME as in the blueprint), and one for CI:"
    );
    let _ = writeln!(
        out,
        "       procurator-ctl pki issue --dir {} --role agent --name worker-1",
        dir.display()
    );
    let _ = writeln!(
        out,
        "       procurator-ctl pki issue --dir {} --role ci --name ci",
        dir.display()
    );
    let _ = writeln!(out, "  3. Talk to the control plane as {}:", op.identity);
    let _ = writeln!(
        out,
        "       export PROCURATOR_CONTROL_PLANE=https://localhost:7700"
    );
    let _ = writeln!(
        out,
        "       export PROCURATOR_TLS_CA={}",
        files.ca_cert.display()
    );
    let _ = writeln!(
        out,
        "       export PROCURATOR_TLS_CERT={}",
        op.cert.display()
    );
    let _ = writeln!(out, "       export PROCURATOR_TLS_KEY={}", op.key.display());
    let _ = writeln!(out, "       procurator-ctl status");
    out
}

fn intermediate_text(dir: &Path, files: &pki::IntermediateFiles) -> String {
    format!(
        "Created an issuing CA below {}:\n  {}  its certificate\n  {}  its key (mode 0600): it signs agents' certificates; only the control plane needs it\nStart the control plane with:\n  procurator-control-plane --issuing-ca-cert {} --issuing-ca-key {} …\nand ca.key can go offline.\n",
        pki::ca_cert_path(dir).display(),
        files.cert.display(),
        files.key.display(),
        files.cert.display(),
        files.key.display()
    )
}

fn issue_text(dir: &Path, files: &IssuedFiles, sans: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Issued {} ({}):", files.identity, files.identity.uri());
    if files.identity.vm_host {
        let _ = writeln!(
            out,
            "  marked as a VM host ({})",
            procurator_core::identity::VM_HOST_URI
        );
    }
    let _ = writeln!(out, "  certificate  {}", files.cert.display());
    let _ = writeln!(out, "  private key  {} (mode 0600)", files.key.display());
    let flags = format!(
        "--tls-ca {} --tls-cert {} --tls-key {}",
        pki::ca_cert_path(dir).display(),
        files.cert.display(),
        files.key.display()
    );
    if !sans.is_empty() {
        let _ = writeln!(out, "  valid for    {}", sans.join(", "));
    }
    let _ = match files.identity.role {
        Role::ControlPlane => writeln!(
            out,
            "A control plane started with these files serves it within 5 s (or at once on SIGHUP), keeping its agents; clients that trust the fleet CA accept it as they are:\n  procurator-control-plane {flags}"
        ),
        Role::Agent => writeln!(
            out,
            "Copy the three files to {} and start its agent with:\n  procurator-agent --control-plane https://CONTROL-PLANE:7700 {flags}",
            files.identity.name
        ),
        _ => writeln!(
            out,
            "Use it with:\n  procurator-ctl --control-plane https://CONTROL-PLANE:7700 {flags} status"
        ),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_print_paths_identities_and_next_steps() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("pki");
        let sans = vec!["cp.example".to_owned()];
        let files = pki::init(&dir, &sans, "alice")?;
        let text = init_text(&dir, &sans, &files);
        assert!(
            text.contains(&dir.join("ca.crt").display().to_string()),
            "{text}"
        );
        assert!(text.contains("operator/alice"), "{text}");
        assert!(
            text.contains("localhost, 127.0.0.1, ::1, cp.example"),
            "{text}"
        );
        assert!(text.contains("procurator-control-plane --tls-ca"), "{text}");
        assert!(text.contains("--role agent --name worker-1"), "{text}");

        let issued = pki::issue(&dir, Role::Agent, "worker-1", &[], false)?;
        let text = issue_text(&dir, &issued, &[]);
        assert!(
            text.contains("agent/worker-1 (spiffe://procurator/agent/worker-1)"),
            "{text}"
        );
        assert!(text.contains("agent-worker-1.crt"), "{text}");
        assert!(text.contains("procurator-agent --control-plane"), "{text}");
        Ok(())
    }
}
