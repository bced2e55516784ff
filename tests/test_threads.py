"""Thread controls: the thread count setting, bitwise-identical results for every thread count,
concurrent calls from Python threads, and the GIL being released while the kernel runs."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import assert_close, counting_while, random_qkv, run_python

sdpa = attnscope.scaled_dot_product_attention


def test_default_thread_count_is_positive():
    count = attnscope.get_num_threads()
    assert isinstance(count, int) and count >= 1


@pytest.mark.parametrize("count", [1, 2, 3, 8, 1])
def test_set_num_threads_round_trips(restore_num_threads, count):
    attnscope.set_num_threads(count)
    assert attnscope.get_num_threads() == count
    attnscope.set_num_threads(np.int64(2))
    assert attnscope.get_num_threads() == 2


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (2**64, ValueError),
        (1.5, TypeError),
        (True, TypeError),
        ("2", TypeError),
    ],
)
def test_bad_thread_counts_are_rejected(restore_num_threads, value, error):
    attnscope.set_num_threads(3)
    with pytest.raises(error, match="num_threads"):
        attnscope.set_num_threads(value)
    assert attnscope.get_num_threads() == 3


def _inputs_with_several_heads_and_query_blocks(dtype):
    """B=2, H=3, L=300, S=500, D=40 and a float mask: many (head, query block) work items."""
    rng = np.random.default_rng(7)
    query, key, value = random_qkv(rng, (2, 3, 300, 40), (2, 3, 500, 40), (2, 3, 500, 40), dtype)
    mask = rng.standard_normal((1, 3, 300, 500)).astype(dtype)
    mask[rng.random(mask.shape) < 0.1] = -np.inf
    return query, key, value, mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(is_causal=True),
        dict(is_causal=True, causal_alignment="bottom_right", window=(100, None)),
    ],
    ids=["full", "causal", "causal-window"],
)
def test_results_are_bitwise_identical_for_every_thread_count(restore_num_threads, dtype, kwargs):
    query, key, value, mask = _inputs_with_several_heads_and_query_blocks(dtype)
    results = {}
    for count in (1, 2, 3, 8):
        attnscope.set_num_threads(count)
        results[count] = (
            sdpa(query, key, value, **kwargs),
            sdpa(query, key, value, mask, **kwargs),
            *sdpa(query, key, value, mask, **kwargs, return_weights=True),
        )
    for count in (2, 3, 8):
        for single, multi in zip(results[1], results[count], strict=True):
            np.testing.assert_array_equal(multi, single, err_msg=f"{count} threads")
    # Identical and also right.
    expected = reference.scaled_dot_product_attention(query, key, value, mask, **kwargs)
    assert_close(results[1][1], expected, dtype)


def test_environment_variable_sets_the_thread_count_at_import():
    script = "import attnscope; print(attnscope.get_num_threads())"
    for count in ("3", "1"):
        assert run_python(script, env={"ATTNSCOPE_NUM_THREADS": count}) == count


def _varied_calls():
    """Eight different calls: shapes, dtypes and options all differ."""
    rng = np.random.default_rng(11)
    calls = []
    for index in range(8):
        dtype = np.float32 if index % 2 else np.float64
        heads, length, keys = 1 + index % 3, 50 + 37 * index, 80 + 29 * index
        query, key, value = random_qkv(
            rng, (2, heads, length, 24), (2, heads, keys, 24), (2, heads, keys, 16), dtype
        )
        mask = rng.random((length, keys)) < 0.8 if index % 3 == 0 else None
        kwargs = dict(
            attn_mask=mask,
            is_causal=index % 2 == 0,
            causal_alignment="bottom_right" if index % 4 == 0 else "top_left",
            window=None if index < 4 else index * 5,
            return_weights=index % 3 == 1,
        )
        calls.append(((query, key, value), kwargs))
    return calls


def _run(call):
    arrays, kwargs = call
    result = sdpa(*arrays, **kwargs)
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("engine_threads", [1, 2])
def test_concurrent_calls_match_serial_calls(restore_num_threads, engine_threads):
    attnscope.set_num_threads(engine_threads)
    calls = _varied_calls()
    serial = [_run(call) for call in calls]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            concurrent = list(pool.map(_run, calls))
            for expected, actual in zip(serial, concurrent, strict=True):
                for expected_array, actual_array in zip(expected, actual, strict=True):
                    np.testing.assert_array_equal(actual_array, expected_array)


def test_changing_the_thread_count_while_calls_run(restore_num_threads):
    """Calls running while another Python thread resizes the pool still give the serial result."""
    calls = _varied_calls()
    serial = [_run(call) for call in calls]
    stop = threading.Event()

    def resize():
        counts = (1, 2, 3)
        index = 0
        while not stop.is_set():
            attnscope.set_num_threads(counts[index % 3])
            index += 1
            time.sleep(0.001)

    resizer = threading.Thread(target=resize)
    resizer.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            for _ in range(3):
                for expected, actual in zip(serial, pool.map(_run, calls), strict=True):
                    for expected_array, actual_array in zip(expected, actual, strict=True):
                        np.testing.assert_array_equal(actual_array, expected_array)
    finally:
        stop.set()
        resizer.join()


def _inputs_for_a_long_call():
    """Inputs for one call of at least ~0.3 s on this machine (sized by trying, not asserted)."""
    rng = np.random.default_rng(5)
    length = 512
    while True:
        query, key, value = random_qkv(
            rng, (2, length, 64), (2, length, 64), (2, length, 64), np.float32
        )
        started = time.perf_counter()
        sdpa(query, key, value)
        if time.perf_counter() - started >= 0.3 or length >= 16384:
            return query, key, value
        length *= 2


def test_gil_is_released_while_the_kernel_runs(restore_num_threads):
    """A Python thread counting in a loop keeps counting while a call runs in another thread.

    If the call held the GIL the counter would stall for the whole call; the test compares the
    counting rate during the call with the rate while the main thread sleeps, a ratio that does
    not depend on how fast this machine is.
    """
    attnscope.set_num_threads(1)  # leave a core for the counting thread
    query, key, value = _inputs_for_a_long_call()
    during_call, free_rate, call_seconds = counting_while(lambda: sdpa(query, key, value))
    assert free_rate > 0
    # Holding the GIL would allow about 1% of the free rate (two switch intervals per call).
    assert during_call > 0.1 * free_rate * call_seconds, (during_call, free_rate, call_seconds)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "100000", "2.5", ""])
def test_a_bad_environment_variable_is_an_error_at_first_use(value):
    """The variable follows set_num_threads' rule; a bad value is reported, not ignored, and
    set_num_threads() still works."""
    script = """
