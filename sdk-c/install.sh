#!/bin/sh
# Installs liboutpost into PREFIX: lib/liboutpost.so.VERSION with the soname link
# liboutpost.so.0 and the development link liboutpost.so, lib/liboutpost.a,
# include/outpost.h and lib/pkgconfig/outpost.pc.
#
#   sdk-c/install.sh PREFIX [LIBDIR]
#
# LIBDIR holds the built libraries (default: target/release, after
# `cargo build --release -p outpost-sdk-c`; CARGO_TARGET_DIR is honoured).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
prefix=${1:?usage: install.sh PREFIX [LIBDIR]}
libdir_src=${2:-${CARGO_TARGET_DIR:-$here/../target}/release}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/../Cargo.toml" | head -n 1)
[ -n "$version" ] || { echo "install.sh: no version in Cargo.toml" >&2; exit 1; }
for f in liboutpost.so liboutpost.a; do
    [ -f "$libdir_src/$f" ] || { echo "install.sh: $libdir_src/$f not found" >&2; exit 1; }
done
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix=$(cd "$prefix" && pwd)
install -m 0755 "$libdir_src/liboutpost.so" "$prefix/lib/liboutpost.so.$version"
ln -sf "liboutpost.so.$version" "$prefix/lib/liboutpost.so.0"
ln -sf "liboutpost.so.0" "$prefix/lib/liboutpost.so"
install -m 0644 "$libdir_src/liboutpost.a" "$prefix/lib/liboutpost.a"
install -m 0644 "$here/include/outpost.h" "$prefix/include/outpost.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/outpost.pc.in" \
    > "$prefix/lib/pkgconfig/outpost.pc"
echo "installed liboutpost $version into $prefix"
