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
# # One job on several GPUs: memory per GPU and for the job
# Rows of `experiments/distributed.yaml` (`torchrun --nproc-per-node 2 run.py -m experiments=distributed`): LLaMA-7B
# and a 13B-size LLaMA at random init, synthetic batches of 4 × 512 tokens per GPU, r = 8 on every linear layer,
# bf16 autocast, under DDP (every GPU holds the model) and FSDP (weights, gradients and optimizer state sharded),
# beside the same jobs on one GPU (`train.strategy=single`). Memory is per GPU (the largest process) and summed
# over the job's GPUs; tokens/s are the job's.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "distributed"
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)
STRATEGY_ORDER = {"single": 0, "ddp": 1, "fsdp": 2}
if not len(frame):  # no rows of this experiment: empty outputs, same columns
    frame = pd.DataFrame(columns=["model", "task", "method", "strategy", "world_size", "status", "total_params",
                                  "gradient_checkpointing", "mem_peak_gib", "tokens_per_s"])
else:
    if "strategy" not in frame:
        frame = frame.assign(strategy="single", world_size=1)
    frame = frame.assign(strategy=frame["strategy"].fillna("single"), world_size=frame["world_size"].fillna(1))
    frame = frame.assign(_size=frame.groupby("model")["total_params"].transform("max"),
                         _m=frame["method"].map({m: i for i, m in enumerate(report.METHOD_ORDER)}).fillna(99),
                         _s=frame["strategy"].map(STRATEGY_ORDER).fillna(9))
    frame = frame.sort_values(["task", "_size", "_m", "_s"]).drop(columns=["_size", "_m", "_s"])


# %%
def gib(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.2f}"


lines = []
for r in frame.itertuples(index=False):
    ok = r.status == "ok"
    world = int(r.world_size)
    job_peak = getattr(r, "job_mem_peak_gib", np.nan)
    lines.append({"model": r.model, "task": r.task, "method": report.method_label(r.method)
                  + (" + ckpt" if r.gradient_checkpointing else ""),
                  "strategy": f"{r.strategy} × {world}", "status": r.status,
                  "weights": gib(r.mem_weights_gib), "grads": gib(r.mem_grads_gib),
                  "optimizer": gib(r.mem_optimizer_gib), "activations": gib(r.mem_activations_gib),
                  "peak / GPU": gib(r.mem_peak_gib), "peak, job": gib(job_peak if world > 1 else r.mem_peak_gib),
                  "tokens/s": f"{r.tokens_per_s:,.0f}" if ok and pd.notna(r.tokens_per_s) else "—",
                  "tokens/s / GPU": f"{r.tokens_per_s / world:,.0f}" if ok and pd.notna(r.tokens_per_s) else "—"})
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT, title="One job on several GPUs: memory per GPU (GiB) and for the job",
                   notes=["Command: torchrun --nproc-per-node 2 run.py -m experiments=distributed (results/README.md).",
                          ("Per GPU = the largest process; job = the sum over processes; + ckpt = gradient "
                           "checkpointing. DDP holds what one GPU holds, per GPU; FSDP's counted activations are "
                           "2-6 % above DDP's (saved tensors inside FSDP's blocks; cause not yet isolated)."),
                          report.provenance(frame)])
table

# %%
ok = frame[(frame["status"] == "ok") & (frame["task"] == "synthetic")]
groups = [(m, meth, gc) for (m, meth, gc), _ in ok.groupby(["model", "method", "gradient_checkpointing"], sort=False)]
strategies = [s for s in STRATEGY_ORDER if s in set(ok["strategy"])]
fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 4))
width = 0.8 / max(len(strategies), 1)
for i, strategy in enumerate(strategies):
    vals = []
    for model, method, gc in groups:
        g = ok[(ok["model"] == model) & (ok["method"] == method) & (ok["gradient_checkpointing"] == gc)
               & (ok["strategy"] == strategy)]
        vals.append(g["mem_peak_gib"].iloc[0] if len(g) else np.nan)
    ax.bar(np.arange(len(groups)) + (i - (len(strategies) - 1) / 2) * width, vals, width, label=strategy)
ax.set_xticks(np.arange(len(groups)),
              [f"{m}\n{report.method_label(meth)}{' + ckpt' if gc else ''}" for m, meth, gc in groups], fontsize=8)
ax.set_ylabel("peak memory per GPU (GiB)")
if strategies:
    ax.legend(fontsize=8)
ax.set_title("Peak memory per GPU: one GPU, DDP and FSDP on 2 GPUs (4 × 512 tokens per GPU)", fontsize=10)
fig.tight_layout()
report.save_figure(fig, EXPERIMENT, rows=ok)
