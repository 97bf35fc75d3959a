//! A PostgreSQL cluster of the test's own: `initdb` into a temporary
//! folder, the postmaster in the foreground as the `postgres` user (initdb
//! and postgres refuse root), on a unix socket in that folder only (no TCP
//! port to pick, so none to collide on), stopped and removed when dropped,
//! also when the test fails. [`Postgres::start_with_tls`] also listens on
//! a loopback port, for TLS only.
//! Debian's `postgresql` package provides the binaries (`scripts/setup.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::process::Process;

/// The database role `initdb` creates, trusted on the socket and loopback.
pub const USER: &str = "procurator";
/// Names the socket (`.s.PGSQL.5432`) in the cluster's own folder, when
/// there is no TCP port.
const SOCKET_PORT: u16 = 5432;
/// How long the postmaster may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Postgres {
    bin: PathBuf,
    /// Removed when dropped, after the postmaster has stopped (field order).
    process: Option<Process>,
    dir: tempfile::TempDir,
    starts: u32,
    /// The socket's number, and the loopback TCP port's when `tls`.
    port: u16,
    /// Server certificate and key in the data folder: TLS on loopback.
    tls: bool,
    /// Commits are synced to disk (`fsync=on`), as on a real server.
    durable: bool,
}

impl Postgres {
    /// Creates a cluster and starts it; returns once it accepts connections.
    pub fn start() -> Result<Self> {
        let mut pg = Self::create(SOCKET_PORT)?;
        pg.spawn()?;
        Ok(pg)
    }

