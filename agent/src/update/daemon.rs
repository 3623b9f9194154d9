//! The thin async shell around the [`Machine`]: `outpost-agent run`.
//!
//! One `select!` loop owns the machine, the agent and the link. Each transition's actions
//! run in order: [`Action::Persist`] synchronously (nothing else happens if it fails),
//! then the side effects, as tasks whose outcomes come back as machine events. Blocking
//! work (TUF refresh over the link, reconstruction, the validation gate) runs on
//! `spawn_blocking`. A transfer that fails while the link is down is not a failure: the
//! action is repeated after the next CONNACK.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use outpost_protocol::bundle::AgentConfig as Bundle;
use outpost_protocol::delta;
use outpost_protocol::director::{DirectorError, verify_assignment};
use outpost_protocol::release::ModelRelease;
use outpost_protocol::tuf::{
    self, FetchError, MetadataStore, Remote, TargetFile, TargetHasher, Updater, UpdaterConfig,
    UtcTime,
};
use outpost_protocol::wire::metadata::{MetadataError, MetadataFetch};
use outpost_protocol::wire::{
    self, Artifact, ArtifactKind, ArtifactList, FailureReport, RequestBody, SlotStatus, Status,
    StatusReport, UpdateProgress,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::machine::{Action, Event, Facts, Failure, FailureKind as K, Job, Machine, Phase};
use super::persist::UpdateDb;
use crate::agent::{Agent, AgentConfig, AgentError};
use crate::gate::GateError;
use crate::link::{Inbound, Link, LinkConfig};
use crate::monitor::window::WindowConfig;
use crate::store::BlobHash;

const META_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers for another range than asked tolerated in one metadata fetch.
const META_ATTEMPTS: u32 = 4;
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK_ATTEMPTS: u32 = 4;
const TELEMETRY_RESEND: Duration = Duration::from_secs(30);
const BATCH_RECORDS: usize = 256;
const BATCH_BYTES: u64 = 96 * 1024;

/// Options of `outpost-agent run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `agent.toml`.
    pub config: PathBuf,
    /// Chunk length to request (at most [`wire::CHUNK_LEN`]).
    pub chunk_len: u32,
}

/// Reads `agent.toml`, returning it and its directory.
pub fn load_bundle(path: &Path) -> anyhow::Result<(Bundle, PathBuf)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = Bundle::from_toml(&text)?;
    let dir = path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((cfg, dir))
}

/// The persisted update state as JSON, read without taking the data directory lock
/// (`outpost-agent status`).
pub fn status_json(config: &Path) -> anyhow::Result<serde_json::Value> {
    let (cfg, dir) = load_bundle(config)?;
    let data = Bundle::resolve(&dir, &cfg.data_dir);
    if !data.join("update.db").exists() {
        return Ok(serde_json::json!({"device_id": cfg.device_id, "state": {"state": "idle"}}));
    }
    let db = UpdateDb::open_read_only(&data)?;
    let m = db.load_machine()?;
    Ok(serde_json::json!({
        "device_id": cfg.device_id,
        "state": m.phase,
        "queue": m.queue.len(),
        "transitions": m.transitions,
        "assignment_counter": db.counter()?.map(|c| c.counter),
        "bytes_received": db.bytes_received()?,
        "time_floor": db.time_floor()?,
    }))
}

/// Outcome of a side effect: the event, and the action to repeat after the next
/// CONNACK if it failed for lack of a connection.
type Outcome = (Option<Action>, Event);

/// What [`run_with`] reports to its observer, on the thread driving the daemon's
/// future, after the transition was persisted.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum UpdateEvent {
    /// The update machine entered `phase` (reported once per change of phase or slot;
    /// on start, the recovered phase).
    Phase(Phase),
    /// `done` of `total` bytes of the artifact fetched for `slot`. Reported on entering
    /// [`Phase::Fetching`], as chunks arrive (at most twice a second), and with
    /// `done == total` once the artifact is complete.
    Progress {
        /// The model slot.
        slot: String,
        /// Bytes held.
        done: u64,
        /// Artifact length.
        total: u64,
    },
}

/// Options of [`run_with`]: the fleet link of an agent the caller opened itself (the C
/// SDK).
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// The parsed `agent.toml` (its `data_dir` is ignored: the agent's is used).
    pub bundle: Bundle,
    /// Directory that relative paths in the bundle (trust root, password file) resolve
    /// against.
    pub base_dir: PathBuf,
    /// The agent's data directory (the update state lives in `update.db` there).
    pub data_dir: PathBuf,
    /// Chunk length to request (at most [`wire::CHUNK_LEN`]).
    pub chunk_len: u32,
}

type Observer = Box<dyn Fn(&UpdateEvent) + Send + Sync>;

