//! Release metadata larger than one MQTT message: seven releases of the fixture model
//! make `targets.json` several times the 256 KiB message cap (every release carries
//! golden vectors and reference histograms), and devices still update through it,
//! fetching it in compressed ranges.

use outpost_protocol::wire::MAX_PAYLOAD;

use crate::support::{Broker, Fleet};

#[test]
fn devices_update_through_targets_metadata_larger_than_a_message() {
    update_through_large_metadata(Broker::Embedded);
}

#[test]
fn devices_update_through_targets_metadata_larger_than_a_message_mosquitto() {
    update_through_large_metadata(Broker::Mosquitto);
}

fn metadata_bytes(s: &serde_json::Value) -> u64 {
    s["bytes_received"]["metadata"].as_u64().unwrap_or(0)
}

fn update_through_large_metadata(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let ids = ["m1", "m2"];
    let mut devices = f.add_devices(&ids, |_| {});
    for d in &mut devices {
        d.start();
    }
    let counters = f.assign(&v1, &ids);
    let mut before = Vec::new();
    for id in ids {
        before.push(metadata_bytes(&f.wait_converged(id, &v1, counters[id])));
    }

    let files = ["cnn_a_ft.onnx", "cnn_a_head_ft.onnx"];
    let mut last = v1;
    for i in 1..=6 {
        let t = f.sign(files[i % 2], &format!("1.{i}"));
        f.push(&t);
        last = t;
    }
    let targets = std::fs::read(f.data.join("repo/metadata/targets.json")).unwrap();
    assert!(
        targets.len() > 2 * MAX_PAYLOAD,
        "targets.json is only {} bytes",
        targets.len()
    );

    let counters = f.assign(&last, &ids);
    for (id, before) in ids.iter().zip(before) {
        let s = f.wait_converged(id, &last, counters[*id]);
        assert!(s["last_error"].is_null(), "{id}: {s}");
        // The new targets.json (and snapshot, timestamp) travelled compressed.
        let fetched = metadata_bytes(&s) - before;
        assert!(
            fetched > 0 && fetched < targets.len() as u64 / 2,
            "{id} fetched {fetched} bytes of metadata for a {}-byte targets.json",
            targets.len()
        );
        eprintln!(
            "{id}: {fetched} bytes of metadata for 6 new releases (targets.json {} bytes)",
            targets.len()
        );
    }
    for d in &mut devices {
        d.stop();
    }
}
