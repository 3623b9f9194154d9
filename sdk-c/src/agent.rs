//! The agent handle and its entry points: open/free, fleet link, install, inference,
//! labels, consent, status, callbacks, tick.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{CString, c_char, c_void};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use ::outpost_agent::monitor::{ClassProxies, LabelOutcome, WindowConfig};
use ::outpost_agent::runtime::{ExecPath, HostTensor, PredictionId, RuntimeError};
use ::outpost_agent::update::{EmbedOptions, FailureKind, Phase, UpdateEvent};
use ::outpost_agent::{Agent, AgentConfig, AgentError, InstallPhase};
use outpost_protocol::bundle::{AgentConfig as Bundle, TelemetryConfig};
use outpost_protocol::release::{DType, ModelRelease};
use serde::Deserialize;

use crate::ffi::{Failure, Registry, Res, copy_str, guard, null, slice_arg, str_arg, write_out};
use crate::link::LinkSlot;
use crate::*;

/// An open agent: the model store, runtime, monitors and outbox of one data directory.
/// Made by `outpost_agent_new`, released by `outpost_agent_free`.
pub struct outpost_agent {
    _private: [u8; 0],
}

/// The outputs of one `outpost_agent_infer_owned` call, owned by the library until
/// `outpost_result_free`.
pub struct outpost_result {
    _private: [u8; 0],
}

/// A named input tensor. The library copies what it needs during the call; nothing is
/// kept after it returns.
#[repr(C)]
pub struct outpost_tensor {
    /// Input name as in the model (NUL-terminated UTF-8).
    pub name: *const c_char,
    /// Element type (`OUTPOST_DTYPE_*`).
    pub dtype: outpost_dtype,
    /// `rank` dimensions (may be NULL when `rank` is 0).
    pub shape: *const usize,
    /// Number of dimensions, at most `OUTPOST_MAX_RANK`.
    pub rank: usize,
    /// The elements, little-endian, row-major (C order).
    pub data: *const c_void,
    /// Bytes at `data`: must equal the element count times the dtype's size.
    pub byte_len: usize,
}

/// A caller-provided output buffer for `outpost_agent_infer`. The caller sets `data` and
/// `capacity`; the library sets the other fields.
#[repr(C)]
pub struct outpost_output {
    /// Where to write the elements (may be NULL when `capacity` is 0).
    pub data: *mut c_void,
    /// Bytes available at `data`.
    pub capacity: usize,
    /// Set by the library: bytes of this output (written to `data` if they fit).
    pub byte_len: usize,
    /// Set by the library: element type.
    pub dtype: outpost_dtype,
    /// Set by the library: number of dimensions.
    pub rank: usize,
    /// Set by the library: the first `rank` entries are the shape.
    pub shape: [usize; OUTPOST_MAX_RANK],
}

/// A read-only view of one output of an `outpost_result`. Pointers stay valid until
/// `outpost_result_free`.
#[repr(C)]
pub struct outpost_tensor_view {
    /// Output name (NUL-terminated).
    pub name: *const c_char,
    /// Element type.
    pub dtype: outpost_dtype,
    /// Number of dimensions.
    pub rank: usize,
    /// The first `rank` entries are the shape.
    pub shape: [usize; OUTPOST_MAX_RANK],
    /// The elements, little-endian, row-major.
    pub data: *const c_void,
    /// Bytes at `data`.
    pub byte_len: usize,
}

/// Element type and shape of a model input or output.
#[repr(C)]
pub struct outpost_tensor_spec {
    /// Element type.
    pub dtype: outpost_dtype,
    /// Number of dimensions.
    pub rank: usize,
    /// The first `rank` entries are the shape (batch dimension included).
    pub shape: [usize; OUTPOST_MAX_RANK],
}

/// The state of one model slot (`outpost_agent_model_status`).
#[repr(C)]
pub struct outpost_model_status {
    /// Whether a release is active and loaded in the runtime.
    pub loaded: bool,
    /// Whether the runtime runs the dequantized variant of a quantized model.
    pub dequantized: bool,
    /// Release sequence of the active release (0: none).
    pub active_sequence: u64,
    /// Release sequence of the kept previous release (0: none).
    pub previous_sequence: u64,
    /// The model's update state (`OUTPOST_UPDATE_*`).
    pub update_state: outpost_update_state,
    /// Status of the last update (`OUTPOST_OK` if none failed); its message comes from
    /// `outpost_agent_model_last_error`.
    pub update_status: outpost_status,
    /// Successful inferences since the agent opened.
    pub inferences: u64,
    /// Failed inferences since the agent opened.
    pub errors: u64,
    /// Labels joined to a prediction.
    pub labels_joined: u64,
    /// Labels for unknown (or already labelled) predictions.
    pub labels_unknown: u64,
    /// Labels after the retention window.
    pub labels_expired: u64,
}

/// Called when a model's update state changes: `model` (NUL-terminated, valid only
/// during the call), the new `state`, and `status` (`OUTPOST_OK`, or why it failed).
pub type outpost_update_state_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        model: *const c_char,
        state: outpost_update_state,
        status: outpost_status,
    ),
>;

/// Called as model bytes arrive: `bytes_done` of `bytes_total` for `model`
/// (NUL-terminated, valid only during the call).
pub type outpost_progress_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        model: *const c_char,
        bytes_done: u64,
        bytes_total: u64,
    ),
>;

static AGENTS: Registry<Handle> = Registry::new("agent handle");
static RESULTS: Registry<OwnedResult> = Registry::new("result handle");

const READ_CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy)]
struct UserData(*mut c_void);
// SAFETY: the pointer is only handed back to the app's callbacks; the app promises (see
// `outpost_agent_set_callbacks`) that it may be used from the threads that call them.
unsafe impl Send for UserData {}
// SAFETY: as above; the library never dereferences it.
unsafe impl Sync for UserData {}

#[derive(Clone, Copy)]
struct Callbacks {
    on_state: outpost_update_state_cb,
    on_progress: outpost_progress_cb,
    user_data: UserData,
}

struct UpdateInfo {
    state: outpost_update_state,
    status: outpost_status,
    error: String,
}

/// What the install hook and the entry points share.
struct Shared {
    callbacks: RwLock<Callbacks>,
    updates: Mutex<BTreeMap<String, UpdateInfo>>,
}

