//! `llmroute crd`: prints the CustomResourceDefinitions of LLMRoute and LLMPolicy, generated
//! from the Rust types. `crds/llmroute.yaml` holds the same text.

use anyhow::Result;

pub fn run() -> Result<()> {
    print!("{}", llmroute_api::crd::definitions_yaml());
    Ok(())
}
