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
# # Checks on the memory plans: repeats, the in-flight bound, compiled blocks
# Rows of `results/memory_plan_checks_h200.parquet` and `_h100.parquet` (jobs of `experiments/memory_budget.yaml`,
# `experiment` set to `memory_plan_checks`, the check in `check`; the commands are in `results/README.md`): one
# plan's speed over repeated processes, the offload plans' peak and speed at three in-flight bounds, and
# checkpointing and offloading with compiled blocks beside eager, a budget's plan under a device cap with the
# allocator's segments fixed and expandable (`docs/memory_plans.md`).

# %%
import json

import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "memory_plan_checks"
loaded = report.load(P.results)
frame = report.rows(loaded, EXPERIMENT, ok_only=False)
frame = frame.assign(**{c: frame.get(c)  # (a table without these rows lacks their columns)
                        for c in ("check", "plan_name", "budget_gib", "host_offload_gib", "compile_mode", "config")
                        }).copy()  # (copied: one block, not one a column added)
ok = frame[frame["status"] == "ok"]


def label(r) -> str:
    """The plan as the sweep named it: a budget's choice says so."""
    return f"{r.budget_gib:g} GiB budget → {r.plan_name}" if pd.notna(r.budget_gib) else r.plan_name


def bound(config: str) -> float:
    return float(json.loads(config)["method"].get("offload_inflight_mib", 512))


