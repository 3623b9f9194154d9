//! The `Agent` facade on the real fixtures in `tests/fixtures/models`: install, update,
//! revert, reopen, gate rejection, QDQ path choice, labels and windows through the
//! outbox, consent, concurrency, corrupt blobs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use outpost_agent::gate::{GateError, GateOptions};
use outpost_agent::monitor::{
    LabelOutcome, LabelRecord, SampleRecord, WindowConfig, WindowSummary,
};
use outpost_agent::npy;
use outpost_agent::outbox::Class;
use outpost_agent::runtime::{ExecPath, HostTensor};
use outpost_agent::store::{BlobHash, StoreError};
use outpost_agent::{Agent, AgentConfig, AgentError, AgentEvent, EventRecord};
use outpost_protocol::release::ModelRelease;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn read(rel: &str) -> Vec<u8> {
    let p = fixtures().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn release(rel: &str) -> ModelRelease {
    ModelRelease::from_json(&read(rel)).unwrap()
}

/// Row `i` of a stacked `.npy` (`[N, ...rest]`) as a tensor of shape `rest`.
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

/// Top-1 class of ORT's output for held-out row `i`.
fn ort_top1(ort: &HostTensor, i: usize) -> usize {
    argmax(&row(ort, i).to_f64_vec())
}

fn images() -> HostTensor {
    npy::read(&read("heldout_image.npy")).unwrap()
}

fn labels() -> Vec<u32> {
    npy::read(&read("heldout_labels.npy"))
        .unwrap()
        .to_f64_vec()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// A gate that times little: tests run tract unoptimized.
fn quick_gate() -> GateOptions {
    GateOptions {
        min_timed_runs: 8,
        max_timing: Duration::from_millis(300),
        ..GateOptions::default()
    }
}

fn config(dir: &Path) -> AgentConfig {
    AgentConfig {
        gate: quick_gate(),
        ..AgentConfig::new(dir, "test-device")
    }
}

fn install(agent: &Agent, name: &str) -> outpost_agent::InstallReport {
    agent
        .install(
            &read(&format!("{name}.onnx")),
            release(&format!("{name}.release.json")),
        )
        .unwrap_or_else(|e| panic!("install {name}: {e}"))
}

fn top1(agent: &Agent, model: &str, x: &HostTensor) -> usize {
    let out = agent.infer(model, &[("x", x.clone())]).unwrap();
    argmax(&out.outputs[0].1.to_f64_vec())
}

/// Every record in the outbox, by class, as JSON.
fn outbox_json(agent: &Agent) -> Vec<(Class, serde_json::Value)> {
    let batch = agent.outbox().read_batch(100_000, u64::MAX).unwrap();
    batch
        .records
        .into_iter()
        .map(|r| (r.class, serde_json::from_slice(&r.payload).unwrap()))
        .collect()
}

fn events(agent: &Agent) -> Vec<AgentEvent> {
    outbox_json(agent)
        .into_iter()
        .filter(|(c, _)| *c == Class::Event)
        .map(|(_, v)| serde_json::from_value::<EventRecord>(v).unwrap().event)
        .collect()
}

const MODEL_A: &str = "digits-cnn-a";

#[test]
fn update_revert_and_reopen_serve_orts_top1() {
    let dir = tempfile::tempdir().unwrap();
    let x = images();
    let ort_a = npy::read(&read("cnn_a.ort.npy")).unwrap();
    let ort_ft = npy::read(&read("cnn_a_ft.ort.npy")).unwrap();
    let a_hash = BlobHash::of(&read("cnn_a.onnx")).to_hex();
    let ft_hash = BlobHash::of(&read("cnn_a_ft.onnx")).to_hex();
    // Inputs where the two versions disagree tell them apart; check all of those plus a
    // spread of others.
    let mut rows: Vec<usize> = (0..360)
        .filter(|&i| ort_top1(&ort_a, i) != ort_top1(&ort_ft, i))
        .collect();
    rows.extend((0..360).step_by(12));

    let agent = Agent::open(config(dir.path())).unwrap();
    let first = install(&agent, "cnn_a");
    assert_eq!(first.exec_path, ExecPath::AsShipped);
    assert!(first.previous.is_none());
    let early = agent.infer(MODEL_A, &[("x", row(&x, 0))]).unwrap();

    let second = install(&agent, "cnn_a_ft");
    assert_eq!(second.release.sequence, 2);
    assert_eq!(second.previous.as_ref().unwrap().sha256, a_hash);
    assert!(second.gate_latency_p95.is_some() && second.memory_bytes > 0);
    for &i in &rows {
        assert_eq!(
            top1(&agent, MODEL_A, &row(&x, i)),
            ort_top1(&ort_ft, i),
            "row {i}"
        );
    }
    let status = agent.status().unwrap();
    assert_eq!(status.len(), 1);
    let s = &status[0];
    assert_eq!(
        (
            s.active.version.as_str(),
            s.active.sequence,
            s.active.sha256.as_str()
        ),
        ("1.1.0", 2, ft_hash.as_str())
    );
    let prev = s.previous.as_ref().unwrap();
    assert_eq!((prev.sequence, prev.sha256.as_str()), (1, a_hash.as_str()));
    assert_eq!(s.exec_path, Some(ExecPath::AsShipped));
    assert!(s.counts.inferences >= rows.len() as u64);

    // A label for a prediction of the replaced release still joins (its window).
    let truth = labels()[0];
    let expect_correct = argmax(&early.outputs[0].1.to_f64_vec()) as u32 == truth;
    assert_eq!(
        agent.report_label(early.prediction_id, truth),
        LabelOutcome::Joined {
            correct: expect_correct
        }
    );
    assert_eq!(
        agent.report_label(early.prediction_id, truth),
        LabelOutcome::Unknown,
        "a prediction is labelled once"
    );

    // An older release does not replace a newer one.
    let err = agent
        .install(&read("cnn_a.onnx"), release("cnn_a.release.json"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::StaleRelease {
                active: 2,
                offered: 1,
                ..
            }
        ),
        "{err:?}"
    );

    // Identical bytes under a newer sequence would leave the store's metadata stale.
    let mut same_bytes = release("cnn_a_ft.release.json");
    same_bytes.sequence = 9;
    let err = agent
        .install(&read("cnn_a_ft.onnx"), same_bytes)
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::SameBytesAsActive {
                active: 2,
                offered: 9,
                ..
            }
        ),
        "{err:?}"
    );
    // Reinstalling the active release is a no-op.
    assert!(install(&agent, "cnn_a_ft").already_active);

    let reverted = agent.revert(MODEL_A).unwrap();
    assert_eq!(reverted.release.sha256, a_hash);
    assert_eq!(reverted.from.sha256, ft_hash);
    for &i in &rows {
        assert_eq!(
            top1(&agent, MODEL_A, &row(&x, i)),
            ort_top1(&ort_a, i),
            "row {i}"
        );
    }
    let evs = events(&agent);
    let activated = evs
        .iter()
        .filter(|e| matches!(e, AgentEvent::Activated { .. }))
        .count();
    assert_eq!(activated, 2, "{evs:?}");
    assert!(
        evs.iter()
            .any(|e| matches!(e, AgentEvent::Reverted { release, .. } if release.sha256 == a_hash)),
        "{evs:?}"
    );
    assert!(
        evs.iter()
            .any(|e| matches!(e, AgentEvent::InstallRejected { reason, .. } if reason.contains("sequence 1"))),
        "{evs:?}"
    );
    agent.close().unwrap();
    drop(agent);

    let agent = Agent::open(config(dir.path())).unwrap();
    let s = &agent.status().unwrap()[0];
    assert_eq!(s.active.sha256, a_hash);
    assert_eq!(s.previous.as_ref().unwrap().sha256, ft_hash);
    assert_eq!(s.exec_path, Some(ExecPath::AsShipped));
    for &i in &rows {
        assert_eq!(
            top1(&agent, MODEL_A, &row(&x, i)),
            ort_top1(&ort_a, i),
            "row {i}"
        );
    }
}

