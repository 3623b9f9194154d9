//! Dynamic quantization (`onnxruntime.quantization.quantize_dynamic`) rewritten to float.
//!
//! ORT emits, per quantized `MatMul`/`Conv` with constant weights `w` (u8 or i8, zero
//! point `wz`, scale `ws`, per tensor or per output channel):
//!
//! ```text
//! xq, xs, xz = DynamicQuantizeLinear(x)
//! s = Mul(xs, ws)
//! i = MatMulInteger(xq, w, xz, wz)        (or ConvInteger with Conv's attributes)
//! y = Mul(Cast<float>(i), s)
//! ```
//!
//! which is `MatMul(x', (w - wz) * ws)` where `x'` is `x` rounded to 256 levels over its
//! own range. Two rewrites, by [`Activations`]:
//! - [`Activations::Float`]: `y = MatMul(x, (w - wz) * ws)`; the activation rounding
//!   goes, and with it the `DynamicQuantizeLinear` once nothing else reads it.
//! - [`Activations::Rounded`]: the integer product is computed exactly in float,
//!   `y = Mul(MatMul(float(xq) - float(xz), float(w - wz)), s)`; outputs match ORT's
//!   up to float summation order, at the cost of the quantization ops.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, attribute_proto, tensor_proto};

use super::{Activations, DequantStats, Walk, fold, is_op, load, to_f64};

/// One `DynamicQuantizeLinear -> *Integer -> Cast -> Mul` chain.
struct Chain {
    /// The integer op's index.
    op: usize,
    /// The `Cast` and the final `Mul`.
    cast: usize,
    mul: usize,
    /// The `DynamicQuantizeLinear`.
    quantizer: usize,
    /// Weight scales and zero points, one value or one per output channel.
    scales: Vec<f64>,
    zero_points: Vec<f64>,
    /// The weights' output-channel axis.
    axis: i64,
}

pub(super) fn rewrite(
    graph: &mut GraphProto,
    opset: i64,
    mode: Activations,
) -> Result<DequantStats, String> {
    let nodes = std::mem::take(&mut graph.node);
    let mut walk = Walk::new(graph, &nodes, opset);
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for x in &n.input {
            consumers.entry(x.as_str()).or_default().push(i);
        }
        for y in &n.output {
            producer.insert(y.as_str(), i);
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut chains = HashMap::new();
    let mut dropped = HashSet::new();
    for i in 0..nodes.len() {
        if let Some(c) = find_chain(&walk, &nodes, i, &consumers, &producer, &outputs)? {
            dropped.insert(c.cast);
            if mode == Activations::Float {
                dropped.insert(c.mul);
            }
            chains.insert(i, c);
        }
    }
    let quantizers_before = count(&nodes, "DynamicQuantizeLinear");
    // Per DynamicQuantizeLinear, the centred integer activation `float(xq) - float(xz)`.
    let mut centred: HashMap<usize, String> = HashMap::new();
    for (i, mut node) in nodes.iter().cloned().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let Some(chain) = chains.get(&i) else {
            walk.resolve_inputs(&mut node);
            walk.emit(node);
            continue;
        };
        let (q, op, cast, mul) = (
            &nodes[chain.quantizer],
            &nodes[chain.op],
            &nodes[chain.cast],
            &nodes[chain.mul],
        );
        let w = walk
            .constant(&op.input[1])
            .ok_or("weights are not constant")?;
        let (input, scales, out) = match mode {
            Activations::Float => (
                walk.resolve(&q.input[0]),
                chain.scales.clone(),
                &mul.output[0],
            ),
            Activations::Rounded => {
                let x = match centred.get(&chain.quantizer) {
                    Some(x) => x.clone(),
                    None => {
                        let x = centre(&mut walk, q);
                        centred.insert(chain.quantizer, x.clone());
                        x
                    }
                };
                (x, vec![1.0], &cast.output[0])
            }
        };
        let wname = walk.fresh(&format!("{}_dequantized", op.input[1]));
        walk.add_init(fold(w, &scales, &chain.zero_points, chain.axis, &wname)?);
        walk.stats.folded_constants += 1;
        let float_op = if is_op(op, "ConvInteger") {
            "Conv"
        } else {
            "MatMul"
        };
        let name = walk.fresh(&format!("{}_float", op.name));
        walk.emit(NodeProto {
            input: vec![input, wname],
            output: vec![out.clone()],
            name,
            op_type: float_op.into(),
            attribute: op.attribute.clone(),
            ..Default::default()
        });
        walk.stats.rewritten_ops += 1;
    }
    let parts = walk.into_parts();
    let stats = super::install(graph, parts);
    let removed = quantizers_before.saturating_sub(count(&graph.node, "DynamicQuantizeLinear"));
    Ok(DequantStats {
        removed_pairs: removed,
        rounded_activations: mode == Activations::Rounded,
        ..stats
    })
}

