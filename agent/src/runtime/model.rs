//! One compiled model: [`OnnxSource`] decodes bytes, [`OnnxSource::compile`] turns them
//! into a [`Model`] (tract plan plus io spec) for one [`ExecPath`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use outpost_protocol::release::{ModelRelease, TensorSpec};
use tract_onnx::Onnx;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use super::dequant::{self, Activations, DequantStats, Quantization};
use super::error::panic_message;
use super::tensor::{datum_type, dtype_name};
use super::{HostTensor, RuntimeError};

/// Which graph a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExecPath {
    /// The ONNX graph as shipped.
    AsShipped,
    /// A quantized graph (QDQ, dynamic or QOperator) rewritten to float (see
    /// [`dequantize`](super::dequant::dequantize)).
    Dequantized,
}

impl ExecPath {
    /// `as-shipped` or `dequantized`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecPath::AsShipped => "as-shipped",
            ExecPath::Dequantized => "dequantized",
        }
    }
}

impl std::fmt::Display for ExecPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn onnx() -> &'static Onnx {
    static ONNX: OnceLock<Onnx> = OnceLock::new();
    // ORT's quantizer writes symbolic batch dims into value_info that clash with our
    // concrete input facts; the io spec is authoritative.
    ONNX.get_or_init(|| tract_onnx::onnx().with_ignore_value_info(true))
}

/// A decoded ONNX model, from which variants are compiled.
#[derive(Debug, Clone)]
pub struct OnnxSource {
    proto: ModelProto,
    quantization: Quantization,
}

impl OnnxSource {
    /// Decodes ONNX protobuf bytes. External tensor data is not resolved (a model must be
    /// self-contained).
    pub fn decode(bytes: &[u8]) -> Result<Self, RuntimeError> {
        let proto = catch_unwind(|| onnx().proto_model_for_read(&mut &bytes[..]))
            .map_err(|p| RuntimeError::Panic {
                stage: "loading",
                message: panic_message(&*p),
            })?
            .map_err(|e| RuntimeError::Malformed {
                message: format!("{e:#}"),
            })?;
        if proto.graph.is_none() {
            return Err(RuntimeError::Malformed {
                message: "model proto does not contain a graph".into(),
            });
        }
        let quantization = Quantization::of(&proto);
        Ok(OnnxSource {
            proto,
            quantization,
        })
    }

    pub(crate) fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// How the model is quantized.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Whether [`ExecPath::Dequantized`] exists for this model: it is quantized and the
    /// rewrite applies (see [`dequantize`](super::dequant::dequantize)).
    pub fn has_dequantized_variant(&self) -> bool {
        self.quantization != Quantization::Float && dequant::dequantize(&self.proto).is_ok()
    }

    /// Input names and element types declared by the graph (initializers excluded).
    pub fn declared_inputs(&self) -> Vec<String> {
        let Some(g) = &self.proto.graph else {
            return vec![];
        };
        let inits: std::collections::HashSet<&str> =
            g.initializer.iter().map(|t| t.name.as_str()).collect();
        g.input
            .iter()
            .filter(|i| !inits.contains(i.name.as_str()))
            .map(|i| i.name.clone())
            .collect()
    }

    /// Compiles the model for `path` with the input facts of `inputs` (every graph input
    /// must be listed, with a concrete shape): parse, type, optimize, plan.
    pub fn compile(
        &self,
        name: &str,
        inputs: &[TensorSpec],
        path: ExecPath,
    ) -> Result<Model, RuntimeError> {
        match path {
            ExecPath::AsShipped => self.compile_proto(&self.proto, name, inputs, path, None),
            ExecPath::Dequantized => self.compile_dequantized(name, inputs, Activations::Float),
        }
    }

