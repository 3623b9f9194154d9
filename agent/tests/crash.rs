//! Crash tests with real processes and real `kill -9`.
//!
//! Each parent test re-executes this test binary as a child that runs only one `#[ignore]`d
//! workload "test" (selected with `--exact NAME --ignored`, its data directory passed in
//! [`CHILD_DIR_ENV`]). The child reports each completed step on stdout; the parent kills it
//! with SIGKILL (`Child::kill`) after a random number of lines plus a random jitter, reads
//! whatever the child had reported, recovers the store or outbox, and checks that nothing
//! the child reported as done was lost and that nothing partial is visible.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::run_and_kill;

use outpost_agent::outbox::{Class, Outbox, OutboxConfig, PushOutcome};
use outpost_agent::store::{BlobHash, Store, StoreError};

const CHILD_DIR_ENV: &str = "OUTPOST_CRASH_CHILD_DIR";
const CHILD_SEED_ENV: &str = "OUTPOST_CRASH_CHILD_SEED";
const MODEL: &str = "crash-model";
const BLOB_LEN: usize = 1024 * 1024;
/// A child that is never killed stops by itself after this many steps.
const CHILD_MAX_STEPS: u64 = 100_000;

fn child_env() -> Option<(String, u64)> {
    let dir = std::env::var(CHILD_DIR_ENV).ok()?;
    let seed = std::env::var(CHILD_SEED_ENV).ok()?.parse().ok()?;
    Some((dir, seed))
}

fn model_bytes(seed: u64, step: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOB_LEN];
    fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003).wrapping_add(step)).fill(&mut bytes);
    bytes
}

/// Child workload: put a fresh 1 MiB model and activate it, forever.
#[test]
#[ignore = "child workload of store_survives_kill_9_during_activation"]
fn crash_child_store() {
    let Some((dir, seed)) = child_env() else {
        return;
    };
    let store = Store::open(&dir).expect("child opens store");
    let mut out = std::io::stdout().lock();
    // The harness may have printed a partial line; start ours on a fresh one.
    if writeln!(out, "\nREADY").is_err() {
        return;
    }
    for step in 0..CHILD_MAX_STEPS {
        let bytes = model_bytes(seed, step);
        let hash = BlobHash::of(&bytes);
        if writeln!(out, "PUTTING {hash}").is_err() {
            return;
        }
        store
            .put_blob(&bytes[..], hash, bytes.len() as u64)
            .expect("put_blob");
        if writeln!(out, "ACTIVATING {hash}").is_err() {
            return;
        }
        store
            .activate(MODEL, hash, &format!(r#"{{"seed":{seed},"step":{step}}}"#))
            .expect("activate");
        if writeln!(out, "ACTIVATED {hash}").is_err() {
            return;
        }
        if step % 3 == 2 {
            store.gc().expect("gc");
        }
    }
}

/// Child workload: push records (single and batched), forever.
#[test]
#[ignore = "child workload of outbox_survives_kill_9_during_pushes"]
fn crash_child_outbox() {
    let Some((dir, seed)) = child_env() else {
        return;
    };
    let outbox =
        Outbox::open(&Path::new(&dir).join("outbox.db"), big_outbox()).expect("child opens");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = std::io::stdout().lock();
    if writeln!(out, "\nREADY").is_err() {
        return;
    }
    let mut step = 0u64;
    while step < CHILD_MAX_STEPS {
        let count = if rng.bool() { 1 } else { rng.u64(2..40) };
        let items: Vec<(u64, Vec<u8>)> = (0..count)
            .map(|k| {
                let i = step + k;
                (i, payload(i, rng.usize(1..3000)))
            })
            .collect();
        step += count;
        let outcomes = if count == 1 {
            vec![outbox.push(Class::Window, &items[0].1).expect("push")]
        } else {
            outbox
                .push_many(items.iter().map(|(_, p)| (Class::Window, p.as_slice())))
                .expect("push_many")
        };
        for ((i, p), outcome) in items.iter().zip(outcomes) {
            let PushOutcome::Stored(seq) = outcome else {
                panic!("record dropped in an outbox sized never to drop");
            };
            if writeln!(out, "WROTE {seq} {i} {}", p.len()).is_err() {
                return;
            }
        }
    }
}

fn big_outbox() -> OutboxConfig {
    OutboxConfig {
        max_total_bytes: 1 << 40,
        quotas: Default::default(),
    }
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    vec![(i % 251) as u8; len]
}

fn spawn_child(name: &str, dir: &Path, seed: u64) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            name,
            "--nocapture",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child")
}

fn assert_dir_empty(dir: &Path) {
    let leftovers: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "debris in {}: {leftovers:?}",
        dir.display()
    );
}

