//! The dequantized variant of a quantized model: a rewrite of the ONNX protobuf, before
//! tract sees it, into the float model the quantizer simulated. tract runs float graphs
//! several times faster than integer ones on the targets measured
//! (`/work/shared/notes/models.md`). Whether a rewrite stays within the release's
//! tolerance is the gate's call.
//!
//! Three formats, one walk over the nodes in topological order:
//! - **QDQ** (this module):
//!   - every `DequantizeLinear` whose input is a constant initializer (int8/uint8/int32
//!     weights or biases, per-tensor or per-channel with `axis`) is folded into a float
//!     initializer named like the node's output, computed as ONNX specifies:
//!     `y = float(x - zero_point) * scale`;
//!   - every activation `QuantizeLinear -> DequantizeLinear` pair (per-tensor, constant
//!     and equal scale and zero point) goes; the rounding goes with it. See
//!     [saturation](#saturation) for the clamp it also applied.
//! - **Dynamic** ([`dynamic`]): `DynamicQuantizeLinear -> MatMulInteger/ConvInteger ->
//!   Cast -> Mul(scale product)` becomes a float `MatMul`/`Conv` on the float activation
//!   with the weights dequantized (`(w - zp) * scale`, per-tensor or per-channel).
//! - **QOperator** ([`qop`]): `QLinearConv`/`QLinearMatMul` with constant weights (and
//!   int32 bias) become float `Conv`/`MatMul`; the `QuantizeLinear` in front and the
//!   `DequantizeLinear` behind them go.
//!
//! # Saturation
//!
//! Quantizing to `[qmin, qmax]` with zero point `zp` and scale `s` also clamps the float
//! value to `[(qmin - zp) * s, (qmax - zp) * s]`. The rewrite keeps that clamp only where
//! it can change a result inside the calibrated range:
//! - when the range starts at 0 it is a `Relu`: ORT's quantizers drop a `Relu` in front
//!   of a u8 quantization with zero point 0 (and fuse it into `QLinearConv`) and leave the
//!   clamp to the quantization. The `Relu` is kept unless its input is already known to be
//!   non-negative (a `Relu`, or pooling/reshaping of non-negative values: the float graph
//!   had one `Relu` there, not two) or is a graph input (negative inputs lie outside the
//!   calibrated range, see next point);
//! - when 0 lies inside the range, saturation only happens outside the calibrated range
//!   and is dropped: consumers read the float activation directly, with no extra op, so
//!   tract fuses as in the float model;
//! - graph outputs keep an exact `Clip`: what the caller sees stays as saturated as with
//!   onnxruntime.
//!
//! Nodes and initializers nothing reads any more are dropped.

mod dynamic;
mod qop;

use std::collections::{HashMap, HashSet};

use tract_onnx::data_resolver::MmapDataResolver;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, attribute_proto,
    tensor_proto::DataType,
};
use tract_onnx::prelude::Tensor;

/// How a model is quantized, judged from its operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Quantization {
    /// No quantization operators.
    Float,
    /// QuantizeLinear/DequantizeLinear pairs around float operators.
    Qdq,
    /// Dynamic quantization: `DynamicQuantizeLinear` + `MatMulInteger`/`ConvInteger`.
    Dynamic,
    /// Quantized operators (`QLinearConv`, `QLinearMatMul`, contrib `QLinear*`, ...).
    QOperator,
}

impl Quantization {
    /// Classifies a graph by the operators it uses.
    pub fn of(model: &ModelProto) -> Quantization {
        let Some(graph) = &model.graph else {
            return Quantization::Float;
        };
        let ops: HashSet<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        if ops
            .iter()
            .any(|op| op.starts_with("QLinear") || *op == "QGemm" || *op == "QAttention")
        {
            Quantization::QOperator
        } else if ops.iter().any(|op| {
            matches!(
                *op,
                "DynamicQuantizeLinear" | "MatMulInteger" | "ConvInteger" | "DynamicQuantizeLSTM"
            )
        }) {
            Quantization::Dynamic
        } else if ops.contains("DequantizeLinear") || ops.contains("QuantizeLinear") {
            Quantization::Qdq
        } else {
            Quantization::Float
        }
    }

