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
# # Speed: LoRA-FA against full fine-tuning and LoRA, each at its best setting
# Rows of `python -m lorafa.bench` (`results/throughput.parquet`): full, lora, lorafa and lorafa_v2 on the same
# model and batch in one process, interleaved over rounds, after warm-up; every (method, mode, LoRA-FA layer) is a
# setting and a method's best is its fastest. Random-init weights, synthetic full-length batches, bf16 autocast,
# r = 8 on every linear layer, fused AdamW. The targets: LoRA-FA ≥ 1.25 × full FT and ≥ 1.1 × LoRA in
# tokens/s. Per model the latest run (`run_id`) is shown; development rows without a `run_id` are left out, and
# rows of development runs (`dev_run`, such as `results/archive/bench_dev_h200.parquet`) are shown only while no benchmark run's
# rows exist — then the tables say so in their titles.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "bench"
TARGETS = {"full": 1.25, "lora": 1.1}
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)
for col, empty in (("run_id", ""), ("compile_mode", ""), ("stacked", False), ("best", False), ("mfu", np.nan),
                   ("vs_full_best", np.nan), ("vs_lora_best", np.nan), ("warmup_s", np.nan),
                   ("final_loss", np.nan), ("command", "")):
    if col not in frame:
        frame[col] = empty
# LoRA-FA's layer (column `layer` since the merged layer; earlier rows say only whether it was stacked)
earlier = np.where(frame["stacked"].fillna(False).astype(bool), "stacked",
                   np.where(frame["method"].astype(str).str.startswith("lorafa"), "two_matmul", "none"))
frame["layer"] = frame["layer"].fillna(pd.Series(earlier, index=frame.index)) if "layer" in frame else earlier
frame = frame[frame["run_id"].fillna("").astype(str) != ""]
dev = frame["dev_run"].fillna("").astype(str) != "" if "dev_run" in frame else pd.Series(False, index=frame.index)
DEV_ONLY = bool(len(frame)) and bool(dev.all())
frame = frame if DEV_ONLY else frame[~dev]
DEV_NOTE = " — development runs only (`dev_run`), not the benchmark" if DEV_ONLY else ""
if len(frame):  # per model, its latest run; smallest model first, methods in the usual order
    frame = frame[frame["run_id"] == frame.groupby("model")["run_id"].transform("max")]
    frame = frame.assign(_size=frame.groupby("model")["trainable_params"].transform("max"),
                         _m=frame["method"].map({m: i for i, m in enumerate(report.METHOD_ORDER)}).fillna(99))
    frame = frame.sort_values(["_size", "_m", "compile_mode"]).drop(columns=["_size", "_m"])
best = frame[frame["best"].fillna(False).astype(bool)]


# %%
def num(value, fmt: str) -> str:
    return "—" if value is None or pd.isna(value) else format(value, fmt)


def setting(r) -> str:
    return f"{r.compile_mode}{f' ({r.layer})' if r.layer not in ('none', 'two_matmul') else ''}"


lines = []
for r in best.itertuples(index=False):
    fa = r.method == "lorafa"
    lines.append({"model": r.model, "batch × seq": f"{r.batch_size} × {r.seq_len}",
                  "method": report.method_label(r.method), "best setting": setting(r),
                  "tokens/s": num(r.tokens_per_s, ",.0f"), "step ms": num(1000 * r.step_time_s, ".2f"),
                  "MFU": num(r.mfu, ".3f"), "peak GiB": num(r.mem_peak_gib, ".2f"),
                  "÷ full FT": num(r.vs_full_best, ".2f"), "÷ LoRA": num(r.vs_lora_best, ".2f"),
                  "targets met": ("yes" if all(getattr(r, f"vs_{k}_best") >= v for k, v in TARGETS.items()) else "no")
                  if fa else ""})
