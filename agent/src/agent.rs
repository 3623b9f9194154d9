//! The [`Agent`]: one object over the model store, the runtime, the validation gate, the
//! monitors and the outbox. Apps, the C SDK and the daemon use it; nothing else needs to
//! know how those parts fit together.
//!
//! - [`Agent::open`] takes the data directory's lock, recovers the store and loads every
//!   active model (hash-checked, golden vectors re-run); a model that no longer loads falls
//!   back to the kept previous one, and an Event says so.
//! - [`Agent::install`] stores, gates, persists, then hot-swaps a model;
//!   [`Agent::revert`] goes back to the previous one.
//! - [`Agent::infer`] runs a model and queues the observation for its monitor: no disk
//!   I/O, no allocation, one short per-model critical section. The monitor consumes the
//!   queue at `tick`, before label joins and swaps, or when it is full.
//!   [`Agent::report_label`] joins a label to a prediction id.
//! - [`Agent::tick`] is the only place telemetry reaches the disk: the caller drives it
//!   (the daemon once a second, the C SDK from its own thread). The library spawns no
//!   thread. [`Agent::close`] flushes everything.
//!
//! The contract, the threading model and the tick/outbox design are in `docs/agent.md`.
//!
//! ```no_run
//! use std::time::Instant;
//! use outpost_agent::agent::{Agent, AgentConfig};
//! use outpost_agent::runtime::HostTensor;
//! use outpost_protocol::release::ModelRelease;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let agent = Agent::open(AgentConfig::new("/var/lib/outpost", "device-1"))?;
//! let release = ModelRelease::from_json(&std::fs::read("cnn.release.json")?)?;
//! let report = agent.install(&std::fs::read("cnn.onnx")?, release)?;
//! println!("{} runs {}: {}", report.model, report.exec_path, report.reason);
//! let x = HostTensor::from_f32(vec![1, 1, 8, 8], &[0.0; 64])?;
//! let out = agent.infer(&report.model, &[("x", x)])?;
//! agent.report_label(out.prediction_id, 3);
//! agent.tick(Instant::now())?;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_protocol::release::{ModelRelease, OutputKind, ReleaseError};
use serde::{Deserialize, Serialize};

use crate::gate::{self, GateError, GateOptions, LatencyStats};
use crate::monitor::{
    Calibration, ClassProxies, HealthProbe, LabelConfig, LabelOutcome, Monitor, MonitorConfig,
    MonitorError, ReservoirConfig, ScoreKind, WindowConfig, WindowOutput, class_proxies,
};
use crate::outbox::{Class, Outbox, OutboxConfig, OutboxError, PushOutcome};
use crate::runtime::{ExecPath, HostTensor, Model, PredictionId, Runtime, RuntimeError};
use crate::store::{BlobHash, SlotEntry, SlotRepair, Store, StoreError};

/// Version of the [`EventRecord`] JSON this crate writes.
pub const EVENT_RECORD_SCHEMA: u32 = 1;
/// Most records held in memory when the outbox cannot be written (oldest dropped first).
const MAX_BACKLOG_RECORDS: usize = 4096;
const COUNTER_BITS: u32 = 40;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// Inferences queued per model before the inferring thread drains the queue itself.
const MAX_QUEUED: usize = 1024;
/// Wall-clock readings before this (2020-01-01) are treated as "no clock".
const BELIEVABLE_WALL_MS: u64 = 1_577_836_800_000;

/// Result alias of the agent facade.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Everything that can go wrong in the agent facade, with the part that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Another agent (process or `Agent`) holds the data directory.
    #[error("data directory {} is in use by another outpost-agent{}", .path.display(),
        .holder_pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// The holder's pid, when readable.
        holder_pid: Option<u32>,
    },
    /// The model store failed.
    #[error("model store: {op}: {source}")]
    Store {
        /// What the agent was doing.
        op: &'static str,
        /// The store's error.
        source: StoreError,
    },
    /// The outbox failed.
    #[error("outbox: {op}: {source}")]
    Outbox {
        /// What the agent was doing.
        op: &'static str,
        /// The outbox's error.
        source: OutboxError,
    },
    /// The runtime failed (unknown model, bad inputs, tract error).
    #[error("model {model:?}: {source}")]
    Runtime {
        /// Model name.
        model: String,
        /// The runtime's error.
        source: RuntimeError,
    },
    /// The validation gate refused a model; the previous model keeps serving.
    #[error("{model} {version} (sequence {sequence}) refused by the validation gate: {source}")]
    Gate {
        /// Model name.
        model: String,
        /// Release version.
        version: String,
        /// Release sequence.
        sequence: u64,
        /// Why (boxed: gate errors are large).
        source: Box<GateError>,
    },
    /// The release's monitoring metadata (calibrator, reference statistics) is unusable.
    #[error("model {model:?}: monitor: {source}")]
    Monitor {
        /// Model name.
        model: String,
        /// The monitor's error.
        source: MonitorError,
    },
    /// Release metadata offered to [`Agent::install`] breaks the schema.
    #[error("invalid release metadata: {0}")]
    InvalidRelease(#[source] ReleaseError),
    /// Release metadata kept in the store no longer parses.
    #[error("stored release of model {model:?} is unreadable: {source}")]
    StoredRelease {
        /// Model name.
        model: String,
        /// Why.
        source: ReleaseError,
    },
    /// The offered release is older than the active one (or the same sequence with other
    /// bytes).
    #[error("model {model:?}: release sequence {offered} does not follow the active {active}")]
    StaleRelease {
        /// Model name.
        model: String,
        /// Sequence of the active release.
        active: u64,
        /// Sequence offered.
        offered: u64,
    },
    /// A new release whose model file is the one already active. The store keeps one
    /// release per active file (re-activating a file does not replace its metadata), so a
    /// metadata-only release is refused rather than half-applied.
    #[error(
        "model {model:?}: release sequence {offered} has the same model file as the active {active}"
    )]
    SameBytesAsActive {
        /// Model name.
        model: String,
        /// Sequence of the active release.
        active: u64,
        /// Sequence offered.
        offered: u64,
    },
    /// No model of that name is loaded.
    #[error("no model {model:?} is loaded")]
    UnknownModel {
        /// Name asked for.
        model: String,
    },
    /// More model slots than prediction ids can address (65536).
    #[error("too many model slots ({count})")]
    TooManyModels {
        /// Slots loaded.
        count: usize,
    },
}

impl AgentError {
    fn store(op: &'static str) -> impl FnOnce(StoreError) -> AgentError {
        move |source| match source {
            StoreError::Locked { path, holder_pid } => AgentError::Locked { path, holder_pid },
            source => AgentError::Store { op, source },
        }
    }

