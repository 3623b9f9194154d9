//! The update machine as tables: chains of (event -> state, actions) with injected
//! faults, and the recovery decision for a power loss in every state. Pure and fast.

use outpost_agent::update::machine::{MAX_FETCH_ATTEMPTS, MAX_TRANSITIONS};
use outpost_agent::update::{Action, Event, Facts, Failure, FailureKind, Job, Machine, Phase};
use outpost_protocol::director::CounterState;
use outpost_protocol::wire::{Artifact, ArtifactKind};

const PROBATION: u64 = 10_000;
const OLD: &str = "0000000000000000000000000000000000000000000000000000000000000001";
const NEW: &str = "0000000000000000000000000000000000000000000000000000000000000002";
const DELTA: &str = "00000000000000000000000000000000000000000000000000000000000000d1";

fn job(slot: &str, sha: &str) -> Job {
    Job {
        slot: slot.into(),
        path: format!("models/{slot}.onnx"),
        length: 1000,
        hashes: [("sha256".to_string(), sha.to_string())].into(),
        sha256: sha.into(),
        release: "{}".into(),
        counter: 2,
    }
}

fn full(sha: &str) -> Artifact {
    Artifact {
        id: sha.into(),
        length: 1000,
        kind: ArtifactKind::Full,
    }
}

fn delta(id: &str, base: &str) -> Artifact {
    Artifact {
        id: id.into(),
        length: 100,
        kind: ArtifactKind::Delta { base: base.into() },
    }
}

fn full_zstd(id: &str, length: u64) -> Artifact {
    Artifact {
        id: id.into(),
        length,
        kind: ArtifactKind::FullZstd,
    }
}

fn counter() -> CounterState {
    CounterState {
        counter: 2,
        digest: [9; 32],
    }
}

fn fail(kind: FailureKind) -> Failure {
    Failure::new(kind, "injected")
}

fn verified(jobs: Vec<Job>) -> Event {
    Event::AssignmentVerified {
        jobs,
        counter: counter(),
    }
}

fn listed(artifacts: Vec<Artifact>) -> Event {
    Event::ArtifactsListed {
        artifacts,
        held: vec![OLD.into()],
    }
}

/// Runs `events` from `m`, checking after each the expected state name, that every
/// state change persists first, and returns all actions.
fn chain(m: &mut Machine, steps: &[(Event, &str)]) -> Vec<Action> {
    let mut all = Vec::new();
    for (i, (event, want)) in steps.iter().enumerate() {
        let before = m.phase.clone();
        let actions = m.step(event.clone(), PROBATION);
        assert_eq!(
            m.phase.name(),
            *want,
            "step {i}: {event:?} from {}",
            before.name()
        );
        // Progress counters aside, every state change is persisted before its effects.
        if m.phase.name() != before.name() {
            assert_eq!(
                actions.first(),
                Some(&Action::Persist),
                "step {i} persists first"
            );
        }
        // Persisted form round-trips (what recovery will read).
        let json = serde_json::to_string(&*m).unwrap();
        assert_eq!(&serde_json::from_str::<Machine>(&json).unwrap(), m);
        all.extend(actions);
    }
    all
}

fn reports(actions: &[Action]) -> Vec<FailureKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(Some(f)) => Some(f.kind),
            _ => None,
        })
        .collect()
}

fn installs(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Install(_) | Action::Revert(_)))
        .count()
}

fn fetched_kinds(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Fetch { artifact, .. } => Some(artifact.id.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn happy_path_by_full_model() {
    let mut m = Machine::default();
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![full(NEW)]), "fetching"),
            (Event::FetchProgress { received: 500 }, "fetching"),
            (Event::Fetched, "reconstructing"),
            (Event::Reconstructed, "installing"),
            (Event::Installed { now_ms: 1_000 }, "probation"),
            (Event::Tick { now_ms: 5_000 }, "probation"),
            (Event::Tick { now_ms: 11_000 }, "committed"),
        ],
    );
    assert_eq!(fetched_kinds(&actions), vec![NEW.to_string()]);
    assert!(actions.contains(&Action::PersistCounter(counter())));
    assert!(actions.contains(&Action::Commit(job("digits", NEW))));
    assert!(reports(&actions).is_empty());
}