struct Daemon {
    bundle: Bundle,
    agent: Arc<Agent>,
    db: Arc<UpdateDb>,
    link: Arc<Link>,
    machine: Machine,
    probation_ms: u64,
    chunk_len: u32,
    origin: Instant,
    assignment: Option<Vec<u8>>,
    assignment_waiting: bool,
    last_error: Option<Failure>,
    probation_base: Option<(u64, u64)>,
    retry_on_connect: Vec<Action>,
    telemetry_inflight: Option<(u64, Instant)>,
    work_tx: mpsc::UnboundedSender<Outcome>,
    observer: Option<Observer>,
    observed_phase: Option<(&'static str, Option<String>)>,
    observed_progress: Option<(String, u64, u64)>,
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with_agent(opts, shutdown, |_| {}).await
}

/// [`run`], handing the agent to `on_open` once its data directory is open (the
/// binary's simulated app traffic uses it from a thread of its own).
pub async fn run_with_agent(
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
    on_open: impl FnOnce(&Arc<Agent>),
) -> anyhow::Result<()> {
    let (bundle, dir) = load_bundle(&opts.config)?;
    let data = Bundle::resolve(&dir, &bundle.data_dir);
    let mut acfg = AgentConfig::new(&data, &bundle.device_id);
    acfg.window = WindowConfig {
        max_duration_ms: u64::from(bundle.telemetry.window_secs) * 1000,
        max_count: u64::from(bundle.telemetry.window_count),
        ..WindowConfig::default()
    };
    acfg.consent = bundle.telemetry.consent;
    acfg.outbox.max_total_bytes = bundle.telemetry.outbox_max_bytes;
    let agent = tokio::task::spawn_blocking(move || Agent::open(acfg))
        .await?
        .context("opening the data directory")?;
    let agent = Arc::new(agent);
    on_open(&agent);
    drive(
        bundle,
        &dir,
        &data,
        agent,
        opts.chunk_len,
        None,
        shutdown,
        true,
    )
    .await
}

/// The daemon over an agent the caller opened and keeps using (inference, local
/// installs) while it runs: the C SDK's fleet link. `observer` sees every update
/// phase and fetch progress ([`UpdateEvent`]) synchronously on the thread polling this
/// future; it must return quickly. Runs until `shutdown` resolves, then disconnects; the
/// agent is left open (its windows are not flushed). Blocking steps (metadata refresh,
/// reconstruction, the validation gate) run on the runtime's blocking pool, and the link
/// spawns its event loop on the current runtime, which needs its I/O and time drivers.
pub async fn run_with(
    opts: EmbedOptions,
    agent: Arc<Agent>,
    observer: impl Fn(&UpdateEvent) + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    drive(
        opts.bundle,
        &opts.base_dir,
        &opts.data_dir,
        agent,
        opts.chunk_len,
        Some(Box::new(observer)),
        shutdown,
        false,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    bundle: Bundle,
    dir: &Path,
    data: &Path,
    agent: Arc<Agent>,
    chunk_len: u32,
    observer: Option<Observer>,
    shutdown: impl std::future::Future<Output = ()>,
    close_agent: bool,
) -> anyhow::Result<()> {
    let db = Arc::new(UpdateDb::open(data)?);
    let mut meta = db.metadata_store();
    if meta.load("root").is_none() {
        let root_path = Bundle::resolve(dir, &bundle.trust.root);
        let root = std::fs::read(&root_path)
            .with_context(|| format!("reading the trust anchor {}", root_path.display()))?;
        meta.save("root", &root)
            .map_err(|e| anyhow::anyhow!("saving the trust anchor: {e}"))?;
    }
    let (host, port, _) = bundle.broker_endpoint();
    let pw_path = Bundle::resolve(dir, &bundle.broker.password_file);
    let password = std::fs::read_to_string(&pw_path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
        .unwrap_or_default();
    let (link, mut inbound) = Link::start(&LinkConfig {
        device_id: bundle.device_id.clone(),
        host,
        port,
        username: bundle.broker.username(&bundle.device_id).to_owned(),
        password,
        keep_alive: Duration::from_secs(u64::from(bundle.broker.keep_alive_secs)),
        max_backoff: Duration::from_secs(u64::from(bundle.broker.max_backoff_secs)),
        tls: crate::link::tls_settings(&bundle, dir),
    })?;
    let (work_tx, mut work_rx) = mpsc::unbounded_channel();
    let machine = db.load_machine()?;
    let mut d = Daemon {
        probation_ms: u64::from(bundle.update.probation_secs) * 1000,
        bundle,
        agent,
        db,
        link,
        machine,
        chunk_len: chunk_len.clamp(1, wire::CHUNK_LEN),
        origin: Instant::now(),
        assignment: None,
        assignment_waiting: false,
        last_error: None,
        probation_base: None,
        retry_on_connect: Vec::new(),
        telemetry_inflight: None,
        work_tx,
        observer,
        observed_phase: None,
        observed_progress: None,
    };
    d.recover()?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let upload_every = Duration::from_secs(u64::from(d.bundle.telemetry.upload_secs.max(1)));
    let mut upload = tokio::time::interval(upload_every);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            msg = inbound.recv() => match msg {
                Some(m) => d.on_inbound(m).await?,
                None => bail!("MQTT event loop stopped"),
            },
            Some((retry, ev)) = work_rx.recv() => d.on_outcome(retry, ev)?,
            _ = tick.tick() => d.on_tick()?,
            _ = upload.tick() => d.upload().await,
        }
    }
    if close_agent {
        let agent = d.agent.clone();
        let _ = tokio::task::spawn_blocking(move || agent.close()).await;
    }
    d.link.disconnect().await;
    Ok(())
}

impl Daemon {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    fn recover(&mut self) -> anyhow::Result<()> {
        let active_sha256 = match self.machine.phase.job() {
            Some(job) => self
                .agent
                .store()
                .active(&job.slot)?
                .map(|e| e.hash.to_hex()),
            None => None,
        };
        let now = self.now_ms();
        let actions = self.machine.recover(&Facts { active_sha256 }, now);
        self.apply(actions)
    }

