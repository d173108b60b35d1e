//! A sidecar in front of replay-llm, both on 127.0.0.1 in this process, with a policy trained
//! for the data set's models and an independent encoder and policy to check decisions against.
//! Needs the assets of `llmroute setup` (ONNX Runtime and the encoder).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::ProgressBar;
use llmroute_api::{Exploration, ModelEndpoint, PolicyRef, Preference, Pricing, SidecarConfig};
use llmroute_policy::assets::{Assets, default_cache_dir};
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::data::{RoutingDataset, load};
use llmroute_policy::encoder::Encoder;
use llmroute_policy::policy::metadata::POLICY_FORMAT;
use llmroute_policy::policy::{OnnxPolicy, PolicyMetadata, TrainConfig, to_onnx_bytes, train};
use llmroute_policy::reward::Reward;
use llmroute_policy::runtime::init_onnx_runtime;
use llmroute_replay::{Faults, Recording, ReplayServer, SplitChoice};
use llmroute_sidecar::{BatchSettings, EventSink, RouteState, Sidecar, SidecarOptions};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const ROUTE: &str = "chat";
pub const DATASET: &str = "paretobandit-k3";

/// A server task that stops when its sender is used.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Starts replay-llm on 127.0.0.1 and returns its address.
pub async fn start_replay(dataset: &RoutingDataset, faults: Faults) -> (String, Running) {
    let recording = Recording::new(dataset, SplitChoice::All);
    let server = Arc::new(ReplayServer::new(
        recording,
        faults,
        Duration::from_millis(1),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(llmroute_replay::serve(listener, server, async {
        let _ = stopped.await;
    }));
    (
        address,
        Running {
            stop: Some(stop),
            task,
        },
    )
}

/// Loads the assets of `llmroute setup`.
pub fn assets() -> Assets {
    let cache = default_cache_dir().expect("cache folder");
    Assets::locate(&cache).unwrap_or_else(|e| panic!("{e}; run `llmroute setup` first"))
}

/// Trains a small policy on random embeddings for `models`, in which quality and cost both
/// grow with the model index, so that the preference changes the decision.
pub fn policy_bytes(models: &[String], encoder_digest: &str, version: &str, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows = 128;
    let k = models.len();
    let mut embeddings = Array2::from_shape_fn((rows, 384), |_| rng.random_range(-1.0f32..1.0));
    for mut row in embeddings.rows_mut() {
        let norm = row.dot(&row).sqrt();
        row.mapv_inplace(|v| v / norm);
    }
    let quality = Array2::from_shape_fn((rows, k), |(_, j)| {
        (0.2 + 0.3 * j as f32 + rng.random_range(0.0f32..0.2)).min(1.0)
    });
    let cost = Array2::from_shape_fn((rows, k), |(_, j)| 0.001 * 10f32.powi(j as i32));
    let mut bandit = ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
    let config = TrainConfig {
        steps: 300,
        seed,
        ..TrainConfig::default()
    };
    let tau = 0.01;
    let (network, _) = train(
        &mut bandit,
        Reward::new(tau),
        &config,
        None,
        &ProgressBar::hidden(),
    );
    let metadata = PolicyMetadata {
        format: POLICY_FORMAT.to_string(),
        version: version.to_string(),
        models: models.to_vec(),
        encoder: encoder_digest.to_string(),
        embedding_dim: 384,
        cost_scale_usd: tau,
    };
    to_onnx_bytes(&network, &metadata)
}

/// Builds a route over every model of `dataset` served at `replay`.
pub fn route_config(dataset: &RoutingDataset, replay: &str) -> SidecarConfig {
    let models = dataset
        .models
        .iter()
        .zip(&dataset.prices)
        .map(|(model, price)| ModelEndpoint {
            name: model.clone(),
            endpoint: format!("http://{replay}/m/{model}/v1"),
            upstream_model: model.clone(),
            api_key: None,
            pricing: Pricing {
                input_usd_per_million_tokens: price.input_usd_per_million_tokens,
                output_usd_per_million_tokens: price.output_usd_per_million_tokens,
            },
            timeout_ms: 10_000,
        })
        .collect();
    SidecarConfig {
        route: ROUTE.to_string(),
        version: 1,
        models,
        default_preference: Preference::from_quality(0.5).unwrap(),
        exploration: Exploration::Greedy,
        stable: None,
        canary: None,
        canary_weight: 0.0,
        fallback: dataset.models[0].clone(),
        max_attempts: 3,
    }
}

/// A sidecar and replay-llm pair, with an independent encoder and policy for checks.
pub struct Harness {
    pub base: String,
    pub sidecar: Arc<Sidecar>,
    pub dataset: RoutingDataset,
    pub encoder: Encoder,
    pub policy: Option<OnnxPolicy>,
    pub events_path: PathBuf,
    sidecar_server: Running,
    replay_server: Running,
    _folder: tempfile::TempDir,
}

/// How a harness is set up.
pub struct Setup {
    pub with_policy: bool,
    pub faults: fn(&RoutingDataset) -> Faults,
    pub edit: fn(&mut SidecarConfig),
    pub feedback_ttl: Duration,
    /// Adds a second policy, `test-v2`, as the canary with this weight.
    pub canary_weight: Option<f64>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            with_policy: true,
            faults: |_| Faults::none(),
            edit: |_| {},
            feedback_ttl: Duration::from_secs(600),
            canary_weight: None,
        }
    }
}

