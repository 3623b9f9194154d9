//! A device's bundle credentials reach only that device's topics: another device's
//! assignment never arrives, and telemetry or status published on its topics is not
//! stored by the server.

use std::collections::BTreeMap;

use outpost_protocol::wire::{
    DeviceTopics, Request, RequestBody, Response, StatusReport, TelemetryBatch, TelemetryRecord,
};

use crate::support::{Broker, Fleet, Probe, wait_for};

#[test]
fn device_credentials_cannot_reach_another_device() {
    credentials_cannot_reach_another_device(Broker::Mosquitto);
}

#[test]
fn device_credentials_cannot_reach_another_device_embedded() {
    credentials_cannot_reach_another_device(Broker::Embedded);
}

fn credentials_cannot_reach_another_device(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["x1", "x2"], |c| c.telemetry.upload_secs = 1);
    for d in &mut devices {
        d.start();
    }
    let c = f.assign(&v1, &["x1", "x2"]);
    f.wait_converged("x1", &v1, c["x1"]);
    f.wait_converged("x2", &v1, c["x2"]);
    // x2's install events are stored: its own telemetry reaches the server.
    let x2_before = wait_for("x2's own telemetry", crate::support::WAIT, || {
        let d = f.device("x2");
        (d["telemetry_acked"].as_u64() > Some(0)).then_some(d)
    });

    // The attacker has x1's bundle (and x1's agent is off: the embedded broker wants
    // the client id to be the username).
    devices[0].stop();
    let password = std::fs::read_to_string(devices[0].bundle.join("credentials")).unwrap();
    let password = password.trim();
    assert!(
        Probe::try_connect(f.broker_port, "x2", "x2", password).is_err(),
        "x1's password logged in as x2"
    );
    let mut probe = Probe::connect(f.broker_port, "x1", "x1", password);
    let own = DeviceTopics::new("x1").unwrap();
    let other = DeviceTopics::new("x2").unwrap();
    for topic in [
        other.assignment.as_str(),
        other.resp.as_str(),
        other.ack.as_str(),
        "outpost/v1/d/+/assignment",
        "outpost/#",
    ] {
        probe.subscribe(topic);
    }
    probe.subscribe(&own.resp);
    probe.subscribe(&own.assignment);

    // x2's assignment is retained and gets a live update; x1's own live one goes out
    // after it over the server's connection, so anything leaked of x2's came first.
    f.assign(&v1, &["x2"]);
    f.assign(&v1, &["x1"]);
    let seen = probe.messages_until("x1's own live assignment", |p| {
        p.topic == own.assignment && !p.retain
    });
    for p in &seen {
        assert!(
            p.topic.starts_with("outpost/v1/d/x1/"),
            "x1's credentials read {}",
            p.topic
        );
    }

    // Publishing on x2's topics: a telemetry batch that would move x2's watermark far
    // ahead, and a status report. Then a request on x1's own topic: its answer means the
    // server has handled everything x1 published before it (one session, in order).
    let forged_seq = 1_000_000;
    let batch = TelemetryBatch {
        device_id: "x2".into(),
        after_seq: 0,
        covers_to: forged_seq,
        records: vec![TelemetryRecord {
            seq: forged_seq,
            class: "event".into(),
            age_ms: 0,
            payload: serde_json::json!({"forged": true}),
        }],
        drops: BTreeMap::new(),
        evicted: None,
        rejected: None,
    };
    // Mosquitto acknowledges and drops a publish its ACL refuses; the embedded broker
    // closes the connection: the attacker connects again.
    let reconnect = |probe: &mut Probe| {
        *probe = Probe::connect(f.broker_port, "x1", "x1", password);
        probe.subscribe(&own.resp);
    };
    if probe
        .try_publish(&other.telemetry, false, serde_json::to_vec(&batch).unwrap())
        .is_err()
    {
        reconnect(&mut probe);
    }
    let status = StatusReport {
        device_id: "x2".into(),
        agent_version: "forged".into(),
        seq: u64::MAX / 2,
        models: BTreeMap::new(),
        assignment_counter: None,
        update: None,
        last_error: None,
        bytes_received: BTreeMap::new(),
    };
    if probe
        .try_publish(&other.status, false, serde_json::to_vec(&status).unwrap())
        .is_err()
    {
        reconnect(&mut probe);
    }
    let id = 4_000_000_001;
    let req = Request {
        id,
        body: RequestBody::Metadata {
            role: "timestamp".into(),
            version: None,
            offset: None,
            len: None,
            accept_zstd: false,
        },
    };
    probe.publish(&own.req, false, req.to_bytes());
    probe.messages_until("the answer on x1's own topic", |p| {
        p.topic == own.resp && Response::from_bytes(&p.payload).is_ok_and(|r| r.header.id == id)
    });

    let x2 = f.device("x2");
    assert_eq!(x2["telemetry_acked"], x2_before["telemetry_acked"], "{x2}");
    assert_ne!(x2["status"]["agent_version"], "forged", "{x2}");
    let stored = f.telemetry("x2");
    assert!(!stored.is_empty(), "x2's own telemetry is stored");
    assert!(
        stored
            .iter()
            .all(|r| r["seq"].as_u64() < Some(forged_seq) && r["payload"]["forged"].is_null()),
        "a forged record was stored for x2"
    );
}