    fn feed(&mut self, ev: Event) -> anyhow::Result<()> {
        let actions = self.machine.step(ev, self.probation_ms);
        self.apply(actions)
    }

    fn apply(&mut self, actions: Vec<Action>) -> anyhow::Result<()> {
        let counter = actions.iter().find_map(|a| match a {
            Action::PersistCounter(c) => Some(*c),
            _ => None,
        });
        for action in actions {
            self.perform(action, counter.as_ref())?;
        }
        self.notify();
        if self.machine.phase.is_resting() && self.assignment_waiting {
            self.assignment_waiting = false;
            self.feed(Event::AssignmentReceived)?;
        }
        Ok(())
    }

    /// Reports a changed phase or fetch progress to the observer (after the actions of
    /// the transition ran, so after it was persisted).
    fn notify(&mut self) {
        let Some(observer) = &self.observer else {
            return;
        };
        let phase = &self.machine.phase;
        let key = (phase.name(), phase.job().map(|j| j.slot.clone()));
        let changed = self.observed_phase.as_ref() != Some(&key);
        let progress = match phase {
            Phase::Fetching {
                job,
                artifact,
                received,
                ..
            } => Some((
                job.slot.clone(),
                (*received).min(artifact.length),
                artifact.length,
            )),
            Phase::Reconstructing { job, artifact, .. } => {
                Some((job.slot.clone(), artifact.length, artifact.length))
            }
            _ => None,
        };
        // A completed fetch reports its last bytes before the phase that consumes them.
        let progress_first = matches!(phase, Phase::Reconstructing { .. });
        let report_progress = |seen: &mut Option<(String, u64, u64)>| {
            if let Some(p) = progress.clone()
                && seen.as_ref() != Some(&p)
            {
                observer(&UpdateEvent::Progress {
                    slot: p.0.clone(),
                    done: p.1,
                    total: p.2,
                });
                *seen = Some(p);
            }
        };
        if progress_first {
            report_progress(&mut self.observed_progress);
        }
        if changed {
            observer(&UpdateEvent::Phase(phase.clone()));
            self.observed_phase = Some(key);
        }
        if !progress_first {
            report_progress(&mut self.observed_progress);
        }
    }

