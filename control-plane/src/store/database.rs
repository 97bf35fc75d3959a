//! Where the store lives (`--database`): the embedded SQLite file, or a
//! PostgreSQL database and how to reach it, TLS included.
//!
//! The PostgreSQL client parses libpq's URL and key=value syntax but knows
//! only `sslmode=disable|prefer|require` and no CA file; libpq's
//! `sslmode=verify-full` and `sslrootcert=FILE` are taken out and handled
//! here. A certificate is always checked against the CA given and the name
//! the control plane dialled (so `require` means what libpq's `verify-full`
//! does); without a CA there is no TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::DB_FILE;

/// Where the store lives.
#[derive(Debug, Clone)]
pub enum Database {
    /// `DATA_DIR/procurator.db`, the embedded default.
    Sqlite { data_dir: PathBuf },
    /// A PostgreSQL database, for control planes that share one.
    Postgres(Box<PostgresTarget>),
}

/// A PostgreSQL database and how to connect to it.
#[derive(Clone)]
pub struct PostgresTarget {
    pub config: postgres::Config,
    /// The TLS client, with the CA that signed the server's certificate;
    /// `None`: no TLS.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // postgres::Config's Debug leaves the password out.
        f.debug_struct("PostgresTarget")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl From<postgres::Config> for PostgresTarget {
    /// No TLS: for a database on a unix socket (the tests').
    fn from(config: postgres::Config) -> Self {
        Self { config, tls: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(
        "--database {0:?} is neither sqlite nor a PostgreSQL URL \
         (postgres://USER@HOST[:PORT][,HOST…]/DATABASE?…): {1}"
    )]
    Unparsable(String, String),
    #[error(
        "--database-password-file and --database-ca-file are for a PostgreSQL --database, not sqlite"
    )]
    OptionForSqlite,
    #[error(
        "the CA is given twice: as sslrootcert in --database and as --database-ca-file; keep one"
    )]
    CaTwice,
    #[error("cannot read --database-password-file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "sslmode={0} needs the CA that signed the PostgreSQL server's certificate, which is always checked: --database-ca-file FILE, or sslrootcert=FILE in --database"
    )]
    NoCa(String),
    #[error(
        "sslmode=verify-ca is not offered: the server's name is always checked too; use sslmode=verify-full with the host named in its certificate"
    )]
    VerifyCa,
    #[error("sslmode={0} is none of disable, prefer, require, verify-full")]
    UnknownSslMode(String),
    #[error("cannot read sslrootcert {path}: {why}")]
    Ca { path: PathBuf, why: String },
}

