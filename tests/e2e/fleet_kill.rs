//! `outpost-agent run` killed with SIGKILL in every state of the update machine: each
//! time the persisted state is the one observed, the active model is a complete signed
//! target, and after a restart the device converges.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::{Broker, Fleet, MODEL, Target, wait_for};

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

#[test]
fn agent_killed_in_every_update_state_converges_embedded() {
    killed_in_every_state_converges(Broker::Embedded);
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

    // The updates to run: 1.1, then 1.2, whose release info carries another model's
    // golden vectors so that the validation gate refuses it (a lasting `failed`).
    // (A fourth release would not fit: the targets metadata of four releases of this
    // model is over the MQTT message cap.)
    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    let bad = f.sign_with_info("cnn_a_head_ft.onnx", "1.2", "cnn_a.release.json");
    f.push(&bad);
    let plan = [(v2, true), (bad, false)];
    let signed: Vec<&Target> = std::iter::once(&v1)
        .chain(plan.iter().map(|(t, _)| t))
        .collect();

    let mut wanted: BTreeSet<&str> = STATES.into_iter().collect();
    let mut kills: Vec<String> = Vec::new();
    let mut step = 0;
    let mut counter = f.assign(&plan[step].0, &["k1"])["k1"];
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
        if resting && status["assignment_counter"].as_u64() >= Some(counter) {
            let (target, installs) = &plan[step];
            // The store says what serves (the server's view may lag a report behind); the
            // agent may have just been restarted, so SIGKILL rather than SIGTERM.
            dev.kill9();
            let active = dev.check_store(&signed);
            dev.start();
            if *installs && active.as_deref() != Some(target.sha256.as_str()) {
                // A kill during probation rolled back to the old model: assign again
                // (a new counter) to run the update once more.
                counter = f.assign(target, &["k1"])["k1"];
            } else if wanted.is_empty() {
                break;
            } else {
                step += 1;
                assert!(
                    step < plan.len(),
                    "out of updates; never killed in {wanted:?} (killed in {kills:?})"
                );
                counter = f.assign(&plan[step].0, &["k1"])["k1"];
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("killed in: {kills:?}");

    // Converges after the last restart: 1.1, the last release that passes the gate, is
    // serving (assigned again if the last kill rolled it back).
    let target = &plan[0].0;
    wait_for("k1 to rest", Duration::from_secs(60), || {
        let s = dev.status().ok()?;
        (s["assignment_counter"].as_u64() >= Some(counter)
            && matches!(
                s["state"]["state"].as_str()?,
                "committed" | "failed" | "idle"
            ))
        .then_some(())
    });
    dev.kill9();
    let active = dev.check_store(&signed);
    dev.start();
    let mut at_least = 0;
    if active.as_deref() != Some(target.sha256.as_str()) {
        at_least = f.assign(target, &["k1"])["k1"];
    }
    let s = f.wait_converged("k1", target, at_least);
    assert_eq!(s["models"][MODEL]["active_sha256"], target.sha256.as_str());
    dev.stop();
    assert_eq!(
        dev.check_store(&signed).as_deref(),
        Some(target.sha256.as_str())
    );
}
