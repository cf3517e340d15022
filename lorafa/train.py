"""The training loop and evaluation, with memory and speed measured on the side.

AdamW (no decay on biases and norms) with linear warm-up and decay (transformers' scheduler), `train.epochs` or
`train.max_steps` optimizer steps, gradient accumulation, evaluation after each epoch and at the end, bf16
autocast on CUDA. The first two optimizer steps are padded to `task.max_seq_len`: step 0 records the saved-tensor
bytes, the gradients and the optimizer state; step 1, the steady-state allocator peak (see `lorafa.measure`).

Long runs: every `train.checkpoint_every` optimizer steps the trainable weights, optimizer, scheduler, every RNG,
the data position (this epoch's order and the next batch) and the history so far go to
`<output_dir>/checkpoint/state.pt` (written atomically); `train.resume=true` continues from it, and the continued
run is the uninterrupted one (same batches, dropout masks, updates; tested on CPU).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from . import distributed, measure, plans, protocols
from . import step as step_mod
from .checks import BadInput
from .distributed import SINGLE, Dist
from .tasks import Poser, Stream, collate, compute_metrics

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")  # position_ids: packed windows only
CHECKPOINT = Path("checkpoint") / "state.pt"  # under the job's output_dir


Diverged = step_mod.Diverged  # the training loss (or the gradient norm) became NaN or infinite


@dataclass
class EvalSet:
    name: str  # the eval split's key ("validation", or "m"/"mm" for MNLI)
    features: list[dict]
    references: np.ndarray | None  # None: loss only (synthetic)
    batches: dict = field(default_factory=dict, repr=False)  # the collated batches, made once (`_eval_batches`)


@dataclass
class History:
    losses: list[float] = field(default_factory=list)  # mean training loss of each optimizer step
    evals: list[dict] = field(default_factory=list)  # {"epoch", "step", **metrics} after each epoch and at the end
    steps: int = 0
    epochs_completed: int = 0


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (`train.precision=auto`); fp32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def frozen_weight_dtype(tcfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """`train.frozen_dtype`: auto = the autocast dtype (frozen weights need no fp32 master copy), else as named."""
    name = str(tcfg.get("frozen_dtype", "auto"))
    if name == "auto":
        return autocast_dtype(tcfg.precision, device)
    return getattr(torch, name)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `steps`: transformers'
    `get_linear_schedule_with_warmup`, written out so that a job does not import `transformers.optimization`
    (which imports PEFT: ≈ 1 s of every process's start)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: nn.Module, tcfg: DictConfig, fused: bool = False, capturable: bool = False,
                   b_lr_ratio: float = 1.0, lr: float | None = None) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters; None when nothing trains (`method=frozen` on a model without a
    task head: backward runs, for its memory, and no step is taken). `fused`: torch's fused CUDA kernel (one
    launch for all parameters; `lorafa.bench` uses it for every method); `capturable`: its state on the device, so
    that a step can be captured in a CUDA graph. `b_lr_ratio` (`method.b_lr_ratio`): the adapters' B matrices
    train at that multiple of `train.lr`, everything else (A where it trains, the task head, a trained base) at
    `train.lr` itself — LoRA+'s per-matrix learning rate, the LoRA-FA recipe's one knob (docs/recipe.md).
    `lr`: the base learning rate, when not `train.lr` (a protocol's grid scales it: `lorafa.protocols.lr_of`).
    A captured step reads the rates from device tensors (`lorafa.step.DeviceLR`): a float would be frozen into the
    graph."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # biases and LayerNorm/RMSNorm weights: no decay
            groups.setdefault((p.ndim >= 2, name.rsplit(".", 1)[-1] == "lora_B"), []).append(p)
    if not groups:
        return None
    lr, ratio = float(tcfg.lr if lr is None else lr), float(b_lr_ratio)
    params = [{"params": ps, "weight_decay": float(tcfg.weight_decay) if decay else 0.0,
               "lr": lr * ratio if is_b else lr} for (decay, is_b), ps in sorted(groups.items(), reverse=True)]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(tcfg.betas), eps=float(tcfg.eps),
                             **({"fused": True} if fused else {}), **({"capturable": True} if capturable else {}))


def count_tokens(batch: dict, family: str) -> int:
    tokens = int(batch["attention_mask"].sum())
    if family == "encoder-decoder":
        tokens += int((batch["labels"] != -100).sum())
    return tokens


GROUP_MEGABATCH = 50  # group_by_length: examples are sorted by length within runs of this many micro-batches


# not transformers' `get_length_grouped_indices` itself: it sizes its runs by the data (≤ 50 micro-batches) and keeps
# the batches in run order (the longest example's first), where these are shuffled
def epoch_order(lengths: list[int], size: int, generator: torch.Generator, group: bool) -> list[int]:
    """One epoch's order of the training examples: a random permutation; with `group` (`train.group_by_length`),
    as transformers' `LengthGroupedSampler` does: the permutation cut into runs of GROUP_MEGABATCH micro-batches of
    `size` examples, each run sorted by length and cut into micro-batches, the full micro-batches then shuffled (the
    epoch's partial last one stays last), so that a micro-batch holds examples of similar length: less padding,
    the same examples each epoch, still random batches."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    if not group or size <= 1:
        return perm
    run = size * GROUP_MEGABATCH
    batches = []
    for i in range(0, len(perm), run):
        chunk = sorted(perm[i: i + run], key=lambda j: -lengths[j])
        batches += [chunk[k: k + size] for k in range(0, len(chunk), size)]
    partial = [batches.pop()] if batches and len(batches[-1]) < size else []
    shuffled = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()] + partial
    return [i for b in shuffled for i in b]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _inputs(batch: dict) -> dict:
    """The model's inputs; a packed batch (with `position_ids`, `lorafa.tasks.pack`) goes without its attention mask
    (which counts real tokens only): transformers finds packed sequences only when no mask is given."""
    packed = "position_ids" in batch
    return {k: batch[k] for k in MODEL_INPUTS if k in batch and not (packed and k == "attention_mask")}


