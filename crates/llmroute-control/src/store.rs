//! The state folder: policy artifacts as `policies/<sha256>.onnx`, and an SQLite database with
//! published policies, route configuration versions and completed events.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmroute_api::{CompletedEvent, PolicyRef};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

/// A failure of the state folder or its database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to access {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database error in {path}: {source}")]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("failed to encode an event: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "the database {path} has schema version {version}, newer than version {supported} of this llmroute; use a newer llmroute or another state folder"
    )]
    SchemaVersion {
        path: PathBuf,
        version: i64,
        supported: i64,
    },
    #[error(
        "invalid stored embedding of event {decision_id}: {bytes} bytes is not a whole number of f32 values"
    )]
    Embedding { decision_id: String, bytes: usize },
    /// The commit of a group of event batches failed, so none of them was stored.
    #[error(
        "database error in {path} while committing {batches} event batches together: {message}"
    )]
    GroupCommit {
        path: PathBuf,
        batches: usize,
        message: String,
        /// True when SQLite reported `SQLITE_FULL`.
        disk_full: bool,
    },
}

impl StoreError {
    /// Tests whether the failure is a full disk or database (`SQLITE_FULL`, or `ENOSPC` on a
    /// file), which more space or less retention fixes and a retry alone does not.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Database { source, .. } => is_sqlite_full(source),
            StoreError::GroupCommit { disk_full, .. } => *disk_full,
            StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}

/// Tests whether SQLite failed with `SQLITE_FULL` ("database or disk is full").
fn is_sqlite_full(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// SQLite's `synchronous` setting, which decides what a committed transaction survives. In
/// WAL mode (SQLite 3.x documentation of `PRAGMA synchronous`):
///
/// - `Normal`: a commit survives a crash of the process, because the WAL is written before
///   the commit returns. It may be lost (rolled back, not corrupted) when the operating
///   system crashes or the power fails before the next checkpoint syncs the WAL.
/// - `Full`: the WAL is synced on every commit, so a commit also survives an operating
///   system crash or power loss, at the cost of one fsync per transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    Normal,
    #[default]
    Full,
}

impl std::str::FromStr for Synchronous {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.to_ascii_lowercase().as_str() {
            "normal" => Ok(Self::Normal),
            "full" => Ok(Self::Full),
            _ => Err(format!(
                "invalid synchronous setting {value:?}: use `full` or `normal`"
            )),
        }
    }
}

impl std::fmt::Display for Synchronous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Normal => "normal",
            Self::Full => "full",
        })
    }
}

/// The state folder and its database connection.
#[derive(Debug)]
pub struct Store {
    folder: PathBuf,
    database: PathBuf,
    connection: Mutex<Connection>,
    /// Event batches waiting for the next group commit (see [`Store::insert_events`]).
    pending: Mutex<Vec<Arc<PendingBatch>>>,
}

/// One event batch of [`Store::insert_events`], encoded for its rows, waiting to be committed.
#[derive(Debug)]
struct PendingBatch {
    route: String,
    sidecar: String,
    /// Each event with its JSON text (without the embedding) and its embedding's bytes.
    rows: Vec<(CompletedEvent, String, Vec<u8>)>,
    /// How many events were new, set by the caller that committed the batch.
    outcome: Mutex<Option<Result<usize, StoreError>>>,
}

