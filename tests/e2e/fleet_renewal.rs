//! Director assignments are renewed before they expire, so a fleet left alone keeps
//! verifying its assignment, and a renewal changes nothing on the device: no download,
//! no activation, no retry of a release it refused. The server here signs assignments
//! for 10 s and renews them within 7 s of their expiry, every couple of seconds.

use std::ffi::OsString;

use crate::support::{Broker, Fleet, WAIT, wait_for};

#[test]
fn renewed_assignment_is_a_no_op_on_the_device() {
    renewal_is_a_no_op(Broker::Mosquitto);
}

#[test]
fn renewed_assignment_is_a_no_op_on_the_device_embedded() {
    renewal_is_a_no_op(Broker::Embedded);
}

/// Model bytes the device downloaded (metadata is fetched at every verification).
fn model_bytes(status: &serde_json::Value) -> u64 {
    ["full", "full_zstd", "delta"]
        .iter()
        .map(|k| status["bytes_received"][k].as_u64().unwrap_or(0))
        .sum()
}

fn renewal_is_a_no_op(broker: Broker) {
    let args = [
        "--assignment-expiry-secs",
        "10",
        "--assignment-renew-secs",
        "7",
    ]
    .map(OsString::from);
    let (f, v1) = Fleet::start_with(broker, &args, "");
    let mut devices = f.add_devices(&["r1"], |_| {});
    let dev = &mut devices[0];
    dev.start();
    let c1 = f.assign(&v1, &["r1"])["r1"];
    f.wait_converged("r1", &v1, c1);

    // A release the validation gate refuses (another model's golden vectors): the
    // device downloads it, refuses it and keeps serving 1.0. A renewal of this
    // assignment must not make it try again.
    let bad = f.sign_with_info("cnn_a_head_ft.onnx", "1.2", "cnn_a.release.json");
    f.push(&bad);
    let c2 = f.assign(&bad, &["r1"])["r1"];
    let resting = |s: &serde_json::Value| {
        matches!(
            s["state"]["state"].as_str(),
            Some("failed" | "idle" | "committed")
        )
    };
    let after_refusal = wait_for("the refused release to be given up", WAIT, || {
        let s = dev.status().ok()?;
        (s["assignment_counter"].as_u64() >= Some(c2) && resting(&s)).then_some(s)
    });
    let downloaded = model_bytes(&after_refusal);
    assert!(downloaded > 0, "{}", after_refusal["bytes_received"]);

    // Three renewals later (past the expiry of the operator's assignment) the device
    // has accepted each, downloaded nothing and still serves 1.0.
    let renewed = wait_for("three renewals accepted", WAIT, || {
        let s = dev.status().ok()?;
        (s["assignment_counter"].as_u64() >= Some(c2 + 3) && resting(&s)).then_some(s)
    });
    assert_eq!(
        model_bytes(&renewed),
        downloaded,
        "a renewal made the device download again: {}",
        renewed["bytes_received"]
    );
    // The status still says how the last update ended.
    assert_eq!(renewed["state"]["state"], "failed");
    assert!(
        f.device("r1")["assignment_counter"].as_u64() >= Some(c2 + 3),
        "the server's counter lags the device's"
    );
    dev.stop();
    let active = dev.check_store(&[&v1, &bad]);
    assert_eq!(active.as_deref(), Some(v1.sha256.as_str()));
}