impl Shared {
    fn callbacks(&self) -> Callbacks {
        *self
            .callbacks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the state, then calls the app (no lock held, so the callback may call
    /// back into the library).
    fn set_state(&self, model: &str, state: outpost_update_state, failure: Option<&Failure>) {
        let status = failure.map_or(OUTPOST_OK, |f| f.status);
        {
            let mut updates = self.updates.lock().unwrap_or_else(PoisonError::into_inner);
            let info = updates.entry(model.to_string()).or_insert(UpdateInfo {
                state,
                status,
                error: String::new(),
            });
            info.state = state;
            info.status = status;
            if let Some(f) = failure {
                info.error.clone_from(&f.message);
            } else if state == OUTPOST_UPDATE_COMMITTED {
                info.error.clear();
            }
        }
        let cb = self.callbacks();
        if let Some(f) = cb.on_state {
            let name = c_name(model);
            // SAFETY: the app registered `f` for this; `name` lives across the call.
            unsafe { f(cb.user_data.0, name.as_ptr(), state, status) };
        }
    }

    /// Reports a step of the fleet link's update machine (on the link thread). Phases
    /// map to `OUTPOST_UPDATE_*`; a state already reported for the model is not repeated
    /// (LISTING and FETCHING are both DOWNLOADING). VERIFYING, and a FAILED verification,
    /// concern the whole assignment: their model name is "".
    fn link_event(&self, event: &UpdateEvent) {
        match event {
            UpdateEvent::Phase(phase) => {
                let Some((state, failure)) = link_state(phase) else {
                    return;
                };
                let model = phase.job().map_or("", |j| j.slot.as_str());
                let status = failure.as_ref().map_or(OUTPOST_OK, |f| f.status);
                let repeated = self
                    .updates
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(model)
                    .is_some_and(|u| u.state == state && u.status == status)
                    && state != OUTPOST_UPDATE_VERIFYING;
                if !repeated {
                    self.set_state(model, state, failure.as_ref());
                }
            }
            UpdateEvent::Progress { slot, done, total } => self.progress(slot, *done, *total),
            _ => {}
        }
    }

    fn progress(&self, model: &str, done: u64, total: u64) {
        let cb = self.callbacks();
        if let Some(f) = cb.on_progress {
            let name = c_name(model);
            // SAFETY: as in `set_state`.
            unsafe { f(cb.user_data.0, name.as_ptr(), done, total) };
        }
    }
}

/// The C state of a machine phase, and the failure it carries (None for IDLE: nothing to
/// report).
fn link_state(phase: &Phase) -> Option<(outpost_update_state, Option<Failure>)> {
    let failed = |f: &::outpost_agent::update::Failure| {
        Some(Failure::new(failure_status(f.kind), f.message.clone()))
    };
    Some(match phase {
        Phase::Idle => return None,
        Phase::Verifying => (OUTPOST_UPDATE_VERIFYING, None),
        Phase::Listing { .. } | Phase::Fetching { .. } => (OUTPOST_UPDATE_DOWNLOADING, None),
        Phase::Reconstructing { .. } => (OUTPOST_UPDATE_RECONSTRUCTING, None),
        Phase::Installing { .. } => (OUTPOST_UPDATE_INSTALLING, None),
        Phase::Probation { .. } => (OUTPOST_UPDATE_PROBATION, None),
        Phase::Reverting { reason, .. } => (OUTPOST_UPDATE_REVERTING, failed(reason)),
        Phase::Committed { .. } => (OUTPOST_UPDATE_COMMITTED, None),
        Phase::Failed { failure, .. } => (OUTPOST_UPDATE_FAILED, failed(failure)),
    })
}

fn failure_status(kind: FailureKind) -> outpost_status {
    match kind {
        FailureKind::Signature
        | FailureKind::Hash
        | FailureKind::Delta
        | FailureKind::Assignment => OUTPOST_ERR_INVALID_RELEASE,
        FailureKind::Gate | FailureKind::Budget => OUTPOST_ERR_GATE_REJECTED,
        FailureKind::Transfer => OUTPOST_ERR_LINK,
        FailureKind::Disk => OUTPOST_ERR_IO,
        FailureKind::Probation => OUTPOST_ERR_INFERENCE,
        _ => OUTPOST_ERR_INTERNAL,
    }
}

thread_local! {
    /// Set while this thread runs `outpost_agent_install*`: the agent's install hook
    /// reports only those installs (the link reports its own from the link thread).
    static LOCAL_INSTALL: Cell<bool> = const { Cell::new(false) };
}

fn c_name(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

struct Handle {
    agent: Arc<Agent>,
    shared: Arc<Shared>,
    /// The fleet link, when the config has `[broker]`.
    link: Option<LinkSlot>,
}

struct OwnedResult {
    prediction_id: u64,
    names: Vec<CString>,
    tensors: Vec<HostTensor>,
    class: Option<ClassProxies>,
}

/// The configuration accepted by `outpost_agent_new`: the device bundle's `agent.toml`
/// schema, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SdkConfig {
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    telemetry: TelemetryConfig,
    #[serde(default)]
    broker: Option<toml::Table>,
    #[serde(default)]
    trust: Option<toml::Table>,
    #[serde(default)]
    update: Option<toml::Table>,
    #[serde(default)]
    tags: Option<toml::Table>,
}

const DEFAULT_DEVICE_ID: &str = "outpost-app";

/// The parsed config and its raw table (the fleet link's bundle is built from it).
fn parse_config(text: &str) -> Res<(SdkConfig, toml::Table)> {
    let config =
        |e: &dyn std::fmt::Display| Failure::new(OUTPOST_ERR_CONFIG, format!("config: {e}"));
    let raw: toml::Table = text.parse().map_err(|e| config(&e))?;
    let cfg: SdkConfig = toml::from_str(text).map_err(|e| config(&e))?;
    let _ = (&cfg.trust, &cfg.update, &cfg.tags);
    Ok((cfg, raw))
}

/// The fleet link's options from a config with `[broker]`: the full `agent.toml` schema,
/// with `device_id` defaulted and `data_dir` set to the agent's.
fn link_options(mut raw: toml::Table, base: Option<&Path>, data_dir: &Path) -> Res<EmbedOptions> {
    let config =
        |e: &dyn std::fmt::Display| Failure::new(OUTPOST_ERR_CONFIG, format!("config: {e}"));
    raw.entry("device_id")
        .or_insert_with(|| toml::Value::String(DEFAULT_DEVICE_ID.to_string()));
    let dir = data_dir
        .to_str()
        .ok_or_else(|| Failure::new(OUTPOST_ERR_INVALID_ARGUMENT, "data_dir is not UTF-8"))?;
    raw.insert("data_dir".into(), toml::Value::String(dir.to_string()));
    let bundle: Bundle = toml::Value::Table(raw)
        .try_into()
        .map_err(|e: toml::de::Error| config(&e))?;
    bundle.validate().map_err(|e| config(&e))?;
    let base_dir = base.map(Path::to_path_buf).unwrap_or_default();
    // A missing or broken CA file fails here, not later on the link's thread.
    if let Some(tls) = ::outpost_agent::link::tls_settings(&bundle, &base_dir) {
        let (host, _, _) = bundle.broker_endpoint();
        ::outpost_agent::link::tls::client_config(&tls, &host).map_err(|e| config(&e))?;
    }
    Ok(EmbedOptions {
        bundle,
        base_dir,
        data_dir: data_dir.to_path_buf(),
        chunk_len: outpost_protocol::wire::CHUNK_LEN,
    })
}

fn agent_config(cfg: SdkConfig, data_dir: PathBuf) -> AgentConfig {
    let device = cfg
        .device_id
        .unwrap_or_else(|| DEFAULT_DEVICE_ID.to_string());
    let mut acfg = AgentConfig::new(data_dir, device);
    acfg.window = WindowConfig {
        max_duration_ms: u64::from(cfg.telemetry.window_secs) * 1000,
        max_count: u64::from(cfg.telemetry.window_count),
        ..WindowConfig::default()
    };
    acfg.consent = cfg.telemetry.consent;
    acfg.outbox.max_total_bytes = cfg.telemetry.outbox_max_bytes;
    acfg
}

fn open(
    (cfg, raw): (SdkConfig, toml::Table),
    base: Option<&Path>,
    data_dir: Option<&str>,
) -> Res<*mut outpost_agent> {
    let dir = match (data_dir, &cfg.data_dir) {
        (Some(d), _) => PathBuf::from(d),
        (None, Some(d)) => base.map_or_else(|| d.clone(), |b| b.join(d)),
        (None, None) => {
            return Err(Failure::new(
                OUTPOST_ERR_NULL_POINTER,
                "data_dir is NULL and the config sets no data_dir",
            ));
        }
    };
    if dir.as_os_str().is_empty() {
        return Err(Failure::new(
            OUTPOST_ERR_INVALID_ARGUMENT,
            "data_dir is empty",
        ));
    }
    let link = match cfg.broker {
        Some(_) => Some(LinkSlot::new(link_options(raw, base, &dir)?)),
        None => None,
    };
    let agent = Arc::new(Agent::open(agent_config(cfg, dir)).map_err(agent_failure)?);
    let shared = Arc::new(Shared {
        callbacks: RwLock::new(Callbacks {
            on_state: None,
            on_progress: None,
            user_data: UserData(std::ptr::null_mut()),
        }),
        updates: Mutex::new(BTreeMap::new()),
    });
    let hook = Arc::clone(&shared);
    agent.on_install_phase(move |model, phase| {
        if phase == InstallPhase::BlobStored && LOCAL_INSTALL.get() {
            hook.set_state(model, OUTPOST_UPDATE_INSTALLING, None);
        }
    });
    Ok(AGENTS.insert(Handle {
        agent,
        shared,
        link,
    }))
}

/// Maps an agent error to a status and keeps its message.
fn agent_failure(e: AgentError) -> Failure {
    let status = match &e {
        AgentError::Locked { .. } => OUTPOST_ERR_LOCKED,
        AgentError::Store { .. } | AgentError::Outbox { .. } => OUTPOST_ERR_IO,
        AgentError::UnknownModel { .. } => OUTPOST_ERR_UNKNOWN_MODEL,
        AgentError::Runtime { source, .. } => runtime_status(source),
        AgentError::Gate { .. } => OUTPOST_ERR_GATE_REJECTED,
        AgentError::Monitor { .. }
        | AgentError::InvalidRelease(_)
        | AgentError::StoredRelease { .. } => OUTPOST_ERR_INVALID_RELEASE,
        AgentError::StaleRelease { .. } | AgentError::SameBytesAsActive { .. } => {
            OUTPOST_ERR_STALE_RELEASE
        }
        AgentError::TooManyModels { .. } => OUTPOST_ERR_INVALID_ARGUMENT,
        _ => OUTPOST_ERR_INTERNAL,
    };
    Failure::new(status, e.to_string())
}

fn runtime_status(e: &RuntimeError) -> outpost_status {
    match e {
        RuntimeError::UnknownModel { .. } => OUTPOST_ERR_UNKNOWN_MODEL,
        RuntimeError::UnknownInput { .. } => OUTPOST_ERR_UNKNOWN_INPUT,
        RuntimeError::DuplicateInput { .. } => OUTPOST_ERR_INVALID_ARGUMENT,
        RuntimeError::MissingInput { .. } => OUTPOST_ERR_MISSING_INPUT,
        RuntimeError::WrongDtype { .. } | RuntimeError::UnsupportedDtype(_) => {
            OUTPOST_ERR_WRONG_DTYPE
        }
        RuntimeError::WrongShape { .. } => OUTPOST_ERR_WRONG_SHAPE,
        RuntimeError::WrongByteLength { .. } | RuntimeError::ShapeOverflow { .. } => {
            OUTPOST_ERR_WRONG_LENGTH
        }
        RuntimeError::Panic { .. } => OUTPOST_ERR_PANIC,
        _ => OUTPOST_ERR_INFERENCE,
    }
}

fn dtype_from_c(code: outpost_dtype) -> Option<DType> {
    Some(match code {
        OUTPOST_DTYPE_F32 => DType::F32,
        OUTPOST_DTYPE_F64 => DType::F64,
        OUTPOST_DTYPE_I8 => DType::I8,
        OUTPOST_DTYPE_U8 => DType::U8,
        OUTPOST_DTYPE_I16 => DType::I16,
        OUTPOST_DTYPE_I32 => DType::I32,
        OUTPOST_DTYPE_I64 => DType::I64,
        _ => return None,
    })
}

fn dtype_to_c(dtype: DType) -> outpost_dtype {
    match dtype {
        DType::F32 => OUTPOST_DTYPE_F32,
        DType::F64 => OUTPOST_DTYPE_F64,
        DType::I8 => OUTPOST_DTYPE_I8,
        DType::U8 => OUTPOST_DTYPE_U8,
        DType::I16 => OUTPOST_DTYPE_I16,
        DType::I32 => OUTPOST_DTYPE_I32,
        DType::I64 => OUTPOST_DTYPE_I64,
        _ => 0,
    }
}

fn shape_array(shape: &[usize], what: &str) -> Res<(usize, [usize; OUTPOST_MAX_RANK])> {
    if shape.len() > OUTPOST_MAX_RANK {
        return Err(Failure::new(
            OUTPOST_ERR_UNSUPPORTED,
            format!(
                "{what} has rank {} (this ABI carries at most {OUTPOST_MAX_RANK})",
                shape.len()
            ),
        ));
    }
    let mut out = [0; OUTPOST_MAX_RANK];
    out[..shape.len()].copy_from_slice(shape);
    Ok((shape.len(), out))
}

/// Copies the caller's input tensors into owned `HostTensor`s, checking every pointer,
/// dtype code, rank and byte length.
///
/// # Safety
/// As `outpost_agent_infer`'s `inputs`.
unsafe fn read_inputs(
    inputs: *const outpost_tensor,
    n_inputs: usize,
) -> Res<Vec<(String, HostTensor)>> {
    // SAFETY: forwarded caller contract.
    let inputs = unsafe { slice_arg(inputs, n_inputs, "inputs") }?;
    let mut out = Vec::with_capacity(inputs.len());
    for (i, t) in inputs.iter().enumerate() {
        // SAFETY: forwarded caller contract.
        let name = unsafe { str_arg(t.name, &format!("inputs[{i}].name")) }?;
        let dtype = dtype_from_c(t.dtype).ok_or_else(|| {
            Failure::new(
                OUTPOST_ERR_INVALID_ARGUMENT,
                format!("input {name:?}: unknown dtype code {}", t.dtype),
            )
        })?;
        if t.rank > OUTPOST_MAX_RANK {
            return Err(Failure::new(
                OUTPOST_ERR_INVALID_ARGUMENT,
                format!(
                    "input {name:?}: rank {} is above OUTPOST_MAX_RANK ({OUTPOST_MAX_RANK})",
                    t.rank
                ),
            ));
        }
        // SAFETY: forwarded caller contract.
        let shape = unsafe { slice_arg(t.shape, t.rank, &format!("input {name:?} shape")) }?;
        // SAFETY: forwarded caller contract.
        let data = unsafe {
            slice_arg(
                t.data.cast::<u8>(),
                t.byte_len,
                &format!("input {name:?} data"),
            )
        }?;
        let tensor = HostTensor::new(dtype, shape.to_vec(), data.to_vec()).map_err(|e| {
            let status = runtime_status(&e);
            Failure::new(status, format!("input {name:?}: {e}"))
        })?;
        out.push((name.to_string(), tensor));
    }
    Ok(out)
}

struct Inferred {
    prediction_id: u64,
    outputs: Vec<(String, HostTensor)>,
    class: Option<ClassProxies>,
}

/// # Safety
/// As `outpost_agent_infer`.
unsafe fn run_infer(
    agent: *const outpost_agent,
    model: *const c_char,
    inputs: *const outpost_tensor,
    n_inputs: usize,
) -> Res<Inferred> {
    let h = AGENTS.get(agent)?;
    // SAFETY: forwarded caller contract.
    let model = unsafe { str_arg(model, "model") }?;
    // SAFETY: forwarded caller contract.
    let owned = unsafe { read_inputs(inputs, n_inputs) }?;
    let (names, tensors): (Vec<String>, Vec<HostTensor>) = owned.into_iter().unzip();
    let named: Vec<(&str, HostTensor)> = names.iter().map(String::as_str).zip(tensors).collect();
    let inference = h.agent.infer(model, &named).map_err(agent_failure)?;
    Ok(Inferred {
        prediction_id: inference.prediction_id.0,
        outputs: inference.outputs,
        class: inference.class,
    })
}

fn update_state_name(state: outpost_update_state) -> &'static str {
    match state {
        OUTPOST_UPDATE_IDLE => "idle",
        OUTPOST_UPDATE_VERIFYING => "verifying",
        OUTPOST_UPDATE_DOWNLOADING => "downloading",
        OUTPOST_UPDATE_RECONSTRUCTING => "reconstructing",
        OUTPOST_UPDATE_INSTALLING => "installing",
        OUTPOST_UPDATE_PROBATION => "probation",
        OUTPOST_UPDATE_REVERTING => "reverting",
        OUTPOST_UPDATE_COMMITTED => "committed",
        OUTPOST_UPDATE_FAILED => "failed",
        _ => "unknown",
    }
}

fn install_release(h: &Handle, bytes: &[u8], release: ModelRelease) -> Res {
    let model = release.model.clone();
    h.shared.set_state(&model, OUTPOST_UPDATE_VERIFYING, None);
    LOCAL_INSTALL.set(true);
    let installed = h.agent.install(bytes, release);
    LOCAL_INSTALL.set(false);
    match installed {
        Ok(_) => {
            h.shared.set_state(&model, OUTPOST_UPDATE_COMMITTED, None);
            Ok(())
        }
        Err(e) => {
            let failure = agent_failure(e);
            h.shared
                .set_state(&model, OUTPOST_UPDATE_FAILED, Some(&failure));
            Err(failure)
        }
    }
}

fn parse_release(json: &[u8]) -> Res<ModelRelease> {
    ModelRelease::from_json(json).map_err(|e| {
        Failure::new(
            OUTPOST_ERR_INVALID_RELEASE,
            format!("release metadata: {e}"),
        )
    })
}

fn io_failure(what: &str, path: &str, e: std::io::Error) -> Failure {
    Failure::new(OUTPOST_ERR_IO, format!("{what} {path}: {e}"))
}

/// The active release of a loaded model (its io spec).
fn release_of(h: &Handle, model: &str) -> Res<ModelRelease> {
    let unknown = || {
        Failure::new(
            OUTPOST_ERR_UNKNOWN_MODEL,
            format!("no model {model:?} is loaded"),
        )
    };
    if !h.agent.models().iter().any(|m| m == model) {
        return Err(unknown());
    }
    let slot = h
        .agent
        .store()
        .slot(model)
        .map_err(|e| Failure::new(OUTPOST_ERR_IO, format!("reading model slot: {e}")))?
        .ok_or_else(unknown)?;
    parse_release(slot.active.release_json.as_bytes())
}

fn status_list(h: &Handle) -> Res<Vec<::outpost_agent::ModelStatus>> {
    h.agent.status().map_err(agent_failure)
}

/// Opens an agent on a data directory. `config_toml` is a TOML string in the schema of
/// the device bundle's `agent.toml` with every key optional (`device_id`, `data_dir`,
/// `[telemetry]`: `consent`, `window_secs`, `window_count`, `outbox_max_bytes`), or NULL
/// for the defaults. With a `[broker]` section the config follows the full `agent.toml`
/// schema (`[broker]`, `[trust]`, `[update]`; `device_id` defaults to "outpost-app") and
/// the handle gets a fleet link, started by `outpost_agent_start_link` (a broken
/// bundle, or an `mqtts://` one whose CA file is unusable, fails with `OUTPOST_ERR_CONFIG`);
/// relative paths in it (trust root, password file) are relative to the current
/// directory. `data_dir` (created if missing) overrides the config's `data_dir`; it may be
/// NULL only if the config sets one.
///
/// On success `*out_agent` is a new handle to release with `outpost_agent_free`; on
/// failure it is set to NULL. Opening loads and re-validates every installed model
/// (golden vectors), so it can take a moment. One data directory is used by one handle at
/// a time: a second open fails with `OUTPOST_ERR_LOCKED`. Thread-safe.
///
/// # Safety
/// `config_toml` and `data_dir` must be NULL or NUL-terminated strings; `out_agent` must
/// be valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_new(
    config_toml: *const c_char,
    data_dir: *const c_char,
    out_agent: *mut *mut outpost_agent,
) -> outpost_status {
    guard(|| {
        // SAFETY: caller contract.
        unsafe { write_out(out_agent, std::ptr::null_mut(), "out_agent") }?;
        let cfg = if config_toml.is_null() {
            (SdkConfig::default(), toml::Table::new())
        } else {
            // SAFETY: caller contract.
            parse_config(unsafe { str_arg(config_toml, "config_toml") }?)?
        };
        let dir = if data_dir.is_null() {
            None
        } else {
            // SAFETY: caller contract.
            Some(unsafe { str_arg(data_dir, "data_dir") }?)
        };
        let agent = open(cfg, None, dir)?;
        // SAFETY: caller contract (checked non-null above).
        unsafe { out_agent.write(agent) };
        Ok(())
    })
}

