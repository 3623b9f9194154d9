//! The inference runtime: ONNX models compiled with tract, served by name.
//!
//! - [`OnnxSource`] decodes model bytes; [`OnnxSource::compile`] builds a [`Model`] (a tract
//!   plan plus its io spec) for one [`ExecPath`]: the graph as shipped, or, for QDQ models,
//!   a [dequantized](dequant) float rewrite that tract runs much faster.
//! - [`Runtime`] holds the active models by name. [`Runtime::infer`] takes `&self` and
//!   runs from many threads at once; [`Runtime::activate`] swaps a model in without
//!   blocking or failing calls in flight: they keep their `Arc<Model>` and finish on the
//!   old plan.
//! - Which path a model runs, and whether it may run at all, is the validation gate's
//!   decision ([`crate::gate`]).
//!
//! Panics inside tract are caught (`catch_unwind`) and returned as
//! [`RuntimeError::Panic`]. This needs `panic = "unwind"`: under the `device` profile
//! (`panic = "abort"`, chosen for binary size) a tract panic still aborts the process,
//! and the update machine's probation (crash -> revert to the kept model) is what
//! recovers from it.
//!
//! ```no_run
//! use outpost_agent::runtime::{ExecPath, HostTensor, OnnxSource, Runtime};
//! use outpost_protocol::release::{DType, TensorSpec};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bytes = std::fs::read("digits_mlp.onnx")?;
//! let spec = TensorSpec { name: "x".into(), dtype: DType::F32, shape: vec![1, 64] };
//! let model = OnnxSource::decode(&bytes)?.compile("digits", &[spec], ExecPath::AsShipped)?;
//! let runtime = Runtime::new();
//! runtime.activate(model);
//! let x = HostTensor::from_f32(vec![1, 64], &[0.0; 64])?;
//! let result = runtime.infer("digits", [("x", &x)])?;
//! println!("{} -> {:?}", result.prediction_id, result.outputs[0].1.to_f32_vec());
//! # Ok(()) }
//! ```

pub mod dequant;
mod error;
mod model;
mod tensor;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

pub use dequant::{DequantStats, Quantization};
pub use error::RuntimeError;
pub use model::{ExecPath, Model, OnnxSource};
pub use tensor::{HostTensor, dtype_name};

/// Identifies one inference so that a later label can be joined to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PredictionId(pub u64);

impl std::fmt::Display for PredictionId {
    /// 16 lowercase hex digits (JSON carries it as a string: it does not fit a double).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Source of prediction ids; the monitor/outbox can install its own.
pub type IdSource = Box<dyn Fn() -> u64 + Send + Sync>;

/// The result of [`Runtime::infer`].
#[derive(Debug)]
pub struct Inference {
    /// Id of this inference.
    pub prediction_id: PredictionId,
    /// Outputs in model order.
    pub outputs: Vec<(String, HostTensor)>,
    /// The model that computed them (the one active when the call started).
    pub model: Arc<Model>,
    /// Wall time of the tract run, input conversion included.
    pub latency: Duration,
}

/// Active models by name. See the [module docs](self).
pub struct Runtime {
    models: RwLock<HashMap<String, Arc<Model>>>,
    ids: IdSource,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime::new()
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("models", &self.names())
            .finish()
    }
}

impl Runtime {
    /// An empty runtime whose prediction ids count up from a random 64-bit start.
    pub fn new() -> Self {
        let next = AtomicU64::new(fastrand::u64(..));
        Runtime::with_id_source(Box::new(move || next.fetch_add(1, Ordering::Relaxed)))
    }

    /// An empty runtime taking prediction ids from `ids`.
    pub fn with_id_source(ids: IdSource) -> Self {
        Runtime {
            models: RwLock::new(HashMap::new()),
            ids,
        }
    }

    /// Makes `model` the active model for its name and returns the one it replaces.
    /// Calls already running keep the old model until they finish.
    pub fn activate(&self, model: Model) -> Option<Arc<Model>> {
        self.activate_arc(Arc::new(model))
    }

    /// [`Runtime::activate`] for a shared model.
    pub fn activate_arc(&self, model: Arc<Model>) -> Option<Arc<Model>> {
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        models.insert(model.name().to_string(), model)
    }

    /// Removes the active model `name`.
    pub fn deactivate(&self, name: &str) -> Option<Arc<Model>> {
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        models.remove(name)
    }

    /// The active model `name`.
    pub fn model(&self, name: &str) -> Result<Arc<Model>, RuntimeError> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        models
            .get(name)
            .cloned()
            .ok_or_else(|| RuntimeError::UnknownModel {
                name: name.to_string(),
            })
    }

    /// Names of the active models, sorted.
    pub fn names(&self) -> Vec<String> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = models.keys().cloned().collect();
        names.sort();
        names
    }

    /// Runs the active model `name` on `inputs` (see [`Model::run`]).
    pub fn infer<'a>(
        &self,
        name: &str,
        inputs: impl IntoIterator<Item = (&'a str, &'a HostTensor)>,
    ) -> Result<Inference, RuntimeError> {
        let model = self.model(name)?;
        let start = Instant::now();
        let outputs = model.run(inputs)?;
        let latency = start.elapsed();
        Ok(Inference {
            prediction_id: PredictionId((self.ids)()),
            outputs,
            model,
            latency,
        })
    }
}
