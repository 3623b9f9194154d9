//! `kill -9` of a real agent process during `install` and during `tick`.
//!
//! As in `crash.rs`, each parent test re-executes this test binary as a child running one
//! `#[ignore]`d workload (`--exact NAME --ignored`, data directory in [`CHILD_DIR_ENV`]).
//! The child reports each step on stdout (install phases come from
//! `Agent::on_install_phase`); the parent picks a step to kill after, adds a random
//! jitter, sends SIGKILL, then opens the agent itself and checks: `Agent::open` succeeds,
//! the active model is the old or the new one (the new one whenever the child reported it
//! persisted), it serves ORT's answers, and the outbox lost nothing the child saw
//! committed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::run_and_kill;

use outpost_agent::gate::GateOptions;
use outpost_agent::monitor::WindowConfig;
use outpost_agent::npy;
use outpost_agent::runtime::HostTensor;
use outpost_agent::store::BlobHash;
use outpost_agent::{Agent, AgentConfig, InstallPhase};
use outpost_protocol::release::ModelRelease;

const CHILD_DIR_ENV: &str = "OUTPOST_AGENT_CRASH_DIR";
const MODEL: &str = "digits-cnn-a";
const VERSIONS: [&str; 2] = ["cnn_a", "cnn_a_ft"];
/// A child that is never killed stops by itself after this many steps.
const CHILD_MAX_STEPS: u64 = 100_000;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn read(rel: &str) -> Vec<u8> {
    let p = fixtures().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn release(name: &str) -> ModelRelease {
    ModelRelease::from_json(&read(&format!("{name}.release.json"))).unwrap()
}

fn row(t: &HostTensor, i: usize) -> HostTensor {
    let per = t.data.len() / t.shape[0];
    HostTensor::new(
        t.dtype,
        t.shape[1..].to_vec(),
        t.data[i * per..(i + 1) * per].to_vec(),
    )
    .unwrap()
}

fn argmax(v: &[f64]) -> usize {
    outpost_agent::gate::argmax(v)
}

fn config(dir: &Path) -> AgentConfig {
    AgentConfig {
        gate: GateOptions {
            min_timed_runs: 8,
            max_timing: Duration::from_millis(100),
            ..GateOptions::default()
        },
        window: WindowConfig {
            max_count: 4,
            ..WindowConfig::default()
        },
        consent: true,
        ..AgentConfig::new(dir, "crash-device")
    }
}

fn phase_name(p: InstallPhase) -> &'static str {
    match p {
        InstallPhase::BlobStored => "BLOB_STORED",
        InstallPhase::Validated => "VALIDATED",
        InstallPhase::Persisted => "PERSISTED",
        InstallPhase::Swapped => "SWAPPED",
        _ => "OTHER",
    }
}

/// Child workload: install the two versions of the model alternately, each with the next
/// sequence number, forever.
#[test]
#[ignore = "child workload of agent_survives_kill_9_during_install"]
fn crash_child_install() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let agent = Agent::open(config(Path::new(&dir))).expect("child opens agent");
    agent.on_install_phase(|_, phase| println!("PHASE {}", phase_name(phase)));
    let active = agent.status().unwrap().first().map(|s| s.active.clone());
    let mut seq = active.as_ref().map_or(0, |a| a.sequence);
    let bytes: Vec<Vec<u8>> = VERSIONS
        .iter()
        .map(|n| read(&format!("{n}.onnx")))
        .collect();
    // Start with the version that is not active: each install changes the model file.
    let first = usize::from(active.is_some_and(|a| a.sha256 == BlobHash::of(&bytes[0]).to_hex()));
    // The harness may have printed a partial line; start ours on a fresh one.
    println!("\nREADY");
    for step in 0..CHILD_MAX_STEPS {
        let v = (first + step as usize) % 2;
        seq += 1;
        let mut rel = release(VERSIONS[v]);
        rel.sequence = seq;
        let hash = BlobHash::of(&bytes[v]);
        println!("INSTALLING {seq} {hash}");
        agent.install(&bytes[v], rel).expect("install");
        println!("INSTALLED {seq} {hash}");
    }
}