    fn perform(
        &mut self,
        action: Action,
        counter: Option<&outpost_protocol::director::CounterState>,
    ) -> anyhow::Result<()> {
        match action {
            // Persist before acting: a failure here stops the daemon before any effect.
            Action::Persist => self
                .db
                .save_machine(&self.machine, counter)
                .context("persisting the update state")?,
            Action::PersistCounter(_) => {}
            Action::Verify => {
                let Some(bytes) = self.assignment.clone() else {
                    return Ok(());
                };
                let (link, db, agent) = (self.link.clone(), self.db.clone(), self.agent.clone());
                let device = self.bundle.device_id.clone();
                let handle = tokio::runtime::Handle::current();
                let tx = self.work_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let ev = verify(&link, &handle, &db, &agent, &device, &bytes);
                    let _ = tx.send((Some(Action::Verify), ev));
                });
            }
            Action::ListArtifacts(job) => {
                let (link, tx) = (self.link.clone(), self.work_tx.clone());
                let held = held_models(&self.agent);
                tokio::spawn(async move {
                    let ev = list_artifacts(&link, &job, held).await;
                    let _ = tx.send((Some(Action::ListArtifacts(job)), ev));
                });
            }
            Action::Fetch { artifact, resume } => {
                if !resume {
                    self.db.discard_partial(&artifact.id)?;
                }
                let f = Fetcher {
                    link: self.link.clone(),
                    db: self.db.clone(),
                    chunk_len: self.chunk_len,
                    window: self.bundle.update.chunk_window.max(1) as usize,
                    tx: self.work_tx.clone(),
                };
                tokio::spawn(async move {
                    let ev = f.run(&artifact).await;
                    let retry = Action::Fetch {
                        artifact,
                        resume: true,
                    };
                    let _ = f.tx.send((Some(retry), ev));
                });
            }
            Action::DiscardPartial { artifact } => {
                if let Err(e) = self.db.discard_partial(&artifact) {
                    warn(&format!("discarding partial {artifact}: {e}"));
                }
            }
            Action::Reconstruct { job, artifact } => {
                let (db, agent, tx) = (self.db.clone(), self.agent.clone(), self.work_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let ev = reconstruct(&db, &agent, &job, &artifact);
                    let _ = tx.send((None, ev));
                });
            }
            Action::Install(job) => {
                self.probation_base = None;
                let (db, agent, tx) = (self.db.clone(), self.agent.clone(), self.work_tx.clone());
                let origin = self.origin;
                tokio::task::spawn_blocking(move || {
                    let ev = install(&db, &agent, &job, origin);
                    let _ = tx.send((None, ev));
                });
            }
            Action::Revert(job) => {
                let (agent, tx) = (self.agent.clone(), self.work_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let ev = match agent.revert(&job.slot) {
                        Ok(_) => Event::Reverted,
                        Err(e) => Event::RevertFailed(Failure::new(K::Disk, e.to_string())),
                    };
                    let _ = tx.send((None, ev));
                });
            }
            Action::Commit(job) => {
                if let Ok(h) = job.sha256.parse::<BlobHash>() {
                    let _ = self.agent.store().unpin(&h);
                }
                let _ = self.db.discard_partials_except(None);
                let _ = self.agent.store().gc();
            }
            Action::Report(f) => {
                if f.is_some() {
                    self.last_error = f;
                }
                self.publish_status();
            }
        }
        Ok(())
    }

    async fn on_inbound(&mut self, msg: Inbound) -> anyhow::Result<()> {
        match msg {
            Inbound::Connected => {
                self.publish_status();
                for action in std::mem::take(&mut self.retry_on_connect) {
                    self.perform(action, None)?;
                }
                self.telemetry_inflight = None;
                self.upload().await;
            }
            Inbound::Disconnected(why) => warn(&format!("disconnected: {why}")),
            Inbound::Assignment(bytes) => {
                if bytes.is_empty() {
                    return Ok(());
                }
                self.assignment = Some(bytes);
                if self.machine.phase.is_resting() {
                    self.feed(Event::AssignmentReceived)?;
                } else {
                    self.assignment_waiting = true;
                }
            }
            Inbound::TelemetryAck(ack) => {
                match self.agent.outbox().ack(ack.acked) {
                    Ok(_) => {}
                    Err(e) => warn(&format!("telemetry ack {}: {e}", ack.acked)),
                }
                if let Some((covers_to, _)) = self.telemetry_inflight
                    && ack.acked >= covers_to
                {
                    self.telemetry_inflight = None;
                    self.upload().await;
                }
            }
        }
        Ok(())
    }

    fn on_outcome(&mut self, retry: Option<Action>, ev: Event) -> anyhow::Result<()> {
        let transfer_failed = matches!(
            &ev,
            Event::FetchFailed(f) | Event::AssignmentRejected(f) if f.kind == K::Transfer
        );
        if transfer_failed
            && !self.link.is_connected()
            && let Some(action) = retry
        {
            // Not a failure: the link is down. Try again after the next CONNACK.
            self.retry_on_connect.push(action);
            return Ok(());
        }
        self.feed(ev)
    }

    fn on_tick(&mut self) -> anyhow::Result<()> {
        if let Err(e) = self.agent.tick(Instant::now()) {
            warn(&format!("tick: {e}"));
        }
        if let Phase::Probation { job, .. } = &self.machine.phase {
            let job = job.clone();
            if let Some(f) = self.probation_check(&job) {
                return self.feed(Event::ProbationFailed(f));
            }
        }
        let now_ms = self.now_ms();
        self.feed(Event::Tick { now_ms })
    }

    /// The candidate must stay active and loaded, and fail at most a fifth of its calls
    /// (three failures at least) during probation.
    fn probation_check(&mut self, job: &Job) -> Option<Failure> {
        let status = self.agent.status().ok()?;
        let Some(s) = status.iter().find(|s| s.model == job.slot) else {
            return Some(Failure::new(K::Probation, "the model slot disappeared"));
        };
        if s.active.sha256 != job.sha256 || s.exec_path.is_none() {
            return Some(Failure::new(K::Probation, "the candidate is not serving"));
        }
        let (inf0, err0) = *self
            .probation_base
            .get_or_insert((s.counts.inferences, s.counts.errors));
        let inf = s.counts.inferences.saturating_sub(inf0);
        let err = s.counts.errors.saturating_sub(err0);
        (err >= 3 && err * 5 >= inf + err).then(|| {
            Failure::new(
                K::Probation,
                format!("{err} errors in {} calls during probation", inf + err),
            )
        })
    }

    fn publish_status(&self) {
        let report = match self.status_report() {
            Ok(r) => r,
            Err(e) => {
                warn(&format!("status: {e}"));
                return;
            }
        };
        let link = self.link.clone();
        tokio::spawn(async move {
            if let Err(e) = link.publish_status(&report).await {
                warn(&format!("publishing status: {e}"));
            }
        });
    }

    fn status_report(&self) -> anyhow::Result<StatusReport> {
        let mut models = BTreeMap::new();
        for s in self.agent.status()? {
            models.insert(
                s.model.clone(),
                SlotStatus {
                    active: self.db.slot_target(&s.model, &s.active.sha256)?,
                    active_sha256: Some(s.active.sha256.clone()),
                    version: Some(s.active.version.clone()),
                    previous: s
                        .previous
                        .as_ref()
                        .and_then(|p| self.db.slot_target(&s.model, &p.sha256).ok().flatten()),
                    exec_path: s
                        .exec_path
                        .map(|p| format!("{}: {}", p.as_str(), s.path_reason)),
                },
            );
        }
        // Checking an assignment is not an update yet: until it starts one, the last
        // update's outcome is what the device reports.
        let phase = match (&self.machine.phase, &self.machine.outcome) {
            (Phase::Verifying, Some(outcome)) => outcome,
            (phase, _) => phase,
        };
        let update = phase.job().map(|job| {
            let (done, total, kind) = match phase {
                Phase::Fetching {
                    artifact, received, ..
                } => (*received, artifact.length, Some(kind_name(artifact))),
                Phase::Reconstructing { artifact, .. } => {
                    (artifact.length, artifact.length, Some(kind_name(artifact)))
                }
                _ => (0, 0, None),
            };
            UpdateProgress {
                slot: job.slot.clone(),
                target: job.path.clone(),
                state: phase.name().into(),
                bytes_done: done,
                bytes_total: total,
                artifact: kind.map(str::to_owned),
            }
        });
        let last = match phase {
            Phase::Failed { failure, .. } => Some(failure.clone()),
            _ => self.last_error.clone(),
        };
        Ok(StatusReport {
            device_id: self.bundle.device_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            seq: self.db.bump("status_seq", 1)?,
            models,
            assignment_counter: self.db.counter()?.map(|c| c.counter),
            update,
            last_error: last.map(|f| FailureReport {
                kind: f.kind.as_str().into(),
                target: phase.job().map(|j| j.path.clone()),
                message: f.message,
            }),
            bytes_received: self.db.bytes_received()?,
        })
    }

    /// Sends the next telemetry batch unless one is awaiting its ack. Cancel-safe (the
    /// batch is re-read from the outbox next time).
    async fn upload(&mut self) {
        if !self.link.is_connected() {
            return;
        }
        if let Some((_, sent)) = self.telemetry_inflight
            && sent.elapsed() < TELEMETRY_RESEND
        {
            return;
        }
        let batch = match self.agent.outbox().read_batch(BATCH_RECORDS, BATCH_BYTES) {
            Ok(b) => b,
            Err(e) => {
                warn(&format!("reading the outbox: {e}"));
                return;
            }
        };
        if batch.records.is_empty() && batch.covers_to == batch.after_seq {
            return;
        }
        let out = batch.to_wire(&self.bundle.device_id);
        match self.link.publish_telemetry(&out).await {
            Ok(()) => self.telemetry_inflight = Some((out.covers_to, Instant::now())),
            Err(e) => warn(&format!("telemetry upload: {e}")),
        }
    }
}

