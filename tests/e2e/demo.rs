//! README's first command, in-process with a short configuration: the fleet demo (server
//! with its embedded broker, agents with simulated traffic, a rollout by the compressed
//! full model and one by delta, telemetry from both versions) and the trust checks must
//! pass.

use std::path::PathBuf;
use std::time::Duration;

use outpost_server::demo::{DemoOptions, DemoPart, run_demo};

/// `cargo test --workspace` builds the binaries next to this test's `deps/` dir.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

fn options(part: DemoPart, work: &std::path::Path) -> DemoOptions {
    let mut opts = DemoOptions::new(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/models"
    )));
    opts.work_dir = Some(work.to_owned());
    opts.bin_dir = Some(bin_dir());
    opts.part = part;
    opts
}

#[test]
fn fleet_demo_converges_by_full_then_delta_with_telemetry() {
    let work = tempfile::tempdir().unwrap();
    let mut opts = options(DemoPart::Fleet, work.path());
    opts.devices = 2;
    opts.rate = 50.0;
    opts.timeout = Duration::from_secs(120);
    assert!(
        run_demo(&opts).unwrap(),
        "a fleet demo check failed; see the output above and the logs in {}",
        work.keep().display()
    );
}

#[test]
fn trust_demo_passes_every_check() {
    let work = tempfile::tempdir().unwrap();
    assert!(
        run_demo(&options(DemoPart::Trust, work.path())).unwrap(),
        "a demo check failed; see the output above"
    );
}