fn count(nodes: &[NodeProto], op: &str) -> usize {
    nodes.iter().filter(|n| is_op(n, op)).count()
}

/// Emits `float(xq) - float(xz)` for the `DynamicQuantizeLinear` `q`; returns its name.
fn centre(walk: &mut Walk, q: &NodeProto) -> String {
    let cast = |walk: &mut Walk, x: &str| {
        let y = walk.fresh(&format!("{x}_float"));
        let name = walk.fresh(&format!("{x}_cast"));
        walk.emit(NodeProto {
            input: vec![x.to_string()],
            output: vec![y.clone()],
            name,
            op_type: "Cast".into(),
            attribute: vec![AttributeProto {
                name: "to".into(),
                r#type: attribute_proto::AttributeType::Int as i32,
                i: tensor_proto::DataType::Float as i64,
                ..Default::default()
            }],
            ..Default::default()
        });
        y
    };
    let xq = cast(walk, &q.output[0]);
    let xz = cast(walk, &q.output[2]);
    let y = walk.fresh(&format!("{}_centred", q.output[0]));
    let name = walk.fresh(&format!("{}_centre", q.output[0]));
    walk.emit(NodeProto {
        input: vec![xq, xz],
        output: vec![y.clone()],
        name,
        op_type: "Sub".into(),
        ..Default::default()
    });
    y
}