fn kind_name(a: &Artifact) -> &'static str {
    match a.kind {
        ArtifactKind::Delta { .. } => "delta",
        ArtifactKind::FullZstd => "full_zstd",
        _ => "full",
    }
}

fn warn(msg: &str) {
    eprintln!("outpost-agent: {msg}");
}

/// sha256 of every model the device holds (active and previous): delta bases.
fn held_models(agent: &Agent) -> Vec<String> {
    let mut out = Vec::new();
    for slot in agent.store().slots().unwrap_or_default() {
        out.push(slot.active.hash.to_hex());
        if let Some(p) = slot.previous {
            out.push(p.hash.to_hex());
        }
    }
    out
}

/// TUF metadata over the link, for an [`Updater`] on a blocking thread.
struct LinkRemote<'a> {
    link: &'a Link,
    handle: &'a tokio::runtime::Handle,
    db: &'a UpdateDb,
}

impl Remote for LinkRemote<'_> {
    /// Fetches the file in ranges of [`wire::CHUNK_LEN`], zstd-compressed when the
    /// server finds that smaller ([`MetadataFetch`]): the encoded total and the decoded
    /// file are both capped at `max_len`, a file that changes mid-fetch is fetched again
    /// from its first byte, and a range that does not match its request is asked again
    /// (at most [`META_ATTEMPTS`] times). `bytes.metadata` counts every body byte
    /// received.
    fn fetch_metadata(
        &mut self,
        role: &str,
        version: Option<u64>,
        max_len: u64,
    ) -> Result<Vec<u8>, FetchError> {
        let mut fetch = MetadataFetch::new(role, version, max_len, wire::CHUNK_LEN, true);
        let mut mismatches = 0;
        let result = loop {
            let resp = match self
                .handle
                .block_on(self.link.call(fetch.request(), META_TIMEOUT, 3))
            {
                Ok(r) => r,
                Err(e) => break Err(FetchError::Transport(e.to_string())),
            };
            match fetch.accept(&resp) {
                Ok(Some(bytes)) => break Ok(bytes),
                Ok(None) => {}
                Err(MetadataError::Mismatch(_)) if mismatches < META_ATTEMPTS => {
                    mismatches += 1;
                }
                Err(MetadataError::NotFound) => break Err(FetchError::NotFound),
                Err(MetadataError::TooLarge { .. }) => {
                    break Err(FetchError::TooLarge { max: max_len });
                }
                Err(e) => break Err(FetchError::Transport(e.to_string())),
            }
        };
        let _ = self.db.bump("bytes.metadata", fetch.wire_bytes());
        result
    }

    fn fetch_target(&mut self, _path: &str, _max_len: u64) -> Result<Vec<u8>, FetchError> {
        Err(FetchError::Transport(
            "targets are fetched as artifacts in chunks".into(),
        ))
    }
}