impl Database {
    /// `--database` (`sqlite` or a PostgreSQL URL), with the password from
    /// `password_file` and the server's CA from `ca_file` (as libpq's
    /// `sslrootcert`) if given.
    pub fn parse(
        database: &str,
        data_dir: PathBuf,
        password_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<Self, DatabaseError> {
        if database == "sqlite" {
            if password_file.is_some() || ca_file.is_some() {
                return Err(DatabaseError::OptionForSqlite);
            }
            return Ok(Database::Sqlite { data_dir });
        }
        let (rest, sslmode, sslrootcert) = take_tls_options(database);
        let mut config: postgres::Config = rest
            .parse()
            .map_err(|e: postgres::Error| DatabaseError::Unparsable(rest.clone(), e.to_string()))?;
        if let Some(path) = password_file {
            let password =
                std::fs::read_to_string(path).map_err(|source| DatabaseError::PasswordFile {
                    path: path.to_owned(),
                    source,
                })?;
            config.password(password.trim_end_matches(['\n', '\r']));
        }
        use postgres::config::SslMode;
        let ca = match (sslrootcert, ca_file) {
            (Some(_), Some(_)) => return Err(DatabaseError::CaTwice),
            (url, flag) => url.map(PathBuf::from).or_else(|| flag.map(Path::to_owned)),
        };
        let (mode, ca) = match (sslmode.as_deref(), ca) {
            (Some("disable"), _) => (SslMode::Disable, None),
            // A CA given means TLS is wanted.
            (None, Some(ca)) => (SslMode::Require, Some(ca)),
            (None | Some("prefer" | "allow"), ca) => (SslMode::Prefer, ca),
            (Some("require" | "verify-full"), Some(ca)) => (SslMode::Require, Some(ca)),
            (Some(mode @ ("require" | "verify-full")), None) => {
                return Err(DatabaseError::NoCa(mode.to_owned()));
            }
            (Some("verify-ca"), _) => return Err(DatabaseError::VerifyCa),
            (Some(other), _) => return Err(DatabaseError::UnknownSslMode(other.to_owned())),
        };
        config.ssl_mode(mode);
        let tls = ca.map(|path| client_config(&path)).transpose()?;
        Ok(Database::Postgres(Box::new(PostgresTarget { config, tls })))
    }
}

/// `database` without libpq's `sslmode` and `sslrootcert`, and their values.
fn take_tls_options(database: &str) -> (String, Option<String>, Option<String>) {
    let (mut sslmode, mut sslrootcert) = (None, None);
    let mut take = |key: &str, value: &str| match key {
        "sslmode" => {
            sslmode = Some(value.to_owned());
            true
        }
        "sslrootcert" => {
            sslrootcert = Some(value.to_owned());
            true
        }
        _ => false,
    };
    let rest = if database.contains("://") {
        match database.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        !take(key, &percent_decoded(value))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => database.to_owned(),
        }
    } else {
        database
            .split_whitespace()
            .filter(|word| {
                let (key, value) = word.split_once('=').unwrap_or((word, ""));
                !take(key.trim(), value.trim_matches('\''))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, sslmode, sslrootcert)
}

/// `%2F` → `/`: a file name in a URL's query.
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TLS client that trusts the CAs in the PEM file at `path`.
fn client_config(path: &Path) -> Result<Arc<rustls::ClientConfig>, DatabaseError> {
    let error = |why: String| DatabaseError::Ca {
        path: path.to_owned(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| error(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| error(format!("a certificate in it is unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(error("it holds no PEM certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl std::fmt::Display for Database {
    /// For logs: where, never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite { data_dir } => {
                write!(f, "sqlite {}", data_dir.join(DB_FILE).display())
            }
            Database::Postgres(target) => {
                let config = &target.config;
                let hosts: Vec<String> = config
                    .get_hosts()
                    .iter()
                    .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
                    .map(|(host, port)| match host {
                        postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                        postgres::config::Host::Unix(path) => format!("{}:{port}", path.display()),
                    })
                    .collect();
                write!(
                    f,
                    "postgresql {} database {}{}",
                    hosts.join(","),
                    config.get_dbname().unwrap_or("(the user's)"),
                    if target.tls.is_some() {
                        " over TLS"
                    } else {
                        ""
                    }
                )
            }
        }
    }
}

impl PostgresTarget {
    /// Whether a host is dialled over TCP without TLS: worth a warning.
    pub fn unencrypted_tcp(&self) -> bool {
        self.tls.is_none()
            && self
                .config
                .get_hosts()
                .iter()
                .any(|h| matches!(h, postgres::config::Host::Tcp(_)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(database: &str) -> Result<Database, DatabaseError> {
        Database::parse(database, PathBuf::from("/var/lib/procurator"), None, None)
    }

    fn target(database: &str) -> PostgresTarget {
        match parse(database).unwrap() {
            Database::Postgres(target) => *target,
            Database::Sqlite { .. } => panic!("sqlite"),
        }
    }

    #[test]
    fn libpq_tls_options_are_taken_out_of_either_syntax() {
        assert_eq!(
            take_tls_options(
                "postgres://p@db1,db2/procurator?sslmode=verify-full&target_session_attrs=read-write&sslrootcert=%2Fetc%2Fca.pem"
            ),
            (
                "postgres://p@db1,db2/procurator?target_session_attrs=read-write".into(),
                Some("verify-full".into()),
                Some("/etc/ca.pem".into())
            )
        );
        assert_eq!(
            take_tls_options("host=db sslmode=require sslrootcert=/etc/ca.pem dbname=p"),
            (
                "host=db dbname=p".into(),
                Some("require".into()),
                Some("/etc/ca.pem".into())
            )
        );
        assert_eq!(
            take_tls_options("postgres://db/p?sslmode=disable"),
            ("postgres://db/p".into(), Some("disable".into()), None)
        );
    }

    #[test]
    fn tls_is_verified_or_refused_with_what_to_do() {
        let no_ca = parse("postgres://db/p?sslmode=verify-full").unwrap_err();
        assert!(
            no_ca.to_string().contains("--database-ca-file FILE"),
            "{no_ca}"
        );
        let verify_ca = parse("postgres://db/p?sslmode=verify-ca").unwrap_err();
        assert!(
            verify_ca.to_string().contains("use sslmode=verify-full"),
            "{verify_ca}"
        );
        let odd = parse("postgres://db/p?sslmode=always").unwrap_err();
        assert!(odd.to_string().contains("none of"), "{odd}");
        let missing = parse("postgres://db/p?sslrootcert=/nonexistent/ca.pem").unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/ca.pem"),
            "{missing}"
        );

        let plain = target("postgres://db/p");
        assert!(plain.tls.is_none() && plain.unencrypted_tcp());
        assert!(!target("host=/run/postgresql dbname=p").unencrypted_tcp());

        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["db".into()]).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let verified = target(&format!("postgres://db/p?sslrootcert={}", path.display()));
        assert!(verified.tls.is_some());
        assert_eq!(
            verified.config.get_ssl_mode(),
            postgres::config::SslMode::Require
        );
        assert!(
            Database::Postgres(Box::new(verified))
                .to_string()
                .ends_with("over TLS")
        );
        let flagged =
            Database::parse("postgres://db/p", PathBuf::new(), None, Some(&path)).unwrap();
        assert!(matches!(flagged, Database::Postgres(t) if t.tls.is_some()));
        let twice = Database::parse(
            &format!("postgres://db/p?sslrootcert={}", path.display()),
            PathBuf::new(),
            None,
            Some(&path),
        )
        .unwrap_err();
        assert!(twice.to_string().contains("keep one"), "{twice}");
    }
}
