//! The SQLite schema. Created on open; `user_version` says which version a
//! database file holds so a later release can migrate it.

use rusqlite::Connection;

use super::StoreError;

const VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deployments (
    -- Submission order: 'newest' always means the highest seq.
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    git_commit     TEXT    NOT NULL,
    -- The artifact exactly as submitted.
    artifact       TEXT    NOT NULL,
    digest         TEXT    NOT NULL UNIQUE,
    state          INTEGER NOT NULL,
    created_ms     INTEGER NOT NULL,
    finished_ms    INTEGER NOT NULL DEFAULT 0,
    submitted_by   TEXT    NOT NULL,
    -- The revision of its DeploymentSubmitted event.
    revision       INTEGER NOT NULL DEFAULT 0
);

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
    PRIMARY KEY (deployment_id, machine)
);
CREATE INDEX IF NOT EXISTS machines_by_machine ON machines (machine);

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
    last_reason        TEXT    NOT NULL DEFAULT ''
);

-- Append-only. AUTOINCREMENT: a revision is never reused, even after the
-- highest row is gone.
CREATE TABLE IF NOT EXISTS events (
    revision       INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id  TEXT    NOT NULL,
    at_ms          INTEGER NOT NULL,
    -- An encoded procurator.v1.Event; its revision field is this row's.
    body           BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_deployment ON events (deployment_id, revision);
";

/// Set connection options and create the tables if they are missing.
pub(super) fn prepare(conn: &Connection) -> Result<(), StoreError> {
    // WAL lets readers run beside the writer; FULL makes a commit durable
    // before we acknowledge it, which is the point of committing first.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;

    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {version}, newer than this control plane's {VERSION}; \
             run a newer procurator-control-plane"
        )));
    }
    conn.execute_batch(SCHEMA)?;
    conn.pragma_update(None, "user_version", VERSION)?;
    Ok(())
}
