"""The argument checks of the Python layer, in one place. Each names the argument and says what
was wrong with it: a TypeError for the wrong kind of value (a bool where a number is meant, a
list where an array is), a ValueError for a value out of range.

The core checks shapes and values itself; these cover what it cannot express, and the numbers
read from model files (``file_whole_number``, ``file_positive_number``: a ValueError naming the
file and field, since the caller passed a path, not the bad value)."""

from __future__ import annotations

import math
import numbers

import numpy as np

#: The dtypes attnscope computes in.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_whole_number(value) -> bool:
    """Whether `value` is an integer (Python's or NumPy's), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real_number(value) -> bool:
    """Whether `value` is a real number (an int or float, Python's or NumPy's), and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _limit_text(limit: int) -> str:
    """A bound as a message writes it: ``2**63 - 1`` rather than nineteen digits."""
    if limit >= 2**32 - 1 and (limit + 1) & limit == 0:
        return f"2**{limit.bit_length()} - 1"
    return str(limit)


def whole_number(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int from `low` to `high` (None: no bound on that side).

    Raises:
        TypeError: not an int (a bool or a float 2.0 included).
        ValueError: below `low` or above `high`.
    """
    if not is_whole_number(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {_limit_text(high)}, got {value}")
    return int(value)


def real_number(value, name: str, *, finite: bool = False) -> float:
    """`value` as a float; with `finite`, NaN and ±inf are refused.

    Raises:
        TypeError: not a real number (a bool, a str or a complex included).
        ValueError: not finite, when `finite` asks for it.
    """
    if not is_real_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def flag(value, name: str) -> bool:
    """`value` as a bool (Python's or NumPy's); a number or a str is refused with a TypeError."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """`dtype` (anything ``numpy.dtype`` reads) resolved, if it is float32 or float64; else a
    TypeError. ``None`` reads as float64, as ``numpy.dtype(None)`` does."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"{name} must be numpy.float32 or numpy.float64, got {dtype!r}") from error
    if resolved not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be numpy.float32 or numpy.float64, got {resolved}")
    return resolved


def array_of(value, name: str, dtype: np.dtype, ndims: tuple[int, ...]) -> np.ndarray:
    """`value` itself, if it is an ndarray of `dtype` with one of `ndims` dimensions.

    Raises:
        TypeError: not an ndarray, or another dtype (each message says how to convert).
        ValueError: another number of dimensions.
    """
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray, got {type(value).__name__}; "
            f"wrap it with numpy.asarray({name}, dtype=numpy.{dtype})"
        )
    # By kind, not byte order: the core computes on a byte-swapped ('>f4') array too.
    if value.dtype.char != dtype.char:
        raise TypeError(
            f"{name} has dtype {value.dtype} but this computes in {dtype}; "
            f"convert with {name}.astype(numpy.{dtype})"
        )
    if value.ndim not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {expected} dims, got shape {value.shape}")
    return value


def file_whole_number(value, where: str, *, low: int = 1, high: int | None = None, why="") -> int:
    """A whole number read from a file, from `low` to `high`; `where` names the file and the
    field (``"config.json: n_head"``) and `why` says where `high` comes from.

    Raises:
        ValueError: not an integer, or out of range (the file is at fault, not an argument).
    """
    if not is_whole_number(value):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{where} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{where} must be <= {high:,}{why}, got {value:,}")
    return int(value)


def file_positive_number(value, where: str) -> float:
    """A positive number read from a file (below 1e30, so it stays finite in float32 maths);
    `where` names the file and the field.

    Raises:
        ValueError: not a number, or not in (0, 1e30).
    """
    if not is_real_number(value) or not 0 < value < 1e30:
        raise ValueError(f"{where} must be a positive number, got {value!r}")
    return float(value)
