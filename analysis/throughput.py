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
# # Training throughput of jobs, beside the benchmark
# Rows of `experiments/throughput.yaml` (`python run.py -m experiments=throughput`): training tokens/s of a job
# after warm-up, random-init weights, synthetic full-length batches, bf16 autocast, r = 8 on every linear layer,
# jobs one after another on one GPU, each in the mode its row names (`compile_mode`: `graph` = compiled blocks and
# the whole step as a CUDA graph). Beside each, the same method's best setting in `python -m lorafa.bench` (the
# latest benchmark run of that model): the job should reach ≥ 0.9 × it. Then the speed of jobs on real data
# (`results/speed_jobs_h200.parquet`): the shipped MiniLM stand-in sweep of `glue_roberta`, graphed against the
# eager jobs of `results/glue_roberta_minilm.parquet`.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "throughput"
ALL = report.load(P.results)
frame = report.rows(ALL, EXPERIMENT, ok_only=False)
if len(frame):  # smallest model first, methods in the usual order
    frame = frame.assign(_size=frame.groupby("model")["total_params"].transform("max"),
                         _order=frame["method"].map({m: i for i, m in enumerate(report.METHOD_ORDER)}).fillna(99))
    frame = frame.sort_values(["_size", "_order"]).drop(columns=["_size", "_order"])
bench = report.rows(ALL, "bench", ok_only=True)
if len(bench) and "best" in bench and "run_id" in bench:
    bench = bench[bench["best"].fillna(False).astype(bool) & (bench["run_id"].fillna("").astype(str) != "")]
    bench = bench[bench["run_id"] == bench.groupby("model")["run_id"].transform("max")]
    BEST = {(r.model, r.method): r for r in bench.itertuples(index=False)}
else:
    BEST = {}

# %%
lines = []
for model, g in frame.groupby("model", sort=False):
    speed = g[g["status"] == "ok"].set_index("method")["tokens_per_s"]
    for r in g.itertuples(index=False):
        ok = r.status == "ok"
        ref = BEST.get((model, r.method))
        lines.append({"model": model, "batch × seq": f"{r.batch_size} × {r.seq_len}",
                      "method": report.method_label(r.method), "status": r.status,
                      "job mode": f"{getattr(r, 'compile_mode', '') or 'none'}"
                                  f"{'' if getattr(r, 'layer', 'none') in ('none', None) else f' ({r.layer})'}",
                      "tokens/s": f"{r.tokens_per_s:,.0f}" if ok else "—",
                      "step time ms": f"{1000 * r.step_time_s:.1f}" if ok else "—",
                      "peak GiB": f"{r.mem_peak_gib:.2f}" if ok else "—",
                      "÷ full FT": f"{r.tokens_per_s / speed['full']:.2f}" if ok and "full" in speed else "—",
                      "÷ LoRA": f"{r.tokens_per_s / speed['lora']:.2f}" if ok and "lora" in speed else "—",
                      "bench best tokens/s": "—" if ref is None else
                      f"{ref.tokens_per_s:,.0f} ({ref.compile_mode}, {ref.layer})",
                      "job ÷ bench": "—" if ref is None or not ok else f"{r.tokens_per_s / ref.tokens_per_s:.2f}"})
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT,
                   title="Training throughput of jobs (tokens/s after warm-up) and the benchmark's best setting",
                   notes=[("Command: python run.py -m experiments=throughput (jobs, mode graph: compiled blocks and "
                          "the whole step as a CUDA graph); the bench: python -m lorafa.bench (results/README.md)."),
                          ("Synthetic full-length batches, random-init weights, bf16 autocast, r = 8 on every "
                          "linear layer; peak GiB: the allocator's steady-state peak of the measured (eager) steps."),
                          "Jobs: " + report.provenance(frame), "Bench: " + report.provenance(bench)])
table

# %%
ok = frame[frame["status"] == "ok"]
models = list(dict.fromkeys(ok["model"]))
methods = [m for m in report.METHOD_ORDER if m in set(ok["method"])]
fig, axes = plt.subplots(1, 2, figsize=(max(9, 3.2 * len(models) + 3), 4))
width = 0.8 / max(len(methods), 1)
for i, method in enumerate(methods):
    rel, vs_bench = [], []
    for model in models:
        g = ok[ok["model"] == model].set_index("method")["tokens_per_s"]
        rel.append(g.get(method, np.nan) / g.get("full", np.nan))
        ref = BEST.get((model, method))
        vs_bench.append(g.get(method, np.nan) / ref.tokens_per_s if ref is not None else np.nan)
    x = np.arange(len(models)) + (i - (len(methods) - 1) / 2) * width
    axes[0].bar(x, rel, width, label=report.method_label(method))
    axes[1].bar(x, vs_bench, width, label=report.method_label(method))
