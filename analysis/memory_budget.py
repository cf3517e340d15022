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
# chosen plan fits and is within 5 % of the fastest other measured plan that fits (hand-set, or another budget's);
# where the sweep ran several passes (`seed=0,1,2`), each plan's speed is the median of its jobs.

# %%
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lorafa import plans, report
from lorafa.checks import BadInput
from lorafa.memory import Prediction

P = report.params()
EXPERIMENT = "memory_budget"


def by_loss(rows: pd.DataFrame) -> pd.DataFrame:
    """At a model whose rows ran both LM losses, those that ran the fused one (`fused_loss`; rows without the column
    ran transformers') as a method of their own, `<method>+fused_loss`: a plan's peak and speed depend on the loss,
    so every table, check and figure below compares plans of one loss. A model whose rows all ran one loss keeps
    its method names."""
    if rows.empty:
        return rows
    fused = report.ran_fused_loss(rows)
    both = fused.groupby(rows["model"]).transform("nunique") > 1
    return rows.assign(method=rows["method"].where(~(fused & both), rows["method"].astype(str) + "+fused_loss"))


frame = by_loss(report.rows(report.load(P.results), EXPERIMENT, ok_only=False))
frame = frame.copy().assign(**{col: float("nan") if col != "plan_name" else "" for col in
                         ("budget_gib", "plan_name", "host_offload_gib", "host_weights_gib", "pred_host_weights_gib")
                         if col not in frame})
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
    weights = r.pred_host_weights_gib if pd.notna(r.pred_host_weights_gib) else 0.0
    pred = Prediction(0, 0, 0, 0, 0, host_offload=r.pred_host_offload_gib * 2**30, host_weights=weights * 2**30,
                      flops=r.pred_step_tflop * 1e12, flops_forward=r.pred_forward_tflop * 1e12)
    plain = float((same_hand["pred_step_tflop"] - same_hand["pred_forward_tflop"]).min()) * 1e12
    return plans.step_seconds(pred, rates, line, plain, plans.block_modes(plan, line))


def _host(r) -> str:
    """Host memory a plan holds: saved tensors, and frozen weights where it moves them (`+ … weights`)."""
    acts = r.host_offload_gib if pd.notna(r.host_offload_gib) else 0.0
    weights = r.host_weights_gib if pd.notna(r.host_weights_gib) else 0.0
    if not acts and not weights:
        return "—"
    return f"{acts:.1f}" + (f" + {weights:.1f} weights" if weights else "")


