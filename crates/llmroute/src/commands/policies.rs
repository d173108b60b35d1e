//! `llmroute policies`: the policy history and rollout timeline of a standalone state folder,
//! the standalone counterpart of `kubectl get llmpolicies` and `kubectl get events`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Result, bail};
use llmroute_control::Store;
use llmroute_control::history::PolicyRecord;

#[derive(Debug, clap::Args)]
pub struct PoliciesArgs {
    /// State folder of `llmroute standalone` or `llmroute quickstart` (its `state` subfolder).
    #[arg(long, value_name = "DIR", default_value = "llmroute-state")]
    pub state: PathBuf,
    /// Route whose history to print.
    #[arg(long)]
    pub route: String,
    /// Also prints the last N rollout decisions (0 prints none).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub events: usize,
}

fn figure(value: Option<f64>, precision: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.precision$}"))
}

/// Formats the history as a table, oldest version first.
pub fn history_table(records: &[PolicyRecord]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<9} {:<13} {:<8} {:>22} {:>9} {:>8} {:>8} {:>11}",
        "VERSION",
        "PHASE",
        "ORIGIN",
        "PARENT",
        "GATE DR DIFF [CI]",
        "REQUESTS",
        "REWARD",
        "QUALITY",
        "COST/REQ $"
    );
    for record in records {
        let gate = record
            .off_policy
            .as_ref()
            .map_or_else(|| "-".to_string(), |g| g.difference_dr.to_string());
        let live = record.live.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<10} {:<9} {:<13} {:<8} {:>22} {:>9} {:>8} {:>8} {:>11}",
            record.version,
            format!("{:?}", record.phase),
            format!("{:?}", record.origin),
            record.parent.as_deref().unwrap_or("-"),
            gate,
            live.requests,
            figure(live.mean_reward, 3),
            figure(live.mean_quality, 3),
            live.mean_cost_usd
                .map_or_else(|| "-".into(), |c| format!("{c:.2e}")),
        );
    }
    out
}

pub fn run(args: &PoliciesArgs) -> Result<()> {
    let database = args.state.join("state.sqlite3");
    if !database.is_file() {
        bail!(
            "no state database at {}; pass the --state folder of llmroute standalone",
            database.display()
        );
    }
    let store = Store::open(&args.state)?;
    store.ensure_history()?;
    let records = store.policy_records(&args.route)?;
    if records.is_empty() {
        bail!(
            "route {:?} has no policy history in {}; check the route name",
            args.route,
            args.state.display()
        );
    }
    print!("{}", history_table(&records));
    println!(
        "(REQUESTS to COST/REQ are of the last canary step each version took part in, not totals)"
    );
    let state = store.rollout_state(&args.route)?;
    if let Some(canary) = &state.canary {
        println!(
            "\ncanary {canary} at step {} with weight {:.0} %",
            state.step + 1,
            state.weight * 100.0
        );
    }
    if let Some(reason) = &state.degraded {
        println!("\ndegraded: {reason}");
    }
    if args.events > 0 {
        println!();
        for entry in store.timeline(&args.route, args.events)? {
            println!("{}: {}", entry.reason, entry.message);
        }
    }
    Ok(())
}