    /// [`Self::start`], also listening on `127.0.0.1` at [`Self::port`]
    /// with the certificate `cert` and key `key` (PEM), and refusing any
    /// connection over TCP that is not TLS (`hostssl` only).
    pub fn start_with_tls(cert: &Path, key: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut pg = Self::create(port)?;
        let data = pg.data_dir();
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let to = data.join(to);
            std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
            std::os::unix::fs::chown(&to, Some(postgres_user()?.uid.as_raw()), None)?;
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )?;
        pg.tls = true;
        pg.spawn()?;
        Ok(pg)
    }

    /// [`Self::start`] with every commit synced to disk (`fsync=on`, as a
    /// real server runs): for benchmarks, whose figures must not be a
    /// test cluster's.
    pub fn start_durable() -> Result<Self> {
        let mut pg = Self::create(SOCKET_PORT)?;
        pg.durable = true;
        pg.spawn()?;
        Ok(pg)
    }

    /// The postmaster's process id, from its `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .context("reading postmaster.pid")?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid holds no pid")
    }

    /// The port of its socket, and of its loopback listener with TLS.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A streaming standby of `primary` (a base backup of it, following
    /// its WAL), on a socket of its own; read-only until [`Self::promote`].
    /// Make it synchronous with [`Self::make_synchronous`] on the primary.
    pub fn standby_of(primary: &Postgres) -> Result<Self> {
        let mut standby = Self::empty(SOCKET_PORT)?;
        run_as_postgres(
            as_postgres(&standby.bin.join("pg_basebackup"))
                .arg("-h")
                .arg(primary.socket_dir())
                .arg("-p")
                .arg(primary.port.to_string())
                .args(["-U", USER, "--write-recovery-conf", "--wal-method=stream"])
                .arg("-D")
                .arg(standby.data_dir()),
            "pg_basebackup",
        )?;
        standby.durable = primary.durable;
        standby.spawn()?;
        Ok(standby)
    }

    /// Every commit on this primary waits until a standby has it
    /// (`synchronous_standby_names = '*'`), so a failover loses nothing
    /// acknowledged; returns once a standby is synchronous.
    pub fn make_synchronous(&self) -> Result<()> {
        self.psql(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        )?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        crate::wait_for("a synchronous standby", READY_TIMEOUT, || {
            let sync = self.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            )?;
            Ok((sync != "0").then_some(()))
        })
    }

    /// Promotes this standby to a primary; returns once it accepts writes.
    pub fn promote(&self) -> Result<()> {
        let promoted = self.psql("postgres", "SELECT pg_promote(true, 60)")?;
        anyhow::ensure!(promoted == "t", "pg_promote answered {promoted:?}");
        Ok(())
    }

    /// Whether it is a standby (`pg_is_in_recovery()`).
    pub fn is_standby(&self) -> Result<bool> {
        Ok(self.psql("postgres", "SELECT pg_is_in_recovery()")? == "t")
    }

    fn create(port: u16) -> Result<Self> {
        let pg = Self::empty(port)?;
        run_as_postgres(
            as_postgres(&pg.bin.join("initdb"))
                .args(["--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"])
                .arg(format!("--username={USER}"))
                .arg("-D")
                .arg(pg.data_dir()),
            "initdb",
        )?;
        Ok(pg)
    }

    /// A folder of its own for a cluster, with nothing in it yet.
    fn empty(port: u16) -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("procurator-pg-")
            .tempdir()?;
        chown_to_postgres(dir.path())?;
        Ok(Self {
            bin,
            process: None,
            dir,
            starts: 0,
            port,
            tls: false,
            durable: false,
        })
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = as_postgres(&self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path());
        if self.tls {
            cmd.args(["-c", "listen_addresses=127.0.0.1", "-c", "ssl=on"]);
        } else {
            cmd.args(["-c", "listen_addresses="]);
        }
        cmd
            // A test cluster: losing the last commits on a host crash is fine.
            .args([
                "-c",
                if self.durable {
                    "fsync=on"
                } else {
                    "fsync=off"
                },
            ]);
        self.starts += 1;
        let log = self
            .dir
            .path()
            .join(format!("postgres-{}.log", self.starts));
        let process = Process::spawn("postgres", cmd, &log)?;
        self.process = Some(process);
        crate::wait_for("PostgreSQL to accept connections", READY_TIMEOUT, || {
            if let Some(status) = self
                .process
                .as_mut()
                .and_then(|p| p.try_status().transpose())
            {
                bail!(
                    "postgres exited ({}) before it was ready:\n{}",
                    status?,
                    crate::log_tail(&log, 40)
                );
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-q")
                .arg("-h")
                .arg(self.dir.path())
                .arg("-p")
                .arg(self.port.to_string())
                .status()
                .context("running pg_isready")?;
            Ok(ready.success().then_some(()))
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The folder holding its unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster as libpq's key=value connection string, without a
    /// database: append ` dbname=NAME`.
    pub fn server(&self) -> String {
        format!(
            "host={} port={} user={USER}",
            self.dir.path().display(),
            self.port
        )
    }

    /// The connection string of database `database`.
    pub fn url(&self, database: &str) -> String {
        format!("{} dbname={database}", self.server())
    }

    /// Runs `sql` with psql on the unix socket; returns what it printed
    /// (unaligned, tuples only).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-U",
                USER,
                "-d",
                database,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql -c {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `kill -9` of the postmaster and its backends, as a crash of the
    /// database host would.
    pub fn kill(&mut self) -> Result<()> {
        let mut process = self.process.take().context("postgres is not running")?;
        process.kill()?;
        Ok(())
    }

    /// Starts it again on the same socket and data (crash recovery runs).
    pub fn start_again(&mut self) -> Result<()> {
        anyhow::ensure!(self.process.is_none(), "postgres is running");
        self.spawn()
    }

    /// Everything it logged since it last started.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }
}

/// `/usr/lib/postgresql/<newest>/bin`.
fn bin_dir() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "{} is missing: run scripts/setup.sh, which installs PostgreSQL",
                root.display()
            )
        })?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .with_context(|| format!("no PostgreSQL with initdb under {}", root.display()))
}

/// `program` run as the `postgres` user, exec'd in place (so its pid is
/// the program's), killed when the thread that started it ends.
fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"])
        .args(["--pdeathsig", "KILL", "--"])
        .arg(program);
    cmd
}

fn run_as_postgres(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn postgres_user() -> Result<nix::unistd::User> {
    nix::unistd::User::from_name("postgres")?
        .context("there is no postgres user: run scripts/setup.sh, which installs PostgreSQL")
}

fn chown_to_postgres(dir: &Path) -> Result<()> {
    let user = postgres_user()?;
    nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown postgres {}", dir.display()))?;
    Ok(())
}
