//! `outpost-server demo`: README's first command, end to end with real processes.
//!
//! - **fleet** ([`fleet`]): a server (`outpost-server serve`, embedded broker), several
//!   `outpost-agent run` daemons with their own data directories and simulated app
//!   traffic, release 1.0.0 of a fixture model rolled out by full model, the fine-tuned
//!   1.1.0 rolled out by delta, progress while devices move, and a summary: each device's
//!   active model, bytes received (full, delta, metadata), telemetry stored on the
//!   server, and the accuracy proxies per model version.
//! - **trust** ([`trust`]): TUF and director checks with the real `outpost-tuf-client`,
//!   and the attacks they stop.
//!
//! [`run_demo`] returns `Ok(true)` only when every device converged and every check held.

mod fleet;

mod trust;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use outpost_protocol::tuf::UtcTime;

/// Where the committed model fixtures live in a source checkout.
pub const DEFAULT_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models");

/// The shipped Mosquitto configuration in a source checkout.
pub const DEFAULT_MOSQUITTO_CONFIG: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/mosquitto");

/// Which parts of the demo run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DemoPart {
    /// The fleet demo, then the trust checks.
    #[default]
    All,
    /// Only the fleet demo.
    Fleet,
    /// Only the trust checks.
    Trust,
}

/// The MQTT broker of the fleet demo.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DemoBroker {
    /// The broker embedded in `outpost-server serve` (nothing else installed).
    #[default]
    Embedded,
    /// Mosquitto (`/usr/sbin/mosquitto`) with the shipped configuration from this
    /// directory (`outpost.conf`, `outpost.acl`).
    Mosquitto(PathBuf),
}

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Directory with `cnn_a.onnx`, `cnn_a_ft.onnx`, their `.release.json`,
    /// `sample_image_0.npy`, `heldout_image.npy` and `heldout_labels.npy`.
    pub fixtures: PathBuf,
    /// Work directory; a temporary one when `None` (removed at the end unless the demo
    /// failed: its logs stay for inspection).
    pub work_dir: Option<PathBuf>,
    /// Directory holding `outpost-server`, `outpost-agent` and `outpost-tuf-client`.
    /// Default: the server is this executable, the agent's binaries sit next to it (built
    /// with the running cargo, `$CARGO`, when there is one).
    pub bin_dir: Option<PathBuf>,
    /// What runs.
    pub part: DemoPart,
    /// Number of devices in the fleet demo.
    pub devices: usize,
    /// Simulated inferences per second per device.
    pub rate: f64,
    /// Longest wait for any one step of the fleet demo.
    pub timeout: Duration,
    /// The fleet demo's broker.
    pub broker: DemoBroker,
}

impl DemoOptions {
    /// The defaults of `outpost-server demo` with these fixtures.
    pub fn new(fixtures: PathBuf) -> DemoOptions {
        DemoOptions {
            fixtures,
            work_dir: None,
            bin_dir: None,
            part: DemoPart::All,
            devices: 3,
            rate: 100.0,
            timeout: Duration::from_secs(60),
            broker: DemoBroker::Embedded,
        }
    }
}

/// Checks that held or not, printed as they are made.
#[derive(Debug, Default)]
struct Report {
    checks: Vec<(String, bool)>,
}

impl Report {
    fn check(&mut self, what: &str, ok: bool, detail: &str) {
        let mark = if ok { "ok  " } else { "FAIL" };
        if detail.is_empty() {
            println!("  [{mark}] {what}");
        } else {
            println!("  [{mark}] {what}: {detail}");
        }
        self.checks.push((what.to_owned(), ok));
    }

    fn failed(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(w, _)| w.as_str())
            .collect()
    }
}

fn now() -> UtcTime {
    UtcTime::from_system_time(std::time::SystemTime::now())
}

/// The binaries the demo runs.
struct Bins {
    server: PathBuf,
    agent: PathBuf,
    tuf_client: PathBuf,
}

impl Bins {
    /// Finds the binaries; without `bin_dir`, under cargo, (re)builds the agent's first so
    /// that they match this source tree.
    fn locate(bin_dir: Option<&Path>) -> anyhow::Result<Bins> {
        let (dir, server) = match bin_dir {
            Some(d) => (d.to_owned(), d.join("outpost-server")),
            None => {
                let exe = std::env::current_exe().context("locating this executable")?;
                let dir = exe.parent().context("executable has no directory")?;
                if let Some(cargo) = std::env::var_os("CARGO") {
                    println!("building the agent binaries (cargo build -p outpost-agent) ...");
                    let release = dir.file_name().is_some_and(|n| n == "release");
                    let mut cmd = Command::new(cargo);
                    cmd.args(["build", "--quiet", "-p", "outpost-agent", "--bins"]);
                    if release {
                        cmd.arg("--release");
                    }
                    let status = cmd.status().context("running cargo")?;
                    if !status.success() {
                        bail!("cargo build -p outpost-agent failed");
                    }
                }
                (dir.to_owned(), exe.clone())
            }
        };
        let find = |p: PathBuf| {
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} not found; build it: cargo build --release -p outpost-agent -p outpost-server --bins",
                    p.display()
                )
            }
        };
        Ok(Bins {
            server: find(server)?,
            agent: find(dir.join("outpost-agent"))?,
            tuf_client: find(dir.join("outpost-tuf-client"))?,
        })
    }
}

/// Runs the demo. Returns `Ok(true)` when every device converged and every check held.
pub fn run_demo(opts: &DemoOptions) -> anyhow::Result<bool> {
    let fx = &opts.fixtures;
    for f in [
        "cnn_a.onnx",
        "cnn_a.release.json",
        "cnn_a_ft.onnx",
        "cnn_a_ft.release.json",
        "sample_image_0.npy",
        "heldout_image.npy",
        "heldout_labels.npy",
    ] {
        if !fx.join(f).exists() {
            bail!(
                "fixture {} missing; pass --fixtures DIR (tests/fixtures/models)",
                fx.join(f).display()
            );
        }
    }
    let bins = Bins::locate(opts.bin_dir.as_deref())?;
    let mut tmp = None;
    let work = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.insert(TempDir::new()?).path.clone(),
    };
    let mut report = Report::default();
    let started = std::time::Instant::now();
    if opts.part != DemoPart::Trust {
        println!("== fleet: server, {} agents, two rollouts ==", opts.devices);
        if let Err(e) = fleet::run_fleet(opts, &bins, &work.join("fleet"), &mut report) {
            report.check("fleet demo ran to the end", false, &format!("{e:#}"));
        }
    }
    if opts.part != DemoPart::Fleet {
        println!("\n== trust: signed metadata, director, attacks ==");
        if let Err(e) = trust::run_trust(
            &work.join("trust"),
            fx,
            &bins.tuf_client,
            &bins.agent,
            &mut report,
        ) {
            report.check("trust checks ran to the end", false, &format!("{e:#}"));
        }
    }
    let failed = report.failed();
    println!(
        "\n{} checks, {} passed, {} failed ({:.1} s)",
        report.checks.len(),
        report.checks.len() - failed.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    for f in &failed {
        println!("  failed: {f}");
    }
    if !failed.is_empty()
        && let Some(t) = &mut tmp
    {
        t.keep = true;
        println!("  logs kept in {}", work.display());
    }
    Ok(failed.is_empty())
}

/// A temporary directory removed on drop unless `keep` (std only).
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let mut bytes = [0u8; 8];
        crate::keys::random_bytes(&mut bytes);
        let path = std::env::temp_dir().join(format!("outpost-demo-{}", hex::encode(bytes)));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