    /// `float`, `qdq`, `dynamic` or `qoperator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::Float => "float",
            Quantization::Qdq => "qdq",
            Quantization::Dynamic => "dynamic",
            Quantization::QOperator => "qoperator",
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rewrite does with activation quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Activations {
    /// Dropped: activations stay float, unrounded (the float model the quantizer
    /// simulated). Fastest.
    Float,
    /// Kept: activations are rounded as the quantized model rounds them (dynamic: the
    /// integer products emulated exactly in float; QOperator: `QuantizeLinear ->
    /// DequantizeLinear` around the float ops; QDQ: the pairs stay). Closest to the
    /// quantized model's outputs.
    Rounded,
}

/// What the rewrite did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DequantStats {
    /// Constant quantized tensors (weights, biases) folded into float initializers.
    pub folded_constants: usize,
    /// Activation quantizations removed: `QuantizeLinear -> DequantizeLinear` pairs (QDQ),
    /// `DynamicQuantizeLinear` nodes (dynamic), `QuantizeLinear`/`DequantizeLinear` around
    /// quantized operators (QOperator).
    pub removed_pairs: usize,
    /// Integer operators (`MatMulInteger`, `ConvInteger`, `QLinearConv`, `QLinearMatMul`)
    /// replaced by float ones.
    pub rewritten_ops: usize,
    /// Saturations dropped as redundant or outside the calibrated range (see the
    /// [module docs](self#saturation)).
    pub dropped_clamps: usize,
    /// Whether activations are rounded as in the quantized model ([`Activations::Rounded`]).
    pub rounded_activations: bool,
}

/// Rewrites `model` into its dequantized float form, activations unrounded
/// ([`Activations::Float`]). Returns `Err(reason)` when there is nothing to rewrite or the
/// graph is outside what the rewrite handles.
pub fn dequantize(model: &ModelProto) -> Result<(ModelProto, DequantStats), String> {
    dequantize_with(model, Activations::Float)
}

/// [`dequantize`] with a choice of what happens to activation quantization.
pub fn dequantize_with(
    model: &ModelProto,
    activations: Activations,
) -> Result<(ModelProto, DequantStats), String> {
    let kind = Quantization::of(model);
    if kind == Quantization::Float {
        return Err("float model, nothing to dequantize".into());
    }
    let mut out = model.clone();
    let graph = out.graph.as_mut().ok_or("model has no graph")?;
    if graph.node.iter().any(|n| {
        n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    }) {
        return Err("graph has subgraphs (If/Loop/Scan), not rewritten".into());
    }
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(13);
    let stats = match kind {
        Quantization::Dynamic => dynamic::rewrite(graph, opset, activations)?,
        Quantization::QOperator => qop::rewrite(graph, opset, activations)?,
        _ => rewrite_qdq(graph, opset, activations)?,
    };
    if stats.folded_constants == 0 && stats.removed_pairs == 0 && stats.rewritten_ops == 0 {
        return Err(match kind {
            Quantization::Dynamic => {
                "dynamic model without a DynamicQuantizeLinear -> MatMulInteger/ConvInteger -> Cast -> Mul chain on constant weights".into()
            }
            Quantization::QOperator => {
                "QOperator model without a QLinearConv/QLinearMatMul on constant weights fed by QuantizeLinear".into()
            }
            _ => "no constant DequantizeLinear and no QuantizeLinear->DequantizeLinear pair".into(),
        });
    }
    Ok((out, stats))
}

/// Why `source` has no dequantized variant (`None` when it has one).
pub fn dequantize_reason(source: &super::OnnxSource) -> Option<String> {
    dequantize(source.proto()).err()
}

/// The state of a rewrite: nodes are visited in (topological) order, inputs renamed as
/// earlier rewrites decided, and replacements emitted.
pub(super) struct Walk<'g> {
    inits: &'g [TensorProto],
    consts: HashMap<&'g str, usize>,
    graph_inputs: HashSet<String>,
    graph_outputs: HashSet<String>,
    opset: i64,
    nodes: Vec<NodeProto>,
    producer: HashMap<String, usize>,
    renames: HashMap<String, String>,
    nonneg: HashSet<String>,
    names: HashSet<String>,
    new_inits: Vec<TensorProto>,
    stats: DequantStats,
}

