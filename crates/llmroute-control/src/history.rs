//! The learning loop's records in the state database: the policy history of each route (phase,
//! origin, parent, training data, off-policy and live figures per version), the route's rollout
//! state (canary version, step, weight, last training run), and a timeline of rollout
//! decisions, the standalone counterpart of Kubernetes Events.

use llmroute_api::CompletedEvent;
use llmroute_api::crd::{
    GateFigures, LastTraining, LiveFigures, PolicyOrigin, PolicyPhase, TrainingData,
};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, decode_embedding};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS policy_history (
    route TEXT NOT NULL,
    version TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (route, version)
);
CREATE TABLE IF NOT EXISTS rollouts (
    route TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS timeline (
    id INTEGER PRIMARY KEY,
    route TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS timeline_by_route ON timeline (route, id);
";

/// One policy version of a route, as `kubectl get llmpolicies` would show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRecord {
    pub version: String,
    pub sha256: String,
    pub phase: PolicyPhase,
    pub origin: PolicyOrigin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Unix time of the record's creation, in milliseconds.
    pub created_ms: u64,
    /// Reason for the policy's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_policy: Option<GateFigures>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveFigures>,
    /// Unix time in milliseconds at which the version became `Retired` or `Rejected`; set by
    /// [`Store::save_policy_record`], absent in other phases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
}

/// Whether a version in `phase` will not serve again unless it is pinned.
pub fn has_ended(phase: PolicyPhase) -> bool {
    matches!(phase, PolicyPhase::Retired | PolicyPhase::Rejected)
}

/// A route's rollout state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    /// Version under canary analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// Canary step, from 0.
    #[serde(default)]
    pub step: u32,
    /// Share of routed requests the canary decides.
    #[serde(default)]
    pub weight: f64,
    /// Events with a larger store id count for the current step.
    #[serde(default)]
    pub step_start_event_id: i64,
    /// Unix time of the last training run's end, in milliseconds.
    #[serde(default)]
    pub last_training_ms: u64,
    /// Events with a larger store id are new for the next training run.
    #[serde(default)]
    pub last_training_event_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_training: Option<LastTraining>,
    /// Reason the route is degraded (the last canary aborted), kept until the next promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// One rollout decision, with its reason and numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    pub time_ms: u64,
    /// One CamelCase word, such as `CanaryStepHeld`.
    pub reason: String,
    pub message: String,
}

/// A stored event with its store id.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: i64,
    pub event: CompletedEvent,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn raise_highest(
    connection: &rusqlite::Connection,
    route: &str,
    number: u64,
) -> rusqlite::Result<()> {
    if number > 0 {
        connection.execute(
            "INSERT INTO policy_numbers (route, highest) VALUES (?1, ?2)
             ON CONFLICT (route) DO UPDATE SET highest = MAX(highest, ?2)",
            params![route, number as i64],
        )?;
    }
    Ok(())
}

fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    Ok(serde_json::to_string(value)?)
}

impl Store {
    /// Creates the learning loop's tables when missing.
    pub fn ensure_history(&self) -> Result<(), StoreError> {
        self.with_connection(|connection| connection.execute_batch(SCHEMA))
    }

    /// Writes (inserting or replacing) one policy record of `route`. A record that enters
    /// `Retired` or `Rejected` without an end time gets the current time; one in another phase
    /// loses its end time. The route's highest version number rises to the record's.
    pub fn save_policy_record(&self, route: &str, record: &PolicyRecord) -> Result<(), StoreError> {
        let mut record = record.clone();
        if !has_ended(record.phase) {
            record.ended_ms = None;
        } else if record.ended_ms.is_none() {
            record.ended_ms = Some(now_ms());
        }
        let json = to_json(&record)?;
        let number = crate::learning::version_number(&record.version);
        self.with_connection(|connection| {
            let transaction = connection.transaction()?;
            transaction.execute(
                "INSERT INTO policy_history (route, version, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT (route, version) DO UPDATE SET record = ?3",
                params![route, record.version, json],
            )?;
            raise_highest(&transaction, route, number)?;
            transaction.commit()
        })?;
        Ok(())
    }

    /// The highest version number that `route` has had, deleted versions included: the
    /// largest `N` of a `vN` saved by [`Store::save_policy_record`] or passed to
    /// [`Store::raise_highest_version`]; 0 when none.
    pub fn highest_version(&self, route: &str) -> Result<u64, StoreError> {
        self.with_connection(|connection| {
            connection
                .query_row(
                    "SELECT highest FROM policy_numbers WHERE route = ?1",
                    params![route],
                    |row| row.get::<_, i64>(0),
                )
                .optional()
                .map(|n| n.unwrap_or(0).max(0) as u64)
        })
    }

