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
# # Memory vs adapter rank: LoRA and LoRA-FA
# Rows of `experiments/memory_vs_rank.yaml`: measured peak and saved-activation memory along adapter rank r
# (random-init weights, synthetic full-length batches, bf16 autocast on a GPU), the predicted peak beside each, and
# the peak ratio LoRA ÷ LoRA-FA.

# %%
from lorafa import report

P = report.params()
EXPERIMENT = "memory_vs_rank"
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)

# %%
report.memory_scaling(frame, "rank", "adapter rank r", EXPERIMENT,
                      "Memory vs adapter rank: LoRA and LoRA-FA",
                      notes=["Command: python run.py -m experiments=memory_vs_rank (results/README.md)."])