impl PendingBatch {
    fn set(&self, outcome: Result<usize, StoreError>) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
    }

    fn take(&self) -> Option<Result<usize, StoreError>> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS policies (
    route TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    published_ms INTEGER NOT NULL,
    PRIMARY KEY (route, version)
);
CREATE TABLE IF NOT EXISTS route_configs (
    route TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    route TEXT NOT NULL,
    sidecar TEXT NOT NULL,
    decision_id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    routed INTEGER NOT NULL,
    policy_version TEXT,
    propensity REAL,
    quality REAL,
    cost_usd REAL,
    received_ms INTEGER NOT NULL,
    event TEXT NOT NULL,
    embedding BLOB
);
CREATE INDEX IF NOT EXISTS events_by_route ON events (route, id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', lower(hex(randomblob(16))));
CREATE TABLE IF NOT EXISTS replication_cursors (
    source TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_file_deletions (
    sha256 TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS policy_numbers (
    route TEXT PRIMARY KEY,
    highest INTEGER NOT NULL
);
";

/// Schema version in `PRAGMA user_version`. Version 1 (the databases written before the
/// version was recorded, `user_version` 0) keeps each embedding inside the event's JSON text.
/// Version 2 adds the `embedding` column (little-endian f32 values) and writes rows whose JSON
/// text has an empty `embedding`. Rows of version 1 keep the embedding in their JSON text.
const SCHEMA_VERSION: i64 = 2;

/// Rows deleted per transaction by [`Store::apply_retention`], so that event inserts wait for
/// one short transaction at most instead of the whole deletion.
const RETENTION_CHUNK: i64 = 5_000;

/// Passes of [`Store::apply_size_limit`] at most.
const SIZE_LIMIT_PASSES: usize = 8;

/// Result of [`Store::apply_size_limit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeRetention {
    /// Events deleted per route, only routes that lost some.
    pub deleted: Vec<(String, u64)>,
    /// [`Store::used_bytes`] afterwards.
    pub used_bytes: u64,
    /// Whether any event is still stored. Over the limit without one, only the other tables
    /// are left to shrink.
    pub events_left: bool,
}

/// Returns the largest count `level` such that lowering every route above it to `level`
/// deletes at least `excess` events: Σ max(0, count − level) ≥ excess. With `excess` above
/// the total, every event goes (level 0).
fn common_level(counts: &[(String, u64)], excess: u64) -> u64 {
    let over = |level: u64| -> u64 {
        counts
            .iter()
            .map(|(_, count)| count.saturating_sub(level))
            .sum()
    };
    // over(low) ≥ excess stays true throughout, and over(high + 1) < excess.
    let (mut low, mut high) = (0, counts.iter().map(|(_, count)| *count).max().unwrap_or(0));
    if over(0) < excess {
        return 0;
    }
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        if over(middle) >= excess {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    low
}

/// Reads the replication identity from the `meta` table.
fn read_store_id(connection: &Connection) -> rusqlite::Result<String> {
    connection.query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |row| {
        row.get(0)
    })
}

/// Runs a `DELETE` of events under a savepoint (a transaction of its own outside the caller's)
/// and returns the rows deleted. When it removed the event with the largest id, SQLite would
/// give the next event that id again (`INTEGER PRIMARY KEY` without `AUTOINCREMENT` takes the
/// largest id plus one), below the place of replicas that copied it. The store then takes a
/// new replication identity, and replicas copy it again from its start.
fn delete_events(
    connection: &Connection,
    sql: &str,
    parameters: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    connection.execute_batch("SAVEPOINT delete_events")?;
    let run = || -> rusqlite::Result<usize> {
        let largest = || -> rusqlite::Result<Option<i64>> {
            connection.query_row("SELECT MAX(id) FROM events", [], |row| row.get(0))
        };
        let before = largest()?;
        let deleted = connection.execute(sql, parameters)?;
        let after = largest()?;
        if deleted > 0 && after < before {
            connection.execute(
                "UPDATE meta SET value = lower(hex(randomblob(16))) WHERE key = 'store_id'",
                [],
            )?;
            tracing::info!(
                largest_id_before = before,
                largest_id_after = after,
                "deleted the newest events, so the event store takes a new replication identity; replicas copy it again"
            );
        }
        Ok(deleted)
    };
    match run() {
        Ok(deleted) => {
            connection.execute_batch("RELEASE delete_events")?;
            Ok(deleted)
        }
        Err(error) => {
            // Undo the deletion, then end the savepoint; the first error is the one returned.
            let _ = connection.execute_batch("ROLLBACK TO delete_events; RELEASE delete_events");
            Err(error)
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating when missing) the state folder and `state.sqlite3` inside it, with
    /// [`Synchronous::Full`].
    pub fn open(folder: &Path) -> Result<Self, StoreError> {
        Self::open_with(folder, Synchronous::default())
    }

    /// Opens the state folder like [`Store::open`] with the given `synchronous` setting.
    pub fn open_with(folder: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        let policies = folder.join("policies");
        std::fs::create_dir_all(&policies).map_err(|source| StoreError::Io {
            path: policies.clone(),
            source,
        })?;
        let database = folder.join("state.sqlite3");
        let db_error = |source| StoreError::Database {
            path: database.clone(),
            source,
        };
        let connection = Connection::open(&database).map_err(db_error)?;
        // WAL keeps readers and the event writer from blocking each other. The control API
        // acknowledges a batch only after its commit, so `synchronous` decides what an
        // acknowledged event survives (see [`Synchronous`]).
        // 8 KiB pages hold three events of about 2.2 KB (a 1536-byte embedding and the JSON
        // text) where 4 KiB pages hold one, so fewer pages go through the WAL. SQLite applies
        // the page size only when it creates the database, so older state folders keep 4 KiB.
        connection
            .execute_batch(&format!(
                "PRAGMA page_size = 8192; PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};"
            ))
            .map_err(db_error)?;
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(db_error)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaVersion {
                path: database,
                version,
                supported: SCHEMA_VERSION,
            });
        }
        migrate(&connection, version).map_err(db_error)?;
        Ok(Self {
            folder: folder.to_path_buf(),
            database,
            connection: Mutex::new(connection),
            pending: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn with_connection<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        // A panic while holding the lock leaves SQLite itself consistent (transactions roll
        // back when dropped), so the connection stays usable.
        let mut connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        work(&mut connection).map_err(|source| StoreError::Database {
            path: self.database.clone(),
            source,
        })
    }

    /// Returns the state folder.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Returns the database's replication identity: 32 random hex digits, made when the
    /// database is created and made again when a deletion lowers the largest event id
    /// ([`delete_events`]). Replicas that copy its events keep their place under it, so a new
    /// database (a replaced volume) or a reused id range is copied from its start.
    pub fn id(&self) -> Result<String, StoreError> {
        self.with_connection(|connection| read_store_id(connection))
    }

    /// Path of the artifact with this digest.
    pub fn policy_path(&self, sha256: &str) -> PathBuf {
        self.folder.join("policies").join(format!("{sha256}.onnx"))
    }

    /// Copies a policy file into the state folder and publishes it as `version` of `route`.
    /// Publishing the same version again with other bytes replaces it.
    pub fn publish_policy(
        &self,
        route: &str,
        version: &str,
        bytes: &[u8],
    ) -> Result<PolicyRef, StoreError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let path = self.policy_path(&sha256);
        let temporary = path.with_extension("tmp");
        let write = || {
            std::fs::write(&temporary, bytes)
                .and_then(|()| std::fs::rename(&temporary, &path))
                .map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })
        };
        write()?;
        let replaced = self.with_connection(|connection| {
            let transaction = connection.transaction()?;
            let previous: Option<String> = transaction
                .query_row(
                    "SELECT sha256 FROM policies WHERE route = ?1 AND version = ?2",
                    params![route, version],
                    |row| row.get(0),
                )
                .optional()?;
            let replaced = previous.filter(|p| *p != sha256);
            if let Some(previous) = &replaced {
                // The file this version had may now be unused.
                transaction.execute(
                    "INSERT OR IGNORE INTO policy_file_deletions (sha256) VALUES (?1)",
                    params![previous],
                )?;
            }
            transaction.execute(
                "INSERT INTO policies (route, version, sha256, published_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (route, version) DO UPDATE SET sha256 = ?3, published_ms = ?4",
                params![route, version, sha256, now_ms()],
            )?;
            transaction.commit()?;
            Ok(replaced.is_some())
        })?;
        if !path.exists() {
            // `Store::delete_unused_policy_files` deleted the file between the write above
            // and the insert, because an older version with the same bytes was deleted.
            write()?;
        }
        if replaced {
            self.delete_unused_policy_files()?;
        }
        Ok(PolicyRef {
            version: version.to_string(),
            sha256,
        })
    }

    /// Finds the policy of `route` to serve: the pinned version, else the newest published.
    pub fn stable_policy(
        &self,
        route: &str,
        pinned: Option<&str>,
    ) -> Result<Option<PolicyRef>, StoreError> {
        self.with_connection(|connection| {
            let row = match pinned {
                Some(version) => connection
                    .query_row(
                        "SELECT version, sha256 FROM policies WHERE route = ?1 AND version = ?2",
                        params![route, version],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()?,
                None => connection
                    .query_row(
                        "SELECT version, sha256 FROM policies WHERE route = ?1
                         ORDER BY published_ms DESC, rowid DESC LIMIT 1",
                        params![route],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()?,
            };
            Ok(row.map(|(version, sha256)| PolicyRef { version, sha256 }))
        })
    }

    /// Returns the last stored configuration version of `route` and its JSON text.
    pub fn route_config(&self, route: &str) -> Result<Option<(u64, String)>, StoreError> {
        self.with_connection(|connection| {
            connection
                .query_row(
                    "SELECT version, config FROM route_configs WHERE route = ?1",
                    params![route],
                    |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)),
                )
                .optional()
        })
    }

    /// Stores the configuration of `route` with its version.
    pub fn save_route_config(
        &self,
        route: &str,
        version: u64,
        config: &str,
    ) -> Result<(), StoreError> {
        self.with_connection(|connection| {
            connection.execute(
                "INSERT INTO route_configs (route, version, config) VALUES (?1, ?2, ?3)
                 ON CONFLICT (route) DO UPDATE SET version = ?2, config = ?3",
                params![route, version as i64, config],
            )
        })?;
        Ok(())
    }

    /// Stores events of `route` and returns how many were new. An event whose decision id is
    /// already stored is skipped, because a sidecar sends a batch again when the response to it
    /// was lost. The events are committed when this returns `Ok`.
    ///
    /// Batches that arrive while another commit runs are committed together, as databases
    /// group the commits of their logs. The first caller to get the connection stores every
    /// waiting batch in one transaction, each under its own savepoint, and sets each caller's
    /// result. Under concurrent senders this writes the WAL and syncs it once per group instead
    /// of once per batch. A batch whose inserts fail is rolled back alone; a failed commit
    /// fails every batch of the group, and none of them is stored.
    pub fn insert_events(
        &self,
        route: &str,
        sidecar: &str,
        events: &[CompletedEvent],
    ) -> Result<usize, StoreError> {
        // The embedding goes into its own column; the JSON text keeps the other fields.
        let rows = events
            .iter()
            .map(|event| {
                let without_embedding = without_embedding(event);
                let json = serde_json::to_string(&without_embedding)?;
                Ok((without_embedding, json, encode_embedding(&event.embedding)))
            })
            .collect::<Result<_, serde_json::Error>>()?;
        let batch = Arc::new(PendingBatch {
            route: route.to_string(),
            sidecar: sidecar.to_string(),
            rows,
            outcome: Mutex::new(None),
        });
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(batch.clone());
        let mut connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        // Another caller may have committed this batch while this one waited.
        if let Some(outcome) = batch.take() {
            return outcome;
        }
        // Only holders of the connection take batches from the queue, and they set the
        // outcome of each before they let go of it, so this batch is still in the queue.
        let group = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let received = now_ms();
        match commit_group(&mut connection, &group, received) {
            Ok(outcomes) => {
                if group.len() > 1 {
                    tracing::debug!(
                        batches = group.len(),
                        events = group.iter().map(|b| b.rows.len()).sum::<usize>(),
                        "committed event batches together"
                    );
                }
                for (pending, outcome) in group.iter().zip(outcomes) {
                    pending.set(outcome.map_err(|source| StoreError::Database {
                        path: self.database.clone(),
                        source,
                    }));
                }
            }
            Err(error) => {
                let message = error.to_string();
                let disk_full = is_sqlite_full(&error);
                for pending in &group {
                    pending.set(Err(StoreError::GroupCommit {
                        path: self.database.clone(),
                        batches: group.len(),
                        message: message.clone(),
                        disk_full,
                    }));
                }
            }
        }
        drop(connection);
        batch.take().unwrap_or_else(|| {
            // Reached only when a caller panicked in the middle of a group commit that held
            // this batch: the transaction was rolled back when it was dropped.
            Err(StoreError::GroupCommit {
                path: self.database.clone(),
                batches: 0,
                message: "the group commit that held this batch was abandoned".into(),
                disk_full: false,
            })
        })
    }

    /// Deletes the oldest events of `route` until none is older than `max_age` (by the time
    /// the control API received it) and at most `max_events` remain. `None` disables that
    /// limit. Returns the number of events deleted. Deletes in transactions of a few thousand
    /// rows, so that event inserts are not held up for the whole deletion.
    pub fn apply_retention(
        &self,
        route: &str,
        max_age: Option<Duration>,
        max_events: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        if let Some(max_age) = max_age {
            let cutoff = now_ms().saturating_sub(max_age.as_millis().min(i64::MAX as u128) as i64);
            // Rows arrive in id order, so the expired ones are the oldest ids: delete expired
            // rows among the oldest chunk until a chunk is not all expired. When the clock
            // stepped back, rows behind a newer-stamped one wait for a later run.
            loop {
                let removed = self.with_connection(|connection| {
                    delete_events(
                        connection,
                        "DELETE FROM events WHERE id IN (
                             SELECT id FROM events WHERE route = ?1 ORDER BY id LIMIT ?2
                         ) AND received_ms < ?3",
                        params![route, RETENTION_CHUNK, cutoff],
                    )
                })? as u64;
                deleted += removed;
                if removed < RETENTION_CHUNK as u64 {
                    break;
                }
            }
        }
        if let Some(max_events) = max_events {
            let keep = max_events.min(i64::MAX as u64) as i64;
            // The id of the newest event beyond the `keep` newest ones.
            let last_excess: Option<i64> = self.with_connection(|connection| {
                connection
                    .query_row(
                        "SELECT id FROM events WHERE route = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2",
                        params![route, keep],
                        |row| row.get(0),
                    )
                    .optional()
            })?;
            if let Some(last) = last_excess {
                deleted += self.delete_through(route, last)?;
            }
        }
        Ok(deleted)
    }

    /// Returns the bytes of the database's pages that hold data: (`page_count` −
    /// `freelist_count`) × `page_size`. A deletion moves pages to the free list, where later
    /// inserts reuse them, and the file keeps its size, so retention lowers this figure only.
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        self.with_connection(|connection| {
            let pragma = |name: &str| {
                connection.query_row(&format!("PRAGMA {name}"), [], |row| row.get::<_, i64>(0))
            };
            let pages = pragma("page_count")? - pragma("freelist_count")?;
            Ok(pages.max(0) as u64 * pragma("page_size")?.max(0) as u64)
        })
    }

    /// Counts the stored events of each route, in route order.
    pub fn event_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with_connection(|connection| {
            let mut statement = connection
                .prepare("SELECT route, COUNT(*) FROM events GROUP BY route ORDER BY route")?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?.max(0) as u64,
                ))
            })?;
            rows.collect()
        })
    }

    /// Deletes the oldest events of the routes that have the most, until the pages in use
    /// ([`Store::used_bytes`]) take at most `max_bytes`. Each pass estimates the events to
    /// delete from the bytes per event, then lowers the largest routes to one common count,
    /// so a busy route gives up events before a quiet one loses any. Stops when no events
    /// are left. Returns the events deleted per route.
    pub fn apply_size_limit(&self, max_bytes: u64) -> Result<SizeRetention, StoreError> {
        let mut deleted: Vec<(String, u64)> = Vec::new();
        let mut used = self.used_bytes()?;
        // The estimate overshoots a little (it counts the pages of other tables as events'),
        // so one pass is the rule and the bound only guards against a wrong estimate.
        for _ in 0..SIZE_LIMIT_PASSES {
            if used <= max_bytes {
                break;
            }
            let counts = self.event_counts()?;
            let total: u64 = counts.iter().map(|(_, count)| count).sum();
            if total == 0 {
                break;
            }
            let per_event = used.div_ceil(total).max(1);
            let excess = (used - max_bytes).div_ceil(per_event).clamp(1, total);
            let level = common_level(&counts, excess);
            for (route, count) in &counts {
                if *count > level {
                    let removed = self.apply_retention(route, None, Some(level))?;
                    match deleted.iter_mut().find(|(name, _)| name == route) {
                        Some((_, sum)) => *sum += removed,
                        None => deleted.push((route.clone(), removed)),
                    }
                }
            }
            used = self.used_bytes()?;
        }
        let events_left = self.with_connection(|connection| {
            connection.query_row("SELECT EXISTS (SELECT 1 FROM events)", [], |row| row.get(0))
        })?;
        Ok(SizeRetention {
            deleted,
            used_bytes: used,
            events_left,
        })
    }

    /// Deletes the events of `route` with ids up to `last`, oldest first, in chunks.
    fn delete_through(&self, route: &str, last: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let removed = self.with_connection(|connection| {
                delete_events(
                    connection,
                    "DELETE FROM events WHERE id IN (
                         SELECT id FROM events WHERE route = ?1 AND id <= ?2 ORDER BY id LIMIT ?3
                     )",
                    params![route, last, RETENTION_CHUNK],
                )
            })? as u64;
            deleted += removed;
            if removed < RETENTION_CHUNK as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Counts the stored events of `route`.
    pub fn count_events(&self, route: &str) -> Result<u64, StoreError> {
        self.with_connection(|connection| {
            connection.query_row(
                "SELECT COUNT(*) FROM events WHERE route = ?1",
                params![route],
                |row| row.get::<_, i64>(0).map(|n| n as u64),
            )
        })
    }

    /// Names every route of which the store has events, policies, configurations, history or
    /// a timeline.
    pub fn stored_routes(&self) -> Result<Vec<String>, StoreError> {
        self.ensure_history()?;
        self.with_connection(|connection| {
            let mut statement = connection.prepare(
                "SELECT DISTINCT route FROM events UNION SELECT route FROM policies
                 UNION SELECT route FROM route_configs UNION SELECT route FROM policy_numbers
                 UNION SELECT route FROM policy_history UNION SELECT route FROM rollouts
                 UNION SELECT route FROM timeline ORDER BY 1",
            )?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect()
        })
    }

    /// Deletes everything the store holds for `route` when the route is deleted: its events,
    /// configuration versions, policy versions with their files (unless another route's
    /// version has the same bytes), policy history, rollout state and timeline. Returns the
    /// number of events deleted.
    pub fn delete_route(&self, route: &str) -> Result<u64, StoreError> {
        self.ensure_history()?;
        let events = self.with_connection(|connection| {
            let transaction = connection.transaction()?;
            let events = delete_events(
                &transaction,
                "DELETE FROM events WHERE route = ?1",
                params![route],
            )?;
            transaction.execute("DELETE FROM route_configs WHERE route = ?1", params![route])?;
            transaction.execute(
                "INSERT OR IGNORE INTO policy_file_deletions (sha256)
                 SELECT sha256 FROM policies WHERE route = ?1",
                params![route],
            )?;
            for table in [
                "policies",
                "policy_history",
                "policy_numbers",
                "rollouts",
                "timeline",
            ] {
                transaction.execute(
                    &format!("DELETE FROM {table} WHERE route = ?1"),
                    params![route],
                )?;
            }
            transaction.commit()?;
            Ok(events as u64)
        })?;
        self.delete_unused_policy_files()?;
        Ok(events)
    }

    /// Reads up to `limit` events of every route with ids above `after`, in id order, with
    /// the route, sender and reception time that another store needs to keep them as here.
    pub fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<ReplicatedEvent>, StoreError> {
        Ok(self.replication_page(after, limit)?.1)
    }

    /// Returns [`Store::id`] and [`Store::events_after`] as of one moment, so that the ids of
    /// the events belong to that identity.
    pub fn replication_page(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<(String, Vec<ReplicatedEvent>), StoreError> {
        type Row = (i64, String, String, i64, String, Option<Vec<u8>>);
        let (id, rows): (String, Vec<Row>) = self.with_connection(|connection| {
            let id = read_store_id(connection)?;
            let mut statement = connection.prepare(
                "SELECT id, route, sidecar, received_ms, event, embedding FROM events
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = statement.query_map(
                params![after, limit.min(i64::MAX as usize) as i64],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                    ))
                },
            )?;
            let rows = rows.collect::<rusqlite::Result<Vec<Row>>>()?;
            Ok((id, rows))
        })?;
        let events = rows
            .into_iter()
            .map(|(id, route, sidecar, received_ms, text, embedding)| {
                Ok(ReplicatedEvent {
                    id,
                    route,
                    sidecar,
                    received_ms,
                    event: decode_row(&text, embedding.as_deref())?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((id, events))
    }

    /// Returns the id of the last event copied from the store `source`, 0 before the first.
    pub fn replication_cursor(&self, source: &str) -> Result<i64, StoreError> {
        self.with_connection(|connection| {
            connection
                .query_row(
                    "SELECT last_id FROM replication_cursors WHERE source = ?1",
                    params![source],
                    |row| row.get(0),
                )
                .optional()
                .map(Option::unwrap_or_default)
        })
    }

    /// Stores events copied from the store `source` with their route, sender and reception
    /// time, skips those already stored (same decision id), and moves the cursor of `source`
    /// to `last_id`, all in one transaction. Returns the number of new events.
    pub fn insert_replicated(
        &self,
        source: &str,
        events: &[ReplicatedEvent],
        last_id: i64,
    ) -> Result<usize, StoreError> {
        let rows = events
            .iter()
            .map(|copy| {
                let without_embedding = without_embedding(&copy.event);
                let json = serde_json::to_string(&without_embedding)?;
                Ok((copy, json, encode_embedding(&copy.event.embedding)))
            })
            .collect::<Result<Vec<_>, serde_json::Error>>()?;
        self.with_connection(|connection| {
            let transaction = connection.transaction()?;
            let mut inserted = 0;
            {
                for (copy, json, embedding) in &rows {
                    inserted += insert_event_row(
                        &transaction,
                        EventRow {
                            route: &copy.route,
                            sidecar: &copy.sidecar,
                            event: &copy.event,
                            received_ms: copy.received_ms,
                            json,
                            embedding,
                        },
                    )?;
                }
            }
            transaction.execute(
                "INSERT INTO replication_cursors (source, last_id) VALUES (?1, ?2)
                 ON CONFLICT (source) DO UPDATE SET last_id = excluded.last_id",
                params![source, last_id],
            )?;
            transaction.commit()?;
            Ok(inserted)
        })
    }

    /// Reads the stored events of `route`, oldest first.
    pub fn events(&self, route: &str) -> Result<Vec<CompletedEvent>, StoreError> {
        let rows: Vec<(String, Option<Vec<u8>>)> = self.with_connection(|connection| {
            let mut statement = connection
                .prepare("SELECT event, embedding FROM events WHERE route = ?1 ORDER BY id")?;
            let rows = statement.query_map(params![route], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter()
            .map(|(text, embedding)| decode_row(text, embedding.as_deref()))
            .collect()
    }
}

/// An event as another store copies it: its id here (the copier's place), route, sender and
/// the time the control API received it (milliseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedEvent {
    pub id: i64,
    pub route: String,
    pub sidecar: String,
    pub received_ms: i64,
    pub event: CompletedEvent,
}

/// Decodes a stored event from its JSON text and its embedding column.
fn decode_row(text: &str, embedding: Option<&[u8]>) -> Result<CompletedEvent, StoreError> {
    let mut event: CompletedEvent = serde_json::from_str(text)?;
    // Rows of schema version 1 have no column value and keep the JSON's embedding.
    if let Some(bytes) = embedding {
        event.embedding = decode_embedding(bytes).ok_or_else(|| StoreError::Embedding {
            decision_id: event.decision.decision_id.clone(),
            bytes: bytes.len(),
        })?;
    }
    Ok(event)
}

/// Stores the batches of one group commit in one transaction, each under a savepoint. Returns
/// each batch's count of new events, or the error that rolled that batch back. Returns `Err`
/// when the transaction itself failed.
fn commit_group(
    connection: &mut Connection,
    group: &[Arc<PendingBatch>],
    received_ms: i64,
) -> rusqlite::Result<Vec<rusqlite::Result<usize>>> {
    let mut transaction = connection.transaction()?;
    let mut outcomes = Vec::with_capacity(group.len());
    for batch in group {
        let savepoint = transaction.savepoint()?;
        match insert_rows(&savepoint, batch, received_ms) {
            Ok(count) => {
                savepoint.commit()?;
                outcomes.push(Ok(count));
            }
            Err(error) => {
                // Dropping a savepoint that was not committed rolls it back.
                drop(savepoint);
                // After some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM) SQLite may roll
                // back the whole transaction itself. Then no batch of the group is stored,
                // and this error, not the failed commit's, is the cause.
                if transaction.is_autocommit() {
                    return Err(error);
                }
                outcomes.push(Err(error));
            }
        }
    }
    transaction.commit()?;
    Ok(outcomes)
}

/// Copies `event` with an empty embedding, without copying the embedding.
fn without_embedding(event: &CompletedEvent) -> CompletedEvent {
    // Naming every field makes a new field of `CompletedEvent` a compile error here.
    let CompletedEvent {
        decision,
        served_model,
        embedding: _,
        quality,
        cost_usd,
        prompt_tokens,
        completion_tokens,
        latency_ms,
        outcome,
        attempts,
        timestamp_ms,
    } = event;
    CompletedEvent {
        decision: decision.clone(),
        served_model: served_model.clone(),
        embedding: Vec::new(),
        quality: *quality,
        cost_usd: *cost_usd,
        prompt_tokens: *prompt_tokens,
        completion_tokens: *completion_tokens,
        latency_ms: *latency_ms,
        outcome: outcome.clone(),
        attempts: *attempts,
        timestamp_ms: *timestamp_ms,
    }
}

fn insert_rows(
    connection: &Connection,
    batch: &PendingBatch,
    received_ms: i64,
) -> rusqlite::Result<usize> {
    let mut inserted = 0;
    for (event, json, embedding) in &batch.rows {
        inserted += insert_event_row(
            connection,
            EventRow {
                route: &batch.route,
                sidecar: &batch.sidecar,
                event,
                received_ms,
                json,
                embedding,
            },
        )?;
    }
    Ok(inserted)
}

/// One row of the `events` table: the event, its JSON text without the embedding and the
/// embedding's bytes.
struct EventRow<'a> {
    route: &'a str,
    sidecar: &'a str,
    event: &'a CompletedEvent,
    received_ms: i64,
    json: &'a str,
    embedding: &'a [u8],
}

/// Inserts `row` unless an event with its decision id is stored. Returns 1 for a new row and
/// 0 for a duplicate.
fn insert_event_row(connection: &Connection, row: EventRow<'_>) -> rusqlite::Result<usize> {
    let mut statement = connection.prepare_cached(
        "INSERT OR IGNORE INTO events
         (route, sidecar, decision_id, model, routed, policy_version, propensity,
          quality, cost_usd, received_ms, event, embedding)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    let event = row.event;
    statement.execute(params![
        row.route,
        row.sidecar,
        event.decision.decision_id,
        event.served_model,
        event.decision.routed,
        event.decision.policy_version,
        event.decision.propensity,
        event.quality,
        event.cost_usd,
        row.received_ms,
        row.json,
        row.embedding,
    ])
}

/// Creates the tables, or brings a database of an older schema version up to date.
fn migrate(connection: &Connection, version: i64) -> rusqlite::Result<()> {
    let has_events: bool = connection.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        [],
        |row| row.get(0),
    )?;
    if has_events {
        let has_embedding: bool = connection.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('events') WHERE name = 'embedding'",
            [],
            |row| row.get(0),
        )?;
        if !has_embedding {
            tracing::info!(
                from_version = version,
                to_version = SCHEMA_VERSION,
                "adding the embedding column to the event table"
            );
            connection.execute_batch("ALTER TABLE events ADD COLUMN embedding BLOB")?;
        }
    }
    connection.execute_batch(SCHEMA)?;
    connection.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
}

/// Encodes an embedding as little-endian f32 values.
fn encode_embedding(values: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// Decodes [`encode_embedding`]'s bytes, `None` when the length is not a multiple of 4.
pub(crate) fn decode_embedding(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use llmroute_api::{DecisionRecord, Outcome, Preference};

    use super::*;

    #[test]
    fn common_level_lowers_largest_first() {
        let counts = |values: &[u64]| -> Vec<(String, u64)> {
            values
                .iter()
                .enumerate()
                .map(|(index, count)| (format!("route-{index}"), *count))
                .collect()
        };

        // Lowering 100 to 60 deletes 40, and the routes below 60 keep every event.
        assert_eq!(common_level(&counts(&[100, 50, 10]), 40), 60);
        assert_eq!(common_level(&counts(&[100, 50, 10]), 41), 59);
        // Level 15 deletes 85 + 35 = 120, level 16 only 84 + 34 = 118.
        assert_eq!(common_level(&counts(&[100, 50, 10]), 120), 15);
        assert_eq!(common_level(&counts(&[100, 50, 10]), 160), 0);
        assert_eq!(common_level(&counts(&[100, 50, 10]), 1_000), 0);
        assert_eq!(common_level(&counts(&[]), 5), 0);

        let routes = counts(&[100, 50, 10]);
        let over = |level: u64| -> u64 {
            routes
                .iter()
                .map(|(_, count)| count.saturating_sub(level))
                .sum()
        };
        for excess in 1..=160 {
            let level = common_level(&routes, excess);
            assert!(over(level) >= excess, "excess {excess}, level {level}");
            assert!(
                over(level + 1) < excess,
                "excess {excess}: level {level} is not the largest"
            );
        }
    }

    fn event(n: u32) -> CompletedEvent {
        CompletedEvent {
            decision: DecisionRecord {
                decision_id: format!("{n:032x}"),
                route: "chat".into(),
                config_version: 1,
                model: "small".into(),
                routed: true,
                preference: Preference::from_quality(0.5).unwrap(),
                policy_version: Some("v1".into()),
                propensity: Some(0.5),
            },
            served_model: "small".into(),
            embedding: vec![0.25; 384],
            quality: Some(0.5),
            cost_usd: Some(1e-5),
            prompt_tokens: Some(10),
            completion_tokens: Some(20),
            latency_ms: 12.5,
            outcome: Outcome::Success,
            attempts: 1,
            timestamp_ms: u64::from(n),
        }
    }

    #[test]
    fn full_database_is_reported_as_disk_full() {
        let folder = tempfile::tempdir().unwrap();
        let store = Store::open(folder.path()).unwrap();
        let first: Vec<CompletedEvent> = (0..10).map(event).collect();
        assert_eq!(store.insert_events("chat", "s", &first).unwrap(), 10);
        // SQLite fails with SQLITE_FULL once the database would grow past this many pages,
        // as it does when the volume is full.
        let pages: i64 = store
            .with_connection(|c| c.query_row("PRAGMA page_count", [], |row| row.get(0)))
            .unwrap();
        store
            .with_connection(|c| {
                c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            })
            .unwrap();
        let more: Vec<CompletedEvent> = (10..500).map(event).collect();
        let error = store.insert_events("chat", "s", &more).unwrap_err();
        assert!(error.is_disk_full(), "{error}");
        assert!(error.to_string().contains("full"), "{error}");
        // The failed batch was rolled back, and the events stored before it remain.
        assert_eq!(store.count_events("chat").unwrap(), 10);
    }

    #[test]
    fn other_failures_are_not_disk_full() {
        let source = rusqlite::Error::QueryReturnedNoRows;
        let error = StoreError::Database {
            path: PathBuf::from("events.db"),
            source,
        };
        assert!(!error.is_disk_full());
        let io = StoreError::Io {
            path: PathBuf::from("policies"),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert!(io.is_disk_full());
    }
}
