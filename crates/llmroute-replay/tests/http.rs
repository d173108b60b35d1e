//! replay-llm over HTTP on 127.0.0.1: recorded responses, usage, streaming, faults and errors.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmroute_policy::data::{RoutingDataset, load};
use llmroute_replay::{Faults, QUALITY_HEADER, Recording, ReplayServer, SplitChoice, serve};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct Running {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(dataset: &RoutingDataset, faults: Faults) -> Running {
    let recording = Recording::new(dataset, SplitChoice::All);
    let server = Arc::new(ReplayServer::new(recording, faults, Duration::ZERO));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, server, async {
        let _ = stopped.await;
    }));
    Running {
        base,
        stop: Some(stop),
        task,
    }
}

async fn post(url: &str, body: Value) -> (StatusCode, http::HeaderMap, Bytes) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, bytes)
}

fn sse_payloads(bytes: &[u8]) -> Vec<String> {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| event.strip_prefix("data: ").unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn chat_returns_recorded_outcome() {
    let dataset = load("paretobandit-k3").unwrap();
    let running = start(&dataset, Faults::none()).await;
    let model = &dataset.models[2];
    let prompt = &dataset.test.prompts[10];
    let url = format!("{}/m/{model}/v1/chat/completions", running.base);
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
    let (status, headers, bytes) = post(&url, body).await;
    assert_eq!(status, StatusCode::OK);
    let quality: f32 = headers[QUALITY_HEADER].to_str().unwrap().parse().unwrap();
    assert_eq!(quality, dataset.test.quality[[10, 2]]);

    let response: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(response["object"], "chat.completion");
    assert_eq!(response["model"], model.as_str());
    assert_eq!(response["choices"][0]["message"]["role"], "assistant");
    let usage = &response["usage"];
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        prompt_tokens + completion_tokens
    );
    let price = &dataset.prices[2];
    let cost = (prompt_tokens as f64 * price.input_usd_per_million_tokens
        + completion_tokens as f64 * price.output_usd_per_million_tokens)
        / 1e6;
    let recorded = f64::from(dataset.test.cost[[10, 2]]);
    assert!(
        (cost - recorded).abs() <= price.output_usd_per_million_tokens / 1e6,
        "usage costs {cost}, recorded {recorded}"
    );
    running.stop().await;
}

#[tokio::test]
async fn stream_sends_usage_only_on_request() {
    let dataset = load("paretobandit-k3").unwrap();
    let running = start(&dataset, Faults::none()).await;
    let model = &dataset.models[0];
    let prompt = &dataset.train.prompts[0];
    let url = format!("{}/m/{model}/v1/chat/completions", running.base);
    for include_usage in [false, true] {
        let mut body = json!({"model": model, "stream": true,
            "messages": [{"role": "user", "content": prompt}]});
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let (status, headers, bytes) = post(&url, body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "text/event-stream");
        let payloads = sse_payloads(&bytes);
        assert_eq!(payloads.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(text.contains(model.as_str()), "{text}");
        let usage_chunks: Vec<&Value> = chunks
            .iter()
            .filter(|c| c.get("usage").is_some_and(|u| !u.is_null()))
            .collect();
        if include_usage {
            assert_eq!(usage_chunks.len(), 1);
            assert_eq!(usage_chunks[0]["choices"], json!([]));
        } else {
            assert!(usage_chunks.is_empty());
            assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        }
    }
    running.stop().await;
}

#[tokio::test]
async fn completions_endpoint_answers() {
    let dataset = load("paretobandit-k3").unwrap();
    let running = start(&dataset, Faults::none()).await;
    let model = &dataset.models[1];
    let url = format!("{}/m/{model}/v1/completions", running.base);
    let body = json!({"model": model, "prompt": dataset.test.prompts[0]});
    let (status, _, bytes) = post(&url, body).await;
    assert_eq!(status, StatusCode::OK);
    let response: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(response["object"], "text_completion");
    assert!(
        response["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains(model.as_str())
    );
    running.stop().await;
}

#[tokio::test]
async fn errors_are_openai_style() {
    let dataset = load("paretobandit-k3").unwrap();
    let faults = Faults::parse(
        &[],
        &[format!("{}=1", dataset.models[1])],
        &dataset.models,
        3,
    )
    .unwrap();
    let running = start(&dataset, faults).await;
    let known = &dataset.test.prompts[0];
    let chat = |model: &str| format!("{}/m/{model}/v1/chat/completions", running.base);
    let message = |prompt: &str| json!([{"role": "user", "content": prompt}]);
    let cases = [
        (
            chat(&dataset.models[0]),
            json!({"model": dataset.models[0], "messages": message("an unrecorded prompt")}),
            StatusCode::NOT_FOUND,
            "prompt_not_recorded",
        ),
        (
            chat("gpt-x"),
            json!({"model": "gpt-x", "messages": message(known)}),
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            chat(&dataset.models[0]),
            json!({"model": "other", "messages": message(known)}),
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            chat(&dataset.models[1]),
            json!({"model": dataset.models[1], "messages": message(known)}),
            StatusCode::SERVICE_UNAVAILABLE,
            "injected_error",
        ),
        (
            chat(&dataset.models[0]),
            json!({"model": dataset.models[0]}),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            format!("{}/v1/chat/completions", running.base),
            json!({}),
            StatusCode::NOT_FOUND,
            "",
        ),
    ];
    for (url, body, expected_status, expected_code) in cases {
        let (status, _, bytes) = post(&url, body.clone()).await;
        assert_eq!(status, expected_status, "{url} {body}");
        let error: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(error["error"]["message"].as_str().is_some(), "{error}");
        assert!(error["error"]["type"].as_str().is_some(), "{error}");
        if !expected_code.is_empty() {
            assert_eq!(error["error"]["code"], expected_code, "{url} {body}");
        }
    }
    running.stop().await;
}