fn tuf_failure(e: &tuf::Error) -> Failure {
    match e {
        tuf::Error::Fetch { .. } => Failure::new(K::Transfer, e.to_string()),
        tuf::Error::Store { .. } => Failure::new(K::Disk, e.to_string()),
        _ => Failure::new(K::Signature, e.to_string()),
    }
}

/// Refreshes the image repository metadata (one updater at one trusted time), verifies
/// the assignment, and lists the slots whose active model differs.
fn verify(
    link: &Link,
    handle: &tokio::runtime::Handle,
    db: &UpdateDb,
    agent: &Agent,
    device: &str,
    bytes: &[u8],
) -> Event {
    match verify_inner(link, handle, db, agent, device, bytes) {
        Ok(ev) => ev,
        Err(f) => Event::AssignmentRejected(f),
    }
}

fn verify_inner(
    link: &Link,
    handle: &tokio::runtime::Handle,
    db: &UpdateDb,
    agent: &Agent,
    device: &str,
    bytes: &[u8],
) -> Result<Event, Failure> {
    let disk = |e: &dyn std::fmt::Display| Failure::new(K::Disk, e.to_string());
    // Time is an input: never below the newest time already trusted (devices without
    // a real-time clock boot in 1970).
    let floor = db.time_floor().map_err(|e| disk(&e))?;
    let now = UtcTime::from_unix(
        UtcTime::from_system_time(SystemTime::now())
            .unix()
            .max(floor),
    );
    let remote = LinkRemote { link, handle, db };
    let mut updater = Updater::new(remote, db.metadata_store(), UpdaterConfig::default(), now)
        .map_err(|e| tuf_failure(&e))?;
    updater.refresh().map_err(|e| tuf_failure(&e))?;
    let root = updater.trusted_set().root().clone();
    let last = db.counter().map_err(|e| disk(&e))?;
    let accepted = verify_assignment(
        bytes,
        &root,
        &mut |p| updater.get_target_info(p),
        device,
        last.as_ref(),
        now,
    )
    .map_err(|e| match &e {
        DirectorError::Metadata(tuf::Error::ThresholdNotMet { .. })
        | DirectorError::Metadata(tuf::Error::DuplicateSignature { .. }) => {
            Failure::new(K::Signature, e.to_string())
        }
        DirectorError::Lookup { source, .. } => tuf_failure(source),
        _ => Failure::new(K::Assignment, e.to_string()),
    })?;
    db.raise_time_floor(now.unix()).map_err(|e| disk(&e))?;
    let mut jobs = Vec::new();
    // A redelivery or a renewal repeats targets this device has acted on already.
    if !accepted.redelivered && !accepted.renewal {
        for (slot, want) in &accepted.assignment.targets {
            let info = updater
                .get_target_info(&want.path)
                .map_err(|e| tuf_failure(&e))?
                .ok_or_else(|| Failure::new(K::Assignment, format!("{} vanished", want.path)))?;
            let sha256 = info
                .file
                .hashes
                .get("sha256")
                .cloned()
                .ok_or_else(|| Failure::new(K::Hash, "target has no sha256"))?
                .to_ascii_lowercase();
            let release = info
                .file
                .custom
                .as_ref()
                .ok_or_else(|| Failure::new(K::Assignment, "target has no release metadata"))
                .and_then(|c| {
                    ModelRelease::from_value(c)
                        .map_err(|e| Failure::new(K::Assignment, e.to_string()))
                })?;
            if &release.model != slot {
                return Err(Failure::new(
                    K::Assignment,
                    format!("slot {slot:?} names a release of model {:?}", release.model),
                ));
            }
            let active = agent
                .store()
                .active(slot)
                .map_err(|e| disk(&e))?
                .map(|e| e.hash.to_hex());
            if active.as_deref() == Some(sha256.as_str()) {
                continue;
            }
            jobs.push(Job {
                slot: slot.clone(),
                path: want.path.clone(),
                length: info.file.length,
                hashes: info.file.hashes.clone(),
                sha256,
                release: serde_json::to_string(&release).unwrap_or_default(),
                counter: accepted.assignment.counter,
            });
        }
    }
    Ok(Event::AssignmentVerified {
        jobs,
        counter: accepted.state,
    })
}

