//! `llmroute install`: prints every manifest a cluster needs to run the operator.

use anyhow::{Result, bail};
use llmroute_operator::install::{InstallOptions, render};

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Namespace of the operator.
    #[arg(long, default_value = "llmroute-system")]
    pub namespace: String,
    /// Container image of llmroute [default: llmroute:<this version>].
    #[arg(long)]
    pub image: Option<String>,
    /// Operator replicas; with two or more, a Lease elects the one that reconciles.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
}

pub fn run(args: &InstallArgs) -> Result<()> {
    if !llmroute_api::crd::is_dns_subdomain(&args.namespace) || args.namespace.len() > 63 {
        bail!(
            "invalid --namespace {:?}: use a Kubernetes namespace name (lowercase letters, digits and '-', at most 63)",
            args.namespace
        );
    }
    if args.replicas == 0 {
        bail!("invalid --replicas 0: use at least 1");
    }
    let mut options = InstallOptions {
        namespace: args.namespace.clone(),
        replicas: args.replicas,
        ..InstallOptions::default()
    };
    if let Some(image) = &args.image {
        options.image = image.clone();
    }
    print!("{}", render(&options));
    Ok(())
}
