//! Helpers shared by the crash tests (`crash.rs`, `agent_crash.rs`): both re-execute
//! their own test binary as a child and kill it with SIGKILL.

use std::io::{BufRead, BufReader, Read};
use std::process::Child;
use std::time::{Duration, Instant};

/// Reads the child's report lines until `kill_after` of them matched `is_step`, kills it
/// (after `jitter`), then reads everything it had written before dying. Returns all report
/// lines in order. Panics with the child's stderr if it ended on its own.
pub fn run_and_kill(
    mut child: Child,
    kill_after: usize,
    jitter: Duration,
    is_step: impl Fn(&str) -> bool,
) -> Vec<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let mut steps = 0;
    let mut ended_early = true;
    for line in lines.by_ref() {
        let line = line.expect("child stdout");
        if is_step(&line) {
            steps += 1;
        }
        seen.push(line);
        if steps >= kill_after {
            ended_early = false;
            break;
        }
    }
    if !ended_early {
        // Not synchronization: a random extra delay so the kill lands anywhere in the
        // child's next step, not right after a write to stdout.
        let until = Instant::now() + jitter;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
    child.kill().expect("SIGKILL child");
    let status = child.wait().expect("reap child");
    for line in lines {
        seen.push(line.expect("child stdout"));
    }
    if ended_early {
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        panic!("child ended before being killed ({status}); stderr:\n{stderr}");
    }
    seen
}