    /// Compiles [`ExecPath::Dequantized`] with a choice of what happens to activation
    /// quantization (see [`dequantize_with`](super::dequant::dequantize_with)).
    pub fn compile_dequantized(
        &self,
        name: &str,
        inputs: &[TensorSpec],
        activations: Activations,
    ) -> Result<Model, RuntimeError> {
        let (proto, stats) = dequant::dequantize_with(&self.proto, activations)
            .map_err(|reason| RuntimeError::NoDequantizedVariant { reason })?;
        self.compile_proto(&proto, name, inputs, ExecPath::Dequantized, Some(stats))
    }

    fn compile_proto(
        &self,
        proto: &ModelProto,
        name: &str,
        inputs: &[TensorSpec],
        path: ExecPath,
        dequant: Option<DequantStats>,
    ) -> Result<Model, RuntimeError> {
        catch_unwind(AssertUnwindSafe(|| {
            compile(proto, name, inputs, path, dequant)
        }))
        .map_err(|p| RuntimeError::Panic {
            stage: "compiling",
            message: panic_message(&*p),
        })?
    }
}

fn compile(
    proto: &ModelProto,
    name: &str,
    inputs: &[TensorSpec],
    path: ExecPath,
    dequant: Option<DequantStats>,
) -> Result<Model, RuntimeError> {
    let mut model = onnx()
        .model_for_proto_model(proto)
        .map_err(|e| RuntimeError::Malformed {
            message: format!("{e:#}"),
        })?;
    let unimplemented: Vec<String> = model
        .nodes()
        .iter()
        .filter_map(|n| {
            let op = n.op.name();
            op.strip_prefix("Unimplemented(")
                .and_then(|s| s.strip_suffix(')'))
                .map(str::to_string)
        })
        .collect();

    let input_outlets = model.input_outlets().map_err(compile_err)?.to_vec();
    let model_inputs: Vec<String> = input_outlets
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    for spec in inputs {
        if !model_inputs.contains(&spec.name) {
            return Err(RuntimeError::IoMismatch {
                message: format!(
                    "io spec names input {:?}, model inputs are {model_inputs:?}",
                    spec.name
                ),
            });
        }
    }
    let mut ordered = Vec::with_capacity(model_inputs.len());
    for (ix, input) in model_inputs.iter().enumerate() {
        let spec =
            inputs
                .iter()
                .find(|s| &s.name == input)
                .ok_or_else(|| RuntimeError::IoMismatch {
                    message: format!("io spec does not describe model input {input:?}"),
                })?;
        let fact = InferenceFact::dt_shape(datum_type(spec.dtype)?, spec.shape.clone());
        model.set_input_fact(ix, fact).map_err(compile_err)?;
        ordered.push(spec.clone());
    }
    let outputs: Vec<String> = model
        .output_outlets()
        .map_err(compile_err)?
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect();

    let typed = model.into_optimized().map_err(|e| {
        if unimplemented.is_empty() {
            compile_err(e)
        } else {
            RuntimeError::UnsupportedOp {
                ops: unimplemented.clone(),
                message: format!("{e:#}"),
            }
        }
    })?;
    let (mut weight_bytes, mut scratch_bytes) = (0u64, 0u64);
    for node in typed.nodes() {
        let bytes: i64 = node
            .outputs
            .iter()
            .filter_map(|o| o.fact.mem_size().as_i64())
            .sum();
        if node.op_is::<tract_onnx::tract_core::ops::konst::Const>() {
            weight_bytes += bytes.max(0) as u64;
        } else {
            scratch_bytes += bytes.max(0) as u64;
        }
    }
    let plan = typed.into_runnable().map_err(compile_err)?;
    Ok(Model {
        name: name.to_string(),
        inputs: ordered,
        outputs,
        plan,
        path,
        dequant,
        weight_bytes,
        scratch_bytes,
        reason: String::new(),
        release: None,
    })
}

fn compile_err(e: TractError) -> RuntimeError {
    RuntimeError::Compile {
        message: format!("{e:#}"),
    }
}