    fn outbox(op: &'static str) -> impl FnOnce(OutboxError) -> AgentError {
        move |source| AgentError::Outbox { op, source }
    }
}

/// Configuration of an [`Agent`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Data directory (store, blobs, outbox); locked for the agent's lifetime.
    pub data_dir: PathBuf,
    /// This device's id, written into every event.
    pub device_id: String,
    /// Outbox caps and quotas.
    pub outbox: OutboxConfig,
    /// When monitoring windows close (time, count) and what counts as low confidence.
    pub window: WindowConfig,
    /// How long predictions wait for labels, and how many.
    pub labels: LabelConfig,
    /// Sample reservoir bounds (used only with consent).
    pub reservoir: ReservoirConfig,
    /// Whether data collection (samples) starts allowed. Off unless the app says so.
    pub consent: bool,
    /// Validation gate options for [`Agent::install`]. Models loaded at open are re-checked
    /// against their golden vectors with a short timing run and without budgets.
    pub gate: GateOptions,
    /// Closed windows held in memory per model until the next [`Agent::tick`]; older ones
    /// are dropped and counted in [`TickReport::windows_dropped`].
    pub max_pending_windows: usize,
}

impl AgentConfig {
    /// Defaults for everything but the data directory and the device id.
    pub fn new(data_dir: impl Into<PathBuf>, device_id: impl Into<String>) -> Self {
        AgentConfig {
            data_dir: data_dir.into(),
            device_id: device_id.into(),
            outbox: OutboxConfig::default(),
            window: WindowConfig::default(),
            labels: LabelConfig::default(),
            reservoir: ReservoirConfig::default(),
            consent: false,
            gate: GateOptions::default(),
            max_pending_windows: 64,
        }
    }

    fn monitor(&self) -> MonitorConfig {
        MonitorConfig {
            window: self.window,
            labels: self.labels,
            reservoir: self.reservoir,
            output: None,
        }
    }
}

/// A release as the agent refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRef {
    /// Model slot name.
    pub model: String,
    /// Release version string.
    pub version: String,
    /// Per-model release sequence.
    pub sequence: u64,
    /// Lowercase hex SHA-256 of the model file.
    pub sha256: String,
}

impl ReleaseRef {
    fn of(release: &ModelRelease, hash: &BlobHash) -> Self {
        ReleaseRef {
            model: release.model.clone(),
            version: release.version.clone(),
            sequence: release.sequence,
            sha256: hash.to_hex(),
        }
    }
}

/// What an event record says happened. Serialized with an `event` tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AgentEvent {
    /// A release became active.
    Activated {
        /// The release.
        release: ReleaseRef,
        /// `as-shipped` or `dequantized`.
        exec_path: String,
        /// Why that path, in words.
        reason: String,
        /// The release it replaced.
        previous: Option<ReleaseRef>,
    },
    /// The validation gate (or the release checks) refused a release.
    InstallRejected {
        /// The release.
        release: ReleaseRef,
        /// Why.
        reason: String,
    },
    /// The previous release is active again.
    Reverted {
        /// The release now active.
        release: ReleaseRef,
        /// The release it replaced.
        from: Option<ReleaseRef>,
        /// Why (`requested`, or the load failure).
        reason: String,
        /// `as-shipped` or `dequantized`.
        exec_path: String,
    },
    /// An active model could not be loaded at open.
    LoadFailed {
        /// Model name.
        model: String,
        /// The blob that failed.
        sha256: String,
        /// Why.
        reason: String,
        /// Whether the previous model was activated instead.
        fell_back: bool,
    },
    /// Store recovery changed a slot because a blob was lost or corrupt.
    StoreRepaired {
        /// Model name.
        model: String,
        /// The blob that was lost.
        lost_sha256: String,
        /// `reverted_to_previous`, `cleared` or `previous_dropped`.
        action: String,
    },
}

/// The JSON payload of an outbox record of class Event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// [`EVENT_RECORD_SCHEMA`].
    pub schema: u32,
    /// Device id from the config.
    pub device: String,
    /// Wall-clock Unix ms, when the device has a believable clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_ms: Option<u64>,
    /// What happened.
    #[serde(flatten)]
    pub event: AgentEvent,
}

/// Steps of [`Agent::install`], reported to [`Agent::on_install_phase`] as they complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InstallPhase {
    /// The model file is in the store (hash and length checked, fsynced).
    BlobStored,
    /// The gate passed; nothing is persisted yet.
    Validated,
    /// The store points at the new model (survives a crash from here on).
    Persisted,
    /// The runtime serves the new model.
    Swapped,
}

/// What [`Agent::install`] did.
#[derive(Debug, Clone)]
pub struct InstallReport {
    /// Model slot name.
    pub model: String,
    /// The release now active.
    pub release: ReleaseRef,
    /// The release it replaced, if any.
    pub previous: Option<ReleaseRef>,
    /// Which graph runs.
    pub exec_path: ExecPath,
    /// Why, in the gate's words.
    pub reason: String,
    /// p95 latency the gate measured on the chosen path.
    pub gate_latency_p95: Option<Duration>,
    /// Plan constants + scratch upper bound of the chosen path, in bytes.
    pub memory_bytes: u64,
    /// Resident-set growth across compile and first run, when measurable.
    pub rss_delta_bytes: Option<u64>,
    /// Whether the release was already active (nothing changed).
    pub already_active: bool,
    /// Blobs removed by the garbage collection after the install.
    pub gc_removed: usize,
}

/// What [`Agent::revert`] did.
#[derive(Debug, Clone)]
pub struct RevertReport {
    /// The release now active.
    pub release: ReleaseRef,
    /// The release reverted from (kept as previous).
    pub from: ReleaseRef,
    /// Which graph runs.
    pub exec_path: ExecPath,
}

/// The result of [`Agent::infer`].
#[derive(Debug)]
pub struct AgentInference {
    /// Id to report a label against ([`Agent::report_label`]).
    pub prediction_id: PredictionId,
    /// Outputs in model order.
    pub outputs: Vec<(String, HostTensor)>,
    /// The model that computed them (its release: [`Model::release`]).
    pub model: Arc<Model>,
    /// Classifier proxies (class, confidence) when the model has a readable classifier
    /// output.
    pub class: Option<ClassProxies>,
    /// Time spent in the runtime.
    pub latency: Duration,
}

/// Cumulative counters of one model slot since the agent opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCounts {
    /// Successful inferences.
    pub inferences: u64,
    /// Failed inferences (runtime errors).
    pub errors: u64,
    /// Labels joined to a prediction.
    pub labels_joined: u64,
    /// Labels for unknown (or already labelled) predictions.
    pub labels_unknown: u64,
    /// Labels after the retention window.
    pub labels_expired: u64,
    /// Inferences that found the model's monitor lock taken by another thread.
    pub monitor_lock_contended: u64,
}

