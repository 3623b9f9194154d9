//! What the agent adds to an inference of the digits CNN (`cnn_a`): prints
//! [`outpost_agent::OverheadReport`] as JSON. The issue's requirement: proxies and outbox
//! writes add at most 3% to the p50 latency. Run in release:
//!
//! ```sh
//! cargo run --release -p outpost-agent --example overhead [ITERATIONS] [FIXTURES_DIR]
//! ```

use std::path::PathBuf;

use outpost_agent::npy;
use outpost_protocol::release::ModelRelease;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let iterations: usize = match args.next() {
        Some(n) => n.parse()?,
        None => 20_000,
    };
    let dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
    });
    let bytes = std::fs::read(dir.join("cnn_a.onnx"))?;
    let release = ModelRelease::from_json(&std::fs::read(dir.join("cnn_a.release.json"))?)?;
    let input = npy::read(&std::fs::read(dir.join("sample_image_0.npy"))?)?;
    let report = outpost_agent::measure_overhead(&bytes, &release, &[("x", input)], iterations)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if cfg!(debug_assertions) {
        eprintln!("note: debug build; run with --release for meaningful numbers");
    }
    Ok(())
}
