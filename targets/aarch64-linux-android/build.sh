#!/usr/bin/env bash
# Build liboutpost for Android (arm64-v8a) in users' CI: rustup's std for the target, the
# NDK's clang as linker and C compiler (bundled SQLite, zstd, tract's kernels).
#   ANDROID_NDK_HOME=/path/to/ndk targets/aarch64-linux-android/build.sh
# Output: target/aarch64-linux-android/device/liboutpost.so (copy it to the app's
# src/main/jniLibs/arm64-v8a/) and liboutpost.a. Not run on the Outpost CI machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${ANDROID_NDK_HOME:?set ANDROID_NDK_HOME to the NDK directory}"
. targets/aarch64-linux-android/env.sh
rustup target add aarch64-linux-android
cargo build --profile device --target aarch64-linux-android -p outpost-sdk-c
