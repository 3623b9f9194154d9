//! The update machine: pure. Events in, actions out; no I/O, no clock reads (time comes
//! in events), no `.await`. The daemon ([`crate::update::daemon`]) persists the machine
//! (the first action of every transition is [`Action::Persist`]) and then performs the
//! other actions in order, feeding their outcomes back as events.
//!
//! The whole transition table is [`Machine::step`]; what to do after a crash or power
//! loss in each state is [`Machine::recover`]. `docs/update-machine.md` draws both.

use serde::{Deserialize, Serialize};

use outpost_protocol::delta::MAX_TARGET_LEN;
use outpost_protocol::director::CounterState;
use outpost_protocol::tuf::Hashes;
use outpost_protocol::wire::{Artifact, ArtifactKind};

/// Most state changes one update (one job) may take before it is failed as a loop.
pub const MAX_TRANSITIONS: u32 = 48;
/// Fetches of one artifact before a hash mismatch is final.
pub const MAX_FETCH_ATTEMPTS: u32 = 2;
/// Version of the persisted JSON form of [`Machine`].
pub const STATE_SCHEMA: u32 = 1;

/// Typed reason of a failed update, as reported to the server
/// ([`outpost_protocol::wire::FailureReport::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// Metadata or assignment signatures, TUF checks (rollback, freeze, mix-and-match).
    Signature,
    /// Bytes do not match the signed (or announced) hash.
    Hash,
    /// The validation gate refused the model (load, golden vectors).
    Gate,
    /// The model is over the release's latency or memory budget.
    Budget,
    /// The server could not deliver (timeouts, errors, no usable artifact).
    Transfer,
    /// A delta did not reproduce the signed target.
    Delta,
    /// The device's disk or database failed.
    Disk,
    /// The director assignment was refused (expired, wrong device, replayed, mismatch).
    Assignment,
    /// The model failed its probation and was reverted.
    Probation,
    /// The update exceeded [`MAX_TRANSITIONS`].
    Loop,
}

impl FailureKind {
    /// Wire name (`signature`, `hash`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Signature => "signature",
            FailureKind::Hash => "hash",
            FailureKind::Gate => "gate",
            FailureKind::Budget => "budget",
            FailureKind::Transfer => "transfer",
            FailureKind::Delta => "delta",
            FailureKind::Disk => "disk",
            FailureKind::Assignment => "assignment",
            FailureKind::Probation => "probation",
            FailureKind::Loop => "loop",
        }
    }
}

/// A typed failure with a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The reason.
    pub kind: FailureKind,
    /// Detail.
    pub message: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// One model slot to move to one verified target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Model slot.
    pub slot: String,
    /// Target path.
    pub path: String,
    /// Signed length.
    pub length: u64,
    /// Signed hashes (from the verified image repository).
    pub hashes: Hashes,
    /// Signed sha256 (hex), also the model's blob name.
    pub sha256: String,
    /// Release metadata JSON (the target's signed `custom`).
    pub release: String,
    /// Counter of the assignment that asked for it.
    pub counter: u64,
}

/// Where the machine stands. Serialized with a `state` tag; the tag is the name reported
/// in [`outpost_protocol::wire::UpdateProgress::state`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    /// Nothing to do.
    Idle,
    /// Refreshing metadata and verifying the latest assignment.
    Verifying,
    /// Asking the server which artifacts reconstruct the target.
    Listing {
        /// The update.
        job: Job,
    },
    /// Pulling an artifact in chunks (ranges persisted by the fetcher).
    Fetching {
        /// The update.
        job: Job,
        /// The artifact.
        artifact: Artifact,
        /// Bytes received (progress only; the fetcher's ranges are authoritative).
        received: u64,
        /// 1 for the first fetch of this artifact.
        attempt: u32,
    },
    /// Checking a full artifact or applying a delta, then checking the signed hash.
    Reconstructing {
        /// The update.
        job: Job,
        /// The artifact.
        artifact: Artifact,
        /// Fetch attempt that produced it.
        attempt: u32,
    },
    /// The verified model is in the store (pinned); validation gate, then atomic
    /// activation (one call of the agent facade).
    Installing {
        /// The update.
        job: Job,
    },
    /// Active; watched for errors until `since_ms + probation`.
    Probation {
        /// The update.
        job: Job,
        /// When probation started (the caller's clock, ms).
        since_ms: u64,
    },
    /// Going back to the previous model.
    Reverting {
        /// The update.
        job: Job,
        /// Why.
        reason: Failure,
    },
    /// The last update is committed.
    Committed {
        /// The update.
        job: Job,
    },
    /// The last update failed; the previous model serves.
    Failed {
        /// The update, if it got that far.
        job: Option<Job>,
        /// Why.
        failure: Failure,
    },
}

