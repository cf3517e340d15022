"""Memory plans: which transformer blocks recompute their activations in backward, and what they keep.

`method.gradient_checkpointing` names the blocks (transformers' `GradientCheckpointingLayer`s, in module order:
T5's encoder blocks, then its decoder blocks) whose activations are recomputed in backward instead of saved:

| value | blocks checkpointed |
|---|---|
| `false` | none |
| `true` | all |
| `every:k` | blocks 0, k, 2k, … (torchtune's per-layer checkpointing) |
| `first:n` | the first n blocks |
| `[i, j, …]` | those blocks (0-based) |

`method.checkpoint_policy` says what a checkpointed block still keeps, through PyTorch's selective checkpointing
(`torch.utils.checkpoint.create_selective_checkpoint_contexts`):

| policy | kept in forward (the rest is recomputed in backward) |
|---|---|
| `full` | nothing but the block's input |
| `matmuls` | the outputs of every matrix multiplication (`mm`, `addmm`, `bmm`, `baddbmm`) |
| `matmuls_attention` | those and the attention kernels' outputs (SDPA's flash / memory-efficient / cuDNN / math-for-CPU) |

What a policy keeps is held by the checkpoint itself, not through autograd's saved-tensor hooks, so the
checkpoint tells `lorafa.measure` (`note_saved`) while a measurement or a prediction counts: the memory columns
and `lorafa.memory.predict` see it as saved activations.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import measure
from .checks import BadInput

MATMULS = ("mm", "addmm", "bmm", "baddbmm")
ATTENTION = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
POLICIES = {"full": (), "matmuls": MATMULS, "matmuls_attention": MATMULS + ATTENTION}


def _ops(names: tuple[str, ...]) -> frozenset:
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


def checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks transformers can checkpoint, in module order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def parse(spec) -> tuple[str, object]:
    """`method.gradient_checkpointing` → (kind, argument): ("none", None), ("all", None), ("every", k),
    ("first", n) or ("list", [i, …]); anything else is bad input naming what is accepted."""
    if spec is None or spec is False:
        return "none", None
    if spec is True:
        return "all", None
    if isinstance(spec, (list, tuple)) or type(spec).__name__ == "ListConfig":
        items = list(spec)
        if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            return "list", sorted(set(items))
    elif isinstance(spec, str) and ":" in spec:
        kind, _, arg = spec.partition(":")
        if kind in ("every", "first") and arg.isdigit() and int(arg) >= 1:
            return kind, int(arg)
    raise BadInput(f"method.gradient_checkpointing={spec}: expected true, false, every:K, first:N (K, N ≥ 1) "
                     "or a list of block indices ≥ 0")


def check(method) -> tuple[object, str]:
    """A method's checkpointing keys, checked (bad input otherwise): (`gradient_checkpointing`, `checkpoint_policy`).
    Block indices past the model's last are checked when applied."""
    spec = method.get("gradient_checkpointing", False)
    parse(spec)
    policy = str(method.get("checkpoint_policy", "full"))
    if policy not in POLICIES:
        raise BadInput(f"method.checkpoint_policy={policy}: expected one of {', '.join(POLICIES)}")
    return spec, policy


def selected(spec, n_blocks: int) -> list[int]:
    """Indices of the blocks `spec` checkpoints among `n_blocks` (a list naming a block past the last: bad input)."""
    kind, arg = parse(spec)
    if kind == "none":
        return []
    if kind == "all":
        return list(range(n_blocks))
    if kind == "every":
        return list(range(0, n_blocks, arg))
    if kind == "first":
        return list(range(min(arg, n_blocks)))
    if arg and arg[-1] >= n_blocks:
        raise BadInput(f"method.gradient_checkpointing={arg}: block {arg[-1]} does not exist; the model has "
                         f"{n_blocks} blocks (0…{n_blocks - 1})")
    return arg


