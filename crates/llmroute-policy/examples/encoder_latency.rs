//! Measures the latency of embedding one prompt: 200 timed calls of `Encoder::embed` on a
//! prompt of 53 tokens, after 10 warm-up calls, with the given number of intra-op
//! threads (default 1). Prints p50, p99, mean and the resident memory.
//!
//! `cargo run --release -p llmroute-policy --example encoder_latency [threads]`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use llmroute_policy::assets::{self, Assets};
use llmroute_policy::encoder::Encoder;

const PROMPT: &str = "Write a Python function that reads a CSV file of customer orders, groups \
    them by month, and returns the total revenue per month as a dictionary. Handle missing \
    values and malformed dates gracefully, add type hints, and include a short docstring.";
const WARM_UP_RUNS: usize = 10;
const TIMED_RUNS: usize = 200;

fn main() -> ExitCode {
    let threads = match std::env::args().nth(1).map(|value| value.parse::<usize>()) {
        None => 1,
        Some(Ok(threads)) if threads > 0 => threads,
        Some(_) => {
            eprintln!("error: invalid thread count; pass a positive integer");
            return ExitCode::FAILURE;
        }
    };
    match measure(threads) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn measure(threads: usize) -> Result<(), Box<dyn std::error::Error>> {
    let assets = Assets::locate(&assets::default_cache_dir()?)?;
    let mut encoder = Encoder::load(&assets, threads)?;
    let tokens = encoder.tokenize(PROMPT)?.len();

    for _ in 0..WARM_UP_RUNS {
        encoder.embed(PROMPT)?;
    }
    let mut durations: Vec<Duration> = Vec::with_capacity(TIMED_RUNS);
    for _ in 0..TIMED_RUNS {
        let started = Instant::now();
        encoder.embed(PROMPT)?;
        durations.push(started.elapsed());
    }
    durations.sort();

    let milliseconds = |duration: Duration| duration.as_secs_f64() * 1e3;
    let percentile = |p: f64| durations[((durations.len() - 1) as f64 * p).round() as usize];
    let mean = durations.iter().sum::<Duration>() / TIMED_RUNS as u32;
    println!(
        "{TIMED_RUNS} runs, {tokens} tokens, {threads} intra-op thread(s): p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms, max {:.2} ms",
        milliseconds(percentile(0.50)),
        milliseconds(percentile(0.99)),
        milliseconds(mean),
        milliseconds(durations[durations.len() - 1]),
    );
    // VmRSS from /proc is Linux-only, so it is printed only where available.
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|line| line.starts_with("VmRSS:"))
    {
        println!("resident memory: {}", line["VmRSS:".len()..].trim());
    }
    Ok(())
}