/// `outpost_agent_new` with the configuration read from the file `config_path` (a device
/// bundle's `agent.toml` works as is); relative paths in it (`data_dir`, trust root,
/// password file) are relative to the file's directory. Thread-safe.
///
/// # Safety
/// `config_path` must be a NUL-terminated string; `data_dir` NULL or a NUL-terminated
/// string; `out_agent` valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_new_from_file(
    config_path: *const c_char,
    data_dir: *const c_char,
    out_agent: *mut *mut outpost_agent,
) -> outpost_status {
    guard(|| {
        // SAFETY: caller contract.
        unsafe { write_out(out_agent, std::ptr::null_mut(), "out_agent") }?;
        // SAFETY: caller contract.
        let path = unsafe { str_arg(config_path, "config_path") }?;
        let text =
            std::fs::read_to_string(path).map_err(|e| io_failure("reading config", path, e))?;
        let cfg = parse_config(&text)?;
        let dir = if data_dir.is_null() {
            None
        } else {
            // SAFETY: caller contract.
            Some(unsafe { str_arg(data_dir, "data_dir") }?)
        };
        let base = Path::new(path).parent();
        let agent = open(cfg, base, dir)?;
        // SAFETY: caller contract (checked non-null above).
        unsafe { out_agent.write(agent) };
        Ok(())
    })
}