/// A compiled, runnable model. Cheap to share (`Arc<Model>`); [`Model::run`] takes `&self`
/// and may be called from many threads at once (each call gets its own tract state).
#[derive(Debug)]
pub struct Model {
    name: String,
    inputs: Vec<TensorSpec>,
    outputs: Vec<String>,
    plan: Arc<TypedRunnableModel>,
    path: ExecPath,
    dequant: Option<DequantStats>,
    weight_bytes: u64,
    scratch_bytes: u64,
    reason: String,
    release: Option<Arc<ModelRelease>>,
}

impl Model {
    /// Model slot name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Inputs in the model's order, with the shapes the plan was compiled for.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }
    /// Output names in the model's order.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }
    /// The graph this model runs.
    pub fn exec_path(&self) -> ExecPath {
        self.path
    }
    /// Why this path was chosen (set by the gate; empty when compiled directly).
    pub fn path_reason(&self) -> &str {
        &self.reason
    }
    /// What the dequantizing rewrite did, for [`ExecPath::Dequantized`].
    pub fn dequant_stats(&self) -> Option<DequantStats> {
        self.dequant
    }
    /// Bytes of constants (weights, packed or not) held by the optimized plan.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
    /// Upper bound of the plan's scratch memory: every intermediate tensor, as if none
    /// were freed (tract frees each once its last reader ran).
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch_bytes
    }
    /// The release this model was validated against, if any.
    pub fn release(&self) -> Option<&ModelRelease> {
        self.release.as_deref()
    }

    /// Records why this path runs (the gate does; so should anything that bypasses it).
    pub fn set_reason(&mut self, reason: String) {
        self.reason = reason;
    }

    /// Attaches the release this model was validated against.
    pub fn set_release(&mut self, release: Arc<ModelRelease>) {
        self.release = Some(release);
    }

    /// Runs one inference. Every model input must be given exactly once, with the dtype
    /// and shape of [`Model::inputs`]. Outputs come back in model order.
    pub fn run<'a>(
        &self,
        inputs: impl IntoIterator<Item = (&'a str, &'a HostTensor)>,
    ) -> Result<Vec<(String, HostTensor)>, RuntimeError> {
        let mut slots: Vec<Option<TValue>> = vec![None; self.inputs.len()];
        for (name, tensor) in inputs {
            let Some(ix) = self.inputs.iter().position(|s| s.name == name) else {
                return Err(RuntimeError::UnknownInput {
                    model: self.name.clone(),
                    name: name.to_string(),
                    known: self.inputs.iter().map(|s| s.name.clone()).collect(),
                });
            };
            let spec = &self.inputs[ix];
            if slots[ix].is_some() {
                return Err(RuntimeError::DuplicateInput {
                    name: name.to_string(),
                });
            }
            if tensor.dtype != spec.dtype {
                return Err(RuntimeError::WrongDtype {
                    input: name.to_string(),
                    expected: dtype_name(spec.dtype),
                    got: dtype_name(tensor.dtype),
                });
            }
            if tensor.shape != spec.shape {
                return Err(RuntimeError::WrongShape {
                    input: name.to_string(),
                    expected: spec.shape.clone(),
                    got: tensor.shape.clone(),
                });
            }
            let expected = tensor.element_count() * tensor.dtype.size();
            if tensor.data.len() != expected {
                return Err(RuntimeError::WrongByteLength {
                    input: name.to_string(),
                    expected,
                    got: tensor.data.len(),
                });
            }
            slots[ix] = Some(tensor.to_tract()?.into_tvalue());
        }
        let mut values = TVec::with_capacity(slots.len());
        for (slot, spec) in slots.into_iter().zip(&self.inputs) {
            values.push(slot.ok_or_else(|| RuntimeError::MissingInput {
                model: self.name.clone(),
                name: spec.name.clone(),
            })?);
        }
        let outputs = catch_unwind(AssertUnwindSafe(|| self.plan.run(values)))
            .map_err(|p| RuntimeError::Panic {
                stage: "running",
                message: panic_message(&*p),
            })?
            .map_err(|e| RuntimeError::Run {
                message: format!("{e:#}"),
            })?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(v, name)| Ok((name.clone(), HostTensor::from_tract(v)?)))
            .collect()
    }
}
