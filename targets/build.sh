#!/usr/bin/env bash
# Cross-build the agent and liboutpost for one Linux device target and test them under
# qemu-user. On a fresh Debian bookworm (amd64) machine it installs what is missing.
#
#   targets/build.sh TRIPLE [--no-test | --artifact-tests-only] [--out DIR]
#
# TRIPLE: aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf (targets/*/env.sh).
# Writes stripped `outpost-agent`, `liboutpost.so`, `liboutpost.a`,
# `outpost.h` and `sizes.txt` to DIR (default $OUTPOST_CROSS_TARGET_DIR/dist/TRIPLE).
# Environment: OUTPOST_CROSS_TARGET_DIR (default /var/tmp/outpost-cross-target; a cache
# kept outside the clone, separate from rustup's target dir because the toolchain differs).
# --artifact-tests-only runs the C SDK and agent-binary checks against the shipped files
# but not the Rust test suites, which need a second (release-profile) build of everything.
# Exit status: 0 built (and tested), 1 a step failed, 2 bad usage.
# See targets/README.md for what is tested under qemu and why.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() {
  sed -n '5,6p' "$0" >&2
  exit 2
}

TRIPLE=""
RUN_TESTS=1
CARGO_TESTS=1
DIST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-test) RUN_TESTS=0 ;;
    --artifact-tests-only) CARGO_TESTS=0 ;;
    --out) [ $# -ge 2 ] || usage; DIST=$2; shift ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [ -z "$TRIPLE" ] || usage; TRIPLE=$1 ;;
  esac
  shift
done
[ -n "$TRIPLE" ] || usage
TDIR="$ROOT/targets/$TRIPLE"
if [ ! -f "$TDIR/env.sh" ]; then
  echo "unknown target $TRIPLE (have: $(cd "$ROOT/targets" && ls -d */ | tr -d / | tr '\n' ' '))" >&2
  exit 2
fi
TARGET_BUILT_HERE=0
# shellcheck source=/dev/null
. "$TDIR/env.sh"
if [ "$TARGET_BUILT_HERE" != 1 ]; then
  echo "$TRIPLE is configured for users' CI, not built here: see $TDIR/README.md" >&2
  exit 2
fi

export CARGO_TARGET_DIR="${OUTPOST_CROSS_TARGET_DIR:-/var/tmp/outpost-cross-target}"
DIST="${DIST:-$CARGO_TARGET_DIR/dist/$TRIPLE}"
# Debian's rustc-web (1.96): the only Rust here with standard libraries for ARM targets.
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
CARGO=/usr/bin/cargo
export CARGO_INCREMENTAL=0 CARGO_TERM_COLOR=never
# Symbols stay in the target dir for size analysis (cargo bloat, nm); DIST gets stripped
# copies, the same bytes the profile's `strip = true` would give.
export CARGO_PROFILE_DEVICE_STRIP=false
# SQLite without what the agent's SQL does not use: full-text search, R-tree, JSON SQL
# functions. Saves ~0.3 MB of code per binary (docs/benchmarks.md, "Device targets").
export LIBSQLITE3_FLAGS="${LIBSQLITE3_FLAGS:--USQLITE_ENABLE_FTS3 -USQLITE_ENABLE_FTS3_PARENTHESIS -USQLITE_ENABLE_FTS5 -USQLITE_ENABLE_RTREE -DSQLITE_OMIT_JSON}"
QEMU_RUN=("$QEMU" -L "/usr/$GNU_TRIPLE")

step() { printf '\n== %s: %s (%ss)\n' "$TRIPLE" "$1" "$SECONDS"; }
die() { echo "error: $*" >&2; exit 1; }

apt_install() {
  local need=() pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  [ "${#need[@]}" -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages ${need[*]}: run as root or install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

step "toolchain"
# shellcheck disable=SC2086
apt_install rustc-web cargo-web qemu-user-static python3 $APT_PACKAGES
RUST_VERSION=$(dpkg-query -W -f='${Version}' rustc-web)
SYSROOT=$(/usr/bin/rustc --print sysroot)
BUILD_STD=()
if ! compgen -G "$SYSROOT/lib/rustlib/$TRIPLE/lib/libstd-*.rlib" >/dev/null; then
  # The target's std, exactly rustc-web's version, from the foreign-architecture .deb,
  # unpacked without `dpkg --add-architecture` (targets/README.md says why). Only this
  # architecture's index is fetched, so a stale index of another one cannot fail it.
  apt_opts=(-o APT::Architectures::=amd64 -o "APT::Architectures::=$DEB_ARCH")
  deb_dir=$(mktemp -d)
  if apt-get "${apt_opts[@]}" update -qq &&
    (cd "$deb_dir" && apt-get "${apt_opts[@]}" download -qq \
      "libstd-rust-web-dev:$DEB_ARCH=$RUST_VERSION" 2>/dev/null); then
    dpkg-deb --fsys-tarfile "$deb_dir"/libstd-rust-web-dev_*.deb |
      tar -x -C "$SYSROOT/.." "./usr/lib/rustlib/$TRIPLE"
    echo "installed the $DEB_ARCH standard library $RUST_VERSION"
  else
    echo "no verified libstd-rust-web-dev:$DEB_ARCH=$RUST_VERSION: building std from rust-web-src"
    apt_install rust-web-src
    BUILD_STD=(-Z build-std=std,panic_abort)
    # -Z build-std is unstable; Debian's 1.96 sources are the stable release's.
    export RUSTC_BOOTSTRAP=1
  fi
  rm -rf "$deb_dir"
fi

step "build (profile device)"
# No unwind tables: with `panic = "abort"` nothing unwinds, and the tables only serve
# backtraces (a panic still prints its message and location; frame pointers stay for gdb
# and perf). `force-unwind-tables=no` stops rustc asking for them; the linker script drops
# what std (prebuilt) and the C code bring: -0.9 MB on aarch64 (docs/benchmarks.md,
# "Device targets"). Set OUTPOST_DEVICE_UNWIND_TABLES=1 to keep them.
DEVICE_RUSTFLAGS="-C force-unwind-tables=no"
LINK_ARGS=(-C link-arg=-Wl,--no-eh-frame-hdr -C "link-arg=-Wl,-T,$ROOT/targets/discard-eh-frame.ld")
if [ "${OUTPOST_DEVICE_UNWIND_TABLES:-0}" = 1 ]; then
  DEVICE_RUSTFLAGS=""
  LINK_ARGS=()
fi
# The agent daemon and liboutpost only: fleet-server is not a device target, and the TUF
# conformance CLI (outpost-tuf-client) is a host tool; each binary costs a fat-LTO link.
# `cargo rustc` passes the link arguments to the final link only.
RUSTFLAGS="$DEVICE_RUSTFLAGS" "$CARGO" rustc "${BUILD_STD[@]}" --profile device \
  --target "$TRIPLE" -p outpost-agent --bin outpost-agent -- "${LINK_ARGS[@]}"
# `--crate-type`: the package also declares an rlib (for `cargo test`), and with an rlib in
# the same rustc call LTO is silently skipped (rust-lang/cargo#9672).
RUSTFLAGS="$DEVICE_RUSTFLAGS" "$CARGO" rustc "${BUILD_STD[@]}" --profile device \
  --target "$TRIPLE" -p outpost-sdk-c --lib --crate-type cdylib,staticlib -- "${LINK_ARGS[@]}"
OUT="$CARGO_TARGET_DIR/$TRIPLE/device"
mkdir -p "$DIST"
for f in outpost-agent liboutpost.so; do
  "$GNU_TRIPLE-strip" -o "$DIST/$f" "$OUT/$f"
done
# A static library keeps its symbols: they are what the app's linker resolves. The LLVM
# bitcode rustc embeds for its own LTO (.llvmbc, 60% of the archive) no C linker reads.
"$GNU_TRIPLE-strip" --strip-debug --remove-section=.llvmbc --remove-section=.llvmcmd \
  -o "$DIST/liboutpost.a" "$OUT/liboutpost.a"
cp "$ROOT/sdk-c/include/outpost.h" "$DIST/"
(cd "$DIST" && stat -c '%n %s' outpost-agent liboutpost.so liboutpost.a) |
  tee "$DIST/sizes.txt"

[ "$RUN_TESTS" = 1 ] || { step "done (tests skipped)"; exit 0; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The model fixtures, with the releases' latency budgets scaled for emulation: qemu-user
# runs tract 10-50x slower than the board, and the validation gate would refuse the
# models. The gate's budget checks are tested natively on the host.
FIX="$WORK/fixtures"
python3 - "$ROOT/tests/fixtures/models" "$FIX" "${QEMU_LATENCY_FACTOR:-50}" <<'PY'
import json, os, sys
src, dst, factor = sys.argv[1], sys.argv[2], float(sys.argv[3])
os.makedirs(dst)
for name in os.listdir(src):
    if name.endswith(".release.json"):
        with open(os.path.join(src, name)) as f:
            release = json.load(f)
        budgets = release.get("budgets") or {}
        if budgets.get("latency_p95_ms") is not None:
            budgets["latency_p95_ms"] *= factor
        with open(os.path.join(dst, name), "w") as f:
            json.dump(release, f, indent=2)
    else:
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
PY
check_out() { # NEEDLE CMD...: run, print on failure, require NEEDLE in stdout
  local needle=$1 out
  shift
  if ! out=$("$@" 2>"$WORK/stderr"); then
    cat "$WORK/stderr" >&2
    die "failed: $*"
  fi
  case "$out" in *"$needle"*) ;; *) printf '%s\n' "$out" >&2; die "no '$needle' from: $*" ;; esac
  printf '%s\n' "$out"
}

step "C SDK tests under qemu (shipped liboutpost.so and .a)"
# The host's sdk-c tests add ASan/UBSan and Valgrind; neither runs under qemu-user, so
# here the same C program runs plainly against the stripped device-profile library.
mkdir -p "$WORK/lib" "$WORK/bin"
ln -s "$DIST/liboutpost.so" "$WORK/lib/liboutpost.so"
ln -s "$DIST/liboutpost.so" "$WORK/lib/liboutpost.so.0"
python3 "$ROOT/targets/npy_rows.py" 40 \
  "$WORK/bin/flat.bin=$FIX/heldout_flat.npy" "$WORK/bin/image.bin=$FIX/heldout_image.npy" \
  "$WORK/bin/mlp_ref.bin=$FIX/mlp.ort.npy" "$WORK/bin/cnn_ref.bin=$FIX/cnn_a.ort.npy" \
  "$WORK/bin/labels.bin=$FIX/heldout_labels.npy"
"$GNU_TRIPLE-gcc" -std=c99 -Wall -Wextra -Werror -O1 -I "$ROOT/sdk-c/include" \
  "$ROOT/sdk-c/tests/c/api_test.c" -L"$WORK/lib" -loutpost -Wl,-rpath,"$WORK/lib" \
  -lpthread -lm -o "$WORK/api_test"
check_out "all checks passed" "${QEMU_RUN[@]}" "$WORK/api_test" \
  "$FIX" "$WORK/data" "$WORK/bin" 40 fresh | tail -1
# The README's static link line, with the cross compiler.
"$GNU_TRIPLE-gcc" -std=c99 -Wall -Werror -I "$ROOT/sdk-c/include" \
  "$ROOT/sdk-c/examples/classify.c" "$DIST/liboutpost.a" -lpthread -ldl -lm \
  -o "$WORK/classify"
for model in mlp cnn_a; do
  for digit in 3 7 9; do
    check_out "digit $digit " "${QEMU_RUN[@]}" "$WORK/classify" "$WORK/data-$model" \
      "$FIX/$model.onnx" "$FIX/$model.release.json" "$FIX/digit_$digit.pgm"
  done
done

step "shipped agent binary under qemu"
check_out "outpost-agent " "${QEMU_RUN[@]}" "$DIST/outpost-agent" --version
out=$(check_out '"outputs"' "${QEMU_RUN[@]}" "$DIST/outpost-agent" infer \
  --model "$FIX/cnn_a.onnx" --input "x=$FIX/sample_image_0.npy")
python3 - "$out" <<'EOF'
import json, sys
logits = json.loads(sys.argv[1])["outputs"]["logits"]["data"]
top = max(range(len(logits)), key=logits.__getitem__)
assert top == 0, f"sample_image_0 is a 0, the device agent said {top}: {logits}"
print("outpost-agent infer: digits CNN classifies sample_image_0 as 0")
EOF

[ "$CARGO_TESTS" = 1 ] || { step "done (Rust test suites skipped)"; exit 0; }

step "agent tests under qemu (profile release)"
# Tests that start the agent binary or re-execute the test binary as a child (crash and
# CLI tests: agent_crash, crash, runtime_cli, tuf_client, update_mqtt) need binfmt_misc
# to exec an ARM binary from inside qemu-user; they run on the host in .ci/run.
"$CARGO" test "${BUILD_STD[@]}" --profile release --target "$TRIPLE" -p outpost-agent \
  --lib --test agent --test monitor --test runtime --test update_machine
"$CARGO" test "${BUILD_STD[@]}" --profile release --target "$TRIPLE" -p outpost-sdk-c --lib

step "done"
