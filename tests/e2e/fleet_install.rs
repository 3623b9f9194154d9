//! A fleet of three agents installs release 1.0 by the zstd-compressed full model, then
//! 1.1 by delta.

use crate::support::{Broker, Fleet, MODEL};

#[test]
fn fleet_installs_full_then_delta() {
    installs_full_then_delta(Broker::Mosquitto);
}

#[test]
fn fleet_installs_full_then_delta_embedded() {
    installs_full_then_delta(Broker::Embedded);
}

fn installs_full_then_delta(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let ids = ["a1", "a2", "a3"];
    let mut devices = f.add_devices(&ids, |_| {});
    for d in &mut devices {
        d.start();
    }

    let counters = f.assign(&v1, &ids);
    let v1_zstd = f.full_zstd_length(&v1);
    let mut after_full = Vec::new();
    for id in ids {
        let s = f.wait_converged(id, &v1, counters[id]);
        let got = &s["bytes_received"];
        // Nothing to delta from: the compressed full model travelled, once, and the
        // raw file not at all.
        assert_eq!(got["full_zstd"].as_u64(), Some(v1_zstd), "{id}: {s}");
        assert_eq!(got["full"].as_u64().unwrap_or(0), 0, "{id}: {s}");
        assert_eq!(got["delta"].as_u64().unwrap_or(0), 0, "{id}: {s}");
        assert!(s["last_error"].is_null(), "{id}: {s}");
        after_full.push(got.clone());
    }

    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    let counters = f.assign(&v2, &ids);
    for (id, before) in ids.iter().zip(&after_full) {
        let s = f.wait_converged(id, &v2, counters[*id]);
        let got = &s["bytes_received"];
        let delta = got["delta"].as_u64().unwrap_or(0);
        assert!(delta > 0, "{id} did not install 1.1 by delta: {s}");
        assert!(
            delta < v2.length && delta < f.full_zstd_length(&v2),
            "{id}: delta {delta} bytes is not smaller than the full model: {s}"
        );
        assert_eq!(
            (&got["full"], &got["full_zstd"]),
            (&before["full"], &before["full_zstd"]),
            "{id} fetched a full model again"
        );
        assert_eq!(
            s["models"][MODEL]["previous"],
            v1.path.as_str(),
            "{id}: {s}"
        );
        assert!(s["last_error"].is_null(), "{id}: {s}");
    }

    // Operators see the same through outpostctl: the releases with the delta kept for
    // 1.1, and each device's reported state.
    let models = f.ctl(&["models", "list"]);
    assert!(
        models.contains(&format!(
            "{MODEL}\t1.1\tseq 2\t{} bytes\t{}",
            v2.length, v2.path
        )) && models.contains("delta from 1.0")
            && models.contains(&format!("  full (zstd)\t{v1_zstd} bytes\n")),
        "{models}"
    );
    let list = f.ctl(&["devices", "list"]);
    let active = format!("  active {MODEL}={} (1.1)", v2.path);
    assert_eq!(list.matches(&active).count(), ids.len(), "{list}");
    // The agent and this test are built from one workspace version.
    let agent = format!("\tagent {}\t", env!("CARGO_PKG_VERSION"));
    assert_eq!(list.matches(&agent).count(), ids.len(), "{list}");
    assert!(!list.contains("last error"), "{list}");

    // The CLI reads the same persisted state while the daemon runs.
    let cli = devices[0].status_cli();
    assert_eq!(cli["state"]["state"], "committed", "{cli}");
    assert_eq!(cli["state"]["job"]["sha256"], v2.sha256.as_str(), "{cli}");
    for d in &mut devices {
        d.stop();
    }
    for d in &devices {
        assert_eq!(
            d.check_store(&[&v1, &v2]).as_deref(),
            Some(v2.sha256.as_str())
        );
    }
}
