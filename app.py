"""Streamlit entry point: `streamlit run app.py` serves the attnscope dashboard.

The pages live in python/attnscope/dashboard/pages; the computing behind them in
python/attnscope/dashboard.
"""

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
PAGES = "python/attnscope/dashboard/pages"

try:
    import attnscope  # noqa: F401
except ImportError:
    # A checkout that was never installed still runs, from its sources: without the compiled
    # engine the pages say so and compute with attnscope.reference.
    sys.path.insert(0, str(ROOT / "python"))

from attnscope.dashboard.ui import PAGE_ICON, glossary  # noqa: E402  (after the path fallback)

st.set_page_config(
    page_title="attnscope: attention you can see", page_icon=PAGE_ICON, layout="wide"
)

pages = [
    st.Page(f"{PAGES}/start.py", title="Start here", icon=":material/flag:", default=True),
    st.Page(f"{PAGES}/heads.py", title="Heads", icon=":material/hub:"),
    st.Page(
        f"{PAGES}/regimes.py", title="Causal vs bidirectional", icon=":material/compare_arrows:"
    ),
    st.Page(f"{PAGES}/inside.py", title="Inside one head", icon=":material/calculate:"),
    st.Page(f"{PAGES}/cost.py", title="Cost of context", icon=":material/speed:"),
    st.Page(f"{PAGES}/sparse.py", title="Sparse attention", icon=":material/grid_on:"),
    st.Page(f"{PAGES}/learning.py", title="Learning: heads emerge", icon=":material/school:"),
]
if (ROOT / PAGES / "real_model.py").exists():
    pages.append(st.Page(f"{PAGES}/real_model.py", title="Real model", icon=":material/smart_toy:"))

page = st.navigation(pages)
glossary()  # in the sidebar of every page
page.run()