impl<'g> Walk<'g> {
    /// Starts a walk over `graph`, whose nodes the caller has taken out.
    fn new(graph: &'g GraphProto, nodes: &[NodeProto], opset: i64) -> Self {
        let graph_inputs: HashSet<String> = graph.input.iter().map(|i| i.name.clone()).collect();
        // Initializers that are also graph inputs can be overridden by the caller: not
        // constant.
        let consts = graph
            .initializer
            .iter()
            .enumerate()
            .filter(|(_, t)| !graph_inputs.contains(&t.name))
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let names = graph
            .initializer
            .iter()
            .map(|t| t.name.clone())
            .chain(graph_inputs.iter().cloned())
            .chain(graph.output.iter().map(|o| o.name.clone()))
            .chain(nodes.iter().flat_map(|n| n.output.iter().cloned()))
            .chain(nodes.iter().map(|n| n.name.clone()))
            .collect();
        Walk {
            inits: &graph.initializer,
            consts,
            graph_outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
            graph_inputs,
            opset,
            nodes: Vec::with_capacity(nodes.len()),
            producer: HashMap::new(),
            renames: HashMap::new(),
            nonneg: HashSet::new(),
            names,
            new_inits: Vec::new(),
            stats: DequantStats::default(),
        }
    }

    /// The rewritten nodes, the new initializers and the counts, for [`install`].
    fn into_parts(self) -> (Vec<NodeProto>, Vec<TensorProto>, DequantStats) {
        (self.nodes, self.new_inits, self.stats)
    }

