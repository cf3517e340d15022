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
# # Accuracy vs trainable parameters
# Rows of `experiments/accuracy_vs_params.yaml`: the dev score as the adapter rank r grows, LoRA vs LoRA-FA, plotted
# against the number of trainable parameters (LoRA-FA trains B only, about half of LoRA's adapter at the same r;
# both also train the classification head). Full fine-tuning of the same model, weights and data under the same
# settings (rows of experiments/glue_roberta.yaml or loss_curves.yaml) is the reference line.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "accuracy_vs_params"
every = report.load(P.results)
frame = report.rows(every, EXPERIMENT)
if len(frame):
    frame = frame.assign(paper_score=report.paper_score(frame), data=frame.apply(report.data_of, axis=1),
                         weights=frame.apply(report.weights_of, axis=1))
# full fine-tuning under the same settings (glue_roberta.yaml, which this experiment includes)
SAME_SETTINGS = ["glue_roberta", EXPERIMENT]
full = every[(every["status"] == "ok") & (every["method"] == "full") & every["experiment"].isin(SAME_SETTINGS)] \
    if "method" in every else every.iloc[:0]
if len(full):
    full = full.assign(paper_score=report.paper_score(full), data=full.apply(report.data_of, axis=1),
                       weights=full.apply(report.weights_of, axis=1))

# %%
lines = []
for (model, data, method, rank), g in frame.groupby(["model", "data", "method", "rank"]) if len(frame) else []:
    lines.append({"model": model, "data": data, "method": report.method_label(method), "rank r": rank,
                  "lr": report.lr_label(g), "trainable params": f"{int(g['trainable_params'].iloc[0]):,}",
                  "score": report.mean_std(g["paper_score"], 2), "seeds": g["seed"].nunique()})
for (model, data), g in frame.groupby(["model", "data"]) if len(frame) else []:
    f = full[(full["model"] == model) & (full["data"] == data)] if len(full) else full
    if len(f):
        lines.append({"model": model, "data": data, "method": "full FT (reference)", "rank r": "—",
                      "lr": report.lr_label(f), "trainable params": f"{int(f['trainable_params'].iloc[0]):,}",
                      "score": report.mean_std(f["paper_score"], 2), "seeds": f["seed"].nunique()})
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT, title="Dev score vs trainable parameters (rank sweep)",
                   notes=["Command: python run.py -m experiments=accuracy_vs_params (results/README.md).",
                          report.provenance(frame)])
table

# %%
panels = list(dict.fromkeys(zip(frame["model"], frame["data"]))) if len(frame) else []
fig, axes = plt.subplots(1, len(panels) or 1, figsize=(5.5 * (len(panels) or 1), 4), squeeze=False)
for (model, data), ax in zip(panels, axes[0]):
    g = frame[(frame["model"] == model) & (frame["data"] == data)]
    for method in [m for m in report.METHOD_ORDER if m in set(g["method"])]:
        s = g[g["method"] == method].groupby("rank").agg(params=("trainable_params", "first"),
                                                        score=("paper_score", "mean")).sort_values("params")
        ax.plot(s["params"], s["score"], marker="o",
                label=f"{report.method_label(method)}, lr {report.lr_label(g[g['method'] == method])}")
        for rank, r in s.iterrows():
            ax.annotate(f"r={rank}", (r["params"], r["score"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    f = full[(full["model"] == model) & (full["data"] == data)] if len(full) else full
    if len(f):
        ax.axhline(f["paper_score"].mean(), color="k", ls="--", lw=1,
                   label=f"full FT ({int(f['trainable_params'].iloc[0]):,} params), lr {report.lr_label(f)}")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=f"dev {g['metric'].iloc[0]} (%)", title=f"{model} — {data}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
report.save_figure(fig, EXPERIMENT, rows=frame)