#[test]
fn happy_path_by_delta_from_held_model() {
    let mut m = Machine::default();
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![delta(DELTA, OLD), full(NEW)]), "fetching"),
            (Event::Fetched, "reconstructing"),
            (Event::Reconstructed, "installing"),
            (Event::Installed { now_ms: 1 }, "probation"),
            (
                Event::Tick {
                    now_ms: PROBATION + 1,
                },
                "committed",
            ),
        ],
    );
    assert_eq!(fetched_kinds(&actions), vec![DELTA.to_string()]);
}

#[test]
fn ignores_delta_from_a_base_the_device_does_not_hold() {
    let mut m = Machine::default();
    let other = "ff".repeat(32);
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![delta(DELTA, &other), full(NEW)]), "fetching"),
        ],
    );
    assert_eq!(fetched_kinds(&actions), vec![NEW.to_string()]);
}

#[test]
fn rejects_full_artifact_that_is_not_the_signed_target() {
    let mut m = Machine::default();
    let mut wrong = full(NEW);
    wrong.length = 999;
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![wrong, full(OLD)]), "failed"),
        ],
    );
    assert_eq!(reports(&actions), vec![FailureKind::Transfer]);
    assert_eq!(installs(&actions), 0);
}

#[test]
fn delta_reproducing_wrong_hash_falls_back_to_full_model() {
    let mut m = Machine::default();
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![delta(DELTA, OLD), full(NEW)]), "fetching"),
            (Event::Fetched, "reconstructing"),
            (
                Event::ReconstructFailed(fail(FailureKind::Delta)),
                "listing",
            ),
            // The server offers the same delta again: it is excluded now.
            (listed(vec![delta(DELTA, OLD), full(NEW)]), "fetching"),
            (Event::Fetched, "reconstructing"),
            (Event::Reconstructed, "installing"),
        ],
    );
    assert_eq!(
        fetched_kinds(&actions),
        vec![DELTA.to_string(), NEW.to_string()]
    );
    assert_eq!(reports(&actions), vec![FailureKind::Delta]);
    assert!(actions.contains(&Action::DiscardPartial {
        artifact: DELTA.into()
    }));
}

const ZSTD: &str = "00000000000000000000000000000000000000000000000000000000000000f1";

#[test]
fn compressed_full_model_that_does_not_decode_falls_back_to_raw_full_model() {
    let mut m = Machine::default();
    let other = "00000000000000000000000000000000000000000000000000000000000000b9";
    let offered = || listed(vec![delta(DELTA, other), full_zstd(ZSTD, 900), full(NEW)]);
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            // The delta's base is not held: the compressed full model is the smallest
            // usable artifact.
            (verified(vec![job("digits", NEW)]), "listing"),
            (offered(), "fetching"),
            (Event::Fetched, "reconstructing"),
            // A bomb, or a frame decoding to other bytes than the signed ones.
            (
                Event::ReconstructFailed(fail(FailureKind::Delta)),
                "listing",
            ),
            (offered(), "fetching"),
            (Event::Fetched, "reconstructing"),
            (Event::Reconstructed, "installing"),
        ],
    );
    assert_eq!(
        fetched_kinds(&actions),
        vec![ZSTD.to_string(), NEW.to_string()]
    );
    assert_eq!(reports(&actions), vec![FailureKind::Delta]);
    assert!(actions.contains(&Action::DiscardPartial {
        artifact: ZSTD.into()
    }));
}

#[test]
fn ignores_compressed_full_model_no_smaller_than_the_signed_length() {
    let mut m = Machine::default();
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![full_zstd(ZSTD, 1000), full(NEW)]), "fetching"),
        ],
    );
    assert_eq!(fetched_kinds(&actions), vec![NEW.to_string()]);
}

