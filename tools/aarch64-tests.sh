#!/usr/bin/env bash
# `make test-aarch64`: the Rust core cross-compiled for aarch64 (Linux) and its tests run under
# qemu-aarch64, so the NEON level is tested on every push without an Arm machine. Everything
# comes from Debian's packages: Debian's Rust with the aarch64 standard library (the rustup
# toolchain carries only its host's), the cross linker and C runtime, and qemu-user.
# Arguments go to the test binary (a name filter, --nocapture, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null \
    || [ ! -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ]; then
    dpkg --add-architecture arm64
    apt-get update -qq
    apt-get install -y -qq rustc-web cargo-web libstd-rust-web-dev:arm64 \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
fi

export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
# Static: a dynamically linked test binary hangs at its first thread under qemu-user with the
# cross sysroot; a static one runs normally.
export RUSTFLAGS="-C target-feature=+crt-static"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/aarch64}"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
/usr/bin/cargo test --release --target aarch64-unknown-linux-gnu --lib -- "$@" 2>&1 | tee "$log"
# The run must have exercised the NEON level, not only the portable one.
if [ $# -eq 0 ] && ! grep -q "neon.* ok$" "$log"; then
    echo "no NEON test ran: the aarch64 build did not select the NEON level" >&2
    exit 1
fi
