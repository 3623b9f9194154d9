//! Telemetry across agent kills and broker restarts: the server stores every record the
//! device wrote except those the device evicted, each exactly once, and counts as dropped
//! exactly the records it never stored.
//!
//! `outpost-agent run` has no inference surface of its own, so the device's app is
//! played by this test: between daemon runs it opens the device's data directory with
//! the agent library (`Agent`), runs inferences on the model the fleet installed, and
//! closes one monitoring window per inference; the daemon then uploads the outbox.

use std::time::{Duration, Instant};

use outpost_agent::outbox::{Batch, Class, Outbox, OutboxConfig, PushOutcome, Quota};
use outpost_agent::{Agent, AgentConfig};
use outpost_protocol::wire::{DeviceTopics, TelemetryAck};

use crate::support::{Broker, Device, Fleet, MODEL, Probe, fixtures, wait_for};

/// Outbox cap of the device.
const CAP: u64 = 1024 * 1024;

/// Windows the app writes per round. A window summary is about 8 KB, so the outbox holds
/// about 125: rounds 1 and 3 overflow it before any upload. The last batch of the round
/// before may be stored on the server while the stopped daemon never processed its ack;
/// evicting it must not count it as dropped (`evicted_after_storage_*` forces that case).
const ROUNDS: [(u32, u64); 3] = [(1, 300), (2, 100), (3, 200)];

#[test]
fn telemetry_across_disconnects_and_kills_is_exact() {
    telemetry_is_exact(Broker::Mosquitto);
}

#[test]
fn telemetry_across_disconnects_and_kills_is_exact_embedded() {
    telemetry_is_exact(Broker::Embedded);
}

fn outbox_config() -> OutboxConfig {
    OutboxConfig {
        max_total_bytes: CAP,
        ..OutboxConfig::default()
    }
}

/// The app: `n` inferences, one window each; returns the outbox's high-water mark.
fn app_writes_windows(dev: &Device, n: u64) -> u64 {
    let mut cfg = AgentConfig::new(&dev.data, &dev.id);
    cfg.outbox = outbox_config();
    cfg.window.max_count = 1;
    let agent = Agent::open(cfg).unwrap();
    let input =
        outpost_agent::npy::read(&std::fs::read(fixtures().join("sample_image_0.npy")).unwrap())
            .unwrap();
    let inputs = [("x", input)];
    for i in 0..n {
        agent.infer(MODEL, &inputs).unwrap();
        if i % 64 == 63 {
            agent.tick(Instant::now()).unwrap();
        }
    }
    agent.close().unwrap();
    agent.outbox().high_water()
}

fn acked(f: &Fleet, id: &str) -> u64 {
    f.device(id)["telemetry_acked"].as_u64().unwrap()
}

