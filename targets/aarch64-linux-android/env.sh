# aarch64-linux-android: liboutpost for Android apps (arm64-v8a), built in users' CI with
# the Android NDK (r26 or newer). Not built on the Outpost CI machine (no NDK there):
# targets/build.sh refuses it; use targets/aarch64-linux-android/build.sh.
TARGET_BUILT_HERE=0
# Lowest Android API level the library supports (Android 7.0).
ANDROID_API="${ANDROID_API:-24}"
NDK_BIN="${ANDROID_NDK_HOME:-/ANDROID_NDK_HOME-unset}/toolchains/llvm/prebuilt/$(uname -s | tr '[:upper:]' '[:lower:]')-x86_64/bin"
export CARGO_TARGET_AARCH64_LINUX_ANDROID_LINKER="$NDK_BIN/aarch64-linux-android$ANDROID_API-clang"
export CC_aarch64_linux_android="$NDK_BIN/aarch64-linux-android$ANDROID_API-clang"
export AR_aarch64_linux_android="$NDK_BIN/llvm-ar"