/// One model slot in [`Agent::status`].
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    /// Model slot name.
    pub model: String,
    /// The active release.
    pub active: ReleaseRef,
    /// Which graph runs (`None` if the active model is not loaded in the runtime).
    #[serde(serialize_with = "ser_path")]
    pub exec_path: Option<ExecPath>,
    /// Why that path.
    pub path_reason: String,
    /// The kept previous release.
    pub previous: Option<ReleaseRef>,
    /// Counters since open.
    pub counts: ModelCounts,
}

fn ser_path<S: serde::Serializer>(p: &Option<ExecPath>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_some(p.as_str()),
        None => s.serialize_none(),
    }
}

/// What [`Agent::tick`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TickReport {
    /// Window summaries written.
    pub windows: usize,
    /// Label records written.
    pub labels: usize,
    /// Sample records written.
    pub samples: usize,
    /// Records from earlier failed writes written now.
    pub backlog: usize,
    /// Records committed to the outbox.
    pub stored: usize,
    /// Records the outbox refused for lack of room (counted in its drop counters).
    pub outbox_dropped: usize,
    /// Closed windows dropped in memory because ticks came too rarely.
    pub windows_dropped: u64,
}

type PhaseHook = Arc<dyn Fn(&str, InstallPhase) + Send + Sync>;

/// One release being monitored.
struct Live {
    model: Arc<Model>,
    monitor: Monitor,
    generation: u8,
    /// How to compute the class proxies returned by `infer` (the monitor recomputes them
    /// when it drains the queue).
    head: Option<(ScoreKind, usize, Calibration)>,
}

impl Live {
    fn new(model: Arc<Model>, monitor: Monitor, generation: u8) -> Live {
        let head = model.release().and_then(|r| {
            let o = r.io.outputs.iter().find(|o| o.class_count().is_some())?;
            let kind = match o.kind {
                OutputKind::ClassLogits => ScoreKind::Logits,
                OutputKind::ClassProbabilities => ScoreKind::Probabilities,
                _ => return None,
            };
            let calibration = Calibration::from_release(r.calibrator.as_ref()).ok()?;
            Some((kind, o.class_count()?, calibration))
        });
        Live {
            model,
            monitor,
            generation,
            head,
        }
    }

    fn proxies(&self, row: &[f32]) -> Option<ClassProxies> {
        let (kind, classes, calibration) = self.head.as_ref()?;
        (row.len() == *classes)
            .then(|| class_proxies(row, *kind, calibration).ok())
            .flatten()
    }
}

/// An inference waiting for its monitor: `Monitor::observe` runs off the caller's
/// latency path, when the queue is drained.
struct Queued {
    id: u64,
    generation: u8,
    latency: Duration,
    now_ms: u64,
    /// Range in `SlotState::q_bounds` (one entry per input).
    inputs: std::ops::Range<usize>,
    /// Range in `SlotState::q_values` of the classifier output row.
    row: std::ops::Range<usize>,
}

struct SlotState {
    current: Live,
    /// The release replaced last, kept so that labels for its predictions still join.
    retired: Option<(Live, u64)>,
    next_counter: u64,
    next_generation: u8,
    pending: VecDeque<WindowOutput>,
    windows_dropped: u64,
    counts: ModelCounts,
    queue: Vec<Queued>,
    q_values: Vec<f32>,
    q_bounds: Vec<(usize, usize)>,
}

fn push_pending(
    pending: &mut VecDeque<WindowOutput>,
    dropped: &mut u64,
    out: WindowOutput,
    cap: usize,
) {
    if pending.len() >= cap.max(1) {
        pending.pop_front();
        *dropped += 1;
    }
    pending.push_back(out);
}

impl SlotState {
    fn new(live: Live) -> SlotState {
        SlotState {
            next_generation: live.generation.wrapping_add(1),
            current: live,
            retired: None,
            next_counter: fastrand::u64(..) & COUNTER_MASK,
            pending: VecDeque::new(),
            windows_dropped: 0,
            counts: ModelCounts::default(),
            queue: Vec::with_capacity(MAX_QUEUED),
            q_values: Vec::new(),
            q_bounds: Vec::new(),
        }
    }

    fn push_pending(&mut self, out: WindowOutput, cap: usize) {
        push_pending(&mut self.pending, &mut self.windows_dropped, out, cap);
    }

    /// Feeds every queued inference to the monitor of the release that computed it, in
    /// order; windows that close go to `pending`.
    fn drain(&mut self, cap: usize) {
        let SlotState {
            current,
            retired,
            pending,
            windows_dropped,
            queue,
            q_values,
            q_bounds,
            ..
        } = self;
        let mut inputs: Vec<&[f32]> = Vec::new();
        for q in queue.drain(..) {
            let live = if current.generation == q.generation {
                Some(&mut *current)
            } else {
                retired
                    .as_mut()
                    .map(|(l, _)| l)
                    .filter(|l| l.generation == q.generation)
            };
            let Some(live) = live else { continue };
            inputs.clear();
            inputs.extend(q_bounds[q.inputs].iter().map(|&(a, b)| &q_values[a..b]));
            let row = &q_values[q.row];
            let _ = live
                .monitor
                .observe(q.id, &inputs, row, q.latency, q.now_ms);
            if live.monitor.is_due(q.now_ms)
                && let Some(out) = live.monitor.maybe_close(q.now_ms)
            {
                push_pending(pending, windows_dropped, out, cap);
            }
        }
        q_values.clear();
        q_bounds.clear();
    }
}

struct SlotCell {
    index: u16,
    state: Mutex<SlotState>,
    contended: AtomicU64,
}

impl SlotCell {
    /// Locks the slot, counting the times another thread held it.
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        match self.state.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                self.contended.fetch_add(1, Ordering::Relaxed);
                self.state.lock().unwrap_or_else(PoisonError::into_inner)
            }
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        }
    }
}

#[derive(Default)]
struct Slots {
    by_name: HashMap<String, usize>,
    cells: Vec<Arc<SlotCell>>,
}

/// The device agent. `Send + Sync`: share it (`Arc<Agent>`) between threads. See the
/// [module docs](self).
pub struct Agent {
    config: AgentConfig,
    store: Store,
    outbox: Outbox,
    runtime: Runtime,
    slots: RwLock<Slots>,
    install_lock: Mutex<()>,
    health: Mutex<Option<HealthProbe>>,
    backlog: Mutex<VecDeque<(Class, Vec<u8>)>>,
    consent: AtomicBool,
    origin: Instant,
    phase_hook: RwLock<Option<PhaseHook>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("data_dir", &self.config.data_dir)
            .field("models", &self.runtime.names())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn make_id(index: u16, generation: u8, counter: u64) -> u64 {
    (u64::from(index) << 48) | (u64::from(generation) << COUNTER_BITS) | counter
}

fn wall_ms() -> Option<u64> {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis();
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms >= BELIEVABLE_WALL_MS)
}

