//! Telemetry across agent kills and broker restarts: the server stores every record the
//! device wrote except those the device evicted and counted, each exactly once.
//!
//! `outpost-agent run` has no inference surface of its own, so the device's app is
//! played by this test: between daemon runs it opens the device's data directory with
//! the agent library (`Agent`), runs inferences on the model the fleet installed, and
//! closes one monitoring window per inference; the daemon then uploads the outbox.

use std::time::{Duration, Instant};

use outpost_agent::outbox::{Outbox, OutboxConfig};
use outpost_agent::{Agent, AgentConfig};

use crate::support::{Broker, Device, Fleet, MODEL, fixtures, wait_for};

/// Outbox cap of the device.
const CAP: u64 = 1024 * 1024;

/// Windows the app writes per round. A window summary is about 8 KB, so the outbox holds
/// about 125: round 1 overflows it before any upload; rounds 2 and 3 fit even beside the
/// last batch of the round before, which the server stored but whose ack the stopped
/// daemon may not have processed (evicting such a record would count it as dropped
/// although the server has it).
const ROUNDS: [(u32, u64); 3] = [(1, 300), (2, 100), (3, 100)];

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
    let evicted =
        drops.event.records + drops.label.records + drops.window.records + drops.sample.records;
    assert_eq!(written, hw, "the daemon wrote records after the app");
    assert!(
        drops.window.records > 0,
        "round 1 was meant to overflow the outbox"
    );
    assert_eq!(drops.event.records, 0, "events were evicted for windows");

    let stored = f.telemetry("m1");
    let seqs: Vec<u64> = stored.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "duplicate (device, seq) stored"
    );
    assert_eq!(
        seqs.len() as u64,
        written - evicted,
        "stored {} of {written} written with {evicted} evicted",
        seqs.len()
    );
    let d = f.device("m1");
    assert_eq!(d["telemetry_acked"].as_u64(), Some(written));
    assert_eq!(
        d["telemetry_drops"]["window"][0].as_u64(),
        Some(drops.window.records),
        "{d}"
    );
    let windows = stored.iter().filter(|r| r["class"] == "window").count() as u64;
    let total: u64 = ROUNDS.iter().map(|(_, n)| n).sum();
    assert_eq!(windows, total - drops.window.records);
}
