#!/usr/bin/env bash
# Sizes and peak memory of what targets/build.sh TRIPLE built, under qemu-user.
#
#   targets/footprint.sh TRIPLE
#
# Prints stripped sizes, then peak RSS (VmHWM of the qemu process, which holds the guest's
# memory plus qemu's own, about 10-20 MB: the baseline row is qemu running
# `outpost-agent --version`) for: the agent daemon idle (connected to a local Mosquitto,
# no model), the agent serving the digits CNN (`outpost-agent bench`), and the C example
# statically linked with liboutpost classifying one digit. Needs mosquitto.
# Numbers under qemu are indicative: measure on the board for a budget.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRIPLE=${1:?usage: targets/footprint.sh TRIPLE}
TARGET_BUILT_HERE=0
# shellcheck source=/dev/null
. "$ROOT/targets/$TRIPLE/env.sh"
[ "$TARGET_BUILT_HERE" = 1 ] || { echo "$TRIPLE is not built here" >&2; exit 2; }
CROSS_DIR="${OUTPOST_CROSS_TARGET_DIR:-/var/tmp/outpost-cross-target}"
DIST="$CROSS_DIR/dist/$TRIPLE"
[ -x "$DIST/outpost-agent" ] || { echo "run targets/build.sh $TRIPLE first" >&2; exit 1; }
FIX="$ROOT/tests/fixtures/models"
QEMU_RUN=("$QEMU" -L "/usr/$GNU_TRIPLE")
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "# $TRIPLE"
echo "## stripped sizes (bytes, MiB)"
for f in outpost-agent liboutpost.so liboutpost.a; do
  s=$(stat -c %s "$DIST/$f")
  printf '%-20s %10d  %6.2f MiB\n' "$f" "$s" "$(echo "$s / 1048576" | bc -l)"
done

peak_kib() { # peak RSS in KiB of a finished command, from GNU time
  /usr/bin/time -f '%M' -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" ||
    { cat "$WORK/err" >&2; return 1; }
  cat "$WORK/time"
}

echo "## peak RSS under qemu (KiB)"
printf '%-44s %8s\n' "qemu baseline (outpost-agent --version)" \
  "$(peak_kib "${QEMU_RUN[@]}" "$DIST/outpost-agent" --version)"
printf '%-44s %8s\n' "agent serving digits CNN (bench, 200 runs)" \
  "$(peak_kib "${QEMU_RUN[@]}" "$DIST/outpost-agent" bench --model "$FIX/cnn_a.onnx" \
    --input "x=$FIX/sample_image_0.npy" --iterations 200)"
"$GNU_TRIPLE-gcc" -std=c99 -O2 -I "$ROOT/sdk-c/include" "$ROOT/sdk-c/examples/classify.c" \
  "$DIST/liboutpost.a" -lpthread -ldl -lm -o "$WORK/classify"
printf '%-44s %8s\n' "C app + liboutpost.a, CNN, one digit" \
  "$(peak_kib "${QEMU_RUN[@]}" "$WORK/classify" "$WORK/data" "$FIX/cnn_a.onnx" \
    "$FIX/cnn_a.release.json" "$FIX/digit_7.pgm")"

# Idle daemon: connected to a broker, nothing assigned. Sampled after it settles.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest none\n' "$port" >"$WORK/mosquitto.conf"
/usr/sbin/mosquitto -c "$WORK/mosquitto.conf" &
PIDS+=($!)
mkdir -p "$WORK/bundle"
cp "$ROOT/tests/fixtures/tuf/ed25519/metadata/1.root.json" "$WORK/bundle/root.json"
echo unused >"$WORK/bundle/credentials"
printf 'device_id = "footprint"\ndata_dir = "data"\n[broker]\nurl = "mqtt://127.0.0.1:%s"\n' \
  "$port" >"$WORK/bundle/agent.toml"
"${QEMU_RUN[@]}" "$DIST/outpost-agent" run --config "$WORK/bundle/agent.toml" \
  2>"$WORK/agent.log" &
agent=$!
PIDS+=("$agent")
sleep "${IDLE_SECS:-30}"
kill -0 "$agent" 2>/dev/null || { cat "$WORK/agent.log" >&2; echo "agent exited" >&2; exit 1; }
printf '%-44s %8s\n' "agent daemon idle (${IDLE_SECS:-30} s, connected)" \
  "$(awk '/VmHWM/ {print $2}' "/proc/$agent/status")"
kill -TERM "$agent"
wait "$agent" || true
