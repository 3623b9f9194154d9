//! The `outpost-server` binary.
//!
//! Exit codes: 0 success; 1 failure (for `demo`: a check did not hold).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outpost_server::demo::{DEFAULT_FIXTURES, DemoOptions, run_demo};

#[derive(Parser)]
#[command(name = "outpost-server", version, about = "The Outpost fleet server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the end-to-end demo in a temporary directory: operator signs releases, a
    /// device fetches, verifies and runs a model, and attacks are refused.
    Demo {
        /// Model fixtures directory (tests/fixtures/models of a source checkout).
        #[arg(long, default_value = DEFAULT_FIXTURES)]
        fixtures: PathBuf,
        /// Keep the demo's files in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { fixtures, keep } => {
            let opts = DemoOptions {
                fixtures,
                work_dir: keep,
                agent_bin_dir: None,
            };
            match run_demo(&opts) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("outpost-server demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
