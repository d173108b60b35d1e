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
    #[arg(long, default_value_t = 2)]
    pub replicas: u32,
    /// `Ignore` (pods are created without the sidecar when the webhook is down) or `Fail`.
    #[arg(long, default_value = "Ignore", value_parser = ["Ignore", "Fail"])]
    pub webhook_failure_policy: String,
    /// Image of the injected sidecar [default: the operator's image].
    #[arg(long)]
    pub sidecar_image: Option<String>,
    /// Size of each replica's PersistentVolumeClaim for the event store (a Kubernetes quantity).
    #[arg(long, default_value = "1Gi")]
    pub storage_size: String,
    /// StorageClass of the event store's claims [default: the cluster's default class].
    #[arg(long)]
    pub storage_class: Option<String>,
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
    if !is_storage_quantity(&args.storage_size) {
        bail!(
            "invalid --storage-size {:?}: use a Kubernetes quantity such as 1Gi or 500Mi",
            args.storage_size
        );
    }
    let mut options = InstallOptions {
        namespace: args.namespace.clone(),
        replicas: args.replicas,
        webhook_failure_policy: args.webhook_failure_policy.clone(),
        sidecar_image: args.sidecar_image.clone(),
        storage_size: args.storage_size.clone(),
        storage_class: args.storage_class.clone(),
        ..InstallOptions::default()
    };
    if let Some(image) = &args.image {
        options.image = image.clone();
    }
    print!("{}", render(&options));
    Ok(())
}

/// Checks that `text` is a whole number of bytes with an optional binary or decimal suffix, as
/// storage requests are written (`1Gi`, `500Mi`, `10G`).
fn is_storage_quantity(text: &str) -> bool {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let suffix = &text[digits_end..];
    digits_end > 0 && ["", "Ki", "Mi", "Gi", "Ti", "Pi", "k", "M", "G", "T", "P"].contains(&suffix)
}
