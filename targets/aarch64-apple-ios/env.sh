# aarch64-apple-ios: liboutpost for iOS apps, built in users' CI on macOS with Xcode
# (targets/aarch64-apple-ios/build.sh). Not built on the Outpost CI machine: targets/build.sh
# refuses it.
TARGET_BUILT_HERE=0
export IPHONEOS_DEPLOYMENT_TARGET="${IPHONEOS_DEPLOYMENT_TARGET:-13.0}"
