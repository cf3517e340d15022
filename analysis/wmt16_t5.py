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
# # WMT16 En→Ro with T5: full fine-tuning vs LoRA vs LoRA-FA
# Rows of `experiments/wmt16_t5.yaml`: corpus BLEU (sacrebleu, detokenised, greedy decoding) on the evaluated split,
# mean ± std over seeds, chrF beside it, and LoRA-FA − LoRA paired by seed (BLEU points). The LoRA-FA paper's
# per-model BLEU is not available to us, so no published row is shown.

# %%
from lorafa import report

P = report.params()
EXPERIMENT = "wmt16_t5"
frame = report.rows(report.load(P.results), EXPERIMENT)

# %%
table = report.score_table(frame, extra={"chrF": "eval_chrf"})
report.write_table(table, EXPERIMENT, title="WMT16 En→Ro, T5: BLEU (mean ± std over seeds)",
                   notes=["Settings: experiments/wmt16_t5.yaml. BLEU: sacrebleu corpus_bleu, 13a tokenisation.",
                          report.provenance(frame)])
table

# %%
paired = report.paired_table(frame)
report.write_table(paired, f"{EXPERIMENT}_paired", title="WMT16 En→Ro, T5: LoRA-FA − LoRA, paired by seed (BLEU)",
                   notes=["95 % Student-t interval over the paired differences.", report.provenance(frame)])
paired
