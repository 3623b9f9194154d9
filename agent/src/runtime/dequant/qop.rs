//! QOperator models (`QLinearConv`, `QLinearMatMul`) rewritten to float.
//!
//! Every quantized activation `t` (the output of a `QuantizeLinear` or of a rewritten
//! quantized op, with constant per-tensor scale and zero point) gets a float view: the
//! float value it quantizes, with the saturation kept only where it matters (see the
//! [module docs](super#saturation)). Then:
//! - `QLinearConv(x, xs, xz, w, ws, wz, ys, yz, B)` with constant `w` (per-tensor or
//!   per-output-channel) and int32 `B` becomes `Conv(x_float, (w - wz) * ws, B * xs * ws)`
//!   with the same attributes; `QLinearMatMul` becomes `MatMul(a_float, (b - bz) * bs)`
//!   (`bs` per tensor or per column). Their output rounding goes; a clamp at 0 implied by
//!   the output zero point (a fused `Relu`) stays as a `Relu`.
//! - `DequantizeLinear(t)` with `t`'s own parameters reads the float view instead (a graph
//!   output keeps an exact `Clip`); the quantizers nothing reads any more are pruned.
//!
//! A quantized op whose input has no float view (its parameters differ, or it comes from
//! an op the rewrite does not know) stays as shipped, reading the quantized tensor.

use std::collections::HashMap;

use tract_onnx::pb::{GraphProto, NodeProto};

use super::{
    Activations, DequantStats, QParams, Walk, attr_i, fold, fold_constant_dq, is_op, load, qparams,
    to_f64,
};

/// The float view of a quantized tensor.
#[derive(Debug, Clone)]
struct FloatView {
    name: String,
    params: QParams,
}

pub(super) fn rewrite(
    graph: &mut GraphProto,
    opset: i64,
    activations: Activations,
) -> Result<DequantStats, String> {
    let nodes = std::mem::take(&mut graph.node);
    let quantizers_before = count(&nodes);
    let mut walk = Walk::new(graph, &nodes, opset);
    let mut views: HashMap<String, FloatView> = HashMap::new();
    for mut node in nodes {
        walk.resolve_inputs(&mut node);
        if is_op(&node, "QuantizeLinear") && attr_i(&node, "output_dtype").is_none_or(|d| d == 0) {
            let params = qparams(&walk, node.input.get(1), node.input.get(2));
            let view = match (node.input.first(), node.output.first(), params) {
                (Some(x), Some(y), Some(params)) => {
                    let name = match activations {
                        Activations::Float => walk.float_view(x, params.range()),
                        Activations::Rounded => walk.round_to_grid(x, params),
                    };
                    Some((y.clone(), name, params))
                }
                _ => None,
            };
            walk.emit(node);
            if let Some((y, name, params)) = view {
                views.insert(y, FloatView { name, params });
            }
        } else if is_op(&node, "QLinearConv") || is_op(&node, "QLinearMatMul") {
            match float_op(&mut walk, &node, &views, activations)? {
                Some(view) => {
                    views.insert(node.output[0].clone(), view);
                }
                None => walk.emit(node),
            }
        } else if is_op(&node, "DequantizeLinear") {
            if fold_constant_dq(&mut walk, &node)? {
                continue;
            }
            let params = qparams(&walk, node.input.get(1), node.input.get(2));
            let view = node.input.first().and_then(|x| views.get(x));
            match (view, params, node.output.first()) {
                (Some(view), Some(p), Some(y)) if view.params == p => {
                    if walk.is_output(y) {
                        let (lo, hi) = p.range();
                        let y = y.clone();
                        walk.emit_saturation(&view.name, &y, lo, hi, true);
                    } else {
                        walk.rename(y, &view.name);
                    }
                }
                _ => walk.emit(node),
            }
        } else {
            walk.emit(node);
        }
    }
    let parts = walk.into_parts();
    let stats = super::install(graph, parts);
    Ok(DequantStats {
        removed_pairs: quantizers_before.saturating_sub(count(&graph.node)),
        rounded_activations: activations == Activations::Rounded,
        ..stats
    })
}

/// `QuantizeLinear` and `DequantizeLinear` nodes.
fn count(nodes: &[NodeProto]) -> usize {
    nodes
        .iter()
        .filter(|n| is_op(n, "QuantizeLinear") || is_op(n, "DequantizeLinear"))
        .count()
}

