//! A device whose bundle holds the wrong broker password: the broker refuses it, the
//! agent says so in words and keeps serving its model; with the right password again it
//! picks up the assignment it missed.

use crate::support::{Broker, Fleet, MODEL};

#[test]
fn wrong_device_password_is_refused_and_old_model_keeps_serving() {
    wrong_password_is_refused(Broker::Mosquitto);
}

#[test]
fn wrong_device_password_is_refused_and_old_model_keeps_serving_embedded() {
    wrong_password_is_refused(Broker::Embedded);
}

fn wrong_password_is_refused(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["w1"], |_| {});
    let dev = &mut devices[0];
    dev.start();
    let c = f.assign(&v1, &["w1"]);
    f.wait_converged("w1", &v1, c["w1"]);
    dev.stop();

    // 1.1 is assigned while the device holds a wrong password: it never reaches it.
    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    let c2 = f.assign(&v2, &["w1"])["w1"];
    let creds = dev.bundle.join("credentials");
    let good = std::fs::read_to_string(&creds).unwrap();
    std::fs::write(&creds, "not-the-password\n").unwrap();
    let mark = f.log.mark();
    dev.start();
    f.log
        .wait_line(mark, "w1", "refused the device's credentials");
    let local = dev.status().unwrap();
    dev.stop();
    assert_eq!(
        dev.check_store(&[&v1, &v2]).as_deref(),
        Some(v1.sha256.as_str()),
        "agent status: {local}"
    );
    let seen = f.device("w1");
    assert_eq!(
        seen["status"]["models"][MODEL]["active_sha256"],
        v1.sha256.as_str(),
        "{seen}"
    );
    assert!(
        seen["status"]["assignment_counter"].as_u64() < Some(c2),
        "{seen}"
    );

    // Good: the bundle's password again, and the missed assignment is installed.
    std::fs::write(&creds, good).unwrap();
    dev.start();
    f.wait_converged("w1", &v2, c2);
    dev.stop();
    assert_eq!(
        dev.check_store(&[&v1, &v2]).as_deref(),
        Some(v2.sha256.as_str())
    );
}