impl Phase {
    /// The persisted and reported name.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Verifying => "verifying",
            Phase::Listing { .. } => "listing",
            Phase::Fetching { .. } => "fetching",
            Phase::Reconstructing { .. } => "reconstructing",
            Phase::Installing { .. } => "installing",
            Phase::Probation { .. } => "probation",
            Phase::Reverting { .. } => "reverting",
            Phase::Committed { .. } => "committed",
            Phase::Failed { .. } => "failed",
        }
    }

    /// The update in progress or last finished.
    pub fn job(&self) -> Option<&Job> {
        match self {
            Phase::Idle | Phase::Verifying => None,
            Phase::Listing { job }
            | Phase::Fetching { job, .. }
            | Phase::Reconstructing { job, .. }
            | Phase::Installing { job }
            | Phase::Probation { job, .. }
            | Phase::Reverting { job, .. }
            | Phase::Committed { job } => Some(job),
            Phase::Failed { job, .. } => job.as_ref(),
        }
    }

    /// Whether a new assignment may start now (no update in flight).
    pub fn is_resting(&self) -> bool {
        matches!(
            self,
            Phase::Idle | Phase::Committed { .. } | Phase::Failed { .. }
        )
    }
}

/// What happened (outcomes of actions, messages, time).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A director assignment arrived (the shell keeps its bytes).
    AssignmentReceived,
    /// It verified; `jobs` are the slots whose active model differs from the assignment
    /// (empty for a redelivered assignment, which was acted on already).
    AssignmentVerified {
        /// Updates to run, in order.
        jobs: Vec<Job>,
        /// Counter state to persist now.
        counter: CounterState,
    },
    /// Metadata refresh or assignment verification failed.
    AssignmentRejected(Failure),
    /// The server's artifact list; `held` are sha256 of models the device holds.
    ArtifactsListed {
        /// Smallest first.
        artifacts: Vec<Artifact>,
        /// Possible delta bases.
        held: Vec<String>,
    },
    /// Bytes received so far.
    FetchProgress {
        /// Total received of the artifact.
        received: u64,
    },
    /// The artifact is complete and matched its announced sha256.
    Fetched,
    /// The fetch failed (hash of the artifact, transfer, disk).
    FetchFailed(Failure),
    /// The target is in the store, matching its signed length and hashes.
    Reconstructed,
    /// Reconstruction failed (delta, hash, disk).
    ReconstructFailed(Failure),
    /// Gate passed and the target is active.
    Installed {
        /// Now (the caller's clock, ms): probation starts.
        now_ms: u64,
    },
    /// Gate or budget refused it, or activation failed; the old model serves.
    InstallFailed(Failure),
    /// Time passes (the caller's clock, ms).
    Tick {
        /// Now.
        now_ms: u64,
    },
    /// The monitor saw the model misbehave during probation.
    ProbationFailed(Failure),
    /// The previous model is active again.
    Reverted,
    /// Reverting failed.
    RevertFailed(Failure),
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write the machine (schema-versioned) before anything else.
    Persist,
    /// Write the director counter state (in the same transaction as the next Persist).
    PersistCounter(CounterState),
    /// Refresh metadata and verify the latest assignment bytes.
    Verify,
    /// Ask for the artifacts of the job's target, offering held models as bases.
    ListArtifacts(Job),
    /// Fetch the artifact (resuming from persisted ranges when `resume`).
    Fetch {
        /// The artifact.
        artifact: Artifact,
        /// Keep what is already received.
        resume: bool,
    },
    /// Delete the partial file and ranges of an artifact.
    DiscardPartial {
        /// Artifact id.
        artifact: String,
    },
    /// Build the target from the artifact, check it, put it in the store (pinned).
    Reconstruct {
        /// The update.
        job: Job,
        /// The artifact.
        artifact: Artifact,
    },
    /// Gate and activate the stored target.
    Install(Job),
    /// Activate the previous model of the job's slot.
    Revert(Job),
    /// Probation passed: unpin, drop partials, collect garbage.
    Commit(Job),
    /// Publish the status (with this failure as the last error, if any).
    Report(Option<Failure>),
}

/// Facts the shell reads from disk before recovery (the store is crash-safe on its own).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Facts {
    /// sha256 of the active model of the job's slot.
    pub active_sha256: Option<String>,
}

