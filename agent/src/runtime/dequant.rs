//! The dequantized variant of a QDQ model: a rewrite of the ONNX protobuf before tract
//! sees it.
//!
//! - Every `DequantizeLinear` whose input is a constant initializer (int8/uint8/int32
//!   weights or biases, per-tensor or per-channel with `axis`) is folded into a float
//!   initializer named like the node's output, computed as ONNX specifies:
//!   `y = float(x - zero_point) * scale`.
//! - Every activation `QuantizeLinear -> DequantizeLinear` pair (per-tensor, constant scale
//!   and zero point) goes; the rounding goes with it. The pair also saturates to
//!   `[(qmin - zp) * scale, (qmax - zp) * scale]`. When that range starts at 0 the
//!   saturation is kept as a `Relu`: ORT's quantizer drops a `Relu` in front of a u8
//!   `QuantizeLinear` with zero point 0 and leaves the clamp to the quantization. When 0
//!   lies inside the range, saturation only happens outside the calibrated range and is
//!   dropped (consumers read the float activation: no extra op, so tract fuses as in the
//!   float model). Graph outputs and other ranges keep an exact `Clip`.
//! - Nodes and initializers nothing reads any more are dropped.
//!
//! The result computes the float model the quantizer simulated, without activation
//! rounding; whether it stays within the release's tolerance is the gate's call.

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
}

/// What the rewrite did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DequantStats {
    /// Constant `DequantizeLinear` nodes folded into float initializers.
    pub folded_constants: usize,
    /// Activation `QuantizeLinear -> DequantizeLinear` pairs removed.
    pub removed_pairs: usize,
}