#[test]
fn second_agent_on_the_same_data_dir_gets_a_typed_lock_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Agent::open(config(dir.path())).unwrap();
    let err = Agent::open(config(dir.path())).unwrap_err();
    assert!(matches!(err, AgentError::Locked { .. }), "{err:?}");
}

/// The quantized-softmax fixture offered as the next release of the MLP.
fn quantized_softmax_as_mlp_update() -> (Vec<u8>, ModelRelease) {
    let mut rel = release("negative/quantized_softmax.release.json");
    rel.model = "digits-mlp".into();
    rel.sequence = 2;
    (read("negative/quantized_softmax.onnx"), rel)
}

#[test]
fn gate_rejects_quantized_softmax_and_the_old_model_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::open(config(dir.path())).unwrap();
    install(&agent, "mlp");
    let (bytes, rel) = quantized_softmax_as_mlp_update();
    let err = agent.install(&bytes, rel).unwrap_err();
    let AgentError::Gate {
        ref model,
        sequence: 2,
        ref source,
        ..
    } = err
    else {
        panic!("expected a gate error, got {err:?}");
    };
    let GateError::GoldenMismatch {
        vector,
        diff,
        tolerance,
        ..
    } = **source
    else {
        panic!("expected a golden mismatch, got {source:?}");
    };
    assert_eq!(model, "digits-mlp");
    assert!(diff > tolerance);
    let text = err.to_string();
    assert!(
        text.contains(&format!("golden vector {vector} output \"probs\""))
            && text.contains("|diff|"),
        "{text}"
    );

    let s = &agent.status().unwrap()[0];
    assert_eq!(s.active.sequence, 1);
    assert!(s.previous.is_none());
    let flat = npy::read(&read("heldout_flat.npy")).unwrap();
    let ort = npy::read(&read("mlp.ort.npy")).unwrap();
    for i in (0..360).step_by(30) {
        assert_eq!(
            top1(&agent, "digits-mlp", &row(&flat, i)),
            ort_top1(&ort, i)
        );
    }
    let rejected: Vec<String> = events(&agent)
        .into_iter()
        .filter_map(|e| match e {
            AgentEvent::InstallRejected { release, reason } => {
                assert_eq!(release.sha256, BlobHash::of(&bytes).to_hex());
                Some(reason)
            }
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].contains(&format!("golden vector {vector}")),
        "{rejected:?}"
    );
    assert!(
        !agent.store().has_blob(&BlobHash::of(&bytes)),
        "a rejected model must not stay on disk"
    );
}