/// Stops the fleet link (if it runs: waits for its thread, and for a validation gate in
/// progress on it), flushes telemetry (every open window) to the outbox and releases the
/// handle. From a callback on the link thread it fails with
/// `OUTPOST_ERR_INVALID_ARGUMENT` and frees nothing.
/// `outpost_agent_free(NULL)` does nothing and returns `OUTPOST_OK`; a handle already
/// freed returns `OUTPOST_ERR_INVALID_HANDLE` (detected: handles are never reused).
/// If the flush fails the handle is still released and the flush's status returned.
///
/// Calls already running on other threads finish normally; the data directory is
/// unlocked when the last of them returns. Calls made after this one fail with
/// `OUTPOST_ERR_INVALID_HANDLE`.
///
/// # Safety
/// `agent` must be NULL or a value returned by `outpost_agent_new*` (freed or not).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_free(agent: *mut outpost_agent) -> outpost_status {
    guard(|| {
        if agent.is_null() {
            return Ok(());
        }
        if let Some(link) = &AGENTS.get(agent)?.link {
            link.check_not_link_thread("outpost_agent_free")?;
        }
        let h = AGENTS.remove(agent)?;
        // A link that had failed by itself is not this call's failure.
        let _ = h.link.as_ref().map(LinkSlot::stop);
        h.agent.close().map_err(agent_failure)?;
        Ok(())
    })
}