def total_steps(n_train: int, tcfg: DictConfig, d: Dist = SINGLE) -> int:
    if tcfg.max_steps and tcfg.max_steps > 0:
        return int(tcfg.max_steps)
    micro = len(distributed.micro_batches(list(range(n_train)), int(tcfg.batch_size), d))
    return int(tcfg.epochs) * math.ceil(micro / int(tcfg.grad_accum))


def eval_batch_size(tcfg: DictConfig) -> int:
    """Eval examples per forward: `train.eval_batch_size`, but under a memory budget (`train.memory_budget_gib`)
    no more than a training micro-batch (`train.batch_size`): the plan the budget chose is for the training step,
    whose peak an eval forward of as many rows stays below (it keeps nothing for backward; an LM's loss is taken
    without its logits), where 64 rows of a long sequence would not."""
    rows = int(tcfg.eval_batch_size)
    if tcfg.get("memory_budget_gib") is not None:
        rows = min(rows, int(tcfg.batch_size))
    return rows


@torch.no_grad()
def evaluate(model: nn.Module, poser: Poser, evalset: EvalSet, metrics: list[str], *, batch_size: int,
             device: torch.device, pad_id: int, amp: torch.dtype | None, stepper: step_mod.TrainStep | None = None,
             multiple: int = 0, max_len: int = 0, label_cap: int = 0) -> dict[str, float]:
    """Mean loss and the task's metrics on one eval split. Blocks compiled for training (`train.compile`) run
    eager here: generation and the eval batches' shapes would recompile them. With a job's `stepper` in a graphed
    mode, forwards that read nothing on the host (`Poser.capturable`) are captured per batch shape and replayed
    (`TrainStep.eval_forward`); `multiple` pads each batch to a length bucket, as training does, so that they
    meet few shapes (`max_len`, `label_cap`: the bucket caps of inputs and of T5's targets)."""
    with torch.compiler.set_stance("force_eager"), (stepper.context() if stepper is not None else nullcontext()):
        return _evaluate(model, poser, evalset, metrics, batch_size=batch_size, device=device, pad_id=pad_id,
                         amp=amp, stepper=stepper, multiple=multiple, max_len=max_len, label_cap=label_cap)