#[test]
fn quantized_softmax_is_accepted_dequantized_when_the_device_opts_into_repair() {
    let dir = tempfile::tempdir().unwrap();
    let repair = AgentConfig {
        gate: GateOptions {
            repair_with_dequantized: true,
            ..quick_gate()
        },
        ..config(dir.path())
    };
    let agent = Agent::open(repair).unwrap();
    install(&agent, "mlp");
    let (bytes, rel) = quantized_softmax_as_mlp_update();
    let report = agent.install(&bytes, rel).unwrap();
    assert_eq!(report.exec_path, ExecPath::Dequantized);
    assert!(
        report.reason.contains("as-shipped fails (golden vector"),
        "{}",
        report.reason
    );
}

#[test]
fn qdq_install_reports_the_chosen_path_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::open(config(dir.path())).unwrap();
    let report = install(&agent, "cnn_a_qdq");
    assert!(
        report.reason.starts_with(report.exec_path.as_str()),
        "{}",
        report.reason
    );
    // Both paths were evaluated: the reason compares them.
    assert!(
        report.reason.contains("as-shipped") && report.reason.contains("dequantized"),
        "{}",
        report.reason
    );
    let s = &agent.status().unwrap()[0];
    assert_eq!(s.exec_path, Some(report.exec_path));
    assert_eq!(s.path_reason, report.reason);
    let activated = events(&agent)
        .into_iter()
        .find_map(|e| match e {
            AgentEvent::Activated {
                exec_path, reason, ..
            } => Some((exec_path, reason)),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        activated,
        (report.exec_path.as_str().to_string(), report.reason.clone())
    );
    let x = images();
    let ort = npy::read(&read("cnn_a_qdq.ort.npy")).unwrap();
    for i in (0..360).step_by(40) {
        assert_eq!(
            top1(&agent, "digits-cnn-a-qdq", &row(&x, i)),
            ort_top1(&ort, i)
        );
    }
    println!("cnn_a_qdq runs {}: {}", report.exec_path, report.reason);
}