/// Registers the update callbacks (either may be NULL) and the `user_data` passed to
/// them, replacing earlier ones. `on_state` is called at each update state change of a
/// model, `on_progress` as model bytes arrive. They run synchronously on the thread
/// driving the update: for local installs, the thread calling `outpost_agent_install*`;
/// for fleet updates, the link thread (`outpost-link`), which does nothing else
/// meanwhile, so return quickly. They may call any `outpost_*` function except
/// `outpost_agent_free` and `outpost_agent_stop_link` on the same handle (detected on
/// the link thread: `OUTPOST_ERR_INVALID_ARGUMENT`). Register them before
/// `outpost_agent_start_link` to see every state. Thread-safe.
///
/// # Safety
/// `agent` must be a handle (checked); the callbacks must be safe to call with
/// `user_data` from any thread that installs models and from the link thread, until
/// replaced or the handle freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_set_callbacks(
    agent: *mut outpost_agent,
    on_state: outpost_update_state_cb,
    on_progress: outpost_progress_cb,
    user_data: *mut c_void,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        *h.shared
            .callbacks
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Callbacks {
            on_state,
            on_progress,
            user_data: UserData(user_data),
        };
        Ok(())
    })
}

/// Starts the fleet link of a handle opened with `[broker]`: one library-owned thread
/// (`outpost-link`) connects to the broker, follows the device's director assignments,
/// and installs the releases they name (verify, fetch in resumable chunks, reconstruct,
/// validation gate, atomic swap, probation, commit or revert), reporting each state and
/// the download progress to the callbacks from that thread. It also ticks the agent each
/// second and uploads telemetry. Inference and local installs keep working meanwhile on
/// the same models. Returns at once (connecting happens on the thread, and reconnects
/// with back-off); `OUTPOST_OK` if the link runs already; `OUTPOST_ERR_NOT_FOUND` if the
/// config has no `[broker]`. Thread-safe.
///
/// # Safety
/// `agent` must be a handle (checked).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_start_link(agent: *mut outpost_agent) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        let link = h.link.as_ref().ok_or_else(no_link)?;
        let shared = Arc::clone(&h.shared);
        link.start(Arc::clone(&h.agent), move |ev| shared.link_event(ev))
    })
}

/// Stops the fleet link and waits for its thread (and for a validation gate in
/// progress on it); the agent stays open and an interrupted update resumes at the next
/// `outpost_agent_start_link` or open. `OUTPOST_OK` if the link does not run;
/// `OUTPOST_ERR_LINK` if it had stopped by itself with an error (the message says why);
/// `OUTPOST_ERR_INVALID_ARGUMENT` from a callback on the link thread;
/// `OUTPOST_ERR_NOT_FOUND` without `[broker]`. Thread-safe.
///
/// # Safety
/// `agent` must be a handle (checked).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_stop_link(agent: *mut outpost_agent) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        h.link.as_ref().ok_or_else(no_link)?.stop()
    })
}

/// Writes whether the fleet link's thread runs to `*out_running` (false before
/// `outpost_agent_start_link`, after `outpost_agent_stop_link`, and when it stopped by
/// itself). Returns `OUTPOST_ERR_LINK` (and writes false) if it stopped by itself with
/// an error, `OUTPOST_ERR_NOT_FOUND` without `[broker]`. A link that cannot reach the
/// broker still runs (it retries). Thread-safe.
///
/// # Safety
/// `agent` must be a handle (checked); `out_running` valid for writing a `bool`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_link_running(
    agent: *mut outpost_agent,
    out_running: *mut bool,
) -> outpost_status {
    guard(|| {
        // SAFETY: caller contract.
        unsafe { write_out(out_running, false, "out_running") }?;
        let h = AGENTS.get(agent)?;
        let (running, ended) = h.link.as_ref().ok_or_else(no_link)?.state();
        // SAFETY: caller contract (checked non-null above).
        unsafe { out_running.write(running) };
        match ended {
            Some(why) if !running => Err(Failure::new(OUTPOST_ERR_LINK, why)),
            _ => Ok(()),
        }
    })
}

fn no_link() -> Failure {
    Failure::new(
        OUTPOST_ERR_NOT_FOUND,
        "this agent has no fleet link (its config has no [broker] section)",
    )
}

/// Installs a model from files: `model_path` (the ONNX file) and `release_path` (its
/// release metadata JSON, `NAME.release.json`). Reports DOWNLOADING with progress while
/// the file is read, then VERIFYING, INSTALLING (validation gate), and COMMITTED or
/// FAILED. On success the new release serves every later inference (calls in flight
/// finish on the old one); on failure the previous release keeps serving and
/// `outpost_agent_model_last_error` keeps the reason. Installing the active release again
/// is a no-op that succeeds. Installs are serialized; inference continues meanwhile.
/// Thread-safe.
///
/// # Safety
/// `model_path` and `release_path` must be NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_install_file(
    agent: *mut outpost_agent,
    model_path: *const c_char,
    release_path: *const c_char,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        let model_path = unsafe { str_arg(model_path, "model_path") }?;
        // SAFETY: caller contract.
        let release_path = unsafe { str_arg(release_path, "release_path") }?;
        let json = std::fs::read(release_path)
            .map_err(|e| io_failure("reading release", release_path, e))?;
        let release = parse_release(&json)?;
        let name = release.model.clone();
        h.shared.set_state(&name, OUTPOST_UPDATE_DOWNLOADING, None);
        let read = || -> Res<Vec<u8>> {
            let mut file = std::fs::File::open(model_path)
                .map_err(|e| io_failure("opening model", model_path, e))?;
            let total = file
                .metadata()
                .map_err(|e| io_failure("reading model", model_path, e))?
                .len();
            let mut bytes = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
            let mut chunk = vec![0u8; READ_CHUNK];
            h.shared.progress(&name, 0, total);
            loop {
                let n = file
                    .read(&mut chunk)
                    .map_err(|e| io_failure("reading model", model_path, e))?;
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&chunk[..n]);
                h.shared
                    .progress(&name, bytes.len() as u64, total.max(bytes.len() as u64));
            }
            Ok(bytes)
        };
        let bytes = match read() {
            Ok(b) => b,
            Err(f) => {
                h.shared.set_state(&name, OUTPOST_UPDATE_FAILED, Some(&f));
                return Err(f);
            }
        };
        install_release(&h, &bytes, release)
    })
}

/// `outpost_agent_install_file` from memory: `model` (`model_len` bytes of ONNX) and
/// `release_json` (`release_len` bytes of release metadata JSON). Both are copied as
/// needed; the caller keeps ownership. Thread-safe.
///
/// # Safety
/// `model` must be valid for reading `model_len` bytes and `release_json` for
/// `release_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_install(
    agent: *mut outpost_agent,
    model: *const u8,
    model_len: usize,
    release_json: *const u8,
    release_len: usize,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        let bytes = unsafe { slice_arg(model, model_len, "model") }?;
        // SAFETY: caller contract.
        let json = unsafe { slice_arg(release_json, release_len, "release_json") }?;
        let release = parse_release(json)?;
        let name = release.model.clone();
        h.shared.set_state(&name, OUTPOST_UPDATE_DOWNLOADING, None);
        h.shared
            .progress(&name, bytes.len() as u64, bytes.len() as u64);
        install_release(&h, bytes, release)
    })
}

