//! `llmroute replay-llm`: serves one OpenAI-compatible endpoint per model of a recorded routing
//! data set on 127.0.0.1, for tests and demos without API keys.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use llmroute_api::crd::ExplorationMode;
use llmroute_api::{Exploration, ModelEndpoint, Preference, Pricing, SidecarConfig};
use llmroute_control::route::{
    ExplorationSpec, LlmRoute, LlmRouteSpec, Metadata, RouteModel, RoutePricing,
};
use llmroute_policy::data;
use llmroute_replay::{Faults, Recording, ReplayServer, SplitChoice, serve};

#[derive(Debug, clap::Args)]
pub struct ReplayLlmArgs {
    /// Data set to serve: llmrouter-9llm, paretobandit-k3, paretobandit-k4.
    #[arg(long, default_value = "llmrouter-9llm")]
    pub dataset: String,
    /// Splits whose prompts are answered: train, test or all.
    #[arg(long, default_value = "all")]
    pub split: SplitChoice,
    /// TCP port on 127.0.0.1 (0 picks a free port).
    #[arg(long, default_value_t = 8081)]
    pub port: u16,
    /// Injected delay before the response headers, as MODEL=MILLISECONDS; MODEL `*` sets every
    /// model. Repeatable.
    #[arg(long = "latency-ms", value_name = "MODEL=MS")]
    pub latency_ms: Vec<String>,
    /// Share of requests that get HTTP 503, as MODEL=RATE with RATE in [0, 1]; MODEL `*`
    /// sets every model. Repeatable.
    #[arg(long = "error-rate", value_name = "MODEL=RATE")]
    pub error_rate: Vec<String>,
    /// Seed of the injected errors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pause between the chunks of a streamed response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub chunk_interval_ms: u64,
    /// Writes a sidecar configuration (JSON) that routes over every model of this server to
    /// this file once the port is bound.
    #[arg(long, value_name = "FILE")]
    pub route_config: Option<PathBuf>,
    /// Writes an LLMRoute resource (YAML) over every model of this server to this file once
    /// the port is bound, for the route folder of `llmroute standalone`.
    #[arg(long, value_name = "FILE")]
    pub route_file: Option<PathBuf>,
    /// Route name written into --route-config and --route-file.
    #[arg(long, default_value = "replay")]
    pub route: String,
}

pub fn run(args: &ReplayLlmArgs) -> Result<()> {
    let dataset = data::load(&args.dataset)?;
    let faults = Faults::parse(
        &args.latency_ms,
        &args.error_rate,
        &dataset.models,
        args.seed,
    )?;
    let recording = Recording::new(&dataset, args.split);
    let server = Arc::new(ReplayServer::new(
        recording,
        faults,
        Duration::from_millis(args.chunk_interval_ms),
    ));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("failed to bind {address}; pick another --port"))?;
        let bound = listener.local_addr()?;
        println!("replay-llm serving {} on http://{bound}", dataset.name);
        for model in &dataset.models {
            println!("  {model}: http://{bound}/m/{model}/v1");
        }
        if let Some(path) = &args.route_config {
            let config = route_config(&args.route, &dataset, bound);
            let json = serde_json::to_string_pretty(&config)?;
            std::fs::write(path, json)
                .with_context(|| format!("failed to write {}", path.display()))?;
            println!("wrote the route configuration {}", path.display());
        }
        if let Some(path) = &args.route_file {
            let route = llmroute_resource(&route_config(&args.route, &dataset, bound));
            let yaml = serde_yaml_ng::to_string(&route)?;
            std::fs::write(path, yaml)
                .with_context(|| format!("failed to write {}", path.display()))?;
            println!("wrote the LLMRoute file {}", path.display());
        }
        serve(listener, server, crate::shutdown::signal()).await?;
        Ok(())
    })
}

/// Builds a configuration that routes over every model of the data set served at `address`,
/// priced as the data set records.
fn route_config(route: &str, dataset: &data::RoutingDataset, address: SocketAddr) -> SidecarConfig {
    let models = dataset
        .models
        .iter()
        .zip(&dataset.prices)
        .map(|(model, price)| ModelEndpoint {
            name: model.clone(),
            endpoint: format!("http://{address}/m/{model}/v1"),
            upstream_model: model.clone(),
            api_key: None,
            pricing: Pricing {
                input_usd_per_million_tokens: price.input_usd_per_million_tokens,
                output_usd_per_million_tokens: price.output_usd_per_million_tokens,
            },
            timeout_ms: llmroute_api::config::DEFAULT_TIMEOUT_MS,
        })
        .collect();
    SidecarConfig {
        route: route.to_string(),
        version: 1,
        models,
        default_preference: Preference::from_quality(0.5).expect("0.5 is on the simplex"),
        exploration: Exploration::Greedy,
        stable: None,
        canary: None,
        canary_weight: 0.0,
        fallback: dataset.models[0].clone(),
        max_attempts: llmroute_api::config::DEFAULT_MAX_ATTEMPTS,
    }
}

/// The resource form of an exploration rule.
fn exploration_spec(exploration: Exploration) -> Option<ExplorationSpec> {
    let (mode, epsilon) = match exploration {
        Exploration::Greedy => (ExplorationMode::Greedy, None),
        Exploration::Sample => (ExplorationMode::Sample, None),
        Exploration::EpsilonGreedy { epsilon } => (ExplorationMode::EpsilonGreedy, Some(epsilon)),
    };
    Some(ExplorationSpec { mode, epsilon })
}

/// Converts a sidecar configuration into the `LLMRoute` resource that produces it.
fn llmroute_resource(config: &SidecarConfig) -> LlmRoute {
    let models = config
        .models
        .iter()
        .map(|model| RouteModel {
            name: model.name.clone(),
            endpoint: model.endpoint.clone(),
            model: model.upstream_model.clone(),
            api_key_secret_ref: None,
            pricing: RoutePricing {
                input_usd_per_million_tokens: model.pricing.input_usd_per_million_tokens,
                output_usd_per_million_tokens: model.pricing.output_usd_per_million_tokens,
            },
            timeout_seconds: None,
        })
        .collect();
    LlmRoute {
        api_version: llmroute_control::route::API_VERSION.to_string(),
        kind: llmroute_control::route::KIND.to_string(),
        metadata: Metadata {
            name: config.route.clone(),
            namespace: None,
        },
        spec: LlmRouteSpec {
            models,
            default_preference: config.default_preference,
            exploration: exploration_spec(config.exploration),
            fallback: config.fallback.clone(),
            max_attempts: None,
            cost_scale_usd: None,
            policy: None,
            sidecar: None,
            training: None,
            rollout: None,
            retention: None,
        },
    }
}