/// Per-thread buffers of [`Agent::infer`], so that the hot path does not allocate.
#[derive(Default)]
struct Scratch {
    values: Vec<f32>,
    bounds: Vec<(usize, usize)>,
    row: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Appends the elements of `t` as f32.
fn flatten_into(out: &mut Vec<f32>, t: &HostTensor) {
    if t.dtype == outpost_protocol::release::DType::F32 {
        out.extend(
            t.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    } else {
        out.extend(t.to_f64_vec().into_iter().map(|v| v as f32));
    }
}

fn parse_release(model: &str, json: &str) -> Result<ModelRelease> {
    ModelRelease::from_json(json.as_bytes()).map_err(|source| AgentError::StoredRelease {
        model: model.to_string(),
        source,
    })
}

fn entry_ref(model: &str, entry: &SlotEntry) -> ReleaseRef {
    match ModelRelease::from_json(entry.release_json.as_bytes()) {
        Ok(r) => ReleaseRef::of(&r, &entry.hash),
        Err(_) => ReleaseRef {
            model: model.to_string(),
            version: String::new(),
            sequence: 0,
            sha256: entry.hash.to_hex(),
        },
    }
}

fn gate_p95(report: &gate::GateReport) -> (Option<LatencyStats>, u64, Option<u64>) {
    report
        .paths
        .iter()
        .find(|p| p.path == report.path)
        .map(|p| {
            (
                p.latency,
                p.weight_bytes + p.scratch_bytes,
                p.rss_delta_bytes,
            )
        })
        .unwrap_or((None, 0, None))
}

impl Agent {
    /// Opens the data directory (see the [module docs](self)). Fails with
    /// [`AgentError::Locked`] if another agent holds it.
    pub fn open(config: AgentConfig) -> Result<Agent> {
        let store = Store::open(&config.data_dir).map_err(AgentError::store("open"))?;
        let outbox = Outbox::open(&store.outbox_path(), config.outbox.clone())
            .map_err(AgentError::outbox("open"))?;
        let agent = Agent {
            consent: AtomicBool::new(config.consent),
            config,
            store,
            outbox,
            runtime: Runtime::new(),
            slots: RwLock::new(Slots::default()),
            install_lock: Mutex::new(()),
            health: Mutex::new(None),
            backlog: Mutex::new(VecDeque::new()),
            origin: Instant::now(),
            phase_hook: RwLock::new(None),
        };
        for repair in agent.store.recovery_report().repaired_slots.clone() {
            let (model, lost, action) = match repair {
                SlotRepair::RevertedToPrevious { model, lost } => {
                    (model, lost, "reverted_to_previous")
                }
                SlotRepair::Cleared { model, lost } => (model, lost, "cleared"),
                SlotRepair::PreviousDropped { model, lost } => (model, lost, "previous_dropped"),
            };
            agent.record_event(AgentEvent::StoreRepaired {
                model,
                lost_sha256: lost.to_hex(),
                action: action.into(),
            });
        }
        let slots = agent
            .store
            .slots()
            .map_err(AgentError::store("list slots"))?;
        for slot in slots {
            agent.load_slot(&slot.model)?;
        }
        Ok(agent)
    }

    /// Loads the active model of `name` from the store; on failure falls back to the
    /// previous one (persisted first), once.
    fn load_slot(&self, name: &str) -> Result<()> {
        for attempt in 0..2 {
            let Some(slot) = self
                .store
                .slot(name)
                .map_err(AgentError::store("read slot"))?
            else {
                return Ok(());
            };
            let failure = match self.load_entry(name, &slot.active) {
                Ok((model, monitor)) => {
                    self.swap_in(name, Arc::new(model), monitor)?;
                    return Ok(());
                }
                Err(e) => e.to_string(),
            };
            let fell_back =
                attempt == 0 && slot.previous.is_some() && self.store.revert(name).is_ok();
            self.record_event(AgentEvent::LoadFailed {
                model: name.to_string(),
                sha256: slot.active.hash.to_hex(),
                reason: failure,
                fell_back,
            });
            if !fell_back {
                return Ok(());
            }
            if let Some(prev) = &slot.previous {
                self.record_event(AgentEvent::Reverted {
                    release: entry_ref(name, prev),
                    from: Some(entry_ref(name, &slot.active)),
                    reason: "active model failed to load".into(),
                    exec_path: String::new(),
                });
            }
        }
        Ok(())
    }

    /// Reads, hash-checks and re-validates a stored model: golden vectors again, a short
    /// timing run to choose the path, no budgets (a busy boot must not evict a model).
    fn load_entry(&self, name: &str, entry: &SlotEntry) -> Result<(Model, Monitor)> {
        let bytes = self
            .store
            .read_blob(&entry.hash)
            .map_err(AgentError::store("read model"))?;
        let release = parse_release(name, &entry.release_json)?;
        let mut quick = release.clone();
        quick.budgets = None;
        let options = GateOptions {
            min_timed_runs: 1,
            max_timing: Duration::from_millis(200),
            ..self.config.gate.clone()
        };
        let validated =
            gate::validate(&bytes, &quick, &options).map_err(|source| AgentError::Gate {
                model: name.to_string(),
                version: release.version.clone(),
                sequence: release.sequence,
                source: Box::new(source),
            })?;
        let mut model = validated.model;
        model.set_release(Arc::new(release.clone()));
        let monitor = self.new_monitor(&release)?;
        Ok((model, monitor))
    }

    fn new_monitor(&self, release: &ModelRelease) -> Result<Monitor> {
        let mut monitor = Monitor::new(release, self.config.monitor(), self.now_ms(Instant::now()))
            .map_err(|source| AgentError::Monitor {
                model: release.model.clone(),
                source,
            })?;
        monitor.set_consent(self.consent.load(Ordering::Relaxed));
        Ok(monitor)
    }

    /// Makes `model` current for `name`: the old monitor is flushed (its window pending
    /// for the next tick) and kept for late labels, then the runtime swaps. Both happen
    /// under the slot lock, so every inference is observed by the monitor of the model
    /// that computed it.
    fn swap_in(&self, name: &str, model: Arc<Model>, monitor: Monitor) -> Result<()> {
        let now_ms = self.now_ms(Instant::now());
        let cell = {
            let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
            match slots.by_name.get(name) {
                Some(&i) => Some(slots.cells[i].clone()),
                None => {
                    let count = slots.cells.len();
                    let index =
                        u16::try_from(count).map_err(|_| AgentError::TooManyModels { count })?;
                    let cell = Arc::new(SlotCell {
                        index,
                        state: Mutex::new(SlotState::new(Live::new(
                            model.clone(),
                            monitor,
                            fastrand::u8(..),
                        ))),
                        contended: AtomicU64::new(0),
                    });
                    slots.by_name.insert(name.to_string(), count);
                    slots.cells.push(cell);
                    self.runtime.activate_arc(model);
                    return Ok(());
                }
            }
        };
        let Some(cell) = cell else { return Ok(()) };
        let cap = self.config.max_pending_windows;
        let mut st = cell.lock();
        st.drain(cap);
        let generation = st.next_generation;
        st.next_generation = generation.wrapping_add(1);
        let mut old = std::mem::replace(
            &mut st.current,
            Live::new(model.clone(), monitor, generation),
        );
        if let Some(out) = old.monitor.flush(now_ms) {
            st.push_pending(out, cap);
        }
        if let Some((mut older, _)) = st.retired.take()
            && let Some(out) = older.monitor.flush(now_ms)
        {
            st.push_pending(out, cap);
        }
        st.retired = Some((old, now_ms));
        self.runtime.activate_arc(model);
        Ok(())
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    fn cell(&self, name: &str) -> Option<Arc<SlotCell>> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots.by_name.get(name).map(|&i| slots.cells[i].clone())
    }

    fn cells(&self) -> Vec<Arc<SlotCell>> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots.cells.clone()
    }

    fn phase(&self, model: &str, phase: InstallPhase) {
        let hook = self
            .phase_hook
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(model, phase);
        }
    }