#[test]
fn labels_and_count_closed_windows_reach_the_outbox_only_on_tick() {
    const WINDOW: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::open(AgentConfig {
        window: WindowConfig {
            max_count: WINDOW as u64,
            max_duration_ms: 24 * 3600 * 1000,
            ..WindowConfig::default()
        },
        ..config(dir.path())
    })
    .unwrap();
    install(&agent, "cnn_a");
    let x = images();
    let truth = labels();
    let mut correct_in_first_window = 0;
    let mut reported = Vec::new();
    for (i, &truth) in truth.iter().enumerate().take(WINDOW) {
        let out = agent.infer(MODEL_A, &[("x", row(&x, i))]).unwrap();
        let predicted = out.class.unwrap().class;
        assert_eq!(predicted as usize, argmax(&out.outputs[0].1.to_f64_vec()));
        // Every third label is deliberately wrong, so accuracy is not trivially 1.
        let label = if i % 3 == 0 { (truth + 1) % 10 } else { truth };
        let outcome = agent.report_label(out.prediction_id, label);
        assert_eq!(
            outcome,
            LabelOutcome::Joined {
                correct: predicted == label
            }
        );
        // The 20th inference closed the first window before its label came.
        if i < WINDOW - 1 && predicted == label {
            correct_in_first_window += 1;
        }
        reported.push((out.prediction_id.0, label, predicted == label));
    }
    assert!(
        outbox_json(&agent).iter().all(|(c, _)| *c == Class::Event),
        "the hot path must not write telemetry"
    );

    let tick = agent.tick(Instant::now()).unwrap();
    assert_eq!((tick.windows, tick.labels, tick.samples), (1, WINDOW, 0));
    assert_eq!(tick.stored, 1 + WINDOW);
    let records = outbox_json(&agent);
    let label_records: Vec<LabelRecord> = records
        .iter()
        .filter(|(c, _)| *c == Class::Label)
        .map(|(_, v)| serde_json::from_value(v.clone()).unwrap())
        .collect();
    let mut got: Vec<(u64, u32, bool)> = label_records
        .iter()
        .map(|l| (l.prediction_id, l.label, l.correct))
        .collect();
    got.sort();
    reported.sort();
    assert_eq!(got, reported);
    let windows: Vec<WindowSummary> = records
        .iter()
        .filter(|(c, _)| *c == Class::Window)
        .map(|(_, v)| serde_json::from_value(v.clone()).unwrap())
        .collect();
    assert_eq!(windows.len(), 1);
    let w = &windows[0];
    assert_eq!(w.count, WINDOW as u64);
    assert_eq!(w.model.sequence, 1);
    assert_eq!(w.realized.labels, WINDOW as u64 - 1);
    assert_eq!(w.realized.correct, correct_in_first_window);
    let accuracy = correct_in_first_window as f64 / (WINDOW - 1) as f64;
    assert!((w.realized.accuracy.unwrap() - accuracy).abs() < 1e-12);
    assert!(
        w.drift.features.is_some_and(|f| f.scored > 0),
        "{:?}",
        w.drift
    );
    assert!(w.drift.prediction.is_some() && w.drift.confidence.is_some());
    assert!(w.expected_accuracy.is_some());
    let health = w.health.expect("health attached");
    assert!(health.mem_total_bytes > 0);

    // Nothing new: a tick writes nothing.
    let again = agent.tick(Instant::now()).unwrap();
    assert_eq!(again.stored, 0);
    // Time closes a quiet window: the one holding the 20th label.
    let later = agent
        .tick(Instant::now() + Duration::from_secs(2 * 24 * 3600))
        .unwrap();
    assert_eq!(later.windows, 1);
}

