//! `outpost-agent run` killed with SIGKILL in every state of the update machine: each
//! time the persisted state is the one observed, the active model is a complete signed
//! target, and after a restart the device converges.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::{Broker, Fleet, Target, wait_for};

/// Every state an update passes through (`idle` is only the state before the first
/// assignment and is not part of an update).
const STATES: [&str; 9] = [
    "verifying",
    "listing",
    "fetching",
    "reconstructing",
    "installing",
    "probation",
    "reverting",
    "committed",
    "failed",
];

#[test]
fn agent_killed_in_every_update_state_converges() {
    killed_in_every_state_converges(Broker::Mosquitto);
}

fn killed_in_every_state_converges(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["k1"], |c| {
        // Long enough to be observed and killed in; a kill during probation counts
        // against the candidate (reverting, then failed).
        c.update.probation_secs = 2;
        c.update.chunk_window = 2;
    });
    let dev = &mut devices[0];
    // Small chunks make fetching last.
    dev.chunk_len = 128;
    dev.start();
    let c = f.assign(&v1, &["k1"]);
    f.wait_converged("k1", &v1, c["k1"]);

    let releases = [("cnn_a_ft.onnx", "1.1"), ("cnn_a_head_ft.onnx", "1.2")].map(|(file, v)| {
        let t = f.sign(file, v);
        f.push(&t);
        t
    });
    let mut signed: Vec<&Target> = vec![&v1];
    signed.extend(releases.iter());

    let mut wanted: BTreeSet<&str> = STATES.into_iter().collect();
    let mut kills: Vec<String> = Vec::new();
    let mut next_release = 0;
    let mut target = &releases[0];
    let mut counter = f.assign(target, &["k1"])["k1"];
    next_release += 1;
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        assert!(
            Instant::now() < deadline,
            "timed out: missing {wanted:?}; killed in {kills:?}; waiting for counter \
             {counter}; agent: {:?}; server: {}",
            dev.status(),
            f.device("k1")
        );
        // Polled every millisecond: a state is observed on its persisted record.
        let Ok(status) = dev.status() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let phase = status["state"]["state"].as_str().unwrap_or("?").to_owned();
        if wanted.contains(phase.as_str()) {
            dev.kill9();
            // The state the agent was killed in is the one persisted now; it is the one
            // observed unless the agent moved on between the poll and the kill.
            let persisted = dev.phase().unwrap();
            dev.check_store(&signed)
                .expect("a model is active throughout");
            wanted.remove(persisted.as_str());
            kills.push(persisted);
            dev.start();
            continue;
        }
        let resting = matches!(phase.as_str(), "committed" | "failed" | "idle");
        let done = status["assignment_counter"].as_u64() >= Some(counter) && resting;
        if done {
            if wanted.is_empty() {
                break;
            }
            if phase == "failed" || next_release >= releases.len() {
                // A kill during probation rolled back to the old model: assign again
                // (a new counter) to run the update once more.
                counter = f.assign(target, &["k1"])["k1"];
            } else {
                target = &releases[next_release];
                next_release += 1;
                counter = f.assign(target, &["k1"])["k1"];
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("killed in: {kills:?}");

    // Converges after the last restart: the target of the last assignment is committed
    // (assigned once more when the last kill was during probation).
    let converged = wait_for("k1 to rest", Duration::from_secs(60), || {
        let s = dev.status().ok()?;
        let phase = s["state"]["state"].as_str()?.to_owned();
        (s["assignment_counter"].as_u64() >= Some(counter)
            && matches!(phase.as_str(), "committed" | "failed"))
        .then_some(phase)
    });
    if converged == "failed" {
        counter = f.assign(target, &["k1"])["k1"];
    }
    let s = f.wait_converged("k1", target, counter);
    assert_eq!(
        s["models"]["digits"]["active_sha256"],
        target.sha256.as_str()
    );
    dev.stop();
    assert_eq!(
        dev.check_store(&signed).as_deref(),
        Some(target.sha256.as_str())
    );
}
