//! Times one training run of the learning loop on 100 000 stored events: reading the window
//! from the event store, off-policy training from the pricing prior, and the off-policy gate.
//!
//! `cargo run --release -p llmroute-control --example learning_bench [EVENTS]`

use std::sync::Arc;
use std::time::Instant;

use llmroute_api::{CompletedEvent, DecisionRecord, Outcome, PolicyRef, Preference};
use llmroute_control::Store;
use llmroute_control::learning::{StablePolicy, train_candidate};
use llmroute_control::route::LlmRoute;
use llmroute_policy::policy::prior::{PricedModel, pricing_prior};
use llmroute_policy::policy::to_onnx_bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MODELS: usize = 9;
const DIM: usize = 384;

fn main() {
    let events: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("EVENTS is a number"))
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store = Arc::new(Store::open(dir.path()).expect("the store opens"));
    store.ensure_history().expect("the history tables");

    let mut yaml = String::from(
        "apiVersion: llmroute.dev/v1alpha1\nkind: LLMRoute\nmetadata:\n  name: bench\nspec:\n  models:\n",
    );
    let mut priced = Vec::new();
    for k in 0..MODELS {
        let price = 0.2 * (k + 1) as f64;
        yaml.push_str(&format!(
            "    - name: m{k}\n      endpoint: http://127.0.0.1:9/v1\n      model: m{k}\n      pricing: {{inputUsdPerMillionTokens: {price}, outputUsdPerMillionTokens: {price}}}\n"
        ));
        priced.push(PricedModel {
            name: format!("m{k}"),
            input_usd_per_million_tokens: price,
            output_usd_per_million_tokens: price,
        });
    }
    yaml.push_str(
        "  defaultPreference: {quality: 0.5, cost: 0.5}\n  fallback: m0\n  exploration: {mode: sample}\n",
    );
    let route =
        LlmRoute::from_yaml(&yaml, std::path::Path::new("bench.yaml")).expect("valid route");
    let (network, metadata) = pricing_prior(&priced, "v1", &"0".repeat(64), DIM, 0.001);
    let bytes = to_onnx_bytes(&network, &metadata);
    let reference = store
        .publish_policy("bench", "v1", &bytes)
        .expect("published");

    // Events logged under uniform sampling: quality depends on the prompt's cluster and the
    // model, cost on the model's price.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let started = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..events {
        let cluster = i % 4;
        let embedding: Vec<f32> = (0..DIM)
            .map(|d| if d % 4 == cluster { 0.1 } else { 0.0 } + rng.random_range(-0.01..0.01))
            .collect();
        let norm = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
        let action = rng.random_range(0..MODELS);
        let quality = if (action + cluster) % 3 == 0 {
            0.9
        } else {
            0.3
        };
        let w: f64 = rng.random_range(0.0..1.0);
        batch.push(CompletedEvent {
            decision: DecisionRecord {
                decision_id: format!("{:032x}", i + 1),
                route: "bench".into(),
                config_version: 1,
                model: format!("m{action}"),
                routed: true,
                preference: Preference {
                    quality: w,
                    cost: 1.0 - w,
                },
                policy_version: Some("v1".into()),
                propensity: Some(1.0 / MODELS as f64),
            },
            served_model: format!("m{action}"),
            embedding: embedding.iter().map(|x| x / norm).collect(),
            quality: Some(quality),
            cost_usd: Some(0.0002 * (action + 1) as f64),
            prompt_tokens: Some(500),
            completion_tokens: Some(500),
            latency_ms: 100.0,
            outcome: Outcome::Success,
            attempts: 1,
            timestamp_ms: i as u64,
        });
        if batch.len() == 1000 {
            store
                .insert_events("bench", "bench", &batch)
                .expect("events stored");
            batch.clear();
        }
    }
    store
        .insert_events("bench", "bench", &batch)
        .expect("events stored");
    let insert_seconds = started.elapsed().as_secs_f64();

    let stable = StablePolicy::from_bytes(
        "bench",
        PolicyRef {
            version: "v1".into(),
            sha256: reference.sha256,
        },
        bytes,
    )
    .expect("the prior reads back");
    let started = Instant::now();
    let run = train_candidate(&store, "bench", &route.spec, &stable, "v2")
        .expect("training runs")
        .expect("enough events");
    let seconds = started.elapsed().as_secs_f64();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "| events | store insert s | train + gate s | training events | held-out | gate DR diff |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {events} | {insert_seconds:.1} | {seconds:.1} | {} | {} | {} |",
        run.data.training_events, run.data.holdout_events, run.gate.difference_dr
    );
    println!("load average after the run: {}", load.trim());
}
