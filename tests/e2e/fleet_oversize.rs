//! A device (its bundle's credentials in an attacker's client) publishes oversized
//! messages on its own topics: over the wire cap (`wire::MAX_PAYLOAD`) but within the
//! broker's packet limit, the server drops each one without answering or storing it;
//! over the broker's packet limit, the broker drops the connection. Either way the server
//! keeps serving: the next request is answered and the device then updates.

use std::collections::BTreeMap;

use outpost_protocol::wire::{
    DeviceTopics, MAX_PAYLOAD, Request, RequestBody, Response, StatusReport, TelemetryBatch,
    TelemetryRecord,
};

use crate::support::{Broker, Fleet, MODEL, Probe, wait_for};

#[test]
fn oversized_device_messages_are_dropped_and_the_server_keeps_serving() {
    oversized_messages_are_dropped(Broker::Mosquitto);
}

#[test]
fn oversized_device_messages_are_dropped_and_the_server_keeps_serving_embedded() {
    oversized_messages_are_dropped(Broker::Embedded);
}

fn timestamp_request(id: u64) -> Request {
    Request {
        id,
        body: RequestBody::Metadata {
            role: "timestamp".into(),
            version: None,
            offset: None,
            len: None,
            accept_zstd: false,
        },
    }
}

fn oversized_messages_are_dropped(broker: Broker) {
    let (f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["o1"], |c| c.telemetry.upload_secs = 1);
    let dev = &mut devices[0];
    dev.start();
    let c = f.assign(&v1, &["o1"]);
    f.wait_converged("o1", &v1, c["o1"]);
    // Its install events are stored: telemetry from o1 is accepted.
    wait_for("o1's telemetry", crate::support::WAIT, || {
        (f.device("o1")["telemetry_acked"].as_u64() > Some(0)).then_some(())
    });
    // The embedded broker wants the client id to be the username: o1's agent is off.
    dev.stop();
    let before = f.device("o1");
    let acked = before["telemetry_acked"].as_u64().unwrap();

    let password = std::fs::read_to_string(dev.bundle.join("credentials")).unwrap();
    let password = password.trim();
    let own = DeviceTopics::new("o1").unwrap();
    let mut probe = Probe::connect(f.broker_port, "o1", "o1", password);
    probe.subscribe(&own.resp);

    // Over the wire cap, within every broker's packet limit, each well-formed but for
    // its size: a telemetry batch that would move the watermark, a status report, and a
    // request padded with JSON whitespace.
    let over = MAX_PAYLOAD + 4096;
    let forged_seq = acked + 1;
    let batch = TelemetryBatch {
        device_id: "o1".into(),
        after_seq: acked,
        covers_to: forged_seq,
        records: vec![TelemetryRecord {
            seq: forged_seq,
            class: "event".into(),
            age_ms: 0,
            payload: serde_json::json!({"oversized": "x".repeat(over)}),
        }],
        drops: BTreeMap::new(),
        evicted: None,
        rejected: None,
    };
    let status = StatusReport {
        device_id: "o1".into(),
        agent_version: "o".repeat(over),
        seq: u64::MAX / 2,
        models: BTreeMap::new(),
        assignment_counter: None,
        update: None,
        last_error: None,
        bytes_received: BTreeMap::new(),
    };
    let mark = f.log.mark();
    let big_id = 4_000_000_001;
    let mut big_req = timestamp_request(big_id).to_bytes();
    big_req.resize(over, b' ');
    for (topic, bytes) in [
        (&own.telemetry, serde_json::to_vec(&batch).unwrap()),
        (&own.status, serde_json::to_vec(&status).unwrap()),
        (&own.req, big_req),
    ] {
        assert!(bytes.len() > MAX_PAYLOAD && bytes.len() < MAX_PAYLOAD + 8192);
        probe.publish(topic, false, bytes);
    }
    // One session, in order: the answer to this request means the server has handled
    // everything before it, and the padded request got no answer.
    let id = 4_000_000_002;
    probe.publish(&own.req, false, timestamp_request(id).to_bytes());
    let answers = probe.messages_until("the answer to a normal request", |p| {
        p.topic == own.resp && Response::from_bytes(&p.payload).is_ok_and(|r| r.header.id == id)
    });
    for p in &answers {
        let r = Response::from_bytes(&p.payload);
        assert!(
            !r.is_ok_and(|r| r.header.id == big_id),
            "the oversized request was answered"
        );
    }
    // The broker passed each on and the server dropped it for its size.
    for needle in [
        "outpost/v1/d/o1/telemetry: telemetry batch is",
        "outpost/v1/d/o1/status: status report over the size cap",
        "request from o1 dropped: request is",
    ] {
        f.log.wait_line(mark, "server", needle);
    }
    let after = f.device("o1");
    assert_eq!(after["telemetry_acked"].as_u64(), Some(acked), "{after}");
    assert_eq!(
        after["status"]["agent_version"], before["status"]["agent_version"],
        "the oversized status report was stored"
    );
    let stored = f.telemetry("o1");
    assert!(
        stored.iter().all(|r| r["seq"].as_u64() < Some(forged_seq)),
        "an oversized telemetry record was stored"
    );

    // Over the broker's packet limit: the broker drops the connection (Mosquitto's
    // `max_packet_size`, the embedded listener's `max_packet_size`).
    let huge = vec![b' '; 512 * 1024];
    assert!(
        probe.try_publish(&own.telemetry, false, huge).is_err(),
        "the broker accepted a 512 KiB publish"
    );
    drop(probe);

    // The server still serves: the device updates to 1.1.
    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    dev.start();
    let c = f.assign(&v2, &["o1"]);
    let s = f.wait_converged("o1", &v2, c["o1"]);
    assert_eq!(s["models"][MODEL]["active_sha256"], v2.sha256.as_str());
    wait_for(
        "o1's telemetry accepted again",
        crate::support::WAIT,
        || (f.device("o1")["telemetry_acked"].as_u64() > Some(acked)).then_some(()),
    );
    dev.stop();
}
