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
# # Memory vs sequence length: LoRA, LoRA-FA and the frozen-model bound
# Rows of `experiments/memory_vs_seq.yaml`: measured peak and saved-activation memory along sequence length
# (random-init weights, synthetic full-length batches, bf16 autocast on a GPU), the predicted peak beside each, and
# the peak ratio LoRA ÷ LoRA-FA.

# %%
from lorafa import report

P = report.params()
EXPERIMENT = "memory_vs_seq"
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)

# %%
report.memory_scaling(frame, "seq_len", "sequence length", EXPERIMENT,
                      "Memory vs sequence length: LoRA, LoRA-FA and the frozen-model bound",
                      notes=["Command: python run.py -m experiments=memory_vs_seq (results/README.md)."])