/// Makes the kept previous release of `model` active again (REVERTING, then IDLE).
/// `OUTPOST_ERR_NOT_FOUND` when there is none. Thread-safe (serialized with installs).
///
/// # Safety
/// `model` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_revert(
    agent: *mut outpost_agent,
    model: *const c_char,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        let model = unsafe { str_arg(model, "model") }?;
        h.shared.set_state(model, OUTPOST_UPDATE_REVERTING, None);
        match h.agent.revert(model) {
            Ok(_) => {
                h.shared.set_state(model, OUTPOST_UPDATE_IDLE, None);
                Ok(())
            }
            Err(e) => {
                let no_previous = matches!(
                    &e,
                    AgentError::Store {
                        source: ::outpost_agent::store::StoreError::NoPrevious { .. },
                        ..
                    }
                );
                let mut failure = agent_failure(e);
                if no_previous {
                    failure.status = OUTPOST_ERR_NOT_FOUND;
                }
                h.shared
                    .set_state(model, OUTPOST_UPDATE_FAILED, Some(&failure));
                Err(failure)
            }
        }
    })
}

/// Runs the active release of `model` on `n_inputs` named input tensors and writes the
/// outputs, in the model's output order, into the caller's `outputs[0..n_outputs]`
/// (`n_outputs` may be smaller than the model's output count; NULL when 0). Sets
/// `*out_prediction_id` (for `outpost_agent_report_label`).
///
/// If an output does not fit its `capacity`, the call returns
/// `OUTPOST_ERR_BUFFER_TOO_SMALL` after setting every output's `byte_len`, `dtype`,
/// `rank` and `shape`, writing the outputs that fit and the prediction id: the inference
/// ran and counts. `n_outputs` above the model's output count is
/// `OUTPOST_ERR_INVALID_ARGUMENT` (also after running). Input errors
/// (`OUTPOST_ERR_UNKNOWN_MODEL`, `_UNKNOWN_INPUT`, `_MISSING_INPUT`, `_WRONG_DTYPE`,
/// `_WRONG_SHAPE`, `_WRONG_LENGTH`) are found before running.
///
/// Thread-safe: any number of threads may call this at once on one handle. No disk I/O.
///
/// # Safety
/// `model` must be a NUL-terminated string; `inputs` valid for reading `n_inputs`
/// elements whose `name`, `shape` and `data` pointers are valid as `outpost_tensor`
/// documents; `outputs` valid for reading and writing `n_outputs` elements, each `data`
/// valid for writing `capacity` bytes; `out_prediction_id` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_infer(
    agent: *mut outpost_agent,
    model: *const c_char,
    inputs: *const outpost_tensor,
    n_inputs: usize,
    outputs: *mut outpost_output,
    n_outputs: usize,
    out_prediction_id: *mut u64,
) -> outpost_status {
    guard(|| {
        if out_prediction_id.is_null() {
            return Err(null("out_prediction_id"));
        }
        if outputs.is_null() && n_outputs != 0 {
            return Err(null("outputs"));
        }
        // SAFETY: caller contract.
        let inferred = unsafe { run_infer(agent, model, inputs, n_inputs) }?;
        // SAFETY: checked non-null; caller contract.
        unsafe { out_prediction_id.write(inferred.prediction_id) };
        if n_outputs > inferred.outputs.len() {
            return Err(Failure::new(
                OUTPOST_ERR_INVALID_ARGUMENT,
                format!(
                    "n_outputs is {n_outputs} but the model has {} outputs",
                    inferred.outputs.len()
                ),
            ));
        }
        let slots: &mut [outpost_output] = if n_outputs == 0 {
            &mut []
        } else {
            // SAFETY: non-null (checked), `n_outputs` elements per the caller's contract.
            unsafe { std::slice::from_raw_parts_mut(outputs, n_outputs) }
        };
        let mut short = Vec::new();
        for (slot, (name, t)) in slots.iter_mut().zip(&inferred.outputs) {
            let (rank, shape) = shape_array(&t.shape, &format!("output {name:?}"))?;
            slot.byte_len = t.data.len();
            slot.dtype = dtype_to_c(t.dtype);
            slot.rank = rank;
            slot.shape = shape;
            if t.data.len() > slot.capacity {
                short.push(format!(
                    "{name:?} needs {} bytes, capacity {}",
                    t.data.len(),
                    slot.capacity
                ));
                continue;
            }
            if !t.data.is_empty() {
                if slot.data.is_null() {
                    return Err(null(&format!("output buffer for {name:?}")));
                }
                // SAFETY: `data` holds `capacity >= len` writable bytes per the contract.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        t.data.as_ptr(),
                        slot.data.cast::<u8>(),
                        t.data.len(),
                    );
                }
            }
        }
        if short.is_empty() {
            Ok(())
        } else {
            Err(Failure::new(
                OUTPOST_ERR_BUFFER_TOO_SMALL,
                format!("output buffers too small: {}", short.join("; ")),
            ))
        }
    })
}

/// `outpost_agent_infer` with library-owned outputs: on success `*out_result` is a new
/// result (read it with `outpost_result_*`, release it with `outpost_result_free`); on
/// failure it is set to NULL. Thread-safe as `outpost_agent_infer`.
///
/// # Safety
/// As `outpost_agent_infer` for `model` and `inputs`; `out_result` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_infer_owned(
    agent: *mut outpost_agent,
    model: *const c_char,
    inputs: *const outpost_tensor,
    n_inputs: usize,
    out_result: *mut *mut outpost_result,
) -> outpost_status {
    guard(|| {
        // SAFETY: caller contract.
        unsafe { write_out(out_result, std::ptr::null_mut(), "out_result") }?;
        // SAFETY: caller contract.
        let inferred = unsafe { run_infer(agent, model, inputs, n_inputs) }?;
        let mut names = Vec::with_capacity(inferred.outputs.len());
        let mut tensors = Vec::with_capacity(inferred.outputs.len());
        for (name, t) in inferred.outputs {
            shape_array(&t.shape, &format!("output {name:?}"))?;
            names.push(c_name(&name));
            tensors.push(t);
        }
        let result = RESULTS.insert(OwnedResult {
            prediction_id: inferred.prediction_id,
            names,
            tensors,
            class: inferred.class,
        });
        // SAFETY: checked non-null above.
        unsafe { out_result.write(result) };
        Ok(())
    })
}

/// The prediction id of a result. Thread-safe.
///
/// # Safety
/// `out_prediction_id` must be valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_result_prediction_id(
    result: *const outpost_result,
    out_prediction_id: *mut u64,
) -> outpost_status {
    guard(|| {
        let r = RESULTS.get(result)?;
        // SAFETY: caller contract.
        unsafe { write_out(out_prediction_id, r.prediction_id, "out_prediction_id") }
    })
}

/// The number of outputs of a result. Thread-safe.
///
/// # Safety
/// `out_count` must be valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_result_output_count(
    result: *const outpost_result,
    out_count: *mut usize,
) -> outpost_status {
    guard(|| {
        let r = RESULTS.get(result)?;
        // SAFETY: caller contract.
        unsafe { write_out(out_count, r.tensors.len(), "out_count") }
    })
}

