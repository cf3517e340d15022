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
# # Loss curves per method
# Rows of `experiments/loss_curves.yaml`: the training loss of every optimizer step (`loss_curve`, smoothed with an
# exponential moving average) and the dev score after each epoch (`eval_history`) for full fine-tuning, LoRA and
# LoRA-FA, one panel per model × data.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "loss_curves"
frame = report.rows(report.load(P.results), EXPERIMENT)
if len(frame):
    frame["data"] = frame.apply(report.data_of, axis=1)


def ema(values, alpha=0.05):
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return np.asarray(out)


# %%
lines = []
for i, r in enumerate(frame.itertuples(index=False)):
    curve = np.asarray(r.loss_curve, dtype=float)
    tail = curve[-max(1, len(curve) // 10):]
    evals = json.loads(r.eval_history)
    lines.append({"model": r.model, "data": r.data, "method": report.method_label(r.method),
                  "lr": report.lr_label(frame.iloc[[i]]), "seed": r.seed, "steps": len(curve), "first loss": f"{curve[0]:.3f}",
                  "final loss (mean of last 10 %)": f"{tail.mean():.3f}",
                  f"dev {r.metric} per epoch": ", ".join(f"{e.get(r.metric, float('nan')):.3f}" for e in evals)})
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT, title="Training loss and dev score per method",
                   notes=["Command: python run.py -m experiments=loss_curves (results/README.md).",
                          report.provenance(frame)])
table

# %%
panels = list(dict.fromkeys(zip(frame["model"], frame["data"]))) if len(frame) else []
fig, axes = plt.subplots(len(panels) or 1, 2, figsize=(10, 3.6 * (len(panels) or 1)), squeeze=False)
for (model, data), row_axes in zip(panels, axes):
    g = frame[(frame["model"] == model) & (frame["data"] == data)]
    for m in [m for m in report.METHOD_ORDER if m in set(g["method"])]:
        for r in g[g["method"] == m].itertuples(index=False):
            lr = report.lr_label(pd.DataFrame([r._asdict()]))
            label = f"{report.method_label(m)}, lr {lr}" + (f" seed {r.seed}" if g["seed"].nunique() > 1 else "")
            row_axes[0].plot(ema(np.asarray(r.loss_curve, dtype=float)), label=label, lw=1.2)
            evals = json.loads(r.eval_history)
            row_axes[1].plot([e["epoch"] for e in evals], [e.get(r.metric, np.nan) for e in evals], marker="o",
                             label=label)
    row_axes[0].set(xlabel="optimizer step", ylabel="training loss (EMA)", title=f"{model} — {data}")
    row_axes[1].set(xlabel="epoch", ylabel=f"dev {g['metric'].iloc[0]}", title=f"{model} — {data}")
    for ax in row_axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
fig.tight_layout()
report.save_figure(fig, EXPERIMENT, rows=frame)