lines = []
for (model, method), g in hand.groupby(["model", "method"], sort=False):
    base = g[g["plan_name"] == "all"]["tokens_per_s"]
    base = float(base.median()) if len(base) else float("nan")
    same_budgets = budgets[(budgets["model"] == model) & (budgets["method"] == method)]
    # one line per plan: its first job's columns, with tokens/s and step time the median of its jobs (several
    # passes: `seed=0,1,2`) and its peak the largest
    first = g.groupby("plan_name", sort=False).head(1).set_index("plan_name").copy()  # not the fragmented frame
    per_plan = g.groupby("plan_name", sort=False)
    first = first.assign(tokens_per_s=per_plan["tokens_per_s"].median(), step_time_s=per_plan["step_time_s"].median(),
                         mem_peak_gib=per_plan["mem_peak_gib"].max(), jobs=per_plan.size()).reset_index()
    for r in first.sort_values("mem_peak_gib", ascending=False).itertuples(index=False):
        err = 100 * (r.pred_mem_peak_gib / r.mem_peak_gib - 1)
        step_s = modelled(r, same_budgets, g)
        lines.append({"model": model, "batch × seq": shape(g), "method": report.method_label(method),
                      "plan": r.plan_name, "jobs": r.jobs, "peak GiB": f"{r.mem_peak_gib:.2f}",
                      "predicted GiB": f"{r.pred_mem_peak_gib:.2f} ({err:+.1f} %)",
                      "host GiB": _host(r),
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
def pass_of(rows: pd.DataFrame) -> pd.Series:
    """Each row's pass of the sweep: its seed (`seed=0,1,2` repeats every plan and budget, one pass after another)."""
    return rows["seed"] if "seed" in rows else pd.Series(0, index=rows.index)


checks = []
measured = frame[frame["status"] == "ok"]
assert frame.index.is_unique  # a budget's rows are told from the others by their index
for (model, method, budget), grp in budgets.groupby(["model", "method", "budget_gib"], sort=False):
    # a budget's jobs (one per pass) against every other plan measured in the sweep (hand-set, or chosen by another
    # budget) that fits it, each plan's speed the median over its jobs
    ok_rows = grp[grp["status"] == "ok"]
    ok = len(ok_rows) == len(grp)
    # only passes that also ran the hand-set plans: a pass of budgets alone ran at another moment of the host's
    # speed than every plan it would be compared with, so its jobs count in jobs, chosen and fits, not in speed
    # (a sweep of budgets alone: each budget against the others, every pass)
    same = measured[(measured["model"] == model) & (measured["method"] == method) & ~measured.index.isin(grp.index)]
    hand_passes = set(pass_of(hand[(hand["model"] == model) & (hand["method"] == method)])) \
        or set(pass_of(same)) | set(pass_of(grp))
    same = same[pass_of(same).isin(hand_passes)]
    by_plan = same.groupby("plan_name").agg(peak=("mem_peak_gib", "max"), speed=("tokens_per_s", "median"))
    fits = by_plan[by_plan["peak"] <= budget]
    fastest = fits["speed"].idxmax() if len(fits) else None
    with_hand = pass_of(ok_rows).isin(hand_passes)
    speed = float(ok_rows.loc[with_hand, "tokens_per_s"].median()) if ok and with_hand.any() else float("nan")
    ratio = speed / fits.loc[fastest, "speed"] if fastest is not None and ok else float("nan")
    paired = []  # the budget's job ÷ the fastest plan's in the same pass (side by side)
    if fastest is not None and ok:
        theirs = same[same["plan_name"] == fastest]
        theirs = theirs["tokens_per_s"].groupby(pass_of(theirs)).median()
        paired = [t / theirs[k] for k, t in zip(pass_of(ok_rows), ok_rows["tokens_per_s"]) if k in theirs.index]
    chosen = ok_rows["plan_name"].value_counts(sort=False)
    runs = len(grp)
    checks.append({"model": model, "method": report.method_label(method), "budget GiB": f"{budget:g}",
                   "jobs": runs,
                   "chosen": ", ".join(n if k == 1 else f"{n} ×{k}" for n, k in chosen.items()) if ok
                   else ", ".join(sorted(set(grp["status"]) - {"ok"})),
                   "peak GiB": f"{ok_rows['mem_peak_gib'].max():.2f}" if ok else "—",
                   "fits": "yes" if ok and (ok_rows["mem_peak_gib"] <= budget).all() else "no",
                   "tokens/s": f"{speed:,.0f}" if not math.isnan(speed) else "—",
                   "fastest fitting (measured)": "—" if fastest is None else
                   f"{fastest} ({fits.loc[fastest, 'speed']:,.0f})",
                   "chosen ÷ fastest": "—" if math.isnan(ratio) else f"{ratio:.3f}",
                   "within 5 %": "—" if math.isnan(ratio) else ("yes" if ratio >= 0.95 else "no"),
                   "paired by pass": "—" if len(paired) < 2 else
                   f"{min(paired):.3f}–{max(paired):.3f} ({len(paired)} passes)",
                   "model's own pick": ", ".join(sorted(set(ok_rows["plan_modelled"].dropna()) - {""})) or "—"
                   if ok and "plan_modelled" in ok_rows else "—",
                   "timed (ms, fwd + bwd)": ", ".join(f"{k} {v:.0f}" for k, v in json.loads(timed).items()) or "—"
                   if ok and isinstance(timed := ok_rows.iloc[0].get("plans_timed_ms"), str) else "—",
                   "modelled step s": f"{ok_rows['pred_step_s'].median():.3f}" if ok else "—",
                   "measured step s": f"{ok_rows['step_time_s'].median():.3f}" if ok else "—"})
report.write_table(pd.DataFrame(checks), f"{EXPERIMENT}_choices",
                   title="What each memory budget chose, against the fastest measured plan that fits",
                   notes=[report.provenance(budgets),
                          ("The chosen plan's tokens/s is that of its own job — the median of its jobs where the "
                          "sweep ran several passes (`seed=0,1,2`: every plan and budget once per pass, one pass "
                          "after another), over the passes that also ran the hand-set plans (a pass of budgets alone "
                          "counts in jobs, chosen and fits, not in tokens/s); the fastest fitting plan's, of the "
                          "fastest other plan of those passes "
                          "(hand-set, or another budget's choice; the median of its jobs) whose measured peak fits "
                          "the budget; chosen ÷ fastest above 1: faster than all of them. Paired by pass: the "
                          "budget's job ÷ that plan's in the same pass, lowest–highest. "
                          "A plan named <plan>+keepK keeps K of <plan>'s checkpointed blocks. Modelled step: the "
                          "planner's step-time model (FLOPs at the rates profiled on the model cut to one block, "
                          "copies laid out block by block). Model's own pick: the plan the step-time model put "
                          "first; timed: the shortlist it timed on the whole model before choosing "
                          "(`train.plan_trials`; the first pass's; — where the job did not).")])

# %%
# The budgets' choices against the same plans timed side by side (`python -m lorafa.bench --plans`: one process,
# each plan built, warmed up and timed in turn, round after round in alternating order; tokens/s the median over
# rounds), where jobs one after another measure each plan at another moment of the host's speed.
side = by_loss(report.rows(report.load(P.results), "bench_plans"))
side_lines, side_jobs = [], []
keys = ["model", "method", "batch_size", "seq_len"]
runs = side.groupby(keys)["run_id"].transform(lambda r: r.rank(method="dense", ascending=False)) \
    if len(side) else pd.Series(dtype=float)
earlier = side[runs == 2] if len(side) else side  # each model's run before the latest: the passes judged on it too
side = side[runs == 1] if len(side) else side  # each model's latest run


def trials_of(job: pd.Series) -> str:
    """How a budget job timed its shortlist: side by side (`plans_trials_together`), raced until told apart
    (`plans_race_tolerance` recorded) or for a fixed time, or one after another with the close ones timed again
    (`plans_retimed` recorded) or once."""
    together = job.get("plans_trials_together")
    if isinstance(together, (bool, np.bool_)) and together:
        return "side by side, raced" if pd.notna(job.get("plans_race_tolerance")) else "side by side"
    return "apart, close re-timed" if isinstance(job.get("plans_retimed"), str) else "apart, once"


def judge(grp: pd.DataFrame, bench: pd.DataFrame, budget: float) -> dict:
    """A budget's chosen plans (`grp`: its jobs, every pass) against the fastest fitting plan of one bench run;
    `jobs`: each job's verdict, for the table by pass."""
    speed = bench.groupby("plan_name")["tokens_per_s"].max()  # a plan at its fastest LoRA-FA layer, if several
    sweep = measured[(measured["model"] == grp["model"].iloc[0]) & (measured["method"] == grp["method"].iloc[0])]
    peaks = sweep.groupby("plan_name")["mem_peak_gib"].max()  # a job's measured peak; else the bench's own
    peak = {p: float(peaks.get(p, bench.loc[bench["plan_name"] == p, "mem_peak_gib"].max())) for p in speed.index}
    fits = [p for p in speed.index if peak[p] <= budget]
    fastest = max(fits, key=lambda p: speed[p]) if fits else None
    chosen = list(dict.fromkeys(grp.loc[pass_of(grp).sort_values().index, "plan_name"]))  # in pass order
    ratios = {c: speed[c] / speed[fastest] if fastest is not None and c in speed.index else float("nan")
              for c in chosen}
    # each chosen plan's tokens/s ÷ the fastest fitting plan's, round by round (each pair timed in the same round)
    best_row = bench.loc[bench.groupby("plan_name")["tokens_per_s"].idxmax()].set_index("plan_name")
    rounds_of = best_row["step_time_all_s"].map(list)  # a plan's step time per round (its fastest layer's row)
    paired = {c: [f / t for f, t in zip(rounds_of[fastest], rounds_of[c])]
              if fastest is not None and c in speed.index and len(rounds_of[c]) == len(rounds_of[fastest]) else []
              for c in chosen}
    # their geometric mean and 95 % interval over rounds: within 5 % where the interval lies above 0.95, below
    # where it lies under it, unresolved where it straddles 0.95 (or one round gives no interval)
    interval = {c: report.paired_ratio(paired[c]) for c in chosen}
    verdict = {c: "not timed" if not paired[c] else "within 5 %" if lo >= 0.95 else "below 0.95" if hi < 0.95
               else "unresolved" for c, (_, lo, hi) in interval.items()}
    jobs = [{"model": job["model"], "method": job["method"], "pass": pass_of(grp)[k],
             "git_sha": job["git_sha"], "trials": trials_of(job), "run": bench["run_id"].iloc[0],
             "rounds": int(bench["rounds"].min()), "ratio": ratios[job["plan_name"]],
             "slower": bool(paired[job["plan_name"]]) and max(paired[job["plan_name"]]) < 0.95,
             "verdict": verdict[job["plan_name"]]} for k, job in grp.iterrows()]
    return {"speed": speed, "fastest": fastest, "chosen": chosen, "ratios": ratios, "paired": paired,
            "interval": interval, "verdict": verdict, "jobs": jobs}


for (model, method, budget), grp in budgets[budgets["status"] == "ok"].groupby(["model", "method", "budget_gib"],
                                                                            sort=False):
    batch, seq = int(grp["batch_size"].iloc[0]), int(grp["seq_len"].iloc[0])
    bench, before = ((rows[(rows["model"] == model) & (rows["method"] == method) & (rows["batch_size"] == batch)
                           & (rows["seq_len"] == seq)] if len(rows) else rows) for rows in (side, earlier))
    if bench.empty:
        continue
    j = judge(grp, bench, budget)
    side_jobs += j["jobs"] + (judge(grp, before, budget)["jobs"] if len(before) else [])
    speed, fastest, chosen, ratios, paired = j["speed"], j["fastest"], j["chosen"], j["ratios"], j["paired"]
    interval, verdict = j["interval"], j["verdict"]
    per_row = bench["step_time_all_s"].map(lambda t: max(t) / min(t) if len(t) else float("nan"))
    spread = per_row.groupby(bench["plan_name"]).max()  # one plan's slowest round ÷ its fastest
    side_lines.append({"model": model, "batch × seq": f"{batch} × {seq}", "method": report.method_label(method),
                       "budget GiB": f"{budget:g}", "chosen (by pass)": ", ".join(chosen),
                       "chosen, side by side": ", ".join(f"{speed[c]:,.0f}" if c in speed.index else "not timed"
                                                         for c in chosen),
                       "fastest fitting, side by side": "—" if fastest is None else
                       f"{fastest} ({speed[fastest]:,.0f})",
                       "chosen ÷ fastest": ", ".join("—" if math.isnan(r) else f"{r:.3f}" for r in ratios.values()),
                       "within 5 %": f"{sum(r >= 0.95 for r in ratios.values())} of "
                                     f"{sum(not math.isnan(r) for r in ratios.values())} timed",
                       "paired by round": ", ".join(f"{min(p):.2f}–{max(p):.2f}" if p else "—"
                                                    for p in paired.values()),
                       "below 0.95 every round": f"{sum(bool(p) and max(p) < 0.95 for p in paired.values())} of "
                                                 f"{sum(bool(p) for p in paired.values())}",
                       "paired, 95 % interval": ", ".join("—" if not paired[c] else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"
                                                          for c, (m, lo, hi) in interval.items()),
                       "interval verdict": ", ".join(verdict.values()),
                       "rounds": int(bench["rounds"].min()), "plans timed": len(speed),
                       "one plan over rounds, max ÷ min": f"{spread.median():.3f} median, {spread.max():.3f} largest"})
side_source = report.provenance(side) if len(side) else "No rows of `python -m lorafa.bench --plans`."
report.write_table(pd.DataFrame(side_lines, columns=[
                       "model", "batch × seq", "method", "budget GiB", "chosen (by pass)", "chosen, side by side",
                       "fastest fitting, side by side", "chosen ÷ fastest", "within 5 %", "paired by round",
                       "below 0.95 every round", "paired, 95 % interval", "interval verdict", "rounds",
                       "plans timed", "one plan over rounds, max ÷ min"]),
                   f"{EXPERIMENT}_side_by_side",
                   title="What each memory budget chose, against the plans timed side by side",
                   notes=[side_source,
                          ("Each plan chosen by a budget (in any pass of the sweep) and every other plan timed by "
                           "`python -m lorafa.bench --plans` in one process, interleaved: each built, warmed up and "
                           "timed for --steps optimizer steps in turn, round after round in alternating order; "
                           "tokens/s the median over rounds (the model's latest bench run, at the sweep's batch and "
                           "length). A plan fits where its measured peak in the sweep's jobs (else the bench's own) "
                           "is within the budget. Paired by round: the chosen plan's tokens/s ÷ the fastest "
                           "fitting plan's in the same round, lowest–highest; below 0.95 every round: chosen plans "
                           "slower than 0.95 × in every round. Paired, 95 % interval: the geometric mean of those "
                           "per-round ratios and its Student-t interval (on their logarithms, rounds − 1 degrees "
                           "of freedom); interval verdict: within 5 % where the whole interval is at or above "
                           "0.95, below 0.95 where all of it is under, unresolved where it straddles 0.95 (the "
                           "rounds' noise is larger than the difference). One plan over rounds: its "
                           "slowest round's step ÷ its fastest."),
                          ("Command: python experiments/memory_budget_side_by_side.py --model MODEL (every plan "
                           "the sweep's jobs ran; each method's `python -m lorafa.bench --plans` line is in its "
                           "rows' `command`).")])

# %%
# The same verdict pass by pass, on the latest bench run and the one before it: which passes' budget jobs chose plans
# that, timed side by side, are within 5 % of the fastest that fits (by how the pass's jobs timed their shortlists).
by_pass = []
for (model, method, run, k), g in pd.DataFrame(side_jobs, columns=[
        "model", "method", "pass", "git_sha", "trials", "run", "rounds", "ratio", "slower", "verdict"]).groupby(
        ["model", "method", "run", "pass"], sort=False):
    timed = g["ratio"].notna()
    by_pass.append({"model": model, "method": report.method_label(method), "side-by-side run": run,
                    "rounds": int(g["rounds"].iloc[0]), "pass (seed)": int(k),
                    "commit": ", ".join(sorted(g["git_sha"].astype(str).str[:7].unique())),
                    "trials": ", ".join(sorted(g["trials"].unique())), "budgets": len(g),
                    "chosen plan timed side by side": int(timed.sum()),
                    "within 5 %": int((g.loc[timed, "ratio"] >= 0.95).sum()),
                    "below 0.95 every round": int(g["slower"].sum()),
                    "interval: within 5 %": int((g["verdict"] == "within 5 %").sum()),
                    "interval: below 0.95": int((g["verdict"] == "below 0.95").sum()),
                    "interval: unresolved": int((g["verdict"] == "unresolved").sum()),
                    "chosen ÷ fastest": "—" if not timed.any() else
                    f"{g.loc[timed, 'ratio'].min():.3f}–{g.loc[timed, 'ratio'].max():.3f}"})
by_pass = pd.DataFrame(by_pass, columns=[
    "model", "method", "side-by-side run", "rounds", "pass (seed)", "commit", "trials", "budgets",
    "chosen plan timed side by side", "within 5 %", "below 0.95 every round", "interval: within 5 %",
    "interval: below 0.95", "interval: unresolved", "chosen ÷ fastest"])
report.write_table(by_pass.sort_values(["model", "method", "side-by-side run", "pass (seed)"],
                                       ascending=[True, True, False, True], kind="stable"),
                   f"{EXPERIMENT}_side_by_side_passes",
                   title="Each pass's budget choices, judged on the plans timed side by side",
                   notes=[side_source,
                          ("Per pass of the sweep (`seed`) and method: its budget jobs' chosen plans against the "
                           "fastest fitting plan of one `python -m lorafa.bench --plans` run — the model's latest "
                           "(the side-by-side table) and the one before it, each on the machine it ran on: how many "
                           "of the chosen plans that run timed, how many came within 5 % of the fastest, and how "
                           "many were below 0.95 × it in every round; interval: how many the paired 95 % interval "
                           "over rounds puts within 5 %, below 0.95, or neither. Trials: how the pass's jobs timed "
                           "their shortlists — side by side (`train.plan_interleave`: the plans' models built "
                           "together and timed a step each a round, each plan's median step), or one after "
                           "another, once or with the close ones timed a second time (`train.plan_retime`).")])

# %%
# How closely a budget job's trials track the side-by-side bench: each trial's time per plan against the bench's
# step of that plan, each job's mean ratio taken out (only the plans' order matters to a choice).
fidelity = []
for run, run_rows in (pd.concat([side, earlier]).groupby("run_id", sort=False) if len(side) else []):
    if "plans_trial_steps_ms" not in budgets:
        continue
    step_of = run_rows.loc[run_rows.groupby(["model", "method", "plan_name"])["tokens_per_s"].idxmax()] \
        .set_index(["model", "method", "plan_name"])["step_time_s"]
    residuals: dict = {}
    for _, job in budgets[budgets["plans_trial_steps_ms"].notna() & (budgets["status"] == "ok")].iterrows():
        stat = np.median if trials_of(job).startswith("side by side") else np.min  # (raced too: medians)
        logs = [math.log(stat([x for t in v if t for x in t]) / (1e3 * step_of[(job["model"], job["method"], plan)]))
                for plan, v in json.loads(job["plans_trial_steps_ms"]).items()
                if (job["model"], job["method"], plan) in step_of.index and any(v)]
        if len(logs) >= 2:
            residuals.setdefault((job["model"], trials_of(job)), []).append(np.array(logs) - np.mean(logs))
    for (model, how), jobs in residuals.items():
        r = np.concatenate(jobs)
        fidelity.append({"model": model, "side-by-side run": run, "trials": how, "jobs": len(jobs),
                         "plans timed": len(r), "trial ÷ bench, sd of log": round(
                             float(np.sqrt((r ** 2).sum() / (len(r) - len(jobs)))), 3)})
report.write_table(pd.DataFrame(fidelity, columns=["model", "side-by-side run", "trials", "jobs", "plans timed",
                                                   "trial ÷ bench, sd of log"]),
                   f"{EXPERIMENT}_trial_fidelity",
                   title="How closely budget jobs' trials track the plans timed side by side",
                   notes=[side_source,
                          ("Per side-by-side run (the model's latest and the one before it) and the way a pass's "
                           "jobs timed their shortlists: each job's trial time of each shortlisted plan the run "
                           "timed (its median step side by side, its fastest one after another; "
                           "`plans_trial_steps_ms`) ÷ the run's step time of that plan, on a log scale, less the "
                           "job's mean; the standard deviation over all of them (degrees of freedom: plans less "
                           "jobs). A job whose trials ranked plans exactly as the bench would have 0.")])

# %%
# How far one hand-set plan's speed moves between passes: the noise a budget's 5 % check is read against.
spread_lines = []
for (model, method), g in hand.groupby(["model", "method"], sort=False):
    per_plan = g.groupby("plan_name")["tokens_per_s"]
    repeated = per_plan.agg(["min", "max", "size"])
    repeated = repeated[repeated["size"] >= 2]
    if repeated.empty:
        continue
    ratio = repeated["max"] / repeated["min"]
    spread_lines.append({"model": model, "method": report.method_label(method),
                         "passes": int(pass_of(g).nunique()), "plans repeated": len(ratio),
                         "max ÷ min, median": f"{ratio.median():.3f}",
                         "max ÷ min, largest": f"{ratio.max():.3f} ({ratio.idxmax()})",
                         "within 5 % of itself": f"{int((ratio <= 1.05).sum())} of {len(ratio)}"})
report.write_table(pd.DataFrame(spread_lines, columns=["model", "method", "passes", "plans repeated",
                                                       "max ÷ min, median", "max ÷ min, largest",
                                                       "within 5 % of itself"]),
                   f"{EXPERIMENT}_repeats",
                   title="One hand-set plan's tokens/s over the sweep's passes: fastest job ÷ slowest",
                   notes=[report.provenance(hand),
                          ("Per model and method, the hand-set plans run in more than one pass (`seed=0,1,2`); "
                           "within 5 % of itself: its fastest job at most 1.05 × its slowest. A budget's choice is "
                           "judged within 5 % of the fastest fitting plan; where a plan is not within 5 % of "
                           "itself from pass to pass, that check is read against this spread.")])

# %%
models = list(hand["model"].unique())
fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 4.6), squeeze=False)
if not models:
    axes[0][0].text(0.5, 0.5, "(no rows)", ha="center", va="center")
    report.save_figure(fig, EXPERIMENT, rows=pd.concat([hand, budgets]))
