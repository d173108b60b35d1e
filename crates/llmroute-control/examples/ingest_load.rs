//! Load generator for `scripts/bench-ingest`: posts event batches shaped like the sidecar's
//! (routed events with 384-dimensional embeddings) to a running control API and prints one
//! table row per batch size and concurrency: events/s and the p50/p99 batch latency.
//!
//! Usage: `ingest_load URL ROUTE TOKEN_FILE SECONDS BATCH_SIZES CONCURRENCIES [FORMAT [IDS]]`,
//! for example `ingest_load http://127.0.0.1:8070 chat token 10 64,256 1,4`. TOKEN_FILE may be
//! `-` for none. FORMAT is `base64` (the sidecar's, the default) or `array` (JSON numbers) for
//! the embeddings. IDS is `uuid7` (the default: time-ordered ids as the sidecar makes them) or
//! `random` (128 random bits, as sidecars before 2026-12-05 made them). Every decision id is
//! new, so nothing is a duplicate.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};

const DIM: usize = 384;
/// Distinct embeddings cycled through the events, pre-formatted as JSON values.
const EMBEDDINGS: usize = 32;

struct Settings {
    url: String,
    route: String,
    token: Option<String>,
    duration: Duration,
    batch_sizes: Vec<usize>,
    /// Whether embeddings are sent as base64 text (as sidecars send them) or number arrays.
    base64: bool,
    /// Whether decision ids are time-ordered UUIDs version 7 (as sidecars make them) or random.
    time_ordered_ids: bool,
    concurrencies: Vec<usize>,
}

fn parse_list(name: &str, text: &str) -> Vec<usize> {
    text.split(',')
        .map(|item| {
            item.parse()
                .ok()
                .filter(|n: &usize| *n > 0)
                .unwrap_or_else(|| {
                    panic!("invalid {name} {item:?}: expected positive whole numbers separated by commas")
                })
        })
        .collect()
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(6..=8).contains(&args.len()) {
        eprintln!(
            "usage: ingest_load URL ROUTE TOKEN_FILE SECONDS BATCH_SIZES CONCURRENCIES [base64|array [uuid7|random]]\n\
             example: ingest_load http://127.0.0.1:8070 chat token 10 64,256 1,4"
        );
        std::process::exit(2);
    }
    let token = match args[2].as_str() {
        "-" => None,
        path => Some(
            std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("failed to read the token file {path}: {e}"))
                .trim()
                .to_string(),
        ),
    };
    let seconds: u64 = args[3]
        .parse()
        .unwrap_or_else(|_| panic!("invalid SECONDS {:?}: expected a whole number", args[3]));
    Settings {
        url: args[0].trim_end_matches('/').to_string(),
        route: args[1].clone(),
        token,
        duration: Duration::from_secs(seconds),
        batch_sizes: parse_list("BATCH_SIZES", &args[4]),
        concurrencies: parse_list("CONCURRENCIES", &args[5]),
        base64: match args.get(6).map(String::as_str) {
            None | Some("base64") => true,
            Some("array") => false,
            Some(other) => panic!("invalid FORMAT {other:?}: expected base64 or array"),
        },
        time_ordered_ids: match args.get(7).map(String::as_str) {
            None | Some("uuid7") => true,
            Some("random") => false,
            Some(other) => panic!("invalid IDS {other:?}: expected uuid7 or random"),
        },
    }
}

/// Creates random unit-length embeddings as JSON values: base64 text of little-endian f32
/// values (what sidecars send) or arrays of numbers.
fn embeddings(base64: bool) -> Vec<String> {
    let mut rng = rand::rng();
    (0..EMBEDDINGS)
        .map(|_| {
            let values: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
            let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
            let unit: Vec<f32> = values.iter().map(|v| v / norm).collect();
            if base64 {
                use base64::Engine;
                let bytes: Vec<u8> = unit.iter().flat_map(|v| v.to_le_bytes()).collect();
                format!(
                    "\"{}\"",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                )
            } else {
                serde_json::to_string(&unit).unwrap()
            }
        })
        .collect()
}

/// Builds one batch body of `size` events with new decision ids.
fn batch_body(
    route: &str,
    size: usize,
    embeddings: &[String],
    time_ordered_ids: bool,
    rng: &mut impl Rng,
) -> Vec<u8> {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut body = String::with_capacity(size * 5_000);
    write!(body, r#"{{"route":"{route}","sidecar":"bench","events":["#).unwrap();
    for i in 0..size {
        if i > 0 {
            body.push(',');
        }
        let id = if time_ordered_ids {
            llmroute_api::new_decision_id(unix_ms, rng.random())
        } else {
            format!("{:032x}", rng.random::<u128>())
        };
        let quality: f64 = rng.random_range(0.0..1.0);
        let embedding = &embeddings[i % embeddings.len()];
        write!(
            body,
            r#"{{"decision":{{"decisionId":"{id}","route":"{route}","configVersion":1,"model":"small","routed":true,"preference":{{"quality":0.7,"cost":0.30000000000000004}},"policyVersion":"v1","propensity":0.93}},"servedModel":"small","embedding":{embedding},"quality":{quality},"costUsd":0.00012,"promptTokens":54,"completionTokens":180,"latencyMs":812.5,"outcome":{{"kind":"success"}},"attempts":1,"timestampMs":1764806400000}}"#
        )
        .unwrap();
    }
    body.push_str("]}");
    body.into_bytes()
}

struct Row {
    batch_size: usize,
    concurrency: usize,
    batches: usize,
    events_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn run_one(
    settings: Arc<Settings>,
    embeddings: Arc<Vec<String>>,
    batch_size: usize,
    concurrency: usize,
) -> Row {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let settings = settings.clone();
        let embeddings = embeddings.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut rng = rand::rngs::StdRng::from_os_rng();
            while started.elapsed() < settings.duration {
                let body = batch_body(
                    &settings.route,
                    batch_size,
                    &embeddings,
                    settings.time_ordered_ids,
                    &mut rng,
                );
                let mut request = Request::builder()
                    .method(Method::POST)
                    .uri(format!("{}/v1/events", settings.url))
                    .header("content-type", "application/json");
                if let Some(token) = &settings.token {
                    request = request.header("authorization", format!("Bearer {token}"));
                }
                let request = request.body(Full::new(Bytes::from(body))).unwrap();
                let sent = Instant::now();
                let response = client
                    .request(request)
                    .await
                    .expect("the control API responds");
                let status = response.status();
                let reply = response.into_body().collect().await.unwrap().to_bytes();
                latencies.push(sent.elapsed());
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{}",
                    String::from_utf8_lossy(&reply)
                );
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("a load worker panicked"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1e3
    };
    Row {
        batch_size,
        concurrency,
        batches: latencies.len(),
        events_per_second: (latencies.len() * batch_size) as f64 / elapsed,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
    }
}

fn main() {
    let settings = Arc::new(settings());
    let embeddings = Arc::new(embeddings(settings.base64));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the async runtime starts");
    println!("| batch size | concurrency | batches | events/s | p50 batch ms | p99 batch ms |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &batch_size in &settings.batch_sizes {
        for &concurrency in &settings.concurrencies {
            let row = runtime.block_on(run_one(
                settings.clone(),
                embeddings.clone(),
                batch_size,
                concurrency,
            ));
            println!(
                "| {} | {} | {} | {:.0} | {:.1} | {:.1} |",
                row.batch_size,
                row.concurrency,
                row.batches,
                row.events_per_second,
                row.p50_ms,
                row.p99_ms
            );
        }
    }
}