    /// The constant initializer `name`, if it is one.
    fn constant(&self, name: &str) -> Option<&'g TensorProto> {
        self.consts.get(name).map(|&i| &self.inits[i])
    }

    /// Whether `name` is a graph output (never renamed away).
    fn is_output(&self, name: &str) -> bool {
        self.graph_outputs.contains(name)
    }

    /// Whether `name` is a graph input (and not a constant).
    fn is_input(&self, name: &str) -> bool {
        self.graph_inputs.contains(name) && !self.consts.contains_key(name)
    }

    /// Whether `name` is known to hold no negative value.
    fn is_nonneg(&self, name: &str) -> bool {
        self.nonneg.contains(name)
    }

    /// The emitted node producing `name`.
    fn producer(&self, name: &str) -> Option<&NodeProto> {
        self.producer.get(name).map(|&i| &self.nodes[i])
    }

    /// Later readers of `from` read `to` instead.
    fn rename(&mut self, from: &str, to: &str) {
        self.renames.insert(from.to_string(), to.to_string());
    }

    /// Applies the renames decided so far to `node`'s inputs.
    fn resolve_inputs(&self, node: &mut NodeProto) {
        for input in &mut node.input {
            if let Some(to) = self.renames.get(input.as_str()) {
                *input = to.clone();
            }
        }
    }

    /// A tensor or node name not used anywhere in the graph yet.
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut n = 1;
        while self.names.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        self.names.insert(name.clone());
        name
    }

    /// Adds a float initializer.
    fn add_init(&mut self, t: TensorProto) {
        self.names.insert(t.name.clone());
        self.new_inits.push(t);
    }

    /// The name later readers of `name` read.
    fn resolve(&self, name: &str) -> String {
        self.renames
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    }

    /// Appends `node` to the rewritten graph; a `Relu` of a non-negative value is
    /// elided (readers read its input).
    fn emit(&mut self, node: NodeProto) {
        if is_op(&node, "Relu")
            && let ([x], [y]) = (node.input.as_slice(), node.output.as_slice())
            && self.is_nonneg(x)
            && !self.is_output(y)
        {
            self.stats.dropped_clamps += 1;
            self.rename(y, x);
            return;
        }
        let data_nonneg = |i: usize| node.input.get(i).is_some_and(|x| self.is_nonneg(x));
        let nonneg = node.domain.is_empty()
            && match node.op_type.as_str() {
                "Relu" | "Sigmoid" | "Softmax" | "Exp" | "Abs" => true,
                "MaxPool" | "AveragePool" | "GlobalAveragePool" | "GlobalMaxPool" | "Flatten"
                | "Reshape" | "Squeeze" | "Unsqueeze" | "Transpose" | "Identity" => data_nonneg(0),
                "Concat" => node.input.iter().all(|x| self.is_nonneg(x)),
                _ => false,
            };
        if nonneg && let Some(y) = node.output.first() {
            self.nonneg.insert(y.clone());
        }
        let ix = self.nodes.len();
        for o in &node.output {
            self.producer.insert(o.clone(), ix);
        }
        self.nodes.push(node);
    }

    /// `Relu(x) -> y` when `lo` is 0 (tract fuses it into the producer), else
    /// `Clip(x, lo, hi) -> y` in the form the model's opset understands.
    fn emit_saturation(&mut self, x: &str, y: &str, lo: f32, hi: f32, exact: bool) {
        let name = self.fresh(&format!("{y}_saturate"));
        if lo == 0.0 && !exact {
            self.emit(NodeProto {
                input: vec![x.to_string()],
                output: vec![y.to_string()],
                name,
                op_type: "Relu".into(),
                ..Default::default()
            });
            return;
        }
        let mut node = NodeProto {
            input: vec![x.to_string()],
            output: vec![y.to_string()],
            name: name.clone(),
            op_type: "Clip".into(),
            ..Default::default()
        };
        if self.opset >= 11 {
            for (suffix, v) in [("min", lo), ("max", hi)] {
                let tname = self.fresh(&format!("{name}_{suffix}"));
                self.add_init(TensorProto {
                    data_type: DataType::Float as i32,
                    name: tname.clone(),
                    raw_data: v.to_le_bytes().to_vec(),
                    ..Default::default()
                });
                node.input.push(tname);
            }
        } else {
            for (attr, v) in [("min", lo), ("max", hi)] {
                node.attribute.push(AttributeProto {
                    name: attr.into(),
                    r#type: attribute_proto::AttributeType::Float as i32,
                    f: v,
                    ..Default::default()
                });
            }
        }
        if lo >= 0.0 {
            self.nonneg.insert(y.to_string());
        }
        self.emit(node);
    }

    /// A float scalar initializer holding `v`; returns its name.
    fn scalar_init(&mut self, base: &str, v: f32) -> String {
        let name = self.fresh(base);
        self.add_init(TensorProto {
            data_type: DataType::Float as i32,
            name: name.clone(),
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name
    }

    /// Emits `op(inputs) -> fresh` and returns the output name.
    fn op(&mut self, op: &str, inputs: Vec<String>, base: &str) -> String {
        let y = self.fresh(base);
        let name = self.fresh(&format!("{y}_node"));
        self.emit(NodeProto {
            input: inputs,
            output: vec![y.clone()],
            name,
            op_type: op.into(),
            ..Default::default()
        });
        y
    }

    /// Emits `DequantizeLinear(QuantizeLinear(x))` for `p` in float ops that tract runs
    /// faster than the pair: `Clip(Round(x * (1 / s)), qmin - zp, qmax - zp) * s`
    /// (`Round` rounds half to even, as `QuantizeLinear` does). Returns the result's name.
    fn round_to_grid(&mut self, x: &str, p: QParams) -> String {
        let inv = self.scalar_init(&format!("{x}_inv_scale"), (1.0 / p.scale) as f32);
        let scaled = self.op("Mul", vec![x.to_string(), inv], &format!("{x}_scaled"));
        let rounded = self.op("Round", vec![scaled], &format!("{x}_rounded"));
        let (lo, hi) = (
            (p.qmin - p.zero_point) as f32,
            (p.qmax - p.zero_point) as f32,
        );
        let clipped = self.fresh(&format!("{x}_clipped"));
        self.emit_saturation(&rounded, &clipped, lo, hi, true);
        let s = self.scalar_init(&format!("{x}_scale"), p.scale as f32);
        self.op("Mul", vec![clipped, s], &format!("{x}_on_grid"))
    }

    /// Whether the saturation to `(lo, hi)` of the float value `x` can go (see the
    /// [module docs](self#saturation)); graph outputs are the caller's concern.
    fn clamp_can_go(&self, x: &str, (lo, hi): (f32, f32)) -> bool {
        (lo < 0.0 && hi > 0.0) || (lo == 0.0 && (self.is_nonneg(x) || self.is_input(x)))
    }

    /// Makes the float value `x`, which a quantization to `range` saturated, available
    /// as `y`: renamed when the clamp can go, else through a `Relu`/`Clip`; an exact
    /// `Clip` when `y` is a graph output.
    fn saturate_or_rename(&mut self, x: &str, y: &str, range: (f32, f32)) {
        if self.is_output(y) {
            self.emit_saturation(x, y, range.0, range.1, true);
        } else if self.clamp_can_go(x, range) {
            self.stats.dropped_clamps += 1;
            self.rename(y, x);
        } else {
            self.emit_saturation(x, y, range.0, range.1, false);
        }
    }

    /// The name of the float value `x` as a quantization to `range` saturated it: `x`
    /// itself when the clamp can go, else a new `Relu`/`Clip` output.
    fn float_view(&mut self, x: &str, range: (f32, f32)) -> String {
        if self.clamp_can_go(x, range) {
            self.stats.dropped_clamps += 1;
            return x.to_string();
        }
        let y = self.fresh(&format!("{x}_saturated"));
        self.emit_saturation(x, &y, range.0, range.1, false);
        y
    }
}

/// Whether `node` is the standard-domain operator `op`.
fn is_op(node: &NodeProto, op: &str) -> bool {
    node.op_type == op && (node.domain.is_empty() || node.domain == "ai.onnx")
}

/// A quantization's parameters: per-tensor constant scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct QParams {
    scale: f64,
    zero_point: f64,
    qmin: f64,
    qmax: f64,
}