axes[0].axhline(1.0, color="k", lw=0.8)
axes[0].set_ylabel("job tokens/s ÷ full fine-tuning's job")
axes[0].set_title("Jobs: tokens/s relative to full FT", fontsize=10)
axes[1].axhline(0.9, color="k", lw=0.8, ls="--")
axes[1].set_ylabel("job tokens/s ÷ the bench's best setting")
axes[1].set_title("Jobs against the benchmark (dashed: 0.9)", fontsize=10)
for ax in axes:
    ax.set_xticks(np.arange(len(models)), [f"{m}\n{ok[ok['model'] == m]['batch_size'].iloc[0]}×"
                                           f"{ok[ok['model'] == m]['seq_len'].iloc[0]}" for m in models])
if methods:
    axes[0].legend(fontsize=8)
devices = ", ".join(sorted(set(ok["device"].dropna()))) if "device" in ok else ""
fig.suptitle(f"Training jobs, mode graph, random-init weights, synthetic batches, bf16 — {devices}", fontsize=10)
fig.tight_layout()
report.save_figure(fig, EXPERIMENT, rows=ok)

# %% [markdown]
# ## Jobs on real data: the MiniLM stand-in sweep
# `glue_roberta` on the shipped movie_polarity data with all-MiniLM-L6-v2 (12 jobs: 4 methods × 3 seeds, 804
# steps each). Wall time: each job's `wall_time_s` (build, train, evaluate, write), summed. Eager: the committed
# sweep (`results/glue_roberta_minilm.parquet`, one job after another); graphed: `train.compile=auto` (a whole-step
# CUDA graph per length bucket, not compiled: 804 steps). Scores: the graphed jobs against eager jobs of the same
# code and defaults (`minilm_sweep_eager_parallel`: run 12 at once, so their wall times are not comparable),
# paired by method and seed.

# %%
jobs = report.rows(ALL, "speed_jobs", ok_only=True)
eager_sweep = report.rows(ALL, "glue_roberta", ok_only=True)
eager_sweep = eager_sweep[eager_sweep["model"] == "all-MiniLM-L6-v2"] if len(eager_sweep) else eager_sweep
lines = []
if len(jobs) and "run" in jobs:
    auto = jobs[jobs["run"] == "minilm_sweep_auto"]
    par = jobs[jobs["run"] == "minilm_sweep_eager_parallel"]
    for method in [m for m in report.METHOD_ORDER if m in set(auto["method"])]:
        a = auto[auto["method"] == method].set_index("seed")
        e = eager_sweep[eager_sweep["method"] == method] if len(eager_sweep) else eager_sweep
        p_ = par[par["method"] == method].set_index("seed")
        common = sorted(set(a.index) & set(p_.index))
        diff = a.loc[common, "score"] - p_.loc[common, "score"]
        lines.append({"method": report.method_label(method), "jobs": len(a),
                      "eager wall s": f"{e['wall_time_s'].sum():.0f}" if len(e) else "—",
                      "graphed wall s": f"{a['wall_time_s'].sum():.0f}",
                      "speed-up": f"{e['wall_time_s'].sum() / a['wall_time_s'].sum():.1f}×" if len(e) else "—",
                      "graphed tokens/s": f"{a['tokens_per_s'].mean():,.0f}",
                      "eager tokens/s": f"{e['tokens_per_s'].mean():,.0f}" if len(e) else "—",
                      "pad_frac": f"{a['pad_frac'].mean():.2f}",
                      "accuracy graphed": report.mean_std(100 * a["score"]),
                      "accuracy eager": report.mean_std(100 * p_["score"]),
                      "graphed − eager (pts)": f"{100 * diff.mean():+.1f} (min {100 * diff.min():+.1f}, "
                                               f"max {100 * diff.max():+.1f})" if len(diff) else "—"})
real = pd.DataFrame(lines)
if len(real) and len(eager_sweep):
    total = f"{eager_sweep['wall_time_s'].sum():.0f} s eager → {auto['wall_time_s'].sum():.0f} s graphed"
else:
    total = "no rows"
