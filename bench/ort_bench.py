#!/usr/bin/env python3
"""Single-sample inference latency of onnxruntime on every model fixture, optionally
side by side with `outpost-agent bench`.

For each fixture in tests/fixtures/models/index.json that onnxruntime can load, with one
intra-op and one inter-op thread and sequential execution:
- cold start: session creation + first run, in milliseconds;
- p50/p99 of `session.run` over --iterations runs of the first held-out sample, in
  microseconds (after --warmup untimed runs). Python's call overhead (a few us) is
  included, as it is for any caller of the ORT Python API.

Prints one JSON line per fixture:
    {"fixture": ..., "ort_cold_start_ms": ..., "ort_p50_us": ..., "ort_p99_us": ...}

With --agent BIN it also runs, per fixture,
    BIN bench --model MODEL.onnx --input x=SAMPLE.npy --iterations N
reads the last JSON object on its stdout ({"cold_start_ms", "p50_us", "p99_us",
"path"}) and finally prints a markdown table with both runtimes and the ratio
agent p50 / ORT p50. A fixture the agent rejects shows its exit status instead.

Usage:
    python3 bench/ort_bench.py [--iterations 2000] [--only mlp,cnn_a] [--agent target/release/outpost-agent]
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "models"


def ort_session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 4  # corrupt fixtures fail loudly enough through the exception
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def percentile_us(samples_s, q):
    return round(float(np.percentile(np.asarray(samples_s) * 1e6, q)), 2)


def bench_ort(model, sample, iterations, warmup):
    t0 = time.perf_counter()
    s = ort_session(model)
    feed = {s.get_inputs()[0].name: sample}
    s.run(None, feed)
    cold_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        s.run(None, feed)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return {
        "ort_cold_start_ms": round(cold_ms, 3),
        "ort_p50_us": percentile_us(times, 50),
        "ort_p99_us": percentile_us(times, 99),
    }


def bench_agent(agent, model, sample_file, iterations, timeout):
    cmd = [agent, "bench", "--model", str(model), "--input", f"x={sample_file}", "--iterations", str(iterations)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"exit {p.returncode}: {last[:120]}"}
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            out = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(out, dict) and "p50_us" in out:
            return out
    return {"error": "no JSON with p50_us on stdout"}


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=pathlib.Path, default=FIXTURES, help="directory holding index.json")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    ap.add_argument("--agent", help="path to outpost-agent; adds its `bench` numbers and a markdown table")
    ap.add_argument("--agent-timeout", type=float, default=300.0, help="seconds per agent run")
    args = ap.parse_args()

    index = json.loads((args.fixtures / "index.json").read_text())
    only = {n for n in args.only.split(",") if n}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in index["fixtures"]:
            name = f["name"]
            if only and name not in only:
                continue
            model = args.fixtures / f["file"]
            sample = np.load(args.fixtures / f["inputs"])[0]
            sample_file = pathlib.Path(tmp) / (name.replace("/", "_") + ".npy")
            np.save(sample_file, sample)
            line = {"fixture": name}
            try:
                line.update(bench_ort(model, sample, args.iterations, args.warmup))
            except Exception as e:  # noqa: BLE001 - corrupt fixtures are expected to fail
                line["ort_error"] = str(e).splitlines()[0][:160]
            print(json.dumps(line), flush=True)
            agent = bench_agent(args.agent, model, sample_file, args.iterations, args.agent_timeout) if args.agent else None
            rows.append((line, agent))

    if not args.agent:
        return
    print()
    print("| fixture | ORT cold ms | ORT p50 us | ORT p99 us | agent cold ms | agent p50 us | agent p99 us | agent path | agent/ORT p50 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for line, agent in rows:
        ort_p50 = line.get("ort_p50_us")
        if "error" in agent:
            a = ["-", "-", "-", agent["error"].replace("|", "/"), "-"]
        else:
            ratio = f"{agent['p50_us'] / ort_p50:.2f}" if ort_p50 else "-"
            a = [fmt(agent.get("cold_start_ms"), 2), fmt(agent.get("p50_us")), fmt(agent.get("p99_us")),
                 str(agent.get("path", "-")), ratio]
        o = [fmt(line.get("ort_cold_start_ms"), 2), fmt(ort_p50), fmt(line.get("ort_p99_us"))]
        if "ort_error" in line:
            o = ["-", "-", "error"]
        print("| " + " | ".join([line["fixture"]] + o + a) + " |")


if __name__ == "__main__":
    sys.exit(main())