impl Harness {
    pub async fn start(setup: Setup) -> Self {
        let dataset = load(DATASET).unwrap();
        let (replay, replay_server) = start_replay(&dataset, (setup.faults)(&dataset)).await;
        let assets = assets();
        let environment = init_onnx_runtime(&assets.onnx_runtime).unwrap();
        let encoder = Encoder::load(&assets, 1).unwrap();
        let checker = Encoder::load(&assets, 1).unwrap();
        let mut config = route_config(&dataset, &replay);
        let bytes = policy_bytes(&dataset.models, encoder.digest(), "test-v1", 5);
        let canary_bytes = policy_bytes(&dataset.models, encoder.digest(), "test-v2", 6);
        let policy = if setup.with_policy {
            let policy = OnnxPolicy::from_bytes(&bytes, &environment, "test").unwrap();
            config.stable = Some(PolicyRef {
                version: "test-v1".to_string(),
                sha256: policy.sha256().to_string(),
            });
            Some(policy)
        } else {
            None
        };
        let canary = OnnxPolicy::from_bytes(&canary_bytes, &environment, "canary").unwrap();
        if let Some(weight) = setup.canary_weight {
            config.canary = Some(PolicyRef {
                version: "test-v2".to_string(),
                sha256: canary.sha256().to_string(),
            });
            config.canary_weight = weight;
        }
        (setup.edit)(&mut config);
        let artifact = |sha256: &str| {
            if canary.sha256() == sha256 {
                return Some(canary_bytes.clone());
            }
            policy
                .as_ref()
                .filter(|p| p.sha256() == sha256)
                .map(|_| bytes.clone())
        };
        let state = RouteState::build(
            config,
            &artifact,
            Some(&environment),
            encoder.digest(),
            None,
        )
        .unwrap();
        let folder = tempfile::tempdir().unwrap();
        let events_path = folder.path().join("events.jsonl");
        let options = SidecarOptions {
            feedback_ttl: setup.feedback_ttl,
            sink: EventSink::File(events_path.clone()),
            batch: BatchSettings {
                interval: Duration::from_millis(50),
                ..BatchSettings::default()
            },
            ..SidecarOptions::default()
        };
        let (sidecar, events) = Sidecar::new(state, Some(encoder), options);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(llmroute_sidecar::serve(
            listener,
            sidecar.clone(),
            events,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            base,
            sidecar,
            dataset,
            encoder: checker,
            policy,
            events_path,
            sidecar_server: Running {
                stop: Some(stop),
                task,
            },
            replay_server,
            _folder: folder,
        }
    }

    /// Computes the policy's probabilities for `prompt` independently of the sidecar.
    pub fn expected_probabilities(&mut self, prompt: &str, w_quality: f32) -> Vec<f32> {
        let embedding = self.encoder.embed(prompt).unwrap();
        self.policy
            .as_mut()
            .expect("harness has a policy")
            .probabilities(&embedding, w_quality)
            .unwrap()
    }

    /// Stops both servers and returns the events written by the sidecar.
    pub async fn stop(self) -> Vec<serde_json::Value> {
        self.sidecar_server.stop().await;
        self.replay_server.stop().await;
        let text = std::fs::read_to_string(&self.events_path).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

/// A response read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    /// Asserts an OpenAI-style error body and returns its `error` object.
    pub fn openai_error(&self) -> serde_json::Value {
        let body = self.json();
        let error = body["error"].clone();
        assert!(error["message"].is_string(), "no message in {body}");
        assert!(error["type"].is_string(), "no type in {body}");
        error
    }
}

/// Sends one request and reads the whole response.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client
        .request(builder.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Posts a JSON body.
pub async fn post_json(url: &str, headers: &[(&str, &str)], body: &serde_json::Value) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(Method::POST, url, &all, body.to_string()).await
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_payloads(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| event.strip_prefix("data: ").unwrap().to_string())
        .collect()
}