report.write_table(real, "throughput_real_data",
                   title="The MiniLM stand-in sweep (glue_roberta × movie_polarity): eager jobs against graphed",
                   notes=[f"Whole sweep, sum of job wall times: {total}.",
                          ("tokens/s counts real tokens; pad_frac: the share of the graphed batches' positions "
                          "that were padding (length buckets of 32 up to 128)."),
                          "Eager: " + report.provenance(eager_sweep),
                          "Graphed: " + report.provenance(pd.concat([auto, par]) if len(real) else jobs)])
real

# %% [markdown]
# ## Grouping batches by length
# The same MiniLM stand-in sweep run twice back to back in one process each, `train.group_by_length=false` and
# `true` (mode `eager_graph`, 804 steps): how much padding grouping removes and what it does to speed and accuracy.

# %%
lines = []
if len(jobs) and "run" in jobs:
    grouped = {flag: jobs[jobs["run"] == f"minilm_sweep_{'grouped' if flag else 'ungrouped'}"] for flag in (False, True)}
    for method in [m for m in report.METHOD_ORDER if m in set(grouped[True]["method"])]:
        g, u = (grouped[flag][grouped[flag]["method"] == method].set_index("seed") for flag in (True, False))
        common = sorted(set(g.index) & set(u.index))
        diff = 100 * (g.loc[common, "score"] - u.loc[common, "score"])
        lines.append({"method": report.method_label(method), "seeds": len(common),
                      "pad_frac ungrouped": f"{u['pad_frac'].mean():.2f}", "pad_frac grouped": f"{g['pad_frac'].mean():.2f}",
                      "tokens/s ungrouped": f"{u['tokens_per_s'].median():,.0f}",
                      "tokens/s grouped": f"{g['tokens_per_s'].median():,.0f}",
                      "accuracy ungrouped": report.mean_std(100 * u["score"]),
                      "accuracy grouped": report.mean_std(100 * g["score"]),
                      "grouped − ungrouped (pts)": f"{diff.mean():+.1f} (min {diff.min():+.1f}, max {diff.max():+.1f})"
                      if len(diff) else "—"})
by_length = pd.DataFrame(lines)
walls = ", ".join(f"{name} {frame['wall_time_s'].sum():.0f} s" for name, frame in
                  (("ungrouped", grouped[False]), ("grouped", grouped[True]))) if len(by_length) else "no rows"
report.write_table(by_length, "throughput_group_by_length",
                   title="train.group_by_length on the MiniLM stand-in sweep (glue_roberta × movie_polarity, "
                         "mode eager_graph)",
                   notes=[("python run.py -m experiments=glue_roberta model=local model.path=<all-MiniLM-L6-v2> "
                           "task=movie_polarity 'method.targets=[query,value]' train.group_by_length=<false|true>"),
                          f"Sum of job wall times: {walls}. tokens/s: median over the method's seeds (real tokens).",
                          report.provenance(pd.concat(list(grouped.values())) if len(by_length) else jobs)])
by_length

# %% [markdown]
# ## Jobs at paper scale on real data
# roberta-base and t5-large (random-init weights, all-MiniLM-L6-v2's tokenizer) on the shipped movie_polarity
# data, batch 32, length ≤ 128, 400 steps of which 50 warm-up, length buckets of 32: tokens/s of real tokens,
# LoRA-FA against full fine-tuning and LoRA in the same mode and run. Where a run has several seeds, tokens/s is
# the median over seeds and the ratios are the mean of the per-seed ratios (min–max beside it). Runs before
# `one_time_steps` existed timed a shape's compilation and capture as speed; the `_timed` and `_seeds` runs do not.

# %%
RUNS = ["roberta_base_movie_polarity_400", "t5_large_movie_polarity_400", "t5_large_movie_polarity_graph_400",
        "roberta_base_movie_polarity_graph_400_seeds",
        "roberta_base_movie_polarity_400_seeds", "t5_large_movie_polarity_graph_400_timed"]
scale = jobs[jobs["run"].isin(RUNS)] if len(jobs) and "run" in jobs else jobs


def _ratio(by_seed: pd.DataFrame, a: str, b: str) -> str:
    r = (by_seed[a] / by_seed[b]).dropna()
    if len(r) <= 1:
        return f"{r.mean():.2f}" if len(r) else "—"
    return f"{r.mean():.2f} ({r.min():.2f}–{r.max():.2f})"