#[test]
fn tampered_chunk_is_refetched_once_then_fails_typed() {
    let mut m = Machine::default();
    let mut steps = vec![
        (Event::AssignmentReceived, "verifying"),
        (verified(vec![job("digits", NEW)]), "listing"),
        (listed(vec![full(NEW)]), "fetching"),
    ];
    for _ in 1..MAX_FETCH_ATTEMPTS {
        steps.push((Event::FetchFailed(fail(FailureKind::Hash)), "fetching"));
    }
    steps.push((Event::FetchFailed(fail(FailureKind::Hash)), "failed"));
    let actions = chain(&mut m, &steps);
    let refetch = Action::Fetch {
        artifact: full(NEW),
        resume: false,
    };
    assert!(actions.contains(&refetch), "refetched from zero");
    assert_eq!(reports(&actions), vec![FailureKind::Hash]);
    assert_eq!(installs(&actions), 0, "old model keeps serving");
}

#[test]
fn tampered_chunk_refetch_succeeds() {
    let mut m = Machine::default();
    chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![full(NEW)]), "fetching"),
            (Event::FetchFailed(fail(FailureKind::Hash)), "fetching"),
            (Event::Fetched, "reconstructing"),
            (Event::Reconstructed, "installing"),
        ],
    );
}

#[test]
fn rejected_assignments_are_reported_and_old_model_keeps_serving() {
    for kind in [
        FailureKind::Assignment, // expired, wrong device, replayed, counter reused
        FailureKind::Signature,  // director or metadata signature
        FailureKind::Transfer,   // metadata unavailable
    ] {
        let mut m = Machine::default();
        let actions = chain(
            &mut m,
            &[
                (Event::AssignmentReceived, "verifying"),
                (Event::AssignmentRejected(fail(kind)), "failed"),
                // A later assignment is considered again.
                (Event::AssignmentReceived, "verifying"),
            ],
        );
        assert_eq!(reports(&actions), vec![kind]);
        assert_eq!(installs(&actions), 0);
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::PersistCounter(_)))
        );
    }
}

#[test]
fn redelivered_assignment_changes_nothing() {
    let mut m = Machine::default();
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![]), "idle"),
        ],
    );
    assert_eq!(installs(&actions), 0);
}

#[test]
fn redelivered_assignment_keeps_the_committed_outcome() {
    let mut m = Machine::default();
    chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![full(NEW)]), "fetching"),
            (Event::Fetched, "reconstructing"),
            (Event::Reconstructed, "installing"),
            (Event::Installed { now_ms: 1 }, "probation"),
            (
                Event::Tick {
                    now_ms: PROBATION + 1,
                },
                "committed",
            ),
        ],
    );
    let committed = m.phase.clone();
    // The retained assignment again, at every reconnect: nothing to do, and the
    // machine still says what the last update did.
    for _ in 0..3 {
        let actions = chain(
            &mut m,
            &[
                (Event::AssignmentReceived, "verifying"),
                (verified(vec![]), "committed"),
            ],
        );
        assert_eq!(m.phase, committed);
        assert_eq!(m.outcome, None);
        assert_eq!(installs(&actions), 0);
        assert_eq!(reports(&actions), vec![]);
    }
    // A real new update still starts from there.
    chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", OLD)]), "listing"),
        ],
    );
    assert_eq!(m.outcome, None);
}

#[test]
fn redelivered_assignment_keeps_the_failure_and_its_reason() {
    let mut m = Machine::default();
    chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![full(NEW)]), "fetching"),
            (Event::Fetched, "reconstructing"),
            (Event::Reconstructed, "installing"),
            (Event::InstallFailed(fail(FailureKind::Gate)), "failed"),
        ],
    );
    let failed = m.phase.clone();
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![]), "failed"),
        ],
    );
    assert_eq!(m.phase, failed);
    assert_eq!(reports(&actions), vec![FailureKind::Gate]);
    // A rejected assignment is a new failure, and it replaces the old one.
    chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (
                Event::AssignmentRejected(fail(FailureKind::Signature)),
                "failed",
            ),
        ],
    );
    assert!(matches!(
        &m.phase,
        Phase::Failed { failure, job: None } if failure.kind == FailureKind::Signature
    ));
    assert_eq!(m.outcome, None);
}

