#!/bin/sh
# Installs what the sdk-c tests need beyond the Rust toolchain: the pinned cbindgen
# (the header drift test runs it). gcc, g++, valgrind and pkg-config come from the
# system (Debian: apt-get install gcc g++ valgrind pkg-config).
set -eu
want=0.29.4
have=$(cbindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
    cargo install cbindgen --version "$want" --locked
fi
cbindgen --version
