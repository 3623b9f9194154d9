#!/bin/sh
# Regenerates include/outpost.h with the pinned cbindgen (see ci-deps.sh).
set -eu
cd "$(dirname "$0")"
want=0.29.4
have=$(cbindgen --version 2>/dev/null | awk '{print $2}')
if [ "$have" != "$want" ]; then
    echo "cbindgen $want is needed (found: ${have:-none}); run sdk-c/ci-deps.sh" >&2
    exit 1
fi
cbindgen --config cbindgen.toml --crate outpost-sdk-c --output include/outpost.h .