#[test]
fn power_loss_while_verifying_a_redelivered_assignment_keeps_the_outcome() {
    let committed = Phase::Committed {
        job: job("digits", NEW),
    };
    let mut m = Machine {
        phase: committed.clone(),
        ..Machine::default()
    };
    m.step(Event::AssignmentReceived, PROBATION);
    let mut m: Machine = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(m.phase, Phase::Verifying);
    let actions = m.recover(&Facts::default(), 1);
    assert_eq!(m.phase, committed);
    assert!(!actions.contains(&Action::Verify));
}

#[test]
fn gate_and_budget_failures_fail_typed_without_activation() {
    for kind in [FailureKind::Gate, FailureKind::Budget, FailureKind::Disk] {
        let mut m = Machine::default();
        let actions = chain(
            &mut m,
            &[
                (Event::AssignmentReceived, "verifying"),
                (verified(vec![job("digits", NEW)]), "listing"),
                (listed(vec![full(NEW)]), "fetching"),
                (Event::Fetched, "reconstructing"),
                (Event::Reconstructed, "installing"),
                (Event::InstallFailed(fail(kind)), "failed"),
            ],
        );
        assert_eq!(reports(&actions), vec![kind]);
        assert!(!actions.iter().any(|a| matches!(a, Action::Commit(_))));
    }
}

#[test]
fn probation_failure_reverts_and_reports() {
    let mut m = Machine::default();
    let actions = chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (listed(vec![full(NEW)]), "fetching"),
            (Event::Fetched, "reconstructing"),
            (Event::Reconstructed, "installing"),
            (Event::Installed { now_ms: 100 }, "probation"),
            (
                Event::ProbationFailed(fail(FailureKind::Probation)),
                "reverting",
            ),
            (Event::Reverted, "failed"),
        ],
    );
    assert!(actions.contains(&Action::Revert(job("digits", NEW))));
    assert!(!actions.iter().any(|a| matches!(a, Action::Commit(_))));
    assert_eq!(reports(&actions), vec![FailureKind::Probation]);
}

#[test]
fn late_or_duplicated_outcomes_do_not_move_the_machine() {
    let mut m = Machine::default();
    for ev in [
        Event::Fetched,
        Event::Reconstructed,
        Event::Installed { now_ms: 5 },
        Event::Reverted,
        Event::Tick { now_ms: 1 << 40 },
        listed(vec![full(NEW)]),
    ] {
        assert!(m.step(ev, PROBATION).is_empty());
        assert_eq!(m.phase, Phase::Idle);
    }
    // An assignment arriving mid-update does not restart it.
    chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
            (Event::AssignmentReceived, "listing"),
            (Event::Fetched, "listing"),
        ],
    );
}

#[test]
fn multi_slot_assignment_runs_jobs_in_turn() {
    let mut m = Machine::default();
    chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("a", NEW), job("b", NEW)]), "listing"),
            (listed(vec![full(NEW)]), "fetching"),
            (Event::FetchFailed(fail(FailureKind::Transfer)), "listing"),
        ],
    );
    assert_eq!(m.phase.job().unwrap().slot, "b");
}

#[test]
fn stops_a_server_that_offers_endless_bad_deltas() {
    let mut m = Machine::default();
    chain(
        &mut m,
        &[
            (Event::AssignmentReceived, "verifying"),
            (verified(vec![job("digits", NEW)]), "listing"),
        ],
    );
    let mut failed = None;
    for i in 0..MAX_TRANSITIONS {
        let id = format!("{i:064x}");
        for ev in [
            listed(vec![delta(&id, OLD)]),
            Event::Fetched,
            Event::ReconstructFailed(fail(FailureKind::Delta)),
        ] {
            let actions = m.step(ev, PROBATION);
            if let Phase::Failed { failure, .. } = &m.phase {
                failed = Some((failure.kind, actions));
            }
        }
        if failed.is_some() {
            break;
        }
    }
    let (kind, actions) = failed.expect("the transition cap ends the loop");
    assert_eq!(kind, FailureKind::Loop);
    assert_eq!(reports(&actions), vec![FailureKind::Loop]);
}

