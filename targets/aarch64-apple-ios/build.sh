#!/usr/bin/env bash
# Build liboutpost for iOS devices in users' CI, on macOS with Xcode: rustup's std for
# the target, Xcode's clang through xcrun (the cc crate finds the iPhoneOS SDK itself).
#   targets/aarch64-apple-ios/build.sh
# Output: target/outpost.xcframework (static library + outpost.h) for Xcode projects.
# Not run on the Outpost CI machine (no Apple SDK there).
set -euo pipefail
cd "$(dirname "$0")/../.."
export IPHONEOS_DEPLOYMENT_TARGET="${IPHONEOS_DEPLOYMENT_TARGET:-13.0}"
rustup target add aarch64-apple-ios
cargo build --profile device --target aarch64-apple-ios -p outpost-sdk-c
rm -rf target/outpost.xcframework
# App Store apps link static libraries (or frameworks), not loose dylibs.
xcodebuild -create-xcframework \
  -library target/aarch64-apple-ios/device/liboutpost.a -headers sdk-c/include \
  -output target/outpost.xcframework
