//! `procurator-control-plane`: flags, signals, and [`server::run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use procurator_control_plane::{open_files, server, store};
use procurator_core::telemetry::{self, LogFormat};
use procurator_core::tls::TlsFiles;
use tokio_util::sync::CancellationToken;

/// Procurator's control plane: receives deployments from CI, hands each
/// agent the closure its machine should run, and records every step.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (see --ready-file).
    #[arg(long, env = "PROCURATOR_LISTEN", default_value = "0.0.0.0:7700")]
    listen: String,
    /// Directory of the state database (procurator.db) when --database is sqlite.
    #[arg(
        long,
        env = "PROCURATOR_DATA_DIR",
        default_value = "/var/lib/procurator"
    )]
    data_dir: PathBuf,
    /// Where the state store lives: `sqlite` (in --data-dir), or a PostgreSQL
    /// URL, e.g. postgres://procurator@db1,db2/procurator?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=/etc/procurator/db-ca.pem.
    #[arg(
        long,
        env = "PROCURATOR_DATABASE",
        default_value = "sqlite",
        value_name = "URL"
    )]
    database: String,
    /// A file holding the PostgreSQL password (e.g. a systemd credential),
    /// so it stays out of the URL and the process list.
    #[arg(long, env = "PROCURATOR_DATABASE_PASSWORD_FILE", value_name = "FILE")]
    database_password_file: Option<PathBuf>,
    /// The CA that signed the PostgreSQL server's certificate: the
    /// connection is TLS, the certificate and the host's name checked
    /// (libpq's sslmode=verify-full with sslrootcert=FILE, which --database
    /// may say instead).
    #[arg(long, env = "PROCURATOR_DATABASE_CA_FILE", value_name = "FILE")]
    database_ca_file: Option<PathBuf>,
    // Not the clients' PROCURATOR_TLS_*: an operator's shell exports those
    // for ctl, and a control plane started from it would serve with the
    // operator's certificate.
    /// The fleet CA certificate: clients must present a certificate it signed.
    #[arg(long, env = "PROCURATOR_SERVER_TLS_CA")]
    tls_ca: PathBuf,
    /// The control plane's certificate: a control-plane certificate, valid
    /// for server authentication (anything else is refused at start).
    #[arg(long, env = "PROCURATOR_SERVER_TLS_CERT")]
    tls_cert: PathBuf,
    /// The control plane's private key.
    #[arg(long, env = "PROCURATOR_SERVER_TLS_KEY")]
    tls_key: PathBuf,
    /// Once serving, write `HOST:PORT` of the bound socket here (atomically).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Seconds an agent has to send Hello after connecting.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    hello_timeout: u64,
    /// Seconds between HTTP/2 keepalive pings; a peer silent for as long again is dropped.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive: u64,
    /// Serve Prometheus metrics at `GET /metrics` over plain HTTP here; off when unset.
    #[arg(long, env = "PROCURATOR_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Once the metrics listener is bound, write its `HOST:PORT` here (atomically).
    #[arg(long, requires = "metrics_listen")]
    metrics_ready_file: Option<PathBuf>,
    /// Keep this many of the newest deployments, with their machine rows and
    /// events; older finished ones are pruned. Unfinished ones are always kept.
    #[arg(long, env = "PROCURATOR_RETAIN_DEPLOYMENTS", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    retain_deployments: u32,
    /// Prune events older than this many days from the event log, whatever
    /// they belong to; a Watch from a pruned revision is told where to resume.
    #[arg(long, env = "PROCURATOR_RETAIN_EVENTS_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=36500), value_name = "D")]
    retain_events_days: u32,
    /// The CA that signs agents' certificates when they enroll with a join
    /// token or renew: the fleet CA (ca.crt) or an issuing CA below it
    /// (`procurator-ctl pki intermediate`). Enrollment is off without it.
    #[arg(
        long,
        env = "PROCURATOR_ISSUING_CA_CERT",
        value_name = "FILE",
        requires = "issuing_ca_key"
    )]
    issuing_ca_cert: Option<PathBuf>,
    /// The issuing CA's private key.
    #[arg(
        long,
        env = "PROCURATOR_ISSUING_CA_KEY",
        value_name = "FILE",
        requires = "issuing_ca_cert"
    )]
    issuing_ca_key: Option<PathBuf>,
    /// How long the certificates it signs for agents are valid, e.g. 30d,
    /// 12h, 90s; agents renew at two thirds of it.
    #[arg(long, env = "PROCURATOR_AGENT_CERT_VALIDITY", value_name = "DURATION",
          default_value = "30d", value_parser = procurator_core::certificate::parse_duration)]
    agent_cert_validity: Duration,
    /// Log as human-readable `text` or as `json` lines.
    #[arg(long, env = "PROCURATOR_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    open_files::raise_limit();

    let database = store::Database::parse(
        &args.database,
        args.data_dir,
        args.database_password_file.as_deref(),
        args.database_ca_file.as_deref(),
    )?;
    let config = server::Config {
        listen: args.listen,
        database,
        tls: TlsFiles {
            ca: args.tls_ca,
            cert: args.tls_cert,
            key: args.tls_key,
        },
        ready_file: args.ready_file,
        hello_timeout: Duration::from_secs(args.hello_timeout),
        keepalive: Duration::from_secs(args.keepalive),
        metrics_listen: args.metrics_listen,
        metrics_ready_file: args.metrics_ready_file,
        retention: store::Retention {
            deployments: args.retain_deployments,
            events_for: Duration::from_secs(u64::from(args.retain_events_days) * 24 * 3600),
        },
        issuing_ca: args
            .issuing_ca_cert
            .zip(args.issuing_ca_key)
            .map(|(cert, key)| server::IssuingCaFiles {
                cert,
                key,
                agent_cert_validity: args.agent_cert_validity,
            }),
    };
    let signal = CancellationToken::new();
    tokio::spawn(watch_signals(signal.clone()));
    server::run(config, signal)
        .await
        .context("the control plane stopped")?;
    Ok(())
}

/// The first SIGTERM/SIGINT starts a graceful shutdown; a second exits at once.
async fn watch_signals(signal: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal as unix_signal};
    let (mut term, mut int) = match (
        unix_signal(SignalKind::terminate()),
        unix_signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; stop me with SIGKILL");
            return;
        }
    };
    for received in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if received == 0 {
            tracing::info!("signal received; shutting down (send another to exit at once)");
            signal.cancel();
        } else {
            tracing::warn!("second signal; exiting now");
            std::process::exit(130);
        }
    }
}
