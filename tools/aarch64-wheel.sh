#!/usr/bin/env bash
# Cross-builds attnscope's aarch64 (Linux) abi3 wheel with maturin, from Debian's Rust and
# cross linker (see aarch64-tests.sh, which installs them), to prove the wheel builds. The
# wheel goes to the folder given (default: target/wheels-aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/wheels-aarch64}"
maturin="${MATURIN:-.venv/bin/maturin}"

export RUSTC=/usr/bin/rustc
export CARGO=/usr/bin/cargo
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/aarch64}"
# abi3 needs no aarch64 Python to build against; the wheel is tagged for the glibc it links.
"$maturin" build --release --quiet --target aarch64-unknown-linux-gnu --compatibility linux \
    --skip-auditwheel --out "$out"
wheel="$(ls "$out"/attnscope-*-abi3-*aarch64*.whl)"
echo "aarch64 wheel: $(basename "$wheel")"
# It must hold the compiled engine, an aarch64 ELF (e_machine 183).
python3 - "$wheel" <<'PY'
import struct, sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
engine = [n for n in wheel.namelist() if n.startswith("attnscope/_core") and n.endswith(".so")]
assert engine, f"no compiled engine in {sys.argv[1]}"
header = wheel.read(engine[0])[:20]
machine = struct.unpack_from("<H", header, 18)[0]
assert header[:4] == b"\x7fELF" and machine == 183, f"{engine[0]} is not an aarch64 binary"
print("engine:", engine[0], "(aarch64 ELF)")
PY
