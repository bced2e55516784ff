"""Type stubs for the compiled engine. Call it through the checked wrappers in `attnscope`."""

from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_MASK_DEPTH",
    "MAX_MASK_NODES",
    "MAX_THREADS",
    "STORAGES",
    "KvCacheCore",
    "MaskExpr",
    "_panic_for_tests",
    "check_num_threads",
    "force_simd_level",
    "get_num_threads",
    "get_weights_memory_limit",
    "multi_head_attention_forward",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "set_num_threads",
    "set_weights_memory_limit",
    "simd_level",
    "simd_level_supported",
]

def scaled_dot_product_attention(
    query: npt.NDArray[np.floating[Any]],
    key: npt.NDArray[np.floating[Any]],
    value: npt.NDArray[np.floating[Any]],
    attn_mask: npt.NDArray[Any] | MaskExpr | None,
    is_causal: bool | np.bool_,
    scale: float | None,
    enable_gqa: bool | np.bool_,
    causal_alignment: str,
    window: tuple[int | None, int | None] | None,
    return_weights: bool | np.bool_,
    num_threads: int | None,
    softcap: float | None = None,
    alibi_slopes: npt.NDArray[np.float64] | None = None,
    return_lse: bool | np.bool_ | None = None,
) -> Any: ...
def scaled_dot_product_attention_backward(
    grad_out: npt.NDArray[np.floating[Any]],
    query: npt.NDArray[np.floating[Any]],
    key: npt.NDArray[np.floating[Any]],
    value: npt.NDArray[np.floating[Any]],
    out: npt.NDArray[np.floating[Any]],
    lse: npt.NDArray[np.floating[Any]],
    attn_mask: npt.NDArray[Any] | MaskExpr | None,
    is_causal: bool | np.bool_,
    scale: float | None,
    enable_gqa: bool | np.bool_,
    causal_alignment: str,
    window: tuple[int | None, int | None] | None,
    num_threads: int | None,
    softcap: float | None = None,
    alibi_slopes: npt.NDArray[np.float64] | None = None,
) -> tuple[
    npt.NDArray[np.floating[Any]], npt.NDArray[np.floating[Any]], npt.NDArray[np.floating[Any]]
]: ...

# Mask expressions: what an `attnscope.masks.Mask` holds. The arguments arrive checked as ints
# of the engine's range, int64 arrays and 2-D bool arrays; the patterns' own rules are checked
# here.
MAX_MASK_DEPTH: int
MAX_MASK_NODES: int

@final
class MaskExpr:
    """A mask expression in the engine (see `attnscope.masks.Mask`)."""

    @staticmethod
    def causal(alignment: str) -> MaskExpr: ...
    @staticmethod
    def window(left: int | None, right: int | None, alignment: str) -> MaskExpr: ...
    @staticmethod
    def prefix_lm(prefix_len: int) -> MaskExpr: ...
    @staticmethod
    def document(
        ids: npt.NDArray[np.int64], kv_ids: npt.NDArray[np.int64] | None = None
    ) -> MaskExpr: ...
    @staticmethod
    def global_tokens(positions: npt.NDArray[np.int64]) -> MaskExpr: ...
    @staticmethod
    def sinks(n: int) -> MaskExpr: ...
    @staticmethod
    def strided(stride: int) -> MaskExpr: ...
    @staticmethod
    def fixed(block: int, summary: int) -> MaskExpr: ...
    @staticmethod
    def dilated(window: int, dilation: int) -> MaskExpr: ...
    @staticmethod
    def random_blocks(block: int, per_row: int, seed: int) -> MaskExpr: ...
    @staticmethod
    def from_array(mask: npt.NDArray[np.bool_]) -> MaskExpr: ...
    def __and__(self, other: MaskExpr, /) -> MaskExpr: ...
    def __or__(self, other: MaskExpr, /) -> MaskExpr: ...
    def __invert__(self) -> MaskExpr: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    @property
    def nodes(self) -> int: ...
    def to_dense(self, num_queries: int, num_keys: int) -> npt.NDArray[np.bool_]: ...
    def dense_rows(
        self, num_queries: int, num_keys: int, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]: ...
    def layout(
        self, num_queries: int, num_keys: int, block: int
    ) -> tuple[npt.NDArray[np.uint8], int]: ...

MAX_THREADS: int
STORAGES: tuple[str, ...]

def set_num_threads(num_threads: int) -> None: ...
def check_num_threads(num_threads: int) -> int: ...
def get_num_threads() -> int: ...
def _panic_for_tests() -> None: ...
def set_weights_memory_limit(num_bytes: int) -> None: ...
def get_weights_memory_limit() -> int: ...
def simd_level() -> str: ...
def force_simd_level(level: str | None) -> None: ...
def simd_level_supported(level: str) -> bool: ...

@final
class KvCacheCore:
    """Keys and values of past tokens (see `attnscope.KVCache`)."""

    def __new__(
        cls,
        num_kv_heads: int,
        head_dim: int,
        batch: int,
        dtype: str,
        capacity: int,
        storage: str,
        max_len: int | None,
        sinks: int,
    ) -> KvCacheCore: ...
    def append(
        self,
        k: npt.NDArray[np.floating[Any]],
        v: npt.NDArray[np.floating[Any]],
        num_threads: int | None = None,
    ) -> None: ...
    def attend(
        self,
        q: npt.NDArray[np.floating[Any]],
        scale: float | None,
        window: tuple[int | None, int | None] | None,
        enable_gqa: bool,
        num_threads: int | None,
        attn_mask: MaskExpr | None = None,
    ) -> npt.NDArray[np.floating[Any]]: ...
    def reset(self) -> None: ...
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def storage(self) -> str: ...
    @property
    def max_len(self) -> int | None: ...
    @property
    def sinks(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...

def multi_head_attention_forward(
    query: npt.NDArray[np.floating[Any]],
    key: npt.NDArray[np.floating[Any]],
    value: npt.NDArray[np.floating[Any]],
    w_q: npt.NDArray[np.floating[Any]],
    w_k: npt.NDArray[np.floating[Any]],
    w_v: npt.NDArray[np.floating[Any]],
    w_o: npt.NDArray[np.floating[Any]],
    b_q: npt.NDArray[np.floating[Any]] | None,
    b_k: npt.NDArray[np.floating[Any]] | None,
    b_v: npt.NDArray[np.floating[Any]] | None,
    b_o: npt.NDArray[np.floating[Any]] | None,
    num_heads: int,
    num_kv_heads: int,
    attn_mask: npt.NDArray[Any] | MaskExpr | None,
    key_padding_mask: npt.NDArray[np.bool_] | None,
    is_causal: bool,
    need_weights: bool,
    cache: KvCacheCore | None,
    num_threads: int | None,
) -> Any: ...