/// The persisted machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Where it stands.
    pub phase: Phase,
    /// Updates waiting after the current one (multi-slot assignments).
    #[serde(default)]
    pub queue: Vec<Job>,
    /// Delta artifacts that failed for the current job (fetch the full model instead).
    #[serde(default)]
    pub excluded: Vec<String>,
    /// State changes of the current job.
    #[serde(default)]
    pub transitions: u32,
    /// While verifying: how the last update ended (committed or failed), restored when
    /// the assignment starts no update (a retained assignment redelivered at every
    /// reconnect), so the status keeps saying what the last update did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Phase>,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            phase: Phase::Idle,
            queue: Vec::new(),
            excluded: Vec::new(),
            transitions: 0,
            outcome: None,
        }
    }
}

impl Machine {
    /// The transition table: `(state, event) -> (state, actions)`. Pairs not listed are
    /// ignored (no state change, no action): late or duplicated outcomes of an earlier
    /// state must not move the machine. `probation_ms` is the probation window.
    pub fn step(&mut self, event: Event, probation_ms: u64) -> Vec<Action> {
        use Event as E;
        use Phase as P;
        let before = self.phase.name();
        let phase = std::mem::replace(&mut self.phase, P::Idle);
        let (next, mut actions) = match (phase, event) {
            // An assignment starts (or re-checks) only from a resting state; while an
            // update runs the shell holds the newest bytes until it rests.
            (p, E::AssignmentReceived) if p.is_resting() => {
                // A new update: the cap counts its own state changes only. Assignments
                // that need no job (redelivered at every reconnect) must not add up.
                self.transitions = 0;
                self.outcome = (!matches!(p, P::Idle)).then_some(p);
                (P::Verifying, vec![Action::Verify])
            }
            (P::Verifying, E::AssignmentVerified { jobs, counter }) => {
                self.queue = jobs;
                let mut actions = vec![Action::PersistCounter(counter)];
                let rest = self.outcome.take().unwrap_or(P::Idle);
                let (next, more) = self.next_job(rest);
                actions.extend(more);
                (next, actions)
            }
            (P::Verifying, E::AssignmentRejected(f)) => {
                self.outcome = None;
                fail(None, f)
            }
            (P::Listing { job }, E::ArtifactsListed { artifacts, held }) => {
                match choose(&job, &artifacts, &held, &self.excluded) {
                    Some(artifact) => (
                        P::Fetching {
                            job,
                            artifact: artifact.clone(),
                            received: 0,
                            attempt: 1,
                        },
                        vec![Action::Fetch {
                            artifact,
                            resume: true,
                        }],
                    ),
                    None => fail(
                        Some(job),
                        Failure::new(FailureKind::Transfer, "no usable artifact offered"),
                    ),
                }
            }
            (P::Listing { job }, E::FetchFailed(f)) => fail(Some(job), f),
            (
                P::Fetching {
                    job,
                    artifact,
                    attempt,
                    ..
                },
                E::FetchProgress { received },
            ) => {
                // Progress is not a state change: no Persist, only a report.
                self.phase = P::Fetching {
                    job,
                    artifact,
                    received,
                    attempt,
                };
                return vec![Action::Report(None)];
            }
            (
                P::Fetching {
                    job,
                    artifact,
                    attempt,
                    ..
                },
                E::Fetched,
            ) => (
                P::Reconstructing {
                    job: job.clone(),
                    artifact: artifact.clone(),
                    attempt,
                },
                vec![Action::Reconstruct { job, artifact }],
            ),
            (
                P::Fetching {
                    job,
                    artifact,
                    attempt,
                    ..
                },
                E::FetchFailed(f),
            )
            | (
                P::Reconstructing {
                    job,
                    artifact,
                    attempt,
                },
                E::ReconstructFailed(f),
            ) => self.bad_artifact(job, artifact, attempt, f),
            (P::Reconstructing { job, .. }, E::Reconstructed) => (
                P::Installing { job: job.clone() },
                vec![Action::Install(job)],
            ),
            (P::Installing { job }, E::Installed { now_ms }) => (
                P::Probation {
                    job,
                    since_ms: now_ms,
                },
                vec![],
            ),
            (P::Installing { job }, E::InstallFailed(f)) => fail(Some(job), f),
            (P::Probation { job, since_ms }, E::Tick { now_ms })
                if now_ms.saturating_sub(since_ms) >= probation_ms =>
            {
                (P::Committed { job: job.clone() }, vec![Action::Commit(job)])
            }
            (P::Probation { job, .. }, E::ProbationFailed(f)) => (
                P::Reverting {
                    job: job.clone(),
                    reason: f,
                },
                vec![Action::Revert(job)],
            ),
            (P::Reverting { job, reason }, E::Reverted) => fail(Some(job), reason),
            (P::Reverting { job, reason }, E::RevertFailed(f)) => fail(
                Some(job),
                Failure::new(
                    f.kind,
                    format!("{}; revert failed: {}", reason.message, f.message),
                ),
            ),
            (phase, _) => {
                self.phase = phase;
                return vec![];
            }
        };
        self.phase = next;
        if self.phase.name() != before || matches!(self.phase, P::Fetching { .. }) {
            self.transitions = self.transitions.saturating_add(1);
        }
        if self.transitions > MAX_TRANSITIONS && !self.phase.is_resting() {
            let job = self.phase.job().cloned();
            let (next, a) = fail(
                job,
                Failure::new(
                    FailureKind::Loop,
                    format!("more than {MAX_TRANSITIONS} transitions in one update"),
                ),
            );
            self.phase = next;
            actions = a;
        }
        let failure = match &self.phase {
            P::Failed { failure, .. } => Some(failure.clone()),
            _ => None,
        };
        // A failure or commit ends the job: start the next queued one, if any.
        if self.phase.is_resting() && !matches!(self.phase, P::Idle) && !self.queue.is_empty() {
            let rest = std::mem::replace(&mut self.phase, P::Idle);
            let (next, more) = self.next_job(rest);
            self.phase = next;
            actions.extend(more);
        }
        let mut out = vec![Action::Persist];
        out.extend(actions);
        out.push(Action::Report(failure));
        out
    }

