//! The SQLite schema. Created on open; `user_version` says which version a
//! database file holds so a later release can migrate it.

use rusqlite::Connection;

use crate::store::StoreError;

const VERSION: i64 = 10;

/// The deployments table of version 2. Digests are no longer unique: a
/// rollback or a forced resubmit stores the same artifact again.
const DEPLOYMENTS: &str = "
CREATE TABLE IF NOT EXISTS deployments (
    -- Submission order: 'newest' always means the highest seq.
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,
    git_commit      TEXT    NOT NULL,
    -- The artifact exactly as submitted.
    artifact        TEXT    NOT NULL,
    digest          TEXT    NOT NULL,
    state           INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    finished_ms     INTEGER NOT NULL DEFAULT 0,
    submitted_by    TEXT    NOT NULL,
    -- The revision of its DeploymentSubmitted event.
    revision        INTEGER NOT NULL DEFAULT 0,
    -- The committer time of git_commit (Unix seconds), when the artifact had it.
    git_commit_time INTEGER,
    -- JSON: [{\"name\": ..., \"machines\": [...]}], as planned at submit.
    waves           TEXT    NOT NULL DEFAULT '[]',
    rollback_of     TEXT    NOT NULL DEFAULT '',
    -- 0 running normally, 1 halted, 2 cancelled (rollout::Stop).
    stopped         INTEGER NOT NULL DEFAULT 0,
    halted_reason   TEXT    NOT NULL DEFAULT '',
    -- The highest wave that has started (NULL: none yet) and when it did.
    started_wave    INTEGER,
    wave_started_ms INTEGER NOT NULL DEFAULT 0,
    -- Who submitted it with force, past the stale-commit check. (Version 4.)
    forced_by       TEXT    NOT NULL DEFAULT '',
    -- The names of the keys its statements say signed them, space
    -- separated; empty when unsigned. (Version 4.)
    intent_keys     TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deployments_by_digest ON deployments (digest);
CREATE INDEX IF NOT EXISTS deployments_by_commit ON deployments (git_commit);
";

/// Version 1 -> 2: the deployments table is rebuilt (SQLite cannot drop the
/// UNIQUE on digest in place), the machines table gains columns.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE deployments RENAME TO deployments_v1;
";

const COPY_V1: &str = "
INSERT INTO deployments (seq, id, git_commit, artifact, digest, state, created_ms,
                         finished_ms, submitted_by, revision, started_wave)
    SELECT seq, id, git_commit, artifact, digest, state, created_ms, finished_ms,
           submitted_by, revision, 0 FROM deployments_v1;
DROP TABLE deployments_v1;
";

const SCHEMA: &str = "

CREATE TABLE IF NOT EXISTS machines (
    deployment_id  TEXT    NOT NULL REFERENCES deployments(id),
    machine        TEXT    NOT NULL,
    closure        TEXT    NOT NULL,
    state          INTEGER NOT NULL,
    failed_phase   INTEGER NOT NULL DEFAULT 0,
    reason         TEXT    NOT NULL DEFAULT '',
    output_tail    TEXT    NOT NULL DEFAULT '',
    bytes_done     INTEGER NOT NULL DEFAULT 0,
    bytes_expected INTEGER NOT NULL DEFAULT 0,
    paths_done     INTEGER NOT NULL DEFAULT 0,
    paths_expected INTEGER NOT NULL DEFAULT 0,
    updated_ms     INTEGER NOT NULL,
    -- The index of the machine's wave, fixed at submit.
    wave           INTEGER NOT NULL DEFAULT 0,
    reboot_required INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (deployment_id, machine)
);
CREATE INDEX IF NOT EXISTS machines_by_machine ON machines (machine);
-- Whether any machine of a deployment is still in flight, after every result.
CREATE INDEX IF NOT EXISTS machines_by_state ON machines (deployment_id, state);

CREATE TABLE IF NOT EXISTS agents (
    machine            TEXT    PRIMARY KEY,
    connected          INTEGER NOT NULL DEFAULT 0,
    -- Which connection owns `connected`: a replaced stream's late disconnect
    -- must not mark its successor disconnected.
    generation         INTEGER NOT NULL DEFAULT 0,
    current_system     TEXT    NOT NULL DEFAULT '',
    booted_system      TEXT    NOT NULL DEFAULT '',
    agent_version      TEXT    NOT NULL DEFAULT '',
    nix_version        TEXT    NOT NULL DEFAULT '',
    last_seen_ms       INTEGER NOT NULL DEFAULT 0,
    last_deployment_id TEXT    NOT NULL DEFAULT '',
    last_state         INTEGER NOT NULL DEFAULT 0,
    last_reason        TEXT    NOT NULL DEFAULT '',
    -- An encoded procurator.v1.VmHostCapacity from its last Hello; NULL when
    -- it hosts no VMs. (Version 3.)
    vm_host            BLOB
);

-- Where each VM instance runs, kept across deployments so placements are
-- stable. (Version 3.)
CREATE TABLE IF NOT EXISTS placements (
    instance     TEXT    PRIMARY KEY,
    machine      TEXT    NOT NULL,
    host         TEXT    NOT NULL,
    -- What the instance takes from its host.
    milli_cpus   INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL
);

-- Append-only. The writer numbers events from log_bounds.head (version
-- 6), so a revision is never reused; AUTOINCREMENT is what version 5
-- numbered them by, and where the head started from.
CREATE TABLE IF NOT EXISTS events (
    revision       INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id  TEXT    NOT NULL,
    at_ms          INTEGER NOT NULL,
    -- An encoded procurator.v1.Event; its revision field is this row's.
    body           BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_deployment ON events (deployment_id, revision);

-- How far the event log has been pruned (store/retention.rs). (Version 5.)
CREATE TABLE IF NOT EXISTS log_bounds (
    -- One row.
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    -- Every event up to this revision is gone (pruned by age, oldest first).
    compacted INTEGER NOT NULL DEFAULT 0,
    -- The highest revision pruned for any reason, also with a deployment.
    pruned    INTEGER NOT NULL DEFAULT 0,
    -- The revision of the last event appended: the writer numbers events
    -- from it. (Version 6.)
    head      INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO log_bounds (id) VALUES (1);

-- The control-plane processes on this database, each alive while its
-- heartbeat is fresh; an agent's row names the one holding its stream.
-- (Version 7.)
CREATE TABLE IF NOT EXISTS replicas (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    address      TEXT    NOT NULL DEFAULT '',
    version      TEXT    NOT NULL DEFAULT '',
    started_ms   INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL
);
-- Generations are handed out as the highest plus one. (Version 7.)
CREATE INDEX IF NOT EXISTS agents_by_generation ON agents (generation);

-- Join tokens, by their SHA-256 only: the token itself is shown once to
-- the operator who made it. (Version 8.)
CREATE TABLE IF NOT EXISTS join_tokens (
    token_hash      TEXT    PRIMARY KEY,
    machine         TEXT    NOT NULL,
    vm_host         INTEGER NOT NULL DEFAULT 0,
    created_by      TEXT    NOT NULL,
    created_ms      INTEGER NOT NULL,
    expires_ms      INTEGER NOT NULL,
    used_ms         INTEGER,
    last_refusal_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS join_tokens_by_expiry ON join_tokens (expires_ms);

-- Certificates no longer accepted: one serial, or every certificate of
-- role/name whose validity began by revoked_ms. (Version 8.)
CREATE TABLE IF NOT EXISTS revocations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    role       TEXT    NOT NULL DEFAULT '',
    name       TEXT    NOT NULL DEFAULT '',
    serial     TEXT    NOT NULL DEFAULT '',
    reason     TEXT    NOT NULL DEFAULT '',
    revoked_by TEXT    NOT NULL,
    revoked_ms INTEGER NOT NULL
);

-- The output each machine sent with its result: apart from machines so
-- that pages of rows never read it. (Version 10.)
CREATE TABLE IF NOT EXISTS machine_logs (
    deployment_id TEXT NOT NULL,
    machine       TEXT NOT NULL,
    output        TEXT NOT NULL,
    PRIMARY KEY (deployment_id, machine)
);
";

/// Set connection options and create the tables if they are missing.
pub(super) fn prepare(conn: &Connection) -> Result<(), StoreError> {
    // WAL lets readers run beside the writer; FULL makes a commit durable
    // before we acknowledge it, which is the point of committing first.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Every statement the store prepares stays prepared (the default keeps 16).
    conn.set_prepared_statement_cache_capacity(64);

    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {version}, newer than this control plane's {VERSION}; \
             run a newer procurator-control-plane"
        )));
    }
    if version == 1 {
        migrate_from_1(conn)?;
    }
    conn.execute_batch(DEPLOYMENTS)?;
    conn.execute_batch(SCHEMA)?;
    // Version 2 -> 3: agents say what they offer VMs.
    add_column(conn, "agents", "vm_host", "BLOB")?;
    // Version 3 -> 4: forced submissions and signed intents are recorded.
    add_column(conn, "deployments", "forced_by", "TEXT NOT NULL DEFAULT ''")?;
    add_column(
        conn,
        "deployments",
        "intent_keys",
        "TEXT NOT NULL DEFAULT ''",
    )?;
    // Version 5 -> 6: revisions come from log_bounds.head, which starts
    // where the row ids left off.
    add_column(conn, "log_bounds", "head", "INTEGER NOT NULL DEFAULT 0")?;
    conn.execute_batch(
        "UPDATE log_bounds SET head = max(head,
             coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),
             coalesce((SELECT max(revision) FROM events), 0))
         WHERE id = 1",
    )?;
    // Version 6 -> 7: an agent's row names the replica holding its stream.
    add_column(conn, "agents", "replica", "INTEGER NOT NULL DEFAULT 0")?;
    // Version 7 -> 8: the certificate of an agent's last connection.
    add_column(conn, "agents", "cert_serial", "TEXT NOT NULL DEFAULT ''")?;
    add_column(
        conn,
        "agents",
        "cert_not_after_ms",
        "INTEGER NOT NULL DEFAULT 0",
    )?;
    // Version 8 -> 9: a deployment's `--on` selectors.
    add_column(conn, "deployments", "selectors", "TEXT NOT NULL DEFAULT ''")?;
    // Version 9 -> 10: when a machine began a deployment (machine_logs is
    // made above).
    add_column(conn, "machines", "started_ms", "INTEGER NOT NULL DEFAULT 0")?;
    conn.pragma_update(None, "user_version", VERSION)?;
    Ok(())
}

fn migrate_from_1(conn: &Connection) -> Result<(), StoreError> {
    // The rename must not rewrite the machines' foreign key to the old
    // table, so foreign keys are off while the table is rebuilt.
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "legacy_alter_table", "ON")?;
    let migrated = (|| -> Result<(), StoreError> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        conn.execute_batch(MIGRATE_1_TO_2)?;
        conn.execute_batch(DEPLOYMENTS)?;
        conn.execute_batch(COPY_V1)?;
        add_column(conn, "machines", "wave", "INTEGER NOT NULL DEFAULT 0")?;
        add_column(
            conn,
            "machines",
            "reboot_required",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        conn.pragma_update(None, "user_version", 2)?;
        conn.execute_batch("COMMIT")?;
        Ok(())
    })();
    if migrated.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.pragma_update(None, "legacy_alter_table", "OFF")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    migrated
}

/// `ALTER TABLE … ADD COLUMN` unless the column exists.
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> Result<(), StoreError> {
    let exists: bool = conn.query_row(
        &format!("SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"),
        [column],
        |r| r.get(0),
    )?;
    if !exists {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}