/// Child workload: infer, label and tick (windows, labels and samples to the outbox),
/// forever.
#[test]
#[ignore = "child workload of agent_survives_kill_9_during_tick"]
fn crash_child_tick() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let agent = Agent::open(config(Path::new(&dir))).expect("child opens agent");
    let x = npy::read(&read("heldout_image.npy")).unwrap();
    let mut rng = fastrand::Rng::new();
    println!("\nREADY");
    for step in 0..CHILD_MAX_STEPS {
        for _ in 0..3 {
            let out = agent
                .infer(MODEL, &[("x", row(&x, rng.usize(0..360)))])
                .expect("infer");
            agent.report_label(out.prediction_id, rng.u32(0..10));
        }
        if step % 4 == 0 {
            let noise: Vec<f32> = (0..64).map(|_| rng.f32()).collect();
            let t = HostTensor::from_f32(vec![1, 1, 8, 8], &noise).unwrap();
            agent.infer(MODEL, &[("x", t)]).expect("infer noise");
        }
        println!("TICKING");
        let report = agent.tick(Instant::now()).expect("tick");
        println!("TICKED {}", report.stored);
    }
}

fn spawn_child(name: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            name,
            "--nocapture",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child")
}

/// ORT's top-1 on a few held-out rows, per model file hash.
fn expected_answers(rows: &[usize]) -> HashMap<String, Vec<usize>> {
    VERSIONS
        .iter()
        .map(|n| {
            let ort = npy::read(&read(&format!("{n}.ort.npy"))).unwrap();
            let hash = BlobHash::of(&read(&format!("{n}.onnx"))).to_hex();
            (
                hash,
                rows.iter()
                    .map(|&i| argmax(&row(&ort, i).to_f64_vec()))
                    .collect(),
            )
        })
        .collect()
}

/// Rows where the two versions disagree (so a wrong model shows), plus a few others.
fn telling_rows() -> Vec<usize> {
    let a = npy::read(&read("cnn_a.ort.npy")).unwrap();
    let b = npy::read(&read("cnn_a_ft.ort.npy")).unwrap();
    let mut rows: Vec<usize> = (0..360)
        .filter(|&i| argmax(&row(&a, i).to_f64_vec()) != argmax(&row(&b, i).to_f64_vec()))
        .collect();
    rows.extend([0, 100, 200, 300]);
    rows
}

/// Opens the agent after a kill and checks that it serves `expected_hash` correctly.
fn check_serves(agent: &Agent, x: &HostTensor, rows: &[usize], answers: &[usize]) {
    for (&i, &want) in rows.iter().zip(answers) {
        let out = agent
            .infer(MODEL, &[("x", row(x, i))])
            .expect("serves after kill");
        assert_eq!(argmax(&out.outputs[0].1.to_f64_vec()), want, "row {i}");
    }
}

