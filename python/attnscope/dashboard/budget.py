"""The dashboard's one rule for a visitor's input: every typed value goes through one parser
that names what is wrong, and every heavy action estimates the bytes it would allocate and is
refused, with a message saying what to lower, when they exceed one memory budget.

The budget is the smaller of ``ATTNSCOPE_DASHBOARD_MEMORY`` (bytes; ``512M``, ``2G`` and
``1.5GiB`` are read too; default 1 GiB) and half of the memory the machine has free at the
time. Pages catch :class:`OverBudget` and the parser's ``ValueError`` as an ``st.error``.
Nothing here imports Streamlit, so tests call it directly.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping

from .text import human_bytes

ENVIRONMENT_VARIABLE = "ATTNSCOPE_DASHBOARD_MEMORY"
DEFAULT_BYTES = 2**30
# Free memory is shared with every other visitor and the server itself: one action may take
# at most this share of it.
FREE_SHARE = 0.5
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_AMOUNT = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


class OverBudget(ValueError):
    """A heavy action whose estimated memory exceeds the budget; the message says what to
    lower."""


def configured_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The budget the server was started with: ``ATTNSCOPE_DASHBOARD_MEMORY`` or 1 GiB.

    Raises:
        ValueError: the variable is set to something that is not a positive amount of bytes
            (a server misconfigured should say so, not fall back silently).
    """
    environ = os.environ if environ is None else environ
    text = environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_BYTES
    found = _AMOUNT.fullmatch(text)
    amount = float(found.group(1)) * _UNITS[found.group(2).lower()] if found else 0.0
    if not (math.isfinite(amount) and amount >= 1):
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE} must be a positive number of bytes such as 1073741824, "
            f"512M or 2G; got {text!r}"
        )
    return int(amount)


def free_bytes() -> int | None:
    """Memory the machine has available now (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def budget_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The most bytes one heavy action may allocate now."""
    budget = configured_bytes(environ)
    free = free_bytes()
    return budget if free is None else max(1, min(budget, int(free * FREE_SHARE)))


def check(estimate_bytes: int, what: str, *, lower: str, environ=None) -> int:
    """`estimate_bytes` when it fits the budget.

    Raises:
        OverBudget: it does not; the message names `what` (the action), the two sizes and
            `lower` (the inputs to lower, e.g. "the head dim or the cached tokens").
    """
    budget = budget_bytes(environ)
    if estimate_bytes > budget:
        raise OverBudget(
            f"{what} would need about {human_bytes(estimate_bytes)} of memory, more than the "
            f"{human_bytes(budget)} this server allows one action; lower {lower}."
        )
    return estimate_bytes


# --- Estimates: the bytes an action allocates at its peak ------------------------------------

FLOAT32 = 4
# Allocator slack over the sum of the arrays: the decoding step's peak was measured at 3.31x
# its K+V bytes where the arrays alone add up to 3.28x.
SLACK = 1.1


def estimate_decode_step(
    query_heads: int, kv_heads: int, head_dim: int, cached_tokens: int, cache_row_bytes
) -> int:
    """One layer's decoding step timed per storage: float32 keys and values of
    `cached_tokens`, one cache per storage holding them all at once (`cache_row_bytes`: the
    bytes of one key vector in each storage), and the query."""
    keys_and_values = 2 * kv_heads * cached_tokens * head_dim * FLOAT32
    caches = sum(2 * kv_heads * cached_tokens * row for row in cache_row_bytes)
    query_and_output = 2 * query_heads * head_dim * FLOAT32
    return math.ceil((keys_and_values + caches + query_and_output) * SLACK)


def estimate_dense_mask(num_queries: int, num_keys: int, *, layout_block: int | None = None) -> int:
    """An ``(L, S)`` bool mask (one byte a pair), plus its tile map of `layout_block` tiles."""
    total = num_queries * num_keys
    if layout_block is not None:
        total += math.ceil(num_queries / layout_block) * math.ceil(num_keys / layout_block)
    return total


def estimate_attention(num_queries: int, num_keys: int, head_dim: int, heads: int = 1) -> int:
    """A timed attention call on float32 inputs: queries, keys, values and the output."""
    return FLOAT32 * heads * head_dim * (2 * num_queries + 2 * num_keys)


def estimate_replay(layers: int, heads: int, prompt_tokens: int, new_tokens: int) -> int:
    """A generation's replay: every step keeps (layers x heads x cache) float32 weights, the
    cache growing from the prompt by one token a step."""
    cache_sum = new_tokens * prompt_tokens + new_tokens * (new_tokens - 1) // 2
    return FLOAT32 * layers * heads * cache_sum


# --- The parser every page's typed input goes through ----------------------------------------


def whole_number(value, what: str, *, minimum: int | None = None, maximum: int | None = None):
    """`value` (an int, an integral float from a number box, or text) as an int within
    [minimum, maximum].

    Raises:
        ValueError: anything else, naming `what` and the allowed range.
    """
    allowed = _range_text(minimum, maximum)
    if isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "")
        # A digit string too long to be in any range is refused before int() reads it.
        if not re.fullmatch(r"[+-]?\d{1,30}", text):
            raise ValueError(f"{what} must be a whole number{allowed}, got {_shown(value)}")
        number = int(text)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a whole number{allowed}, got {_shown(value)}")
    elif isinstance(value, numbers.Integral):
        number = int(value)
    elif math.isfinite(value) and float(value).is_integer():
        number = int(value)
    else:
        raise ValueError(f"{what} must be a whole number{allowed}, got {value}")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{what} must be a whole number{allowed}, got {number:,}")
    return number


def whole_numbers(
    text: str, what: str, *, minimum: int | None = None, maximum: int | None = None
) -> tuple[int, ...]:
    """'24, 16, 24' -> (24, 16, 24), each checked by :func:`whole_number`; commas or
    semicolons separate the numbers.

    Raises:
        ValueError: a part that is not a whole number in range, naming `what`.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text such as '0, 1, 8', got {type(text).__name__}")
    parts = [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]
    numbers_found = []
    for part in parts:
        if not re.fullmatch(r"[+-]?\d+", part):
            raise ValueError(
                f"{what} must be whole numbers separated by commas, e.g. '0, 1, 8'; "
                f"got {_shown(text)}"
            )
        numbers_found.append(whole_number(part, what, minimum=minimum, maximum=maximum))
    return tuple(numbers_found)


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {_number_text(minimum)} to {_number_text(maximum)}"
    if minimum is not None:
        return f" of at least {_number_text(minimum)}"
    if maximum is not None:
        return f" of at most {_number_text(maximum)}"
    return ""


def _number_text(number: int) -> str:
    """'1,024'; a limit such as 2**63 - 1 written that way."""
    if number >= 2**32 and (number + 1) & number == 0:
        return f"2**{(number + 1).bit_length() - 1} - 1"
    return f"{number:,}"


def _shown(value) -> str:
    """A visitor's value for a message, cut short: a pasted page of digits stays readable."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
