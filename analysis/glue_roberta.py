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
# # GLUE with RoBERTa: full fine-tuning vs LoRA vs LoRA-FA
# Rows of `experiments/glue_roberta.yaml`. Scores in % as the LoRA paper reports them (MNLI: mean of matched and
# mismatched accuracy; CoLA: Matthews correlation; STS-B: Pearson; accuracy otherwise), mean ± std over seeds, with
# the LoRA paper's RoBERTa-base rows and our delta beside them, then LoRA-FA − LoRA paired by task and seed.
# The table says which weights and data each row used: rows run offline on another model or data are never shown
# as the paper's setting.

# %%
from lorafa import report

P = report.params()
EXPERIMENT = "glue_roberta"
frame = report.rows(report.load(P.results), EXPERIMENT)

# %%
table = report.score_table(frame, report.LORA_PAPER_ROBERTA_BASE, ref_model="roberta-base",
                           ref_source=report.LORA_PAPER)
report.write_table(table, EXPERIMENT, title="GLUE dev, RoBERTa: full FT vs LoRA vs LoRA-FA (mean ± std over seeds)",
                   notes=[f"¹ published: {report.LORA_PAPER} (RoBERTa-base, LoRA on W_q, W_v).",
                          "Settings: experiments/glue_roberta.yaml (LoRA paper Table 9; full FT: RoBERTa paper).",
                          report.provenance(frame)])
table

# %%
paired = report.paired_table(frame)
report.write_table(paired, f"{EXPERIMENT}_paired",
                   title="GLUE, RoBERTa: LoRA-FA − LoRA, paired by task and seed (percentage points)",
                   notes=["95 % Student-t interval over the paired differences; `all` pools every task and seed.",
                          report.provenance(frame)])
paired
