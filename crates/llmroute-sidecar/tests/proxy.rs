//! The sidecar in front of replay-llm: routing decisions against the policy, cost, streaming
//! usage, retries, fallback, direct model requests and feedback joined into events.

mod common;

use std::time::Duration;

use common::{Harness, ROUTE, Setup, post_json, sse_payloads};
use llmroute_replay::Faults;
use llmroute_sidecar::decision::argmax;
use serde_json::{Value, json};

fn chat(model: &str, prompt: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_decisions_match_policy() {
    let mut harness = Harness::start(Setup::default()).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let mut chosen = std::collections::HashSet::new();
    for (row, w_quality) in [
        (0, 0.0f32),
        (1, 1.0),
        (2, 0.5),
        (3, 0.0),
        (4, 1.0),
        (5, 0.2),
    ] {
        let prompt = harness.dataset.test.prompts[row].clone();
        let preference = format!("quality={w_quality}");
        let reply = post_json(
            &url,
            &[("x-llmroute-preference", &preference)],
            &chat(ROUTE, &prompt),
        )
        .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let probabilities = harness.expected_probabilities(&prompt, w_quality);
        let expected = harness.dataset.models[argmax(&probabilities)].clone();
        let model = reply.header("x-llmroute-model").unwrap();
        assert_eq!(model, expected, "row {row}, w_quality {w_quality}");
        chosen.insert(model.clone());
        assert_eq!(reply.header("x-llmroute-routed").as_deref(), Some("true"));
        assert_eq!(
            reply.header("x-llmroute-policy-version").as_deref(),
            Some("test-v1")
        );
        assert_eq!(reply.header("x-llmroute-propensity").as_deref(), Some("1"));
        assert_eq!(reply.header("x-llmroute-attempts").as_deref(), Some("1"));
        let id = reply.header("x-llmroute-decision-id").unwrap();
        assert_eq!(id.len(), 32);

        let body = reply.json();
        let usage = &body["usage"];
        let k = harness
            .dataset
            .models
            .iter()
            .position(|m| *m == model)
            .unwrap();
        let price = &harness.dataset.prices[k];
        let expected_cost = (usage["prompt_tokens"].as_f64().unwrap()
            * price.input_usd_per_million_tokens
            + usage["completion_tokens"].as_f64().unwrap() * price.output_usd_per_million_tokens)
            / 1e6;
        let cost: f64 = reply
            .header("x-llmroute-cost-usd")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (cost - expected_cost).abs() < 1e-9,
            "{cost} vs {expected_cost}"
        );
        let quality: f32 = reply.header("x-replay-quality").unwrap().parse().unwrap();
        assert_eq!(quality, harness.dataset.test.quality[[row, k]]);
    }
    assert!(
        chosen.len() >= 2,
        "the preference never changed the decision: {chosen:?}"
    );
    let events = harness.stop().await;
    assert_eq!(events.len(), 6, "every request leaves an event at shutdown");
    for event in &events {
        // Sidecars send the embedding as base64 of little-endian f32 values.
        let completed: llmroute_api::CompletedEvent =
            serde_json::from_value(event.clone()).unwrap();
        assert!(event["embedding"].is_string(), "{}", event["embedding"]);
        assert_eq!(completed.embedding.len(), 384);
        assert_eq!(event["quality"], Value::Null);
        assert_eq!(event["outcome"]["kind"], "success");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_is_read_and_hidden() {
    let harness = Harness::start(Setup::default()).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let prompt = harness.dataset.test.prompts[7].clone();
    for include_usage in [false, true] {
        let mut body = chat(ROUTE, &prompt);
        body["stream"] = json!(true);
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let reply = post_json(&url, &[], &body).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type").as_deref(),
            Some("text/event-stream")
        );
        assert!(reply.header("x-llmroute-cost-usd").is_none());
        let payloads = sse_payloads(&reply.body);
        assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        let usage_chunks = chunks.iter().filter(|c| c["usage"].is_object()).count();
        let with_usage_key = chunks.iter().filter(|c| c.get("usage").is_some()).count();
        if include_usage {
            assert_eq!(usage_chunks, 1);
            assert_eq!(with_usage_key, chunks.len());
        } else {
            assert_eq!(usage_chunks, 0);
            assert_eq!(with_usage_key, 0, "a chunk still carries `usage`");
        }
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(text.starts_with("Recorded outcome of "), "{text}");
    }
    let events = harness.stop().await;
    assert_eq!(events.len(), 2);
    for event in &events {
        assert!(event["promptTokens"].as_u64().unwrap() > 0, "{event}");
        assert!(event["costUsd"].as_f64().unwrap() > 0.0, "{event}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_reach_the_working_model() {
    // Every model but the cheapest fails with 503, and the route allows three attempts.
    let setup = Setup {
        faults: |dataset| {
            let rates = vec!["*=1".to_string(), format!("{}=0", dataset.models[0])];
            Faults::parse(&[], &rates, &dataset.models, 1).unwrap()
        },
        ..Setup::default()
    };
    let mut harness = Harness::start(setup).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let working = harness.dataset.models[0].clone();
    let prompt = harness.dataset.test.prompts[0].clone();
    let reply = post_json(
        &url,
        &[("x-llmroute-preference", "quality=1")],
        &chat(ROUTE, &prompt),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.header("x-llmroute-model").as_deref(),
        Some(working.as_str())
    );
    let probabilities = harness.expected_probabilities(&prompt, 1.0);
    let first = argmax(&probabilities);
    let order = llmroute_sidecar::decision::retry_order(&probabilities, first);
    let position = order.iter().position(|&k| k == 0).unwrap();
    let attempts = reply.header("x-llmroute-attempts").unwrap();
    assert_eq!(attempts, (position + 1).to_string());

    // A request naming a failing model is not moved to another one.
    let failing = harness.dataset.models[2].clone();
    let reply = post_json(&url, &[], &chat(&failing, &prompt)).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.openai_error()["code"], "injected_error");
    assert_eq!(reply.header("x-llmroute-routed").as_deref(), Some("false"));
    let metrics = harness.sidecar.metrics().encode();
    assert!(
        metrics.contains("llmroute_upstream_retries_total{route=\"chat\",reason=\"status_503\"}"),
        "{metrics}"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_model_is_skipped() {
    let setup = Setup {
        edit: |config| {
            // A port that was just free: nothing listens there.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            drop(listener);
            config.models[1].endpoint = format!("http://127.0.0.1:{port}/v1");
            config.max_attempts = 3;
        },
        ..Setup::default()
    };
    let harness = Harness::start(setup).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let prompt = harness.dataset.test.prompts[1].clone();
    let down = harness.dataset.models[1].clone();
    let reply = post_json(&url, &[], &chat(&down, &prompt)).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.openai_error()["code"], "upstream_unreachable");
    for w in ["0", "0.5", "1"] {
        let preference = format!("quality={w}");
        let reply = post_json(
            &url,
            &[("x-llmroute-preference", &preference)],
            &chat(ROUTE, &prompt),
        )
        .await;
        assert_eq!(reply.status, 200, "w {w}");
        assert_ne!(
            reply.header("x-llmroute-model").as_deref(),
            Some(down.as_str())
        );
    }
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_policy_uses_fallback() {
    let setup = Setup {
        with_policy: false,
        ..Setup::default()
    };
    let harness = Harness::start(setup).await;
    let url = format!("{}/v1/completions", harness.base);
    let prompt = harness.dataset.train.prompts[3].clone();
    let reply = post_json(&url, &[], &json!({"model": ROUTE, "prompt": prompt})).await;
    assert_eq!(reply.status, 200);
    let fallback = harness.dataset.models[0].clone();
    assert_eq!(
        reply.header("x-llmroute-model").as_deref(),
        Some(fallback.as_str())
    );
    assert_eq!(reply.header("x-llmroute-routed").as_deref(), Some("false"));
    assert!(reply.header("x-llmroute-policy-version").is_none());
    assert_eq!(reply.json()["object"], "text_completion");
    let metrics = harness.sidecar.metrics().encode();
    assert!(
        metrics.contains("llmroute_fallbacks_total{route=\"chat\",reason=\"no_policy\"} 1"),
        "{metrics}"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_joins_event() {
    let setup = Setup {
        feedback_ttl: Duration::from_secs(2),
        ..Setup::default()
    };
    let harness = Harness::start(setup).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let feedback_url = format!("{}/v1/feedback", harness.base);
    let mut ids = Vec::new();
    for row in 0..3 {
        let prompt = harness.dataset.test.prompts[row].clone();
        let mut body = chat(ROUTE, &prompt);
        body["llmroute_preference"] = json!({"quality": 0.3});
        let reply = post_json(&url, &[], &body).await;
        assert_eq!(reply.status, 200);
        ids.push((
            reply.header("x-llmroute-decision-id").unwrap(),
            reply.header("x-replay-quality").unwrap(),
        ));
    }
    // Feedback for the first two only; the third expires after the TTL.
    for (id, quality) in &ids[..2] {
        let score: f64 = quality.parse().unwrap();
        let reply = post_json(
            &feedback_url,
            &[],
            &json!({"decision_id": id, "score": score}),
        )
        .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.json()["status"], "accepted");
    }
    let again = post_json(
        &feedback_url,
        &[],
        &json!({"decision_id": ids[0].0, "score": 1}),
    )
    .await;
    assert_eq!(again.status, 404);
    assert_eq!(again.openai_error()["code"], "decision_not_found");

    // Wait (bounded) for the expired event to be written.
    let mut written = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        written = std::fs::read_to_string(&harness.events_path)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if written == 3 {
            break;
        }
    }
    assert_eq!(written, 3, "events written before shutdown");
    let events = harness.stop().await;
    for (id, quality) in &ids {
        let event = events
            .iter()
            .find(|e| e["decision"]["decisionId"] == id.as_str())
            .unwrap();
        assert_eq!(event["decision"]["preference"]["quality"], 0.3);
        if id == &ids[2].0 {
            assert_eq!(event["quality"], Value::Null);
        } else {
            let expected: f64 = quality.parse().unwrap();
            assert_eq!(event["quality"].as_f64().unwrap(), expected);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_error_passes_through() {
    let harness = Harness::start(Setup::default()).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let reply = post_json(
        &url,
        &[],
        &chat(ROUTE, "a prompt the data set does not contain"),
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.openai_error()["code"], "prompt_not_recorded");
    assert_eq!(reply.header("x-llmroute-attempts").as_deref(), Some("1"));
    let models = common::send(
        http::Method::GET,
        &format!("{}/v1/models", harness.base),
        &[],
        "",
    )
    .await;
    let ids: Vec<String> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids[0], ROUTE);
    assert_eq!(ids.len(), 1 + harness.dataset.models.len());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_serves_its_share() {
    let setup = Setup {
        canary_weight: Some(0.5),
        ..Setup::default()
    };
    let harness = Harness::start(setup).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let prompt = harness.dataset.test.prompts[4].clone();
    let mut versions = std::collections::HashMap::new();
    for _ in 0..40 {
        let reply = post_json(&url, &[], &chat(ROUTE, &prompt)).await;
        assert_eq!(reply.status, 200);
        let version = reply.header("x-llmroute-policy-version").unwrap();
        *versions.entry(version).or_insert(0) += 1;
    }
    // With weight 0.5, each version serves 40 requests with probability 2^-40 at most.
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(versions.contains_key("test-v1"), "{versions:?}");
    assert!(versions.contains_key("test-v2"), "{versions:?}");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_reports_policy_propensity() {
    let setup = Setup {
        edit: |config| config.exploration = llmroute_api::Exploration::Sample,
        ..Setup::default()
    };
    let mut harness = Harness::start(setup).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let prompt = harness.dataset.test.prompts[9].clone();
    let probabilities = harness.expected_probabilities(&prompt, 0.5);
    for _ in 0..10 {
        let reply = post_json(
            &url,
            &[("x-llmroute-preference", "quality=0.5")],
            &chat(ROUTE, &prompt),
        )
        .await;
        assert_eq!(reply.status, 200);
        let model = reply.header("x-llmroute-model").unwrap();
        let k = harness
            .dataset
            .models
            .iter()
            .position(|m| *m == model)
            .unwrap();
        let propensity: f64 = reply
            .header("x-llmroute-propensity")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (propensity - f64::from(probabilities[k])).abs() < 1e-5,
            "{model}: header {propensity}, policy {}",
            probabilities[k]
        );
    }
    harness.stop().await;
}

/// An environment variable that no test sets.
const UNSET_KEY: &str = "LLMROUTE_TEST_KEY_NEVER_SET";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_without_key_is_skipped() {
    let setup = Setup {
        edit: |config| {
            // The model that the test policy prefers at quality=1 (quality grows with the
            // index) and the fallback: both lack their key.
            config.models[2].api_key = Some(llmroute_api::ApiKeyRef::Env(UNSET_KEY.into()));
            config.fallback = config.models[2].name.clone();
        },
        ..Setup::default()
    };
    let mut harness = Harness::start(setup).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let missing = harness.dataset.models[2].clone();
    let mut rows = 0;
    for row in 0..40 {
        let prompt = harness.dataset.test.prompts[row].clone();
        let probabilities = harness.expected_probabilities(&prompt, 1.0);
        if argmax(&probabilities) != 2 {
            continue;
        }
        rows += 1;
        let reply = post_json(
            &url,
            &[("x-llmroute-preference", "quality=1")],
            &chat(ROUTE, &prompt),
        )
        .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        // Greedy among the two models left: the more probable one, with propensity 1.
        let expected = if probabilities[0] > probabilities[1] {
            0
        } else {
            1
        };
        assert_eq!(
            reply.header("x-llmroute-model").as_deref(),
            Some(harness.dataset.models[expected].as_str()),
            "row {row}: {probabilities:?}"
        );
        assert_eq!(reply.header("x-llmroute-routed").as_deref(), Some("true"));
        assert_eq!(reply.header("x-llmroute-propensity").as_deref(), Some("1"));
        assert_eq!(reply.header("x-llmroute-attempts").as_deref(), Some("1"));
    }
    assert!(
        rows >= 3,
        "the policy preferred model 2 for only {rows} prompts"
    );

    // Requested by name, the model without its key is rejected with the reason and the fix.
    let prompt = harness.dataset.test.prompts[0].clone();
    let reply = post_json(&url, &[], &chat(&missing, &prompt)).await;
    assert_eq!(reply.status, 503);
    let error = reply.openai_error();
    assert_eq!(error["code"], "model_unavailable");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(&missing) && message.contains(UNSET_KEY) && message.contains("is not set"),
        "{message}"
    );

    let metrics = harness.sidecar.metrics().encode();
    for (k, model) in harness.dataset.models.iter().enumerate() {
        let line = format!(
            "llmroute_model_available{{route=\"chat\",model=\"{model}\"}} {}",
            i32::from(k != 2)
        );
        assert!(metrics.contains(&line), "no {line} in {metrics}");
    }
    assert!(
        metrics.contains(
            "llmroute_rejected_requests_total{route=\"chat\",reason=\"model_unavailable\"} 1"
        ),
        "{metrics}"
    );
    let events = harness.stop().await;
    assert_eq!(events.len(), rows, "the refused request leaves no event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_without_key_is_skipped() {
    let setup = Setup {
        with_policy: false,
        edit: |config| {
            config.models[0].api_key = Some(llmroute_api::ApiKeyRef::Env(UNSET_KEY.into()));
        },
        ..Setup::default()
    };
    let harness = Harness::start(setup).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let prompt = harness.dataset.test.prompts[1].clone();
    let reply = post_json(&url, &[], &chat(ROUTE, &prompt)).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.header("x-llmroute-model").as_deref(),
        Some(harness.dataset.models[1].as_str())
    );
    assert_eq!(reply.header("x-llmroute-attempts").as_deref(), Some("1"));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_without_keys_is_rejected() {
    let setup = Setup {
        edit: |config| {
            for model in &mut config.models {
                model.api_key = Some(llmroute_api::ApiKeyRef::Env(UNSET_KEY.into()));
            }
        },
        ..Setup::default()
    };
    let harness = Harness::start(setup).await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let prompt = harness.dataset.test.prompts[2].clone();
    let reply = post_json(&url, &[], &chat(ROUTE, &prompt)).await;
    assert_eq!(reply.status, 503);

    let error = reply.openai_error();
    assert_eq!(error["code"], "model_unavailable");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("no model of route chat can be called: "),
        "{message}"
    );
    for model in &harness.dataset.models {
        assert!(message.contains(model.as_str()), "{message}");
    }

    let metrics = harness.sidecar.metrics().encode();
    assert!(
        metrics.contains(
            "llmroute_rejected_requests_total{route=\"chat\",reason=\"model_unavailable\"} 1"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("llmroute_fallbacks_total{"), "{metrics}");
    assert!(harness.stop().await.is_empty());
}
