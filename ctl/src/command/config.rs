//! `procurator-ctl config show`: the connection settings in use, and where
//! each came from (flag, variable, context, or nowhere).

use serde_json::{Value, json};

use crate::Outcome;
use crate::config::{Resolved, SETTINGS, Source};
use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The config file, the context in use, and each setting with its source.
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(cmd: Command, conn: &ConnectionArgs, resolved: &Resolved) -> anyhow::Result<Outcome> {
    let Command::Show(args) = cmd;
    let rows = settings(conn, resolved);
    let file = resolved.file.as_ref().map(|p| p.display().to_string());
    let exists = resolved.file.as_ref().is_some_and(|p| p.exists());
    match args.output.output {
        OutputFormat::Text => {
            let mut text = match &file {
                Some(path) if exists => format!("config file: {path}\n"),
                Some(path) => format!("config file: {path} (none there)\n"),
                None => "config file: none (set HOME or PROCURATOR_CONFIG)\n".to_owned(),
            };
            text.push_str(&match &resolved.context {
                Some((name, why)) => format!("context: {name} (from {why})\n\n"),
                None => "context: none\n\n".to_owned(),
            });
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|(flag, value, source)| {
                    vec![
                        (*flag).to_owned(),
                        value.clone().unwrap_or_else(|| "-".into()),
                        source.to_string(),
                    ]
                })
                .collect();
            text.push_str(&output::table(&["SETTING", "VALUE", "FROM"], &table));
            output::print(&text)?;
        }
        OutputFormat::Json => {
            let settings: serde_json::Map<String, Value> = rows
                .iter()
                .map(|(flag, value, source)| {
                    let key = flag.trim_start_matches("--").to_owned();
                    (key, json!({ "value": value, "from": source_json(source) }))
                })
                .collect();
            output::print_json(&json!({
                "configFile": file,
                "configFileExists": exists,
                "context": resolved.context.as_ref().map(|(name, _)| name),
                "contextFrom": resolved.context.as_ref().map(|(_, why)| why),
                "settings": settings,
            }))?;
        }
    }
    Ok(Outcome::Success)
}

/// Each setting's flag, its value (`None`: unset) and its source. The
/// intent key is shown from the context only: no command here takes it.
fn settings(
    conn: &ConnectionArgs,
    resolved: &Resolved,
) -> Vec<(&'static str, Option<String>, Source)> {
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    SETTINGS
        .iter()
        .map(|(id, flag, _)| {
            let value = match *id {
                "control_plane" => {
                    (!conn.control_plane.is_empty()).then(|| conn.control_plane.join(" "))
                }
                "tls_ca" => path(&conn.tls_ca),
                "tls_cert" => path(&conn.tls_cert),
                "tls_key" => path(&conn.tls_key),
                _ => resolved
                    .intent_key
                    .as_ref()
                    .map(|p| p.display().to_string()),
            };
            let source = resolved.sources.get(id).cloned().unwrap_or(Source::Unset);
            (*flag, value, source)
        })
        .collect()
}

fn source_json(source: &Source) -> Value {
    match source {
        Source::Flag(flag) => json!({ "kind": "flag", "name": flag }),
        Source::Env(var) => json!({ "kind": "env", "name": var }),
        Source::Context { name, file } => {
            json!({ "kind": "context", "name": name, "file": file.display().to_string() })
        }
        Source::Unset => json!({ "kind": "unset" }),
    }
}