/// Waits until the server acknowledged some but not all of `(from, to]`.
fn wait_mid_upload(f: &Fleet, id: &str, from: u64, to: u64) -> u64 {
    let deadline = Instant::now() + crate::support::WAIT;
    loop {
        let a = acked(f, id);
        assert!(
            a < to,
            "the upload of ({from}, {to}] ended before it was disturbed"
        );
        if a > from {
            return a;
        }
        assert!(Instant::now() < deadline, "no upload progress past {from}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn telemetry_is_exact(broker: Broker) {
    let (mut f, v1) = Fleet::start(broker);
    let mut devices = f.add_devices(&["m1"], |c| {
        c.telemetry.outbox_max_bytes = CAP;
        c.telemetry.upload_secs = 1;
    });
    let dev = &mut devices[0];
    dev.start();
    let c = f.assign(&v1, &["m1"]);
    f.wait_converged("m1", &v1, c["m1"]);
    // The install's own events are uploaded first.
    let mut hw = 0;
    wait_for(
        "the install events to be stored",
        crate::support::WAIT,
        || {
            hw = acked(&f, "m1");
            (hw > 0).then_some(())
        },
    );
    dev.stop();
    let outbox = Outbox::open(&dev.data.join("outbox.db"), outbox_config()).unwrap();
    assert_eq!(
        outbox.high_water(),
        hw,
        "records the daemon wrote were not stored"
    );
    drop(outbox);

    // Round 1: kill -9 in the middle of the uploads. Round 2: broker restart in the
    // middle. Round 3: both.
    let mut disturbed = Vec::new();
    for (round, n) in ROUNDS {
        let from = hw;
        let t = Instant::now();
        hw = app_writes_windows(dev, n);
        eprintln!(
            "round {round}: the app wrote {n} windows in {:?}",
            t.elapsed()
        );
        assert!(hw > from);
        dev.start();
        let at = wait_mid_upload(&f, "m1", from, hw);
        if round != 2 {
            dev.kill9();
            dev.start();
        }
        if round != 1 {
            f.restart_broker(|| {});
        }
        disturbed.push((round, from, at, hw));
        wait_for(
            &format!("round {round}: all of {hw} stored"),
            crate::support::WAIT,
            || (acked(&f, "m1") == hw).then_some(()),
        );
        dev.stop();
    }
    eprintln!("disturbed uploads (round, from, acked at disturbance, to): {disturbed:?}");

    let outbox = Outbox::open(&dev.data.join("outbox.db"), outbox_config()).unwrap();
    let written = outbox.high_water();
    let drops = outbox.drop_counters();
    let rejected = outbox.rejected_counters();
    assert_eq!(written, hw, "the daemon wrote records after the app");
    assert!(
        drops.window.records > 0,
        "round 1 was meant to overflow the outbox"
    );
    assert_eq!(drops.event.records, 0, "events were evicted for windows");
    assert_eq!(rejected.window.records, 0, "a window did not fit alone");

    let stored = f.telemetry("m1");
    let seqs: Vec<u64> = stored.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "duplicate (device, seq) stored"
    );
    let d = f.device("m1");
    assert_eq!(d["telemetry_acked"].as_u64(), Some(written));
    let dropped = |class: &str| d["telemetry_drops"][class][0].as_u64().unwrap_or(0);
    let server_dropped: u64 = ["event", "label", "window", "sample"]
        .into_iter()
        .map(dropped)
        .sum();
    assert_eq!(
        seqs.len() as u64,
        written - server_dropped,
        "stored {} of {written} written with {server_dropped} counted as dropped: {d}",
        seqs.len()
    );
    // The device evicted at least what the server never got (more when it evicted
    // records the server had stored before their ack arrived).
    assert!(dropped("window") > 0 && dropped("window") <= drops.window.records);
    let windows = stored.iter().filter(|r| r["class"] == "window").count() as u64;
    let total: u64 = ROUNDS.iter().map(|(_, n)| n).sum();
    assert_eq!(windows, total - dropped("window"));
}

#[test]
fn evicted_after_storage_is_not_counted_as_dropped() {
    evicted_after_storage(Broker::Mosquitto);
}

#[test]
fn evicted_after_storage_is_not_counted_as_dropped_embedded() {
    evicted_after_storage(Broker::Embedded);
}

/// The device is played by this test with its bundle's credentials and the agent's real
/// outbox, so that it can hold back an ack: the server stores a batch, the device never
/// applies the ack (lost, or the agent was killed first) and evicts the batch's records
/// under its quota. The server must count as dropped only what it never stored.
fn evicted_after_storage(broker: Broker) {
    let (f, _v1) = Fleet::start(broker);
    let devices = f.add_devices(&["t1"], |_| {});
    let dev = &devices[0];
    let password = std::fs::read_to_string(dev.bundle.join("credentials")).unwrap();
    let mut probe = Probe::connect(f.broker_port, "t1", "t1", password.trim());
    let topics = DeviceTopics::new("t1").unwrap();
    probe.subscribe(&topics.ack);
    let mut upload = |batch: Batch| {
        let covers_to = batch.covers_to;
        let wire = serde_json::to_vec(&batch.to_wire("t1")).unwrap();
        probe.publish(&topics.telemetry, false, wire);
        probe.messages_until(&format!("the ack of {covers_to}"), |p| {
            p.topic == topics.ack
                && serde_json::from_slice::<TelemetryAck>(&p.payload)
                    .is_ok_and(|a| a.acked == covers_to)
        });
        covers_to
    };

    let mut config = OutboxConfig::default();
    config.quotas.window = Quota {
        max_bytes: Some(1024),
        max_records: Some(4),
    };
    std::fs::create_dir_all(&dev.data).unwrap();
    let outbox = Outbox::open(&dev.data.join("outbox.db"), config).unwrap();
    let window = |i: u32| serde_json::to_vec(&serde_json::json!({ "window": i })).unwrap();
    let mut pushed = 0;
    for i in 0..4 {
        outbox.push(Class::Window, &window(i)).unwrap();
        pushed += 1;
    }
    assert_eq!(upload(outbox.read_batch(256, 96 * 1024).unwrap()), 4);
    // The ack of (0, 4] never reaches the outbox. Four windows evict the four stored
    // ones, two more evict two that were never sent, and one is too large for the quota.
    for i in 4..10 {
        outbox.push(Class::Window, &window(i)).unwrap();
        pushed += 1;
    }
    let big = serde_json::to_vec(&serde_json::json!({ "pad": "x".repeat(2000) })).unwrap();
    assert_eq!(
        outbox.push(Class::Window, &big).unwrap(),
        PushOutcome::Dropped
    );
    pushed += 1;
    let batch = outbox.read_batch(256, 96 * 1024).unwrap();
    assert_eq!(batch.after_seq, 0);
    assert_eq!(
        batch.evicted.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    outbox.ack(upload(batch)).unwrap();

    let seqs: Vec<u64> = f
        .telemetry("t1")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 7, 8, 9, 10]);
    let d = f.device("t1");
    assert_eq!(d["telemetry_acked"].as_u64(), Some(10), "{d}");
    // Records 5 and 6 plus the rejected one; the device itself counts 7 (what servers
    // before `evicted` reported: 8 stored + 7 dropped for 11 written).
    assert_eq!(outbox.drop_counters().window.records, 7);
    let dropped = d["telemetry_drops"]["window"][0].as_u64().unwrap();
    assert_eq!(dropped, 3, "{d}");
    assert_eq!(seqs.len() as u64 + dropped, pushed);
}