lines = []
for (run_name, model, mode), g in (scale.groupby(["run", "model", "compile_mode"], sort=False) if len(scale) else []):
    by_seed = g.pivot_table(index="seed", columns="method", values="tokens_per_s")
    row = {"model": model, "job mode": mode, "run": run_name, "seeds": int(g["seed"].nunique()),
           "pad_frac": f"{g['pad_frac'].mean():.2f}", "graph shapes": int(g["graph_shapes"].max()),
           "graph failures": int(g["graph_failures"].sum())}
    for method in [m for m in report.METHOD_ORDER if m in by_seed.columns]:
        row[f"{report.method_label(method)} tokens/s"] = f"{by_seed[method].median():,.0f}"
    if {"lorafa", "full", "lora"} <= set(by_seed.columns):
        row["LoRA-FA ÷ full FT"] = _ratio(by_seed, "lorafa", "full")
        row["LoRA-FA ÷ LoRA"] = _ratio(by_seed, "lorafa", "lora")
    lines.append(row)
at_scale = pd.DataFrame(lines)
report.write_table(at_scale, "throughput_real_data_models",
                   title="Jobs on real data at paper scale: movie_polarity, batch 32, length ≤ 128, 400 steps, "
                         "random-init weights",
                   notes=[("python run.py -m model=<m> model.init=random model.tokenizer=<all-MiniLM-L6-v2> "
                          "task=movie_polarity task.max_seq_len=128 method=full,lora,lorafa train.compile=<mode> "
                          "train.max_steps=400 train.measure_warmup_steps=50 (results/README.md)."),
                          ("tokens/s counts real tokens (t5-large: inputs and targets); pad_frac: the share of "
                          "computed positions that were padding; bf16 autocast, r = 8 on every linear layer."),
                          report.provenance(scale)])
at_scale

# %% [markdown]
# ## Evaluation inside jobs
# The MiniLM stand-in sweep (12 jobs, 3 evaluations each of the 1,000 validation sentences) run back to back at the
# code before and after evaluation became one pass and graphed (`Poser.score`, `TrainStep.eval_forward`): the
# evaluation time of each job (`time_eval_s`), its wall time, and its scores, paired by method and seed.

# %%
lines = []
if len(jobs) and "run" in jobs:
    before, after = (jobs[jobs["run"] == f"minilm_sweep_eval_{w}"] for w in ("before", "after"))
    for method in [m for m in report.METHOD_ORDER if m in set(after["method"])]:
        b, a = (f[f["method"] == method].set_index("seed") for f in (before, after))
        common = sorted(set(b.index) & set(a.index))
        diff = 100 * (a.loc[common, "score"] - b.loc[common, "score"])
        lines.append({"method": report.method_label(method), "seeds": len(common),
                      "eval s before (median)": f"{b['time_eval_s'].median():.2f}",
                      "eval s after (median)": f"{a['time_eval_s'].median():.2f}",
                      "job wall s before": f"{b['wall_time_s'].sum():.1f}",
                      "job wall s after": f"{a['wall_time_s'].sum():.1f}",
                      "eval graphs (shapes / replays)": f"{int(a['eval_graph_shapes'].max())} / "
                                                        f"{int(a['eval_graph_replays'].max())}",
                      "accuracy after − before (pts)": f"{diff.mean():+.2f} (max abs {diff.abs().max():.2f})"
                      if len(diff) else "—",
                      "eval loss max abs Δ": f"{(a.loc[common, 'eval_loss'] - b.loc[common, 'eval_loss']).abs().max():.4f}"
                      if len(common) else "—"})
    walls = (f"sum of job wall times {before['wall_time_s'].sum():.0f} s → {after['wall_time_s'].sum():.0f} s; "
             f"of evaluation {before['time_eval_s'].sum():.1f} s → {after['time_eval_s'].sum():.1f} s")
else:
    before = after = jobs
    walls = "no rows"
evals = pd.DataFrame(lines)
report.write_table(evals, "throughput_eval",
                   title="Evaluation in jobs, before and after one-pass graphed evaluation (MiniLM stand-in sweep, "
                         "mode eager_graph)",
                   notes=[("python run.py -m experiments=glue_roberta model=local model.path=<all-MiniLM-L6-v2> "
                           "task=movie_polarity 'method.targets=[query,value]', at each commit (results/README.md)."),
                          walls + ".",
                          report.provenance(pd.concat([before, after]) if len(evals) else jobs)])
evals
