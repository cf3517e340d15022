"""Notebooks (jupytext percent-format .py files) that turn result tables into the paper's tables and figures.

    python -m analysis                                   # results/*.parquet → analysis/out/
    python -m analysis --results SWEEP/results.parquet --out /tmp/report
"""
