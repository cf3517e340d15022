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
# # Training throughput per model × method
# Rows of `experiments/throughput.yaml`: training tokens/s and step time after warm-up, random-init weights,
# synthetic full-length batches, bf16 autocast, r = 8 on every linear layer, jobs run one after another on one GPU.
# Ratios against full fine-tuning and LoRA of the same model and batch.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "throughput"
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)
if len(frame):  # smallest model first, methods in the usual order
    frame = frame.assign(_size=frame.groupby("model")["total_params"].transform("max"),
                         _order=frame["method"].map({m: i for i, m in enumerate(report.METHOD_ORDER)}).fillna(99))
    frame = frame.sort_values(["_size", "_order"]).drop(columns=["_size", "_order"])

# %%
lines = []
for model, g in frame.groupby("model", sort=False):
    speed = g[g["status"] == "ok"].set_index("method")["tokens_per_s"]
    for r in g.itertuples(index=False):
        ok = r.status == "ok"
        lines.append({"model": model, "batch × seq": f"{r.batch_size} × {r.seq_len}",
                      "method": report.method_label(r.method), "status": r.status,
                      "tokens/s": f"{r.tokens_per_s:,.0f}" if ok else "—",
                      "step time ms": f"{1000 * r.step_time_s:.1f}" if ok else "—",
                      "peak GiB": f"{r.mem_peak_gib:.2f}" if ok else "—",
                      "÷ full FT": f"{r.tokens_per_s / speed['full']:.2f}" if ok and "full" in speed else "—",
                      "÷ LoRA": f"{r.tokens_per_s / speed['lora']:.2f}" if ok and "lora" in speed else "—"})
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT, title="Training throughput per model × method (tokens/s after warm-up)",
                   notes=["Command: python run.py -m experiments=throughput (results/README.md).",
                          "Jobs ran one after another; the interleaved best-setting comparison is issue 'Speed'.",
                          report.provenance(frame)])
table

# %%
ok = frame[frame["status"] == "ok"]
models = list(dict.fromkeys(ok["model"]))
methods = [m for m in report.METHOD_ORDER if m in set(ok["method"])]
fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models) + 2), 4))
width = 0.8 / max(len(methods), 1)
for i, method in enumerate(methods):
    vals = []
    for model in models:
        g = ok[ok["model"] == model].set_index("method")["tokens_per_s"]
        base = g.get("full", g.get("lora", np.nan))
        vals.append(g.get(method, np.nan) / base)
    ax.bar(np.arange(len(models)) + (i - (len(methods) - 1) / 2) * width, vals, width,
           label=report.method_label(method))
ax.axhline(1.0, color="k", lw=0.8)
ax.set_xticks(np.arange(len(models)), models)
ax.set_ylabel("tokens/s ÷ full fine-tuning")
if methods:
    ax.legend(fontsize=8)
ax.set_title("Training throughput relative to full fine-tuning (1.0 = full FT)", fontsize=10)
fig.tight_layout()
report.save_figure(fig, EXPERIMENT)
