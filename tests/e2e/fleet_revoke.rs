//! An operator revokes a release after it was assigned: `outpostctl release revoke`
//! removes it from `targets.json`, which is uploaded to the server. A device that comes
//! online to the retained assignment naming it refuses it (the target is no longer in
//! the image repository), reports why, and keeps serving its model; the next release
//! installs.

use crate::support::{Broker, Fleet, MODEL};

#[test]
fn assignment_to_a_revoked_release_is_refused_and_old_model_keeps_serving() {
    revoked_release_is_refused(Broker::Mosquitto);
}

#[test]
fn assignment_to_a_revoked_release_is_refused_and_old_model_keeps_serving_embedded() {
    revoked_release_is_refused(Broker::Embedded);
}

fn revoked_release_is_refused(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["r1"], |_| {});
    let dev = &mut devices[0];
    dev.start();
    let c1 = f.assign(&v1, &["r1"])["r1"];
    f.wait_converged("r1", &v1, c1);
    dev.stop();

    // 1.1 is assigned while the device is offline, then revoked.
    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    let c2 = f.assign(&v2, &["r1"])["r1"];
    let repo = f.repo.to_str().unwrap();
    let out = f.ctl(&[
        "release",
        "revoke",
        "--repo",
        repo,
        "--model",
        MODEL,
        "--version",
        "1.1",
    ]);
    assert!(out.contains(&format!("revoked {}", v2.path)), "{out}");
    let targets = std::fs::read_to_string(f.repo.join("metadata/targets.json")).unwrap();
    f.admin
        .post(
            "/api/v1/releases",
            &serde_json::json!({ "targets": targets }),
        )
        .unwrap();
    let listed = f.admin.get("/api/v1/releases").unwrap();
    assert!(
        listed["releases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["path"] != v2.path.as_str()),
        "the server still lists 1.1: {listed}"
    );

    dev.start();
    let s = crate::support::wait_for("r1 to refuse 1.1", crate::support::WAIT, || {
        let s = f.device("r1")["status"].clone();
        (s["last_error"]["kind"] == "assignment").then_some(s)
    });
    let msg = s["last_error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&v2.path) && msg.contains("not in the image repository"),
        "{s}"
    );
    assert_eq!(
        s["models"][MODEL]["active_sha256"],
        v1.sha256.as_str(),
        "{s}"
    );
    assert!(s["assignment_counter"].as_u64() < Some(c2), "{s}");
    dev.stop();
    assert_eq!(
        dev.check_store(&[&v1, &v2]).as_deref(),
        Some(v1.sha256.as_str())
    );

    // Good: the next signed release installs.
    let v3 = f.sign("cnn_a_head_ft.onnx", "1.2");
    f.push(&v3);
    dev.start();
    let c3 = f.assign(&v3, &["r1"])["r1"];
    f.wait_converged("r1", &v3, c3);
    dev.stop();
    assert_eq!(
        dev.check_store(&[&v1, &v3]).as_deref(),
        Some(v3.sha256.as_str())
    );
}
