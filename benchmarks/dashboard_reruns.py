"""How long the dashboard takes to rerun after a reader changes a control, page by page.

Each page is opened under Streamlit's AppTest (the whole script, as the server runs it, with
no browser), one of its main controls is changed a few times, and the median time of the
reruns is printed. The browser adds its own drawing on top; this is the server's share.

    python benchmarks/dashboard_reruns.py            # every page
    python benchmarks/dashboard_reruns.py heads cost # the pages whose names contain a word
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
PAGES = "python/attnscope/dashboard/pages"
LLAMA = "Llama 3 8B (32 layers, 32 query / 8 kv heads of 128)"
GPT2 = "GPT-2 small (12 layers, 12 heads of 64)"

# Name -> (page file or None for the first page, URL parameters, change number i).
CHANGES: dict[str, tuple[str | None, dict[str, str], Callable[[AppTest, int], object]]] = {
    "start: rerun": (None, {}, lambda app, i: None),
    "heads: head": (
        "heads.py",
        {},
        lambda app, i: app.selectbox(key="heads_head").set_value(("Coreference", "Rhyme")[i % 2]),
    ),
    "heads: row": ("heads.py", {}, lambda app, i: app.selectbox(key="heads_row").set_value(i % 3)),
    "regimes: replacement": (
        "regimes.py",
        {},
        lambda app, i: app.text_input(key="regimes_replacement").set_value(f"word{i}"),
    ),
    "inside: d_k": (
        "inside.py",
        {},
        lambda app, i: app.select_slider(key="inside_d_k").set_value((8, 16)[i % 2]),
    ),
    "inside: FlashAttention block": (
        "inside.py",
        {"inside_flash_block": "1"},
        lambda app, i: app.slider(key="inside_flash_walked").set_value(1 + i % 3),
    ),
    "cost: model shape": (
        "cost.py",
        {"cost_longest": "512", "cost_seconds": "2"},
        lambda app, i: app.selectbox(key="cost_shape").set_value((LLAMA, GPT2)[i % 2]),
    ),
    "learning: steps": (
        "learning.py",
        {},
        lambda app, i: app.slider(key="learning_steps").set_value(100 + 25 * i),
    ),
    "sparse: drawn length": (
        "sparse.py",
        {},
        lambda app, i: app.select_slider(key="sparse_length").set_value((32, 64)[i % 2]),
    ),
}


def median_rerun(page: str | None, params: dict[str, str], change, repeats: int) -> float:
    """Median seconds of `repeats` reruns of `page`, each after `change`."""
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    for name, value in params.items():
        app.query_params[name] = value
    app.run()
    if page is not None:
        app.switch_page(f"{PAGES}/{page}").run()
    app.run()  # warm: every cache filled
    times = []
    for index in range(repeats):
        change(app, index)
        start = time.perf_counter()
        app.run()
        times.append(time.perf_counter() - start)
        if app.exception:
            raise RuntimeError(f"{page}: {app.exception[0].value}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="only the changes whose names contain these")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    for name, (page, params, change) in CHANGES.items():
        if options.pages and not any(word in name for word in options.pages):
            continue
        seconds = median_rerun(page, params, change, options.repeats)
        print(f"{name:30s} median rerun {seconds:.3f} s", flush=True)


if __name__ == "__main__":
    main()
