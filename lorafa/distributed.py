"""One job on several processes (GPUs, or CPU processes over gloo) under torchrun: `train.strategy`.

    torchrun --nproc-per-node 2 run.py model=llama-7b model.init=random method=lorafa train.strategy=fsdp
    torchrun --nproc-per-node 2 run.py -m method=lora,lorafa train.strategy=ddp     # a sweep, every job on 2 GPUs

- `single` (default): one process. Launched by torchrun with more than one process, it is an error.
- `ddp`: every process holds the whole model; gradients of the trainable weights are averaged (bucketed
  all-reduce, no sync on the micro-batches that accumulate).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each module of the classes the model names in
  `_no_split_modules` (its transformer blocks; RoBERTa's embeddings too: `fsdp_units`) and on the root, so
  weights, gradients and optimizer state are sharded across processes and a unit's weights are gathered only while
  it runs. Frozen weights stay in their own dtype (bf16 by default) beside the fp32 trainable ones.

Semantics: `train.batch_size` is per process; a global micro-batch is `batch_size × world_size` examples of one
shuffled order (the same on every process), cut into contiguous shards, one per process. Each process scales its
loss by its share of the examples, so the averaged gradient equals the single-process gradient of the whole
micro-batch (exactly, for losses that are means over examples; for token-level LM losses, up to how tokens fall
between shards). A last micro-batch smaller than `world_size` is dropped. Every process evaluates the whole eval
set (FSDP needs all of them in every forward); process 0 writes the row, into its own job directory (the others
are told it). Memory is measured on every process: the `mem_*` columns are per GPU (the largest process),
`job_mem_*` their sum over the job's processes, `mem_peak_ranks_gib` each process's peak.
"""

from __future__ import annotations

import atexit
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

STRATEGIES = ("single", "ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    strategy: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.strategy != "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()  # one process


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the torch.distributed environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank, 0 outside torchrun (readable before any process group exists)."""
    return int(os.environ.get("RANK", "0"))


def setup(strategy: str, device_name: str, timeout_s: float = 600) -> tuple[Dist, torch.device]:
    """The job's process layout and its device (`cuda:<LOCAL_RANK>` under torchrun); starts the process group
    (nccl on CUDA, gloo on CPU) once per process: the jobs of a sweep share it. A collective that waits longer than
    `timeout_s` (`train.dist_timeout_s`: a process failed alone, see `agree`) ends the processes."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available()
                          else ("cpu" if device_name == "auto" else device_name))
    if not launched():
        if strategy != "single":
            raise ValueError(f"train.strategy={strategy} runs one process per GPU: launch with "
                             f"`torchrun --nproc-per-node N run.py ... train.strategy={strategy}`")
        return Dist(), device
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if strategy == "single":
        if world > 1:
            raise ValueError(f"launched by torchrun with {world} processes but train.strategy=single: set "
                             "train.strategy=ddp or fsdp (or launch one process)")
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        from datetime import timedelta

        timeout = timedelta(seconds=float(timeout_s))
        if device.type == "cuda":
            tdist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            tdist.init_process_group("gloo", timeout=timeout)
        atexit.register(_shutdown)
    return Dist(strategy, rank, world, local_rank), device


