//! The event store: embeddings in their own column, databases of the first schema version,
//! and retention by age, by count and by the store's size.

use std::time::Duration;

use llmroute_api::{CompletedEvent, DecisionRecord, Outcome, Preference};
use llmroute_control::store::{Store, StoreError};
use rusqlite::{Connection, params};

fn event(route: &str, n: u32) -> CompletedEvent {
    CompletedEvent {
        decision: DecisionRecord {
            decision_id: format!("{n:032x}"),
            route: route.into(),
            config_version: 1,
            model: "small".into(),
            routed: true,
            preference: Preference::from_quality(0.5).unwrap(),
            policy_version: Some("v1".into()),
            propensity: Some(0.5),
        },
        served_model: "small".into(),
        embedding: (0..384).map(|i| i as f32 / 384.0 - 0.5).collect(),
        quality: Some(0.25),
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
fn store_round_trips_embeddings() {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path()).unwrap();
    let events: Vec<CompletedEvent> = (0..5).map(|n| event("chat", n)).collect();
    assert_eq!(store.insert_events("chat", "pod", &events).unwrap(), 5);
    assert_eq!(store.events("chat").unwrap(), events);

    // The JSON text no longer carries the embedding; the column does.
    drop(store);
    let connection = Connection::open(state.path().join("state.sqlite3")).unwrap();
    let (text, blob): (String, Vec<u8>) = connection
        .query_row("SELECT event, embedding FROM events LIMIT 1", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .unwrap();
    assert!(text.contains("\"embedding\":[]"), "{text}");
    assert_eq!(blob.len(), 384 * 4);
}

/// The first schema, as written before the embedding column existed.
const SCHEMA_V1: &str = "
CREATE TABLE policies (route TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
    published_ms INTEGER NOT NULL, PRIMARY KEY (route, version));
CREATE TABLE route_configs (route TEXT PRIMARY KEY, version INTEGER NOT NULL, config TEXT NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, route TEXT NOT NULL, sidecar TEXT NOT NULL,
    decision_id TEXT NOT NULL UNIQUE, model TEXT NOT NULL, routed INTEGER NOT NULL,
    policy_version TEXT, propensity REAL, quality REAL, cost_usd REAL,
    received_ms INTEGER NOT NULL, event TEXT NOT NULL);
CREATE INDEX events_by_route ON events (route, id);
";

#[test]
fn store_opens_first_schema() {
    let state = tempfile::tempdir().unwrap();
    let old = event("chat", 1);
    {
        let connection = Connection::open(state.path().join("state.sqlite3")).unwrap();
        connection.execute_batch(SCHEMA_V1).unwrap();
        connection
            .execute(
                "INSERT INTO events (route, sidecar, decision_id, model, routed, received_ms, event)
                 VALUES ('chat', 'pod', ?1, 'small', 1, 0, ?2)",
                params![old.decision.decision_id, serde_json::to_string(&old).unwrap()],
            )
            .unwrap();
    }
    let store = Store::open(state.path()).unwrap();
    let new = event("chat", 2);
    assert_eq!(
        store
            .insert_events("chat", "pod", std::slice::from_ref(&new))
            .unwrap(),
        1
    );
    assert_eq!(store.events("chat").unwrap(), vec![old, new]);
    drop(store);

    // A database from a newer llmroute is not opened.
    let connection = Connection::open(state.path().join("state.sqlite3")).unwrap();
    connection
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    drop(connection);
    match Store::open(state.path()) {
        Err(StoreError::SchemaVersion { version, .. }) => assert_eq!(version, 99),
        other => panic!("expected a schema version error, got {other:?}"),
    }
}

#[test]
fn retention_deletes_oldest_first() {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path()).unwrap();
    let chat: Vec<CompletedEvent> = (0..12_000).map(|n| event("chat", n)).collect();
    let other: Vec<CompletedEvent> = (100_000..100_010).map(|n| event("other", n)).collect();
    store.insert_events("chat", "pod", &chat).unwrap();
    store.insert_events("other", "pod", &other).unwrap();

    assert_eq!(store.apply_retention("chat", None, None).unwrap(), 0);
    // More than one deletion chunk, by count.
    assert_eq!(
        store.apply_retention("chat", None, Some(1_000)).unwrap(),
        11_000
    );
    let kept = store.events("chat").unwrap();
    assert_eq!(kept.len(), 1_000);
    assert_eq!(kept[0], chat[11_000], "the newest events are kept");
    assert_eq!(
        store.count_events("other").unwrap(),
        10,
        "other routes are untouched"
    );

    // By age: mark the 400 oldest kept events as received two days ago.
    drop(store);
    let connection = Connection::open(state.path().join("state.sqlite3")).unwrap();
    let two_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 2 * 24 * 3600 * 1000;
    connection
        .execute(
            "UPDATE events SET received_ms = ?1 WHERE id IN
             (SELECT id FROM events WHERE route = 'chat' ORDER BY id LIMIT 400)",
            params![two_days_ago],
        )
        .unwrap();
    drop(connection);
    let store = Store::open(state.path()).unwrap();
    let day = Some(Duration::from_secs(24 * 3600));
    assert_eq!(store.apply_retention("chat", day, None).unwrap(), 400);
    assert_eq!(store.events("chat").unwrap()[0], chat[11_400]);
    assert_eq!(store.apply_retention("chat", day, Some(1_000)).unwrap(), 0);
    assert_eq!(store.count_events("chat").unwrap(), 600);
}

/// The size limit takes events from the busiest route, oldest first, until the pages in use
/// fit, and a quiet route keeps all of its events.
#[test]
fn size_limit_deletes_from_busiest_route() {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path()).unwrap();
    let busy: Vec<CompletedEvent> = (0..12_000).map(|n| event("busy", n)).collect();
    let quiet: Vec<CompletedEvent> = (100_000..102_000).map(|n| event("quiet", n)).collect();
    store.insert_events("busy", "pod", &busy).unwrap();
    store.insert_events("quiet", "pod", &quiet).unwrap();
    let full = store.used_bytes().unwrap();
    // About 2.1 KB per event, three to an 8 KiB page.
    assert!(full > 14_000 * 2_000, "{full} bytes for 14,000 events");
    let file = std::fs::metadata(state.path().join("state.sqlite3"))
        .unwrap()
        .len();

    let unchanged = store.apply_size_limit(full).unwrap();
    assert!(unchanged.deleted.is_empty(), "{unchanged:?}");

    let limit = full / 2;
    let applied = store.apply_size_limit(limit).unwrap();
    assert!(applied.used_bytes <= limit, "{applied:?} over {limit}");
    assert_eq!(applied.used_bytes, store.used_bytes().unwrap());
    assert_eq!(applied.deleted.len(), 1, "{applied:?}");
    assert_eq!(applied.deleted[0].0, "busy");
    assert_eq!(store.count_events("quiet").unwrap(), 2_000);
    let kept = store.events("busy").unwrap();
    assert_eq!(kept.len() as u64, 12_000 - applied.deleted[0].1);
    assert_eq!(kept.last(), busy.last(), "the newest events are kept");
    assert_eq!(kept[0], busy[12_000 - kept.len()], "the oldest go first");
    // Fewer than half of the events go: the other tables and indexes take pages too, so
    // the estimate of bytes per event is high.
    assert!(kept.len() > 4_000, "kept {}", kept.len());
    let after = std::fs::metadata(state.path().join("state.sqlite3"))
        .unwrap()
        .len();
    assert!(after >= file, "the file keeps its pages for later inserts");

    // A limit below what the other tables take deletes every event, then stops.
    let empty = store.apply_size_limit(1).unwrap();
    assert!(empty.used_bytes > 1);
    assert_eq!(store.event_counts().unwrap(), Vec::new());
    assert_eq!(store.apply_size_limit(1).unwrap().deleted, Vec::new());
}

