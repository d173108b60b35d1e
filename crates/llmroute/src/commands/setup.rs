//! `llmroute setup`: downloads and verifies the runtime assets and builds the encoder graph.

use anyhow::Result;
use llmroute_policy::assets;

use crate::workspace::Workspace;

pub fn run(workspace: &Workspace) -> Result<()> {
    let started = std::time::Instant::now();
    let assets = assets::setup(&workspace.cache)?;
    println!("ONNX Runtime library  {}", assets.onnx_runtime.display());
    println!("tokenizer             {}", assets.tokenizer.display());
    println!("encoder weights       {}", assets.safetensors.display());
    println!("encoder graph         {}", assets.encoder.display());
    println!(
        "set-up finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
