//! The PostgreSQL harness the scale-out tests stand on: a cluster of the
//! test's own starts, answers on its socket and on loopback, survives a
//! `kill -9` with what it had committed, and leaves no process or folder.

use procurator_integration_tests::postgres::Postgres;

/// Processes whose command line names `needle`.
fn processes_naming(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(needle))
        .count()
}

#[test]
fn a_cluster_of_its_own_starts_survives_a_crash_and_leaves_nothing() {
    let mut pg = Postgres::start().expect("postgres");
    let data = pg.data_dir();
    let data_arg = data.display().to_string();
    assert_eq!(pg.psql("postgres", "SELECT 1").expect("psql"), "1");
    pg.psql(
        "postgres",
        "CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)",
    )
    .expect("create");

    pg.kill().expect("kill -9");
    assert_eq!(
        processes_naming(&data_arg),
        0,
        "a backend outlived the postmaster"
    );
    pg.start_again().expect("restart");
    assert_eq!(
        pg.psql("postgres", "SELECT n FROM kept").expect("psql"),
        "7",
        "a committed row was lost"
    );
    assert!(
        pg.url("procurator")
            .ends_with("user=procurator dbname=procurator")
    );

    drop(pg);
    assert_eq!(processes_naming(&data_arg), 0, "postgres outlived its test");
    assert!(!data.exists(), "{} is left", data.display());
}
