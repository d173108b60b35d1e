//! `llmroute decide`: prints the decision a policy file makes for one prompt and preference,
//! the same computation the sidecar runs, so that a routed request can be checked against it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llmroute_api::Preference;
use llmroute_policy::policy::OnnxPolicy;
use serde_json::json;

use crate::workspace::Workspace;

#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    /// Policy file (policy.onnx from `llmroute train`).
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// Prompt text, as the sidecar embeds it (the last user message).
    #[arg(long)]
    pub prompt: String,
    /// Preference in the x-llmroute-preference format, for example quality=0.8.
    #[arg(long, default_value = "quality=0.5")]
    pub preference: String,
}

pub fn run(workspace: &Workspace, args: &DecideArgs) -> Result<()> {
    let preference = Preference::parse(&args.preference)?;
    // Checked before ONNX Runtime loads, so that a wrong path fails at once.
    if args.policy.is_dir() {
        bail!(
            "{} is a folder; pass the policy.onnx file inside it, which `llmroute train --out DIR` writes",
            args.policy.display()
        );
    }
    if !args.policy.is_file() {
        bail!(
            "policy file {} not found; pass the policy.onnx that `llmroute train --out DIR` writes",
            args.policy.display()
        );
    }
    let environment = workspace.onnx_runtime()?;
    let mut policy = OnnxPolicy::load(&args.policy, &environment)?;
    let mut encoder = workspace.encoder(1)?;
    // The sidecar rejects a policy trained on another encoder's embeddings, so `decide` does too.
    let trained_with = &policy.metadata().encoder;
    if trained_with != encoder.digest() {
        bail!(
            "policy {} ({}) was trained with encoder {trained_with}, but this machine runs \
             encoder {}; train the policy here with `llmroute train`, or run `llmroute setup` \
             to install the encoder the policy was trained with",
            policy.metadata().version,
            args.policy.display(),
            encoder.digest()
        );
    }
    let embedding = encoder
        .embed(&args.prompt)
        .context("failed to embed the prompt")?;
    let probabilities = policy.probabilities(&embedding, preference.quality as f32)?;
    let best = llmroute_sidecar::decision::argmax(&probabilities);
    let models = &policy.metadata().models;
    let by_model: serde_json::Map<String, serde_json::Value> = models
        .iter()
        .zip(&probabilities)
        .map(|(model, p)| (model.clone(), json!(p)))
        .collect();
    let output = json!({
        "policy_version": policy.metadata().version,
        "sha256": policy.sha256(),
        "preference": preference,
        "model": models[best],
        "probabilities": by_model,
    });
    println!("{output}");
    Ok(())
}
