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
# # Learning-rate sensitivity: LoRA vs LoRA-FA
# Rows of `experiments/lr_sensitivity.yaml`: the dev score at each learning rate, mean ± std over seeds, per
# method; then each method at its own best rate (by mean dev score) paired by seed against LoRA at LoRA's best.
# It separates the method from the tuning: with A frozen at its random init, B alone carries the update, so
# LoRA-FA may want a different learning rate from LoRA's. (Picking the best rate on the dev set that is also
# reported favours every method alike; the paired differences are between tuned methods.)

# %%
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import NullFormatter

from lorafa import report

P = report.params()
EXPERIMENT = "lr_sensitivity"
frame = report.rows(report.load(P.results), EXPERIMENT)
if len(frame):
    frame = frame.assign(paper_score=report.paper_score(frame), data=frame.apply(report.data_of, axis=1))

# %%
lines, best = [], {}
for (model, data), g in frame.groupby(["model", "data"]) if len(frame) else []:
    stats = g.groupby(["method", "lr"])["paper_score"].agg(["mean", "std", "count"])
    for method in [m for m in report.METHOD_ORDER if m in set(g["method"])]:
        s = stats.loc[method]
        best[(model, data, method)] = s["mean"].idxmax()
        line = {"model": model, "data": data, "method": report.method_label(method)}
        for lr, r in s.iterrows():
            line[f"lr {lr:g}"] = report.mean_std(g[(g["method"] == method) & (g["lr"] == lr)]["paper_score"])
        line["best lr"] = f"{best[(model, data, method)]:g}"
        lines.append(line)
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT, title="Dev score vs learning rate (mean ± std over seeds)",
                   notes=["Command: python run.py -m experiments=lr_sensitivity (results/README.md).",
                          report.provenance(frame)])
table

# %%
tuned = []
for (model, data, method), lr in best.items():
    g = frame[(frame["model"] == model) & (frame["data"] == data) & (frame["method"] == method) & (frame["lr"] == lr)]
    tuned.append(g)
tuned = pd.concat(tuned) if tuned else frame
paired = report.paired_table(tuned)
if len(paired):  # which rates were paired
    by_task = {(mo, frame.loc[frame["data"] == d, "task"].iloc[0], m): lr for (mo, d, m), lr in best.items()}
    other = {"LoRA-FA − LoRA": "lorafa", "LoRA-FA v2 − LoRA": "lorafa_v2"}
    paired["learning rates"] = [
        "each at its best" if mo == "all" else
        f"LoRA {by_task.get((mo, t, 'lora'), float('nan')):g}, "
        f"{report.method_label(other[c])} {by_task.get((mo, t, other[c]), float('nan')):g}"
        for mo, t, c in zip(paired["model"], paired["data"], paired["comparison"])]
report.write_table(paired, f"{EXPERIMENT}_paired",
                   title="Each method at its best learning rate: LoRA-FA − LoRA, paired by seed (points)",
                   notes=["95 % Student-t interval over the paired differences.", report.provenance(frame)])
paired

# %%
panels = list(dict.fromkeys(zip(frame["model"], frame["data"]))) if len(frame) else []
fig, axes = plt.subplots(1, len(panels) or 1, figsize=(5.5 * (len(panels) or 1), 4), squeeze=False)
for (model, data), ax in zip(panels, axes[0]):
    g = frame[(frame["model"] == model) & (frame["data"] == data)]
    for method in [m for m in report.METHOD_ORDER if m in set(g["method"])]:
        s = g[g["method"] == method].groupby("lr")["paper_score"].agg(["mean", "std"]).fillna(0.0)
        ratio = report.lr_label(g[g["method"] == method]).partition("(")[2].rstrip(")")
        ax.errorbar(s.index, s["mean"], yerr=s["std"], marker="o", capsize=3,
                    label=report.method_label(method) + (f" ({ratio.replace('B ×', 'B at ')} × lr)" if ratio else ""))
    ax.set_xscale("log")
    rates = sorted(set(g["lr"]))
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="learning rate", ylabel=f"dev {g['metric'].iloc[0]} (%)", title=f"{model} — {data}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
report.save_figure(fig, EXPERIMENT, rows=frame)