#[test]
fn store_survives_kill_9_during_activation() {
    const ROUNDS: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut active: Option<BlobHash> = None;
    let (mut kills_mid_activation, mut committed_unreported, mut kills_mid_put) = (0, 0, 0);
    for round in 0..ROUNDS {
        let child = spawn_child("crash_child_store", dir.path(), seed ^ round);
        let lines = run_and_kill(
            child,
            rng.usize(1..=9),
            Duration::from_micros(rng.u64(0..30_000)),
            |l| {
                ["PUTTING ", "ACTIVATING ", "ACTIVATED "]
                    .iter()
                    .any(|p| l.starts_with(p))
            },
        );
        // What the child reported: the last completed activation, and a started one.
        let mut in_flight: Option<BlobHash> = None;
        for line in &lines {
            if let Some(hash) = line.strip_prefix("ACTIVATING ") {
                in_flight = Some(hash.parse().unwrap());
            } else if let Some(hash) = line.strip_prefix("ACTIVATED ") {
                let hash: BlobHash = hash.parse().unwrap();
                assert_eq!(in_flight, Some(hash));
                active = Some(hash);
                in_flight = None;
            }
        }

        let store = Store::open(dir.path()).expect("recovery after kill -9");
        if store.recovery_report().temp_files_removed > 0 {
            kills_mid_put += 1;
        }
        let now = store.active(MODEL).unwrap().map(|e| e.hash);
        let allowed = [active, in_flight.or(active)];
        assert!(
            allowed.contains(&now),
            "seed {seed} round {round}: active {now:?}, expected one of {allowed:?}"
        );
        if in_flight.is_some() {
            kills_mid_activation += 1;
            if now == in_flight {
                committed_unreported += 1;
            }
        }
        if let Some(hash) = now {
            let model = store.open_model(MODEL).expect("active blob intact");
            assert_eq!(BlobHash::of(&model.bytes), hash);
            assert_eq!(model.bytes.len(), BLOB_LEN);
        }
        assert_dir_empty(&dir.path().join("tmp"));
        for entry in fs::read_dir(dir.path().join("blobs/sha256")).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let bytes = fs::read(entry.path()).unwrap();
            assert_eq!(
                BlobHash::of(&bytes).to_hex(),
                name,
                "blob content matches name"
            );
        }
        active = now;
    }
    assert!(
        active.is_some(),
        "seed {seed}: no activation ever completed"
    );
    eprintln!(
        "store: {ROUNDS} kills; {kills_mid_put} left a partial blob in tmp/, \
         {kills_mid_activation} landed between ACTIVATING and ACTIVATED \
         ({committed_unreported} of them after the commit)"
    );
}

#[test]
fn outbox_survives_kill_9_during_pushes() {
    const ROUNDS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    // seq -> payload for everything reported written and not acknowledged.
    let mut expected: BTreeMap<u64, Vec<u8>> = Default::default();
    let mut max_seen = 0u64;
    let mut acked = 0u64;
    for round in 0..ROUNDS {
        let child = spawn_child("crash_child_outbox", dir.path(), seed ^ round);
        let lines = run_and_kill(
            child,
            rng.usize(1..=150),
            Duration::from_micros(rng.u64(0..5_000)),
            |l| l.starts_with("WROTE "),
        );
        for line in lines.iter().filter_map(|l| l.strip_prefix("WROTE ")) {
            let fields: Vec<u64> = line.split(' ').map(|f| f.parse().unwrap()).collect();
            let [seq, i, len] = fields[..] else {
                panic!("bad line {line:?}");
            };
            assert!(
                seq > max_seen,
                "seed {seed} round {round}: sequence {seq} reused or out of order (max {max_seen})"
            );
            max_seen = seq;
            expected.insert(seq, payload(i, len as usize));
        }

        let outbox = Outbox::open(&path, big_outbox()).expect("reopen after kill -9");
        let batch = outbox.read_batch(usize::MAX, u64::MAX).unwrap();
        assert_eq!(batch.after_seq, acked);
        let stored: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
        assert!(
            stored.windows(2).all(|w| w[0] < w[1]),
            "sequences unique and increasing"
        );
        let by_seq: BTreeMap<u64, &Vec<u8>> =
            batch.records.iter().map(|r| (r.seq, &r.payload)).collect();
        for (seq, payload) in &expected {
            let Some(stored) = by_seq.get(seq) else {
                panic!("seed {seed} round {round}: reported record {seq} lost");
            };
            assert_eq!(*stored, payload, "payload of {seq}");
        }
        // Unreported records can exist (killed between commit and print), but only above
        // everything reported; none at or below the ack point. From now on they must stay.
        for record in &batch.records {
            if expected.contains_key(&record.seq) {
                continue;
            }
            assert!(
                record.seq > max_seen && record.seq > acked,
                "seed {seed} round {round}: unexpected record {}",
                record.seq
            );
            let uniform = record.payload.windows(2).all(|w| w[0] == w[1]);
            assert!(
                uniform && !record.payload.is_empty(),
                "torn payload in {}",
                record.seq
            );
            expected.insert(record.seq, record.payload.clone());
        }
        let high_water = outbox.high_water();
        assert!(high_water >= max_seen);

        let next = outbox.push(Class::Event, b"parent").unwrap().seq().unwrap();
        assert_eq!(
            next,
            high_water + 1,
            "new push after restart gets a higher sequence"
        );
        expected.insert(next, b"parent".to_vec());
        max_seen = next;
        // Acknowledging everything (an empty outbox) is the case where a lost high-water
        // mark would reuse sequence numbers, so it gets its own share of rounds.
        if rng.u8(0..3) > 0 {
            let up_to = if rng.bool() {
                next
            } else {
                rng.u64(acked..=next)
            };
            outbox.ack(up_to).unwrap();
            acked = up_to;
            expected.retain(|seq, _| *seq > up_to);
        }
    }
    eprintln!("outbox: {ROUNDS} kills, {max_seen} sequence numbers, acked to {acked}");
}

#[test]
fn data_dir_lock_refuses_second_process_and_dies_with_holder() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child("crash_child_store", dir.path(), 7);
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines
        .by_ref()
        .map(|l| l.expect("child stdout"))
        .any(|l| l == "READY");
    assert!(ready, "child never opened the store");

    let err = Store::open(dir.path()).expect_err("data dir is held by the child");
    match &err {
        StoreError::Locked { path, holder_pid } => {
            assert_eq!(path, dir.path());
            assert_eq!(*holder_pid, Some(child.id()));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&format!("(pid {})", child.id())),
        "{err}"
    );

    child.kill().expect("SIGKILL child");
    child.wait().expect("reap child");
    drop(lines);
    // The kernel drops the lock with the process: no stale-lock cleanup is needed.
    Store::open(dir.path()).expect("lock released by kill -9");
}