    /// Calls `hook(model, phase)` as each step of [`Agent::install`] completes (progress
    /// reporting; also how crash tests find the instants to kill at). Runs on the
    /// installing thread; replaces any earlier hook.
    pub fn on_install_phase(&self, hook: impl Fn(&str, InstallPhase) + Send + Sync + 'static) {
        *self
            .phase_hook
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(hook));
    }

    /// Pushes an event now (events are rare and belong to I/O paths); if the outbox
    /// cannot be written, the event waits in the backlog for the next tick.
    fn record_event(&self, event: AgentEvent) {
        let record = EventRecord {
            schema: EVENT_RECORD_SCHEMA,
            device: self.config.device_id.clone(),
            unix_ms: wall_ms(),
            event,
        };
        let payload = serde_json::to_vec(&record).unwrap_or_default();
        if self.outbox.push(Class::Event, &payload).is_err() {
            self.to_backlog(vec![(Class::Event, payload)]);
        }
    }

    fn to_backlog(&self, records: Vec<(Class, Vec<u8>)>) {
        let mut backlog = lock(&self.backlog);
        backlog.extend(records);
        while backlog.len() > MAX_BACKLOG_RECORDS {
            backlog.pop_front();
        }
    }

    /// Installs `bytes` as the new release of `release.model`: store (hash, length),
    /// validation gate, persist, hot swap, Event, garbage collection. On a gate failure the
    /// old model keeps serving, an `install_rejected` Event is recorded, and the gate's
    /// typed error is returned in [`AgentError::Gate`]. Installs and reverts are
    /// serialized; inferences continue throughout (calls in flight finish on the old plan).
    pub fn install(&self, bytes: &[u8], release: ModelRelease) -> Result<InstallReport> {
        release.validate().map_err(AgentError::InvalidRelease)?;
        let _serial = lock(&self.install_lock);
        let name = release.model.clone();
        let hash = BlobHash::of(bytes);
        let this = ReleaseRef::of(&release, &hash);
        let slot = self
            .store
            .slot(&name)
            .map_err(AgentError::store("read slot"))?;
        let previous = slot.as_ref().map(|s| entry_ref(&name, &s.active));
        if let Some(active) = &previous {
            if active.sha256 == this.sha256 && active.sequence == this.sequence {
                if let Ok(model) = self.runtime.model(&name) {
                    return Ok(InstallReport {
                        model: name,
                        release: this,
                        previous: slot.and_then(|s| s.previous.map(|p| entry_ref(&s.model, &p))),
                        exec_path: model.exec_path(),
                        reason: model.path_reason().to_string(),
                        gate_latency_p95: None,
                        memory_bytes: model.weight_bytes() + model.scratch_bytes(),
                        rss_delta_bytes: None,
                        already_active: true,
                        gc_removed: 0,
                    });
                }
            } else {
                let err = if release.sequence <= active.sequence {
                    AgentError::StaleRelease {
                        model: name,
                        active: active.sequence,
                        offered: release.sequence,
                    }
                } else if active.sha256 == this.sha256 {
                    AgentError::SameBytesAsActive {
                        model: name,
                        active: active.sequence,
                        offered: release.sequence,
                    }
                } else {
                    return self.install_checked(bytes, &release, hash, &this, previous);
                };
                self.record_event(AgentEvent::InstallRejected {
                    release: this,
                    reason: err.to_string(),
                });
                return Err(err);
            }
        }
        self.install_checked(bytes, &release, hash, &this, previous)
    }

    fn install_checked(
        &self,
        bytes: &[u8],
        release: &ModelRelease,
        hash: BlobHash,
        this: &ReleaseRef,
        previous: Option<ReleaseRef>,
    ) -> Result<InstallReport> {
        self.store
            .pin(hash, "install")
            .map_err(AgentError::store("pin"))?;
        let result = self.install_pinned(bytes, release, hash, this, previous);
        // The blob is referenced by the slot now (or not wanted); failures here only delay
        // cleanup to the next install.
        let _ = self.store.unpin(&hash);
        let gc_removed = self.store.gc().map(|r| r.removed.len()).unwrap_or(0);
        result.map(|mut r| {
            r.gc_removed = gc_removed;
            r
        })
    }

    fn install_pinned(
        &self,
        bytes: &[u8],
        release: &ModelRelease,
        hash: BlobHash,
        this: &ReleaseRef,
        previous: Option<ReleaseRef>,
    ) -> Result<InstallReport> {
        let name = &release.model;
        self.store
            .put_blob(bytes, hash, bytes.len() as u64)
            .map_err(AgentError::store("store model"))?;
        self.phase(name, InstallPhase::BlobStored);
        let reject = |reason: String| {
            self.record_event(AgentEvent::InstallRejected {
                release: this.clone(),
                reason,
            });
        };
        let validated = match gate::validate(bytes, release, &self.config.gate) {
            Ok(v) => v,
            Err(source) => {
                reject(source.to_string());
                return Err(AgentError::Gate {
                    model: name.clone(),
                    version: release.version.clone(),
                    sequence: release.sequence,
                    source: Box::new(source),
                });
            }
        };
        let monitor = match self.new_monitor(release) {
            Ok(m) => m,
            Err(e) => {
                reject(e.to_string());
                return Err(e);
            }
        };
        self.phase(name, InstallPhase::Validated);
        let release_json = serde_json::to_string(release).unwrap_or_default();
        // Persist before acting: after a crash from here on, open() loads the new model.
        self.store
            .activate(name, hash, &release_json)
            .map_err(AgentError::store("activate"))?;
        self.phase(name, InstallPhase::Persisted);
        let (latency, memory_bytes, rss_delta_bytes) = gate_p95(&validated.report);
        let exec_path = validated.report.path;
        let reason = validated.report.reason.clone();
        self.swap_in(name, Arc::new(validated.model), monitor)?;
        self.phase(name, InstallPhase::Swapped);
        self.record_event(AgentEvent::Activated {
            release: this.clone(),
            exec_path: exec_path.as_str().into(),
            reason: reason.clone(),
            previous: previous.clone(),
        });
        Ok(InstallReport {
            model: name.clone(),
            release: this.clone(),
            previous,
            exec_path,
            reason,
            gate_latency_p95: latency.map(|l| l.p95),
            memory_bytes,
            rss_delta_bytes,
            already_active: false,
            gc_removed: 0,
        })
    }

    /// Makes the kept previous release of `model` active again (store first, then the
    /// runtime) and records a `reverted` Event. The previous model is loaded and checked
    /// before anything is persisted; on failure nothing changes.
    pub fn revert(&self, model: &str) -> Result<RevertReport> {
        let _serial = lock(&self.install_lock);
        let slot = self
            .store
            .slot(model)
            .map_err(AgentError::store("read slot"))?
            .ok_or_else(|| AgentError::UnknownModel {
                model: model.to_string(),
            })?;
        let Some(prev) = &slot.previous else {
            return Err(AgentError::store("revert")(StoreError::NoPrevious {
                model: model.to_string(),
            }));
        };
        let (compiled, monitor) = self.load_entry(model, prev)?;
        self.store
            .revert(model)
            .map_err(AgentError::store("revert"))?;
        let exec_path = compiled.exec_path();
        self.swap_in(model, Arc::new(compiled), monitor)?;
        let report = RevertReport {
            release: entry_ref(model, prev),
            from: entry_ref(model, &slot.active),
            exec_path,
        };
        self.record_event(AgentEvent::Reverted {
            release: report.release.clone(),
            from: Some(report.from.clone()),
            reason: "requested".into(),
            exec_path: exec_path.as_str().into(),
        });
        Ok(report)
    }

    /// Runs the active model `model` and queues the inference for its monitor (inputs
    /// flattened as f32 in the release's input order, the first classifier output). No
    /// disk I/O and no allocation; the monitor consumes the queue at [`Agent::tick`],
    /// before label joins and swaps, or here when 1024 are queued.
    pub fn infer(&self, model: &str, inputs: &[(&str, HostTensor)]) -> Result<AgentInference> {
        let cell = self.cell(model).ok_or_else(|| AgentError::UnknownModel {
            model: model.to_string(),
        })?;
        let inference = match self
            .runtime
            .infer(model, inputs.iter().map(|(n, t)| (*n, t)))
        {
            Ok(i) => i,
            Err(source) => {
                let mut st = cell.lock();
                st.counts.errors += 1;
                st.current.monitor.observe_error();
                return Err(AgentError::Runtime {
                    model: model.to_string(),
                    source,
                });
            }
        };
        let release = inference.model.release();
        let now_ms = self.now_ms(Instant::now());
        let cap = self.config.max_pending_windows;
        let (id, class) = SCRATCH.with_borrow_mut(|scratch| {
            let Scratch {
                values,
                bounds,
                row,
            } = scratch;
            values.clear();
            bounds.clear();
            row.clear();
            if let Some(r) = release {
                for spec in &r.io.inputs {
                    let start = values.len();
                    if let Some((_, t)) = inputs.iter().find(|(n, _)| *n == spec.name) {
                        flatten_into(values, t);
                    }
                    bounds.push((start, values.len()));
                }
                if let Some((_, t)) =
                    r.io.outputs
                        .iter()
                        .find(|o| o.class_count().is_some())
                        .and_then(|o| inference.outputs.iter().find(|(n, _)| *n == o.name))
                {
                    flatten_into(row, t);
                }
            }
            let mut st = cell.lock();
            let st = &mut *st;
            st.counts.inferences += 1;
            let counter = st.next_counter;
            st.next_counter = (counter + 1) & COUNTER_MASK;
            let live = if Arc::ptr_eq(&st.current.model, &inference.model) {
                Some(&st.current)
            } else {
                st.retired
                    .as_ref()
                    .map(|(l, _)| l)
                    .filter(|l| Arc::ptr_eq(&l.model, &inference.model))
            };
            // A model replaced twice during this call is no longer monitored: its id
            // joins nothing.
            let Some(live) = live else {
                let generation = st.current.generation.wrapping_sub(1);
                return (make_id(cell.index, generation, counter), None);
            };
            let generation = live.generation;
            let id = make_id(cell.index, generation, counter);
            let class = live.proxies(row);
            let base = st.q_values.len();
            st.q_values.extend_from_slice(values);
            let first = st.q_bounds.len();
            st.q_bounds
                .extend(bounds.iter().map(|&(a, b)| (base + a, base + b)));
            let row_start = st.q_values.len();
            st.q_values.extend_from_slice(row);
            st.queue.push(Queued {
                id,
                generation,
                latency: inference.latency,
                now_ms,
                inputs: first..st.q_bounds.len(),
                row: row_start..st.q_values.len(),
            });
            if st.queue.len() >= MAX_QUEUED {
                st.drain(cap);
            }
            (id, class)
        });
        Ok(AgentInference {
            prediction_id: PredictionId(id),
            outputs: inference.outputs,
            model: inference.model,
            class,
            latency: inference.latency,
        })
    }

    /// Joins a ground-truth class index to an earlier prediction. Joined labels count in
    /// the window of the release that made the prediction (also right after an update) and
    /// go to the outbox at the next [`Agent::tick`].
    pub fn report_label(&self, prediction_id: PredictionId, label: u32) -> LabelOutcome {
        let id = prediction_id.0;
        let index = usize::from((id >> 48) as u16);
        let generation = (id >> COUNTER_BITS) as u8;
        let cell = {
            let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
            slots.cells.get(index).cloned()
        };
        let Some(cell) = cell else {
            return LabelOutcome::Unknown;
        };
        let now_ms = self.now_ms(Instant::now());
        let mut st = cell.lock();
        st.drain(self.config.max_pending_windows);
        let st = &mut *st;
        let monitor = match &mut st.retired {
            Some((l, _)) if l.generation == generation && st.current.generation != generation => {
                &mut l.monitor
            }
            _ => &mut st.current.monitor,
        };
        let outcome = monitor.report_label(id, label, now_ms);
        match outcome {
            LabelOutcome::Joined { .. } => st.counts.labels_joined += 1,
            LabelOutcome::Unknown => st.counts.labels_unknown += 1,
            LabelOutcome::Expired => st.counts.labels_expired += 1,
        }
        outcome
    }

    /// Allows or forbids data collection (samples of low-confidence inputs) for every
    /// model. Turning it off discards every sample not yet written.
    pub fn set_consent(&self, on: bool) {
        self.consent.store(on, Ordering::Relaxed);
        for cell in self.cells() {
            let mut st = cell.lock();
            st.drain(self.config.max_pending_windows);
            st.current.monitor.set_consent(on);
            if let Some((l, _)) = &mut st.retired {
                l.monitor.set_consent(on);
            }
            if !on {
                st.pending.iter_mut().for_each(|o| o.samples.clear());
            }
        }
        if !on {
            lock(&self.backlog).retain(|(c, _)| *c != Class::Sample);
        }
    }

    /// Whether data collection is allowed.
    pub fn consent(&self) -> bool {
        self.consent.load(Ordering::Relaxed)
    }

    /// Every model slot: active and previous release, exec path and reason, counters.
    pub fn status(&self) -> Result<Vec<ModelStatus>> {
        let slots = self
            .store
            .slots()
            .map_err(AgentError::store("list slots"))?;
        Ok(slots
            .into_iter()
            .map(|slot| {
                let loaded = self.runtime.model(&slot.model).ok();
                let counts = self
                    .cell(&slot.model)
                    .map(|c| {
                        let mut counts = c.lock().counts;
                        counts.monitor_lock_contended = c.contended.load(Ordering::Relaxed);
                        counts
                    })
                    .unwrap_or_default();
                ModelStatus {
                    active: entry_ref(&slot.model, &slot.active),
                    exec_path: loaded.as_ref().map(|m| m.exec_path()),
                    path_reason: loaded
                        .as_ref()
                        .map(|m| m.path_reason().to_string())
                        .unwrap_or_default(),
                    previous: slot.previous.as_ref().map(|p| entry_ref(&slot.model, p)),
                    counts,
                    model: slot.model,
                }
            })
            .collect())
    }

    /// Names of the models being served.
    pub fn models(&self) -> Vec<String> {
        self.runtime.names()
    }

    /// The outbox (for the uploader: `read_batch`, `ack`).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The model store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The I/O step, driven by the caller (the daemon each second, the C SDK from its own
    /// thread): closes windows due at `now`, attaches a health snapshot, and writes window
    /// summaries, joined labels and samples to the outbox in one transaction. If the write
    /// fails, the records wait in memory (bounded) for the next tick and the error is
    /// returned.
    pub fn tick(&self, now: Instant) -> Result<TickReport> {
        self.write_out(self.now_ms(now), false)
    }

    /// Closes every window now and writes everything out (shutdown). The agent stays
    /// usable.
    pub fn close(&self) -> Result<TickReport> {
        self.write_out(self.now_ms(Instant::now()), true)
    }

    fn write_out(&self, now_ms: u64, flush: bool) -> Result<TickReport> {
        let mut report = TickReport::default();
        let mut outputs = Vec::new();
        let mut labels = Vec::new();
        let retention = self.config.labels.retention_ms;
        for cell in self.cells() {
            let mut st = cell.lock();
            st.drain(self.config.max_pending_windows);
            let st = &mut *st;
            let closed = if flush {
                st.current.monitor.flush(now_ms)
            } else {
                st.current.monitor.maybe_close(now_ms)
            };
            labels.extend(st.current.monitor.take_labels());
            if let Some((retired, since)) = &mut st.retired {
                labels.extend(retired.monitor.take_labels());
                if flush || now_ms.saturating_sub(*since) >= retention {
                    outputs.extend(retired.monitor.flush(now_ms));
                    st.retired = None;
                }
            }
            outputs.extend(st.pending.drain(..));
            outputs.extend(closed);
            report.windows_dropped += std::mem::take(&mut st.windows_dropped);
        }
        let unix_ms = wall_ms();
        if !outputs.is_empty() {
            let mut probe = lock(&self.health);
            let probe = probe.get_or_insert_with(|| HealthProbe::new(&self.config.data_dir));
            let health = probe.snapshot();
            for out in &mut outputs {
                out.summary.health = Some(health);
                if out.summary.unix_end_ms.is_none() {
                    out.summary.unix_end_ms = unix_ms;
                }
            }
        }
        let consent = self.consent();
        let mut records: Vec<(Class, Vec<u8>)> = lock(&self.backlog).drain(..).collect();
        report.backlog = records.len();
        for l in labels
            .iter()
            .chain(outputs.iter().flat_map(|o| o.labels.iter()))
        {
            records.push((Class::Label, l.to_json_bytes()));
            report.labels += 1;
        }
        for out in &outputs {
            records.push((Class::Window, out.summary.to_json_bytes()));
            report.windows += 1;
        }
        if consent {
            for s in outputs.iter().flat_map(|o| o.samples.iter()) {
                records.push((Class::Sample, s.to_json_bytes()));
                report.samples += 1;
            }
        }
        if records.is_empty() {
            return Ok(report);
        }
        match self
            .outbox
            .push_many(records.iter().map(|(c, p)| (*c, p.as_slice())))
        {
            Ok(outcomes) => {
                for o in outcomes {
                    match o {
                        PushOutcome::Stored(_) => report.stored += 1,
                        PushOutcome::Dropped => report.outbox_dropped += 1,
                    }
                }
                Ok(report)
            }
            Err(source) => {
                self.to_backlog(records);
                Err(AgentError::Outbox {
                    op: "write telemetry",
                    source,
                })
            }
        }
    }
}

