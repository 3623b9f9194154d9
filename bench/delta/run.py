#!/usr/bin/env python3
"""Delta benchmark: our codecs vs zstd --patch-from, xdelta3, bsdiff and full zstd -19.

Usage: bench/delta/run.py [PAIRS_DIR]   (default /var/tmp/outpost-delta-bench/pairs;
made by make_pairs.py if missing). Builds the `delta` example in release mode, encodes
every pair with every tool, checks that our delta applies back to the exact target, and
prints a markdown table. Needs zstd, xdelta3 and bsdiff on PATH.
"""

import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PAIRS = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/outpost-delta-bench/pairs"
ORDER = ["head", "full-sgd", "full-adam", "requant", "widen"]


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw).stdout


def size(path):
    return os.path.getsize(path)


def main():
    if not os.path.isdir(PAIRS):
        subprocess.run([sys.executable, os.path.join(HERE, "make_pairs.py"), PAIRS], check=True)
    target_dir = os.environ.setdefault("CARGO_TARGET_DIR", "/var/tmp/outpost-target")
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "-p", "outpost-protocol", "--example", "delta"],
        cwd=ROOT,
        check=True,
    )
    ours_bin = os.path.join(target_dir, "release", "examples", "delta")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        names = [n for n in ORDER if os.path.isdir(os.path.join(PAIRS, n))]
        names += sorted(n for n in os.listdir(PAIRS) if os.path.isdir(os.path.join(PAIRS, n)) and n not in names)
        for name in names:
            base = os.path.join(PAIRS, name, "base.onnx")
            target = os.path.join(PAIRS, name, "target.onnx")
            out = lambda tool: os.path.join(tmp, f"{name}.{tool}")
            r = {"pair": name, "target": size(target)}

            t0 = time.monotonic()
            line = run(ours_bin, "encode", "--base", base, "--target", target, "--out", out("ours"))
            t1 = time.monotonic()
            fields = dict(kv.split("=") for kv in line.split())
            run(ours_bin, "apply", "--base", base, "--delta", out("ours"), "--out", out("back"))
            r["encode_s"], r["apply_s"] = t1 - t0, time.monotonic() - t1
            with open(target, "rb") as a, open(out("back"), "rb") as b:
                assert a.read() == b.read(), f"{name}: round trip differs"
            for codec in ["zstd-ref", "tensor"]:
                run(ours_bin, "encode", "--codec", codec, "--base", base, "--target", target, "--out", out(codec))
                r[codec] = size(out(codec))
            r["codec"] = fields["codec"]
            r["ours"] = int(fields["full_zstd"]) if fields["codec"] == "full" else size(out("ours"))

            run("zstd", "-q", "-f", "-19", "--long=27", f"--patch-from={base}", target, "-o", out("pf"))
            r["patch-from"] = size(out("pf"))
            run("xdelta3", "-e", "-9", "-f", "-s", base, target, out("xd"))
            r["xdelta3"] = size(out("xd"))
            run("bsdiff", base, target, out("bs"))
            r["bsdiff"] = size(out("bs"))
            run("zstd", "-q", "-f", "-19", target, "-o", out("full"))
            r["full"] = size(out("full"))
            rows.append(r)

    print("| pair | target | ours (codec) | zstd --patch-from | xdelta3 | bsdiff | zstd -19 full | ours / patch-from | ours / best other |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        best_other = min(r["patch-from"], r["xdelta3"], r["bsdiff"], r["full"])
        print(
            f"| {r['pair']} | {r['target']:,} | {r['ours']:,} ({r['codec']}) | {r['patch-from']:,} | "
            f"{r['xdelta3']:,} | {r['bsdiff']:,} | {r['full']:,} | {r['ours'] / r['patch-from']:.2f} | "
            f"{r['ours'] / best_other:.2f} |"
        )
    print()
    print("Per codec (bytes), and wall time of our best-of encode (all codecs + full) and apply:")
    for r in rows:
        print(
            f"- {r['pair']}: zstd-ref {r['zstd-ref']:,}, tensor {r['tensor']:,}; "
            f"encode {r['encode_s']:.1f} s, apply {r['apply_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