async fn list_artifacts(link: &Link, job: &Job, held: Vec<String>) -> Event {
    let body = RequestBody::Artifacts {
        target: job.path.clone(),
        sha256: job.sha256.clone(),
        bases: held.clone(),
        accept_full_zstd: true,
    };
    let fail = |m: String| Event::FetchFailed(Failure::new(K::Transfer, m));
    let resp = match link.call(body, META_TIMEOUT, 3).await {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    if resp.header.status != Status::Ok {
        return fail(format!(
            "artifact list: {}",
            resp.header.message.unwrap_or_default()
        ));
    }
    match serde_json::from_slice::<ArtifactList>(&resp.body) {
        Ok(list) => Event::ArtifactsListed {
            artifacts: list.artifacts,
            held,
        },
        Err(e) => fail(format!("artifact list: {e}")),
    }
}

struct Fetcher {
    link: Arc<Link>,
    db: Arc<UpdateDb>,
    chunk_len: u32,
    window: usize,
    tx: mpsc::UnboundedSender<Outcome>,
}

impl Fetcher {
    /// Fetches the missing ranges, `window` requests in flight, each written and fsynced
    /// before its range is recorded; then checks the artifact's sha256.
    async fn run(&self, artifact: &Artifact) -> Event {
        let fail = |k, m: String| Event::FetchFailed(Failure::new(k, m));
        if artifact.length > delta::MAX_TARGET_LEN {
            return fail(
                K::Transfer,
                format!("artifact of {} bytes", artifact.length),
            );
        }
        let id = artifact.id.to_ascii_lowercase();
        let path = match self.db.partial_path(&id) {
            Ok(p) => p,
            Err(e) => return fail(K::Transfer, e.to_string()),
        };
        let ranges = match self.db.ranges(&id) {
            Ok(r) => r,
            Err(e) => return fail(K::Disk, e.to_string()),
        };
        let todo = missing(&ranges, artifact.length, u64::from(self.chunk_len));
        let mut received = artifact.length - todo.iter().map(|(_, l)| l).sum::<u64>();
        let kind = kind_name(artifact);
        let mut todo = todo.into_iter();
        let mut set = JoinSet::new();
        let mut last_progress = Instant::now();
        loop {
            while set.len() < self.window {
                let Some((offset, len)) = todo.next() else {
                    break;
                };
                let (link, id, total) = (self.link.clone(), id.clone(), artifact.length);
                set.spawn(async move { fetch_chunk(&link, &id, offset, len, total).await });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (offset, body) = match joined {
                Ok(Ok(c)) => c,
                Ok(Err(m)) => return fail(K::Transfer, m),
                Err(e) => return fail(K::Transfer, e.to_string()),
            };
            let end = offset + body.len() as u64;
            let written = self
                .db
                .write_chunk(&id, offset, &body)
                .and_then(|()| self.db.add_range(&id, offset, end, kind));
            if let Err(e) = written {
                return fail(K::Disk, e.to_string());
            }
            received += body.len() as u64;
            if last_progress.elapsed() > Duration::from_millis(500) {
                last_progress = Instant::now();
                let _ = self.tx.send((None, Event::FetchProgress { received }));
            }
        }
        let want = id.clone();
        let hashed = tokio::task::spawn_blocking(move || hash_file(&path)).await;
        match hashed {
            Ok(Ok(h)) if h == want => Event::Fetched,
            Ok(Ok(h)) => fail(K::Hash, format!("artifact {want} hashed to {h}")),
            Ok(Err(e)) => fail(K::Disk, e.to_string()),
            Err(e) => fail(K::Disk, e.to_string()),
        }
    }
}

/// Missing `(offset, len)` chunks of `[0, total)` given received ranges.
fn missing(ranges: &[(u64, u64)], total: u64, chunk: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    let push_gap = |from: u64, to: u64, out: &mut Vec<(u64, u64)>| {
        let mut p = from;
        while p < to {
            let l = chunk.min(to - p);
            out.push((p, l));
            p += l;
        }
    };
    for &(s, e) in ranges {
        if s > pos {
            push_gap(pos, s.min(total), &mut out);
        }
        pos = pos.max(e);
    }
    if pos < total {
        push_gap(pos, total, &mut out);
    }
    out
}

async fn fetch_chunk(
    link: &Link,
    id: &str,
    offset: u64,
    len: u64,
    total: u64,
) -> Result<(u64, Vec<u8>), String> {
    let mut last = String::new();
    for _ in 0..CHUNK_ATTEMPTS {
        let body = RequestBody::Chunk {
            artifact: id.to_owned(),
            offset,
            len: len as u32,
        };
        let resp = match link.call(body, CHUNK_TIMEOUT, 1).await {
            Ok(r) => r,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let h = &resp.header;
        if h.status != Status::Ok {
            last = format!("chunk {offset}: {}", h.message.clone().unwrap_or_default());
            continue;
        }
        // Answers for another range or another length are not ours (and never
        // written): capped at the requested length.
        if h.offset.is_some_and(|o| o != offset)
            || h.total.is_some_and(|t| t != total)
            || resp.body.len() as u64 != len
        {
            last = format!("chunk {offset}: answer does not match the request");
            continue;
        }
        return Ok((offset, resp.body));
    }
    Err(last)
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Builds the target from the fetched artifact, checks its signed length and hashes
/// (streaming), and puts it in the store, pinned, before anyone reads it.
fn reconstruct(db: &UpdateDb, agent: &Agent, job: &Job, artifact: &Artifact) -> Event {
    let fail = |k, m: String| Event::ReconstructFailed(Failure::new(k, m));
    let Ok(hash) = job.sha256.parse::<BlobHash>() else {
        return fail(
            K::Hash,
            format!("signed sha256 {:?} is malformed", job.sha256),
        );
    };
    let signed = TargetFile {
        length: job.length,
        hashes: job.hashes.clone(),
        custom: None,
        extra: BTreeMap::new(),
    };
    let check = |bytes: &[u8]| -> tuf::Result<()> {
        let mut h = TargetHasher::new(&job.path, &signed)?;
        for c in bytes.chunks(64 * 1024) {
            h.update(c)?;
        }
        h.finish()
    };
    if let Err(e) = agent.store().pin(hash, "update") {
        return fail(K::Disk, e.to_string());
    }
    let path = match db.partial_path(&artifact.id) {
        Ok(p) => p,
        Err(e) => return fail(K::Transfer, e.to_string()),
    };
    let target = match &artifact.kind {
        ArtifactKind::Delta { base } => {
            let base = match base
                .parse::<BlobHash>()
                .map(|b| agent.store().read_blob(&b))
            {
                Ok(Ok(b)) => b,
                _ => return fail(K::Delta, format!("delta base {base} is not held")),
            };
            let delta_bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => return fail(K::Disk, e.to_string()),
            };
            let out = match delta::apply(&base, &delta_bytes, job.length) {
                Ok(o) => o,
                Err(e) => return fail(K::Delta, e.to_string()),
            };
            if let Err(e) = check(&out) {
                return fail(
                    K::Delta,
                    format!("delta does not reproduce the signed target: {e}"),
                );
            }
            out
        }
        ArtifactKind::FullZstd => {
            // Smaller than the signed length by construction (`choose`).
            let frame = match read_capped(&path, job.length) {
                Ok(b) => b,
                Err(e) => return fail(K::Disk, e),
            };
            let out = match delta::decompress_full(&frame, job.length) {
                Ok(o) => o,
                Err(e) => return fail(K::Delta, format!("compressed full model: {e}")),
            };
            if let Err(e) = check(&out) {
                return fail(
                    K::Delta,
                    format!("compressed full model does not reproduce the signed target: {e}"),
                );
            }
            out
        }
        _ => {
            let bytes = match read_capped(&path, job.length) {
                Ok(b) => b,
                Err(e) => return fail(K::Hash, e),
            };
            if let Err(e) = check(&bytes) {
                return fail(K::Hash, e.to_string());
            }
            bytes
        }
    };
    if let Err(e) = agent.store().put_blob(&target[..], hash, job.length) {
        return fail(K::Disk, e.to_string());
    }
    let _ = db.discard_partial(&artifact.id);
    Event::Reconstructed
}

fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn install(db: &UpdateDb, agent: &Agent, job: &Job, origin: Instant) -> Event {
    let fail = |k, m: String| Event::InstallFailed(Failure::new(k, m));
    let Ok(hash) = job.sha256.parse::<BlobHash>() else {
        return fail(K::Hash, "malformed sha256".into());
    };
    let bytes = match agent.store().read_blob(&hash) {
        Ok(b) => b,
        Err(e) => return fail(K::Disk, e.to_string()),
    };
    let release = match ModelRelease::from_json(job.release.as_bytes()) {
        Ok(r) => r,
        Err(e) => return fail(K::Gate, e.to_string()),
    };
    let _ = db.set_slot_target(&job.slot, &job.sha256, &job.path);
    match agent.install(&bytes, release) {
        Ok(_) => Event::Installed {
            now_ms: origin.elapsed().as_millis() as u64 + 1,
        },
        Err(AgentError::Gate { source, .. }) => {
            let kind = match *source {
                GateError::LatencyOverBudget { .. } | GateError::MemoryOverBudget { .. } => {
                    K::Budget
                }
                _ => K::Gate,
            };
            fail(kind, source.to_string())
        }
        Err(e @ (AgentError::StaleRelease { .. } | AgentError::SameBytesAsActive { .. })) => {
            fail(K::Assignment, e.to_string())
        }
        Err(e @ (AgentError::Store { .. } | AgentError::Outbox { .. })) => {
            fail(K::Disk, e.to_string())
        }
        Err(e) => fail(K::Gate, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_chunks_skip_received_ranges() {
        assert_eq!(missing(&[], 10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(missing(&[(0, 4), (8, 10)], 10, 4), vec![(4, 4)]);
        assert_eq!(missing(&[(2, 3)], 6, 4), vec![(0, 2), (3, 3)]);
        assert!(missing(&[(0, 10)], 10, 4).is_empty());
    }
}
