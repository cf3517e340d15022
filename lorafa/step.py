"""A job's training step (`lorafa.train.fit`), run the way the bench's fastest mode runs its step (`lorafa.bench`,
which shares the capture code here).

`train.compile` picks the way:
  none    eager PyTorch
  blocks  each transformer block compiled with torch.compile (regional: identical blocks share one graph)
  graph   compiled blocks, and the whole step — forward, backward, gradient clipping, the fused capturable AdamW
          step, the loss and divergence bookkeeping — captured as one CUDA graph per batch shape and replayed: no
          Python, dispatch or kernel launches per step. The learning-rate schedule writes the optimizer's lr
          tensors (`DeviceLR`), which the graph reads.
  eager_graph  the same whole-step CUDA graphs of eager kernels: nothing compiled, so a new batch shape costs one
          capture (milliseconds), not a compilation (seconds)
  auto    a graph where it is exact (`graph_blockers` lists what rules it out: CPU, several processes, gradient
          accumulation, checkpointed or element-wise recomputed blocks, LoRA-FA adapter dropout — whose masks are
          drawn from host-side seeds a graph would freeze), none otherwise: `graph` for jobs of at least
          COMPILE_MIN_STEPS optimizer steps, where compiling pays for itself, `eager_graph` for shorter ones. The
          default.

No host synchronisation per step (one process): each step's loss and a "first non-finite step" mark stay on the
device (`Accumulators`) and are read every `train.log_every` steps, at checkpoints, before evaluation and at the
end. A step whose loss or gradient norm is not finite takes no update (fused AdamW's `found_inf`); the next read
raises `Diverged` naming it, so a diverged job stops with the weights of the step before. Token counts come from
the host-side batches, which are collated, pinned and copied without waiting for the device.

Graph mode, per batch shape: two compiled steps run eager first (compilation happens there), the third is captured
and replayed, and every later batch of that shape is copied into the graph's static inputs and replayed. All
graphs share one memory pool (they run one at a time and keep nothing between replays but the weights, optimizer
state and accumulators, which live outside it). A batch of another size (an epoch's last, partial batch) runs
eager. The steps whose memory is measured (`lorafa.measure`) run eager too, so the memory split is the eager one
(column `measured_mode`). A capture that fails (out of memory, an operation a graph cannot hold) leaves that
shape eager and is counted in `graph_failures`.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

GRAPHED = ("graph", "eager_graph")
COMPILED = ("blocks", "graph")
COMPILE_MIN_STEPS = 2000  # auto: compile the blocks under the graphs only for jobs this long (see `resolve_mode`)
GRAPH_WARMUP = 2  # a job: compiled steps of a shape before it is captured (the first compiles)
RECOMPILE_LIMIT = 64


def graph_blockers(cfg, device: torch.device) -> list[str]:
    """Why the whole step cannot be one CUDA graph for this job (empty: it can)."""
    m, t = cfg.method, cfg.train
    why = []
    if device.type != "cuda":
        why.append(f"device {device.type} (CUDA graphs need a CUDA device)")
    if str(t.get("strategy", "single")) != "single":
        why.append(f"train.strategy={t.strategy} (graphs are captured for one process)")
    if int(t.get("grad_accum", 1)) != 1:
        why.append(f"train.grad_accum={t.grad_accum} (one graph holds one micro-batch's step)")
    if m.get("gradient_checkpointing", False):
        why.append("method.gradient_checkpointing (its recomputation saves and restores host RNG state)")
    if str(m.get("recompute", "none")) != "none":
        why.append(f"method.recompute={m.recompute} (its dropout masks are drawn from host-side seeds)")
    if m.get("offload", False):
        why.append("method.offload (host copies on a side stream, decided per tensor on the host)")
    if m.get("offload_weights", False):
        why.append("method.offload_weights (the blocks' weights swapped on the host between forward and backward)")
    if not m.get("train_a", True) and float(m.get("dropout", 0.0)) > 0 and int(m.get("rank", 0)) > 0:
        why.append(f"method.dropout={m.dropout} with A frozen (LoRA-FA redraws its mask from a host-side seed, "
                   "which a graph would freeze)")
    if cfg.get("model") is not None and cfg.model.get("quantize"):
        why.append(f"model.quantize={cfg.model.quantize} (its layers run eager, untested in a graph)")
    if cfg.get("task") is not None and cfg.task.get("packing", False):
        why.append("task.packing (transformers finds the packed examples by reading the position ids on the host)")
    return why


def resolve_mode(cfg, device: torch.device, steps: int) -> tuple[str, str]:
    """(`none` | `blocks` | `graph` | `eager_graph`, why) for a job of `steps` optimizer steps: `train.compile=auto`
    is a graph where `graph_blockers` finds nothing, compiled when the job is long enough to pay for compiling.
    On an H200 (bf16, r = 8) compiling saved 18 % of a graphed roberta-base 32×128 step (10.1 → 8.3 ms) and 31 %
    of a t5-large one, and cost seconds per block kind and batch shape: at a few hundred steps the compilation
    takes longer than it saves."""
    from .checks import BadInput

    asked = str(cfg.train.get("compile", "auto"))
    blockers = graph_blockers(cfg, device)
    if asked == "auto":
        if blockers:
            return "none", "auto: eager, " + "; ".join(blockers)
        if steps >= COMPILE_MIN_STEPS:
            return "graph", f"auto: {steps} steps ≥ {COMPILE_MIN_STEPS}, compiled"
        return "eager_graph", f"auto: {steps} steps < {COMPILE_MIN_STEPS}, not compiled"
    if asked in GRAPHED and blockers:
        raise BadInput("train.compile=graph: not possible here: " + "; ".join(blockers)
                       + " (train.compile=auto picks eager then; blocks compiles without a graph)")
    return asked, asked


def bucket_multiple(tcfg, max_len: int, mode: str) -> int:
    """`train.bucket`: every batch is padded to a multiple of this (at most the task's length), so that a job sees
    a few shapes — one graph (and one compiled variant) each. auto: for compiled and graphed modes, a multiple of
    32 giving at most 8 shapes (128 → 32, 512 → 64, 1024 → 128); 0 (each batch padded to its longest, as eager
    PyTorch) in eager mode."""
    value = tcfg.get("bucket", "auto")
    if str(value) == "auto":
        return 32 * math.ceil(max_len / (8 * 32)) if mode != "none" else 0
    return int(value)


def bucket_length(n: int, multiple: int, cap: int) -> int:
    """A length of `n` tokens padded to the next multiple of `multiple`, never beyond `cap` (`multiple` 0: n)."""
    if multiple <= 0 or n >= cap:
        return n
    return min(cap, multiple * math.ceil(n / multiple))


def choose_layer(method, device: torch.device, tokens_per_batch: int, hidden: int) -> str:
    """`method.stacked=auto`: LoRA-FA's layer for a job, by the rule the bench's measurements give (H200, bf16,
    r = 8, results/throughput.parquet, each method's best mode): the merged layer (W + s·B·A formed once a step;
    no rank-r passes over the N × d activations) wins where a step's tokens N outnumber the hidden width d —
    roberta-base 32×128 (N/d = 5.3) by 18 % over two_matmul, t5-large (4.0) by 13 % — and loses where they do not
    (llama-7b 4×512, N/d = 0.5: −10 %), where the stacked layer is as fast as any. With adapter dropout neither
    stacked layer runs (the layer falls back to `_LoRAFAFunction`): two_matmul; off CUDA (not measured) too.
    Returns the layer's `method.stacked` value: "merged", "true" or "false"."""
    if method.get("train_a", True) or int(method.get("rank", 0)) <= 0 or device.type != "cuda":
        return "false"
    if float(method.get("dropout", 0.0)) > 0:
        return "false"
    return "merged" if tokens_per_batch >= hidden else "true"


def compile_limits() -> None:
    """torch.compile may keep up to RECOMPILE_LIMIT variants of a function (a model's blocks differ: the first takes
    the embeddings, T5's first computes the position bias; every batch shape is one more), and a function that
    needs more fails (a row) instead of silently running eager for the rest, as torch.compile does past 8.
    Shapes stay static (one specialised variant per bucket, which is what a CUDA graph replays), not dynamic."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name first
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
            break
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)
            break
    if hasattr(cfg, "automatic_dynamic_shapes"):
        cfg.automatic_dynamic_shapes = False


def _unpacked(position_ids) -> None:
    """transformers' `find_packed_sequence_indices` for batches known to hold one sequence a row: none packed."""


def _mask_traced(real):
    """transformers' `is_tracing` for masking_utils inside a capture: a padding mask counts as traced (its values are
    not read to decide whether it may be skipped); everything else gets the real answer."""

    def is_tracing(tensor=None) -> bool:
        return tensor is not None or real(tensor)

    return is_tracing


@contextmanager
def masking_as(is_tracing):
    """transformers' masking_utils with `is_tracing` replaced by `is_tracing(real_is_tracing)` and packed-sequence
    detection answered without a read (`_unpacked`: a job's batches hold one sequence a row). Used inside a
    captured step (`unseen_capture`) and in the predictor's fake-tensor run (`lorafa.memory`)."""
    from transformers import masking_utils

    tracing = masking_utils.is_tracing
    packed = getattr(masking_utils, "find_packed_sequence_indices", None)
    masking_utils.is_tracing = is_tracing(tracing)
    if packed is not None:
        masking_utils.find_packed_sequence_indices = _unpacked
    try:
        yield
    finally:
        masking_utils.is_tracing = tracing
        if packed is not None:
            masking_utils.find_packed_sequence_indices = packed


@contextmanager
def unseen_capture():
    """Inside a whole-step capture, transformers takes the path it takes in an eager step of the same batch and
    reads no tensor value on the host:

    - `torch.cuda.is_current_stream_capturing()` says False. Told of a capture, transformers 5.17 builds full
      attention masks even where none is needed (no padding mask; a decoder's causal mask, which eager leaves to
      SDPA's `is_causal`): SDPA, handed a mask, leaves the flash kernel (on an H200 roberta-base's graphed step ran 6
      fp32 GEMMs a layer), and compiled blocks warmed up eagerly meet a mask they were not compiled for and must
      recompile inside the capture (T5's decoder on padded batches did).
    - masking_utils takes a padding mask as traced: it builds the mask without reading the values to see whether
      the mask could be skipped. Eager decides the same for every batch a graph captures, since a job drops a mask
      without padding before the step.
    - Decoders: transformers reads their position ids on the host to find packed sequences
      (`find_packed_sequence_indices`). A captured step's batches hold one sequence a row (position ids are passed
      only by packed windows, `task.packing`, which `graph_blockers` keeps out of graphs), so the answer — none
      packed — is given without the read.

    With these, nothing in a captured step reads a tensor's value on the host (tested for the three families, with
    and without padding). torch's own capture checks (the optimizer's) ask the stream, not this function."""
    real = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: False
    try:
        with masking_as(_mask_traced):
            yield
    finally:
        torch.cuda.is_current_stream_capturing = real


def after_failed_capture(device: torch.device, graph, pool, stream) -> None:
    """Put the process back as it was before a capture that failed. When the capture itself is invalid, torch's
    `capture_end` raises before it stops routing the capture stream's allocations to the graph's private pool, the
    graph never releases that pool, and `torch.cuda.graph` leaves the capture stream current: every later
    allocation on that stream lands in a pool nothing frees (on the H200 a failed llama-7b capture kept 139.7 of
    139.8 GiB, and every later setting was an out-of-memory row). So: the stream back, the pool's routing ended and
    the pool released — only when the capture did not end, since a graph that ended its capture releases its
    pool itself — and the CUDA generator reset."""
    torch.cuda.set_stream(stream)
    try:
        graph.pool()  # raises unless the capture ended
        ended = True
    except RuntimeError:
        ended = False
    if not ended:
        index = device.index if device.index is not None else torch.cuda.current_device()
        for release in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
            try:
                getattr(torch._C, release)(index, pool)
            except Exception as err:  # noqa: BLE001 - best effort: the failure itself is reported by the caller
                print(f"after the failed capture, torch._C.{release}: {type(err).__name__}: {err}", file=sys.stderr)
    reset_cuda_rng(device)


def reset_cuda_rng(device: torch.device) -> None:
    """A failed capture leaves the default CUDA generator marked as capturing, so every later random draw (the
    next setting's dropout) would fail too: give it a fresh state, seeded as before."""
    gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    fresh = torch.Generator(device=device)
    fresh.manual_seed(gen.initial_seed())
    gen.graphsafe_set_state(fresh.graphsafe_get_state())


def capture(body, *, device: torch.device, pool, strict: bool):
    """`body` (one whole training step) captured as a CUDA graph on the current stream, in `pool` (a new one when
    None); returns (graph, pool). The capture runs nothing: the step runs at each `replay()`. `strict`: compiled
    code must not recompile inside the capture (compiling launches work that invalidates it; a recompile raises at
    once, naming its guard). transformers is not told of the capture (`unseen_capture`). A failed capture
    is cleaned up (`after_failed_capture`) and re-raised. (Tests put a stand-in here to run the graph logic on
    CPU.)"""
    graph = torch.cuda.CUDAGraph()
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    stream = torch.cuda.current_stream(device)
    stance = torch.compiler.set_stance("fail_on_recompile") if strict else nullcontext()
    try:
        # thread_local: the backward runs in autograd's device thread, which is part of this capture
        with stance, torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"), \
                unseen_capture():
            body()
    except Exception:
        after_failed_capture(device, graph, pool, stream)
        raise
    return graph, pool


def _reserved(device: torch.device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def _reserved_after_release(device: torch.device) -> int:
    """Bytes the caching allocator reserves once the device is idle and cached blocks are given back (what
    `torch.cuda.graph` does on entry, first: a capture's pool growth is then its own)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


class DeviceLR:
    """The optimizer's learning rates as device tensors that a captured step reads, kept current by the host-side
    schedule. The optimizer and its scheduler are built with float rates (so the schedule's base rates stay
    floats: a tensor base rate can be overwritten in place by the schedule's own updates), then each group's rate
    becomes a tensor here; after every `scheduler.step()`, `refresh` copies the new rate into it — in place, so the
    graphs see it — whether the scheduler wrote into the tensor or replaced it with a float."""

    def __init__(self, optimizer, device: torch.device):
        self.optimizer = optimizer
        self.tensors = []
        for group in optimizer.param_groups:
            t = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
            group["lr"] = t
            self.tensors.append(t)

    def refresh(self) -> None:
        for t, group in zip(self.tensors, self.optimizer.param_groups):
            if group["lr"] is not t:
                t.fill_(float(group["lr"]))
                group["lr"] = t


class Diverged(RuntimeError):
    """The training loss (or the gradient norm) became NaN or infinite."""


def diverged(loss: float, norm: float | None, step: int) -> Diverged:
    if not math.isfinite(loss):
        return Diverged(f"training loss is {loss} at step {step}")
    return Diverged(f"gradient norm is {norm} at step {step} (loss {loss:.4g})")


class Accumulators:
    """A job's per-step bookkeeping on the device: each step's loss (`losses[i]`), the index of the next step, and
    the first step whose loss or gradient norm was not finite (-1: none). `read` brings what accumulated since the
    last read to the host in one copy (the only synchronisation)."""

    def __init__(self, steps: int, device: torch.device, start: int = 0):
        self.losses = torch.zeros(max(steps, 1), dtype=torch.float32, device=device)
        self.norms = torch.zeros(max(steps, 1), dtype=torch.float32, device=device)
        self.index = torch.full((), start, dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.read_upto = start  # steps already read
        self.reads = 0

    def record(self, loss: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """Device ops only (capturable): store the step's loss and norm, mark it if not finite; returns the
        not-finite flag as a float (fused AdamW's `found_inf`)."""
        bad = ~torch.isfinite(loss)
        if norm is not None:
            bad = bad | ~torch.isfinite(norm)
            self.norms.index_copy_(0, self.index.view(1), norm.detach().float().view(1))
        self.losses.index_copy_(0, self.index.view(1), loss.detach().float().view(1))
        self.first_bad.copy_(torch.where((self.first_bad < 0) & bad, self.index, self.first_bad))
        self.index.add_(1)
        self.found_inf.copy_(bad.float())
        return self.found_inf

    def read(self, upto: int) -> tuple[list[float], list[float], int]:
        """(losses, gradient norms of steps `read_upto`..`upto`-1, first non-finite step or -1): one host copy."""
        start = self.read_upto
        packed = torch.cat([self.losses[start:upto], self.norms[start:upto], self.first_bad.float().view(1)]).cpu()
        self.read_upto = upto
        self.reads += 1
        n = upto - start
        return packed[:n].tolist(), packed[n: 2 * n].tolist(), int(packed[-1])


@dataclass
class GraphStats:
    captured: int = 0
    replays: int = 0
    failures: int = 0
    pool_bytes: int = 0  # reserved by the captures (their shared private pool), measured around each
    errors: list[str] = field(default_factory=list)
    eval_captured: int = 0  # evaluation forwards (`TrainStep.eval_forward`), in the same pool
    eval_replays: int = 0


def _shape_key(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))


class TrainStep:
    """A job's optimizer step in the job's mode (see the module docstring): `run` takes one micro-batch through
    the whole step (eager, or captured and replayed); `finish` ends a step whose forwards and backwards ran
    elsewhere (`lorafa.train._group_step`: measured steps, gradient accumulation, several processes) with clipping,
    the check, the update and the accumulators. `device_checks`: divergence is kept on the device and the
    optimizer skips a non-finite step by itself (fused AdamW); otherwise (foreach AdamW: CPU, several processes)
    the step reads the flag on the host before updating, as eager training always did."""

    def __init__(self, model: nn.Module, optimizer, *, mode: str, device: torch.device, amp: torch.dtype | None,
                 max_grad_norm: float | None, accumulators: Accumulators, device_checks: bool,
                 forward=None):
        self.model, self.optimizer, self.mode, self.device, self.amp = model, optimizer, mode, device, amp
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        self.acc, self.device_checks = accumulators, device_checks
        self.forward = forward or model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs: dict = {}  # shape key → (CUDAGraph, static inputs), or None: eager for good
        self.seen: Counter = Counter()
        self.shapes: set = set()  # shape keys whose full step has run (compiled modes: compiled)
        self.stats = GraphStats()
        self.pool = None
        self.eval_graphs: dict = {}  # shape key → (CUDAGraph, static inputs, {"out": outputs}), or None: eager
        self.eval_seen: Counter = Counter()
        self.stream = torch.cuda.Stream(device) if mode in GRAPHED and device.type == "cuda" else None

    def autocast(self):
        # a captured step needs autocast's cast cache off (cached casts made during capture would be freed)
        return torch.autocast(self.device.type, dtype=self.amp, cache_enabled=self.mode not in GRAPHED) \
            if self.amp else nullcontext()

    def context(self):
        """Run the job's steps (and the rest of training) on the graphs' stream: warm-ups, captures and replays in
        one order, and the data copies with them."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def finish(self, loss: torch.Tensor, step: int) -> None:
        """Clip, check, update, record — device ops only when `device_checks`; otherwise a non-finite loss or
        gradient norm raises `Diverged` here, before the update."""
        norm = None
        if self.max_grad_norm and self.optimizer is not None:
            norm = nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if hasattr(norm, "full_tensor"):  # FSDP's DTensor norm
                norm = norm.full_tensor()
        found_inf = self.acc.record(loss, norm)
        if not self.device_checks:
            loss_v, norm_v = float(loss), (float(norm) if norm is not None else 0.0)
            if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                raise diverged(loss_v, norm_v, step)
        if self.optimizer is None:
            return
        if self.device_checks:
            self.optimizer.found_inf = found_inf  # fused AdamW skips the whole update when it is 1
        self.optimizer.step()

    def _whole(self, batch: dict, step: int) -> None:
        """One micro-batch's forward, backward and the step's end: what a graph captures, or eager runs."""
        with self.autocast():
            loss = self.forward(**batch).loss
        loss.backward()
        self.finish(loss.detach().float(), step)

    def eager(self, batch: dict, step: int, *, force_eager: bool = False) -> None:
        """The whole step, run eagerly (compiled blocks stay compiled unless `force_eager`)."""
        with torch.compiler.set_stance("force_eager") if force_eager else nullcontext():
            self._whole(batch, step)
        self.model.zero_grad(set_to_none=True)

    def run(self, batch: dict, step: int, *, full: bool = True) -> None:
        """One optimizer step on one (device) batch. Graph mode: a shape's first steps compiled and eager, then
        captured and replayed from then on; a batch that is not `full` (an epoch's last) eager, uncompiled."""
        key = _shape_key(batch)
        if full:
            self.shapes.add(key)
        if self.mode not in GRAPHED or not full or self.graphs.get(key, ()) is None:
            self.eager(batch, step, force_eager=not full and self.mode != "none")
            return
        if key in self.graphs:
            graph, static = self.graphs[key]
            for k, v in batch.items():
                static[k].copy_(v, non_blocking=True)
            graph.replay()
            self.stats.replays += 1
            return
        self.seen[key] += 1
        if self.seen[key] <= GRAPH_WARMUP:
            self.eager(batch, step)
            return
        self._capture(key, batch, step)

    def one_time(self, batch: dict, *, full: bool = True) -> bool:
        """Whether `run` on this batch is one of its shape's one-time steps: in graphed modes every step before the
        shape's graph exists (the eager warm-ups, compiling in `graph` mode, and the capture), in `blocks` mode
        the shape's first step (it compiles). Such a step does not measure the mode's speed (`lorafa.train` leaves
        it out of tokens/s); with length buckets a shape can first appear long after the warm-up. A shape whose
        capture failed runs eager from then on: its steps are timed."""
        if not full or self.mode == "none":
            return False
        key = _shape_key(batch)
        if self.mode in GRAPHED:
            return key not in self.graphs
        return self.mode in COMPILED and key not in self.shapes

    def _capture(self, key, batch: dict, step: int) -> None:
        static = {k: v.clone() for k, v in batch.items()}
        self.model.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool

        def body():
            self._whole(static, step)

        before = _reserved_after_release(self.device)
        try:
            graph, self.pool = capture(body, device=self.device, pool=self.pool, strict=self.mode == "graph")
        except Exception as err:  # noqa: BLE001 - this shape stays eager; the job goes on
            self.model.zero_grad(set_to_none=True)
            self.graphs[key] = None
            self._capture_failed(err, "the step", key)
            self.eager(batch, step, force_eager=True)
            return
        self.stats.pool_bytes += max(0, _reserved(self.device) - before)
        self.model.zero_grad(set_to_none=True)  # the pool's gradients: read by the graph only
        self.graphs[key] = (graph, static)
        self.stats.captured += 1
        graph.replay()  # the capture ran nothing: this batch's step
        self.stats.replays += 1

    def _capture_failed(self, err: Exception, what: str, key, prefix: str = "") -> None:
        """A capture that failed: counted, its error kept for the row and logged; after an out-of-memory, the
        allocator's cached blocks given back."""
        self.stats.failures += 1
        self.stats.errors.append(f"{prefix}{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"[:300])
        print(f"lorafa: capturing {what} for shape {dict(key)} failed ({self.stats.errors[-1]}); "
              "that shape runs eager", file=sys.stderr)
        if isinstance(err, torch.cuda.OutOfMemoryError):
            _reserved_after_release(self.device)

    def eval_forward(self, fn, batch: dict, *, capturable: bool) -> tuple:
        """`fn(batch)` — an evaluation batch's forward, returning a tuple of device tensors (or None) — run the
        job's way. In graphed modes, where `capturable` (`lorafa.tasks.Poser.capturable`: nothing in `fn` reads a
        tensor on the host), a shape's first batch runs eager, its second is captured (eager kernels: compiled
        blocks run eager in evaluation) in the training graphs' pool and replayed from then on; what a replay
        returns is copied out at once, since a later replay of any graph in the pool may overwrite it. Elsewhere,
        and for a shape whose capture failed, `fn` runs eager."""
        if self.mode not in GRAPHED or not capturable:
            return fn(batch)
        key = _shape_key(batch)
        found = self.eval_graphs.get(key, ())
        if found is None:
            return fn(batch)
        if found:
            graph, static, held = found
            for k, v in batch.items():
                static[k].copy_(v, non_blocking=True)
            graph.replay()
            self.stats.eval_replays += 1
            return tuple(o.clone() if torch.is_tensor(o) else o for o in held["out"])
        self.eval_seen[key] += 1
        if self.eval_seen[key] < 2:
            return fn(batch)
        static = {k: v.clone() for k, v in batch.items()}
        held: dict = {}

        def body():
            held["out"] = fn(static)

        before = _reserved_after_release(self.device)
        try:
            graph, self.pool = capture(body, device=self.device, pool=self.pool, strict=False)
        except Exception as err:  # noqa: BLE001 - this shape stays eager; the evaluation goes on
            self.eval_graphs[key] = None
            self._capture_failed(err, "the evaluation forward", key, prefix="eval ")
            return fn(batch)
        self.stats.pool_bytes += max(0, _reserved(self.device) - before)
        self.eval_graphs[key] = (graph, static, held)  # held["out"]: the graph's output tensors
        self.stats.eval_captured += 1
        return self.eval_forward(fn, batch, capturable=True)  # replays it

    def columns(self) -> dict:
        return {"graph_shapes": self.stats.captured, "graph_replays": self.stats.replays,
                "graph_failures": self.stats.failures, "graph_error": "; ".join(self.stats.errors)[:500],
                "eval_graph_shapes": self.stats.eval_captured, "eval_graph_replays": self.stats.eval_replays,
                "mem_graph_pool_gib": self.stats.pool_bytes / 1024**3}  # 0: no graph