    /// Raises the highest version number of `route` to `number` when it is lower, such as to
    /// the number another leader recorded in the cluster.
    pub fn raise_highest_version(&self, route: &str, number: u64) -> Result<(), StoreError> {
        self.with_connection(|connection| raise_highest(connection, route, number))
    }

    /// Deletes policy versions of `route`: their history records, their publications, and
    /// each file that no publication of any route uses any more. Returns how many of
    /// `versions` the store held.
    ///
    /// The files to delete are queued in the transaction that deletes the rows, so a crash
    /// between the commit and the file deletion leaves a queued file, which the next call
    /// deletes, rather than a file that nothing names.
    pub fn delete_policy_versions(
        &self,
        route: &str,
        versions: &[String],
    ) -> Result<usize, StoreError> {
        let deleted = self.with_connection(|connection| {
            let transaction = connection.transaction()?;
            let mut deleted = 0;
            for version in versions {
                let sha256: Option<String> = transaction
                    .query_row(
                        "SELECT sha256 FROM policies WHERE route = ?1 AND version = ?2",
                        params![route, version],
                        |row| row.get(0),
                    )
                    .optional()?;
                if let Some(sha256) = &sha256 {
                    transaction.execute(
                        "INSERT OR IGNORE INTO policy_file_deletions (sha256) VALUES (?1)",
                        params![sha256],
                    )?;
                }
                let publications = transaction.execute(
                    "DELETE FROM policies WHERE route = ?1 AND version = ?2",
                    params![route, version],
                )?;
                let records = transaction.execute(
                    "DELETE FROM policy_history WHERE route = ?1 AND version = ?2",
                    params![route, version],
                )?;
                if publications + records > 0 {
                    deleted += 1;
                }
            }
            transaction.commit()?;
            Ok(deleted)
        })?;
        self.delete_unused_policy_files()?;
        Ok(deleted)
    }

