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
# # Memory per model × method at the paper's scale
# Rows of `experiments/memory.py` (`results/memory.parquet`): measured on a GPU with random-init weights and
# synthetic full-length batches, bf16 autocast, r = 8 on every linear layer. Weights, gradients and optimizer state
# are counted from the tensors, activations are the bytes autograd saves for backward, peak is the allocator's;
# `lorafa.memory.predict`'s peak beside it. Variants: checkpointing (+ckpt), element-wise recomputation
# (+recompute), and the frozen model (no adapter, backward to the inputs) as LoRA-FA's lower bound.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "memory"
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)
PARTS = ["weights", "grads", "optimizer", "activations"]

# %%
lines = []
for (model, bs, seq), g in frame.groupby(["model", "batch_size", "seq_len"], sort=False):
    lora_peak = g.loc[(g["variant"] if "variant" in g else g["method"]) == "lora", "mem_peak_gib"]
    for _, r in g.assign(label=report.variant(g)).iterrows():
        ok = r["status"] == "ok"
        line = {"model": model, "batch × seq": f"{bs} × {seq}", "method": report.method_label(r["label"]),
                "status": r["status"]}
        for part in PARTS:
            line[f"{part} GiB"] = f"{r[f'mem_{part}_gib']:.2f}" if ok else "—"
        line["peak GiB"] = f"{r['mem_peak_gib']:.2f}" if ok else f"> {r['mem_peak_gib']:.0f} (OOM)"
        pred = r.get("pred_mem_peak_gib", np.nan)
        line["predicted peak GiB"] = "—" if pd.isna(pred) else f"{pred:.2f}"
        line["LoRA peak ÷ this"] = f"{lora_peak.iloc[0] / r['mem_peak_gib']:.2f}" if ok and len(lora_peak) else "—"
        lines.append(line)
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT, title="Memory split per model × method (GiB), measured; peak predicted beside",
                   notes=["Command: python experiments/memory.py --out results/memory.parquet (see results/README.md).",
                          report.provenance(frame)])
table

# %%
shown = ["full", "lora", "lorafa", "lorafa_v2", "lora+recompute", "lorafa+recompute", "frozen"]
panels = list(dict.fromkeys(zip(frame["model"], frame["batch_size"], frame["seq_len"])))  # model × batch × length
ncols = min(max(len(panels), 1), 3)
nrows = -(-max(len(panels), 1) // ncols)
fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.2 * nrows), squeeze=False)
for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
colors = {"weights": "#8c8c8c", "grads": "#e39b4c", "optimizer": "#c44e52", "activations": "#4c72b0"}
for ax, (model, bs, seq) in zip(axes.flat, panels):
    g = frame[(frame["model"] == model) & (frame["batch_size"] == bs) & (frame["seq_len"] == seq)]
    g = g.assign(label=report.variant(g))
    g = g[g["label"].isin(shown)].set_index("label").reindex([s for s in shown if s in set(g["label"])])
    x = np.arange(len(g))
    bottom = np.zeros(len(g))
    for part in PARTS:
        vals = np.where(g["status"] == "ok", g[f"mem_{part}_gib"], 0.0)
        ax.bar(x, vals, bottom=bottom, color=colors[part], label=part)
        bottom += vals
    for i, (label, r) in enumerate(g.iterrows()):
        if r["status"] == "ok":
            ax.plot([i - 0.4, i + 0.4], [r["mem_peak_gib"]] * 2, color="k", lw=1.2)
        else:
            ax.text(i, 1, r["status"].upper(), ha="center", va="bottom", rotation=90, fontsize=8)
    ax.set_xticks(x, [report.method_label(s) for s in g.index], rotation=45, ha="right", fontsize=8)
    title = f"{model} ({bs} × {seq})"
    if {"lora", "lorafa"} <= set(g.index) and (g.loc[["lora", "lorafa"], "status"] == "ok").all():
        ratio = g.loc["lora", "mem_peak_gib"] / g.loc["lorafa", "mem_peak_gib"]
        title += f" — peak LoRA ÷ LoRA-FA {ratio:.2f}×"  # the comparison the figure is for, read off the bars
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("GiB")
axes[0][0].legend(fontsize=8, title="black line: peak", title_fontsize=8)
devices = ", ".join(sorted(set(frame["device"].dropna()))) if "device" in frame and len(frame) else "no rows"
fig.suptitle(f"Memory per method, measured on {devices} (eager steps, bf16 autocast, random-init weights, synthetic "
             "full-length batches, r = 8 on every linear layer).\nBars: weights, gradients, optimizer state and "
             "saved activations, counted; black line: the allocator's peak (not every part is alive at once)",
             fontsize=9)
fig.tight_layout()
report.save_figure(fig, EXPERIMENT, rows=frame)