impl QParams {
    /// The float range the quantization saturates to.
    fn range(&self) -> (f32, f32) {
        let lo = ((self.qmin - self.zero_point) as f32) * self.scale as f32;
        let hi = ((self.qmax - self.zero_point) as f32) * self.scale as f32;
        (lo.min(hi), lo.max(hi))
    }
}

/// The per-tensor parameters given by the `scale` and optional `zero_point` inputs of a
/// (De)QuantizeLinear or QLinear operator; `None` when they are not constant scalars.
fn qparams(walk: &Walk, scale: Option<&String>, zero_point: Option<&String>) -> Option<QParams> {
    let s = walk.constant(scale?)?;
    let scale = scalar(s)?;
    let (zero_point, zp_type) = match zero_point.filter(|z| !z.is_empty()) {
        None => (0.0, DataType::Uint8 as i32),
        Some(z) => {
            let t = walk.constant(z)?;
            (scalar(t)?, t.data_type)
        }
    };
    let (qmin, qmax) = match DataType::try_from(zp_type) {
        Ok(DataType::Uint8) => (0.0, 255.0),
        Ok(DataType::Int8) => (-128.0, 127.0),
        Ok(DataType::Uint16) => (0.0, 65535.0),
        Ok(DataType::Int16) => (-32768.0, 32767.0),
        _ => return None,
    };
    if !scale.is_finite() || scale <= 0.0 {
        return None;
    }
    Some(QParams {
        scale,
        zero_point,
        qmin,
        qmax,
    })
}

/// The single value of a one-element tensor.
fn scalar(t: &TensorProto) -> Option<f64> {
    let v = to_f64(&load(t).ok()?, &t.name).ok()?;
    (v.len() == 1).then(|| v[0])
}

fn rewrite_qdq(
    graph: &mut GraphProto,
    opset: i64,
    activations: Activations,
) -> Result<DequantStats, String> {
    let nodes = std::mem::take(&mut graph.node);
    let mut walk = Walk::new(graph, &nodes, opset);
    for mut node in nodes {
        walk.resolve_inputs(&mut node);
        if !is_op(&node, "DequantizeLinear") {
            walk.emit(node);
            continue;
        }
        let (Some(x), Some(y)) = (node.input.first(), node.output.first()) else {
            walk.emit(node);
            continue;
        };
        if fold_constant_dq(&mut walk, &node)? {
            continue;
        }
        if activations == Activations::Rounded {
            walk.emit(node);
            continue;
        }
        let Some(q) = walk.producer(x) else {
            walk.emit(node);
            continue;
        };
        if !is_op(q, "QuantizeLinear") || attr_i(q, "output_dtype").is_some_and(|d| d != 0) {
            walk.emit(node);
            continue;
        }
        let (Some(q_in), q_params) = (
            q.input.first().cloned(),
            qparams(&walk, q.input.get(1), q.input.get(2)),
        ) else {
            walk.emit(node);
            continue;
        };
        let dq_params = qparams(&walk, node.input.get(1), node.input.get(2));
        match (q_params, dq_params) {
            (Some(qp), Some(dp)) if qp == dp => {
                let y = y.clone();
                walk.saturate_or_rename(&q_in, &y, qp.range());
                walk.stats.removed_pairs += 1;
            }
            _ => walk.emit(node),
        }
    }
    walk.stats.rounded_activations = activations == Activations::Rounded;
    let parts = walk.into_parts();
    Ok(install(graph, parts))
}

/// Puts rewritten nodes and new initializers into `graph` and prunes it.
fn install(
    graph: &mut GraphProto,
    (nodes, inits, stats): (Vec<NodeProto>, Vec<TensorProto>, DequantStats),
) -> DequantStats {
    graph.node = nodes;
    graph.initializer.extend(inits);
    prune(graph);
    stats
}