class _NoteKept(TorchDispatchMode):
    """Inside a checkpointed block's forward, under selective checkpointing's caching mode: the outputs of the ops
    the policy keeps, told to `lorafa.measure` as saved."""

    def __init__(self, kept: frozenset):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.kept:
            measure.note_saved(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


@contextmanager
def _entered(*contexts):
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _policy_contexts(kept: frozenset):
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE

    forward, recompute = create_selective_checkpoint_contexts(policy)
    if measure.counting_saved():  # a measured or predicted forward: what the policy keeps is counted as saved
        forward = _entered(forward, _NoteKept(kept))
    return forward, recompute


def apply(model: nn.Module, method) -> int:
    """Checkpoint the blocks `method.gradient_checkpointing` names, keeping what `method.checkpoint_policy` says;
    returns how many blocks recompute. Non-reentrant checkpointing: it works with frozen inputs and restores the
    random state, so dropout masks (the model's and LoRA-FA's) are redrawn the same in the recompute."""
    spec, policy = check(method)
    layers = checkpoint_layers(model)
    chosen = selected(spec, len(layers))
    if not chosen:
        return 0
    kwargs = {"use_reentrant": False}
    if POLICIES[policy]:
        kwargs["context_fn"] = partial(_policy_contexts, _ops(POLICIES[policy]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    keep = set(chosen)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep
    return len(chosen)


def describe(method) -> str:
    """The plan in one line, for the row's `plan` column: checkpointing (which blocks, what they keep),
    element-wise recomputation and offloading; `none` when the step saves everything on the device."""
    parts = []
    kind, arg = parse(method.get("gradient_checkpointing", False))
    if kind != "none":
        which = ("all blocks" if kind == "all" else f"every:{arg} blocks" if kind == "every"
                 else f"the first {arg} blocks" if kind == "first" else "blocks " + ", ".join(map(str, arg)))
        parts.append(f"checkpoint {which} (keep {method.get('checkpoint_policy', 'full')})")
    if str(method.get("recompute", "none")) != "none":
        parts.append(f"recompute {method.get('recompute')}")
    if method.get("offload", False):
        parts.append(f"offload saved tensors ≥ {float(method.get('offload_min_kib', 1024)):g} KiB to the host")
    return "; ".join(parts) or "none"


class Offload:
    """`method.offload`: the tensors the transformer blocks save for backward (a checkpointed block's input
    included; the final norm, output projection and loss excluded) held in host memory between forward and
    backward. On CUDA each goes to pinned host memory on a side stream, overlapping the forward's compute (the
    device copy is held until its copy is done), and comes back on that stream when backward needs it; the compute
    stream waits only for the copy it needs. Tensors under `min_bytes` (`method.offload_min_kib`) and the model's
    own parameters stay. What stays is told to `lorafa.measure` as saved (these hooks are the innermost during the
    forward: a measurement's own hooks do not see it); `host_bytes` is what the last forward put on the host."""

    def __init__(self, model: nn.Module, min_bytes: int):
        self.model, self.min_bytes = model, int(min_bytes)
        self.layers = checkpoint_layers(model)
        self.weights: set = set()
        self.host_bytes = 0
        self._hooks = None
        self._past_blocks = False
        self._pending: list = []  # (device tensor, copy event) until its host copy is done
        self._seen: dict = {}  # this forward's packed tensors by id (with a weak reference): one copy each
        self.stream = None
        model.lorafa_offload = self  # the measured step reads host_bytes
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit, always_call=True)
        if self.layers:
            self.layers[-1].register_forward_hook(self._last_block_done)

    def _enter(self, module, args):
        if not (module.training and torch.is_grad_enabled()) or self._hooks is not None:
            return
        self.weights = {measure.storage_id(t) for t in list(self.model.parameters()) + list(self.model.buffers())}
        self.host_bytes, self._past_blocks, self._seen = 0, False, {}
        self._release_done()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def _exit(self, module, args, output):
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def _last_block_done(self, module, args, output):
        self._past_blocks = True

    def _release_done(self) -> None:
        self._pending = [(t, e) for t, e in self._pending if not e.query()]

    def _pack(self, t: torch.Tensor):
        if (self._past_blocks or not isinstance(t, torch.Tensor) or isinstance(t, nn.Parameter)
                or t.device.type == "meta" or measure.storage_id(t) in self.weights
                or t.untyped_storage().nbytes() < self.min_bytes):
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                measure.note_saved([t])  # stays on the device: a saved activation like any other
            return t
        seen = self._seen.get(id(t))  # the same tensor saved again (one input of several matmuls): one copy
        if seen is not None and seen[0]() is t:  # (a dead tensor's id can come back: the weak reference says)
            return seen[1]
        self.host_bytes += t.numel() * t.element_size()
        if t.device.type != "cuda":  # CPU runs take the same path (a host copy) without streams
            packed = (t.device, t.detach().clone(), None)
            self._seen[id(t)] = (weakref.ref(t), packed)
            return packed
        if self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        self._release_done()
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._pending.append((t, done))
        packed = (t.device, host, done)
        self._seen[id(t)] = (weakref.ref(t), packed)
        return packed

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        if done is None:
            return host.to(device)
        self._release_done()  # device copies whose host copy is done are let go during backward too
        for t, e in self._pending:  # still on the device: no copy back
            if e is done:
                return t
        current = torch.cuda.current_stream(device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            back = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        current.wait_event(ready)
        back.record_stream(current)  # the allocator: used on the compute stream from here
        return back


def offload(model: nn.Module, method) -> Offload | None:
    """`method.offload=true`: an `Offload` on the model (None when off)."""
    if not method.get("offload", False):
        return None
    return Offload(model, int(float(method.get("offload_min_kib", 1024)) * 1024))


# ---- choosing a plan for a memory budget (`train.memory_budget_gib`) ----

PLAN_KEYS = ("gradient_checkpointing", "checkpoint_policy", "offload", "recompute")


@dataclass(frozen=True)
class Plan:
    """The method keys a plan sets; everything else of the job stays as configured."""

    gradient_checkpointing: object = False
    checkpoint_policy: str = "full"
    offload: bool = False
    recompute: str = "none"

    def keys(self) -> dict:
        value = list(self.gradient_checkpointing) if isinstance(self.gradient_checkpointing, tuple) \
            else self.gradient_checkpointing
        return {"gradient_checkpointing": value, "checkpoint_policy": self.checkpoint_policy,
                "offload": self.offload, "recompute": self.recompute}


def candidates(n_blocks: int, offload: bool = True) -> list[Plan]:
    """The plans a budget chooses among, from saving everything to recomputing every block with its input on the
    host: checkpointing none, every 4th / 3rd / 2nd block or all, each with and without element-wise recomputation
    and with and without offloading (only where the device is not the host: `offload`); and every block with the
    `matmuls` policy."""
    every = [f"every:{k}" for k in (4, 3, 2) if k < n_blocks]
    out = [Plan(ckpt, "full", off, recompute) for ckpt in (False, *every, True)
           for recompute in ("none", "elementwise") for off in ((False, True) if offload else (False,))]
    return [*out, Plan(True, "matmuls")]


@dataclass(frozen=True)
class Rates:
    """The device's measured rates the step-time model uses: matmul FLOP/s and host↔device copy bytes/s."""

    matmul_flops: float
    copy_bytes: float


def measure_rates(device: torch.device) -> Rates:
    """A short profile of the device in hand: a bf16 8192³ matmul and a pinned 256 MiB host → device → host copy on
    CUDA (an fp32 1024³ matmul and a 64 MiB memory copy on CPU); each the best of 3 after a warm-up."""
    import time

    cuda = device.type == "cuda"
    n, copy_mib = (8192, 256) if cuda else (1024, 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    host = torch.empty(copy_mib * 2**20, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty_like(host, device=device)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            measure.synchronize(device)
            t0 = time.perf_counter()
            fn()
            measure.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    mm = best(lambda: a @ a)
    copy = best(lambda: (dev.copy_(host, non_blocking=cuda), host.copy_(dev, non_blocking=cuda)))
    return Rates(matmul_flops=2 * n**3 / mm, copy_bytes=2 * host.numel() / copy)


def step_seconds(pred, rates: Rates) -> float:
    """A plan's step time, modelled: its forward and backward FLOPs (recomputation included) at the matmul rate,
    plus its offloaded bytes out and back at the copy rate, as if no copy overlapped compute (an upper bound)."""
    return pred.flops / rates.matmul_flops + 2 * pred.host_offload / rates.copy_bytes


def choose(options: list, budget_bytes: float, rates: Rates, budget_label: str):
    """The fastest modelled plan whose predicted peak fits the budget (ties: the one listed first — `candidates`
    lists the less intrusive first; the model counts element-wise recomputation as free), from `options`:
    (plan, prediction) pairs, a prediction None where it failed. Returns (plan, prediction, seconds). None fits:
    bad input naming the smallest predicted peak and its plan."""
    scored = [(step_seconds(p, rates), i, p.peak, plan, p) for i, (plan, p) in enumerate(options) if p is not None]
    fits = [s for s in scored if s[2] <= budget_bytes]
    if not fits:
        if not scored:
            raise BadInput(f"{budget_label}: no plan could be predicted")
        smallest = min(scored, key=lambda s: s[2])
        raise BadInput(f"{budget_label}: no plan fits; the smallest predicted peak is "
                       f"{smallest[2] / measure.GIB:.3g} GiB ({describe(smallest[3].keys())})")
    seconds, _, _, plan, pred = min(fits)
    return plan, pred, seconds