    /// Deletes the queued policy files that no publication uses; returns how many it deleted.
    /// A file that cannot be deleted stays queued, and the failure is logged.
    pub fn delete_unused_policy_files(&self) -> Result<usize, StoreError> {
        // The check and the deletion happen under the connection's lock, and
        // `Store::publish_policy` writes its file again when it is missing after its row is
        // inserted, so a file published again meanwhile is never lost.
        self.with_connection(|connection| {
            let queued: Vec<(String, bool)> = {
                let mut statement = connection.prepare(
                    "SELECT sha256, EXISTS (SELECT 1 FROM policies p WHERE p.sha256 = d.sha256)
                     FROM policy_file_deletions d",
                )?;
                let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut removed = 0;
            for (sha256, used) in queued {
                if !used {
                    let path = self.policy_path(&sha256);
                    match std::fs::remove_file(&path) {
                        Ok(()) => removed += 1,
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => {
                            tracing::warn!(path = %path.display(), error = %error, "failed to delete an unused policy file; retrying at the next deletion");
                            continue;
                        }
                    }
                }
                connection.execute(
                    "DELETE FROM policy_file_deletions WHERE sha256 = ?1",
                    params![sha256],
                )?;
            }
            Ok(removed)
        })
    }

    /// Reads the policy history of `route`, oldest first.
    pub fn policy_records(&self, route: &str) -> Result<Vec<PolicyRecord>, StoreError> {
        let texts: Vec<String> = self.with_connection(|connection| {
            let mut statement = connection
                .prepare("SELECT record FROM policy_history WHERE route = ?1 ORDER BY rowid")?;
            let rows = statement.query_map(params![route], |row| row.get(0))?;
            rows.collect()
        })?;
        let mut records: Vec<PolicyRecord> = texts
            .iter()
            .map(|text| serde_json::from_str(text).map_err(StoreError::from))
            .collect::<Result<_, _>>()?;
        records.sort_by_key(|r| r.created_ms);
        Ok(records)
    }

    /// Reads one policy record of `route`.
    pub fn policy_record(
        &self,
        route: &str,
        version: &str,
    ) -> Result<Option<PolicyRecord>, StoreError> {
        let text: Option<String> = self.with_connection(|connection| {
            connection
                .query_row(
                    "SELECT record FROM policy_history WHERE route = ?1 AND version = ?2",
                    params![route, version],
                    |row| row.get(0),
                )
                .optional()
        })?;
        text.map(|t| serde_json::from_str(&t).map_err(StoreError::from))
            .transpose()
    }

    /// Reads the rollout state of `route` (the default when none is stored).
    pub fn rollout_state(&self, route: &str) -> Result<RolloutState, StoreError> {
        let text: Option<String> = self.with_connection(|connection| {
            connection
                .query_row(
                    "SELECT state FROM rollouts WHERE route = ?1",
                    params![route],
                    |row| row.get(0),
                )
                .optional()
        })?;
        Ok(match text {
            Some(text) => serde_json::from_str(&text)?,
            None => RolloutState::default(),
        })
    }

    /// Stores the rollout state of `route`.
    pub fn save_rollout_state(&self, route: &str, state: &RolloutState) -> Result<(), StoreError> {
        let json = to_json(state)?;
        self.with_connection(|connection| {
            connection.execute(
                "INSERT INTO rollouts (route, state) VALUES (?1, ?2)
                 ON CONFLICT (route) DO UPDATE SET state = ?2",
                params![route, json],
            )
        })?;
        Ok(())
    }

    /// Appends a rollout decision to the timeline of `route`.
    pub fn record_timeline(
        &self,
        route: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        self.with_connection(|connection| {
            connection.execute(
                "INSERT INTO timeline (route, time_ms, reason, message) VALUES (?1, ?2, ?3, ?4)",
                params![route, now_ms() as i64, reason, message],
            )
        })?;
        Ok(())
    }

    /// Reads the last `limit` timeline entries of `route`, oldest first.
    pub fn timeline(&self, route: &str, limit: usize) -> Result<Vec<TimelineEntry>, StoreError> {
        let mut entries: Vec<TimelineEntry> = self.with_connection(|connection| {
            let mut statement = connection.prepare(
                "SELECT time_ms, reason, message FROM timeline WHERE route = ?1
                 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = statement.query_map(params![route, limit as i64], |row| {
                Ok(TimelineEntry {
                    time_ms: row.get::<_, i64>(0)? as u64,
                    reason: row.get(1)?,
                    message: row.get(2)?,
                })
            })?;
            rows.collect()
        })?;
        entries.reverse();
        Ok(entries)
    }

    /// Returns the largest event id of `route`, 0 when it has none.
    pub fn last_event_id(&self, route: &str) -> Result<i64, StoreError> {
        self.with_connection(|connection| {
            connection.query_row(
                "SELECT COALESCE(MAX(id), 0) FROM events WHERE route = ?1",
                params![route],
                |row| row.get(0),
            )
        })
    }

    /// Counts the routed events of `route` with quality feedback and a store id above
    /// `after_id`.
    pub fn count_feedback_events(&self, route: &str, after_id: i64) -> Result<u64, StoreError> {
        self.with_connection(|connection| {
            connection.query_row(
                "SELECT COUNT(*) FROM events
                 WHERE route = ?1 AND id > ?2 AND routed = 1 AND quality IS NOT NULL",
                params![route, after_id],
                |row| row.get::<_, i64>(0).map(|n| n as u64),
            )
        })
    }

    /// Reads the most recent `limit` routed events of `route` with quality feedback, oldest
    /// first: the training window.
    pub fn recent_feedback_events(
        &self,
        route: &str,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events = self.select_events(
            "SELECT id, event, embedding FROM events
             WHERE route = ?1 AND routed = 1 AND quality IS NOT NULL
             ORDER BY id DESC LIMIT ?2",
            params![route, limit as i64],
        )?;
        events.reverse();
        Ok(events)
    }

    /// Reads the routed events of `route` decided by one of `versions` with a store id above
    /// `after_id`, oldest first: a canary step's sample.
    pub fn events_of_versions(
        &self,
        route: &str,
        versions: [&str; 2],
        after_id: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.select_events(
            "SELECT id, event, embedding FROM events
             WHERE route = ?1 AND id > ?2 AND routed = 1 AND policy_version IN (?3, ?4)
             ORDER BY id",
            params![route, after_id, versions[0], versions[1]],
        )
    }

    fn select_events(
        &self,
        sql: &str,
        parameters: impl rusqlite::Params,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<(i64, String, Option<Vec<u8>>)> = self.with_connection(|connection| {
            let mut statement = connection.prepare(sql)?;
            let rows = statement.query_map(parameters, |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(id, text, embedding)| {
                let mut event: CompletedEvent = serde_json::from_str(&text)?;
                if let Some(bytes) = embedding {
                    event.embedding =
                        decode_embedding(&bytes).ok_or_else(|| StoreError::Embedding {
                            decision_id: event.decision.decision_id.clone(),
                            bytes: bytes.len(),
                        })?;
                }
                Ok(StoredEvent { id, event })
            })
            .collect()
    }
}
