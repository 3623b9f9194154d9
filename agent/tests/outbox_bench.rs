//! Outbox push throughput: one transaction per record versus `push_many` of 100.
//!
//! Run: `cargo test -p outpost-agent --release --test outbox_bench -- --ignored --nocapture`

use std::time::Instant;

use outpost_agent::outbox::{Class, Outbox, OutboxConfig};

#[test]
#[ignore = "benchmark; prints numbers"]
fn outbox_push_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("outbox.db"), OutboxConfig::default()).unwrap();
    let payload = br#"{"pred":3,"p":0.9731,"margin":0.61,"entropy":0.12,"latency_us":812,"model":"digits","version":"1.2.0"}"#;

    const SINGLE: usize = 300;
    let start = Instant::now();
    for _ in 0..SINGLE {
        outbox.push(Class::Sample, payload).unwrap().seq().unwrap();
    }
    let single = start.elapsed();

    const BATCHES: usize = 100;
    const BATCH: usize = 100;
    let start = Instant::now();
    for _ in 0..BATCHES {
        let outcomes = outbox
            .push_many((0..BATCH).map(|_| (Class::Window, &payload[..])))
            .unwrap();
        assert_eq!(outcomes.len(), BATCH);
    }
    let batched = start.elapsed();

    let start = Instant::now();
    let mut read = 0;
    loop {
        let batch = outbox.read_batch(500, 1 << 20).unwrap();
        if batch.records.is_empty() {
            break;
        }
        read += batch.records.len();
        outbox.ack(batch.covers_to).unwrap();
    }
    let drained = start.elapsed();
    assert_eq!(read, SINGLE + BATCHES * BATCH);

    let per_sec = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64();
    println!(
        "outbox push ({} B payload): single {:.0} rec/s ({:.2} ms/push); push_many(100) {:.0} rec/s \
         ({:.2} ms/batch); read_batch(500)+ack drain {:.0} rec/s",
        payload.len(),
        per_sec(SINGLE, single),
        single.as_secs_f64() * 1000.0 / SINGLE as f64,
        per_sec(BATCHES * BATCH, batched),
        batched.as_secs_f64() * 1000.0 / BATCHES as f64,
        per_sec(read, drained),
    );
}