/// A view of output `index` (model order). Its pointers stay valid until
/// `outpost_result_free(result)`. `OUTPOST_ERR_INVALID_ARGUMENT` if `index` is out of
/// range. Thread-safe.
///
/// # Safety
/// `out_view` must be valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_result_output(
    result: *const outpost_result,
    index: usize,
    out_view: *mut outpost_tensor_view,
) -> outpost_status {
    guard(|| {
        let r = RESULTS.get(result)?;
        let (Some(t), Some(name)) = (r.tensors.get(index), r.names.get(index)) else {
            return Err(Failure::new(
                OUTPOST_ERR_INVALID_ARGUMENT,
                format!(
                    "output index {index} out of range ({} outputs)",
                    r.tensors.len()
                ),
            ));
        };
        let (rank, shape) = shape_array(&t.shape, "output")?;
        let view = outpost_tensor_view {
            name: name.as_ptr(),
            dtype: dtype_to_c(t.dtype),
            rank,
            shape,
            data: t.data.as_ptr().cast(),
            byte_len: t.data.len(),
        };
        // SAFETY: caller contract.
        unsafe { write_out(out_view, view, "out_view") }
    })
}

/// The classifier reading of a result: predicted class index and its top-1 probability
/// (softmax of logits where needed). `OUTPOST_ERR_NOT_FOUND` when the model's release
/// declares no classifier output. Thread-safe.
///
/// # Safety
/// `out_class` and `out_probability` must be valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_result_class(
    result: *const outpost_result,
    out_class: *mut u32,
    out_probability: *mut f32,
) -> outpost_status {
    guard(|| {
        let r = RESULTS.get(result)?;
        if out_class.is_null() {
            return Err(null("out_class"));
        }
        if out_probability.is_null() {
            return Err(null("out_probability"));
        }
        let c = r.class.ok_or_else(|| {
            Failure::new(OUTPOST_ERR_NOT_FOUND, "the model has no classifier output")
        })?;
        // SAFETY: checked non-null; caller contract.
        unsafe {
            out_class.write(c.class);
            out_probability.write(c.top1);
        }
        Ok(())
    })
}

/// Releases a result. `NULL` does nothing; a result already freed returns
/// `OUTPOST_ERR_INVALID_HANDLE`. Thread-safe, but views of the result must no longer be
/// used once it returns.
///
/// # Safety
/// `result` must be NULL or a value returned by `outpost_agent_infer_owned`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_result_free(result: *mut outpost_result) -> outpost_status {
    guard(|| {
        if result.is_null() {
            return Ok(());
        }
        RESULTS.remove(result).map(drop)
    })
}

/// Number of inputs and outputs of the loaded model `model`. Thread-safe.
///
/// # Safety
/// `model` must be a NUL-terminated string; `out_inputs` and `out_outputs` valid for
/// writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_model_io_count(
    agent: *mut outpost_agent,
    model: *const c_char,
    out_inputs: *mut usize,
    out_outputs: *mut usize,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        let model = unsafe { str_arg(model, "model") }?;
        if out_inputs.is_null() {
            return Err(null("out_inputs"));
        }
        if out_outputs.is_null() {
            return Err(null("out_outputs"));
        }
        let release = release_of(&h, model)?;
        // SAFETY: checked non-null; caller contract.
        unsafe {
            out_inputs.write(release.io.inputs.len());
            out_outputs.write(release.io.outputs.len());
        }
        Ok(())
    })
}

/// # Safety
/// As `outpost_agent_model_input`.
#[allow(clippy::too_many_arguments)] // the C signature plus the input/output switch
unsafe fn io_spec(
    agent: *mut outpost_agent,
    model: *const c_char,
    index: usize,
    output: bool,
    name: *mut c_char,
    name_len: usize,
    out_name_len: *mut usize,
    out_spec: *mut outpost_tensor_spec,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        let model = unsafe { str_arg(model, "model") }?;
        if out_spec.is_null() {
            return Err(null("out_spec"));
        }
        let release = release_of(&h, model)?;
        let found = if output {
            release
                .io
                .outputs
                .get(index)
                .map(|o| (o.name.clone(), o.dtype, o.shape.clone()))
        } else {
            release
                .io
                .inputs
                .get(index)
                .map(|i| (i.name.clone(), i.dtype, i.shape.clone()))
        };
        let (tensor_name, dtype, shape) = found.ok_or_else(|| {
            Failure::new(
                OUTPOST_ERR_INVALID_ARGUMENT,
                format!(
                    "{} index {index} out of range for model {model:?}",
                    if output { "output" } else { "input" }
                ),
            )
        })?;
        let (rank, shape) = shape_array(&shape, &tensor_name)?;
        // SAFETY: checked non-null; caller contract.
        unsafe {
            out_spec.write(outpost_tensor_spec {
                dtype: dtype_to_c(dtype),
                rank,
                shape,
            });
        }
        // SAFETY: caller contract.
        unsafe { copy_str(&tensor_name, name, name_len, out_name_len) }
    })
}

/// The spec of input `index` of the loaded model `model`: its name copied into `name`
/// (`name_len` bytes, NUL-terminated; `*out_name_len` = name length if `out_name_len`
/// is not NULL; `OUTPOST_ERR_BUFFER_TOO_SMALL` after a truncated copy if it does not
/// fit, with `*out_spec` written) and its dtype and shape in `*out_spec`. Thread-safe.
///
/// # Safety
/// `model` must be a NUL-terminated string; `name` NULL (only with `name_len` 0) or
/// valid for writing `name_len` bytes; `out_name_len` NULL or writable; `out_spec`
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_model_input(
    agent: *mut outpost_agent,
    model: *const c_char,
    index: usize,
    name: *mut c_char,
    name_len: usize,
    out_name_len: *mut usize,
    out_spec: *mut outpost_tensor_spec,
) -> outpost_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        io_spec(
            agent,
            model,
            index,
            false,
            name,
            name_len,
            out_name_len,
            out_spec,
        )
    }
}

/// As `outpost_agent_model_input`, for output `index`.
///
/// # Safety
/// As `outpost_agent_model_input`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_model_output(
    agent: *mut outpost_agent,
    model: *const c_char,
    index: usize,
    name: *mut c_char,
    name_len: usize,
    out_name_len: *mut usize,
    out_spec: *mut outpost_tensor_spec,
) -> outpost_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        io_spec(
            agent,
            model,
            index,
            true,
            name,
            name_len,
            out_name_len,
            out_spec,
        )
    }
}

/// Reports the true class index `label` of an earlier prediction. `OUTPOST_OK` when it
/// joined (then `*out_correct`, if `out_correct` is not NULL, says whether the prediction
/// was right), `OUTPOST_ERR_UNKNOWN_PREDICTION` (never made, already labelled, made
/// before the agent reopened) or `OUTPOST_ERR_LABEL_EXPIRED` (after the retention
/// window, 10 minutes by default). Labels reach the outbox at the next tick.
/// Thread-safe; no disk I/O.
///
/// # Safety
/// `out_correct` must be NULL or valid for writing a `bool`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_report_label(
    agent: *mut outpost_agent,
    prediction_id: u64,
    label: u32,
    out_correct: *mut bool,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        match h.agent.report_label(PredictionId(prediction_id), label) {
            LabelOutcome::Joined { correct } => {
                if !out_correct.is_null() {
                    // SAFETY: non-null, caller contract.
                    unsafe { out_correct.write(correct) };
                }
                Ok(())
            }
            LabelOutcome::Unknown => Err(Failure::new(
                OUTPOST_ERR_UNKNOWN_PREDICTION,
                format!("no pending prediction {prediction_id:016x}"),
            )),
            LabelOutcome::Expired => Err(Failure::new(
                OUTPOST_ERR_LABEL_EXPIRED,
                format!("prediction {prediction_id:016x} left the label retention window"),
            )),
        }
    })
}