    /// After a restart: one decision per persisted state (resume, clean up or roll back),
    /// given what the crash-safe store says. `now_ms` is the caller's clock.
    pub fn recover(&mut self, facts: &Facts, now_ms: u64) -> Vec<Action> {
        use Phase as P;
        let active_is = |job: &Job| facts.active_sha256.as_deref() == Some(job.sha256.as_str());
        let phase = std::mem::replace(&mut self.phase, P::Idle);
        let (next, actions) = match phase {
            // Nothing was in flight.
            P::Idle => (P::Idle, vec![]),
            // The counter was not persisted yet: the broker redelivers the retained
            // assignment at subscribe and it is verified afresh; until then the last
            // update's outcome stands.
            P::Verifying => (self.outcome.take().unwrap_or(P::Idle), vec![]),
            // Resume: the server is stateless; ask again.
            P::Listing { job } => (
                P::Listing { job: job.clone() },
                vec![Action::ListArtifacts(job)],
            ),
            // Resume: received ranges are on disk (fsynced before recorded); fetch the rest.
            P::Fetching {
                job,
                artifact,
                received,
                attempt,
            } => (
                P::Fetching {
                    job,
                    artifact: artifact.clone(),
                    received,
                    attempt,
                },
                vec![Action::Fetch {
                    artifact,
                    resume: true,
                }],
            ),
            // Redo: the artifact is complete on disk and reconstruction only writes the
            // store through its atomic, idempotent put.
            P::Reconstructing {
                job,
                artifact,
                attempt,
            } => (
                P::Reconstructing {
                    job: job.clone(),
                    artifact: artifact.clone(),
                    attempt,
                },
                vec![Action::Reconstruct { job, artifact }],
            ),
            // Activation is one store transaction: if it committed, probation starts now;
            // otherwise gate and activate again (the pinned blob is still stored).
            P::Installing { job } if active_is(&job) => (
                P::Probation {
                    job,
                    since_ms: now_ms,
                },
                vec![],
            ),
            P::Installing { job } => (
                P::Installing { job: job.clone() },
                vec![Action::Install(job)],
            ),
            // Roll back: the agent died while the candidate was on probation; a crash in
            // probation counts against the candidate.
            P::Probation { job, .. } if active_is(&job) => (
                P::Reverting {
                    job: job.clone(),
                    reason: Failure::new(
                        FailureKind::Probation,
                        "agent restarted during probation",
                    ),
                },
                vec![Action::Revert(job)],
            ),
            // Clean up: store recovery already dropped the candidate (its blob was lost).
            P::Probation { job, .. } => (
                P::Failed {
                    job: Some(job),
                    failure: Failure::new(
                        FailureKind::Probation,
                        "candidate lost across a restart during probation",
                    ),
                },
                vec![],
            ),
            // Roll back, again: the swap had not committed.
            P::Reverting { job, reason } if active_is(&job) => (
                P::Reverting {
                    job: job.clone(),
                    reason,
                },
                vec![Action::Revert(job)],
            ),
            // Clean up: the revert committed before the crash; only the report is left.
            P::Reverting { job, reason } => (
                P::Failed {
                    job: Some(job),
                    failure: reason,
                },
                vec![],
            ),
            // Resting: report again.
            P::Committed { job } => (P::Committed { job }, vec![]),
            // Resting: report again.
            P::Failed { job, failure } => (P::Failed { job, failure }, vec![]),
        };
        self.phase = next;
        let failure = match &self.phase {
            Phase::Failed { failure, .. } => Some(failure.clone()),
            _ => None,
        };
        let mut out = vec![Action::Persist];
        out.extend(actions);
        out.push(Action::Report(failure));
        out
    }

