//! Runs the one-time asset set-up into the default cache folder and prints the asset paths.
//!
//! `cargo run -p llmroute-policy --example setup`; set `LLMROUTE_CACHE` to use another folder.
//! `llmroute setup` does the same from the command-line tool.

use std::process::ExitCode;
use std::time::Instant;

use llmroute_policy::assets;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let started = Instant::now();
    let result = assets::default_cache_dir().and_then(|cache| assets::setup(&cache));
    match result {
        Ok(assets) => {
            println!("onnx_runtime {}", assets.onnx_runtime.display());
            println!("tokenizer    {}", assets.tokenizer.display());
            println!("safetensors  {}", assets.safetensors.display());
            println!("encoder      {}", assets.encoder.display());
            println!("set-up took {:.2} s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
