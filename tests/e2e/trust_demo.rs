//! README's first command, in-process: the trust demo must pass every check.

use std::path::PathBuf;

use outpost_server::demo::{DemoOptions, run_demo};

/// `cargo test --workspace` builds the agent's binaries next to this test's `deps/` dir.
fn agent_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

#[test]
fn trust_demo_passes_every_check() {
    let work = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        fixtures: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models")),
        work_dir: Some(work.path().to_owned()),
        agent_bin_dir: Some(agent_bin_dir()),
    };
    assert!(
        run_demo(&opts).unwrap(),
        "a demo check failed; see the output above"
    );
}