table = pd.DataFrame(lines)
commands = sorted(set(frame["command"].dropna().astype(str)) - {""})
report.write_table(table, "speed", title=f"Training speed at each method's best setting (tokens/s, interleaved){DEV_NOTE}",
                   notes=[*(f"Command: {c}" for c in commands),
                          ("Targets: LoRA-FA ÷ full FT ≥ 1.25 and ÷ LoRA ≥ 1.1; MFU against the "
                           "device's measured bf16 matmul rate; the FLOPs are those executed (LoRA-FA has no "
                           "weight-gradient matmuls)."),
                          report.provenance(frame)])
table

# %%
every = pd.DataFrame([{"model": r.model, "method": report.method_label(r.method), "setting": setting(r),
                       "status": r.status, "tokens/s": num(r.tokens_per_s, ",.0f"),
                       "step ms": num(1000 * r.step_time_s, ".2f"), "warm-up s": num(r.warmup_s, ".1f"),
                       "MFU": num(r.mfu, ".3f"), "peak GiB": num(r.mem_peak_gib, ".2f"),
                       "final loss": num(r.final_loss, ".4f"), "best": "★" if bool(r.best) else "",
                       "error": str(r.error or "")[:80]} for r in frame.itertuples(index=False)])
report.write_table(every, "speed_settings", title=f"Every setting of the speed benchmark{DEV_NOTE}",
                   notes=[("final loss: after the same number of optimizer steps from the same start; a method's "
                           "settings should agree (dropout draws differ)."), report.provenance(frame)])
every

# %% [markdown]
# What each best setting's GPU time is made of (`--profile`: kernel time by kind, ms a step, over 3 profiled steps
# after the timed ones). `busy`: kernel time ÷ step time — near 1 the step is bound by the GPU's work. fp32 matmuls
# under bf16 autocast mean something left the bf16 path (e.g. SDPA's math kernel).

# %%
KINDS = {"matmul": "matmul", "matmul_fp32": "fp32 matmul", "attention": "attention", "optimizer": "optimizer",
         "inductor": "inductor", "copy": "copy", "other": "other"}
for kind in KINDS:
    if f"kernel_{kind}_ms" not in frame:
        frame[f"kernel_{kind}_ms"] = np.nan
        best = best.assign(**{f"kernel_{kind}_ms": np.nan})
if "device_busy_frac" not in best:
    best = best.assign(device_busy_frac=np.nan)
kernels = pd.DataFrame([{"model": r["model"], "method": report.method_label(r["method"]),
                         "best setting": setting(pd.Series(r)), "step ms": num(1000 * r["step_time_s"], ".2f"),
                         "busy": num(r["device_busy_frac"], ".2f"),
                         **{label: num(r[f"kernel_{kind}_ms"], ".2f") for kind, label in KINDS.items()}}
                        for r in best.to_dict("records")])
report.write_table(kernels, "speed_kernels",
                   title=f"GPU time by kind of kernel at each method's best setting (ms a step){DEV_NOTE}",
                   notes=["— : the run was not profiled (`--profile`), or ran on a CPU.", report.provenance(frame)])
kernels

# %%
ok = best[best["status"] == "ok"]
models = list(dict.fromkeys(ok["model"]))
methods = [m for m in report.METHOD_ORDER if m in set(ok["method"])]
fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models) + 2), 4))
width = 0.8 / max(len(methods), 1)
for i, method in enumerate(methods):
    vals = [ok[(ok["model"] == m) & (ok["method"] == method)]["vs_full_best"].max() for m in models]
    ax.bar(np.arange(len(models)) + (i - (len(methods) - 1) / 2) * width, vals, width,
           label=report.method_label(method))
ax.axhline(1.0, color="k", lw=0.8)
ax.axhline(TARGETS["full"], color="tab:red", lw=0.8, ls="--", label="target for LoRA-FA (1.25)")
ax.set_xticks(np.arange(len(models)), models)
ax.set_ylabel("tokens/s ÷ full FT (each at its best)")
ax.legend(fontsize=8)
ax.set_title("Training speed relative to full fine-tuning, best setting per method", fontsize=10)
fig.tight_layout()
report.save_figure(fig, "speed", rows=ok)
