"""Blind expert rating of generated images: study creation, the Streamlit app, and its DuckDB store."""
