"""Holding the engine and its peers to one instruction set, so that each level can be timed.

The engine picks its widest kernels at run time; ``attnscope._core.force_simd_level`` holds
it to a narrower one. torch reads its limits from environment variables once, when it is
imported, so :func:`apply_torch_limits` must run before the first ``import torch`` of the
process:

* ``ATEN_CPU_CAPABILITY``: ATen's own vectorised kernels (softmax, exp, the flash loop).
* ``MKL_ENABLE_INSTRUCTIONS``: MKL's SGEMM, which torch's CPU flash kernel calls per block.
* ``ONEDNN_MAX_CPU_ISA``: oneDNN's kernels.

NumPy's OpenBLAS (a ``DYNAMIC_ARCH`` build) can be held through ``OPENBLAS_CORETYPE`` in a
child process; :func:`openblas_coretype` names the core whose kernels match a level.

The compiled engine is imported only by the functions that need it, so that the report can
read the level names without it.
"""

from __future__ import annotations

import os
import platform
import sys

import limits

__all__ = [
    "LEVELS",
    "active_level",
    "apply_torch_limits",
    "force",
    "openblas_coretype",
    "torch_capability",
    "torch_limits",
    "torch_limits_in_effect",
    "unsupported_reason",
]

# The engine's levels, widest first (the order of the per-level table in the docs).
LEVELS = ("avx512", "avx2", "neon", "portable")

_TORCH_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")

# Per level: (ATen capability, MKL instructions, oneDNN ISA); None leaves torch's default.
# MKL and oneDNN are x86 libraries here; on aarch64 only ATen's capability applies.
_TORCH_X86 = {
    "avx512": ("avx512", "AVX512", "AVX512_CORE"),
    "avx2": ("avx2", "AVX2", "AVX2"),
    "portable": ("default", "SSE4_2", "SSE41"),
}
_TORCH_ARM = {"neon": None, "portable": ("default",)}

# OpenBLAS cores whose kernels use exactly the level's vector instructions.
_OPENBLAS_X86 = {"avx512": "SkylakeX", "avx2": "Haswell", "portable": "Nehalem"}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def unsupported_reason(level: str) -> str | None:
    """Why `level` cannot run here, in one sentence; None when it can."""
    from attnscope import _core

    if level not in LEVELS:
        return f"unknown instruction set {level!r}; choose from {', '.join(LEVELS)}"
    try:
        supported = _core.simd_level_supported(level)
    except ValueError:
        return f"this build of the engine has no {level} kernels"
    if supported:
        return None
    here = [name for name in LEVELS if _supported(name)]
    cpu = limits.machine_info()["cpu"]
    return (
        f"this CPU ({cpu}, {platform.machine()}) cannot run the {level} kernels; "
        f"the levels it can run: {', '.join(here)}"
    )


def _supported(level: str) -> bool:
    from attnscope import _core

    try:
        return bool(_core.simd_level_supported(level))
    except ValueError:
        return False


def active_level() -> str:
    """The instruction set the engine's kernels run at now."""
    from attnscope import _core

    return str(_core.simd_level())


def force(level: str | None) -> None:
    """Hold the engine's kernels to `level` (None: back to the widest this CPU runs)."""
    from attnscope import _core

    _core.force_simd_level(level)


def torch_limits(level: str) -> dict[str, str]:
    """The environment variables that hold torch to `level` on this machine (may be empty)."""
    if _is_x86():
        values = _TORCH_X86.get(level)
    else:
        values = _TORCH_ARM.get(level)
    return dict(zip(_TORCH_VARIABLES, values or (), strict=False))


def apply_torch_limits(level: str) -> dict[str, str]:
    """Set torch's limits for `level` in this process's environment; returns them.

    Raises:
        RuntimeError: torch is already imported, so the limits could no longer apply.
    """
    if "torch" in sys.modules:
        raise RuntimeError("torch is already imported: its instruction-set limits cannot apply")
    limits = torch_limits(level)
    for name in _TORCH_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(limits)
    return limits


def torch_limits_in_effect() -> dict[str, str]:
    """The torch limit variables set in this process's environment."""
    return {name: os.environ[name] for name in _TORCH_VARIABLES if name in os.environ}


def torch_capability(torch) -> str | None:
    """The vector capability ATen dispatches to (``"AVX2"``, ``"DEFAULT"``, ...), if known."""
    if torch is None:
        return None
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # a torch without the query
        return None


def openblas_coretype(level: str) -> str | None:
    """The ``OPENBLAS_CORETYPE`` that holds OpenBLAS to `level`, if there is one here."""
    return _OPENBLAS_X86.get(level) if _is_x86() else None