/// What [`measure_overhead`] found. Times in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadReport {
    /// Calls timed per side (single thread).
    pub iterations: usize,
    /// Calls per alternating block.
    pub block: usize,
    /// Which graph the gate chose.
    pub exec_path: String,
    /// p50 of `Runtime::infer` on the same compiled plan.
    pub runtime_p50_us: f64,
    /// p50 of [`Agent::infer`] (runtime + input flattening + monitor + id).
    pub agent_p50_us: f64,
    /// `(agent_p50 / runtime_p50 - 1) * 100`.
    pub overhead_pct: f64,
    /// p95 of the runtime calls.
    pub runtime_p95_us: f64,
    /// p95 of the agent calls.
    pub agent_p95_us: f64,
    /// p99 of the runtime calls.
    pub runtime_p99_us: f64,
    /// p99 of the agent calls (includes the windows closed by count on the hot path).
    pub agent_p99_us: f64,
    /// Ticks run (one after each agent block, each writing that block's telemetry).
    pub ticks: usize,
    /// Mean duration of a tick.
    pub tick_mean_us: f64,
    /// Tick time as a share of the agent blocks' time: what outbox writes add on
    /// average when ticked once per block (a daemon ticks once a second: less).
    pub tick_share_pct: f64,
    /// One tick a second (the daemon's rate) as a share of one core: `tick_mean_us / 1e4`.
    pub tick_cpu_at_1hz_pct: f64,
    /// Threads in the contention run.
    pub threads: usize,
    /// Throughput of `Runtime::infer` with `threads` threads on one model.
    pub threaded_runtime_calls_per_s: f64,
    /// Throughput of [`Agent::infer`] with `threads` threads on one model.
    pub threaded_agent_calls_per_s: f64,
    /// `(runtime throughput / agent throughput - 1) * 100`.
    pub threaded_overhead_pct: f64,
    /// Agent calls in the threaded run that found the monitor lock held.
    pub monitor_lock_contended: u64,
}

