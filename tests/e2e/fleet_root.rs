//! A root rotated offline reaches devices: `outpostctl root rotate` then `root push`
//! upload it, devices chain to it at their next refresh (`N.root.json` over MQTT) and
//! still accept the next release, signed and verified under the new root, also when
//! the rotation replaced the release key.

use crate::support::{Broker, Fleet};

#[test]
fn rotated_root_reaches_devices_and_next_release_installs() {
    rotated_root_reaches_devices(Broker::Mosquitto);
}

#[test]
fn rotated_root_reaches_devices_and_next_release_installs_embedded() {
    rotated_root_reaches_devices(Broker::Embedded);
}

fn trusted_root_version(data: &std::path::Path) -> u64 {
    let bytes = std::fs::read(data.join("tuf/root.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["signed"]["version"].as_u64().unwrap()
}

fn rotated_root_reaches_devices(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["o1"], |_| {});
    let dev = &mut devices[0];
    dev.start();
    let c1 = f.assign(&v1, &["o1"])["o1"];
    f.wait_converged("o1", &v1, c1);

    // Two root keys from now on, both needed; signed by the old key and the new ones.
    let repo = f.repo.to_str().unwrap();
    f.ctl(&[
        "root",
        "rotate",
        "--repo",
        repo,
        "--add-keys",
        "1",
        "--threshold",
        "2",
    ]);
    let out = f.ctl(&["root", "push", "--repo", repo]);
    assert!(out.contains("uploaded root v2"), "{out}");

    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    let c2 = f.assign(&v2, &["o1"])["o1"];
    f.wait_converged("o1", &v2, c2);

    // The release key replaced: targets.json re-signed with the new key travels with
    // root v3, and a device can verify the next release only under root v3.
    f.ctl(&[
        "root",
        "rotate",
        "--repo",
        repo,
        "--replace-role-key",
        "targets",
    ]);
    let out = f.ctl(&["root", "push", "--repo", repo]);
    assert!(out.contains("uploaded root v3"), "{out}");
    let v3 = f.sign("cnn_a_head_ft.onnx", "1.2");
    f.push(&v3);
    let c3 = f.assign(&v3, &["o1"])["o1"];
    f.wait_converged("o1", &v3, c3);
    dev.stop();
    assert_eq!(trusted_root_version(&dev.data), 3);
    dev.check_store(&[&v1, &v2, &v3]);
}