def _widths(chunk: list[dict], *, aligned: bool, multiple: int, max_len: int, label_cap: int) -> tuple[int, int | None]:
    """The length a batch of `chunk` is padded to — its longest input's length bucket (`lorafa.step.bucket_length`;
    `multiple` 0: the longest) — and, for labels that do not run along the inputs (T5's targets), theirs."""
    width = step_mod.bucket_length(max(len(f["input_ids"]) for f in chunk), multiple, max_len)
    labels_to = None
    if not aligned and multiple and isinstance(chunk[0].get("labels"), list):
        labels_to = step_mod.bucket_length(max(len(f["labels"]) for f in chunk), multiple, label_cap)
    return width, labels_to


def _eval_batches(poser: Poser, evalset: EvalSet, batch_size: int, pad_id: int, multiple: int, max_len: int,
                  label_cap: int, pin: bool) -> list[tuple[list[int], dict]]:
    """The eval split's batches, collated once a job (kept on the EvalSet, pinned for CUDA): examples sorted by
    length, so that a batch holds similar lengths (little padding), each batch with its examples' indices and
    padded to its length bucket (`multiple` 0: to its longest)."""
    key = (batch_size, pad_id, multiple, max_len, label_cap, pin)
    if key in evalset.batches:
        return evalset.batches[key]
    aligned = poser.family == "decoder"
    order = sorted(range(len(evalset.features)), key=lambda i: len(evalset.features[i]["input_ids"]))
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        chunk = [evalset.features[j] for j in idx]
        width, labels_to = _widths(chunk, aligned=aligned, multiple=multiple, max_len=max_len or 1 << 30,
                                   label_cap=label_cap or 1 << 30)
        batch = collate(chunk, pad_id, pad_to=width, aligned_labels=aligned, pad_labels_to=labels_to)
        out.append((idx, {k: v.pin_memory() for k, v in batch.items()} if pin else batch))
    evalset.batches = {key: out}  # one layout a job
    return out


def _evaluate(model: nn.Module, poser: Poser, evalset: EvalSet, metrics: list[str], *, batch_size: int,
              device: torch.device, pad_id: int, amp: torch.dtype | None, stepper: step_mod.TrainStep | None = None,
              multiple: int = 0, max_len: int = 0, label_cap: int = 0) -> dict[str, float]:
    """Each batch in one pass where the family allows (`Poser.score`: the loss and the predictions from the same
    forward); the loss and the predictions stay on the device and are read once, at the end."""
    was_training = model.training
    model.eval()
    predict = evalset.references is not None
    loss_sum, n, idx_all, raw = None, 0, [], []
    batches = _eval_batches(poser, evalset, batch_size, pad_id, multiple, max_len, label_cap, device.type == "cuda")

    def forward(batch):
        # no autocast cache: a capture must not keep casts made inside it
        with torch.autocast(device.type, dtype=amp, cache_enabled=False) if amp else nullcontext():
            loss, pred = poser.score(model, _inputs(batch), batch, predict)
        return loss.detach().float(), pred

    for idx, host in batches:
        batch = _to(host, device)
        if stepper is not None:
            loss, pred = stepper.eval_forward(forward, batch, capturable=poser.capturable)
        else:
            loss, pred = forward(batch)
        part = loss * len(idx)
        loss_sum = part if loss_sum is None else loss_sum + part
        if predict:
            raw.append(pred)
            idx_all += idx
        n += len(idx)
    model.train(was_training)
    out = {"loss": float(loss_sum) / max(n, 1) if loss_sum is not None else float("nan")}
    if predict:
        if raw and torch.is_tensor(raw[0]):
            values = poser.finish(torch.cat(raw).cpu())  # the one read of the predictions
            values = values.tolist() if torch.is_tensor(values) else list(values)
        else:  # generated text
            values = [v for part in raw for v in poser.finish(part)]
        ordered = [None] * len(evalset.features)
        for j, v in zip(idx_all, values):
            ordered[j] = v
        out.update(compute_metrics(metrics, evalset.references, np.asarray(ordered)))
    return out


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def job_signature(cfg: DictConfig) -> str:
    """The job's resolved config without what may differ between a run and its resumption (where it writes,
    `train.resume`, the progress bar): a checkpoint only continues the job that wrote it."""
    import json

    from .results import config_dict

    data = {k: v for k, v in config_dict(cfg).items() if k not in ("output_dir", "hydra")}
    data["train"] = {k: v for k, v in data.get("train", {}).items() if k not in ("resume", "progress")}
    return json.dumps(data, sort_keys=True, default=str)