#[test]
fn agent_survives_kill_9_during_install() {
    const ROUNDS: usize = 20;
    const STEPS: [&str; 6] = [
        "INSTALLING ",
        "PHASE BLOB_STORED",
        "PHASE VALIDATED",
        "PHASE PERSISTED",
        "PHASE SWAPPED",
        "INSTALLED ",
    ];
    let dir = tempfile::tempdir().unwrap();
    let x = npy::read(&read("heldout_image.npy")).unwrap();
    let rows = telling_rows();
    let answers = expected_answers(&rows);
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    // (sequence, hash) active before each round.
    let mut active: Option<(u64, String)> = None;
    let mut killed_after: HashMap<&str, usize> = HashMap::new();
    let mut new_after_kill = 0;
    for round in 0..ROUNDS {
        // Kill after the n-th line of one install step, chosen evenly.
        let target = STEPS[rng.usize(..STEPS.len())];
        let nth = rng.usize(1..=2);
        let lines = run_and_kill(
            spawn_child("crash_child_install", dir.path()),
            nth,
            Duration::from_micros(rng.u64(0..3_000)),
            |l| l.starts_with(target),
        );
        let last_step = lines
            .iter()
            .rev()
            .find_map(|l| STEPS.iter().find(|s| l.starts_with(**s)))
            .copied()
            .unwrap_or("READY");
        *killed_after.entry(last_step).or_default() += 1;

        let mut in_flight: Option<(u64, String)> = None;
        let mut persisted = false;
        for line in &lines {
            if let Some(rest) = line.strip_prefix("INSTALLING ") {
                let (seq, hash) = rest.split_once(' ').unwrap();
                in_flight = Some((seq.parse().unwrap(), hash.to_string()));
                persisted = false;
            } else if line == "PHASE PERSISTED" {
                persisted = true;
            } else if line.starts_with("INSTALLED ") {
                active = in_flight.take();
                persisted = false;
            }
        }

        let agent = Agent::open(config(dir.path()))
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: open after kill: {e}"));
        let status = agent.status().unwrap();
        let now = status
            .first()
            .map(|s| (s.active.sequence, s.active.sha256.clone()));
        let allowed: Vec<_> = if persisted {
            vec![in_flight.clone()]
        } else {
            vec![active.clone(), in_flight.clone().or(active.clone())]
        };
        assert!(
            allowed.contains(&now),
            "seed {seed} round {round} (killed after {last_step}): active {now:?}, \
             expected one of {allowed:?}\nstatus {status:?}\nchild said {lines:?}\nevents {:?}",
            agent
                .outbox()
                .read_batch(1000, u64::MAX)
                .unwrap()
                .records
                .iter()
                .filter(|r| r.class == outpost_agent::outbox::Class::Event)
                .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
                .collect::<Vec<_>>()
        );
        if now.is_some() && now == in_flight {
            new_after_kill += 1;
        }
        if let Some((_, hash)) = &now {
            check_serves(&agent, &x, &rows, &answers[hash]);
        }
        active = now;
        drop(agent);
    }
    println!(
        "kills by last reported step: {killed_after:?}; new model active after {new_after_kill} kills"
    );
    let in_install = ["PHASE BLOB_STORED", "PHASE VALIDATED", "PHASE PERSISTED"]
        .iter()
        .filter_map(|s| killed_after.get(s))
        .sum::<usize>();
    assert!(
        in_install > 0,
        "seed {seed}: no kill landed between put_blob and the swap: {killed_after:?}"
    );
}

#[test]
fn agent_survives_kill_9_during_tick() {
    const ROUNDS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    {
        let agent = Agent::open(config(dir.path())).unwrap();
        agent
            .install(&read("cnn_a.onnx"), release("cnn_a"))
            .unwrap();
    }
    let x = npy::read(&read("heldout_image.npy")).unwrap();
    let rows = telling_rows();
    let answers = expected_answers(&rows);
    let a_hash = BlobHash::of(&read("cnn_a.onnx")).to_hex();
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut committed = 0usize;
    let mut killed_mid_tick = 0;
    let mut high_water = 0u64;
    for round in 0..ROUNDS {
        let lines = run_and_kill(
            spawn_child("crash_child_tick", dir.path()),
            rng.usize(1..=6),
            Duration::from_micros(rng.u64(0..5_000)),
            |l| l == "TICKING",
        );
        if lines.last().is_some_and(|l| l == "TICKING") {
            killed_mid_tick += 1;
        }
        committed += lines
            .iter()
            .filter_map(|l| l.strip_prefix("TICKED "))
            .map(|n| n.parse::<usize>().unwrap())
            .sum::<usize>();

        let agent = Agent::open(config(dir.path()))
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: open after kill: {e}"));
        let batch = agent.outbox().read_batch(usize::MAX, u64::MAX).unwrap();
        assert!(
            batch.records.len() > committed,
            "seed {seed} round {round}: {} records held, {committed} reported committed \
             (+1 install event)",
            batch.records.len()
        );
        assert!(batch.records.windows(2).all(|w| w[0].seq < w[1].seq));
        for r in &batch.records {
            serde_json::from_slice::<serde_json::Value>(&r.payload)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: record {}: {e}", r.seq));
        }
        assert!(agent.outbox().high_water() >= high_water);
        high_water = agent.outbox().high_water();
        let s = &agent.status().unwrap()[0];
        assert_eq!(s.active.sha256, a_hash);
        check_serves(&agent, &x, &rows, &answers[&a_hash]);
        drop(agent);
    }
    println!(
        "{killed_mid_tick} of {ROUNDS} kills landed inside tick; {committed} records committed"
    );
}
