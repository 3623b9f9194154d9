#!/bin/sh
# Delta benchmark; see run.py. Usage: bench/delta/run.sh [PAIRS_DIR]
set -eu
exec python3 "$(dirname "$0")/run.py" "$@"