DCP_DIR = "trainable"  # beside state.pt: the trainable parameters and the optimizer state (torch.distributed.checkpoint)


def _cause(err: BaseException) -> BaseException:
    """What went wrong inside torch.distributed.checkpoint (its CheckpointException — a BaseException — holds each
    process's exception): the first process's, else `err` itself."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return err


@contextmanager
def _one_process_is_intended():
    """torch.distributed.checkpoint warns, even with no_dist=True, that it assumes one process: that is the job."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(dist: Dist) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def _trainable_state(model: nn.Module, optimizer):
    """The trainable parameters' and the optimizer's state dicts as torch.distributed.checkpoint saves and loads
    them (sharded under FSDP, replicated under DDP, plain on one process; the frozen base left out)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, [optimizer] if optimizer else [], options=StateDictOptions(ignore_frozen_params=True))


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, generator: torch.Generator, order: list[int],
                    next_group: int, history: History, memory: measure.Memory, signature: str = "",
                    rng_ranks: list[dict] | None = None, dist: Dist = SINGLE) -> None:
    """Everything the loop needs to continue as if never stopped, in `path.parent`: the trainable parameters and the
    optimizer state by `torch.distributed.checkpoint` (every process writes its share: FSDP's shards, DDP's
    replicas once), and `path` (state.pt, process 0): the RNG states of every process (`rng_ranks`: their dropout
    streams part as their shards' shapes differ), the data order and position, the history, the scheduler.
    Written into a fresh folder that then replaces the previous one, state.pt last: a kill or a full disk
    mid-write leaves the previous checkpoint whole (a kill between the two renames leaves it as `<folder>.old`,
    which `load_checkpoint` takes)."""
    import shutil

    import torch.distributed.checkpoint as dcp

    folder = path.parent
    fresh, old = folder.with_name(folder.name + ".next"), folder.with_name(folder.name + ".old")
    state = {"scheduler": scheduler.state_dict() if scheduler else None,
             "rng": _rng_state(), "rng_ranks": rng_ranks or [], "generator": generator.get_state(), "order": order,
             "next_group": next_group,
             "history": {"losses": history.losses, "evals": history.evals, "steps": history.steps,
                         "epochs_completed": history.epochs_completed},
             "memory": {"grads": memory.grads, "optimizer": memory.optimizer, "activations": memory.activations,
                        "allocator": dict(memory.allocator)}, "signature": signature}
    try:
        if dist.is_main:
            shutil.rmtree(fresh, ignore_errors=True)  # a torn one from a killed save
            fresh.mkdir(parents=True)
        _barrier(dist)
        model_state, optim_state = _trainable_state(model, optimizer)
        with _one_process_is_intended():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=fresh / DCP_DIR,
                     no_dist=not dist.enabled)
        if dist.is_main:
            torch.save(state, fresh / path.name)
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                folder.rename(old)
            fresh.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:  # a full disk, a kill: the previous checkpoint stays, no half-written one
        if dist.is_main:
            shutil.rmtree(fresh, ignore_errors=True)
        cause = _cause(err)
        if isinstance(cause, OSError):
            raise OSError(cause.errno, f"{path} not written: {cause.strerror or cause} (the previous checkpoint is "
                                       "intact)") from err
        raise
    _barrier(dist)


def checkpoint_path(output_dir: str | Path) -> Path | None:
    """The state.pt of the job's last whole checkpoint (the folder, or `.old` if a kill fell between the two
    renames of `save_checkpoint`); None when there is none."""
    path = Path(output_dir) / CHECKPOINT
    for candidate in (path, path.parent.with_name(path.parent.name + ".old") / path.name):
        if candidate.is_file():
            return candidate
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, generator: torch.Generator,
                    history: History, memory: measure.Memory, signature: str = "",
                    dist: Dist = SINGLE) -> tuple[list[int], int]:
    """Restore a checkpoint into the live objects; returns (this epoch's order, the next micro-batch group). A
    checkpoint it cannot continue (unreadable, another config, another number of processes, other trainable
    parameters) is bad input, left as it is."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        ranks = state.get("rng_ranks") or []
    except Exception as err:  # truncated, corrupted, not a checkpoint: refused, left as it is
        raise BadInput(f"train.resume=true: {path} is unreadable ({type(err).__name__}: {err}); expected a "
                       "checkpoint this job wrote (delete it to start afresh)") from err
    if (len(ranks) > 1 or dist.enabled) and len(ranks) != dist.world_size:
        raise BadInput(f"train.resume=true: {path} was written by a job on {max(len(ranks), 1)} processes; this one "
                       f"has {dist.world_size} (resume with the same number)")
    if signature and state.get("signature") and state["signature"] != signature:
        raise BadInput(f"train.resume=true: {path} was written by a job with another config; it continues only "
                       "the same job (delete the checkpoint to start afresh)")
    model_state, optim_state = _trainable_state(model, optimizer)
    try:
        with _one_process_is_intended():
            dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path.parent / DCP_DIR,
                     no_dist=not dist.enabled)
    except (Exception, CheckpointException) as err:  # torn, or other trainable parameters: one line, nothing changed
        cause = _cause(err)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise BadInput(f"train.resume=true: {path.parent / DCP_DIR} cannot be loaded into this job's trainable "
                       f"parameters and optimizer ({type(cause).__name__}: {first}); expected the checkpoint this "
                       "job wrote (delete it to start afresh)") from err
    set_state_dict(model, [optimizer] if optimizer else [], model_state_dict=model_state,
                   optim_state_dict=optim_state,
                   # the frozen base is not in a checkpoint; every trainable key was, or dcp.load refused above
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if scheduler:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(ranks[dist.rank] if dist.enabled else state["rng"])
    generator.set_state(state["generator"])
    for key, value in state["history"].items():
        setattr(history, key, value)
    for key, value in state["memory"].items():
        setattr(memory, key, value)
    return state["order"], state["next_group"]


def fit(model: nn.Module, poser: Poser, train_features, evalsets: list[EvalSet], *,
        cfg: DictConfig, device: torch.device, pad_id: int, memory: measure.Memory,
        throughput: measure.Throughput, dist: Dist = SINGLE, wrapped: nn.Module | None = None,
        mode: str = "none", info: dict | None = None) -> History:
    """Train `model` (through `wrapped`, its DDP wrapper when there is one: `lorafa.distributed`), evaluating
    after each epoch and at the end, each step run the `mode` way (`lorafa.step`: none, blocks, graph). Under
    several processes the logged loss, tokens and samples are the job's. `info` receives the step's columns
    (graphs, padding, layer of the run)."""
    tcfg = cfg.train
    wrapped = model if wrapped is None else wrapped
    amp = autocast_dtype(tcfg.precision, device)
    # one process on CUDA: fused AdamW, which skips a non-finite step by itself, so nothing is read per step
    device_checks = device.type == "cuda" and not dist.enabled if str(tcfg.get("optimizer_impl", "auto")) == "auto" \
        else str(tcfg.optimizer_impl) == "fused"
    optimizer = make_optimizer(model, tcfg, fused=device_checks,
                               capturable=mode in step_mod.GRAPHED and device.type == "cuda",
                               b_lr_ratio=float(cfg.method.get("b_lr_ratio", 1.0)), lr=protocols.lr_of(cfg))
    steps = total_steps(len(train_features), tcfg, dist)
    warmup = int(tcfg.warmup_steps) if tcfg.get("warmup_steps") else math.ceil(float(tcfg.warmup_ratio) * steps)
    scheduler = linear_schedule(optimizer, warmup, steps) if optimizer else None
    generator = torch.Generator().manual_seed(int(cfg.seed))
    history = History()
    aligned = poser.family == "decoder"
    max_len = int(cfg.task.max_seq_len)
    multiple = step_mod.bucket_multiple(tcfg, max_len, mode)
    label_cap = int(cfg.task.get("target_len") or max_len)
    bs, accum = int(tcfg.batch_size), int(tcfg.grad_accum)
    metric_list = list(cfg.task.get("metrics") or [])
    log_every = max(1, int(tcfg.get("log_every") or 50))
    by_length = bool(tcfg.get("group_by_length", False))
    # streamed instruction data (`lorafa.tasks.Stream`, task.streaming): read in the stream's own (buffer-shuffled)
    # order, no lengths up front; a dataset-backed `lorafa.tasks.Encoded` gives its lengths from one column
    streamed = isinstance(train_features, Stream)
    lengths = None if streamed else train_features.lengths if hasattr(train_features, "lengths") \
        else [len(f["input_ids"]) for f in train_features]

    eval_time = 0.0
    eval_rows = eval_batch_size(tcfg)

    def run_evals(epoch: int):
        nonlocal eval_time
        started = time.perf_counter()
        record = {"epoch": epoch, "step": history.steps}
        if device.type == "cuda":  # the evaluations' own peak (`alloc_eval_peak_gib`), apart from the steps'
            measure.reset_peak(device)
        for ev in evalsets:
            result = evaluate(model, poser, ev, metric_list, batch_size=eval_rows, device=device,
                              pad_id=pad_id, amp=amp, stepper=stepper, multiple=multiple, max_len=max_len,
                              label_cap=label_cap)
            suffix = "" if len(evalsets) == 1 else f"_{ev.name}"
            record.update({f"{k}{suffix}": v for k, v in result.items()})
        if device.type == "cuda":
            memory.allocator["eval_peak"] = max(memory.allocator.get("eval_peak", 0),
                                                torch.cuda.max_memory_allocated(device))
        history.evals.append(record)
        eval_time += time.perf_counter() - started

    every = int(tcfg.get("checkpoint_every") or 0)
    ckpt = Path(cfg.output_dir) / CHECKPOINT
    order, start = None, 0
    found = checkpoint_path(cfg.output_dir) if tcfg.get("resume") else None
    if found is not None:
        order, start = load_checkpoint(found, model, optimizer, scheduler, generator, history, memory,
                                       job_signature(cfg), dist)
    # graphs read the rates from device tensors (after a resume too: a checkpoint's come back as CPU tensors)
    device_lr = step_mod.DeviceLR(optimizer, device) if optimizer is not None and mode in step_mod.GRAPHED else None
    acc = step_mod.Accumulators(steps, device, start=history.steps)
    stepper = step_mod.TrainStep(model, optimizer, mode=mode, device=device, amp=amp,
                                 max_grad_norm=tcfg.get("max_grad_norm"), accumulators=acc,
                                 device_checks=device_checks, forward=wrapped)
    progress = _progress(steps, enabled=bool(tcfg.progress))
    progress.update(history.steps)
    padding = {"real": 0, "computed": 0}

    taken = history.steps  # steps taken; history.steps: those read back (the losses in the history)
    one_time_steps = 0  # steps after the warm-up left out of tokens/s: a shape's one-time steps (`TrainStep.one_time`)

    def sync(resume_timing: bool = True) -> None:
        """Read the device's accumulators (the only synchronisation): losses into the history, a non-finite step
        raised, the progress bar and tokens/s brought up to date."""
        losses, norms, first_bad = acc.read(taken)
        throughput.synced(taken, resume=resume_timing)
        if first_bad >= 0:
            k = first_bad - history.steps
            raise step_mod.diverged(losses[k], norms[k] if tcfg.get("max_grad_norm") else None, first_bad)
        history.losses.extend(losses)
        history.steps = taken
        progress.update(len(losses))
        if losses:
            progress.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{throughput.columns()['tokens_per_s']:.0f}")

    def batch_of(idx: list[int], measured: bool) -> tuple[dict, int, int]:
        """A micro-batch collated on the host (padded to max_seq_len when measured, else to its length bucket),
        pinned and copied without waiting; with its real and computed token counts."""
        chunk = [train_features[i] for i in idx]
        if measured:  # batch_size × max_seq_len: what the memory describes
            width, labels_to = max_len, None
        else:
            width, labels_to = _widths(chunk, aligned=aligned, multiple=multiple, max_len=max_len,
                                       label_cap=label_cap)
        collated = collate(chunk, pad_id, pad_to=width, aligned_labels=aligned, pad_labels_to=labels_to)
        host, real = _inputs(collated), count_tokens(collated, poser.family)
        computed = host["input_ids"].numel() + (host["labels"].numel() if poser.family == "encoder-decoder" else 0)
        if mode != "none" and "attention_mask" in host and bool(host["attention_mask"].all()):
            del host["attention_mask"]  # no padding: the maskless (flash) attention path, as eager takes it
        if device.type == "cuda":
            host = {k: v.pin_memory() for k, v in host.items()}
        return _to(host, device), real, computed

    model.train()
    with stepper.context():
        throughput.synced(taken)
        while taken < steps:
            if order is None:  # a new epoch (a resumed run continues the epoch it stopped in)
                order, start = list(range(len(train_features))) if streamed else \
                    epoch_order(lengths, bs * dist.world_size, generator, by_length), 0  # streamed: as read
            micro = distributed.micro_batches(order, bs, dist)
            g = start
            for g in range(start, len(micro), accum):
                step = taken
                group = micro[g: g + accum]
                one_time = False
                measured = step < 2  # padded to max_seq_len: memory describes batch_size × max_seq_len
                if measured or dist.enabled or accum > 1 or not device_checks:
                    tokens, samples, computed = _group_step(stepper, wrapped, model, group, step, measured=measured,
                                                            memory=memory, device=device, dist=dist,
                                                            batch_of=batch_of)
                else:
                    batch, tokens, computed = batch_of(group[0], measured=False)
                    samples = len(group[0])
                    full = len(group[0]) == bs
                    # a shape's one-time step (warm-up, compile, capture) is not timed, nor its tokens counted
                    one_time = step >= throughput.warmup and stepper.one_time(batch, full=full)
                    if one_time:
                        one_time_steps += 1
                        sync(resume_timing=False)
                    stepper.run(batch, step, full=full)
                if scheduler is not None:
                    scheduler.step()
                    if device_lr is not None:
                        device_lr.refresh()
                taken += 1
                throughput.add(step, tokens, samples)
                if step >= throughput.warmup:
                    padding["real"] += tokens
                    padding["computed"] += computed
                checkpoint = every and taken % every == 0 and taken < steps
                if not device_checks or measured or one_time or taken == throughput.warmup \
                        or taken % log_every == 0 or taken >= steps or checkpoint:
                    sync()
                if checkpoint:
                    rng_ranks = distributed.gather(_rng_state(), dist) if dist.enabled else None
                    save_checkpoint(ckpt, model, optimizer, scheduler, generator, order, g + accum, history, memory,
                                    job_signature(cfg), rng_ranks, dist)  # every process: its share
                if taken >= steps:
                    break
            if g + accum >= len(micro):  # the whole epoch was seen
                history.epochs_completed += 1
                sync(resume_timing=False)
                run_evals(history.epochs_completed)
                throughput.synced(taken)
            order = None
        sync(resume_timing=False)
    progress.close()
    if not history.evals or history.evals[-1]["step"] != history.steps:
        run_evals(history.epochs_completed)
    _summarise_allocator(memory)
    if info is not None:
        info.update(stepper.columns(), compile_mode=mode, bucket=multiple, measured_mode="eager",
                    pad_frac=1 - padding["real"] / padding["computed"] if padding["computed"] else float("nan"),
                    optimizer_impl="fused" if device_checks else "foreach", log_reads=acc.reads,
                    group_by_length=by_length, time_eval_s=eval_time, one_time_steps=one_time_steps,
                    eval_batch_size=eval_rows)
    return history


def _group_step(stepper: step_mod.TrainStep, wrapped: nn.Module, model: nn.Module, group: list[list[int]], step: int,
                *, measured: bool, memory: measure.Memory, device: torch.device, dist: Dist,
                batch_of) -> tuple[int, int, int]:
    """One optimizer step over `group`'s micro-batches, eager (a measured step, gradient accumulation, several
    processes): the saved-tensor meter on step 0's first micro-batch, the allocator read on the measured steps.
    Returns the step's (real tokens, samples, computed tokens), summed over processes."""
    if measured:
        measure.reset_peak(device)  # (the reserved peak: what the step needs, as the bench measures it)
    loss_sum, tokens, samples, computed = None, 0, 0, 0
    eager = torch.compiler.set_stance("force_eager") if measured and stepper.mode != "none" else nullcontext()
    for j, global_idx in enumerate(group):
        idx = distributed.shard(global_idx, dist)
        share = len(idx) / len(global_idx)  # this process's part of the micro-batch's mean loss
        batch, real, comp = batch_of(idx, measured)
        meter = measure.SavedTensorMeter(model) if step == 0 and j == 0 else nullcontext()
        with distributed.sync_gradients(wrapped, dist, j == len(group) - 1), eager:
            with meter, (torch.autocast(device.type, dtype=stepper.amp) if stepper.amp else nullcontext()):
                loss = wrapped(**batch).loss
            if step == 0 and j == 0:
                memory.activations = meter.bytes
                memory.host_offload = plans.host_bytes(model)
                memory.host_weights = plans.host_weight_bytes(model)
            # DDP/FSDP average over processes: × world_size × share gives the whole micro-batch's mean
            (loss * (share * dist.world_size / len(group))).backward()
        part = loss.detach().float() * share
        loss_sum = part if loss_sum is None else loss_sum + part
        tokens, samples, computed = tokens + real, samples + len(idx), computed + comp
    loss_mean = loss_sum / len(group)
    if dist.enabled:
        total, tokens, samples, computed = distributed.all_sum([float(loss_mean), tokens, samples, computed], dist,
                                                               device)
        loss_mean = torch.tensor(total, dtype=torch.float32, device=device)
    if step == 0:
        memory.grads = measure.grad_bytes(model)
    if device.type == "cuda" and measured:
        memory.allocator[f"fwd_bwd_peak_step{step}"] = torch.cuda.max_memory_allocated(device)
    stepper.finish(loss_mean, step)
    if step == 0:
        memory.optimizer = measure.optimizer_bytes(stepper.optimizer) if stepper.optimizer else 0
        if device.type == "cuda":
            memory.allocator["after_step"] = torch.cuda.memory_allocated(device)
    if device.type == "cuda" and measured:
        memory.allocator[f"peak_step{step}"] = torch.cuda.max_memory_allocated(device)
        memory.allocator[f"reserved_step{step}"] = torch.cuda.max_memory_reserved(device)
    model.zero_grad(set_to_none=True)
    return int(tokens), int(samples), int(computed)


def _summarise_allocator(memory: measure.Memory) -> None:
    """Steady state is step 1 (optimizer state exists); fall back to step 0 for one-step runs."""
    a = memory.allocator
    if not a:
        return
    last = 1 if "peak_step1" in a else 0
    a["fwd_bwd_peak"] = a.pop(f"fwd_bwd_peak_step{last}")
    a["peak"] = max(a.pop("peak_step0"), a.pop("peak_step1", 0))
    a["reserved"] = max(a.pop("reserved_step0"), a.pop("reserved_step1", 0))
    a.pop("fwd_bwd_peak_step0", None)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True, leave=False)