/// Noise images on which the model is unsure (calibrated confidence under the threshold).
fn unsure_inputs(agent: &Agent, n: usize) -> Vec<HostTensor> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut found = Vec::new();
    for _ in 0..5000 {
        let v: Vec<f32> = (0..64).map(|_| rng.f32() * rng.f32()).collect();
        let t = HostTensor::from_f32(vec![1, 1, 8, 8], &v).unwrap();
        let out = agent.infer(MODEL_A, &[("x", t.clone())]).unwrap();
        if out.class.unwrap().calibrated < 0.5 {
            found.push(t);
            if found.len() == n {
                return found;
            }
        }
    }
    panic!("only {} unsure noise inputs found", found.len());
}

#[test]
fn samples_are_written_only_with_consent_and_only_for_unsure_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::open(config(dir.path())).unwrap();
    assert!(!agent.consent(), "consent must default to off");
    install(&agent, "cnn_a");
    let unsure = unsure_inputs(&agent, 12);
    let x = images();
    let sure: Vec<HostTensor> = (0..12).map(|i| row(&x, i)).collect();
    agent.close().unwrap();
    let before = outbox_json(&agent).len();

    let run = |agent: &Agent| -> HashSet<u64> {
        let mut unsure_ids = HashSet::new();
        for (u, s) in unsure.iter().zip(&sure) {
            let out = agent.infer(MODEL_A, &[("x", u.clone())]).unwrap();
            unsure_ids.insert(out.prediction_id.0);
            agent.infer(MODEL_A, &[("x", s.clone())]).unwrap();
        }
        unsure_ids
    };
    run(&agent);
    let off = agent.close().unwrap();
    assert_eq!(off.samples, 0);
    let records = outbox_json(&agent);
    assert!(records.iter().all(|(c, _)| *c != Class::Sample));
    let w: WindowSummary = serde_json::from_value(records.last().unwrap().1.clone()).unwrap();
    assert!(w.low_confidence_rate.unwrap() >= 0.45, "{w:?}");
    assert_eq!(w.samples.offered, 0);

    agent.set_consent(true);
    let unsure_ids = run(&agent);
    let on = agent.close().unwrap();
    assert!(on.samples > 0);
    let samples: Vec<SampleRecord> = outbox_json(&agent)[before..]
        .iter()
        .filter(|(c, _)| *c == Class::Sample)
        .map(|(_, v)| serde_json::from_value(v.clone()).unwrap())
        .collect();
    assert_eq!(samples.len(), on.samples);
    for s in &samples {
        assert!(
            unsure_ids.contains(&s.prediction_id),
            "sample of a sure input"
        );
        assert!(s.calibrated < 0.5);
        assert_eq!(s.inputs["x"].len(), 64);
    }

    // Withdrawn consent discards what was collected but not yet written.
    run(&agent);
    agent.set_consent(false);
    assert_eq!(agent.close().unwrap().samples, 0);
}

#[test]
fn four_inferring_threads_never_fail_while_another_installs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Arc::new(Agent::open(config(dir.path())).unwrap());
    install(&agent, "cnn_a");
    let x = images();
    let orts: Vec<HostTensor> = ["cnn_a", "cnn_a_ft", "cnn_a_head_ft"]
        .iter()
        .map(|n| npy::read(&read(&format!("{n}.ort.npy"))).unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(5));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (agent, stop, calls, start) =
                (agent.clone(), stop.clone(), calls.clone(), start.clone());
            let x = x.clone();
            let orts = orts.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let r = i % 360;
                    let out = agent
                        .infer(MODEL_A, &[("x", row(&x, r))])
                        .unwrap_or_else(|e| panic!("inference failed during install: {e}"));
                    let got = argmax(&out.outputs[0].1.to_f64_vec());
                    assert!(
                        orts.iter().any(|o| ort_top1(o, r) == got),
                        "row {r}: class {got} is no version's answer"
                    );
                    calls.fetch_add(1, Ordering::Relaxed);
                    i += 4;
                }
            })
        })
        .collect();
    start.wait();
    let before = calls.load(Ordering::Relaxed);
    // The gate times the candidate while 4 threads compete for 2 cores (debug build):
    // the latency budget is not what this test is about.
    for name in ["cnn_a_ft", "cnn_a_head_ft"] {
        let mut rel = release(&format!("{name}.release.json"));
        rel.budgets = None;
        agent
            .install(&read(&format!("{name}.onnx")), rel)
            .unwrap_or_else(|e| panic!("install {name}: {e}"));
    }
    let during = calls.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker panicked");
    }
    assert!(during > 0, "no inference ran during the installs");
    let s = &agent.status().unwrap()[0];
    assert_eq!(s.active.sequence, 3);
    assert_eq!(s.counts.errors, 0);
    println!(
        "{during} inferences during 2 installs; monitor lock contended {} times of {}",
        s.counts.monitor_lock_contended, s.counts.inferences
    );
}

