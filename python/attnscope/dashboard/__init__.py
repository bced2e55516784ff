"""The Streamlit dashboard: plain computing functions (heads, regimes, inside, cost), shared
Altair charts, and the page scripts in pages/ that app.py navigates between."""