def _shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """FSDP's units: every module of a class the model names in `_no_split_modules` (transformers' list of the
    modules kept whole on one device; accelerate's FSDP wraps the same: its `transformer_based_wrap` policy), found
    as accelerate finds them (`get_module_class_from_name`, here transformers' copy of it: transformers is a
    dependency, accelerate is not). RoBERTa names `RobertaLayer` and `RobertaEmbeddings`, T5 `T5Block`, LLaMA
    `LlamaDecoderLayer` (transformers 5.17 and 5.24). In module order, parents before children.

    Many architectures name none (DistilBERT, DeBERTa, ELECTRA, ALBERT …, e.g. behind `model=local`): for them the
    units are the members of the model's outermost parameter-holding nn.ModuleLists, the repeated blocks (no
    library finds those: accelerate would wrap nothing, leaving the whole model one unit)."""
    from transformers.trainer_pt_utils import get_module_class_from_name

    names = sorted(getattr(model, "_no_split_modules", None) or ())
    # a class it names but this configuration never builds is skipped (accelerate raises on it)
    classes = tuple(c for c in (get_module_class_from_name(model, n) for n in names) if c is not None)
    units = [m for m in model.modules() if classes and isinstance(m, classes)]
    if units:
        return units
    units, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, nn.ModuleList) and any(True for _ in m.parameters()):
            units.extend(m)
            inside.add(name)
    return units


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the FSDP units held in an nn.ModuleList (RoBERTa's `encoder.layer.N`, T5's
    `encoder.block.N` / `decoder.block.N`, LLaMA's `model.layers.N`; not RoBERTa's embeddings, its one unit outside
    a list). What regional compilation compiles (`lorafa.job.compile_blocks`, `lorafa.bench`)."""
    listed = {id(m) for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst}
    return [m for m in fsdp_units(model) if id(m) in listed]


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """What the training step calls: a DDP wrapper, the model sharded in place by FSDP2, or the model itself."""
    if not d.enabled:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train.strategy={d.strategy}: nothing trains in this job (method=frozen without a task "
                         "head); run it as one process")
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    from torch.distributed.fsdp import fully_shard

    from .adapters import lora_layers

    for layer in lora_layers(model).values():  # FSDP replaces W and A with its shards: no stacked views
        layer.unstack()
    units = fsdp_units(model)
    if not units:
        raise ValueError(f"train.strategy=fsdp: found no units to shard in {type(model).__name__} (no "
                         "`_no_split_modules` classes, no repeated blocks in an nn.ModuleList)")
    for unit in reversed(units):  # children before parents, as fully_shard needs (nested units: none today)
        fully_shard(unit)
    fully_shard(model)
    return model


def sync_gradients(wrapped: nn.Module, d: Dist, enabled: bool):
    """Gradient reduction on (the last micro-batch of a step) or off (the ones before it)."""
    from contextlib import nullcontext

    if d.strategy == "ddp" and not enabled:
        return wrapped.no_sync()
    if d.strategy == "fsdp":
        wrapped.set_requires_gradient_sync(enabled)
    return nullcontext()


def shard(indices: list[int], d: Dist) -> list[int]:
    """This process's contiguous share of a global micro-batch (sizes differ by at most one)."""
    if not d.enabled:
        return indices
    return np.array_split(np.asarray(indices, dtype=np.int64), d.world_size)[d.rank].tolist()


def micro_batches(order: list[int], batch_size: int, d: Dist) -> list[list[int]]:
    """Global micro-batches (`batch_size × world_size` examples) of one epoch's order; under several processes a
    last one too small to give every process an example is dropped."""
    size = batch_size * d.world_size
    micro = [order[i: i + size] for i in range(0, len(order), size)]
    if d.enabled and micro and len(micro[-1]) < d.world_size:
        micro.pop()
    return micro


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum of `values` over the job's processes (float64, on the collective's device)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def gather(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, …] on every process."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast(obj, d: Dist):
    """Rank 0's `obj` on every process."""
    if not d.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def settle_output_dir(own: str | Path, d: Dist) -> Path:
    """Rank 0's job directory, on every process. Hydra made one per process from the clock; a non-zero rank's
    own directory, if it differs and holds only Hydra's files, is removed (no stray job directories)."""
    main = Path(broadcast(str(own), d))
    own = Path(own)
    if (d.enabled and not d.is_main and own.resolve() != main.resolve() and own.is_dir()
            and all(p.name == ".hydra" or p.suffix == ".log" for p in own.iterdir())):
        shutil.rmtree(own, ignore_errors=True)
    return main


STATUS_ORDER = ("ok", "diverged", "oom", "failed")


def agree(status: str, error: str, d: Dist) -> tuple[str, str]:
    """The job's status from every process's: the worst one, its error prefixed by its rank. Reached by every
    process when they fail together (the same out-of-memory on every GPU, a diverged loss, which all processes see
    after the loss is summed). A process that fails alone leaves the others waiting inside a collective: they
    stop after `train.dist_timeout_s`, torchrun ends the sweep, and rows already written stay in their job
    directories (`python -m lorafa.results collect SWEEP_DIR`)."""
    if not d.enabled:
        return status, error
    per_rank = gather((status, error), d)
    worst = max(range(len(per_rank)), key=lambda r: STATUS_ORDER.index(per_rank[r][0]))
    status_w, error_w = per_rank[worst]
    return status_w, (f"rank {worst}: {error_w}" if status_w != "ok" else "")


def full_norm(norm) -> float:
    """A gradient norm as a float (FSDP's is a DTensor: its full value)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


JOB_PARTS = ("weights", "grads", "optimizer", "activations", "peak")


def job_memory(columns: dict, d: Dist) -> dict:
    """The memory columns of a job on several processes: `mem_*` and `alloc_*` per GPU (the largest process),
    `job_mem_*` summed over the processes, `mem_peak_ranks_gib` each process's peak. One process: as given."""
    if not d.enabled:
        return columns
    numeric = {k: v for k, v in columns.items() if k.startswith(("mem_", "alloc_")) and isinstance(v, float)}
    per_rank = gather(numeric, d)
    out = dict(columns)
    for key in numeric:
        values = [r[key] for r in per_rank]
        out[key] = max(values)
    for part in JOB_PARTS:
        out[f"job_mem_{part}_gib"] = sum(r[f"mem_{part}_gib"] for r in per_rank)
    out["mem_peak_ranks_gib"] = [r["mem_peak_gib"] for r in per_rank]
    return out