#[test]
fn corrupt_active_blob_falls_back_to_the_previous_model_with_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::open(config(dir.path())).unwrap();
    install(&agent, "cnn_a");
    install(&agent, "cnn_a_ft");
    let ft = BlobHash::of(&read("cnn_a_ft.onnx"));
    let path = agent.store().blob_path(&ft);
    drop(agent);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let agent = Agent::open(config(dir.path())).unwrap();
    let s = &agent.status().unwrap()[0];
    assert_eq!(s.active.sequence, 1);
    let x = images();
    let ort = npy::read(&read("cnn_a.ort.npy")).unwrap();
    for i in (0..360).step_by(45) {
        assert_eq!(top1(&agent, MODEL_A, &row(&x, i)), ort_top1(&ort, i));
    }
    let evs = events(&agent);
    assert!(
        evs.iter().any(|e| matches!(e,
            AgentEvent::StoreRepaired { lost_sha256, action, .. }
                if *lost_sha256 == ft.to_hex() && action == "reverted_to_previous")),
        "{evs:?}"
    );
}

#[test]
fn model_that_fails_its_golden_vectors_at_open_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::open(config(dir.path())).unwrap();
    install(&agent, "cnn_a");
    install(&agent, "cnn_a_ft");
    // Simulate a runtime upgrade that changes results: the stored release of the active
    // model now carries golden outputs the model does not reproduce.
    let ft = BlobHash::of(&read("cnn_a_ft.onnx"));
    let mut bad = release("cnn_a_ft.release.json");
    for v in &mut bad.golden.as_mut().unwrap().vectors {
        for t in v.outputs.values_mut() {
            t.data.iter_mut().for_each(|d| *d += 1.0);
        }
    }
    // Re-activating the same hash is a no-op in the store, so go through a revert dance:
    // previous (cnn_a) becomes active, then cnn_a_ft is activated with the bad release.
    agent.store().revert(MODEL_A).unwrap();
    agent
        .store()
        .activate(MODEL_A, ft, &serde_json::to_string(&bad).unwrap())
        .unwrap();
    drop(agent);

    let agent = Agent::open(config(dir.path())).unwrap();
    let s = &agent.status().unwrap()[0];
    assert_eq!(s.active.sequence, 1, "{s:?}");
    assert!(
        events(&agent).iter().any(|e| matches!(e,
            AgentEvent::LoadFailed { sha256, fell_back: true, reason, .. }
                if *sha256 == ft.to_hex() && reason.contains("golden vector"))),
        "{:?}",
        events(&agent)
    );
    let x = images();
    let ort = npy::read(&read("cnn_a.ort.npy")).unwrap();
    assert_eq!(top1(&agent, MODEL_A, &row(&x, 3)), ort_top1(&ort, 3));
}

#[test]
fn unknown_model_and_bad_inputs_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::open(config(dir.path())).unwrap();
    let x = row(&images(), 0);
    assert!(matches!(
        agent.infer(MODEL_A, &[("x", x.clone())]),
        Err(AgentError::UnknownModel { .. })
    ));
    install(&agent, "cnn_a");
    let flat = HostTensor::from_f32(vec![1, 64], &[0.0; 64]).unwrap();
    assert!(matches!(
        agent.infer(MODEL_A, &[("x", flat)]),
        Err(AgentError::Runtime { .. })
    ));
    assert_eq!(agent.status().unwrap()[0].counts.errors, 1);
    assert!(matches!(
        agent.revert(MODEL_A),
        Err(AgentError::Store {
            source: StoreError::NoPrevious { .. },
            ..
        })
    ));
    assert_eq!(
        agent.report_label(outpost_agent::runtime::PredictionId(u64::MAX), 1),
        LabelOutcome::Unknown
    );
}
