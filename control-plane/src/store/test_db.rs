//! The database a store test runs on: a SQLite file in a temporary folder,
//! or, in the PostgreSQL run of the suite, a fresh database in the cluster
//! that [`the_store_tests_pass_on_postgresql`] started. The tests name no
//! engine: the same suite is the conformance suite of both.

use std::sync::atomic::{AtomicU32, Ordering};

use super::Store;

/// Set for the PostgreSQL run: the cluster's connection string without a
/// database (libpq's key=value form).
const POSTGRES_ENV: &str = "PROCURATOR_TEST_POSTGRES";

pub(super) enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres { server: String, name: String },
}

impl TestDb {
    /// A new, empty database and a store open on it.
    pub(super) fn open() -> (Self, Store) {
        match std::env::var(POSTGRES_ENV) {
            Ok(server) => {
                static N: AtomicU32 = AtomicU32::new(0);
                let name = format!(
                    "t{}_{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                );
                run(&server, "postgres", &format!("CREATE DATABASE {name}"));
                let config: postgres::Config = format!("{server} dbname={name}").parse().unwrap();
                let store = Store::open_postgres(&config.into()).unwrap();
                (Self::Postgres { server, name }, store)
            }
            Err(_) => {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(dir.path()).unwrap();
                (Self::Sqlite(dir), store)
            }
        }
    }

    /// Run `sql` on the database directly, beside the store (as an attacker
    /// or a clock would change it).
    pub(super) fn exec(&self, sql: &str) {
        match self {
            Self::Sqlite(dir) => rusqlite::Connection::open(dir.path().join(super::DB_FILE))
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Self::Postgres { server, name } => run(server, name, sql),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Self::Postgres { server, name } = self {
            // The store's connections may still be closing: FORCE ends them.
            run(
                server,
                "postgres",
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            );
        }
    }
}

/// Run `sql` on database `database` of `server`, from a thread of its own:
/// the synchronous client cannot run inside the test's runtime.
fn run(server: &str, database: &str, sql: &str) {
    let url = format!("{server} dbname={database}");
    std::thread::scope(|s| {
        s.spawn(|| {
            postgres::Client::connect(&url, postgres::NoTls)
                .and_then(|mut c| c.batch_execute(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
        .join()
        .unwrap()
    })
}

/// The store's tests again, on PostgreSQL: this test binary run once more,
/// on the store's tests only, against a cluster of this test's own.
#[test]
fn the_store_tests_pass_on_postgresql() {
    if std::env::var(POSTGRES_ENV).is_ok() {
        return; // the run inside: not again
    }
    let pg = procurator_integration_tests::postgres::Postgres::start().unwrap();
    let server = pg.server();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["store::tests", "--test-threads=2"])
        .env(POSTGRES_ENV, &server)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the store's tests failed on PostgreSQL:\n{stdout}\n{}\n--- postgres log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        pg.log()
    );
    // It ran them: an empty filter would pass as well.
    let ran = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(
        ran > 20,
        "only {ran} store tests ran on PostgreSQL:\n{stdout}"
    );
    eprintln!("{ran} store tests passed on PostgreSQL");
}
