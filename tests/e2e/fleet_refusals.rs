//! Refused updates: tampered artifacts on the server and forged, expired or mismatched
//! director assignments (another device's, a target the image repository does not list,
//! a length or hash that differs from it). Each is refused with a typed reason that
//! reaches the server, and the old model keeps serving; the good counterpart of each is
//! accepted.

use std::collections::BTreeMap;
use std::path::Path;

use outpost_protocol::director::{Assignment, SlotTarget, sign_assignment};
use outpost_protocol::tuf::UtcTime;
use outpost_protocol::wire::DeviceTopics;
use outpost_server::repo::Repo;

use crate::support::{Broker, Fleet, MODEL, Probe, Target, wait_for};

#[test]
fn tampered_artifact_is_refused_and_old_model_keeps_serving() {
    tampered_artifact_is_refused(Broker::Mosquitto);
}

#[test]
fn tampered_artifact_is_refused_and_old_model_keeps_serving_embedded() {
    tampered_artifact_is_refused(Broker::Embedded);
}

/// Mosquitto only: the forger publishes with the server's broker login, which the
/// embedded broker does not give to other clients.
#[test]
fn expired_or_mismatched_assignment_is_refused() {
    forged_assignments_are_refused(Broker::Mosquitto);
}

/// Flips one byte in the middle of every artifact in the server's store that is not in
/// `keep` (and not flipped already), keeping its length.
fn tamper(dir: &Path, keep: &[&str], done: &mut Vec<String>) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if keep.contains(&name.as_str()) || done.contains(&name) {
            continue;
        }
        let mut bytes = std::fs::read(e.path()).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(e.path(), bytes).unwrap();
        done.push(name);
        n += 1;
    }
    n
}

fn tampered_artifact_is_refused(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["t1"], |_| {});
    let dev = &mut devices[0];
    dev.start();
    let c = f.assign(&v1, &["t1"]);
    f.wait_converged("t1", &v1, c["t1"]);

    // A tampered delta and compressed full model: their chunks hash wrong, so each is
    // fetched twice and discarded, the failure is reported, and the raw full model is
    // fetched instead.
    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    let mut tampered = Vec::new();
    let deltas = tamper(&f.artifacts_dir(), &[&v1.sha256, &v2.sha256], &mut tampered);
    assert!(deltas >= 1, "the server stored no delta for 1.1");
    let (z1, z2) = (f.full_zstd_length(&v1), f.full_zstd_length(&v2));
    let c = f.assign(&v2, &["t1"]);
    let s = f.wait_converged("t1", &v2, c["t1"]);
    let kind = s["last_error"]["kind"].as_str();
    assert!(
        matches!(kind, Some("hash" | "delta")),
        "the discarded delta was not reported: {s}"
    );
    assert_eq!(s["bytes_received"]["full"].as_u64(), Some(v2.length), "{s}");
    assert_eq!(
        s["bytes_received"]["full_zstd"].as_u64(),
        Some(z1 + 2 * z2),
        "{s}"
    );

    // The full model tampered as well: nothing usable, refused; 1.1 keeps serving.
    let v3 = f.sign("cnn_a_head_ft.onnx", "1.2");
    f.push(&v3);
    let n = tamper(&f.artifacts_dir(), &[&v1.sha256, &v2.sha256], &mut tampered);
    assert!(
        n >= 3,
        "expected the full model, its compressed form and a delta of 1.2, tampered {n}"
    );
    assert!(tampered.contains(&v3.sha256));
    f.assign(&v3, &["t1"]);
    let s = wait_for("t1 to refuse 1.2", crate::support::WAIT, || {
        let s = f.device("t1")["status"].clone();
        (s["update"]["state"] == "failed" && s["update"]["target"] == v3.path.as_str()).then_some(s)
    });
    assert!(
        matches!(s["last_error"]["kind"].as_str(), Some("hash" | "delta")),
        "{s}"
    );
    assert_eq!(
        s["models"][MODEL]["active_sha256"],
        v2.sha256.as_str(),
        "{s}"
    );
    assert!(
        s["models"][MODEL]["exec_path"].is_string(),
        "1.1 is not serving: {s}"
    );
    // The operator's view: 1.1 active, the update of 1.2 failed, and why.
    let list = f.ctl(&["devices", "list"]);
    let kind = s["last_error"]["kind"].as_str().unwrap();
    for line in [
        format!("  active {MODEL}={} (1.1)", v2.path),
        format!("  update {} failed", v3.path),
        format!("  last error {kind}: "),
    ] {
        assert!(list.contains(&line), "no {line:?} in {list}");
    }
    dev.stop();
    assert_eq!(
        dev.check_store(&[&v1, &v2, &v3]).as_deref(),
        Some(v2.sha256.as_str())
    );
}

