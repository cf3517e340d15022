# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Host memory of instruction data as it grows
# Rows of `experiments/data_rss.py`: a real job (tiny LLaMA) trained on N synthetic Alpaca-style records read from a
# JSON-lines file, with `task.streaming` false (loaded into datasets' Arrow cache, tokenised by a batched map, read
# memory-mapped) and true (read, shuffled and tokenised as training goes): peak RSS, the peak of anonymous memory
# (the heap, without memory-mapped files) and the floor after imports (`docs/tasks.md`).

# %%
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "data_rss"
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)

# %%
lines = []
ordered = frame.sort_values(["streaming", "records"], ascending=[False, True]) if len(frame) else frame
for r in ordered.itertuples(index=False):
    ok = r.status == "ok"
    lines.append({"records": f"{int(r.records):,}", "file MiB": f"{r.file_mib:.1f}",
                  "task.streaming": str(bool(r.streaming)).lower(), "status": r.status,
                  "peak RSS MiB": f"{r.peak_rss_mib:,.0f}" if ok else "—",
                  "peak anonymous MiB": f"{r.peak_anon_mib:,.0f}" if ok else "—",
                  "floor MiB": f"{r.rss_floor_mib:,.0f}", "wall s": f"{r.wall_s:.1f}"})
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT, title="Host memory of a training job as its instruction data grows: peak RSS "
                   "with and without streaming (model tiny-llama, CPU)",
                   notes=["Command: python experiments/data_rss.py --out results/data_rss.parquet.",
                          ("floor: the process's RSS after importing torch, transformers and datasets; peak "
                           "anonymous: the heap (RssAnon), without the memory-mapped Arrow files the kernel may drop."),
                          report.provenance(frame)])
table
