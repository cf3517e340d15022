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
# # Memory plans: what each costs, and what a budget chooses
# Rows of `experiments/memory_budget.yaml` (`python run.py -m experiments=memory_budget [model=roberta-large]`):
# every plan a budget chooses among (`train.plan`: checkpointing none / every 4th / every 2nd / all blocks, with and
# without element-wise recomputation, all blocks keeping matmul outputs, every 4th / every 2nd / all blocks offloaded
# to host memory) and the plan each budget chose (`train.memory_budget_gib`), for LoRA and LoRA-FA: measured peak
# beside the predicted one, host memory, tokens/s (every step eager), and the step time the planner's model gives
# each plan (at the rates a budget job of the same sweep measured) beside the measured one. Checks per budget: the
# chosen plan fits and is within 5 % of the fastest other measured plan that fits (hand-set, or another budget's).

# %%
import json
import math

import matplotlib.pyplot as plt
import pandas as pd

from lorafa import plans, report
from lorafa.checks import BadInput
from lorafa.memory import Prediction

P = report.params()
EXPERIMENT = "memory_budget"
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)
for col in ("budget_gib", "plan_name", "host_offload_gib"):
    if col not in frame:
        frame[col] = float("nan") if col != "plan_name" else ""
hand = frame[frame["budget_gib"].isna() & (frame["status"] == "ok")]
budgets = frame[frame["budget_gib"].notna()]


def shape(g) -> str:
    r = g.iloc[0]
    return f"{int(r['batch_size'])} × {int(r['seq_len'])}"


# %%
def modelled(r, same_budgets, same_hand) -> float:
    """The planner's step time for hand-set row `r` (`lorafa.plans.step_seconds`: its predicted FLOPs and host bytes,
    its plan's timeline, its blocks' modes) at the rates (and block-mode costs, where measured) a budget job of the same model and method measured; NaN where no budget row
    carries rates or the plan is no longer a candidate."""
    rated = same_budgets.dropna(subset=[c for c in ("copy_gib_per_s", "fwd_tflop_per_s") if c in same_budgets])
    if rated.empty or "fwd_tflop_per_s" not in rated:
        return float("nan")
    b = rated.iloc[0]
    arch = json.loads(r.config)["model"].get("arch") or {}
    n = int(arch.get("num_hidden_layers") or arch.get("num_layers", 0) + arch.get("num_decoder_layers", 0))
    try:
        plan = plans.named(r.plan_name, n)
    except BadInput:
        return float("nan")
    line = plans.timeline(plan.keys(), n)
    costs = b.get("block_extra_ms")  # each block mode's measured cost, where the budget job measured them
    costs = {m: (f / 1e3, bw / 1e3) for m, (f, bw) in json.loads(costs).items()} if isinstance(costs, str) else {}
    rates = plans.Rates(b.matmul_tflop_per_s * 1e12, b.copy_gib_per_s * 2**30, b.fwd_tflop_per_s * 1e12,
                        b.bwd_tflop_per_s * 1e12, block_extra=costs or None)
    pred = Prediction(0, 0, 0, 0, 0, host_offload=r.pred_host_offload_gib * 2**30,
                      flops=r.pred_step_tflop * 1e12, flops_forward=r.pred_forward_tflop * 1e12)
    plain = float((same_hand["pred_step_tflop"] - same_hand["pred_forward_tflop"]).min()) * 1e12
    return plans.step_seconds(pred, rates, line, plain, plans.block_modes(plan, line))


lines = []
for (model, method), g in hand.groupby(["model", "method"], sort=False):
    base = g[g["plan_name"] == "all"]["tokens_per_s"]
    base = float(base.iloc[0]) if len(base) else float("nan")
    same_budgets = budgets[(budgets["model"] == model) & (budgets["method"] == method)]
    for r in g.sort_values("mem_peak_gib", ascending=False).itertuples(index=False):
        err = 100 * (r.pred_mem_peak_gib / r.mem_peak_gib - 1)
        step_s = modelled(r, same_budgets, g)
        lines.append({"model": model, "batch × seq": shape(g), "method": report.method_label(method),
                      "plan": r.plan_name, "peak GiB": f"{r.mem_peak_gib:.2f}",
                      "predicted GiB": f"{r.pred_mem_peak_gib:.2f} ({err:+.1f} %)",
                      "host GiB": f"{r.host_offload_gib:.1f}" if r.host_offload_gib else "—",
                      "tokens/s": f"{r.tokens_per_s:,.0f}", "÷ all checkpointed": f"{r.tokens_per_s / base:.2f}",
                      "step s": f"{r.step_time_s:.3f}",
                      "modelled step s": "—" if math.isnan(step_s) else f"{step_s:.3f} ({100 * (step_s / r.step_time_s - 1):+.0f} %)"})
report.write_table(pd.DataFrame(lines), EXPERIMENT, title="Memory plans: peak (measured, predicted), host memory "
                   "and tokens/s per plan — eager steps, random-init weights, synthetic full-length batches, "
                   "bf16 autocast, r = 8 on every linear layer",
                   notes=[report.provenance(frame),
                          "plan: the names of `train.plan` (lorafa/plans.py); `all` = every block checkpointed.",
                          ("modelled step: the planner's step-time model for the plan at the rates the same "
                           "sweep's budget jobs measured (— where none did, or the plan is no longer a candidate)."),
                          "Command: python run.py -m experiments=memory_budget [model=roberta-large]."])