fn percentile_us(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

/// Measures what the agent adds to an inference of `model_bytes` (see `docs/agent.md`):
/// installs it in a throw-away data directory, then times `Runtime::infer` and
/// [`Agent::infer`] on the same compiled plan in alternating blocks of up to 1000 calls
/// (so machine noise hits both alike), ticking after each agent block; then runs both
/// from 4 threads. Meaningful only in a release build.
pub fn measure_overhead(
    model_bytes: &[u8],
    release: &ModelRelease,
    input: &[(&str, HostTensor)],
    iterations: usize,
) -> Result<OverheadReport> {
    const THREADS: usize = 4;
    let dir = std::env::temp_dir().join(format!(
        "outpost-overhead-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let result = (|| {
        let agent = Agent::open(AgentConfig::new(&dir, "overhead-bench"))?;
        let installed = agent.install(model_bytes, release.clone())?;
        let name = installed.model.clone();
        let baseline = Runtime::new();
        let plan = agent
            .runtime
            .model(&name)
            .map_err(|source| AgentError::Runtime {
                model: name.clone(),
                source,
            })?;
        baseline.activate_arc(plan);
        let run_runtime = || {
            baseline
                .infer(&name, input.iter().map(|(n, t)| (*n, t)))
                .map_err(|source| AgentError::Runtime {
                    model: name.clone(),
                    source,
                })
        };
        let iterations = iterations.max(1);
        let block = iterations.min(1000);
        for _ in 0..block.min(200) {
            run_runtime()?;
            agent.infer(&name, input)?;
        }
        let (mut rt, mut ag) = (
            Vec::with_capacity(iterations),
            Vec::with_capacity(iterations),
        );
        let (mut ticks, mut tick_time, mut agent_time) = (0usize, Duration::ZERO, Duration::ZERO);
        let mut round = 0usize;
        while rt.len() < iterations {
            let n = block.min(iterations - rt.len());
            for side in 0..2 {
                if (side + round).is_multiple_of(2) {
                    for _ in 0..n {
                        let t = Instant::now();
                        run_runtime()?;
                        rt.push(t.elapsed());
                    }
                } else {
                    let start = Instant::now();
                    for _ in 0..n {
                        let t = Instant::now();
                        agent.infer(&name, input)?;
                        ag.push(t.elapsed());
                    }
                    agent_time += start.elapsed();
                    let t = Instant::now();
                    agent.tick(Instant::now())?;
                    tick_time += t.elapsed();
                    ticks += 1;
                }
            }
            round += 1;
        }
        rt.sort();
        ag.sort();

        let per_thread = (iterations / THREADS).max(1);
        let contended_before = agent
            .cell(&name)
            .map_or(0, |c| c.contended.load(Ordering::Relaxed));
        let threaded = |use_agent: bool| -> Result<f64> {
            let start = Instant::now();
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|_| {
                        s.spawn(|| -> Result<()> {
                            for _ in 0..per_thread {
                                if use_agent {
                                    agent.infer(&name, input)?;
                                } else {
                                    run_runtime()?;
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().unwrap_or(Ok(()))?;
                }
                Ok(())
            })?;
            Ok((per_thread * THREADS) as f64 / start.elapsed().as_secs_f64())
        };
        let threaded_runtime = threaded(false)?;
        let threaded_agent = threaded(true)?;
        let threaded_runtime = (threaded_runtime + threaded(false)?) / 2.0;
        let contended = agent
            .cell(&name)
            .map_or(0, |c| c.contended.load(Ordering::Relaxed))
            - contended_before;
        agent.close()?;

        let runtime_p50_us = percentile_us(&rt, 0.5);
        let agent_p50_us = percentile_us(&ag, 0.5);
        Ok(OverheadReport {
            iterations,
            block,
            exec_path: installed.exec_path.as_str().into(),
            runtime_p50_us,
            agent_p50_us,
            overhead_pct: (agent_p50_us / runtime_p50_us - 1.0) * 100.0,
            runtime_p95_us: percentile_us(&rt, 0.95),
            agent_p95_us: percentile_us(&ag, 0.95),
            runtime_p99_us: percentile_us(&rt, 0.99),
            agent_p99_us: percentile_us(&ag, 0.99),
            ticks,
            tick_mean_us: tick_time.as_secs_f64() * 1e6 / ticks.max(1) as f64,
            tick_share_pct: tick_time.as_secs_f64() / agent_time.as_secs_f64().max(1e-9) * 100.0,
            tick_cpu_at_1hz_pct: tick_time.as_secs_f64() / ticks.max(1) as f64 * 100.0,
            threads: THREADS,
            threaded_runtime_calls_per_s: threaded_runtime,
            threaded_agent_calls_per_s: threaded_agent,
            threaded_overhead_pct: (threaded_runtime / threaded_agent - 1.0) * 100.0,
            monitor_lock_contended: contended,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_records_round_trip_with_tag() {
        let record = EventRecord {
            schema: EVENT_RECORD_SCHEMA,
            device: "d1".into(),
            unix_ms: None,
            event: AgentEvent::InstallRejected {
                release: ReleaseRef {
                    model: "m".into(),
                    version: "1".into(),
                    sequence: 2,
                    sha256: "ab".into(),
                },
                reason: "golden vector 3".into(),
            },
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["event"], "install_rejected");
        assert_eq!(json["release"]["sequence"], 2);
        let back: EventRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
    }
}
