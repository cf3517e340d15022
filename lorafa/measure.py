"""Measured memory and speed: what a training step really holds, and how fast it really runs.

Memory is split four ways, each counted from the tensors themselves (exact, on every device):

- weights: parameters and buffers;
- gradients: the `.grad` tensors after a backward pass;
- optimizer: the optimizer's state tensors after its first step (AdamW: exp_avg, exp_avg_sq, step);
- activations: the bytes autograd saves for backward during one forward pass, recorded with saved-tensor hooks:
  each storage counted once (views and tensors saved twice share it), parameter and buffer storages excluded
  (they are weights, counted above), and so are Parameters met only during the forward (FSDP's gathered
  weights). Under autocast the half-precision copies of fp32 weights that matmuls save
  are counted here: they are real memory held for backward.

On CUDA the caching allocator is read too, by phase: after the model is built, after the first optimizer step,
and the peak during a steady-state forward/backward (a later step, once optimizer state exists). That peak is
`mem_peak_gib` on CUDA; it also holds temporaries and workspace the tensor counts do not. Elsewhere
`mem_peak_gib` is the sum of the four tensor counts. Steps whose memory is measured are padded to the task's
`max_seq_len`, so the numbers describe batch_size × max_seq_len exactly.

Speed is wall time per optimizer step after `train.measure_warmup_steps` steps, synchronised with the device,
with tokens counted from the attention masks (padding excluded) and, for encoder-decoders, the target tokens.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

GIB = 1024**3


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP's sharded parameters, gradients, optimizer state) local shard: the memory this process
    holds; any other tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def kept(t):
    """What a saved-tensor pack hook returns for a tensor it leaves where it is: a detached alias (the same storage
    and version counter). The tensor itself would hold its own grad_fn — a reference cycle through autograd's C++
    graph that Python's collector cannot see, so a forward that failed before its backward (an out-of-memory in
    the loss) would keep its activations, and through the hook the model, for the rest of the process."""
    return t.detach() if isinstance(t, torch.Tensor) and t.grad_fn is not None else t


def storage_id(t: torch.Tensor) -> int:
    """The tensor's StorageImpl: shared by its views, unique while it lives; fake tensors have one too (unlike a
    data pointer)."""
    return t.untyped_storage()._cdata


def storage_key(t: torch.Tensor):
    t = _local(t)
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


class Storages:
    """The storages of `tensors` (by `key`: `storage_id` or `storage_key`), each still counted only while one of
    those tensors holds it: a storage let go since — a frozen weight's, sent to the host (`method.offload_weights`)
    — leaves its key (an address) free for the next tensor made, which is then no weight."""

    def __init__(self, tensors, key=None):
        self._key = key or storage_id
        self._held = {self._key(t): weakref.ref(t) for t in tensors}

    @classmethod
    def of(cls, model: nn.Module, key=None) -> Storages:
        """The storages of `model`'s parameters and buffers: its weights, as of now."""
        return cls(list(model.parameters()) + list(model.buffers()), key)

    def holds(self, t: torch.Tensor) -> bool:
        k = self._key(t)
        ref = self._held.get(k)
        holder = ref() if ref is not None else None
        return holder is not None and self._key(holder) == k


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or viewed tensors counted once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[storage_key(t)] = _local(t).untyped_storage().nbytes()
    return sum(seen.values())


def weight_bytes(model: nn.Module) -> int:
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def grad_bytes(model: nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())


_COUNTERS: list = []  # the pack functions of the saved-tensor counts running now (measurement, prediction)


@contextmanager
def counting(pack):
    """While active, `pack` also receives every tensor kept for backward outside autograd's saved-tensor hooks
    (`note_saved`)."""
    _COUNTERS.append(pack)
    try:
        yield
    finally:
        _COUNTERS.remove(pack)


def counting_saved() -> bool:
    return bool(_COUNTERS)


def note_saved(tensors) -> None:
    """Tensors kept for backward by something other than autograd's saved-tensor hooks — a selective checkpoint's
    cache (`lorafa.plans`) — counted by every running count as if saved."""
    tensors = list(tensors)
    for pack in _COUNTERS:
        for t in tensors:
            pack(t)