else:
    def pareto(m: pd.DataFrame) -> list:
        """The Pareto front of plans sorted by peak: each faster than every smaller plan."""
        front, best = [], -1.0
        for r in m.itertuples(index=False):
            if r.tokens_per_s > best:
                front.append(r)
                best = r.tokens_per_s
        return front

    for ax, model in zip(axes[0], models):
        g = hand[hand["model"] == model]
        for method in sorted(set(g["method"]), key=lambda m: (m.endswith("+fused_loss"), m)):
            marker = "o" if method.split("+")[0] == "lora" else "s"  # LoRA's plans circles, LoRA-FA's squares
            m = g[g["method"] == method]
            # one point per plan: its peak and the median of its jobs' tokens/s (several passes: `seed=0,1,2`)
            m = m.groupby("plan_name", as_index=False).agg(mem_peak_gib=("mem_peak_gib", "max"),
                                                           tokens_per_s=("tokens_per_s", "median"))
            m = m.sort_values("mem_peak_gib")
            front = pareto(m)
            pts = ax.scatter(m["mem_peak_gib"], m["tokens_per_s"], marker=marker, alpha=0.6,
                             label=report.method_label(method))
            ax.step([r.mem_peak_gib for r in front], [r.tokens_per_s for r in front], where="post",
                    color=pts.get_facecolor()[0], alpha=0.8)
            for r in front:  # the front's plans named (every plan: the table above)
                ax.annotate(r.plan_name, (r.mem_peak_gib, r.tokens_per_s), fontsize=6, alpha=0.7,
                            xytext=(3, 2), textcoords="offset points")
            chosen = budgets[(budgets["model"] == model) & (budgets["method"] == method) & (budgets["status"] == "ok")]
            chosen = chosen[pass_of(chosen).isin(set(pass_of(g[g["method"] == method])))]  # as the choices table
            chosen = chosen.groupby("budget_gib").agg(mem_peak_gib=("mem_peak_gib", "max"),
                                                      tokens_per_s=("tokens_per_s", "median"))
            ax.scatter(chosen["mem_peak_gib"], chosen["tokens_per_s"], marker="*", s=160, facecolors="none",
                       edgecolors=pts.get_facecolor()[0], linewidths=1.2,
                       label=f"{report.method_label(method)}: chosen by a budget")
        # the fused LM loss's measurements where the sweep has none of its own: the plans of the latest side-by-side
        # run (diamonds) and its budget jobs (stars)
        fused_side = side[(side["model"] == model) & side["method"].str.endswith("+fused_loss")] if len(side) else side
        fused_jobs = budgets[(budgets["model"] == model) & budgets["method"].str.endswith("+fused_loss")
                             & (budgets["status"] == "ok")]
        for method in sorted((set(fused_side["method"]) | set(fused_jobs["method"])) - set(g["method"])):
            m = fused_side[fused_side["method"] == method]
            m = m.loc[m.groupby("plan_name")["tokens_per_s"].idxmax()] if len(m) else m
            pts = ax.scatter(m["mem_peak_gib"], m["tokens_per_s"], marker="D", alpha=0.8,
                             label=f"{report.method_label(method)}, side by side")
            for r in pareto(m.sort_values("mem_peak_gib")):
                ax.annotate(r.plan_name, (r.mem_peak_gib, r.tokens_per_s), fontsize=6, alpha=0.7,
                            xytext=(3, -7), textcoords="offset points")
            jobs = fused_jobs[fused_jobs["method"] == method]
            if len(jobs):
                ax.scatter(jobs["mem_peak_gib"], jobs["tokens_per_s"], marker="*", s=160, facecolors="none",
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
    fig.suptitle("Memory plans: peak vs tokens/s (the step line: each method's Pareto front, its plans named; stars: "
                 "chosen by a budget, dashed: the budgets)", fontsize=10)
    fig.tight_layout()
    report.save_figure(fig, EXPERIMENT, rows=pd.concat([hand, budgets]))