    fn next_job(&mut self, otherwise: Phase) -> (Phase, Vec<Action>) {
        if self.queue.is_empty() {
            return (otherwise, vec![]);
        }
        let job = self.queue.remove(0);
        self.excluded.clear();
        self.transitions = 0;
        (
            Phase::Listing { job: job.clone() },
            vec![Action::ListArtifacts(job)],
        )
    }

    /// A fetched artifact is bad: refetch it, fall back from a delta to the full model,
    /// or fail.
    fn bad_artifact(
        &mut self,
        job: Job,
        artifact: Artifact,
        attempt: u32,
        f: Failure,
    ) -> (Phase, Vec<Action>) {
        let discard = Action::DiscardPartial {
            artifact: artifact.id.clone(),
        };
        let derived = matches!(
            artifact.kind,
            ArtifactKind::Delta { .. } | ArtifactKind::FullZstd
        );
        match f.kind {
            FailureKind::Hash if attempt < MAX_FETCH_ATTEMPTS => (
                Phase::Fetching {
                    job,
                    artifact: artifact.clone(),
                    received: 0,
                    attempt: attempt + 1,
                },
                vec![
                    discard,
                    Action::Fetch {
                        artifact,
                        resume: false,
                    },
                ],
            ),
            // A delta or compressed full model that cannot give the signed bytes is
            // dropped for the next artifact, at worst the raw full model.
            FailureKind::Hash | FailureKind::Delta if derived => {
                self.excluded.push(artifact.id);
                (
                    Phase::Listing { job: job.clone() },
                    vec![discard, Action::Report(Some(f)), Action::ListArtifacts(job)],
                )
            }
            _ => {
                let (p, mut a) = fail(Some(job), f);
                a.insert(0, discard);
                (p, a)
            }
        }
    }
}

fn fail(job: Option<Job>, failure: Failure) -> (Phase, Vec<Action>) {
    (Phase::Failed { job, failure }, vec![])
}

/// The smallest usable artifact: a full file must be the signed target itself (id =
/// signed sha256, length = signed length); a compressed full file must be smaller than
/// the signed length; a delta must start from a model the device holds and be no
/// larger than the codec's cap.
fn choose(
    job: &Job,
    artifacts: &[Artifact],
    held: &[String],
    excluded: &[String],
) -> Option<Artifact> {
    artifacts
        .iter()
        .filter(|a| !excluded.contains(&a.id))
        .filter(|a| match &a.kind {
            ArtifactKind::Full => a.id.eq_ignore_ascii_case(&job.sha256) && a.length == job.length,
            ArtifactKind::FullZstd => a.length < job.length,
            ArtifactKind::Delta { base } => {
                held.iter().any(|h| h.eq_ignore_ascii_case(base)) && a.length <= MAX_TARGET_LEN
            }
            _ => false,
        })
        .min_by_key(|a| a.length)
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivered_assignments_do_not_exhaust_the_transition_cap() {
        let counter = CounterState {
            counter: 1,
            digest: [0; 32],
        };
        let mut m = Machine::default();
        // A retained assignment comes again at every reconnect and needs no job.
        for _ in 0..=MAX_TRANSITIONS {
            m.step(Event::AssignmentReceived, 1000);
            m.step(
                Event::AssignmentVerified {
                    jobs: vec![],
                    counter,
                },
                1000,
            );
            assert_eq!(m.phase, Phase::Idle, "after {} transitions", m.transitions);
        }
        m.step(Event::AssignmentReceived, 1000);
        assert_eq!(m.phase, Phase::Verifying);
    }
}