/// The chain whose integer op is `nodes[i]`, if the whole pattern is there with constant
/// weights, and nothing else reads its intermediate values.
fn find_chain(
    walk: &Walk,
    nodes: &[NodeProto],
    i: usize,
    consumers: &HashMap<&str, Vec<usize>>,
    producer: &HashMap<&str, usize>,
    outputs: &HashSet<&str>,
) -> Result<Option<Chain>, String> {
    let op = &nodes[i];
    let conv = is_op(op, "ConvInteger");
    if !conv && !is_op(op, "MatMulInteger") {
        return Ok(None);
    }
    let (Some(xq), Some(w), Some(xz), Some(y)) = (
        op.input.first(),
        op.input.get(1),
        op.input.get(2).filter(|z| !z.is_empty()),
        op.output.first(),
    ) else {
        return Ok(None);
    };
    let Some(wt) = walk.constant(w) else {
        return Ok(None);
    };
    let wz = match op.input.get(3).filter(|z| !z.is_empty()) {
        None => None,
        Some(z) => match walk.constant(z) {
            Some(t) => Some(t),
            None => return Ok(None),
        },
    };
    let Some(&quantizer) = producer.get(xq.as_str()) else {
        return Ok(None);
    };
    let q = &nodes[quantizer];
    if !is_op(q, "DynamicQuantizeLinear")
        || q.output.len() != 3
        || &q.output[0] != xq
        || &q.output[2] != xz
    {
        return Ok(None);
    }
    let only_reader = |name: &str| -> Option<usize> {
        match consumers.get(name).map(Vec::as_slice) {
            Some([one]) if !outputs.contains(name) => Some(*one),
            _ => None,
        }
    };
    let Some(cast) = only_reader(y) else {
        return Ok(None);
    };
    let cast_node = &nodes[cast];
    let to_float = cast_node
        .attribute
        .iter()
        .any(|a| a.name == "to" && a.i == tensor_proto::DataType::Float as i64);
    if !is_op(cast_node, "Cast") || !to_float {
        return Ok(None);
    }
    let Some(cy) = cast_node.output.first() else {
        return Ok(None);
    };
    let Some(mul) = only_reader(cy) else {
        return Ok(None);
    };
    let mul_node = &nodes[mul];
    if !is_op(mul_node, "Mul") || mul_node.input.len() != 2 || mul_node.output.is_empty() {
        return Ok(None);
    }
    let s = if &mul_node.input[0] == cy {
        &mul_node.input[1]
    } else {
        &mul_node.input[0]
    };
    let Some(scale_mul) = producer.get(s.as_str()).map(|&k| &nodes[k]) else {
        return Ok(None);
    };
    if !is_op(scale_mul, "Mul") || scale_mul.input.len() != 2 {
        return Ok(None);
    }
    let ws = match (&scale_mul.input[0], &scale_mul.input[1]) {
        (a, b) if *a == q.output[1] => b,
        (a, b) if *b == q.output[1] => a,
        _ => return Ok(None),
    };
    let Some(wst) = walk.constant(ws) else {
        return Ok(None);
    };
    let scales = to_f64(&load(wst)?, &wst.name)?;
    let zero_points = match wz {
        Some(t) => to_f64(&load(t)?, &t.name)?,
        None => vec![0.0],
    };
    let rank = wt.dims.len();
    if rank < 2 {
        return Ok(None);
    }
    // The output channel: Conv weights [M, C/g, k...] -> output axis 1; MatMul weights
    // [.., K, N] -> the last output axis.
    let (axis, channels) = if conv {
        (0, wt.dims[0])
    } else {
        (rank as i64 - 1, wt.dims[rank - 1])
    };
    let per_channel = |len: usize| len == 1 || len as i64 == channels;
    if !per_channel(scales.len()) || !per_channel(zero_points.len()) {
        return Ok(None);
    }
    // The scale's shape must broadcast onto the output without changing its shape and
    // along the channel axis: right-aligned to the output, its only non-1 dimension is
    // the channel's.
    let sdims = &wst.dims;
    let channel_from_right = if conv { rank - 2 } else { 0 };
    if sdims.len() > rank
        || sdims.iter().rev().enumerate().any(|(j, &d)| {
            d != 1 && !(j == channel_from_right && d == channels && scales.len() > 1)
        })
    {
        return Ok(None);
    }
    Ok(Some(Chain {
        op: i,
        cast,
        mul,
        quantizer,
        scales,
        zero_points,
        axis,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::dequantize;
    use super::super::testing::*;
    use super::*;

    /// `x[1,4]` -> dynamic MatMulInteger (u8 weights, per-tensor) -> `y[1,3]`.
    fn dyn_matmul(ws: TensorProtoSpec) -> tract_onnx::pb::ModelProto {
        let w: Vec<u8> = (0..12).map(|i| (i * 20 + 7) as u8).collect();
        let (ws_dims, ws_vals, wz_vals) = ws;
        model(
            &[1, 4],
            vec![
                node("DynamicQuantizeLinear", &["x"], &["xq", "xs", "xz"]),
                node("Mul", &["xs", "ws"], &["s"]),
                node("MatMulInteger", &["xq", "w", "xz", "wz"], &["i"]),
                with_int(node("Cast", &["i"], &["f"]), "to", 1),
                node("Mul", &["f", "s"], &["m"]),
                node("Add", &["m", "b"], &["y"]),
            ],
            vec![
                u8s("w", &[4, 3], &w),
                f32s("ws", &ws_dims, &ws_vals),
                u8s("wz", &[wz_vals.len() as i64], &wz_vals),
                f32s("b", &[3], &[0.1, -0.2, 0.3]),
            ],
        )
    }

    type TensorProtoSpec = (Vec<i64>, Vec<f32>, Vec<u8>);

    #[test]
    fn dynamic_matmul_becomes_float_matmul_per_tensor_and_per_column() {
        for spec in [
            (vec![], vec![0.02], vec![128]),
            (vec![3], vec![0.02, 0.01, 0.03], vec![120, 128, 136]),
        ] {
            let m = dyn_matmul(spec.clone());
            let (d, stats) = dequantize(&m).unwrap();
            assert_eq!(ops(&d), vec!["MatMul", "Add"], "{spec:?}");
            assert_eq!((stats.rewritten_ops, stats.removed_pairs), (1, 1));
            for seed in 0..20 {
                let x = floats(4, seed, -1.0, 1.0);
                let (a, b) = (run(&m, &[1, 4], &x), run(&d, &[1, 4], &x));
                // Rounding x to 256 levels over [-1, 1]: 1/255 per element at most, times
                // |w| <= 128 * 0.03 over 4 inputs.
                assert!(max_diff(&a, &b) <= 4.0 * 3.84 / 255.0, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn dynamic_rounded_activations_reproduce_the_integer_result() {
        let m = dyn_matmul((vec![3], vec![0.02, 0.01, 0.03], vec![120, 128, 136]));
        let mut d = m.clone();
        let stats = rewrite(d.graph.as_mut().unwrap(), 13, Activations::Rounded).unwrap();
        assert_eq!(stats.rewritten_ops, 1);
        assert!(ops(&d).contains(&"DynamicQuantizeLinear".to_string()));
        assert!(!ops(&d).contains(&"MatMulInteger".to_string()));
        for seed in 0..20 {
            let x = floats(4, seed, -1.0, 1.0);
            let (a, b) = (run(&m, &[1, 4], &x), run(&d, &[1, 4], &x));
            assert!(max_diff(&a, &b) <= 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn dynamic_conv_becomes_float_conv_with_its_attributes() {
        // 2 output channels, 3x3 kernel, padding 1, per-channel scale [2,1,1].
        let w: Vec<u8> = (0..18).map(|i| (i * 13 + 5) as u8).collect();
        let conv = with_ints(
            with_ints(
                node("ConvInteger", &["xq", "w", "xz", "wz"], &["i"]),
                "pads",
                &[1, 1, 1, 1],
            ),
            "kernel_shape",
            &[3, 3],
        );
        let m = model(
            &[1, 1, 4, 4],
            vec![
                node("DynamicQuantizeLinear", &["x"], &["xq", "xs", "xz"]),
                node("Mul", &["xs", "ws"], &["s"]),
                conv,
                with_int(node("Cast", &["i"], &["f"]), "to", 1),
                node("Mul", &["f", "s"], &["y"]),
            ],
            vec![
                u8s("w", &[2, 1, 3, 3], &w),
                f32s("ws", &[2, 1, 1], &[0.01, 0.02]),
                u8s("wz", &[2], &[100, 140]),
            ],
        );
        let (d, _) = dequantize(&m).unwrap();
        assert_eq!(ops(&d), vec!["Conv"]);
        for seed in 0..10 {
            let x = floats(16, seed, 0.0, 1.0);
            let (a, b) = (run(&m, &[1, 1, 4, 4], &x), run(&d, &[1, 1, 4, 4], &x));
            assert_eq!(a.len(), 2 * 16);
            assert!(max_diff(&a, &b) <= 9.0 * 2.8 / 255.0, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn dynamic_chain_read_elsewhere_is_left_alone() {
        // The integer result is also a graph output: removing it would change the outputs.
        let mut m = dyn_matmul((vec![], vec![0.02], vec![128]));
        m.graph
            .as_mut()
            .unwrap()
            .output
            .push(tract_onnx::pb::ValueInfoProto {
                name: "i".into(),
                ..Default::default()
            });
        let err = dequantize(&m).unwrap_err();
        assert!(err.contains("dynamic"), "{err}");
    }

    #[test]
    fn dynamic_scale_that_would_broadcast_the_output_is_left_alone() {
        // A [3,1] scale would turn the [1,3] product into [3,3].
        let m = dyn_matmul((vec![3, 1], vec![0.02, 0.01, 0.03], vec![128]));
        assert!(dequantize(&m).is_err());
    }
}
