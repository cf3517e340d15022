"""One job, top to bottom: config → data → model + method → train and evaluate, measured → one result row.

`run(cfg)` is what `run.py` calls under Hydra and what the tests call with a composed config. Faults (out of
memory, a diverged loss, any other exception) end as a row with a status and the error, not as an exception, so a
sweep keeps going and its table is still written. Bad input (`lorafa.checks.BadInput`: a value out of range, a
missing or malformed data file, a model directory that is not one, the hub out of reach) is not a result: it
leaves `run` as the exception, before any row is written.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import (
    adapters,
    checks,
    distributed,
    loss,
    measure,
    memory,
    methods,
    mmlu,
    models,
    plans,
    protocols,
    results,
    step,
    tasks,
)
from .checks import BadInput
from .distributed import SINGLE, Dist
from .train import Diverged, EvalSet, autocast_dtype, eval_batch_size, evaluate, fit, frozen_weight_dtype, total_steps

log = logging.getLogger(__name__)
TRACEBACK_FILE = "traceback.txt"
MMLU_FILE = "mmlu_subjects.json"  # instruction tasks: per-subject MMLU accuracy, beside the row


# transformers.set_seed does this (and cuda.manual_seed_all, which torch.manual_seed covers), but it lives in
# transformers.trainer_utils, whose import pulls in PEFT: seconds of every process's start (`train.linear_schedule`)
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def identity(cfg: DictConfig, d: Dist = SINGLE) -> dict:
    """The columns that say which job a row is, known before anything runs."""
    return {"experiment": cfg.get("experiment") or "", "model": models.alias_of(cfg.model),
            "family": cfg.model.get("family") or "", "method": cfg.method.name, "task": cfg.task.name,
            "metric": str(cfg.task.main_metric),
            "seed": int(cfg.seed), "rank": int(cfg.method.rank),
            "alpha": float(cfg.method.alpha), "dropout": float(cfg.method.dropout),
            "gradient_checkpointing": plans.parse(cfg.method.get("gradient_checkpointing", False))[0] != "none",
            "plan": plans.describe(cfg.method),
            "recompute": str(cfg.method.get("recompute", "none")),
            "batch_size": int(cfg.train.batch_size), "grad_accum": int(cfg.train.grad_accum),
            "seq_len": int(cfg.task.max_seq_len), "lr": protocols.lr_of(cfg), "init": cfg.model.init,
            "b_lr_ratio": float(cfg.method.get("b_lr_ratio", 1.0)), "init_a": str(cfg.method.get("init_a", "kaiming")),
            "precondition_b": bool(cfg.method.get("precondition_b", False)),
            "precision": cfg.train.precision, "strategy": d.strategy, "world_size": d.world_size,
            "adapter": str(cfg.model.get("adapter") or ""),  # a PEFT adapter loaded before training (model.adapter)
            "quantize": str(cfg.model.get("quantize") or "none"),  # the blocks' linear layers in nf4 / int8
            # `train.device_memory_gib`: the GiB of the device the job's allocator could hold (a capped job's column)
            **({} if cfg.train.get("device_memory_gib") is None
               else {"device_memory_gib": float(cfg.train.device_memory_gib)}),
            **protocols.columns(cfg)}


def _release(err: BaseException) -> None:
    """Clear the locals of the failed job's frames (its model, optimizer, batches, activations). The exception can
    outlive the job — whatever keeps it (a logger, a debugger; pytorch/pytorch#82218 reports an OOM in backward
    whose memory stays) keeps its frames, and they hold the whole job: the next job of the sweep would count it in
    its memory. (The leak a real CUDA OOM showed was another: see `measure.kept`.)"""
    traceback.clear_frames(err.__traceback__)


def run(cfg: DictConfig) -> dict:
    """Run one job and write its row to `cfg.output_dir/result.parquet`; returns the row."""
    started = time.perf_counter()
    checks.check_config(cfg)  # bad values: refused before anything is built or written
    results.git_state()  # pin the commit now: the tree may change while a long sweep runs
    d, device = distributed.setup(str(cfg.train.get("strategy") or "single"), str(cfg.device),
                                  float(cfg.train.get("dist_timeout_s") or 600))
    out_dir = distributed.settle_output_dir(cfg.output_dir, d)  # under torchrun: rank 0's job directory
    if str(out_dir) != str(cfg.output_dir):
        cfg.output_dir = str(out_dir)
    done = results.finished_row(out_dir, cfg)
    if done is not None:  # a rerun sweep: this job's row is already there
        log.info("skipped: %s already holds this job's row (status %s, config %s)", out_dir / results.ROW_FILE,
                 done["status"], done["config_hash"])
        return done
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / TRACEBACK_FILE).unlink(missing_ok=True)  # a rerun of a failed job starts clean
    row = {**identity(cfg, d), "status": "ok", "error": ""}
    if device.type == "cuda":  # what ran before in this process (an earlier job, a bench) leaves nothing allocated
        measure.settle(device)
    memory_split = measure.Memory()
    cap = device_cap(device, cfg.train.get("device_memory_gib"))
    segments = expandable_segments(device, cfg.train)
    try:
        with segments as expandable, cap:
            if expandable is not None:
                row["expandable_segments"] = expandable
            row.update(_train_and_evaluate(cfg, device, memory_split, row, d))
    except BadInput:
        raise  # not a result: no row
    except Diverged as err:
        row.update(status="diverged", error=str(err))
        _release(err)
    except torch.cuda.OutOfMemoryError as err:
        row.update(status="oom", error=str(err).splitlines()[0])
        if device.type == "cuda":  # how far it got
            memory_split.allocator["peak"] = torch.cuda.max_memory_allocated(device)
            memory_split.allocator["reserved"] = torch.cuda.max_memory_reserved(device)
            row["mem_at_failure_gib"] = torch.cuda.memory_allocated(device) / measure.GIB
        _release(err)
    except Exception as err:  # noqa: BLE001 - an expected failure is a row, the traceback a file beside it
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
        if d.is_main:
            (out_dir / TRACEBACK_FILE).write_text(traceback.format_exc())
        log.error("job failed: %s", row["error"])
        _release(err)
    # under torchrun: every process reaches these two collectives, whatever its job did (outside collectives)
    row["status"], row["error"] = distributed.agree(row["status"], row["error"], d)
    if row["status"] != "ok":
        row.update(memory_split.columns())  # what was measured before the failure
        for k in memory.PARTS:
            row.setdefault(f"pred_mem_{k}_gib", float("nan"))
    if d.enabled:
        row.update(distributed.job_memory(memory_split.columns(), d))
    row.update(results.provenance(cfg, device))
    row["wall_time_s"] = time.perf_counter() - started
    if d.is_main:  # process 0 writes the job's row
        results.write_row(row, out_dir)
    # every process: the next job of a sweep runs in this process, so hand back what this one held (the model's
    # reference cycles included); a process that kept it would report it as the next job's memory. On CPU the
    # memory columns count tensors, not the allocator: one collection (0.4 s) is enough there
    if device.type == "cuda":
        measure.settle(device)
    else:
        gc.collect()
    if not d.is_main:
        return row
    log.info("%s × %s × %s: %s %s=%.4g | activations %.3f GiB, peak %.3f GiB | %.0f tokens/s | %s",
             row["model"], row["method"], row["task"], row["status"], row["metric"], row.get("score", float("nan")),
             row.get("mem_activations_gib", float("nan")), row.get("mem_peak_gib", float("nan")),
             row.get("tokens_per_s", float("nan")), out_dir / results.ROW_FILE)
    over = reserved_over_budget(row)
    if over:
        log.warning(over)
    return row


_CAPS: dict = {}  # CUDA device index → bytes its allocator may hold (`train.device_memory_gib`), while a job runs


@contextlib.contextmanager
def device_cap(device: torch.device, gib):
    """`train.device_memory_gib`: while the job runs, the caching allocator of this process may hold at most `gib`
    GiB of `device` (`torch.cuda.set_per_process_memory_fraction`), as on a card with that much free beside the
    CUDA context; more is an out-of-memory error, a row with status oom. It checks, on a larger card, that a job
    (a budget's plan) fits the card you have. None: no cap. Refused (bad input) off CUDA or above the device's
    memory."""
    if gib is None:
        yield
        return
    if device.type != "cuda":
        raise BadInput(f"train.device_memory_gib={gib}: caps a CUDA device's memory, and the job runs on "
                       f"{device.type}; expected null")
    total = torch.cuda.get_device_properties(device).total_memory
    if float(gib) * measure.GIB > total:
        raise BadInput(f"train.device_memory_gib={gib}: above the device's {total / measure.GIB:.2f} GiB; expected "
                       "at most that")
    index = _index(device)  # (the setter takes an index or a device that names one: not plain "cuda")
    torch.cuda.set_per_process_memory_fraction(float(gib) * measure.GIB / total, index)
    _CAPS[index] = float(gib) * measure.GIB
    try:
        yield
    finally:
        _CAPS.pop(index, None)
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def _allocator_env() -> bool | None:
    """What the environment (`PYTORCH_ALLOC_CONF`, or its older name `PYTORCH_CUDA_ALLOC_CONF`) sets the caching
    allocator's `expandable_segments` to, or None where it does not name it."""
    for var in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        for part in (os.environ.get(var) or "").split(","):
            key, _, value = part.partition(":")
            if key.strip() == "expandable_segments":
                return value.strip().lower() == "true"
    return None


def wants_expandable(train: DictConfig, env: bool | None) -> bool:
    """`train.expandable_segments`: whether a CUDA job's caching allocator maps its blocks into segments that grow
    (PyTorch's `expandable_segments`) — true, false, or auto: on for a job that must fit a number
    (`train.memory_budget_gib` or `train.device_memory_gib`) unless the environment says otherwise (`env`), else
    as the environment says (off where it says nothing). Fixed-size segments leave free pieces no larger request
    can use: at llama-7b a 20.6 GiB budget's plan (20.3 GiB allocated at its peak) ran out of memory under a 22 GiB
    cap with 2.3–3.5 GiB of the allocator's blocks free, and ran within it with expandable segments."""
    value = train.get("expandable_segments", "auto")
    if str(value) != "auto":
        return bool(value)
    if env is not None:
        return env
    return train.get("memory_budget_gib") is not None or train.get("device_memory_gib") is not None


@contextlib.contextmanager
def expandable_segments(device: torch.device, train: DictConfig):
    """While the job runs, its CUDA caching allocator's `expandable_segments` as `wants_expandable` says; back to the
    environment's after (the next job of a sweep runs in this process). Yields the setting (the row's
    `expandable_segments`), None off CUDA. Blocks already mapped keep their kind; the job starts after
    `measure.settle` gave them back."""
    if device.type != "cuda":
        yield None
        return
    env = _allocator_env()
    before = bool(env)
    want = wants_expandable(train, env)
    if want != before:
        _set_expandable(want)
    try:
        yield want
    finally:
        if want != before:
            measure.settle(device)  # this job's segments given back before the setting changes back
            _set_expandable(before)


def _set_expandable(on: bool) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(f"expandable_segments:{on}")


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def reserved_over_budget(row: dict) -> str | None:
    """A budget job, run without a cap (`train.device_memory_gib`), whose caching allocator held more of the device
    than its budget (`mem_reserved_gib` above `budget_gib`): the budget bounds the allocated peak, and whether the
    job fits a card of the budget's size the held bytes do not tell (the allocator gives back the segments no
    tensor uses before it runs out of memory; a fragmented segment's free pieces it keeps). A line saying how to
    find out; None otherwise (within it, under a cap, no budget, or not measured)."""
    budget, reserved = row.get("budget_gib"), row.get("mem_reserved_gib")
    if budget is None or reserved is None or math.isnan(float(budget)) or math.isnan(float(reserved)) \
            or reserved <= budget or (row.get("device_memory_gib") is not None
                                      and not math.isnan(float(row["device_memory_gib"]))):
        return None
    return (f"train.memory_budget_gib={budget:g}: the job allocated at most {row['mem_peak_gib']:.2f} GiB, within the "
            f"budget, and the allocator held up to {reserved:.2f} GiB of the device (its rounding and cached blocks, "
            f"which it partly gives back before running out of memory); whether the job fits a card with "
            f"{budget:g} GiB free, a run with train.device_memory_gib={budget:g} tells")


def _split_metric(cfg: DictConfig) -> str:
    """The main metric without an eval split's suffix (MNLI's `accuracy_m` → `accuracy`): its name on one split."""
    metric = str(cfg.task.main_metric)
    for key in cfg.task.get("eval_splits") or {}:
        if metric.endswith(f"_{key}"):
            return metric[: -len(key) - 1]
    return metric


def _predict(cfg: DictConfig, device: torch.device, family: str, num_labels: int,
             features: list[dict], layer) -> memory.Prediction:
    """`lorafa.memory.predict` for this job, with the LoRA-FA layer it runs (`layer`: what a selective
    checkpoint keeps depends on it). T5 targets: the longest training target (the measured steps use shorter ones
    when the batch has no longest target)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the dry run draws seeds
        cfg, device, kwargs = _predict_request(cfg, device, family, num_labels, features, layer)
        return memory.predict_job(cfg, device, **kwargs)


def _predict_request(cfg: DictConfig, device: torch.device, family: str, num_labels: int, features: list[dict],
                     layer) -> tuple:
    """`_predict`'s arguments to `lorafa.memory.predict_job`: (cfg, device, keyword arguments)."""
    target_len = None
    if family == "encoder-decoder":
        target_len = int(cfg.task.get("target_len") or 0) if cfg.task.get("kind") == "synthetic" else 0
        target_len = target_len or max(len(f["labels"]) for f in features)
    return cfg, device, {"num_labels": num_labels, "target_len": target_len,
                         "amp": autocast_dtype(cfg.train.precision, device),
                         "frozen_dtype": frozen_weight_dtype(cfg.train, device), "stacked": layer}


def _n_blocks(config, family: str) -> int:
    return (int(config.num_layers) + int(config.num_decoder_layers) if family == "encoder-decoder"
            else int(config.num_hidden_layers))


def _with_plan(cfg: DictConfig, plan: plans.Plan, row: dict, d: Dist, **columns) -> DictConfig:
    """The job's config with `plan`'s method keys; the row's identity columns the plan changes derived as for any
    job, its name and `columns` added."""
    chosen = OmegaConf.merge(cfg, {"method": plan.keys()})
    planned = identity(chosen, d)
    row.update({k: planned[k] for k in ("plan", "gradient_checkpointing", "recompute")}, plan_name=plan.name,
               **columns)
    return chosen


def _named_plan(cfg: DictConfig, device: torch.device, config, family: str, row: dict, d: Dist) -> DictConfig:
    """`train.plan=NAME`: the job's config with that plan's method keys (`lorafa.plans.candidates`)."""
    plan = plans.named(str(cfg.train.plan), _n_blocks(config, family), offload=device.type == "cuda")
    return _with_plan(cfg, plan, row, d)


PLAN_WORKERS_MIN_S = 2.0  # auto: a first prediction this slow makes the rest in worker processes at once


def _plan_workers(setting, first_s: float) -> int:
    """`train.plan_workers`: how many processes a budget predicts its plans in. auto: as many as
    `lorafa.memory.workers` gives where the first prediction took `PLAN_WORKERS_MIN_S` or more (a worker's start,
    importing torch and transformers, costs seconds: a tiny model's predictions are quicker made here), else 1."""
    if str(setting) == "auto" or setting is None:
        return memory.workers(None, 1 << 30) if first_s >= PLAN_WORKERS_MIN_S else 1
    return int(setting)


def _plan_for_budget(cfg: DictConfig, device: torch.device, config, family: str, num_labels: int,
                     features: list[dict], row: dict, d: Dist) -> DictConfig:
    """`train.memory_budget_gib`: the job's config with the plan (`lorafa.plans`) that is fastest by the step-time
    model among those whose predicted peak fits the budget — chosen before anything is built, logged, and named in
    the row (`plan`, `plan_name`, `budget_gib`, `plans_considered`, `plans_fitting`, `pred_step_s`)."""
    budget = float(cfg.train.memory_budget_gib)
    budget_bytes = budget * measure.GIB
    label = f"train.memory_budget_gib={cfg.train.memory_budget_gib}"
    if d.enabled:
        raise BadInput(f"{label}: plans are chosen for one process; expected train.strategy=single")
    steps = total_steps(len(features), cfg.train, d)
    n_blocks = _n_blocks(config, family)
    lines, layers, run_modes = {}, {}, {}
    made: dict = {}  # every plan predicted, in the order predicted (equal plans once, under the first name)

    def setting(plan: plans.Plan) -> tuple:
        """The job's config with the plan's method keys, the `train.compile` mode the job would run it in
        (`lorafa.step.resolve_mode`) and its LoRA-FA layer."""
        trial = OmegaConf.merge(cfg, {"method": plan.keys()})
        mode = step.resolve_mode(trial, device, steps)[0]
        return trial, mode, _layer(trial, features, config, mode, device)

    def predict(plan: plans.Plan):
        """The plan's prediction (None where this model cannot take it); its timeline, layer and mode noted."""
        try:
            trial, mode, layer = setting(plan)
            pred = _predict(trial, device, family, num_labels, features, layer)
        except Exception as err:  # noqa: BLE001 - a plan this model cannot take is not a candidate
            log.info("plan %s: not predicted (%s: %s)", plans.describe(OmegaConf.merge(cfg, {"method": plan.keys()}).method),
                     type(err).__name__, err)
            return None
        lines[plan] = plans.timeline(trial.method, n_blocks)
        layers[plan.name] = layer
        run_modes[plan.name] = mode
        made.setdefault(plan, pred)
        return pred

    started = time.perf_counter()  # where choosing takes its time: predicting, profiling, trials (columns)
    read_before = memory.READ_FROM_DISK[0]  # predictions an earlier process kept (`lorafa.memory.cache_dir`)
    candidates = plans.candidates(n_blocks, offload=device.type == "cuda")
    trials = int(cfg.train.get("plan_trials", 0) or 0)
    log.info("%s: choosing among %d plans — predicting each on fake tensors, profiling the device%s", label,
             len(candidates), f", then timing up to {trials} on the whole model" if trials else "")
    options = [(candidates[0], predict(candidates[0]))]
    # the rest in worker processes at once (`train.plan_workers`; auto: where one took long enough to pay for them)
    n_workers = _plan_workers(cfg.train.get("plan_workers", "auto"), time.perf_counter() - started)

    def prefetch(todo: list, pool=None) -> None:
        """`todo`'s predictions made in `n_workers` processes at once (those of `pool`, where given), for `predict`
        to find made."""
        if n_workers < 2:
            return
        requests = []
        for plan in todo:
            try:
                trial, _, layer = setting(plan)
                requests.append(_predict_request(trial, device, family, num_labels, features, layer))
            except Exception:  # noqa: BLE001, S112 - `predict` meets it again, and says so
                continue
        memory.prefetch(requests, n_workers, pool)

    prefetch(candidates[1:])
    options += [(plan, predict(plan)) for plan in candidates[1:]]
    # (CPU: host = device, nothing to offload to)
    predicted = time.perf_counter()
    read = memory.READ_FROM_DISK[0] - read_before
    log.info("%s: %d plans predicted in %.0f s%s%s; profiling the device", label, len(options), predicted - started,
             f" ({n_workers} processes)" if n_workers > 1 else "",
             f" ({read} read from {memory.cache_dir()}, kept there by an earlier job)" if read else "")
    plain: dict = {}  # the plain one-block step, profiled once: its rates, and mode "none" of the block modes
    rates = plans.measure_rates(device, profile=lambda: _profile(cfg, device, num_labels, features,
                                                                 layers.get("none", "false"), held=plain),
                                modes=lambda: _profile_modes(cfg, device, num_labels, features, layers, plain))
    _collect(device)  # the profiles' models (`_let_go`)
    profiled = time.perf_counter()
    try:
        fitting = plans.ranked(options, budget_bytes, rates, label, lines)
    except BadInput:
        if device.type != "cuda":
            raise
        fitting = []  # (none fits as it is; with weights on the host, some may)
    short = plans.shortlist(fitting, trials) if fitting else []
    # the room each shortlisted plan leaves under the budget, spent on keeping checkpointed blocks; ranked again
    # (the plans' searches in step, each round's predictions made in worker processes at once; the workers gone
    # before the trials use the device)
    with memory.worker_pool(n_workers) as pool:
        def ahead(todo: list) -> None:
            prefetch(todo, pool)

        filled = plans.fill_many([(plan, pred, lines[plan]) for _, plan, pred in short], budget_bytes, predict,
                                 ahead)
        tried = []
        if device.type == "cuda":  # with the first blocks' frozen weights on the host: more room to keep blocks
            # (of the shortlisted plans, those the budget left checkpointing blocks: the others have nothing to keep)
            short_left = [plan for (_, plan, _), (kept, _) in zip(short, filled) if lines[kept].checkpointed]
            ahead([plans.weights_away(plan, e) for plan in short_left
                   for e in plans.weight_counts(n_blocks, bool(plan.offload))])
            more, tried = plans.fill_weights_away(options, short_left, n_blocks, budget_bytes, predict, lines, ahead)
            filled += more
    if not filled:  # bad input: the smallest predicted peak, weights away included
        plans.ranked(options + tried, budget_bytes, rates, label, lines)
    # ranked again, and the first `trials` of them timed (with weights away up to twice as many were filled: at
    # llama-7b eight whole-model trials, too many to hold side by side, one after another took minutes)
    plain = plans.plain_backward(options)
    short = plans.shortlist(plans.ranked(plans.distinct(filled, [plan for plan, _ in options]), budget_bytes, rates,
                                         label, lines, plain), trials)
    filled_at = time.perf_counter()
    # every plan predicted, with its modelled step: the trade-off on this model and device, in the log and the row
    table = plans.predicted(made.items(), rates, lines, plain)
    log.info("%s: %d plans predicted (peak GiB, modelled step s; * fits):\n%s", label, len(table),
             plans.format_predicted(table, budget_bytes))
    modes = {p.name: run_modes[p.name] for _, p, _ in short} if len(short) > 1 else {}
    log.info("%s: profiled in %.0f s; %d plans fit once blocks are kept (%.0f s)%s", label, profiled - predicted,
             len(short), filled_at - profiled,
             f"; timing {', '.join(p.name for _, p, _ in short)} on the whole model" if modes else "")

    trial_s = float(cfg.train.plan_trial_s)
    trial_steps: dict = {}  # plan name → each of its trials' timed steps (seconds; None: the trial failed)
    # all the shortlisted plans' models on the device at once, timed in alternation, where their predicted peaks
    # fit in what the device has free (with a tenth to spare); else one after another
    together = bool(modes) and bool(cfg.train.plan_interleave) \
        and sum(pred.peak for _, _, pred in short) <= 0.9 * _room(device)
    # side by side, a race past `plan_trial_s` up to `plan_trial_max_s` of steps a plan (`plans.race`)
    race_s = float(cfg.train.get("plan_trial_max_s", 0.0) or 0.0)
    race_s = race_s if together and race_s > trial_s else None
    oom_side_by_side: list = []  # the plans that ran out of memory side by side
    if together:  # each plan's time: its median step (the steps alternate: the host's drift is shared)
        got = _trials_together(cfg, device, num_labels, features, layers, [p for _, p, _ in short], modes, trial_s,
                               most_s=race_s, short_of_memory=oom_side_by_side)
        if oom_side_by_side:  # the predicted peaks fit, the allocator's blocks of several models at once did not
            log.warning("%s: side by side, %s ran out of memory (%d whole models on the device at once); timing the "
                        "plans one after another", label, ", ".join(oom_side_by_side), len(short))
            together, race_s = False, None
    if together:
        trial_steps = {name: [t] for name, t in got.items()}
        timed = {name: None if not t else float(np.median(t)) for name, t in got.items()}
        # those the race stopped (medians over fewer, earlier rounds: not comparable with the others') and those
        # its test shows slower over every round
        slower = plans.shown_slower(got, plans.TRIAL_TOLERANCE)
        retimed = []
    else:
        def trial(p: plans.Plan) -> None:
            trial_steps.setdefault(p.name, []).append(
                _trial(cfg, device, num_labels, features, layers.get(p.name, "false"), p, mode=modes[p.name],
                       seconds=trial_s))

        def fastest(name: str) -> float | None:  # its fastest timed step over its trials (a slow host only adds)
            return min((min(t) for t in trial_steps[name] if t), default=None)

        for _, p, _ in short if modes else []:
            trial(p)
        retimed = plans.to_retime(short, {n: fastest(n) for n in trial_steps},
                                  float(cfg.train.get("plan_retime", 0.0) or 0.0))
        by_name = {p.name: p for _, p, _ in short}
        for name in retimed:  # a second pass, in reverse order, over the plans the first could not tell apart
            trial(by_name[name])
        timed = {n: fastest(n) for n in trial_steps}
        slower = []
    if modes and not together:  # the trials' models one after another (`_let_go`; side by side: settled there)
        measure.settle(device)
    trials_s = time.perf_counter() - filled_at
    plan, pred, seconds = plans.pick_timed(short, {n: t for n, t in timed.items() if n not in slower})
    predict_s = (predicted - started) + (filled_at - profiled)
    fit_away = sum(p is not None and p.peak <= budget_bytes for _, p in tried)
    chosen = _with_plan(cfg, plan, row, d, budget_gib=budget, plans_considered=len(options) + len(tried),
                        plans_fitting=len(fitting) + fit_away, plan_modelled=short[0][1].name,
                        plans_timed_ms=json.dumps({k: None if v is None else round(1e3 * v, 3)
                                                   for k, v in timed.items()}),
                        plans_timed_modes=json.dumps(modes), plans_retimed=json.dumps(retimed),
                        plans_trials_together=together,
                        plans_oom_side_by_side=json.dumps(oom_side_by_side),
                        plans_race_tolerance=math.nan if race_s is None else plans.TRIAL_TOLERANCE,
                        plans_shown_slower=json.dumps(slower),
                        plans_trial_steps_ms=json.dumps({k: [None if t is None else [round(1e3 * x, 3) for x in t]
                                                             for t in v] for k, v in trial_steps.items()}),
                        plans_predicted=json.dumps({name: [round(peak / measure.GIB, 6), round(s, 4)]
                                                    for name, (peak, s) in table.items()}),
                        pred_step_s=seconds, plan_predict_s=predict_s,
                        plan_predictions_read=memory.READ_FROM_DISK[0] - read_before,
                        plan_profile_s=profiled - predicted,
                        plan_trials_s=trials_s, copy_gib_per_s=rates.copy_bytes / measure.GIB,
                        matmul_tflop_per_s=rates.matmul_flops / 1e12, fwd_tflop_per_s=(rates.forward_flops or math.nan) / 1e12,
                        bwd_tflop_per_s=(rates.backward_flops or math.nan) / 1e12,
                        block_extra_ms=json.dumps({m: [round(1e3 * f, 3), round(1e3 * b, 3)]
                                                   for m, (f, b) in (rates.block_extra or {}).items()}))
    timed_text = ("; timed together, median step: " if together else "; timed ") \
        + ", ".join(f"{k} {'failed' if v is None else f'{v:.3g} s'}" for k, v in timed.items()) \
        + (f"; timed again, best kept: {', '.join(retimed)}" if retimed else "") \
        + (f"; shown slower: {', '.join(slower)}" if slower else "") if timed else ""
    away = f", {len(tried)} of them with frozen weights on the host" if tried else ""
    log.info("%s: plan %s '%s' — predicted peak %.4g GiB, modelled step %.3g s (%d plans considered%s, %d fit%s); "
             "chosen in %.0f s (predicting %.0f s, profiling %.0f s, trials %.0f s)",
             label, plan.name, row["plan"], pred.peak / measure.GIB, seconds, row["plans_considered"], away,
             row["plans_fitting"], timed_text, time.perf_counter() - started, predict_s, profiled - predicted,
             trials_s)
    return chosen


def _trial(cfg: DictConfig, device: torch.device, num_labels: int, features: list[dict], layer: str,
           plan: plans.Plan, mode: str, seconds: float) -> list[float] | None:
    """The seconds of each forward and backward of the job's whole model under `plan` timed after a warm-up
    (`_profile`: at least 3 steps and `seconds` of them, at most 20; no optimizer step: it is the same under every
    plan), its blocks compiled where the job would run the plan in a compiled mode (`mode`; compiled in the
    warm-up), or None where it fails (a warning)."""
    try:
        steps: list = []
        _profile(cfg, device, num_labels, features, layer, plan=plan, blocks=None, mode=mode, seconds=seconds,
                 steps=steps)
        return [f_s + b_s for f_s, b_s in steps]
    except Exception as err:  # noqa: BLE001 - a plan that cannot be timed is left out of the choice
        log.warning("plan %s: trial failed (%s); not chosen", plan.name, _said(err))
        _release(err)  # its frames hold the trial's model and activations
        return None
    finally:  # the trial's model gone before the next is built (compiled: dynamo's cache holds it too)
        if device.type == "cuda" and mode != "none":
            measure.settle(device)
        else:
            _let_go(device)


def _trials_together(cfg: DictConfig, device: torch.device, num_labels: int, features: list[dict], layers: dict,
                     short: list, modes: dict, seconds: float, most_s: float | None = None,
                     short_of_memory: list | None = None) -> dict:
    """{plan name: each timed step's seconds (forward and backward), or None where it failed (a warning)}: the job's
    whole model under each of the `short` plans (`_timing_model`, in the mode the job would run it, warmed up by one
    step), all of them on the device at once, their steps timed in alternation (`plans.interleave`: at least 3
    rounds and `seconds` of steps per plan, at most 20). `most_s`: then a race (`plans.race`) until the plans are
    told apart, or each one still running has had `most_s` of steps (at most 200 rounds). `short_of_memory` gets
    the plans that ran out of device memory: the caller times them again, one after another."""
    built, out = {}, {}

    def failed(name, err):
        if isinstance(err, torch.cuda.OutOfMemoryError) and short_of_memory is not None:
            short_of_memory.append(name)
        log.warning("plan %s: trial failed (%s); not chosen", name, _said(err))
        built.pop(name, None)
        _release(err)
        _let_go(device)  # (not `measure.settle`: the plans still racing keep their compiled code)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            def build(plan):  # (in a function of its own: no local of this one holds the last model built)
                net, batch, amp = _timing_model(cfg, device, num_labels, features, layers.get(plan.name, "false"),
                                                plan, None, modes[plan.name])
                built[plan.name] = (net, plans.step_timer(net.model, batch, device, amp))
                built[plan.name][1]()  # the warm-up (and compiling, in a compiled mode)

            for plan in short:
                try:
                    build(plan)
                except Exception as err:  # noqa: BLE001 - a plan that cannot be timed is left out of the choice
                    failed(plan.name, err)
            # (looked up each step: a plan that fails mid-way is let go at once, its memory with it)
            timers = {name: (lambda n=name: sum(built[n][1]())) for name in built}
            race = {} if most_s is None else {"tolerance": plans.TRIAL_TOLERANCE, "most_seconds": most_s,
                                              "most": plans.RACE_ROUNDS}
            out.update(plans.interleave(timers, seconds, on_error=failed, **race))
        finally:
            built.clear()
            measure.settle(device)
    return {plan.name: out.get(plan.name) for plan in short}


def _said(err: BaseException) -> str:
    """The failure as text for a log line: a record that kept the exception itself (a handler that holds records,
    as pytest's does) would keep its traceback, whose frames hold their functions and so the closures over the
    failed trial's model."""
    return f"{type(err).__name__}: {err}"


def _collect(device: torch.device) -> None:
    """Hand back what dropped timing models held. A model with its method applied is a web of reference cycles
    (hooks, checkpointed blocks): `del` frees none of it, only a collection does. Trials that merely dropped their
    models kept them all: at llama-7b on an 80 GB card the fifth whole-model trial ran out of memory with four
    earlier models (54 GiB) still allocated, and the job after them too."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _let_go(device: torch.device) -> None:
    """After one profile or trial: on CUDA `_collect` now, the device's memory being what the next model needs;
    on the host once a phase (after the profiles, after the trials), a collection costing more there than a small
    model's whole profile."""
    if device.type == "cuda":
        _collect(device)


def _room(device: torch.device) -> float:
    """Bytes this process could still take on `device`: the device's free memory and what torch's allocator holds
    unused (CUDA), or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        room = float(free + torch.cuda.memory_reserved(device) - allocated)
        cap = _CAPS.get(_index(device))  # `train.device_memory_gib`: what the cap leaves
        return room if cap is None else min(room, cap - allocated)
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _profile_modes(cfg: DictConfig, device: torch.device, num_labels: int, features: list[dict],
                   layers: dict, plain: dict) -> dict:
    """{block mode: (forward seconds, backward seconds, bytes offloaded)}: `_profile` of this job's model cut to one
    block in each mode a plan puts a block in (`lorafa.plans.BLOCK_MODES`, the one-block model's candidates;
    offloading only where the device is not the host), each with the LoRA-FA layer its plan would run; per block
    (an encoder-decoder's one-block model has an encoder and a decoder block: their mean). Mode "none" is the
    plain profile already made (`plain`, as `_profile` fills `held`), where there is one."""
    out = {}
    for plan in plans.candidates(1, offload=device.type == "cuda"):
        held = plain if plan.name == "none" and "times" in plain else {}
        if "times" not in held:
            _profile(cfg, device, num_labels, features, layers.get(plan.name, "false"), plan=plan, held=held)
        _, f_s, _, b_s = held["times"]
        k = held["blocks"]  # an encoder-decoder cut to one block has two (one of each): their mean, per block
        out[plan.name] = (f_s / k, b_s / k, held["host_bytes"] / k)
    return out


def _timing_model(cfg: DictConfig, device: torch.device, num_labels: int, features: list[dict], layer: str,
                  plan: plans.Plan | None, blocks: int | None, mode: str) -> tuple:
    """(net, batch, autocast dtype): this job's model cut to `blocks` blocks (`models.build(blocks=)`; None: the
    whole model), random init, its method applied as the job would apply it with nothing recomputed or offloaded
    (or as `plan` says), its blocks compiled where `mode` compiles (`compile_blocks`), and a batch of the job's
    shape (the predictor's batch: `batch_size` × `task.max_seq_len`, full length) — what `_profile` and the trials
    time. Build it under `torch.random.fork_rng`: the job's own random stream is left as it was."""
    applied = OmegaConf.merge(cfg, {"method": (plan or plans.Plan()).keys()})
    dtype = getattr(torch, cfg.model.get("dtype") or "float32")
    frozen_dtype = frozen_weight_dtype(cfg.train, device)
    built, train_dtype = methods.build_dtypes(applied.method, frozen_dtype, dtype, cfg.model.get("quantize"))
    net = models.build(cfg.model, num_labels=num_labels, device=device, dtype=built, blocks=blocks,
                       weights=False)  # the architecture, random init: speed needs no weights
    methods.apply(net, applied.method, cfg.model.get("target_modules"), frozen_dtype=frozen_dtype, stacked=layer,
                  train_dtype=train_dtype)
    compile_blocks(net.model, cfg.train, mode)
    net.model.train()
    target_len = None
    if net.family == "encoder-decoder":
        target_len = int(cfg.task.get("target_len") or 0) if cfg.task.get("kind") == "synthetic" else 0
        target_len = target_len or max(len(f["labels"]) for f in features)
    batch = memory._batch(net.family, int(cfg.train.batch_size), int(cfg.task.max_seq_len), target_len,
                          num_labels, device)
    return net, batch, autocast_dtype(cfg.train.precision, device)


def _profile(cfg: DictConfig, device: torch.device, num_labels: int, features: list[dict], layer: str,
             plan: plans.Plan | None = None, held: dict | None = None, blocks: int | None = 1,
             mode: str = "none", seconds: float = 0.25, steps: list | None = None) -> tuple:
    """`lorafa.plans.profile_step` of `_timing_model` (by default cut to one block; `blocks=None`: the whole
    model), timed for at least `seconds` (`steps`: gets each timed step's forward and backward seconds); `plan`:
    timed only (no FLOPs counted). `held` gets the result (`times`), the model's blocks and the bytes it
    offloaded."""
    net = batch = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            net, batch, amp = _timing_model(cfg, device, num_labels, features, layer, plan, blocks, mode)
            times = plans.profile_step(net.model, batch, device, amp, count=plan is None, seconds=seconds,
                                       steps=steps)
            if held is not None:
                held.update(times=times, blocks=len(plans.checkpoint_layers(net.model)),
                            host_bytes=plans.host_bytes(net.model))
            return times
        finally:
            del net, batch
            _let_go(device)


def _prediction(cfg: DictConfig, device: torch.device, net, num_labels: int, features: list[dict],
                layer) -> dict:
    """`lorafa.memory.predict` for this job (pred_mem_*_gib), made before training starts. A failed prediction is
    NaN columns and `pred_error`, never a failed job."""
    try:
        pred = _predict(cfg, device, net.family, num_labels, features, layer)
        return {**pred.columns(), "pred_error": ""}
    except Exception as err:  # noqa: BLE001 - a prediction is a side product: the job goes on
        log.warning("memory prediction failed: %s: %s", type(err).__name__, err)
        return {**{f"pred_mem_{k}_gib": float("nan") for k in memory.PARTS},
                "pred_error": f"{type(err).__name__}: {err}"}


def compile_blocks(model: torch.nn.Module, tcfg: DictConfig, mode: str) -> int:
    """Compiled modes (`blocks`, `graph`: `lorafa.step`): torch.compile each transformer block in place (regional
    compilation: the identical blocks share one compiled graph, so it takes seconds, not minutes; LoRA-FA's layers
    compile with no graph break), one static variant per batch shape. Evaluation runs these blocks eager
    (`train.evaluate`): generation and changing shapes would recompile them. Returns the number of blocks
    compiled."""
    if mode not in step.COMPILED:
        return 0
    step.compile_limits()
    blocks = distributed.transformer_blocks(model)
    for block in blocks:
        block.compile(backend=str(tcfg.get("compile_backend", "inductor")))
    return len(blocks)


def _layer(cfg: DictConfig, features: list[dict], config, mode: str, device: torch.device) -> str:
    """`method.stacked`, with auto resolved (`lorafa.step.choose_layer`) from the job's typical step: batch_size
    rows of the median bucketed training length."""
    value = str(cfg.method.get("stacked", False)).lower()
    if value != "auto":
        return value
    lengths = sorted(features.lengths if hasattr(features, "lengths")  # tasks.Encoded: one column; a Stream: none
                     else (len(f["input_ids"]) for f in features)) or [int(cfg.task.max_seq_len)]
    max_len = int(cfg.task.max_seq_len)
    typical = step.bucket_length(lengths[len(lengths) // 2], step.bucket_multiple(cfg.train, max_len, mode), max_len)
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "d_model", 0) or 0)
    return step.choose_layer(cfg.method, device, int(cfg.train.batch_size) * typical, hidden)


def _layer_ran(model: torch.nn.Module) -> str:
    """The LoRA-FA layer the adapted layers really run (`two_matmul`, `stacked`, `merged`, or `mixed` where they
    differ), read from the layers themselves rather than from the config that asked for it."""
    kinds = {"merged" if layer._merged else "stacked" if layer._stack_ok else "two_matmul"
             for layer in adapters.lora_layers(model).values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _train_and_evaluate(cfg: DictConfig, device: torch.device, mem: measure.Memory, row: dict,
                        d: Dist = SINGLE) -> dict:
    """Returns the result columns; fills `mem` and `row` as facts become known, so a failure keeps them."""
    seed_everything(int(cfg.seed))
    tasks.check_streaming(cfg)  # task.streaming=true: what a stream cannot do is refused before anything is read
    data = tasks.load_data(cfg.task)
    row["dropped_rows"] = data.dropped_rows  # empty texts or labels left out of the data files (a warning said so)
    if data.kind == "instruction":
        mmlu.check_source(cfg.task)  # scored after training: refuse now if it could not be
    tokenizer = None if data.kind == "synthetic" else models.load_tokenizer(cfg.model)
    dtype = getattr(torch, cfg.model.get("dtype") or "float32")
    if data.kind == "instruction" and cfg.task.get("mmlu_max_length"):
        mmlu.check_max_length(cfg.task, tokenizer)  # an explicit length that would cut 0-shot prompts: refused now
    config = models.load_config(cfg.model)  # before building: a 7B model takes a while to refuse
    family = models.detect_family(config)
    checks.check_positions(cfg, config, family)
    adapter = None
    if cfg.model.get("adapter"):  # a PEFT LoRA adapter: its rank, alpha, dropout and layers replace the method's
        adapter = adapters.read_peft(str(cfg.model.adapter), config=config, family=family)
        cfg = OmegaConf.merge(cfg, {"method": adapter.method_keys()})  # the row keeps the user's config and hash
        row.update(rank=adapter.rank, alpha=adapter.alpha, dropout=adapter.dropout)
    poser = tasks.poser_for(family, data, cfg.task, tokenizer, vocab_size=config.vocab_size,
                            seed=int(cfg.seed))
    pad_id = tokenizer.pad_token_id if tokenizer is not None else (config.pad_token_id or 0)
    if data.kind == "synthetic":
        train_features = poser.make(int(cfg.task.num_train), offset=0)
        evalsets = [EvalSet("synthetic", poser.make(int(cfg.task.num_eval), offset=1), None)]
    else:
        train_features = poser.stream(data.splits["train"], tasks.stream_examples(cfg.train, d.world_size),
                                      int(cfg.seed)) if data.streaming else poser.encode(data.splits["train"])
        evalsets = [EvalSet(name, poser.encode(data.splits[name]), data.splits[name]["label"].to_numpy())
                    for name in cfg.task.eval_splits]
    if cfg.train.get("memory_budget_gib") is not None:  # the plan is chosen now; the user's config keeps its hash
        cfg = _plan_for_budget(cfg, device, config, family, data.num_labels, train_features, row, d)
    elif cfg.train.get("plan"):  # a named plan: its method keys
        cfg = _named_plan(cfg, device, config, family, row, d)
    # train.compile: none | blocks | graph | eager_graph (auto: a graph where exact, compiled for long jobs)
    mode, why = step.resolve_mode(cfg, device, total_steps(len(train_features), cfg.train, d))
    row.update(compile_mode=mode, compile_reason=why)
    layer = _layer(cfg, train_features, config, mode, device)
    frozen_dtype = frozen_weight_dtype(cfg.train, device)
    built, train_dtype = methods.build_dtypes(cfg.method, frozen_dtype, dtype, cfg.model.get("quantize"))
    net = models.build(cfg.model, num_labels=data.num_labels, device=device, dtype=built, tokenizer=tokenizer)
    applied = methods.apply(net, cfg.method, cfg.model.get("target_modules"), frozen_dtype=frozen_dtype,
                            stacked=layer, adapter=adapter, train_dtype=train_dtype)
    row.update(family=net.family, fused_loss=loss.active(net.model), trainable_params=applied.trainable_params,
               total_params=applied.total_params,
               adapted_layers=len(applied.targets), checkpointed_blocks=applied.checkpointed_blocks,
               layer=_layer_ran(net.model) if applied.targets and not (cfg.method.train_a or cfg.method.train_base)
               else "none",
               frozen_dtype=str(frozen_dtype or dtype).removeprefix("torch.")
               if applied.total_params > applied.trainable_params else "none")
    compiled = compile_blocks(net.model, cfg.train, mode)
    row["compiled_blocks"] = compiled
    wrapped = distributed.wrap(net.model, d, device)  # FSDP shards net.model in place
    mem.weights = measure.weight_bytes(net.model)
    if device.type == "cuda":
        mem.allocator["build"] = torch.cuda.memory_allocated(device)

    heldout = None
    if tasks.HOLDOUT in data.splits:  # task.holdout: the slice of train a protocol selects on (scored after training)
        frame = data.splits[tasks.HOLDOUT]
        heldout = EvalSet(tasks.HOLDOUT, poser.encode(frame),
                          frame["label"].to_numpy() if "label" in frame else None)
        row.update(heldout_examples=len(frame), selection_split=f"{tasks.HOLDOUT}: {len(frame)} of "
                   f"{len(frame) + len(data.splits['train'])} train examples (task.holdout={cfg.task.holdout})")
    if data.kind in ("classification", "regression", "translation"):  # inputs (or targets) the eval could not see whole
        row["eval_truncated"] = sum(poser.truncated(data.splits[name]) for name in cfg.task.eval_splits)
        if row["eval_truncated"]:
            log.warning("%d eval examples were cut to task.max_seq_len=%s (or target_len) tokens: eval_truncated",
                        row["eval_truncated"], cfg.task.max_seq_len)
    if d.enabled:  # the prediction models one process holding the whole job
        row.update({**{f"pred_mem_{k}_gib": float("nan") for k in memory.PARTS},
                    "pred_error": f"not predicted under train.strategy={d.strategy}"})
    else:
        row.update(_prediction(cfg, device, net, data.num_labels, train_features, layer))
        gc.collect()  # the dry run's garbage, collected now rather than inside a timed step
    throughput = measure.Throughput(device, int(cfg.train.measure_warmup_steps))
    info: dict = {}
    history = fit(net.model, poser, train_features, evalsets, cfg=cfg, device=device, pad_id=pad_id,
                  memory=mem, throughput=throughput, dist=d, wrapped=wrapped, mode=mode, info=info)
    row.update(info)

    if cfg.train.get("save_adapter") and applied.targets:
        row["adapter_dir"] = str(adapters.save_peft(net.model, Path(cfg.output_dir) / "adapter", family=net.family,
                                                    base_model=models.source_of(cfg.model)
                                                    if cfg.model.init == "pretrained" else None,
                                                    modules_to_save=net.head_modules, write=d.is_main))
    final = {k: v for k, v in history.evals[-1].items() if k not in ("epoch", "step")}
    if heldout is not None:  # every process (FSDP needs them all in each forward)
        scored = evaluate(net.model, poser, heldout, list(cfg.task.get("metrics") or []),
                          batch_size=eval_batch_size(cfg.train), device=device, pad_id=pad_id,
                          amp=autocast_dtype(cfg.train.precision, device))
        row.update(heldout_loss=scored["loss"], heldout_score=scored.get(_split_metric(cfg), float("nan")))
    if data.kind == "instruction":  # scored after training: MMLU k-shot through lm-eval on the model in memory
        scores = mmlu.evaluate(net.model, tokenizer, cfg.task, device, autocast_dtype(cfg.train.precision, device))
        side = Path(cfg.output_dir) / MMLU_FILE
        if d.is_main:
            side.write_text(json.dumps(scores, indent=1, sort_keys=True))
        row.update(mmlu_subjects_file=str(side), mmlu_examples=scores["mmlu_examples"],
                   eval_truncated=scores["mmlu_truncated"], eval_max_length=scores["mmlu_max_length"])
        if scores["mmlu_truncated"]:
            log.warning("%d MMLU prompts were cut to %d tokens (eval_truncated)", scores["mmlu_truncated"],
                        scores["mmlu_max_length"])
        final.update(mmlu_acc=scores["mmlu_acc"], loss=float("nan"))  # no held-out instruction data to score
    if "loss" not in final:  # several eval splits (MNLI m/mm): eval_loss is their example-weighted mean
        sizes = {ev.name: len(ev.features) for ev in evalsets}
        final["loss"] = sum(final[f"loss_{n}"] * k for n, k in sizes.items()) / sum(sizes.values())
    metric = row["metric"]
    if metric not in final:
        raise KeyError(f"task.main_metric={metric!r} is not among the computed metrics {sorted(final)}")
    return {"score": final[metric], **{f"eval_{k}": v for k, v in final.items()},
            **mem.columns(), **throughput.columns(), "train_steps": history.steps,
            "epochs_completed": history.epochs_completed, "train_examples": len(train_features),
            "final_train_loss": history.losses[-1], "loss_curve": history.losses,
            "eval_history": json.dumps(history.evals, default=float)}
