//! `procurator-ctl enroll-token`, `revoke`, `revocations`: who may connect
//! (TrustService; operators only).

use std::fmt::Write as _;

use anyhow::bail;
use procurator_core::certificate::{format_utc, is_serial, parse_duration};
use procurator_proto::v1::{
    CreateJoinTokenRequest, CreateJoinTokenResponse, ListRevocationsRequest, Revocation,
    RevokeRequest,
};
use serde_json::{Value, json};

use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};
use crate::{Outcome, format};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
The token alone goes to stdout, so that it can go straight into a file:
  procurator-ctl enroll-token --name web-1 > web-1.token
then, on web-1:
  procurator-agent --join-token web-1.token --control-plane URL --tls-ca ca.crt")]
pub struct EnrollTokenArgs {
    /// The machine that may enroll with it, as the blueprint names it.
    #[arg(long, value_name = "NAME")]
    pub name: String,

    /// How long it may be used: 90s, 15m, 12h, 7d (1 minute to 7 days).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub ttl: std::time::Duration,

    /// The certificate it enrolls for may host VMs (`procurator-agent --vm-host`).
    #[arg(long)]
    pub vm_host: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["name", "serial"])))]
#[command(after_help = "\
A revoked certificate is refused at its next TLS handshake on every replica,
and the open streams of its holder end within seconds. A revoked agent comes
back only by enrolling with a new join token (`procurator-ctl enroll-token`).")]
pub struct RevokeArgs {
    /// With --name: every certificate of this role and name issued up to now.
    #[arg(long, value_enum, requires = "name")]
    pub role: Option<RevokeRole>,

    /// The certificate holder's name (with --role).
    #[arg(
        long,
        value_name = "NAME",
        requires = "role",
        conflicts_with = "serial"
    )]
    pub name: Option<String>,

    /// One certificate, by its serial number as `openssl x509 -serial` or
    /// `procurator-ctl status --output json` prints it.
    #[arg(long, value_name = "HEX")]
    pub serial: Option<String>,

    /// Why, kept with the revocation.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    #[command(flatten)]
    pub output: OutputArgs,
}

/// The roles whose certificates can be revoked (the control plane's own is
/// replaced, not revoked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RevokeRole {
    Agent,
    Ci,
    Operator,
}

impl RevokeRole {
    fn as_str(self) -> &'static str {
        match self {
            RevokeRole::Agent => "agent",
            RevokeRole::Ci => "ci",
            RevokeRole::Operator => "operator",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RevocationsArgs {
    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn enroll_token(conn: &ConnectionArgs, args: EnrollTokenArgs) -> anyhow::Result<Outcome> {
    let conn = conn.connect().await?;
    let created = conn
        .trust()
        .create_join_token(CreateJoinTokenRequest {
            machine: args.name.clone(),
            ttl_secs: args.ttl.as_secs(),
            vm_host: args.vm_host,
        })
        .await
        .map_err(|status| conn.error(&status, &format!("creating a join token for {}", args.name)))?
        .into_inner();
    match args.output.output {
        OutputFormat::Text => {
            output::print(&format!("{}\n", created.token))?;
            eprintln!("{}", token_note(&created));
        }
        OutputFormat::Json => output::print_json(&json!({
            "token": created.token,
            "machine": created.machine,
            "expiresAt": format::rfc3339(created.expires_at_ms),
        }))?,
    }
    Ok(Outcome::Success)
}

/// What the token is for, on stderr beside the token itself.
fn token_note(created: &CreateJoinTokenResponse) -> String {
    format!(
        "this token enrolls {} once, until {}: `procurator-agent --join-token FILE` on that machine",
        created.machine,
        format_utc(created.expires_at_ms.div_euclid(1000))
    )
}

pub async fn revoke(conn: &ConnectionArgs, args: RevokeArgs) -> anyhow::Result<Outcome> {
    if let Some(serial) = &args.serial
        && !is_serial(serial)
    {
        bail!(
            "--serial {serial:?} is not a serial number: give its hex digits, colons allowed (e.g. 4a:3f:…)"
        );
    }
    let request = RevokeRequest {
        role: args.role.map(|r| r.as_str().to_owned()).unwrap_or_default(),
        name: args.name.clone().unwrap_or_default(),
        serial: args.serial.clone().unwrap_or_default(),
        reason: args.reason.clone().unwrap_or_default(),
    };
    let conn = conn.connect().await?;
    let revocation = conn
        .trust()
        .revoke(request)
        .await
        .map_err(|status| conn.error(&status, "revoking the certificate"))?
        .into_inner();
    match args.output.output {
        OutputFormat::Text => output::print(&revoked_text(&revocation))?,
        OutputFormat::Json => output::print_json(&revocation_json(&revocation))?,
    }
    Ok(Outcome::Success)
}

pub async fn revocations(conn: &ConnectionArgs, args: RevocationsArgs) -> anyhow::Result<Outcome> {
    let conn = conn.connect().await?;
    let revocations = conn
        .trust()
        .list_revocations(ListRevocationsRequest {})
        .await
        .map_err(|status| conn.error(&status, "listing revocations"))?
        .into_inner()
        .revocations;
    match args.output.output {
        OutputFormat::Text => output::print(&revocations_table(&revocations))?,
        OutputFormat::Json => output::print_json(&Value::Array(
            revocations.iter().map(revocation_json).collect(),
        ))?,
    }
    Ok(Outcome::Success)
}

/// What was revoked: `agent/web-1` or `serial 4a3f`.
fn revoked_what(r: &Revocation) -> String {
    if r.serial.is_empty() {
        format!("{}/{}", r.role, r.name)
    } else {
        format!("serial {}", r.serial)
    }
}

pub fn revoked_text(r: &Revocation) -> String {
    let mut out = if r.serial.is_empty() {
        format!(
            "revoked every certificate of {} issued up to {}",
            revoked_what(r),
            format::datetime(r.revoked_at_ms)
        )
    } else {
        format!("revoked the certificate with {}", revoked_what(r))
    };
    if !r.reason.is_empty() {
        let _ = write!(out, ": {}", r.reason);
    }
    out.push('\n');
    out
}

pub fn revocations_table(revocations: &[Revocation]) -> String {
    if revocations.is_empty() {
        return "no certificate is revoked\n".to_owned();
    }
    let rows: Vec<Vec<String>> = revocations
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                revoked_what(r),
                format::datetime(r.revoked_at_ms),
                r.revoked_by.clone(),
                if r.reason.is_empty() {
                    "-".to_owned()
                } else {
                    format::truncate(&r.reason, 60)
                },
            ]
        })
        .collect();
    output::table(&["ID", "REVOKED", "AT", "BY", "REASON"], &rows)
}

