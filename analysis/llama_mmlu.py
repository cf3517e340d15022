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
# # LLaMA-7B instruction tuning → MMLU 5-shot
# Rows of `experiments/llama_mmlu.yaml` (Alpaca and FLAN-v2, MMLU through lm-eval), mean ± std over seeds, beside
# the QLoRA paper's BF16 LoRA rows for LLaMA-7B. Until rows of ours exist the table lists the
# published numbers with ours as —.

# %%
from lorafa import report

P = report.params()
EXPERIMENT = "llama_mmlu"
frame = report.rows(report.load(P.results), EXPERIMENT)

# %%
table = report.score_table(frame, {"lora": report.QLORA_LLAMA7B_MMLU}, ref_model="llama-7b",
                           ref_source=report.QLORA_PAPER)
report.write_table(table, EXPERIMENT, title="MMLU 5-shot after instruction tuning, LLaMA-7B (mean ± std over seeds)",
                   notes=[f"¹ published: {report.QLORA_PAPER} (LLaMA-7B, MMLU 5-shot, %).",
                          "Settings: experiments/llama_mmlu.yaml (QLoRA's 7B hyperparameters).",
                          report.provenance(frame)])
table

# %%
paired = report.paired_table(frame)
report.write_table(paired, f"{EXPERIMENT}_paired", title="MMLU: LoRA-FA − LoRA, paired by dataset and seed (points)",
                   notes=["95 % Student-t interval over the paired differences.", report.provenance(frame)])
paired
