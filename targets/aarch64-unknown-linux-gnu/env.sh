# aarch64-unknown-linux-gnu: 64-bit ARM Linux boards (Raspberry Pi 3/4/5 on a 64-bit OS,
# Jetson, i.MX8, RK3588). glibc >= 2.34 on the device. Sourced by targets/build.sh.
TARGET_BUILT_HERE=1
DEB_ARCH=arm64
GNU_TRIPLE=aarch64-linux-gnu
QEMU=qemu-aarch64-static
APT_PACKAGES="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
