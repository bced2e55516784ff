"""Loads the compiled core once and says clearly when it is missing.

The public API never falls back silently to the slow reference: a call without the compiled
core raises ImportError with the reason. Only the dashboard chooses to fall back, and says so.
"""

from __future__ import annotations

from types import ModuleType

try:
    from . import _core as _compiled

    CORE_IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    _compiled = None
    CORE_IMPORT_ERROR = error


def core_available() -> bool:
    """True when the compiled Rust engine could be imported."""
    return _compiled is not None


def core() -> ModuleType:
    """The compiled module, or an ImportError that says how to build it."""
    if _compiled is None:
        raise ImportError(
            "attnscope's compiled engine (attnscope._core) could not be imported: "
            f"{CORE_IMPORT_ERROR}. Build it with `make build` (or `pip install .`) "
            "on a machine with a Rust toolchain."
        ) from CORE_IMPORT_ERROR
    return _compiled