/// Batches sent at the same time may share one commit. Each caller gets the count of its own
/// new events, and a batch that fails is rolled back without the others.
#[test]
fn concurrent_batches_are_each_stored_once() {
    let state = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(state.path()).unwrap());
    // A trigger rejects the events of route "bad", so one batch fails among the others.
    Connection::open(state.path().join("state.sqlite3"))
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER reject_bad BEFORE INSERT ON events WHEN NEW.route = 'bad'
             BEGIN SELECT RAISE(ABORT, 'rejected by the test'); END;",
        )
        .unwrap();

    const SENDERS: u32 = 8;
    const BAD: u32 = 3;
    // Sender t sends ids 25t .. 25t + 50, so each batch shares half its ids with the next.
    let ids = |t: u32| (25 * t)..(25 * t + 50);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(SENDERS as usize));
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let events: Vec<CompletedEvent> = ids(t).map(|n| event("chat", n)).collect();
                let route = if t == BAD { "bad" } else { "chat" };
                barrier.wait();
                (t, store.insert_events(route, "pod", &events))
            })
        })
        .collect();

    let mut new_events = 0;
    for sender in senders {
        let (t, outcome) = sender.join().unwrap();
        if t == BAD {
            let error = outcome.expect_err("the trigger rejects route bad");
            assert!(
                error.to_string().contains("rejected by the test"),
                "{error}"
            );
        } else {
            new_events += outcome.unwrap();
        }
    }

    let good: std::collections::BTreeSet<u32> =
        (0..SENDERS).filter(|t| *t != BAD).flat_map(ids).collect();
    assert_eq!(new_events, good.len(), "each id is counted as new once");
    assert_eq!(store.count_events("chat").unwrap(), good.len() as u64);
    assert_eq!(
        store.count_events("bad").unwrap(),
        0,
        "the failed batch is rolled back"
    );
}

/// SQLite gives a new row the largest id plus one, so deleting the newest events would hand
/// their ids out again below the place of replicas that copied them. Such a deletion gives
/// the store a new replication identity, and the others keep it.
#[test]
fn deleting_newest_events_renews_store_id() {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path()).unwrap();
    let first = store.id().unwrap();
    assert_eq!(first.len(), 32);
    assert_eq!(
        Store::open(state.path()).unwrap().id().unwrap(),
        first,
        "kept across opens"
    );
    let old: Vec<CompletedEvent> = (0..10).map(|n| event("old", n)).collect();
    let new: Vec<CompletedEvent> = (10..20).map(|n| event("new", n)).collect();
    store.insert_events("old", "pod", &old).unwrap();
    store.insert_events("new", "pod", &new).unwrap();

    // Oldest first, by count: the newest event stays.
    assert_eq!(store.apply_retention("old", None, Some(5)).unwrap(), 5);
    assert_eq!(store.id().unwrap(), first);
    // The route with the oldest events goes, the newest event stays.
    store.delete_route("old").unwrap();
    assert_eq!(store.id().unwrap(), first);

    let last = store.events_after(0, 100).unwrap().last().unwrap().id;
    store.delete_route("new").unwrap();
    let second = store.id().unwrap();
    assert_ne!(second, first, "the newest events went");
    store
        .insert_events("new", "pod", &[event("new", 30)])
        .unwrap();
    let (id, page) = store.replication_page(0, 100).unwrap();
    assert_eq!(id, second);
    assert!(
        page[0].id <= last,
        "the id is handed out again: {} ≤ {last}",
        page[0].id
    );
}
