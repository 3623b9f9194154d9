# armv7-unknown-linux-gnueabihf: 32-bit ARMv7-A with hard float and NEON-capable cores
# (Raspberry Pi 2/3/4 on a 32-bit OS, BeagleBone, i.MX6/7, STM32MP1). glibc >= 2.34 on the
# device. Sourced by targets/build.sh.
TARGET_BUILT_HERE=1
DEB_ARCH=armhf
GNU_TRIPLE=arm-linux-gnueabihf
QEMU=qemu-arm-static
APT_PACKAGES="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross"
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER="qemu-arm-static -L /usr/arm-linux-gnueabihf"
export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
