//! The state folder: policy artifacts as `policies/<sha256>.onnx`, and an SQLite database with
//! published policies, route configuration versions and completed events.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
}

/// The state folder and its database connection.
#[derive(Debug)]
pub struct Store {
    folder: PathBuf,
    database: PathBuf,
    connection: Mutex<Connection>,
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
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_route ON events (route, id);
";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating when missing) the state folder and `state.sqlite3` inside it.
    pub fn open(folder: &Path) -> Result<Self, StoreError> {
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
        // WAL keeps readers and the event writer from blocking each other; NORMAL sync is
        // durable across process crashes, which is what the state folder needs.
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .map_err(db_error)?;
        connection.execute_batch(SCHEMA).map_err(db_error)?;
        Ok(Self {
            folder: folder.to_path_buf(),
            database,
            connection: Mutex::new(connection),
        })
    }

    fn with_connection<T>(
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
        std::fs::write(&temporary, bytes)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        self.with_connection(|connection| {
            connection.execute(
                "INSERT INTO policies (route, version, sha256, published_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (route, version) DO UPDATE SET sha256 = ?3, published_ms = ?4",
                params![route, version, sha256, now_ms()],
            )
        })?;
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

    /// Stores events of `route` in one transaction and returns how many were new. An event
    /// whose decision id is already stored is skipped, because a sidecar sends a batch again
    /// when the response to it was lost.
    pub fn insert_events(
        &self,
        route: &str,
        sidecar: &str,
        events: &[CompletedEvent],
    ) -> Result<usize, StoreError> {
        let encoded: Vec<String> = events
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        let received = now_ms();
        self.with_connection(|connection| {
            let transaction = connection.transaction()?;
            let mut inserted = 0;
            {
                let mut statement = transaction.prepare_cached(
                    "INSERT OR IGNORE INTO events
                     (route, sidecar, decision_id, model, routed, policy_version, propensity,
                      quality, cost_usd, received_ms, event)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?;
                for (event, json) in events.iter().zip(&encoded) {
                    inserted += statement.execute(params![
                        route,
                        sidecar,
                        event.decision.decision_id,
                        event.served_model,
                        event.decision.routed,
                        event.decision.policy_version,
                        event.decision.propensity,
                        event.quality,
                        event.cost_usd,
                        received,
                        json,
                    ])?;
                }
            }
            transaction.commit()?;
            Ok(inserted)
        })
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

    /// Deletes the stored events and configuration versions of `route`, when the route is
    /// deleted. Returns the number of events deleted.
    pub fn delete_route(&self, route: &str) -> Result<u64, StoreError> {
        self.with_connection(|connection| {
            let transaction = connection.transaction()?;
            let events =
                transaction.execute("DELETE FROM events WHERE route = ?1", params![route])?;
            transaction.execute("DELETE FROM route_configs WHERE route = ?1", params![route])?;
            transaction.commit()?;
            Ok(events as u64)
        })
    }

    /// Reads the stored events of `route`, oldest first.
    pub fn events(&self, route: &str) -> Result<Vec<CompletedEvent>, StoreError> {
        let texts: Vec<String> = self.with_connection(|connection| {
            let mut statement =
                connection.prepare("SELECT event FROM events WHERE route = ?1 ORDER BY id")?;
            let rows = statement.query_map(params![route], |row| row.get(0))?;
            rows.collect()
        })?;
        texts
            .iter()
            .map(|text| serde_json::from_str(text).map_err(StoreError::from))
            .collect()
    }
}