pub fn revocation_json(r: &Revocation) -> Value {
    let blank_null = |s: &str| {
        if s.is_empty() { Value::Null } else { s.into() }
    };
    json!({
        "id": r.id,
        "role": blank_null(&r.role),
        "name": blank_null(&r.name),
        "serial": blank_null(&r.serial),
        "reason": r.reason,
        "revokedBy": r.revoked_by,
        "revokedAt": format::rfc3339(r.revoked_at_ms),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    const AT: i64 = 1_748_762_102_000;

    fn by_name() -> Revocation {
        Revocation {
            id: 1,
            role: "agent".into(),
            name: "web-1".into(),
            reason: "disk stolen".into(),
            revoked_by: "operator/alice".into(),
            revoked_at_ms: AT,
            ..Default::default()
        }
    }

    #[test]
    fn revocations_say_what_when_who_and_why() {
        let by_serial = Revocation {
            id: 2,
            serial: "4a3f".into(),
            revoked_by: "operator/alice".into(),
            revoked_at_ms: AT,
            ..Default::default()
        };
        let text = revoked_text(&by_name());
        assert!(
            text.starts_with("revoked every certificate of agent/web-1 issued up to "),
            "{text}"
        );
        assert!(text.ends_with(": disk stolen\n"), "{text}");
        assert_eq!(
            revoked_text(&by_serial),
            "revoked the certificate with serial 4a3f\n"
        );
        let table = revocations_table(&[by_name(), by_serial.clone()]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID  REVOKED"), "{table}");
        assert!(lines[1].contains("agent/web-1") && lines[1].ends_with("disk stolen"));
        assert!(lines[2].contains("serial 4a3f") && lines[2].ends_with(" -"));
        assert!(revocations_table(&[]).contains("no certificate is revoked"));
        let v = revocation_json(&by_serial);
        assert_eq!(v["serial"], "4a3f");
        assert_eq!(v["name"], Value::Null);
        assert_eq!(v["revokedAt"], "2025-06-01T07:15:02.000Z");
    }

    #[derive(Debug, clap::Parser)]
    struct Revoke {
        #[command(flatten)]
        args: RevokeArgs,
    }

    #[test]
    fn revoke_takes_a_name_with_its_role_or_a_serial() {
        let parse = |args: &[&str]| {
            Revoke::try_parse_from(std::iter::once("revoke").chain(args.iter().copied()))
        };
        assert!(parse(&["--role", "agent", "--name", "web-1"]).is_ok());
        assert!(parse(&["--serial", "4a:3f"]).is_ok());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--name", "web-1"]).is_err());
        assert!(parse(&["--role", "agent", "--name", "web-1", "--serial", "4a"]).is_err());
        assert!(parse(&["--role", "control-plane", "--name", "cp"]).is_err());
    }

    #[test]
    fn the_note_beside_a_token_says_for_whom_and_until_when() {
        let note = token_note(&CreateJoinTokenResponse {
            token: "pjt_secret".into(),
            machine: "web-1".into(),
            expires_at_ms: AT,
        });
        assert_eq!(
            note,
            "this token enrolls web-1 once, until 2025-06-01T07:15:02Z: `procurator-agent --join-token FILE` on that machine"
        );
        assert!(!note.contains("pjt_secret"));
    }
}