# not torch's MemTracker (torch.distributed._tools.mem_tracker, private): its activations are what the forward
# allocates, not what autograd keeps for backward
class SavedTensorMeter:
    """Context manager counting the bytes autograd saves for backward (see the module docstring).

        with SavedTensorMeter(model) as meter:
            loss = model(**batch).loss
        meter.bytes  # saved by this forward, each storage once, weights excluded
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.storages: dict = {}
        self.count = 0

    def _pack(self, t: torch.Tensor):
        # a Parameter is a weight even when it is not among the model's parameters at entry: FSDP swaps in the
        # gathered (unsharded) block weights only while the block runs
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.device.type != "meta" \
                and not self._weights.holds(t):
            self.storages[storage_key(t)] = t.untyped_storage().nbytes()
            self.count += 1
        return kept(t)

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        self._weights = Storages.of(self.model, storage_key)
        self.storages.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._counting = counting(self._pack)
        self._hooks.__enter__()
        self._counting.__enter__()
        return self

    def __exit__(self, *exc):
        self._counting.__exit__(*exc)
        self._hooks.__exit__(*exc)
        return False

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


@dataclass
class Memory:
    """The memory split of a job, in bytes (None until measured), plus the CUDA allocator's readings by phase."""

    weights: int | None = None
    grads: int | None = None
    optimizer: int | None = None
    activations: int | None = None
    host_offload: int = 0  # bytes the measured forward put in host memory (`method.offload`)
    host_weights: int = 0  # bytes of frozen weights held in host memory (`method.offload_weights`)
    allocator: dict[str, int] = field(default_factory=dict)  # build, after_step, fwd_bwd_peak, peak (CUDA only)

    @property
    def peak(self) -> int | None:
        if "peak" in self.allocator:
            return self.allocator["peak"]
        parts = (self.weights, self.grads, self.optimizer, self.activations)
        return None if None in parts else sum(parts)

    def columns(self) -> dict[str, float]:
        """mem_*_gib columns; NaN for what was not measured (a job that failed before its first step)."""
        def gib(v):
            return float("nan") if v is None else v / GIB

        cols = {f"mem_{k}_gib": gib(getattr(self, k)) for k in ("weights", "grads", "optimizer", "activations",
                                                                 "peak")}
        cols["host_offload_gib"] = self.host_offload / GIB
        cols["host_weights_gib"] = self.host_weights / GIB
        cols["mem_source"] = "cuda_allocator" if "peak" in self.allocator else "tensor_accounting"
        if "reserved" in self.allocator:  # (CUDA: what the caching allocator held from the device at most over the
            # measured steps, its rounding and cached blocks included: what a job takes from a GPU, less the context)
            cols["mem_reserved_gib"] = self.allocator["reserved"] / GIB
        cols.update({f"alloc_{k}_gib": v / GIB for k, v in self.allocator.items()})
        return cols


def settle(device: torch.device) -> tuple[int, int]:
    """Free what earlier jobs or bench settings left in this process (their compiled code holds their models until
    dynamo is reset); the bytes still allocated and reserved after. cuBLAS keeps a workspace per (handle, stream),
    allocated from the caching allocator and never freed: 32 MiB each for cuBLAS and cuBLASLt on an H200, per thread
    and stream that ran a matmul (a graph's capture stream adds its own), so they are dropped too. A job's peak
    then holds its own workspaces, as a fresh process's would, not every earlier job's."""
    import gc

    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if device.type != "cuda":
        return 0, 0
    torch.cuda.synchronize(device)
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def reset_peak(device: torch.device) -> None:
    """Start a peak: give cached blocks back first (what building a model or an earlier step left), so that the
    reserved peak is what the steps after need."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Tokens and samples per second over the steps after warm-up, timed without a synchronisation per step: a
    window opens at a point where the device is idle (`synced`, after a read of the step's accumulators) and
    closes at the next one, and its steps' host-side token counts (`add`) are credited to it. Time spent outside
    training (evaluation) is left out: `synced(..., resume=False)` closes a window without opening the next. Each
    window's seconds per step are kept in order (`step_time_windows_s`): how steady the step was within the job,
    beside how it compares with another job's."""

    def __init__(self, device: torch.device, warmup_steps: int):
        self.device, self.warmup = device, warmup_steps
        self.steps = self.tokens = self.samples = 0
        self.seconds = 0.0
        self.windows: list[float] = []  # seconds per step of each closed window, in order
        self._t0 = None
        self._open = [0, 0, 0]  # steps, tokens, samples in the open window

    def add(self, step: int, tokens: int, samples: int) -> None:
        """A step was launched (0-based `step`); counted when past the warm-up."""
        if step >= self.warmup:
            self._open[0] += 1
            self._open[1] += tokens
            self._open[2] += samples

    def synced(self, steps_done: int, resume: bool = True) -> None:
        """The device has finished `steps_done` steps (the caller synchronised): close the open window and, with
        `resume`, open the next if the warm-up is over."""
        synchronize(self.device)
        now = time.perf_counter()
        if self._t0 is not None and self._open[0]:
            self.seconds += now - self._t0
            self.windows.append((now - self._t0) / self._open[0])
            self.steps += self._open[0]
            self.tokens += self._open[1]
            self.samples += self._open[2]
        self._open = [0, 0, 0]
        self._t0 = now if resume and steps_done >= self.warmup else None

    def columns(self) -> dict[str, float]:
        if self.steps == 0:
            nan = float("nan")
            return {"tokens_per_s": nan, "samples_per_s": nan, "step_time_s": nan, "timed_steps": 0,
                    "step_time_windows_s": []}
        return {"tokens_per_s": self.tokens / self.seconds, "samples_per_s": self.samples / self.seconds,
                "step_time_s": self.seconds / self.steps, "timed_steps": self.steps,
                "step_time_windows_s": list(self.windows)}
