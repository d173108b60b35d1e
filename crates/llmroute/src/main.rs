//! `llmroute`: the one binary of llmroute. Each subcommand lives in `commands/`.

mod args;
mod commands;
mod memory;
mod shutdown;
mod workspace;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};

/// Learned per-request LLM routing: trains, evaluates and serves BaRP routing policies.
#[derive(Debug, Parser)]
#[command(name = "llmroute", version, about)]
struct Cli {
    /// Folder for downloaded assets and caches [default: $LLMROUTE_CACHE, else
    /// $XDG_CACHE_HOME/llmroute, else ~/.cache/llmroute]. A relative path in one of those
    /// variables is ignored with a warning, following the XDG base directory specification.
    #[arg(long, global = true)]
    cache: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download ONNX Runtime and the MiniLM encoder weights (pinned by sha256) and build the
    /// encoder graph. Idempotent.
    Setup,
    /// Train a BaRP policy from bandit feedback and write policy.onnx and policy.json.
    Train(commands::train::TrainArgs),
    /// Train BaRP and the baseline routers and compare them across the preference sweep.
    Eval(commands::eval::EvalArgs),
    /// Measure policy decision, encoder and training times and print a table.
    Bench(commands::bench::BenchArgs),
    /// Serve OpenAI-compatible endpoints that respond from a recorded routing data set.
    ReplayLlm(commands::replay_llm::ReplayLlmArgs),
    /// Run the routing sidecar: an OpenAI-compatible proxy on 127.0.0.1.
    Sidecar(commands::sidecar::SidecarArgs),
    /// Print the model a policy file chooses for one prompt and preference.
    Decide(commands::decide::DecideArgs),
    /// Run the control plane without Kubernetes, from a folder of LLMRoute YAML files.
    Standalone(commands::standalone::StandaloneArgs),
    /// Print the CustomResourceDefinitions of LLMRoute and LLMPolicy.
    Crd,
    /// Print every manifest a cluster needs to run the operator, for
    /// `kubectl apply --server-side -f -`.
    Install(commands::install::InstallArgs),
    /// Run the Kubernetes operator: the LLMRoute controller and the control API for sidecars.
    Operator(Box<commands::operator::OperatorArgs>),
    /// Run the whole learning loop on one machine on a bundled data set: replay-llm, the
    /// standalone control plane, a sidecar and traffic with feedback; no cluster, no API keys.
    Quickstart(commands::quickstart::QuickstartArgs),
    /// Print the policy history and rollout decisions of a route in a standalone state folder.
    Policies(commands::policies::PoliciesArgs),
}

fn main() -> std::process::ExitCode {
    ignore_file_size_signal();
    let cli = Cli::parse();
    // The quickstart draws a live table on stdout; its control plane logs to a file instead.
    let log_file = match &cli.command {
        Command::Quickstart(args) => {
            let logs = args.out.join("logs");
            match std::fs::create_dir_all(&logs)
                .and_then(|()| std::fs::File::create(logs.join("control.log")))
            {
                Ok(file) => Some(file),
                Err(error) => {
                    eprintln!("error: failed to create {}: {error}", logs.display());
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    init_logging(log_file);
    let result = workspace::Workspace::new(cli.cache).and_then(|workspace| match cli.command {
        Command::Setup => commands::setup::run(&workspace),
        Command::Train(args) => commands::train::run(&workspace, &args),
        Command::Eval(args) => commands::eval::run(&workspace, &args),
        Command::Bench(args) => commands::bench::run(&workspace, &args),
        Command::ReplayLlm(args) => commands::replay_llm::run(&args),
        Command::Sidecar(args) => commands::sidecar::run(&workspace, &args),
        Command::Decide(args) => commands::decide::run(&workspace, &args),
        Command::Standalone(args) => commands::standalone::run(&workspace, &args),
        Command::Crd => commands::crd::run(),
        Command::Install(args) => commands::install::run(&args),
        Command::Operator(args) => commands::operator::run(&workspace, &args),
        Command::Quickstart(args) => commands::quickstart::run(&workspace, &args),
        Command::Policies(args) => commands::policies::run(&args),
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_message(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Ignores SIGXFSZ, so that a write past the file-size limit (`ulimit -f`) fails with EFBIG
/// instead of killing the process: the command then removes its temporary files, keeps the
/// previous outputs and names the file in its error.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: `signal` with SIG_IGN installs no handler code, and no other thread runs yet.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Joins an error and its causes with ": ", leaving out a cause whose text the message
/// already contains: many error types print their source in their own message.
fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.is_empty() {
            message = text;
        } else if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// Logs to stderr; `RUST_LOG` overrides the default level (`info` for llmroute, `warn` for
/// libraries).
fn init_logging(file: Option<std::fs::File>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,llmroute=info,llmroute_policy=info,llmroute_replay=info,llmroute_sidecar=info,llmroute_control=info,llmroute_operator=info",
        )
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match file {
        Some(file) => builder
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .init(),
        None => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_drops_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = anyhow::Error::new(io).context("failed to read a.onnx: no such file");
        assert_eq!(error_message(&error), "failed to read a.onnx: no such file");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = anyhow::Error::new(io).context("failed to read b.onnx");
        assert_eq!(error_message(&error), "failed to read b.onnx: no such file");
    }
}