# %%
checks = []
measured = frame[frame["status"] == "ok"]
assert frame.index.is_unique  # a budget row is told from the others by its index
for i, r in zip(budgets.index, budgets.itertuples(index=False)):
    # every other plan measured in the sweep (hand-set, or chosen by another budget) that fits this budget
    same = measured[(measured["model"] == r.model) & (measured["method"] == r.method) & (measured.index != i)]
    fits = same[same["mem_peak_gib"] <= r.budget_gib]
    fastest = fits.loc[fits["tokens_per_s"].idxmax()] if len(fits) else None
    ok = r.status == "ok"
    checks.append({"model": r.model, "method": report.method_label(r.method), "budget GiB": f"{r.budget_gib:g}",
                   "chosen": r.plan_name if ok else r.status, "peak GiB": f"{r.mem_peak_gib:.2f}" if ok else "—",
                   "fits": "yes" if ok and r.mem_peak_gib <= r.budget_gib else "no",
                   "tokens/s": f"{r.tokens_per_s:,.0f}" if ok else "—",
                   "fastest fitting (measured)": "—" if fastest is None else
                   f"{fastest['plan_name']} ({fastest['tokens_per_s']:,.0f})",
                   "chosen ÷ fastest": "—" if fastest is None or not ok else
                   f"{r.tokens_per_s / fastest['tokens_per_s']:.3f}",
                   "within 5 %": "—" if fastest is None or not ok else
                   ("yes" if r.tokens_per_s >= 0.95 * fastest["tokens_per_s"] else "no"),
                   "model's own pick": pick if ok and isinstance(pick := getattr(r, "plan_modelled", None), str)
                   and pick else "—",
                   "timed (ms, fwd + bwd)": ", ".join(f"{k} {v:.0f}" for k, v in json.loads(timed).items()) or "—"
                   if ok and isinstance(timed := getattr(r, "plans_timed_ms", None), str) else "—",
                   "modelled step s": f"{r.pred_step_s:.3f}" if ok else "—",
                   "measured step s": f"{r.step_time_s:.3f}" if ok else "—"})
report.write_table(pd.DataFrame(checks), f"{EXPERIMENT}_choices",
                   title="What each memory budget chose, against the fastest measured plan that fits",
                   notes=[report.provenance(budgets),
                          ("The chosen plan's tokens/s is that of its own job; the fastest fitting plan's, of the "
                          "fastest other job of the same sweep (a hand-set plan, or another budget's choice) whose "
                          "measured peak fits the budget; chosen ÷ fastest above 1: faster than all of them. "
                          "A plan named <plan>+keepK keeps K of <plan>'s checkpointed blocks. Modelled step: the "
                          "planner's step-time model (FLOPs at the rates profiled on the model cut to one block, "
                          "copies laid out block by block). Model's own pick: the plan the step-time model put "
                          "first; timed: the shortlist it timed on the whole model before choosing "
                          "(`train.plan_trials`; — where the job did not).")])

# %%
models = list(hand["model"].unique())
fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 4.6), squeeze=False)
if not models:
    axes[0][0].text(0.5, 0.5, "(no rows)", ha="center", va="center")
    report.save_figure(fig, EXPERIMENT, rows=pd.concat([hand, budgets]))
else:
    for ax, model in zip(axes[0], models):
        g = hand[hand["model"] == model]
        for method, marker in (("lora", "o"), ("lorafa", "s")):
            m = g[g["method"] == method].sort_values("mem_peak_gib")
            if m.empty:
                continue
            front, best = [], -1.0
            for r in m.itertuples(index=False):  # the Pareto front: faster than every smaller plan
                if r.tokens_per_s > best:
                    front.append(r)
                    best = r.tokens_per_s
            pts = ax.scatter(m["mem_peak_gib"], m["tokens_per_s"], marker=marker, alpha=0.6,
                             label=report.method_label(method))
            ax.step([r.mem_peak_gib for r in front], [r.tokens_per_s for r in front], where="post",
                    color=pts.get_facecolor()[0], alpha=0.8)
            for r in m.itertuples(index=False):
                ax.annotate(r.plan_name, (r.mem_peak_gib, r.tokens_per_s), fontsize=6, alpha=0.7,
                            xytext=(3, 2), textcoords="offset points")
            chosen = budgets[(budgets["model"] == model) & (budgets["method"] == method) & (budgets["status"] == "ok")]
            ax.scatter(chosen["mem_peak_gib"], chosen["tokens_per_s"], marker="*", s=160, facecolors="none",
                       edgecolors=pts.get_facecolor()[0], linewidths=1.2,
                       label=f"{report.method_label(method)}: chosen by a budget")
        for b in sorted(budgets[budgets["model"] == model]["budget_gib"].unique()):
            ax.axvline(b, color="grey", ls="--", lw=0.8)
            ax.text(b, ax.get_ylim()[0], f" {b:g} GiB", fontsize=7, color="grey", rotation=90, va="bottom")
        device = ", ".join(sorted(g["device"].dropna().astype(str).unique()))
        ax.set_title(f"{model}, {shape(g)}, eager, random-init weights\n{device}", fontsize=9)
        ax.set_xlabel("measured peak GiB")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Memory plans: peak vs tokens/s (the step line: each method's Pareto front; stars: chosen by a "
                 "budget, dashed: the budgets)", fontsize=10)
    fig.tight_layout()
    report.save_figure(fig, EXPERIMENT, rows=pd.concat([hand, budgets]))
