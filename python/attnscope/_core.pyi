"""Type stubs for the compiled engine. Call it through the checked wrappers in `attnscope`."""

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "force_simd_level",
    "get_num_threads",
    "get_weights_memory_limit",
    "scaled_dot_product_attention",
    "set_num_threads",
    "set_weights_memory_limit",
    "simd_level",
    "simd_level_supported",
]

def scaled_dot_product_attention(
    query: npt.NDArray[np.floating[Any]],
    key: npt.NDArray[np.floating[Any]],
    value: npt.NDArray[np.floating[Any]],
    attn_mask: npt.NDArray[Any] | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    causal_alignment: str,
    window: tuple[int | None, int | None] | None,
    return_weights: bool,
) -> Any: ...
def set_num_threads(num_threads: int) -> None: ...
def get_num_threads() -> int: ...
def set_weights_memory_limit(num_bytes: int) -> None: ...
def get_weights_memory_limit() -> int: ...
def simd_level() -> str: ...
def force_simd_level(level: str | None) -> None: ...
def simd_level_supported(level: str) -> bool: ...