/// Power loss in every state: persisted phase + what the store says -> recovered phase
/// and the action that resumes, cleans up or rolls back.
#[test]
fn power_loss_in_every_state_recovers() {
    let j = job("digits", NEW);
    let a = full(NEW);
    let failure = fail(FailureKind::Gate);
    let new_active = Facts {
        active_sha256: Some(NEW.into()),
    };
    let old_active = Facts {
        active_sha256: Some(OLD.into()),
    };
    type Check = fn(&[Action]) -> bool;
    let cases: Vec<(Phase, Facts, &str, Check)> = vec![
        (Phase::Idle, Facts::default(), "idle", |a| a.len() == 2),
        // Counter not persisted yet: the retained assignment is verified again.
        (Phase::Verifying, Facts::default(), "idle", |a| {
            !a.contains(&Action::Verify)
        }),
        (
            Phase::Listing { job: j.clone() },
            old_active.clone(),
            "listing",
            |a| a.iter().any(|x| matches!(x, Action::ListArtifacts(_))),
        ),
        (
            Phase::Fetching {
                job: j.clone(),
                artifact: a.clone(),
                received: 400,
                attempt: 1,
            },
            old_active.clone(),
            "fetching",
            |a| {
                a.iter()
                    .any(|x| matches!(x, Action::Fetch { resume: true, .. }))
            },
        ),
        (
            Phase::Reconstructing {
                job: j.clone(),
                artifact: a.clone(),
                attempt: 1,
            },
            old_active.clone(),
            "reconstructing",
            |a| a.iter().any(|x| matches!(x, Action::Reconstruct { .. })),
        ),
        // Activation had not committed: gate and activate again.
        (
            Phase::Installing { job: j.clone() },
            old_active.clone(),
            "installing",
            |a| a.iter().any(|x| matches!(x, Action::Install(_))),
        ),
        // Activation committed: probation.
        (
            Phase::Installing { job: j.clone() },
            new_active.clone(),
            "probation",
            |a| !a.iter().any(|x| matches!(x, Action::Install(_))),
        ),
        // A crash during probation counts against the candidate.
        (
            Phase::Probation {
                job: j.clone(),
                since_ms: 5,
            },
            new_active.clone(),
            "reverting",
            |a| a.iter().any(|x| matches!(x, Action::Revert(_))),
        ),
        (
            Phase::Probation {
                job: j.clone(),
                since_ms: 5,
            },
            old_active.clone(),
            "failed",
            |a| !a.iter().any(|x| matches!(x, Action::Revert(_))),
        ),
        (
            Phase::Reverting {
                job: j.clone(),
                reason: failure.clone(),
            },
            new_active.clone(),
            "reverting",
            |a| a.iter().any(|x| matches!(x, Action::Revert(_))),
        ),
        (
            Phase::Reverting {
                job: j.clone(),
                reason: failure.clone(),
            },
            old_active.clone(),
            "failed",
            |a| !a.iter().any(|x| matches!(x, Action::Revert(_))),
        ),
        (
            Phase::Committed { job: j.clone() },
            new_active,
            "committed",
            |a| a.len() == 2,
        ),
        (
            Phase::Failed {
                job: Some(j.clone()),
                failure,
            },
            old_active,
            "failed",
            |a| a.len() == 2,
        ),
    ];
    for (phase, facts, want, check) in cases {
        let m = Machine {
            phase: phase.clone(),
            ..Machine::default()
        };
        // Through the persisted form, as after a real restart.
        let mut m: Machine = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        let actions = m.recover(&facts, 1);
        assert_eq!(m.phase.name(), want, "after power loss in {}", phase.name());
        assert_eq!(actions.first(), Some(&Action::Persist));
        assert!(
            matches!(actions.last(), Some(Action::Report(_))),
            "{actions:?}"
        );
        assert!(check(&actions), "{}: {actions:?}", phase.name());
    }
}