/// Allows (`true`) or forbids data collection (retraining samples of low-confidence
/// inputs) for every model. Forbidding discards every sample not yet written. Off unless
/// the config or this call turns it on. Thread-safe.
///
/// # Safety
/// `agent` is checked; no other pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_set_consent(
    agent: *mut outpost_agent,
    allowed: bool,
) -> outpost_status {
    guard(|| {
        AGENTS.get(agent)?.agent.set_consent(allowed);
        Ok(())
    })
}

/// Whether data collection is allowed. Thread-safe.
///
/// # Safety
/// `out_allowed` must be valid for writing a `bool`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_consent(
    agent: *mut outpost_agent,
    out_allowed: *mut bool,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        unsafe { write_out(out_allowed, h.agent.consent(), "out_allowed") }
    })
}

/// Number of model slots (installed models), for `outpost_agent_model_name`.
/// Thread-safe.
///
/// # Safety
/// `out_count` must be valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_model_count(
    agent: *mut outpost_agent,
    out_count: *mut usize,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        if out_count.is_null() {
            return Err(null("out_count"));
        }
        let n = status_list(&h)?.len();
        // SAFETY: checked non-null.
        unsafe { out_count.write(n) };
        Ok(())
    })
}

/// The name of model slot `index` (sorted by name) copied into `buf` (see
/// `outpost_last_error` for the buffer rules). `OUTPOST_ERR_INVALID_ARGUMENT` if `index`
/// is out of range. Thread-safe.
///
/// # Safety
/// `buf` NULL (only with `len` 0) or valid for writing `len` bytes; `out_len` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_model_name(
    agent: *mut outpost_agent,
    index: usize,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        let list = status_list(&h)?;
        let st = list.get(index).ok_or_else(|| {
            Failure::new(
                OUTPOST_ERR_INVALID_ARGUMENT,
                format!("model index {index} out of range ({} models)", list.len()),
            )
        })?;
        // SAFETY: caller contract.
        unsafe { copy_str(&st.model, buf, len, out_len) }
    })
}

/// The state of model `model`: active and previous release sequences, exec path, update
/// state and status, counters. `OUTPOST_ERR_UNKNOWN_MODEL` if the model was never
/// installed nor offered. Thread-safe (reads the store).
///
/// # Safety
/// `model` must be a NUL-terminated string; `out_status` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_model_status(
    agent: *mut outpost_agent,
    model: *const c_char,
    out_status: *mut outpost_model_status,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        let model = unsafe { str_arg(model, "model") }?;
        if out_status.is_null() {
            return Err(null("out_status"));
        }
        let list = status_list(&h)?;
        let st = list.iter().find(|s| s.model == model);
        let (state, update_status) = {
            let updates = h
                .shared
                .updates
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match updates.get(model) {
                Some(u) => (Some(u.state), u.status),
                None => (None, OUTPOST_OK),
            }
        };
        if st.is_none() && state.is_none() {
            return Err(Failure::new(
                OUTPOST_ERR_UNKNOWN_MODEL,
                format!("no model {model:?} was installed"),
            ));
        }
        let counts = st.map(|s| s.counts).unwrap_or_default();
        let out = outpost_model_status {
            loaded: st.is_some_and(|s| s.exec_path.is_some()),
            dequantized: st.is_some_and(|s| s.exec_path == Some(ExecPath::Dequantized)),
            active_sequence: st.map_or(0, |s| s.active.sequence),
            previous_sequence: st
                .and_then(|s| s.previous.as_ref())
                .map_or(0, |p| p.sequence),
            update_state: state.unwrap_or(OUTPOST_UPDATE_IDLE),
            update_status,
            inferences: counts.inferences,
            errors: counts.errors,
            labels_joined: counts.labels_joined,
            labels_unknown: counts.labels_unknown,
            labels_expired: counts.labels_expired,
        };
        // SAFETY: checked non-null.
        unsafe { out_status.write(out) };
        Ok(())
    })
}

/// The version string of the active release of `model` copied into `buf` (buffer rules
/// of `outpost_last_error`). `OUTPOST_ERR_UNKNOWN_MODEL` if none is active. Thread-safe.
///
/// # Safety
/// `model` must be a NUL-terminated string; `buf` NULL (only with `len` 0) or valid for
/// writing `len` bytes; `out_len` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_model_version(
    agent: *mut outpost_agent,
    model: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        let model = unsafe { str_arg(model, "model") }?;
        let list = status_list(&h)?;
        let st = list.iter().find(|s| s.model == model).ok_or_else(|| {
            Failure::new(
                OUTPOST_ERR_UNKNOWN_MODEL,
                format!("no release of {model:?} is active"),
            )
        })?;
        // SAFETY: caller contract.
        unsafe { copy_str(&st.active.version, buf, len, out_len) }
    })
}

/// The message of the last failed update of `model` (empty if none, or once an update
/// committed) copied into `buf` (buffer rules of `outpost_last_error`). Thread-safe.
///
/// # Safety
/// As `outpost_agent_model_version`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_model_last_error(
    agent: *mut outpost_agent,
    model: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        // SAFETY: caller contract.
        let model = unsafe { str_arg(model, "model") }?;
        let message = h
            .shared
            .updates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .map(|u| u.error.clone())
            .unwrap_or_default();
        // SAFETY: caller contract.
        unsafe { copy_str(&message, buf, len, out_len) }
    })
}

/// The whole status as JSON copied into `buf` (buffer rules of `outpost_last_error`; call
/// with `len` 0 to learn the size): `{"version", "consent", "models": [{model, active,
/// previous, exec_path, path_reason, counts, update_state, update_error}]}`. Thread-safe.
///
/// # Safety
/// `buf` NULL (only with `len` 0) or valid for writing `len` bytes; `out_len` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_status_json(
    agent: *mut outpost_agent,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        let list = status_list(&h)?;
        let updates = h
            .shared
            .updates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut models = Vec::new();
        let mut names: Vec<&str> = list.iter().map(|s| s.model.as_str()).collect();
        names.extend(updates.keys().map(String::as_str));
        names.sort_unstable();
        names.dedup();
        for name in names {
            let mut v = list
                .iter()
                .find(|s| s.model == name)
                .and_then(|s| serde_json::to_value(s).ok())
                .unwrap_or_else(|| serde_json::json!({ "model": name, "active": null }));
            if let Some(obj) = v.as_object_mut() {
                let u = updates.get(name);
                obj.insert(
                    "update_state".into(),
                    update_state_name(u.map_or(OUTPOST_UPDATE_IDLE, |u| u.state)).into(),
                );
                obj.insert(
                    "update_error".into(),
                    u.map(|u| u.error.clone()).unwrap_or_default().into(),
                );
            }
            models.push(v);
        }
        drop(updates);
        let json = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "consent": h.agent.consent(),
            "models": models,
        })
        .to_string();
        // SAFETY: caller contract.
        unsafe { copy_str(&json, buf, len, out_len) }
    })
}

/// The I/O step: closes monitoring windows that are due and writes window summaries,
/// joined labels and (with consent) samples to the on-disk outbox in one transaction.
/// Call it regularly (about once a second) from one thread the app owns; inference never
/// touches the disk itself. The library starts no thread. Thread-safe.
///
/// # Safety
/// `agent` is checked; no other pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn outpost_agent_tick(agent: *mut outpost_agent) -> outpost_status {
    guard(|| {
        let h = AGENTS.get(agent)?;
        h.agent.tick(Instant::now()).map_err(agent_failure)?;
        Ok(())
    })
}