/// Folds `node`, a `DequantizeLinear` of a constant with constant parameters, into a float
/// initializer named like its output. Returns whether it did.
fn fold_constant_dq(walk: &mut Walk, node: &NodeProto) -> Result<bool, String> {
    let (Some(x), Some(y)) = (node.input.first(), node.output.first()) else {
        return Ok(false);
    };
    let Some(xt) = walk.constant(x) else {
        return Ok(false);
    };
    let Some(st) = node.input.get(1).and_then(|s| walk.constant(s)) else {
        return Ok(false);
    };
    let zt = match node.input.get(2).filter(|s| !s.is_empty()) {
        Some(z) => match walk.constant(z) {
            Some(t) => Some(t),
            None => return Ok(false),
        },
        None => None,
    };
    if attr_i(node, "block_size").is_some_and(|b| b != 0) {
        return Ok(false);
    }
    let scales = to_f64(&load(st)?, &st.name)?;
    let zps = match zt {
        Some(z) => to_f64(&load(z)?, &z.name)?,
        None => vec![0.0],
    };
    let folded = fold(xt, &scales, &zps, attr_i(node, "axis").unwrap_or(1), y)?;
    walk.add_init(folded);
    walk.stats.folded_constants += 1;
    Ok(true)
}

/// Drops nodes whose outputs nobody reads (repeatedly) and initializers nobody reads.
fn prune(graph: &mut GraphProto) {
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    loop {
        let read: HashSet<&str> = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .collect();
        let before = graph.node.len();
        let keep: Vec<bool> = graph
            .node
            .iter()
            .map(|n| {
                n.output
                    .iter()
                    .any(|o| read.contains(o.as_str()) || outputs.contains(o))
            })
            .collect();
        let mut k = keep.into_iter();
        graph.node.retain(|_| k.next().unwrap_or(true));
        if graph.node.len() == before {
            break;
        }
    }
    let read: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(outputs)
        .collect();
    graph.initializer.retain(|t| read.contains(&t.name));
}

fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn load(t: &TensorProto) -> Result<Tensor, String> {
    // No model directory: external data is refused rather than read from disk.
    std::panic::catch_unwind(|| tract_onnx::tensor::load_tensor(&MmapDataResolver, t, None))
        .map_err(|_| format!("initializer {:?} cannot be read", t.name))?
        .map_err(|e| format!("initializer {:?}: {e:#}", t.name))
}

fn to_f64(t: &Tensor, what: &str) -> Result<Vec<f64>, String> {
    let cast = t
        .cast_to::<f64>()
        .map_err(|e| format!("{what}: cannot read as numbers: {e:#}"))?;
    let view = cast
        .to_plain_array_view::<f64>()
        .map_err(|e| format!("{what}: {e:#}"))?;
    Ok(view.iter().copied().collect())
}

/// `float(x - zero_point) * scale` as a float initializer `name`; `scales` and
/// `zero_points` have one element (per tensor) or one per index of `axis` (per channel).
fn fold(
    x: &TensorProto,
    scales: &[f64],
    zero_points: &[f64],
    axis: i64,
    name: &str,
) -> Result<TensorProto, String> {
    let xt = load(x)?;
    let shape = xt.shape().to_vec();
    let xs = to_f64(&xt, &x.name)?;
    let channels = scales.len().max(zero_points.len());
    if channels == 0
        || (scales.len() != channels && scales.len() != 1)
        || (zero_points.len() != channels && zero_points.len() != 1)
    {
        return Err(format!(
            "{name}: scale/zero-point lengths {}/{}",
            scales.len(),
            zero_points.len()
        ));
    }
    let inner = if channels == 1 {
        1
    } else {
        let rank = shape.len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&axis) || shape[axis as usize] != channels {
            return Err(format!(
                "{name}: {channels} per-channel parameters do not fit axis {axis} of shape {shape:?}"
            ));
        }
        shape[axis as usize + 1..].iter().product::<usize>()
    };
    let pick = |v: &[f64], c: usize| if v.len() == 1 { v[0] } else { v[c] };
    let mut raw = Vec::with_capacity(xs.len() * 4);
    for (i, q) in xs.iter().enumerate() {
        let c = (i / inner) % channels;
        // ORT: integer subtraction, then float multiply.
        let v = ((q - pick(zero_points, c)) as f32) * (pick(scales, c) as f32);
        raw.extend_from_slice(&v.to_le_bytes());
    }
    Ok(TensorProto {
        dims: x.dims.clone(),
        data_type: DataType::Float as i32,
        name: name.to_string(),
        raw_data: raw,
        ..Default::default()
    })
}

/// Test helpers: build tiny graphs and run them through tract.
#[cfg(test)]
pub(super) mod testing {
    use tract_onnx::pb::{
        GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
        TypeProto, ValueInfoProto, tensor_proto::DataType, tensor_shape_proto, type_proto,
    };
    use tract_onnx::prelude::*;

    pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: format!("{op}_{}", outputs.first().copied().unwrap_or("")),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn with_ints(mut n: NodeProto, name: &str, v: &[i64]) -> NodeProto {
        n.attribute.push(tract_onnx::pb::AttributeProto {
            name: name.into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        });
        n
    }

    pub fn with_int(mut n: NodeProto, name: &str, v: i64) -> NodeProto {
        n.attribute.push(tract_onnx::pb::AttributeProto {
            name: name.into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32,
            i: v,
            ..Default::default()
        });
        n
    }

    fn tensor(name: &str, dims: &[i64], dt: DataType, raw: Vec<u8>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: dt as i32,
            raw_data: raw,
            ..Default::default()
        }
    }

    pub fn f32s(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
        tensor(
            name,
            dims,
            DataType::Float,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    pub fn u8s(name: &str, dims: &[i64], v: &[u8]) -> TensorProto {
        tensor(name, dims, DataType::Uint8, v.to_vec())
    }

    pub fn i8s(name: &str, dims: &[i64], v: &[i8]) -> TensorProto {
        tensor(
            name,
            dims,
            DataType::Int8,
            v.iter().map(|x| *x as u8).collect(),
        )
    }

    pub fn i32s(name: &str, dims: &[i64], v: &[i32]) -> TensorProto {
        tensor(
            name,
            dims,
            DataType::Int32,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| tensor_shape_proto::Dimension {
                                value: Some(tensor_shape_proto::dimension::Value::DimValue(
                                    d as i64,
                                )),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A model with float input `x` of `shape` and float output `y`.
    pub fn model(shape: &[usize], nodes: Vec<NodeProto>, inits: Vec<TensorProto>) -> ModelProto {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "test".into(),
                node: nodes,
                initializer: inits,
                input: vec![value_info("x", shape)],
                output: vec![ValueInfoProto {
                    name: "y".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Runs `model` in tract on `x`.
    pub fn run(model: &ModelProto, shape: &[usize], x: &[f32]) -> Vec<f32> {
        let onnx = tract_onnx::onnx();
        let plan = onnx
            .model_for_proto_model(model)
            .unwrap()
            .with_input_fact(0, f32::fact(shape).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let input = tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), x.to_vec()).unwrap();
        let out = plan.run(tvec!(Tensor::from(input).into_tvalue())).unwrap();
        out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// Op types of `model`'s nodes, in order.
    pub fn ops(model: &ModelProto) -> Vec<String> {
        model
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.clone())
            .collect()
    }

    /// Deterministic pseudo-random floats in `[lo, hi)`.
    pub fn floats(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| lo + (hi - lo) * rng.f32()).collect()
    }

    pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// `x[1,4] -> Q/DQ -> MatMul(W per-column i8) -> Q/DQ(u8, zp 0) -> y`: the quantizer
    /// removed a Relu in front of the last quantization.
    fn qdq_mlp(x_zp: u8) -> ModelProto {
        let w: Vec<i8> = vec![10, -20, 30, -40, 50, -60, 70, -80, 90, -100, 110, -120];
        model(
            &[1, 4],
            vec![
                node("QuantizeLinear", &["x", "xs", "xz"], &["xq"]),
                node("DequantizeLinear", &["xq", "xs", "xz"], &["xd"]),
                with_int(
                    node("DequantizeLinear", &["wq", "ws", "wz"], &["w"]),
                    "axis",
                    1,
                ),
                node("MatMul", &["xd", "w"], &["m"]),
                node("QuantizeLinear", &["m", "ys", "yz"], &["mq"]),
                node("DequantizeLinear", &["mq", "ys", "yz"], &["y"]),
            ],
            vec![
                f32s("xs", &[], &[0.01]),
                u8s("xz", &[], &[x_zp]),
                i8s("wq", &[4, 3], &w),
                f32s("ws", &[3], &[0.01, 0.02, 0.03]),
                i8s("wz", &[3], &[0, 0, 0]),
                f32s("ys", &[], &[0.05]),
                u8s("yz", &[], &[0]),
            ],
        )
    }

    #[test]
    fn qdq_rewrite_matches_the_original_within_one_output_step() {
        let m = qdq_mlp(128);
        let (d, stats) = dequantize(&m).unwrap();
        assert_eq!(stats.folded_constants, 1);
        assert_eq!(stats.removed_pairs, 2);
        assert!(
            !ops(&d).iter().any(|o| o.contains("Quantize")),
            "{:?}",
            ops(&d)
        );
        for seed in 0..20 {
            let x = floats(4, seed, -1.0, 1.0);
            let (a, b) = (run(&m, &[1, 4], &x), run(&d, &[1, 4], &x));
            // One output step (0.05) plus the input rounding (0.005) through the weights.
            assert!(
                max_diff(&a, &b) <= 0.05 + 0.005 * 4.0 * 3.6,
                "{a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn qdq_output_clamp_at_zero_is_kept_exactly_on_graph_output() {
        // A negative pre-activation must come out as 0, as the quantized graph clamps it.
        let m = qdq_mlp(128);
        let (d, _) = dequantize(&m).unwrap();
        assert_eq!(ops(&d).last().map(String::as_str), Some("Clip"));
        let x = [1.0, 1.0, 1.0, 1.0];
        let (a, b) = (run(&m, &[1, 4], &x), run(&d, &[1, 4], &x));
        assert!(a.contains(&0.0) && b.contains(&0.0), "{a:?} {b:?}");
        assert!(max_diff(&a, &b) <= 0.05);
    }

    #[test]
    fn qdq_input_saturation_outside_calibrated_range_adds_no_relu() {
        // Input quantized with zero point 0: clamping negative inputs to 0 is saturation
        // outside the calibrated range, not a Relu the float model had.
        let (d, stats) = dequantize(&qdq_mlp(0)).unwrap();
        assert_eq!(stats.dropped_clamps, 1);
        assert_eq!(ops(&d), vec!["MatMul", "Clip"]);
    }

    #[test]
    fn qdq_relu_removed_by_the_quantizer_comes_back_once() {
        // Conv-like MatMul -> Q/DQ(zp 0) -> MaxPool-like Flatten -> Q/DQ(zp 0): the first
        // pair stands for a Relu, the second one would only repeat it.
        let m = model(
            &[1, 2],
            vec![
                node("MatMul", &["x", "w"], &["m"]),
                node("QuantizeLinear", &["m", "s", "z"], &["mq"]),
                node("DequantizeLinear", &["mq", "s", "z"], &["md"]),
                node("Flatten", &["md"], &["f"]),
                node("QuantizeLinear", &["f", "s", "z"], &["fq"]),
                node("DequantizeLinear", &["fq", "s", "z"], &["fd"]),
                node("Add", &["fd", "b"], &["y"]),
            ],
            vec![
                f32s("w", &[2, 2], &[1.0, -1.0, 0.5, -0.5]),
                f32s("b", &[2], &[0.25, 0.25]),
                f32s("s", &[], &[0.01]),
                u8s("z", &[], &[0]),
            ],
        );
        let (d, stats) = dequantize(&m).unwrap();
        assert_eq!(ops(&d), vec!["MatMul", "Relu", "Flatten", "Add"]);
        assert_eq!(stats.removed_pairs, 2);
        let x = [0.7, 0.2];
        let (a, b) = (run(&m, &[1, 2], &x), run(&d, &[1, 2], &x));
        assert!(b[1] == 0.25 && max_diff(&a, &b) <= 0.01, "{a:?} {b:?}");
    }

    #[test]
    fn qdq_pair_with_different_parameters_is_not_removed() {
        let m = model(
            &[1, 2],
            vec![
                node("QuantizeLinear", &["x", "s", "z"], &["q"]),
                node("DequantizeLinear", &["q", "s2", "z"], &["y"]),
            ],
            vec![
                f32s("s", &[], &[0.01]),
                f32s("s2", &[], &[0.02]),
                u8s("z", &[], &[128]),
            ],
        );
        assert!(dequantize(&m).is_err());
    }

    #[test]
    fn per_channel_fold_rejects_parameters_that_do_not_fit_the_axis() {
        let w = i8s("w", &[2, 3], &[1, 2, 3, 4, 5, 6]);
        assert!(fold(&w, &[0.1, 0.2], &[0.0], 1, "y").is_err());
        let ok = fold(&w, &[0.1, 0.2], &[0.0, 1.0], 0, "y").unwrap();
        let v: Vec<f32> = ok
            .raw_data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(v, vec![0.1, 0.2, 0.3, 0.6, 0.8, 1.0]);
    }

    #[test]
    fn float_model_has_no_dequantized_variant() {
        let m = model(&[1, 2], vec![node("Relu", &["x"], &["y"])], vec![]);
        assert!(dequantize(&m).unwrap_err().contains("float model"));
    }
}
