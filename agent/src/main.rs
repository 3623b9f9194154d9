//! The `outpost-agent` binary.
//!
//! Subcommands:
//! - `infer --model FILE.onnx [--release FILE.release.json] --input NAME=FILE.npy ...`:
//!   one inference, JSON on stdout.
//! - `bench --model FILE.onnx --input NAME=FILE.npy [--iterations N]`: cold start and
//!   latency percentiles of each execution path, JSON on stdout.
//!
//! - `run --config DIR/agent.toml`: the daemon (MQTT link, updates, telemetry upload)
//!   until SIGTERM or ctrl-c; exit 0 after a clean shutdown. For tests and demos,
//!   `--simulate-inputs FILE.npy [--simulate-labels FILE.npy] [--simulate-rate N]
//!   [--simulate-label-share S]` plays an app calling `infer` (see `simulate.rs`).
//! - `status --config DIR/agent.toml`: the persisted update state as JSON (reads the data
//!   directory without its lock, so it works while the daemon runs).
//!
//! A release file `FILE.release.json` beside `FILE.onnx` is used when `--release` is not
//! given: the model then passes the validation gate (golden vectors, budgets) first.
//!
//! Exit codes: 0 success; 1 error (bad model, bad input, gate refusal), with a one-line
//! `error: ...` on stderr; 2 bad command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use outpost_agent::gate::{self, GateOptions, LatencyStats};
use outpost_agent::npy;
use outpost_agent::runtime::dequant::Activations;
use outpost_agent::runtime::{
    ExecPath, HostTensor, Model, OnnxSource, Quantization, Runtime, dtype_name,
};
use outpost_protocol::release::{DType, ModelRelease, TensorSpec};
use serde::Serialize;

mod simulate;

#[derive(Parser)]
#[command(name = "outpost-agent", version, about = "The Outpost device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one inference and print the outputs as JSON.
    Infer(InferArgs),
    /// Measure cold start and latency of a model on one input.
    Bench(BenchArgs),
    /// Run the agent daemon: connect to the fleet, apply updates, upload telemetry.
    Run(RunArgs),
    /// Print the persisted update state as JSON.
    Status(StatusArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The device bundle's agent.toml.
    #[arg(long)]
    config: PathBuf,
    /// Chunk length to request, in bytes (for slow links and tests).
    #[arg(long, default_value_t = outpost_protocol::wire::CHUNK_LEN,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(outpost_protocol::wire::CHUNK_LEN)))]
    chunk_len: u32,
    #[command(flatten)]
    simulate: simulate::SimulateArgs,
}

#[derive(Args)]
struct StatusArgs {
    /// The device bundle's agent.toml.
    #[arg(long)]
    config: PathBuf,
}

#[derive(Args)]
struct ModelArgs {
    /// The ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// Release metadata (default: MODEL with `.onnx` replaced by `.release.json`, if present).
    #[arg(long)]
    release: Option<PathBuf>,
    /// An input tensor, `NAME=FILE.npy`; repeat for each model input.
    #[arg(long = "input", value_name = "NAME=FILE.npy", required = true)]
    inputs: Vec<String>,
}