/// Emits the float form of the `QLinearConv`/`QLinearMatMul` `op` and returns the float
/// view of its output; `None` (nothing emitted) when it does not fit.
fn float_op(
    walk: &mut Walk,
    op: &NodeProto,
    views: &HashMap<String, FloatView>,
    activations: Activations,
) -> Result<Option<FloatView>, String> {
    let conv = is_op(op, "QLinearConv");
    let at = |i: usize| op.input.get(i).filter(|s| !s.is_empty());
    let (Some(x), Some(w), Some(y)) = (at(0), at(3), op.output.first()) else {
        return Ok(None);
    };
    let Some(view) = views.get(x) else {
        return Ok(None);
    };
    if qparams(walk, at(1), at(2)) != Some(view.params) {
        return Ok(None);
    }
    let (Some(wt), Some(out)) = (walk.constant(w), qparams(walk, at(6), at(7))) else {
        return Ok(None);
    };
    let Some(wst) = at(4).and_then(|s| walk.constant(s)) else {
        return Ok(None);
    };
    let scales = to_f64(&load(wst)?, &wst.name)?;
    let zero_points = match at(5) {
        None => vec![0.0],
        Some(z) => match walk.constant(z) {
            Some(t) => to_f64(&load(t)?, &t.name)?,
            None => return Ok(None),
        },
    };
    let bias = match at(8).filter(|_| conv) {
        None => None,
        Some(b) => match walk.constant(b) {
            Some(t) => Some(t),
            None => return Ok(None),
        },
    };
    let rank = wt.dims.len();
    if rank < 2 {
        return Ok(None);
    }
    // Conv weights [M, C/g, k...] are per output channel on axis 0; MatMul's `b` per
    // column (its last axis).
    let axis = if conv { 0 } else { rank as i64 - 1 };
    let wname = walk.fresh(&format!("{w}_dequantized"));
    let weights = fold(wt, &scales, &zero_points, axis, &wname)?;
    let mut inputs = vec![view.name.clone(), wname];
    let bias = match bias {
        None => None,
        Some(bt) => {
            // The bias is quantized with scale xs * ws (per channel) and zero point 0.
            let bscales: Vec<f64> = scales.iter().map(|s| s * view.params.scale).collect();
            let bname = walk.fresh(&format!("{}_dequantized", bt.name));
            let folded = fold(bt, &bscales, &[0.0], 0, &bname)?;
            inputs.push(bname);
            Some(folded)
        }
    };
    walk.add_init(weights);
    walk.stats.folded_constants += 1;
    if let Some(b) = bias {
        walk.add_init(b);
        walk.stats.folded_constants += 1;
    }
    let float = walk.fresh(&format!("{y}_float"));
    let name = walk.fresh(&format!("{}_float", op.name));
    walk.emit(NodeProto {
        input: inputs,
        output: vec![float.clone()],
        name,
        op_type: if conv { "Conv" } else { "MatMul" }.into(),
        attribute: if conv { op.attribute.clone() } else { vec![] },
        ..Default::default()
    });
    walk.stats.rewritten_ops += 1;
    let name = match activations {
        // The output saturation is kept exactly: unlike activations between float ops,
        // a quantized op's output range is what the quantizer calibrated for the op
        // itself, and held-out inputs do leave it.
        Activations::Float => {
            let (lo, hi) = out.range();
            let y = walk.fresh(&format!("{float}_saturated"));
            walk.emit_saturation(&float, &y, lo, hi, true);
            y
        }
        Activations::Rounded => walk.round_to_grid(&float, out),
    };
    Ok(Some(FloatView { name, params: out }))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{Activations, dequantize, dequantize_with};

    /// `x[1,1,4,4] -> Q -> QLinearConv(2 ch, 3x3, pad 1, per-channel i8, bias) -> DQ ->
    /// Relu -> Q -> QLinearMatMul(32 -> 3) -> DQ -> y`, with `conv_zp` the conv output's
    /// zero point (0: a Relu was fused into the conv).
    fn qop_model(conv_zp: u8) -> tract_onnx::pb::ModelProto {
        let w: Vec<i8> = (0..18).map(|i| ((i * 37) % 200 - 100) as i8).collect();
        let b: Vec<i8> = (0..96).map(|i| ((i * 53) % 250 - 125) as i8).collect();
        let conv = with_ints(
            with_ints(
                node(
                    "QLinearConv",
                    &["xq", "xs", "xz", "w", "ws", "wz", "cs", "cz", "bias"],
                    &["cq"],
                ),
                "pads",
                &[1, 1, 1, 1],
            ),
            "kernel_shape",
            &[3, 3],
        );
        model(
            &[1, 1, 4, 4],
            vec![
                node("QuantizeLinear", &["x", "xs", "xz"], &["xq"]),
                conv,
                node("DequantizeLinear", &["cq", "cs", "cz"], &["c"]),
                node("Relu", &["c"], &["r"]),
                with_int(node("Flatten", &["r"], &["f"]), "axis", 1),
                node("QuantizeLinear", &["f", "fs", "fz"], &["fq"]),
                node(
                    "QLinearMatMul",
                    &["fq", "fs", "fz", "b", "bs", "bz", "ms", "mz"],
                    &["mq"],
                ),
                node("DequantizeLinear", &["mq", "ms", "mz"], &["y"]),
            ],
            vec![
                f32s("xs", &[], &[1.0 / 255.0]),
                u8s("xz", &[], &[0]),
                i8s("w", &[2, 1, 3, 3], &w),
                f32s("ws", &[2], &[0.01, 0.005]),
                i8s("wz", &[2], &[0, 0]),
                i32s("bias", &[2], &[1000, -3000]),
                f32s("cs", &[], &[0.05]),
                u8s("cz", &[], &[conv_zp]),
                f32s("fs", &[], &[0.05]),
                u8s("fz", &[], &[0]),
                i8s("b", &[32, 3], &b),
                f32s("bs", &[], &[0.005]),
                i8s("bz", &[], &[0]),
                f32s("ms", &[], &[0.05]),
                u8s("mz", &[], &[128]),
            ],
        )
    }

    fn check(conv_zp: u8, activations: Activations, want_ops: &[&str]) -> f32 {
        let m = qop_model(conv_zp);
        let (d, stats) = dequantize_with(&m, activations).unwrap();
        assert_eq!(ops(&d), want_ops);
        assert_eq!(stats.rewritten_ops, 2);
        assert_eq!(stats.folded_constants, 3);
        assert_eq!(stats.removed_pairs, 4);
        let mut worst = 0.0f32;
        for seed in 0..20 {
            let x = floats(16, seed, 0.0, 1.0);
            let (a, b) = (run(&m, &[1, 1, 4, 4], &x), run(&d, &[1, 1, 4, 4], &x));
            // A few output steps (0.05): the conv and flatten roundings (0.025 each)
            // through 32 weights of |w| <= 0.63 stay well under 0.5; real bugs move
            // outputs by whole units.
            assert!(max_diff(&a, &b) <= 0.5, "seed {seed}: {a:?} vs {b:?}");
            worst = worst.max(max_diff(&a, &b));
        }
        worst
    }

    #[test]
    fn qlinear_conv_and_matmul_become_float_ops() {
        // The quantized ops' output saturation stays as an exact Clip; the explicit Relu
        // stays, the Flatten's quantization adds nothing; the graph output keeps a Clip.
        check(
            128,
            Activations::Float,
            &["Conv", "Clip", "Relu", "Flatten", "MatMul", "Clip", "Clip"],
        );
    }

    #[test]
    fn qlinear_conv_with_fused_relu_needs_no_second_relu() {
        // Output zero point 0: the quantized conv clamps at 0 (a fused Relu), which makes
        // the explicit Relu after it redundant.
        check(
            0,
            Activations::Float,
            &["Conv", "Clip", "Flatten", "MatMul", "Clip", "Clip"],
        );
    }

    #[test]
    fn qlinear_rounded_activations_reproduce_the_quantized_model() {
        let worst = check(
            128,
            Activations::Rounded,
            &[
                "Mul", "Round", "Clip", "Mul", "Conv", "Mul", "Round", "Clip", "Mul", "Relu",
                "Flatten", "Mul", "Round", "Clip", "Mul", "MatMul", "Mul", "Round", "Clip", "Mul",
                "Clip",
            ],
        );
        // Up to one output step where float summation order moves a value across a
        // rounding boundary.
        assert!(worst <= 0.05 + 1e-6, "{worst}");
    }

    #[test]
    fn qlinear_op_with_non_constant_weights_is_left_alone() {
        let mut m = qop_model(128);
        let g = m.graph.as_mut().unwrap();
        // `b` becomes a graph input: it can be overridden, so it is not constant.
        g.input.push(tract_onnx::pb::ValueInfoProto {
            name: "b".into(),
            ..Default::default()
        });
        let (d, stats) = dequantize(&m).unwrap();
        assert_eq!(stats.rewritten_ops, 1);
        assert!(
            ops(&d).contains(&"QLinearMatMul".to_string()),
            "{:?}",
            ops(&d)
        );
    }
}