import numpy as np, attnscope
q = np.ones((1, 4, 4), np.float32)
for call in (attnscope.get_num_threads, lambda: attnscope.scaled_dot_product_attention(q, q, q)):
    try:
        call()
    except ValueError as error:
        assert "ATTNSCOPE_NUM_THREADS" in str(error) and "between 1 and 1024" in str(error), error
    else:
        raise AssertionError("no error")
attnscope.set_num_threads(2)
assert attnscope.get_num_threads() == 2
attnscope.scaled_dot_product_attention(q, q, q)
print("ok")
"""
    assert run_python(script, env={"ATTNSCOPE_NUM_THREADS": value}) == "ok"


def test_set_num_threads_has_an_upper_bound(restore_num_threads):
    with pytest.raises(ValueError, match="num_threads: must be between 1 and 1024, got 1025"):
        attnscope.set_num_threads(1025)


def _engine_thread_names() -> set[str]:
    """Names of this process's engine worker threads (Linux)."""
    names = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as comm:
            names.add(comm.read().strip())
    return {name for name in names if name.startswith("attnscope-")}


def test_threads_context_sets_the_count_for_this_context_only(restore_num_threads):
    attnscope.set_num_threads(2)
    with attnscope.threads(3):
        assert attnscope.get_num_threads() == 3
        with attnscope.threads(1):
            assert attnscope.get_num_threads() == 1
        assert attnscope.get_num_threads() == 3
    assert attnscope.get_num_threads() == 2


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (1025, ValueError), (-3, ValueError), (True, TypeError)]
)
def test_threads_context_follows_the_same_rule(value, error):
    with pytest.raises(error, match="num_threads"):
        with attnscope.threads(value):
            pass


def test_two_python_threads_with_their_own_counts_at_once(restore_num_threads):
    """Two Python threads run with 1 and 7 engine threads at the same time: each sees its own
    count, gets the serial result, and the engine-wide count is untouched."""
    attnscope.set_num_threads(2)
    query, key, value, mask = _inputs_with_several_heads_and_query_blocks(np.float32)
    expected = sdpa(query, key, value, mask, is_causal=True)
    layer = attnscope.MultiHeadAttention(32, 4, seed=0)
    x = np.random.default_rng(3).standard_normal((2, 300, 32)).astype(np.float32)
    expected_layer = layer(x, is_causal=True)
    barrier = threading.Barrier(2)
    seen = {}

    def work(count):
        with attnscope.threads(count):
            barrier.wait()
            for _ in range(3):
                seen.setdefault(count, set()).add(attnscope.get_num_threads())
                np.testing.assert_array_equal(
                    sdpa(query, key, value, mask, is_causal=True), expected
                )
                np.testing.assert_array_equal(layer(x, is_causal=True), expected_layer)
        seen[count].add(("after", attnscope.get_num_threads()))

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(work, (1, 7)))
    assert seen == {1: {1, ("after", 2)}, 7: {7, ("after", 2)}}
    assert attnscope.get_num_threads() == 2
    if os.path.isdir("/proc/self/task"):
        # A pool of 7 workers ran (worker index 6 exists in no smaller pool).
        assert "attnscope-6" in _engine_thread_names()