#[derive(Args)]
struct InferArgs {
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Timed runs per path.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Infer(args) => infer(args),
        Command::Bench(args) => bench(args),
        Command::Run(args) => run(args),
        Command::Status(args) => outpost_agent::update::daemon::status_json(&args.config)
            .and_then(|v| Ok(serde_json::to_string_pretty(&v)?)),
    };
    match result {
        Ok(json) => println!("{json}"),
        Err(e) => {
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {line}");
            std::process::exit(1);
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<String> {
    let traffic = simulate::Traffic::load(&args.simulate)?;
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_traffic = simulate::StopOnDrop(stop.clone());
    let mut traffic_thread = None;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stop_on_signal = stop.clone();
        // Installed now, not when the daemon first polls `shutdown`: a SIGTERM during
        // start-up (the link may already be reporting) must still stop it cleanly.
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        let shutdown = async move {
            let mut term = match term {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stop_on_signal.store(true, Ordering::Relaxed);
        };
        outpost_agent::update::daemon::run_with_agent(
            outpost_agent::update::daemon::RunOptions {
                config: args.config,
                chunk_len: args.chunk_len,
            },
            shutdown,
            |agent| {
                if let Some(t) = traffic {
                    eprintln!(
                        "outpost-agent: simulating app traffic: {} input rows at {}/s",
                        t.len(),
                        args.simulate.simulate_rate
                    );
                    traffic_thread = Some(t.spawn(agent.clone(), stop.clone()));
                }
            },
        )
        .await
    })?;
    stop.store(true, Ordering::Relaxed);
    if let Some(stats) = traffic_thread.and_then(|h| h.join().ok()) {
        eprintln!(
            "outpost-agent: simulated app: {} inferences, {} errors, {} labels ({} correct)",
            stats.inferences, stats.errors, stats.labels, stats.correct
        );
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    Ok(r#"{"stopped":true}"#.into())
}

/// Everything both subcommands read from the command line.
struct Loaded {
    name: String,
    bytes: Vec<u8>,
    source: OnnxSource,
    release: Option<ModelRelease>,
    inputs: Vec<(String, HostTensor)>,
}

fn load(args: &ModelArgs) -> anyhow::Result<Loaded> {
    let bytes =
        std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let mut inputs = Vec::new();
    for spec in &args.inputs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input {spec:?} is not NAME=FILE.npy"))?;
        if inputs.iter().any(|(n, _)| n == name) {
            bail!("--input {name:?} given twice");
        }
        let data = std::fs::read(file).with_context(|| format!("reading {file}"))?;
        let tensor = npy::read(&data).with_context(|| format!("reading {file}"))?;
        inputs.push((name.to_string(), tensor));
    }
    let release_path = match &args.release {
        Some(p) => Some(p.clone()),
        None => Some(beside(&args.model)).filter(|p| p.is_file()),
    };
    let release = release_path
        .map(|p| -> anyhow::Result<ModelRelease> {
            let data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            ModelRelease::from_json(&data).with_context(|| format!("reading {}", p.display()))
        })
        .transpose()?;
    let source = OnnxSource::decode(&bytes)?;
    let name = match &release {
        Some(r) => r.model.clone(),
        None => args
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    Ok(Loaded {
        name,
        bytes,
        source,
        release,
        inputs,
    })
}

/// `dir/NAME.onnx` -> `dir/NAME.release.json`.
fn beside(model: &Path) -> PathBuf {
    let stem = model.file_stem().unwrap_or_default().to_string_lossy();
    model.with_file_name(format!("{stem}.release.json"))
}

/// The io spec: the release's inputs, or the given tensors' dtypes and shapes.
fn input_specs(l: &Loaded) -> Vec<TensorSpec> {
    match &l.release {
        Some(r) => r.io.inputs.clone(),
        None => l
            .inputs
            .iter()
            .map(|(name, t)| TensorSpec {
                name: name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
            .collect(),
    }
}

const NO_RELEASE: &str =
    "as-shipped: no release file, so no golden vectors to validate a dequantized variant";

/// The model the agent would run: through the gate when there is a release, as shipped
/// otherwise.
fn prepare(l: &Loaded) -> anyhow::Result<Model> {
    match &l.release {
        Some(release) => {
            let options = GateOptions {
                require_golden: false,
                ..GateOptions::default()
            };
            let validated = gate::validate(&l.bytes, release, &options)
                .context("validation gate refused the model")?;
            Ok(validated.model)
        }
        None => {
            let mut model = l
                .source
                .compile(&l.name, &input_specs(l), ExecPath::AsShipped)?;
            model.set_reason(match l.source.quantization() {
                Quantization::Float => "as-shipped: float model, no release file".into(),
                _ => NO_RELEASE.into(),
            });
            Ok(model)
        }
    }
}

#[derive(Serialize)]
struct JsonTensor {
    shape: Vec<usize>,
    dtype: &'static str,
    data: JsonData,
}

#[derive(Serialize)]
#[serde(untagged)]
enum JsonData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Int(Vec<i64>),
}

fn json_tensor(t: &HostTensor) -> JsonTensor {
    let data = match t.dtype {
        DType::F32 => JsonData::F32(t.to_f32_vec().unwrap_or_default()),
        DType::F64 => JsonData::F64(t.to_f64_vec()),
        _ => JsonData::Int(t.to_f64_vec().into_iter().map(|v| v as i64).collect()),
    };
    JsonTensor {
        shape: t.shape.clone(),
        dtype: dtype_name(t.dtype),
        data,
    }
}

#[derive(Serialize)]
struct InferOutput {
    outputs: BTreeMap<String, JsonTensor>,
    prediction_id: String,
    path: &'static str,
    reason: String,
    latency_us: u128,
}

fn infer(args: InferArgs) -> anyhow::Result<String> {
    let l = load(&args.model)?;
    let model = prepare(&l)?;
    let runtime = Runtime::new();
    runtime.activate(model);
    let result = runtime.infer(&l.name, l.inputs.iter().map(|(n, t)| (n.as_str(), t)))?;
    let out = InferOutput {
        outputs: result
            .outputs
            .iter()
            .map(|(n, t)| (n.clone(), json_tensor(t)))
            .collect(),
        prediction_id: result.prediction_id.to_string(),
        path: result.model.exec_path().as_str(),
        reason: result.model.path_reason().to_string(),
        latency_us: result.latency.as_micros(),
    };
    Ok(serde_json::to_string(&out)?)
}

#[derive(Serialize)]
struct PathBench {
    cold_start_ms: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Serialize)]
struct BenchOutput {
    path: &'static str,
    reason: String,
    cold_start_ms: f64,
    p50_us: f64,
    p99_us: f64,
    iterations: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_bytes: Option<u64>,
    paths: BTreeMap<&'static str, PathBench>,
}

fn bench(args: BenchArgs) -> anyhow::Result<String> {
    let l = load(&args.model)?;
    let specs = input_specs(&l);
    // The gate's choice first: for a dequantized model, measure the very variant it chose
    // (activations rounded or not).
    let chosen = match &l.release {
        Some(_) => Some(prepare(&l)?),
        None => None,
    };
    let activations = match chosen.as_ref().and_then(|m| m.dequant_stats()) {
        Some(s) if s.rounded_activations => Activations::Rounded,
        _ => Activations::Float,
    };
    let mut paths = vec![ExecPath::AsShipped];
    if l.source.has_dequantized_variant() {
        paths.push(ExecPath::Dequantized);
    }
    let mut measured = BTreeMap::new();
    for path in paths {
        let start = Instant::now();
        let compiled = match path {
            ExecPath::Dequantized => l.source.compile_dequantized(&l.name, &specs, activations),
            _ => l.source.compile(&l.name, &specs, path),
        };
        let model = match compiled {
            Ok(m) => m,
            Err(e) if path == ExecPath::Dequantized => {
                eprintln!("note: dequantized variant does not compile: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let run = || model.run(l.inputs.iter().map(|(n, t)| (n.as_str(), t)));
        run()?;
        let cold = start.elapsed();
        let mut samples = Vec::with_capacity(args.iterations as usize);
        for _ in 0..args.iterations {
            let t = Instant::now();
            run()?;
            samples.push(t.elapsed());
        }
        let stats = LatencyStats::from_samples(samples).context("no samples")?;
        measured.insert(path, (cold, stats));
    }
    let (path, reason) = match &chosen {
        Some(model) => (model.exec_path(), model.path_reason().to_string()),
        None => (ExecPath::AsShipped, NO_RELEASE.to_string()),
    };
    let (cold, stats) = measured
        .get(&path)
        .copied()
        .context("chosen path was not measured")?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let out = BenchOutput {
        path: path.as_str(),
        reason,
        cold_start_ms: cold.as_secs_f64() * 1e3,
        p50_us: us(stats.p50),
        p99_us: us(stats.p99),
        iterations: args.iterations,
        peak_rss_bytes: gate::peak_rss_bytes(),
        paths: measured
            .iter()
            .map(|(p, (cold, s))| {
                (
                    p.as_str(),
                    PathBench {
                        cold_start_ms: cold.as_secs_f64() * 1e3,
                        p50_us: us(s.p50),
                        p99_us: us(s.p99),
                    },
                )
            })
            .collect(),
    };
    Ok(serde_json::to_string(&out)?)
}
