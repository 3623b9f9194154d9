#!/usr/bin/env python3
"""Make (base, target) ONNX model pairs for the delta benchmark.

Trains a 64-512-512-10 MLP on scikit-learn's digits (numpy backprop, float32, ~1.2 MB
as ONNX) and writes, under OUT_DIR (default /var/tmp/outpost-delta-bench/pairs):

  head/          base -> last layer fine-tuned on shifted data, the rest frozen
  full-sgd/      base -> every weight fine-tuned, SGD lr 1e-3, 1 epoch
  full-adam/     base -> every weight fine-tuned, Adam lr 1e-4, 1 epoch (larger moves)
  requant/       QDQ int8 of base -> QDQ int8 of the full-sgd fine-tune (onnxruntime)
  widen/         base -> second hidden layer widened 512 -> 640 (old units kept, new
                 ones small random), then fine-tuned 1 epoch (SGD lr 1e-3)

Each directory holds base.onnx and target.onnx. Deterministic (fixed seeds).
Needs: numpy, onnx, onnxruntime, scikit-learn.
"""

import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

OUT = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/outpost-delta-bench/pairs"


def data():
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return x, y


def init(sizes, rng):
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        params.append((rng.normal(0, np.sqrt(2.0 / a), (a, b)).astype(np.float32), np.zeros(b, np.float32)))
    return params


def forward(params, x):
    acts = [x]
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = np.maximum(h, 0)
        acts.append(h)
    return acts


def grads(params, x, y):
    acts = forward(params, x)
    logits = acts[-1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    delta = p / len(y)
    out = []
    for i in reversed(range(len(params))):
        w, _ = params[i]
        out.append((acts[i].T @ delta, delta.sum(0)))
        if i > 0:
            delta = (delta @ w.T) * (acts[i] > 0)
    return out[::-1]


def train(params, x, y, epochs, lr, rng, opt="sgd", trainable=None, batch=64):
    params = [(w.copy(), b.copy()) for w, b in params]
    trainable = trainable if trainable is not None else range(len(params))
    m = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    v = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), batch):
            idx = order[s : s + batch]
            g = grads(params, x[idx], y[idx])
            t += 1
            for i in trainable:
                new = []
                for j in range(2):
                    gj = g[i][j].astype(np.float32)
                    if opt == "adam":
                        m[i][j][...] = 0.9 * m[i][j] + 0.1 * gj
                        v[i][j][...] = 0.999 * v[i][j] + 0.001 * gj * gj
                        mh = m[i][j] / (1 - 0.9**t)
                        vh = v[i][j] / (1 - 0.999**t)
                        step = lr * mh / (np.sqrt(vh) + 1e-8)
                    else:
                        step = lr * gj
                    new.append((params[i][j] - step).astype(np.float32))
                params[i] = (new[0], new[1])
    return params


def accuracy(params, x, y):
    return float((forward(params, x)[-1].argmax(1) == y).mean())


def export(params, path):
    nodes, inits = [], []
    h = "input"
    for i, (w, b) in enumerate(params):
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        nodes.append(helper.make_node("MatMul", [h, f"fc{i}.weight"], [f"mm{i}"]))
        out = "logits" if i == len(params) - 1 else f"add{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [out]))
        if i < len(params) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            h = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="outpost-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def quantize(src, dst, x):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(x[:200].reshape(-1, 1, 64))

        def get_next(self):
            n = next(self.it, None)
            return None if n is None else {"input": n}

    quantize_static(
        src,
        dst,
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )


def widen(params, extra, rng):
    (w0, b0), (w1, b1), (w2, b2) = params
    w1n = np.concatenate([w1, rng.normal(0, 0.01, (w1.shape[0], extra)).astype(np.float32)], 1)
    b1n = np.concatenate([b1, np.zeros(extra, np.float32)])
    w2n = np.concatenate([w2, rng.normal(0, 0.01, (extra, w2.shape[1])).astype(np.float32)], 0)
    return [(w0, b0), (w1n, b1n), (w2n, b2)]


def mean_rel_change(a, b):
    num = sum(float(np.abs(wa - wb).sum() + np.abs(ba - bb).sum()) for (wa, ba), (wb, bb) in zip(a, b))
    den = sum(float(np.abs(w).sum() + np.abs(bb).sum()) for (w, bb) in a)
    return num / den


def main():
    rng = np.random.default_rng(0)
    x, y = data()
    base = train(init([64, 512, 512, 10], rng), x, y, epochs=15, lr=1e-3, rng=rng, opt="adam")
    # "New data": the same digits with pixel noise, as a device cohort might see them.
    x_shift = np.clip(x + rng.normal(0, 0.15, x.shape).astype(np.float32), 0, 1)

    pairs = {
        "head": train(base, x_shift, y, epochs=3, lr=1e-3, rng=rng, opt="adam", trainable=[2]),
        "full-sgd": train(base, x_shift, y, epochs=1, lr=1e-3, rng=rng),
        "full-adam": train(base, x_shift, y, epochs=1, lr=1e-4, rng=rng, opt="adam"),
    }
    stats = {"base_accuracy": accuracy(base, x, y)}
    for name, tuned in pairs.items():
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        export(base, os.path.join(d, "base.onnx"))
        export(tuned, os.path.join(d, "target.onnx"))
        stats[name] = {"accuracy_shifted": accuracy(tuned, x_shift, y), "mean_rel_change": mean_rel_change(base, tuned)}

    d = os.path.join(OUT, "requant")
    os.makedirs(d, exist_ok=True)
    quantize(os.path.join(OUT, "full-sgd", "base.onnx"), os.path.join(d, "base.onnx"), x)
    quantize(os.path.join(OUT, "full-sgd", "target.onnx"), os.path.join(d, "target.onnx"), x)

    wide = train(widen(base, 128, rng), x_shift, y, epochs=1, lr=1e-3, rng=rng)
    d = os.path.join(OUT, "widen")
    os.makedirs(d, exist_ok=True)
    export(base, os.path.join(d, "base.onnx"))
    export(wide, os.path.join(d, "target.onnx"))
    stats["widen"] = {"accuracy_shifted": accuracy(wide, x_shift, y)}

    with open(os.path.join(OUT, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