/// Rewrites `model` into its dequantized float form. Returns `Err(reason)` when there is
/// nothing to rewrite or the graph is outside what the rewrite handles.
pub fn dequantize(model: &ModelProto) -> Result<(ModelProto, DequantStats), String> {
    match Quantization::of(model) {
        Quantization::Qdq => {}
        Quantization::Float => return Err("float model, nothing to dequantize".into()),
        Quantization::Dynamic => {
            return Err(
                "dynamic quantization (integer ops computed at run time), no QDQ to fold".into(),
            );
        }
        Quantization::QOperator => {
            return Err("QOperator model (quantized ops, no QDQ pairs to fold)".into());
        }
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
    let stats = rewrite_graph(graph, opset)?;
    if stats.folded_constants == 0 && stats.removed_pairs == 0 {
        return Err(
            "no constant DequantizeLinear and no QuantizeLinear->DequantizeLinear pair".into(),
        );
    }
    Ok((out, stats))
}

enum Replace {
    Nothing,
    /// The next node of the replacement list takes this node's place.
    Clip,
}

fn rewrite_graph(graph: &mut GraphProto, opset: i64) -> Result<DequantStats, String> {
    let mut stats = DequantStats::default();
    let graph_inputs: HashSet<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    let init_index: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    // Initializers that are also graph inputs can be overridden by the caller: not constant.
    let constant = |name: &str| -> Option<usize> {
        if graph_inputs.contains(name) {
            None
        } else {
            init_index.get(name).copied()
        }
    };
    let producer: HashMap<String, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();

    let mut new_inits = Vec::new();
    let mut drop_nodes = HashMap::new();
    let mut clips = Vec::new();
    let mut renames: HashMap<String, String> = HashMap::new();
    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();

    for (ix, node) in graph.node.iter().enumerate() {
        if node.op_type != "DequantizeLinear" || !node.domain.is_empty() && node.domain != "ai.onnx"
        {
            continue;
        }
        let (Some(x), Some(y)) = (node.input.first(), node.output.first()) else {
            continue;
        };
        if let Some(xi) = constant(x) {
            let scale = node.input.get(1).and_then(|s| constant(s));
            let zp = match node.input.get(2).filter(|s| !s.is_empty()) {
                Some(z) => constant(z).map(Some),
                None => Some(None),
            };
            let (Some(si), Some(zi)) = (scale, zp) else {
                continue;
            };
            if attr_i(node, "block_size").is_some_and(|b| b != 0) {
                continue;
            }
            let folded = fold(
                &graph.initializer[xi],
                &graph.initializer[si],
                zi.map(|zi| &graph.initializer[zi]),
                attr_i(node, "axis").unwrap_or(1),
                y,
            )?;
            new_inits.push(folded);
            drop_nodes.insert(ix, Replace::Nothing);
            stats.folded_constants += 1;
        } else if let Some(&qi) = producer.get(x) {
            let q = &graph.node[qi];
            if q.op_type != "QuantizeLinear" || attr_i(q, "output_dtype").is_some_and(|d| d != 0) {
                continue;
            }
            let Some(q_in) = q.input.first() else {
                continue;
            };
            let Some((lo, hi)) = saturation_range(graph, q, &constant)? else {
                continue;
            };
            if lo < 0.0 && hi > 0.0 && !graph_outputs.contains(y) {
                // Saturation only outside the calibrated range: dropped, consumers read
                // the float activation directly. Graph outputs keep it: what the caller
                // sees stays exactly as saturated as with onnxruntime.
                renames.insert(y.clone(), q_in.clone());
                drop_nodes.insert(ix, Replace::Nothing);
            } else {
                drop_nodes.insert(ix, Replace::Clip);
                clips.push(saturate(node, q_in, y, lo, hi, opset, &mut new_inits));
            }
            stats.removed_pairs += 1;
        }
    }

    let nodes = std::mem::take(&mut graph.node);
    // Each Clip takes the place of its DequantizeLinear, which keeps topological order.
    let mut clips = clips.into_iter();
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter_map(|(i, n)| match drop_nodes.get(&i) {
            None => Some(n),
            Some(Replace::Clip) => clips.next(),
            Some(Replace::Nothing) => None,
        })
        .map(|mut n| {
            for input in &mut n.input {
                if let Some(to) = renames.get(input) {
                    *input = to.clone();
                }
            }
            n
        })
        .collect();
    graph.initializer.extend(new_inits);
    prune(graph);
    Ok(stats)
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

/// The float range a `QuantizeLinear` saturates to, `[(qmin - zp) * scale, (qmax - zp) * scale]`,
/// for per-tensor constant scale and zero point; `None` when not known statically.
fn saturation_range(
    graph: &GraphProto,
    q: &NodeProto,
    constant: &dyn Fn(&str) -> Option<usize>,
) -> Result<Option<(f32, f32)>, String> {
    let Some(si) = q.input.get(1).and_then(|s| constant(s)) else {
        return Ok(None);
    };
    let scale = to_f64(&load(&graph.initializer[si])?, &graph.initializer[si].name)?;
    let (zp, zp_type) = match q.input.get(2).filter(|z| !z.is_empty()) {
        None => (vec![0.0], DataType::Uint8 as i32),
        Some(z) => match constant(z) {
            None => return Ok(None),
            Some(zi) => {
                let t = &graph.initializer[zi];
                (to_f64(&load(t)?, &t.name)?, t.data_type)
            }
        },
    };
    if scale.len() != 1 || zp.len() != 1 {
        return Ok(None);
    }
    let (qmin, qmax) = match DataType::try_from(zp_type) {
        Ok(DataType::Uint8) => (0.0, 255.0),
        Ok(DataType::Int8) => (-128.0, 127.0),
        Ok(DataType::Uint16) => (0.0, 65535.0),
        Ok(DataType::Int16) => (-32768.0, 32767.0),
        _ => return Ok(None),
    };
    let lo = ((qmin - zp[0]) as f32) * scale[0] as f32;
    let hi = ((qmax - zp[0]) as f32) * scale[0] as f32;
    Ok(Some((lo.min(hi), lo.max(hi))))
}

/// `Relu(x) -> y` when the range starts at 0 (tract fuses it into the producer), else
/// `Clip(x, lo, hi) -> y` in the form the model's opset understands.
fn saturate(
    dq: &NodeProto,
    x: &str,
    y: &str,
    lo: f32,
    hi: f32,
    opset: i64,
    inits: &mut Vec<TensorProto>,
) -> NodeProto {
    let name = format!("{}_saturate", if dq.name.is_empty() { y } else { &dq.name });
    if lo == 0.0 {
        return NodeProto {
            input: vec![x.to_string()],
            output: vec![y.to_string()],
            name,
            op_type: "Relu".into(),
            ..Default::default()
        };
    }
    let mut node = NodeProto {
        input: vec![x.to_string()],
        output: vec![y.to_string()],
        name: name.clone(),
        op_type: "Clip".into(),
        ..Default::default()
    };
    if opset >= 11 {
        for (suffix, v) in [("min", lo), ("max", hi)] {
            let tname = format!("{name}_{suffix}");
            inits.push(TensorProto {
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
    node
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

fn fold(
    x: &TensorProto,
    scale: &TensorProto,
    zero_point: Option<&TensorProto>,
    axis: i64,
    name: &str,
) -> Result<TensorProto, String> {
    let xt = load(x)?;
    let shape = xt.shape().to_vec();
    let xs = to_f64(&xt, &x.name)?;
    let scales = to_f64(&load(scale)?, &scale.name)?;
    let zps = match zero_point {
        Some(z) => to_f64(&load(z)?, &z.name)?,
        None => vec![0.0],
    };
    let channels = scales.len();
    if channels == 0 || (zps.len() != channels && zps.len() != 1) {
        return Err(format!(
            "{name}: scale/zero-point lengths {channels}/{}",
            zps.len()
        ));
    }
    let inner = if channels == 1 {
        1
    } else {
        let rank = shape.len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&axis) || shape[axis as usize] != channels {
            return Err(format!(
                "{name}: {channels} per-channel scales do not fit axis {axis} of shape {shape:?}"
            ));
        }
        shape[axis as usize + 1..].iter().product::<usize>()
    };
    let mut raw = Vec::with_capacity(xs.len() * 4);
    for (i, q) in xs.iter().enumerate() {
        let c = (i / inner) % channels;
        let zp = if zps.len() == 1 { zps[0] } else { zps[c] };
        // ORT: integer subtraction, then float multiply.
        let v = ((q - zp) as f32) * (scales[c] as f32);
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

/// Why `source` has no dequantized variant (`None` when it has one).
pub fn dequantize_reason(source: &super::OnnxSource) -> Option<String> {
    dequantize(source.proto()).err()
}