def checked(name: str, *columns: str, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows of one check (of `ok`, or `rows`), with `columns` present where the loaded tables lack them."""
    rows = ok if rows is None else rows
    picked = rows[rows["check"] == name]
    return picked.assign(**{c: picked.get(c) for c in columns})


def error(r) -> str:
    return f"{100 * (r.pred_mem_peak_gib / r.mem_peak_gib - 1):+.3f}"


PREDICTED = ["model", "method", "plan", "peak GiB", "predicted GiB", "error %"]


def predicted(r) -> dict:
    """A row's plan, its measured and predicted peak and the error: the first columns of a prediction table."""
    return {"model": r.model, "method": r.method, "plan": label(r), "peak GiB": f"{r.mem_peak_gib:.3f}",
            "predicted GiB": f"{r.pred_mem_peak_gib:.3f}", "error %": error(r)}


def devices(rows: pd.DataFrame) -> str:
    return ", ".join(sorted(set(rows["device"].astype(str))))


def write(table: pd.DataFrame, name: str, title: str, note: str, rows: pd.DataFrame) -> pd.DataFrame:
    """`table` written as `memory_plan_checks_<name>`, its note and the provenance of `rows` under it."""
    report.write_table(table, f"{EXPERIMENT}_{name}", title=title, notes=[note, report.provenance(rows)])
    return table


# %%
rep = ok[ok["check"] == "repeat"]
lines = []
for (model, method, name), g in rep.assign(shown=[label(r) for r in rep.itertuples()]).groupby(
        ["model", "method", "shown"], sort=False):
    speeds = g.sort_values("seed")["tokens_per_s"]
    lines.append({"model": model, "method": method, "plan": name, "peak GiB": f"{g['mem_peak_gib'].max():.2f}",
                  "tokens/s by process": " / ".join(f"{v:,.0f}" for v in speeds),
                  "median": f"{speeds.median():,.0f}", "max ÷ min": f"{speeds.max() / speeds.min():.2f}"})
repeat = pd.DataFrame(lines)
report.write_table(repeat, f"{EXPERIMENT}_repeat",
                   title="One plan's speed over repeated processes (roberta-large 32×128, eager, H200)",
                   notes=[("Each process (seed = process) ran these jobs in this order, then elementwise again; that "
                           "job's row shares its configuration with the first elementwise one's, so the table keeps "
                           "one."),
                          report.provenance(rep)])
repeat

# %%
inf = ok[ok["check"] == "inflight_bound"]
inf = inf.assign(bound=[bound(c) for c in inf["config"]])
inflight = pd.DataFrame([{"model": r.model, "method": r.method, "plan": r.plan_name,
                          "offload_inflight_mib": f"{r.bound:g}", "peak GiB": f"{r.mem_peak_gib:.3f}",
                          "predicted GiB": f"{r.pred_mem_peak_gib:.3f}", "error %": error(r),
                          "host GiB": f"{r.host_offload_gib:.2f}", "tokens/s": f"{r.tokens_per_s:,.0f}"}
                         for r in inf.sort_values(["plan_name", "bound"], ascending=[True, False]).itertuples()])
report.write_table(inflight, f"{EXPERIMENT}_inflight",
                   title="Offload plans at three in-flight bounds, copies held to the bound (eager, H200)",
                   notes=["error %: predicted ÷ measured peak − 1.", report.provenance(inf)])
inflight

# %%
comp = frame[frame["check"].isin(["offload_compiled", "compiled_references", "budget_compiled", "compiled_pair"])]
compiled = pd.DataFrame([{"model": r.model, "method": r.method, "plan": r.plan_name,
                          "budget GiB": "—" if pd.isna(r.budget_gib) else f"{r.budget_gib:g}",
                          "train.compile": r.compile_mode,
                          "run": f"{r.check} ({str(r.git_sha)[:7]})", "status": r.status,
                          "peak GiB": f"{r.mem_peak_gib:.2f}" if r.status == "ok" else "—",
                          "error %": error(r) if r.status == "ok" else "—",
                          "tokens/s": f"{r.tokens_per_s:,.0f}" if r.status == "ok" else "—"}
                         for r in comp.sort_values(["plan_name", "method", "compile_mode"]).itertuples()])
report.write_table(compiled, f"{EXPERIMENT}_compiled",
                   title="Checkpointing and offloading with compiled blocks beside eager (llama-7b 8×1024, H200)",
                   notes=[("train.compile=blocks compiles each transformer block (inductor); none: eager. A run is "
                           "one device call; offload_compiled and compiled_references ran one after the other on "
                           "one machine. budget_compiled: a budget job with compiled blocks (its shortlist timed "
                           "compiled) beside full checkpointing compiled, in one run; compiled_pair: full "
                           "checkpointing and that budget's choice set by hand, both methods, in one later run."),
                          report.provenance(comp)])
compiled

# %%
# The prediction dry-runs one training step after making the optimizer's state directly (it used to run two):
# each one-step prediction beside the two-step one of the same plan in results/memory_budget.parquet.
def plan_key(r) -> tuple:
    """A row's model, method, plan and budget (None for a hand-set plan)."""
    return r.model, r.method, r.plan_name, None if pd.isna(r.budget_gib) else float(r.budget_gib)


one = ok[ok["check"] == "one_step_prediction"]
earlier = {}  # each plan's first ok row of results/memory_budget.parquet (or none, where it is not loaded)
for r in report.rows(loaded, "memory_budget").itertuples():
    earlier.setdefault(plan_key(r), r)
lines = []
for r in one.itertuples():
    before = earlier.get(plan_key(r))
    lines.append({"model": r.model, "method": r.method, "plan": label(r), "peak GiB": f"{r.mem_peak_gib:.3f}",
                  "predicted GiB": f"{r.pred_mem_peak_gib:.3f}", "error %": error(r),
                  "two-step prediction": "—" if before is None else
                  ("the same, to the byte" if before.pred_mem_peak_gib == r.pred_mem_peak_gib
                   else f"{before.pred_mem_peak_gib:.4f} ({str(before.git_sha)[:7]})"),
                  "predicting s": "—" if pd.isna(r.plan_predict_s) else f"{r.plan_predict_s:.0f}",
                  "tokens/s": f"{r.tokens_per_s:,.0f}"})
one_step = pd.DataFrame(lines, columns=["model", "method", "plan", "peak GiB", "predicted GiB", "error %",
                                        "two-step prediction", "predicting s", "tokens/s"])
report.write_table(one_step, f"{EXPERIMENT}_one_step",
                   title="The prediction with one dry-run step, on the GPU (llama-7b 8×1024, eager, H200)",
                   notes=[("error %: predicted ÷ measured peak − 1. Two-step prediction: the same plan's row in "
                           "results/memory_budget.parquet, predicted with two dry-run steps at an earlier commit "
                           "(— where the table has none). Predicting s: the seconds a budget job spent predicting "
                           "its candidates (`plan_predict_s`)."),
                          report.provenance(one)])
one_step

# %%
# A budget's plan on a smaller card: with the caching allocator's segments of fixed size and expandable
# (`train.expandable_segments`; auto turns them on for a job with a budget or a cap), uncapped and under a cap of
# the device's memory (`train.device_memory_gib`) — what the allocator held beside what the plan allocated.
seg = checked("expandable_segments", "device_memory_gib", "expandable_segments", "mem_reserved_gib", rows=frame)
reference = seg[(seg["status"] == "ok") & seg["budget_gib"].isna() & (seg["plan_name"] == "all")]
base = {(r.model, r.git_sha): r.tokens_per_s for r in reference.itertuples() if r.method == "lora"}
segments = pd.DataFrame([{"model": r.model, "method": r.method, "plan": label(r),
                          "device cap GiB": "—" if pd.isna(r.device_memory_gib) else f"{r.device_memory_gib:g}",
                          "expandable segments": "yes" if r.expandable_segments is True else "no",
                          "status": r.status, "peak GiB": f"{r.mem_peak_gib:.2f}",
                          "reserved GiB": f"{r.mem_reserved_gib:.2f}",
                          "tokens/s": f"{r.tokens_per_s:,.0f}" if r.status == "ok" else "—",
                          "÷ LoRA all": f"{r.tokens_per_s / base[(r.model, r.git_sha)]:.2f}"
                          if r.status == "ok" and (r.model, r.git_sha) in base else "—"}
                         for r in seg.itertuples()],
                        columns=["model", "method", "plan", "device cap GiB", "expandable segments", "status",
                                 "peak GiB", "reserved GiB", "tokens/s", "÷ LoRA all"])
write(segments, "segments",
      title=("A budget's plan under a device cap, the allocator's segments fixed or expandable "
             f"(llama-7b 8×1024, eager, {devices(seg)})"),
      note=("Rows in the order run, one device call. peak: the most allocated; reserved: the most the "
            "caching allocator held from the device (`mem_reserved_gib`); the budget bounds the first, a "
            "card the second. A capped job's allocator may hold at most the cap (a card with that "
            "much free); an oom row's peak is how far it got. ÷ LoRA all: tokens/s over LoRA with "
            "full checkpointing in the same call."), rows=seg)

# %%
# A budget bounds the evaluations too: the same plan's job evaluating 4 and 64 rows a forward under the 19.02 GiB
# budget (which evaluates at most a training micro-batch: `eval_batch_size`) and, hand-set without a budget, 64 —
# the evaluations' own peak (`alloc_eval_peak_gib`) beside the training step's (`mem_peak_gib`).
ev = checked("eval_batch", "eval_batch_size", "alloc_eval_peak_gib")
evals = pd.DataFrame([{"model": r.model, "method": r.method, "plan": label(r),
                       "train.eval_batch_size": f"{json.loads(r.config)['train']['eval_batch_size']}",
                       "rows a forward": f"{r.eval_batch_size:.0f}", "step peak GiB": f"{r.mem_peak_gib:.2f}",
                       "eval peak GiB": f"{r.alloc_eval_peak_gib:.2f}",
                       "within the budget": "—" if pd.isna(r.budget_gib) else
                       ("yes" if max(r.mem_peak_gib, r.alloc_eval_peak_gib) <= r.budget_gib else "no")}
                      for r in ev.itertuples()],
                     columns=["model", "method", "plan", "train.eval_batch_size", "rows a forward", "step peak GiB",
                              "eval peak GiB", "within the budget"])
write(evals, "eval",
      title=("A budget job's evaluations beside its steps (llama-7b 8×1024, 64 eval examples of 1,024 "
             f"tokens, LoRA-FA, fused LM loss, eager, {devices(ev)})"),
      note=("Rows in the order run, three device calls on one machine. eval peak: the most "
            "allocated while evaluating, the LM loss taken without its logits; the hand-set row runs "
            "the plan the budget chose, without a budget."), rows=ev)

# %%
# The fused LM loss at T5 (`model.fused_loss`): the same job with it and with transformers' loss, full
# checkpointing, where the loss holds most of what a step keeps.
t5 = checked("fused_loss_t5", "fused_loss", "alloc_eval_peak_gib")
t5_loss = pd.DataFrame([{"model": r.model, "method": r.method, "plan": label(r),
                         "LM loss": "fused" if r.fused_loss is True else "transformers'",
                         "peak GiB": f"{r.mem_peak_gib:.3f}", "predicted GiB": f"{r.pred_mem_peak_gib:.3f}",
                         "error %": error(r), "activations GiB": f"{r.mem_activations_gib:.2f}",
                         "eval peak GiB": f"{r.alloc_eval_peak_gib:.2f}", "tokens/s": f"{r.tokens_per_s:,.0f}",
                         "eval loss": f"{r.eval_loss:.5f}"} for r in t5.itertuples()],
                       columns=["model", "method", "plan", "LM loss", "peak GiB", "predicted GiB", "error %",
                                "activations GiB", "eval peak GiB", "tokens/s", "eval loss"])
write(t5_loss, "t5_loss",
      title=("The fused LM loss at T5 (t5-large 16×512, targets 512 tokens, r = 8, bf16, random init, eager, "
             f"{devices(t5)})"),
      note=("One device call, one process: the fused job, then transformers' loss. error %: "
            "predicted ÷ measured peak − 1; eval peak: the most allocated while evaluating."), rows=t5)

# %%
# A budget below LoRA's full checkpointing (16 GiB at llama-7b 8×1024): the plan it chose, its peak against the
# prediction, where choosing spent its seconds, and — in a later call — both methods' choices beside LoRA `all`.
small = pd.concat([checked(name, "plan_predict_s", "plan_profile_s", "plan_trials_s", "plan_predictions_read")
                   .assign(call=call) for call, name in ((1, "budget_16"), (2, "budget_16_side_by_side"))])


def over_lora_all(r) -> str:
    """tokens/s over LoRA `all` of the same call ('' where that call ran none)."""
    base = small[(small["call"] == r.call) & (small["method"] == "lora") & (small["plan_name"] == "all")
                 & small["budget_gib"].isna()]
    return f"{r.tokens_per_s / base['tokens_per_s'].iloc[0]:.3f}" if len(base) else ""


def choosing(r) -> dict:
    """A budget job's seconds choosing, in all and by part (empty for a hand-set plan)."""
    parts = (r.plan_predict_s, r.plan_profile_s, r.plan_trials_s)
    if pd.isna(r.plan_predict_s):
        return {"chose in s": "", "predicting / profiling / trials s": "", "predictions read": ""}
    return {"chose in s": f"{sum(parts):.0f}", "predicting / profiling / trials s": " / ".join(f"{p:.0f}" for p in parts),
            "predictions read": f"{r.plan_predictions_read:.0f}"}


budget16 = pd.DataFrame([{"call": r.call, **predicted(r), "host GiB": f"{r.host_offload_gib:.2f}",
                          "tokens/s": f"{r.tokens_per_s:,.0f}", "× LoRA all": over_lora_all(r), **choosing(r)}
                         for r in small.itertuples()],
                        columns=["call", *PREDICTED, "host GiB", "tokens/s", "× LoRA all", "chose in s",
                                 "predicting / profiling / trials s", "predictions read"])
write(budget16, "budget16",
      title=f"A 16 GiB budget at llama-7b 8×1024 (fused LM loss, eager, {devices(small)})",
      note=("Two device calls on two machines of that kind. Call 1: LoRA-FA's budget job alone. Call 2, one commit, "
            "in this order: LoRA `all` (full checkpointing), LoRA's and LoRA-FA's 16 GiB budget jobs. "
            "× LoRA all: tokens/s over LoRA `all` of the same call. host GiB: saved tensors offloaded to the host "
            "a step (`host_offload_gib`); frozen weights on the host are apart. Predicting ran in 8 worker "
            "processes; predictions read: of the 13 plans', those read from disk, kept there by an earlier job."),
      rows=small)

# %%
# Which saved tensors an offloaded block sends (`method.offload_ops`): all, or only its linear layers' outputs —
# the same two plans with each, back to back in one process.
ops = checked("offload_ops", "config").assign(
    offload_ops=lambda f: [json.loads(c)["method"].get("offload_ops", "all") for c in f["config"]])
offload_ops = pd.DataFrame([{"offload_ops": r.offload_ops, **predicted(r), "host GiB": f"{r.host_offload_gib:.2f}",
                             "tokens/s": f"{r.tokens_per_s:,.0f}"} for r in ops.itertuples()],
                           columns=["offload_ops", *PREDICTED, "host GiB", "tokens/s"])
write(offload_ops, "offload_ops",
      title=("Offloading all saved tensors or only linear outputs (llama-7b 8×1024, LoRA-FA, fused LM "
             f"loss, eager, {devices(ops)})"),
      note=("One device call, one process, in the order shown. host GiB: saved tensors offloaded a "
            "step."), rows=ops)

# %%
# Decoders' label-word scoring (classification by the likeliest label words) before and after it ran the LM head
# at the positions it reads only: the same job, a 256k vocabulary, 64 eval rows a forward.
ls = checked("label_scoring", "eval_batch_size", "alloc_eval_peak_gib", "eval_accuracy")
label_scoring = pd.DataFrame([{"model": r.model, "vocabulary": f"{json.loads(r.config)['model']['arch']['vocab_size']:,}",
                               "commit": str(r.git_sha)[:7], "rows a forward": f"{r.eval_batch_size:.0f}",
                               "weights GiB": f"{r.mem_weights_gib:.2f}", "step peak GiB": f"{r.mem_peak_gib:.2f}",
                               "eval peak GiB": f"{r.alloc_eval_peak_gib:.2f}", "eval accuracy": f"{r.eval_accuracy:.4f}",
                               "eval loss": f"{r.eval_loss:.5f}"} for r in ls.itertuples()],
                             columns=["model", "vocabulary", "commit", "rows a forward", "weights GiB",
                                      "step peak GiB", "eval peak GiB", "eval accuracy", "eval loss"])
write(label_scoring, "label_scoring",
      title=("Label-word scoring's evaluation peak (tiny-llama, movie_polarity, 256 eval sentences, "
             f"LoRA-FA, eager, {devices(ls)})"),
      note=("One device call, a process a job: the head at the read positions only, then the "
            "earlier code (`lorafa/` as at its commit), whose forwards made each label's whole logits "
            "(rows × length × vocabulary). eval peak: the most allocated while evaluating."), rows=ls)
