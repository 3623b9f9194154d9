//! The broker restarts in the middle of a transfer: the agent resumes from the ranges it
//! has, nothing is fetched again from zero. Another process takes the broker's port
//! while it is down: the harness starts it again on that port once it is free.

use crate::support::{Broker, Fleet, MODEL, WAIT, wait_for};

#[test]
fn broker_restart_mid_transfer_resumes() {
    restart_mid_transfer_resumes(Broker::Mosquitto);
}

#[test]
fn broker_restart_mid_transfer_resumes_embedded() {
    restart_mid_transfer_resumes(Broker::Embedded);
}

fn restart_mid_transfer_resumes(broker: Broker) {
    let (mut f, v1) = Fleet::start(broker);
    let window = 2;
    let mut devices = f.add_devices(&["b1"], |c| c.update.chunk_window = window);
    let dev = &mut devices[0];
    dev.chunk_len = 64;
    dev.start();
    let counter = f.assign(&v1, &["b1"])["b1"];

    // A quarter of the (compressed) full model in: restart the broker.
    let len = f.full_zstd_length(&v1);
    let quarter = len / 4;
    wait_for("a quarter of the transfer", crate::support::WAIT, || {
        let s = dev.status().ok()?;
        let got = s["bytes_received"]["full_zstd"].as_u64().unwrap_or(0);
        (s["state"]["state"] == "fetching" && got >= quarter).then_some(())
    });
    let mut at_restart = 0;
    f.restart_broker(|| {
        let s = dev.status().unwrap();
        at_restart = s["bytes_received"]["full_zstd"].as_u64().unwrap_or(0);
        assert_eq!(
            s["state"]["state"], "fetching",
            "the transfer ended before the broker stopped: {s}"
        );
        assert!(at_restart < len, "{s}");
    });

    let s = f.wait_converged("b1", &v1, counter);
    let full = s["bytes_received"]["full_zstd"].as_u64().unwrap();
    // Chunks are written once: at most the requests in flight at the restart again.
    assert!(
        full <= len + u64::from(window) * u64::from(dev.chunk_len),
        "{full} bytes received for a {len} byte compressed model (restart at {at_restart})"
    );
    assert!(full < 2 * len);
    assert_eq!(s["bytes_received"]["full"].as_u64().unwrap_or(0), 0, "{s}");
    assert_eq!(s["models"][MODEL]["active_sha256"], v1.sha256.as_str());
    dev.stop();
    assert_eq!(dev.check_store(&[&v1]).as_deref(), Some(v1.sha256.as_str()));
}

#[test]
fn broker_restart_outlasts_its_port_taken_meanwhile() {
    restart_outlasts_its_port_taken_meanwhile(Broker::Mosquitto);
}

#[test]
fn broker_restart_outlasts_its_port_taken_meanwhile_embedded() {
    restart_outlasts_its_port_taken_meanwhile(Broker::Embedded);
}

/// Devices know one broker port: a restart must come back on it. Another process holds
/// it until the restarted broker was refused once; then the next attempt gets it.
fn restart_outlasts_its_port_taken_meanwhile(broker: Broker) {
    let (mut f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["h1"], |_| {});
    let dev = &mut devices[0];
    dev.start();
    let port = f.broker_port;
    let name = match broker {
        Broker::Mosquitto => "mosquitto",
        Broker::Embedded => "server",
    };
    let log = f.log.clone();
    let mark = log.mark();
    let mut holder = None;
    f.restart_broker(|| {
        let held = std::net::TcpListener::bind(("127.0.0.1", port))
            .expect("the broker's port is free while it is down");
        holder = Some(std::thread::spawn(move || {
            wait_for("the broker to be refused the held port", WAIT, || {
                log.has_line(mark, name, "Address already in use")
                    .then_some(())
            });
            drop(held);
        }));
    });
    holder
        .unwrap()
        .join()
        .expect("the port was held until a refusal");
    assert_eq!(f.broker_port, port);
    let counter = f.assign(&v1, &["h1"])["h1"];
    f.wait_converged("h1", &v1, counter);
    dev.stop();
}
