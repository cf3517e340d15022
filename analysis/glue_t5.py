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
# # GLUE with T5 (text-to-text): full fine-tuning vs LoRA vs LoRA-FA
# Rows of `experiments/glue_t5.yaml`. Scores in % by the LoRA paper's per-task metric (MNLI: mean of matched and
# mismatched accuracy; CoLA: Matthews correlation; STS-B: Pearson; accuracy otherwise), mean ± std over seeds, with
# no published row for T5 with these methods (none is available to us), then LoRA-FA − LoRA paired by task and seed.
# The table says which weights and data each row used: rows run offline on another model or data are never shown
# as the paper's setting.

# %%
from lorafa import report

P = report.params()
EXPERIMENT = "glue_t5"
frame = report.rows(report.load(P.results), EXPERIMENT)

# %%
table = report.score_table(frame)
report.write_table(table, EXPERIMENT,
                   title="GLUE dev, T5 text-to-text: full FT vs LoRA vs LoRA-FA (mean ± std over seeds)",
                   notes=["Settings: experiments/glue_t5.yaml (our choice; no published T5 row for these methods).",
                          report.provenance(frame)])
table

# %%
paired = report.paired_table(frame)
report.write_table(paired, f"{EXPERIMENT}_paired",
                   title="GLUE, T5: LoRA-FA − LoRA, paired by task and seed (percentage points)",
                   notes=["95 % Student-t interval over the paired differences; `all` pools every task and seed.",
                          report.provenance(frame)])
paired