/// An assignment for `device` naming `t`, signed by `key`.
fn assignment(
    repo: &Repo,
    device: &str,
    counter: u64,
    expires: UtcTime,
    t: &Target,
    tweak: impl FnOnce(&mut SlotTarget),
) -> Assignment {
    let targets = repo.targets().unwrap();
    let file = targets.targets.get(&t.path).expect("the target is listed");
    let mut slot = SlotTarget {
        path: t.path.clone(),
        length: file.length,
        hashes: file.hashes.clone(),
        extra: BTreeMap::new(),
    };
    tweak(&mut slot);
    let mut a = Assignment::new(device, counter, expires);
    a.targets.insert(MODEL.to_owned(), slot);
    a
}

fn forged_assignments_are_refused(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["e1"], |_| {});
    let dev = &mut devices[0];
    dev.start();
    let c1 = f.assign(&v1, &["e1"])["e1"];
    f.wait_converged("e1", &v1, c1);
    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);

    // Whoever holds the broker's server credentials can publish on any device's
    // retained assignment topic; only the director key makes an assignment count.
    let repo = Repo::open(&f.repo, None).unwrap();
    let director = repo.load_key("director").unwrap();
    let not_director = repo.load_key("timestamp").unwrap();
    let mut forger = Probe::connect(
        f.broker_port,
        "e2e-forger",
        "outpost-server",
        f.server_password.as_deref().unwrap(),
    );
    let topic = DeviceTopics::new("e1").unwrap().assignment;
    let now = UtcTime::from_system_time(std::time::SystemTime::now());
    let later = UtcTime::from_unix(now.unix() + 86_400);

    let expired = assignment(
        &repo,
        "e1",
        c1 + 10,
        UtcTime::from_unix(now.unix() - 3600),
        &v2,
        |_| {},
    );
    let longer = assignment(&repo, "e1", c1 + 11, later, &v2, |s| s.length += 1);
    let other_hash = assignment(&repo, "e1", c1 + 12, later, &v2, |s| {
        s.hashes.insert("sha256".into(), v1.sha256.clone());
    });
    let wrong_key = assignment(&repo, "e1", c1 + 13, later, &v2, |_| {});
    let for_e2 = assignment(&repo, "e2", c1 + 14, later, &v2, |_| {});
    let unlisted = assignment(&repo, "e1", c1 + 15, later, &v2, |s| {
        s.path = format!("{MODEL}/9.9/cnn_a_ft.onnx");
    });
    let cases = [
        (
            "expired",
            sign_assignment(&expired, &[&director]).unwrap(),
            "assignment",
        ),
        (
            "length mismatch",
            sign_assignment(&longer, &[&director]).unwrap(),
            "assignment",
        ),
        (
            "hash mismatch",
            sign_assignment(&other_hash, &[&director]).unwrap(),
            "assignment",
        ),
        (
            "not the director's key",
            sign_assignment(&wrong_key, &[&not_director]).unwrap(),
            "signature",
        ),
        (
            "another device's",
            sign_assignment(&for_e2, &[&director]).unwrap(),
            "assignment",
        ),
        (
            "unlisted target",
            sign_assignment(&unlisted, &[&director]).unwrap(),
            "assignment",
        ),
    ];
    let mut last_message = String::new();
    for (what, bytes, kind) in cases {
        forger.publish(&topic, true, bytes);
        let (s, msg) = wait_for(
            &format!("e1 to refuse the {what} assignment"),
            crate::support::WAIT,
            || {
                let s = f.device("e1")["status"].clone();
                let msg = s["last_error"]["message"].as_str()?.to_owned();
                (msg != last_message).then_some((s, msg))
            },
        );
        assert_eq!(s["last_error"]["kind"], kind, "{what}: {s}");
        assert_eq!(
            s["models"][MODEL]["active_sha256"],
            v1.sha256.as_str(),
            "{what}: {s}"
        );
        assert_eq!(s["assignment_counter"].as_u64(), Some(c1), "{what}: {s}");
        last_message = msg;
    }

    // The director's own, current assignment is accepted: its counter is above the
    // device's last accepted one (the refused ones never counted).
    let c2 = f.assign(&v2, &["e1"])["e1"];
    assert!(c2 < c1 + 10);
    f.wait_converged("e1", &v2, c2);
    dev.stop();
    assert_eq!(
        dev.check_store(&[&v1, &v2]).as_deref(),
        Some(v2.sha256.as_str())
    );
}
