"""Memory plans: which transformer blocks recompute their activations in backward, and what they keep.

`method.gradient_checkpointing` names the blocks (transformers' `GradientCheckpointingLayer`s, in module order:
T5's encoder blocks, then its decoder blocks) whose activations are recomputed in backward instead of saved:

| value | blocks checkpointed |
|---|---|
| `false` | none |
| `true` | all |
| `every:k` | blocks 0, k, 2k, … (torchtune's per-layer checkpointing) |
| `first:n` | the first n blocks |
| `last:n` | the last n blocks |
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

import itertools
import math
import re
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
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


def parse(spec, key: str = "method.gradient_checkpointing") -> tuple[str, object]:
    """A set of blocks (`method.gradient_checkpointing`, `method.offload`) → (kind, argument): ("none", None),
    ("all", None), ("every", k), ("first", n), ("last", n) or ("list", [i, …]); anything else is bad input naming
    what is accepted."""
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
        if kind in ("every", "first", "last") and arg.isdigit() and int(arg) >= 1:
            return kind, int(arg)
    raise BadInput(f"{key}={spec}: expected true, false, every:K, first:N, last:N (K, N ≥ 1) or a list of block "
                     "indices ≥ 0")


def check(method) -> tuple[object, str]:
    """A method's plan keys, checked (bad input otherwise); returns (`gradient_checkpointing`,
    `checkpoint_policy`). Block indices past the model's last are checked when applied."""
    spec = method.get("gradient_checkpointing", False)
    parse(spec)
    parse(method.get("offload", False), "method.offload")
    parse(method.get("offload_weights", False), "method.offload_weights")
    ops = str(method.get("offload_ops", "all"))
    if ops not in ("all", "linear_outputs"):
        raise BadInput(f"method.offload_ops={ops}: expected all or linear_outputs")
    policy = str(method.get("checkpoint_policy", "full"))
    if policy not in POLICIES:
        raise BadInput(f"method.checkpoint_policy={policy}: expected one of {', '.join(POLICIES)}")
    return spec, policy


def selected(spec, n_blocks: int, key: str = "method.gradient_checkpointing") -> list[int]:
    """Indices of the blocks `spec` names among `n_blocks` (a list naming a block past the last: bad input)."""
    kind, arg = parse(spec, key)
    if kind == "none":
        return []
    if kind == "all":
        return list(range(n_blocks))
    if kind == "every":
        return list(range(0, n_blocks, arg))
    if kind == "first":
        return list(range(min(arg, n_blocks)))
    if kind == "last":
        return list(range(max(0, n_blocks - arg), n_blocks))
    if arg and arg[-1] >= n_blocks:
        raise BadInput(f"{key}={arg}: block {arg[-1]} does not exist; the model has "
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
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5.2x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    keep = set(chosen)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep
    return len(chosen)


def _blocks(kind: str, arg) -> str:
    if kind in ("first", "last"):
        return f"the {kind} block" if arg == 1 else f"the {kind} {arg} blocks"
    if kind == "all":
        return "all blocks"
    if kind == "every":
        return f"every:{arg} blocks"
    steps = {b - a for a, b in itertools.pairwise(arg)}
    if len(arg) > 4 and len(steps) == 1:  # an arithmetic run: its first two, then its last
        return f"blocks {arg[0]}, {arg[1]}, …, {arg[-1]}"
    return "blocks " + ", ".join(map(str, arg))


def describe(method) -> str:
    """The plan in one line, for the row's `plan` column: checkpointing (which blocks, what they keep),
    element-wise recomputation and offloading; `none` when the step saves everything on the device."""
    parts = []
    kind, arg = parse(method.get("gradient_checkpointing", False))
    if kind != "none":
        parts.append(f"checkpoint {_blocks(kind, arg)} (keep {method.get('checkpoint_policy', 'full')})")
    if str(method.get("recompute", "none")) != "none":
        parts.append(f"recompute {method.get('recompute')}")
    kind, arg = parse(method.get("offload", False), "method.offload")
    if kind != "none":
        ops = str(method.get("offload_ops", "all"))
        what = "saved tensors" if ops == "all" else "saved linear-layer outputs"
        parts.append(f"offload {_blocks(kind, arg)} ({what} ≥ {float(method.get('offload_min_kib', 1024)):g}"
                     " KiB) to the host")
    kind, arg = parse(method.get("offload_weights", False), "method.offload_weights")
    if kind != "none":
        parts.append(f"frozen weights of {_blocks(kind, arg)} on the host between forward and backward")
    return "; ".join(parts) or "none"


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


class _Held:
    """One saved tensor on its way to the host and back."""

    __slots__ = ("copied", "dev", "device", "fetched", "host", "nbytes", "ready", "uses")

    def __init__(self, device, host, nbytes):
        self.device, self.host, self.nbytes = device, host, nbytes
        self.uses = 1  # times autograd saved it (a tensor saved by several ops is one copy)
        self.copied = None  # CUDA event: the host copy is done
        self.dev = None  # the device tensor, held until newer copies push it past the in-flight bound
        self.fetched = None  # the copy back on the device, until autograd has used it `uses` times
        self.ready = None  # CUDA event: the copy back is done


class _Frozen:
    """One storage of frozen weights of a block whose weights leave the device (`method.offload_weights`): the
    tensors that hold it (parameters, buffers, a LoRA-FA layer's stacked weight: each keeps its identity, its
    `.data` swapped), its pinned host copy, and its copy back on the device while there is one."""

    __slots__ = ("block", "device", "dtype", "fetched", "flat", "holders", "host", "nbytes", "numel", "ready",
                 "versions")

    def __init__(self, block: int, holders: list):
        self.block, self.holders = block, holders  # [(tensor, size, stride, storage offset)]
        t = holders[0][0]
        self.device, self.dtype = t.device, t.dtype
        self.nbytes = t.untyped_storage().nbytes()
        self.numel = self.nbytes // t.element_size()
        self.host = None  # made at the first time the weights leave; again if one of the holders was written since
        self.versions = None
        self.flat = t.detach().as_strided((self.numel,), (1,), 0)  # the whole storage, while on the device
        self.fetched = None  # the storage being brought back, before the holders point at it
        self.ready = None  # CUDA event: the copy back is done

    def view(self, size, stride, offset) -> torch.Tensor:
        return self.flat.as_strided(size, stride, offset)

    def in_place(self) -> bool:
        """Every holder still a view of this storage where it was (not moved, cast or restacked since)."""
        return all(measure.storage_id(t) == measure.storage_id(self.flat)
                   and (t.size(), t.stride(), t.storage_offset()) == (size, stride, offset)
                   for t, size, stride, offset in self.holders)


class _WeightRef:
    """What a saved-tensor pack hook keeps for a frozen weight (or a view of one) whose storage leaves the device:
    where it lies in the storage; backward reads it from the storage brought back."""

    __slots__ = ("frozen", "offset", "size", "stride")

    def __init__(self, frozen: _Frozen, t: torch.Tensor):
        self.frozen, self.size, self.stride, self.offset = frozen, t.size(), t.stride(), t.storage_offset()


class Offload:
    """`method.offload`: what the named transformer blocks save for backward (tensors saved while one of those
    blocks runs its forward; the embeddings, final norm, output projection and loss stay) held in host memory
    between forward and backward.

    On CUDA each tensor goes to pinned host memory on a side stream, overlapping the forward's compute; its device
    copy is held until newer copies push it past `inflight_bytes` (the forward then waits for the oldest copy to
    finish and lets its device tensor go), so the device holds at most that on the offload's account. When
    backward starts, the copies still in flight are waited for; then the tensors come back in the reverse of the
    order they left, prefetched on the side stream up to `inflight_bytes` ahead of their use, and the compute
    stream waits only for the copy it needs. Tensors under `min_bytes` (`method.offload_min_kib`) and the model's
    own parameters stay. What stays is told to `lorafa.measure` as saved (these hooks are the innermost during the
    forward: a measurement's own hooks do not see it); `host_bytes` is what the last forward put on the host.

    The same bookkeeping runs without streams on CPU and on fake tensors (`lorafa.memory.predict`). A copy that
    finishes early is not let go early, so the device's memory comes back at the same points as in the prediction
    whatever the copies' speed.

    `weight_blocks` (`method.offload_weights`): blocks whose frozen weights leave the device once their forward is
    done (nothing is copied: a pinned host copy is made once, and again only if a weight was written since) and
    come back for their backward, fetched on the same side stream as the saved tensors when backward reaches the
    block `WEIGHTS_AHEAD` blocks after it (a hook on that block's output's gradient), so the copy overlaps
    those blocks' backward; the block's own backward waits for it. A block's weights are away from the end of its
    forward to the start of its backward: across the loss and the first blocks' backward, where a step's memory
    peaks. Its trainable parameters (the adapters' B) stay. What the forward saved of those weights (the
    matmuls' transposed views) is kept as a place in the storage and read from the storage brought back."""

    WEIGHTS_AHEAD = 2  # backward fetches a block's weights when it reaches the block this many after it

    def __init__(self, model: nn.Module, blocks: list[int], min_bytes: int, inflight_bytes: int,
                 linear_outputs: bool = False, weight_blocks: list[int] = ()):
        self.model, self.min_bytes, self.inflight = model, int(min_bytes), int(inflight_bytes)
        self.linear_outputs = linear_outputs  # only what the blocks' linear layers output (`offload_ops`)
        self.layers = checkpoint_layers(model)
        self.blocks = sorted(blocks)
        self.weight_blocks = sorted(weight_blocks)
        self.weights = measure.Storages(())  # the model's parameters and buffers as the forward started
        self.host_bytes = 0
        self.stream = None
        self._hooks = None
        self._block = None  # the offloaded block whose forward runs now
        self._frozen = {i: self._frozen_storages(i) for i in self.weight_blocks}  # block → its _Frozen storages
        self._by_storage: dict = {}  # storage id → _Frozen, of the weights on the device as the forward started
        self._away: set = set()  # blocks whose weights are off the device now
        self._reset()
        model.lorafa_offload = self  # the measured step reads host_bytes
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit, always_call=True)
        for i in self.blocks:
            self.layers[i].register_forward_pre_hook(partial(self._into, i))
            self.layers[i].register_forward_hook(partial(self._out_of, i), always_call=True)
            if linear_outputs:
                from .adapters import LoRALinear

                for m in self.layers[i].modules():
                    if isinstance(m, (nn.Linear, LoRALinear)):
                        m.register_forward_hook(self._linear_output)
        if self.weight_blocks:
            for i, layer in enumerate(self.layers):  # every block's output: backward's clock for the prefetch
                layer.register_forward_hook(partial(self._leave, i))

    def _reset(self):
        self._pending: list[_Held] = []  # host copies in flight, oldest first
        self._pending_bytes = 0
        self._order: list[_Held] = []  # this forward's tensors in the order they left
        self._next = -1  # the next to prefetch, walking `_order` backwards
        self._ahead = 0  # bytes fetched back and not yet used
        self._backward = False
        self._seen: dict = {}  # this forward's packed tensors by id (with a weak reference): one copy each
        self._made: dict = {}  # storage id → a weak reference to a linear layer's output (ids of freed ones recur)

    def _enter(self, module, args):
        if self._hooks is not None:
            return
        for i in sorted(self._away):  # a forward that never reached its backward left them away
            self._arrive(i)
        if not (module.training and torch.is_grad_enabled()):
            return
        self.weights = measure.Storages.of(self.model)
        for i, fs in self._frozen.items():  # moved, cast or restacked since: found again (host copies made anew)
            if not all(f.in_place() for f in fs):
                self._frozen[i] = self._frozen_storages(i)
        self._by_storage = {measure.storage_id(f.flat): f for fs in self._frozen.values() for f in fs}
        self.host_bytes = 0
        self._drain(0)
        self._reset()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def _exit(self, module, args, output):
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def _into(self, i, module, args):
        if self._hooks is not None:  # a training forward (not evaluation, not a checkpoint's recompute in backward)
            self._block = i

    def _out_of(self, i, module, args, output):
        self._block = None

    def _linear_output(self, module, args, output):
        if self._block is not None and isinstance(output, torch.Tensor):
            self._made[measure.storage_id(output)] = weakref.ref(output)

    def _is_linear_output(self, t: torch.Tensor) -> bool:
        ref = self._made.get(measure.storage_id(t))
        made = ref() if ref is not None else None
        return made is not None and measure.storage_id(made) == measure.storage_id(t)

    def _drain(self, limit: int) -> None:
        """Wait for the oldest copies while more than `limit` bytes are in flight, letting their device tensors go.
        A copy that finished early is not let go early: the device's memory comes back at the same points on every
        run and in the prediction, which keeps the same books on CPU and fake tensors (it holds at most the
        `inflight_bytes` the prediction counts anyway)."""
        while self._pending and self._pending_bytes > limit:
            held = self._pending.pop(0)
            if held.copied is not None:
                held.copied.synchronize()
            self._pending_bytes -= held.nbytes
            held.dev = None

    def _pack(self, t: torch.Tensor):
        if self._by_storage and isinstance(t, torch.Tensor) and t.device.type != "meta":
            frozen = self._by_storage.get(measure.storage_id(t))
            if frozen is not None:  # a weight that leaves the device after its block's forward
                return _WeightRef(frozen, t)
        if (self._block is None or not isinstance(t, torch.Tensor) or isinstance(t, nn.Parameter)
                or t.device.type == "meta" or self.weights.holds(t)
                or t.untyped_storage().nbytes() < self.min_bytes
                or (self.linear_outputs and not self._is_linear_output(t))):
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                measure.note_saved([t])  # stays on the device: a saved activation like any other
            return measure.kept(t)
        seen = self._seen.get(id(t))  # the same tensor saved again (one input of several matmuls): one copy
        if seen is not None and seen[0]() is t:  # (a dead tensor's id can come back: the weak reference says)
            seen[1].uses += 1
            return seen[1]
        nbytes = t.numel() * t.element_size()
        streams = t.device.type == "cuda" and not _is_fake(t)
        # (its strides kept where it is dense: a compiled block's backward asserts the strides it saved with)
        host = torch.empty_like(t, device="cpu", pin_memory=streams)
        held = _Held(t.device, host, nbytes)
        if streams:
            self._side_stream(t.device).wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                held.copied = torch.cuda.Event()
                held.copied.record(self.stream)
        else:
            host.copy_(t)
        held.dev = measure.kept(t)  # (not `t`: its grad_fn would tie the graph to itself, see measure.kept)
        self._pending.append(held)
        self._pending_bytes += nbytes
        self._order.append(held)
        self.host_bytes += nbytes
        self._seen[id(t)] = (weakref.ref(t), held)
        self._drain(self.inflight)
        return held

    def _side_stream(self, device) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def _copy_back(self, host: torch.Tensor, device) -> tuple:
        """`host` back on `device` (CUDA): allocated on the compute stream (its memory free there as of now), filled
        on the side stream; freed after its use, it goes straight back to the compute stream's pool (`record_stream`
        would keep it counted until the device caught up with the host). Returns (tensor, CUDA event: filled)."""
        stream = self._side_stream(device)
        out = torch.empty_like(host, device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            out.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return out, ready

    def _fetch(self, held: _Held) -> None:
        if held.copied is None:  # CPU, fake tensors
            held.fetched = held.host.to(held.device)
        else:
            held.fetched, held.ready = self._copy_back(held.host, held.device)
        self._ahead += held.nbytes

    def _prefetch(self) -> None:
        """Fetch the tensors backward will want next (the reverse of the order they left) while under
        `inflight_bytes` ahead of their use."""
        while self._next >= 0:
            held = self._order[self._next]
            if held.fetched is None and held.uses > 0:
                if self._ahead and self._ahead + held.nbytes > self.inflight:
                    return
                self._fetch(held)
            self._next -= 1

    def _unpack(self, packed):
        if not self._backward:  # backward starts: every copy to the host finishes first
            self._backward = True
            self._drain(0)
            self._next = len(self._order) - 1
        if isinstance(packed, _WeightRef):
            self._arrive(packed.frozen.block)  # (the block's gate has brought it back already)
            return packed.frozen.view(packed.size, packed.stride, packed.offset)
        if not isinstance(packed, _Held):
            self._prefetch()
            return packed
        held = packed
        if held.fetched is None:  # not prefetched (backward's order differed): fetched now
            self._fetch(held)
        out = held.fetched
        if held.ready is not None:
            current = torch.cuda.current_stream(held.device)
            current.wait_event(held.ready)
        held.uses -= 1
        if held.uses == 0:  # autograd holds it now; the next unpack of this tensor (none expected) fetches again
            held.fetched, held.ready = None, None
            self._ahead -= held.nbytes
        self._prefetch()
        return out

    # ---- frozen weights off the device between a block's forward and its backward (`weight_blocks`) ----

    def _frozen_storages(self, i: int) -> list[_Frozen]:
        """Block i's frozen storages, each with every tensor of the block that holds it: storages of one dtype,
        none of whose holders trains."""
        found: dict = {}
        for m in self.layers[i].modules():
            tensors = [*m._parameters.values(), *m._buffers.values(),
                       *(v for v in vars(m).values() if isinstance(v, torch.Tensor))]
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel():
                    found.setdefault(measure.storage_id(t), {})[id(t)] = t
        out = []
        for tensors in found.values():
            ts = list(tensors.values())
            if any(t.requires_grad for t in ts) or len({t.dtype for t in ts}) > 1 \
                    or ts[0].untyped_storage().nbytes() < self.min_bytes:
                continue
            out.append(_Frozen(i, [(t, t.size(), t.stride(), t.storage_offset()) for t in ts]))
        return out

    @property
    def weight_bytes(self) -> int:
        """Bytes of frozen weights that leave the device (`weight_blocks`): host memory held for the whole job."""
        return sum(f.nbytes for fs in self._frozen.values() for f in fs)

    def _leave(self, i, module, args, output):
        """After block i's forward (a training forward, not a checkpoint's recompute in backward): its weights
        leave, and a hook on its output's gradient marks where backward reaches the block."""
        if self._hooks is None:
            return output
        if i in self._frozen and i not in self._away:
            for f in self._frozen[i]:
                versions = [t._version for t, *_ in f.holders]
                if f.host is None or versions != f.versions:  # a pinned copy once (the weights are frozen)
                    f.host = torch.empty(f.numel, dtype=f.dtype, device="cpu",
                                         pin_memory=f.device.type == "cuda" and not _is_fake(f.flat))
                    f.host.copy_(f.flat)
                    f.versions = versions
                empty = torch.empty(0, dtype=f.dtype, device=f.device)
                for t, *_ in f.holders:
                    t.data = empty
                self._by_storage.pop(measure.storage_id(f.flat), None)  # (its id may come back for another storage)
                f.flat = None
            self._away.add(i)
        first = output[0] if isinstance(output, tuple) else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            # called with the gradient of the block's output, before anything of the block's own backward runs
            # (its recomputation included): no node, no view (a view could not be changed in place downstream)
            first.register_hook(partial(self._reached, i))
        return output

    def _fetch_weights(self, i: int) -> None:
        for f in self._frozen[i]:
            if f.fetched is not None:
                continue
            if _is_fake(f.host) or f.device.type != "cuda":
                f.fetched = f.host.to(f.device, copy=True)
            else:
                f.fetched, f.ready = self._copy_back(f.host, f.device)

    def _arrive(self, i: int) -> None:
        """Block i's weights back in place (fetched now if they were not), the compute stream waiting for them."""
        if i not in self._away:
            return
        self._fetch_weights(i)
        for f in self._frozen[i]:
            if f.ready is not None:
                torch.cuda.current_stream(f.device).wait_event(f.ready)
            f.flat, f.fetched, f.ready = f.fetched, None, None
            for t, size, stride, offset in f.holders:
                t.data = f.view(size, stride, offset)
        self._away.discard(i)

    def _reached(self, i: int, grad=None) -> None:
        """Backward reached block i (a hook on its output's gradient): its weights back, and those of the blocks up
        to `WEIGHTS_AHEAD` before it on their way."""
        self._arrive(i)
        for j in range(i - 1, max(-1, i - 1 - self.WEIGHTS_AHEAD), -1):
            if j in self._away:
                self._fetch_weights(j)


def host_bytes(model: nn.Module) -> int:
    """The bytes of saved tensors the last forward of `model` held on the host (`Offload`); 0 without offloading."""
    offloaded = getattr(model, "lorafa_offload", None)
    return offloaded.host_bytes if offloaded is not None else 0


def host_weight_bytes(model: nn.Module) -> int:
    """The bytes of frozen weights `model`'s blocks hold on the host between forward and backward
    (`method.offload_weights`, `Offload.weight_bytes`); 0 without."""
    offloaded = getattr(model, "lorafa_offload", None)
    return offloaded.weight_bytes if offloaded is not None else 0


def offload(model: nn.Module, method) -> Offload | None:
    """`method.offload` (a set of blocks, as `method.gradient_checkpointing`): an `Offload` on the model (None when
    no block is named)."""
    n = len(checkpoint_layers(model))
    blocks = selected(method.get("offload", False), n, "method.offload")
    weight_blocks = selected(method.get("offload_weights", False), n, "method.offload_weights")
    if not blocks and not weight_blocks:
        return None
    return Offload(model, blocks, int(float(method.get("offload_min_kib", 1024)) * 1024),
                   int(float(method.get("offload_inflight_mib", 512)) * 2**20),
                   linear_outputs=str(method.get("offload_ops", "all")) == "linear_outputs",
                   weight_blocks=weight_blocks)


# ---- choosing a plan for a memory budget (`train.memory_budget_gib`) ----

PLAN_KEYS = ("gradient_checkpointing", "checkpoint_policy", "offload", "recompute", "offload_weights")


@dataclass(frozen=True)
class Plan:
    """The method keys a plan sets; everything else of the job stays as configured. `name`: its name among the
    candidates (`train.plan`)."""

    gradient_checkpointing: object = False
    checkpoint_policy: str = "full"
    offload: object = False
    recompute: str = "none"
    offload_weights: object = False
    name: str = field(default="", compare=False)

    def keys(self) -> dict:
        value = list(self.gradient_checkpointing) if isinstance(self.gradient_checkpointing, tuple) \
            else self.gradient_checkpointing
        return {"gradient_checkpointing": value, "checkpoint_policy": self.checkpoint_policy,
                "offload": self.offload, "recompute": self.recompute, "offload_weights": self.offload_weights}


def candidates(n_blocks: int, offload: bool = True) -> list[Plan]:
    """The plans a budget chooses among (each by its name, `train.plan`), from saving everything to recomputing
    every block, less intrusive first: checkpointing none, every 4th / 2nd block or all, each with and without
    element-wise recomputation; every block with the `matmuls` policy; and, only where the device is not the
    host (`offload`), offloading with element-wise recomputation (it shrinks what is copied by a third at
    llama-7b): every 4th or every 2nd block offloaded and the others checkpointed, every 2nd offloaded with a
    quarter of the blocks kept on the device, and every block offloaded. Offloaded blocks are spread through the
    model so that each one's copies overlap the compute of the blocks after it (in backward, before it); a run of
    offloaded blocks leaves its copies nothing to hide under (measured at llama-7b 8 × 1024: the first 8 blocks
    offloaded and the rest checkpointed ran at 0.90 × checkpointing every block, every 2nd offloaded at 1.12 ×)."""
    levels = [("none", False), *((f"every{k}", f"every:{k}") for k in (4, 2) if k < n_blocks), ("all", True)]
    out = []
    for name, ckpt in levels:
        out.append(Plan(ckpt, name=name))
        out.append(Plan(ckpt, recompute="elementwise", name="elementwise" if name == "none" else f"{name}_elementwise"))
    out.append(Plan(True, "matmuls", name="all_matmuls"))
    if offload:
        for k in (4, 2):
            if k < n_blocks or k == n_blocks == 2:
                rest = tuple(i for i in range(n_blocks) if i % k)
                out.append(Plan(rest, "full", f"every:{k}", "elementwise", name=f"offload_every{k}"))
        if n_blocks >= 4:  # the odd blocks: those ≡ 1 (mod 4) checkpointed, those ≡ 3 kept
            ckpt = tuple(i for i in range(n_blocks) if i % 4 == 1)
            out.append(Plan(ckpt, "full", "every:2", "elementwise", name="offload_every2_keep"))
        out.append(Plan(False, "full", True, "elementwise", name="offload_all"))
    return out


def named(name: str, n_blocks: int, offload: bool = True) -> Plan:
    """`train.plan=NAME`: the candidate of that name for a model of `n_blocks` blocks, `NAME+keepK` — that
    candidate with K of its checkpointed blocks kept (`keeping`: what a budget chooses when it has room; the row's
    `plan_name` runs again as it is) — and either with `+weightsE` after it: the frozen weights of the first E
    blocks off the device between their forward and backward (`weights_away`; where the device is not the host) —
    bad input naming those there are otherwise."""
    plans = {p.name: p for p in candidates(n_blocks, offload)}
    m = re.fullmatch(r"(?P<base>[a-z0-9_]+)(?:\+keep(?P<keep>\d+))?(?:\+weights(?P<weights>\d+))?", name)
    if m is None or m["base"] not in plans or (m["weights"] and not offload):
        raise BadInput(f"train.plan={name}: expected one of {', '.join(plans)} (this model and device), "
                       "each optionally +keepK" + (", then optionally +weightsE" if offload else ""))
    base, keep, weights = m["base"], m["keep"], m["weights"]
    plan = plans[base]
    if keep:
        line = timeline(plan.keys(), n_blocks)
        k = len(line.checkpointed)
        if not 0 < int(keep) <= k:
            raise BadInput(f"train.plan={name}: " + (f"{base} checkpoints {k} blocks; expected +keepK with 1 ≤ K ≤ {k}"
                                                     if k else f"{base} checkpoints no block: nothing to keep"))
        plan = keeping(plan, line, int(keep))
    if weights:
        if not 0 < int(weights) <= n_blocks:
            raise BadInput(f"train.plan={name}: expected +weightsE with 1 ≤ E ≤ {n_blocks} (the model's blocks)")
        plan = weights_away(plan, int(weights))
    return plan


def weights_away(plan: Plan, e: int) -> Plan:
    """`plan` with the frozen weights of its first `e` blocks off the device from the end of their forward to the
    start of their backward (`method.offload_weights`): the first blocks, whose weights backward needs last, so
    their copies back have the most of backward to hide under; named `<name>+weights<e>`."""
    if e <= 0:
        return plan
    return replace(plan, offload_weights=f"first:{e}", name=f"{plan.name}+weights{e}")


def weight_counts(n_blocks: int, offloads: bool) -> tuple[int, ...]:
    """How many of a model's first blocks a budget tries with their frozen weights away (`weights_away`): all but
    the last `Offload.WEIGHTS_AHEAD` + 1 (whose weights backward needs, or fetches, as it starts: away, they would
    be back at the peak); and, where the plan offloads saved tensors (`offloads`), whose copies back share the link
    with the weights', also half of them. Which pays depends on how much the plan offloads: at llama-7b 8 × 1024
    on an H100, LoRA-FA, side by side, every 2nd block offloaded and the others kept ran 0.713 s a step with 16
    blocks' weights away and 0.762 s with 29 (the link carried 22 GiB back in a 0.4 s backward); every 4th block
    offloaded and the others kept, with 29 blocks' weights away, ran 0.687 s at 20.4 GiB, the fastest plan
    measured under 20.6 GiB. Each count, largest first."""
    most = max(1, n_blocks - 1 - Offload.WEIGHTS_AHEAD)
    return tuple(sorted({most, max(1, n_blocks // 2)} if offloads else {most}, reverse=True))


@dataclass(frozen=True)
class Rates:
    """The device's measured rates the step-time model uses: matmul FLOP/s and host↔device copy bytes/s (one
    way, the mean of the two directions), and — from a profile of the job's own model cut to one block
    (`profile_step`) — the FLOP/s its forward and its backward run at (None: not profiled; the matmul rate
    stands in), and what one block costs in each block mode over one that keeps everything (`block_extra`:
    measured on that one-block model in each mode; its offloaded bytes' copy time, one way each, taken out, since
    the step-time model lays copies out itself; None: not measured, FLOPs stand in)."""

    matmul_flops: float
    copy_bytes: float
    forward_flops: float | None = None
    backward_flops: float | None = None
    block_extra: dict | None = None  # block mode → (forward, backward) seconds a block in it adds (`block_modes`)


def measure_rates(device: torch.device, profile=None, modes=None) -> Rates:
    """A short profile of the device in hand: a bf16 8192³ matmul and a pinned 256 MiB host → device → host copy on
    CUDA (an fp32 1024³ matmul and a 64 MiB memory copy on CPU); each the best of 3 after a warm-up. `profile`:
    a callable giving (forward FLOPs, forward seconds, backward FLOPs, backward seconds) of the job's model
    (`profile_step`); `modes`: one giving {block mode: (forward seconds, backward seconds, bytes offloaded)} of
    the job's model cut to one block, in each block mode (`BLOCK_MODES`; "none" among them)."""
    import logging
    import time

    def failed(what, err, instead):
        # (the failure as text: a handler that keeps records would keep the exception, and its frames the model)
        logging.getLogger(__name__).warning("%s failed (%s); %s", what, f"{type(err).__name__}: {err}", instead)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    fwd = bwd = timed = None
    if profile is not None:  # first, while nothing else of this profile holds device memory
        try:
            f_flops, f_s, b_flops, b_s = profile()
            fwd, bwd = f_flops / f_s, b_flops / b_s
        except Exception as err:  # noqa: BLE001 - the model's rates are a refinement: the matmul rate stands in
            failed("step-time profile", err, "the matmul rate stands in")
    if modes is not None:
        try:
            timed = modes()
        except Exception as err:  # noqa: BLE001 - likewise: FLOPs stand in for the block modes' costs
            failed("block-mode profile", err, "FLOPs stand in")
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
    copy_bytes = 2 * copy_mib * 2**20 / copy
    return Rates(matmul_flops=2 * n**3 / mm, copy_bytes=copy_bytes, forward_flops=fwd, backward_flops=bwd,
                 block_extra=block_extra(timed, copy_bytes) if timed else None)


def block_extra(timed: dict, copy_bytes: float) -> dict:
    """{block mode: (forward, backward) seconds one block in it adds over one in mode "none"}, from the one-block
    model's times in each mode (`measure_rates`' `modes`): the difference, less the time its offloaded bytes take
    one way at `copy_bytes` per second (`_pipeline` lays the copies out), never below 0 (a mode's noise)."""
    f0, b0, _ = timed["none"]
    return {mode: (max(0.0, f - f0 - host / copy_bytes), max(0.0, b - b0 - host / copy_bytes))
            for mode, (f, b, host) in timed.items()}


def step_timer(model: nn.Module, batch: dict, device: torch.device, amp: torch.dtype | None):
    """A callable that runs one training step's forward and backward of `model` on `batch` (no optimizer step: it
    is the same under every plan; gradients let go) and returns its (forward seconds, backward seconds), the
    device synchronized around each: what `profile_step` and the budget's trials (`interleave`) time."""
    import time

    def timed() -> tuple[float, float]:
        measure.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            loss = model(**batch).loss
        measure.synchronize(device)
        t0 = time.perf_counter()
        loss.backward()
        measure.synchronize(device)
        t1 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        return t0 - start, t1 - t0

    return timed


def profile_step(model: nn.Module, batch: dict, device: torch.device, amp: torch.dtype | None,
                 repeats: int = 3, seconds: float = 0.25, count: bool = True,
                 steps: list | None = None) -> tuple[float, float, float, float]:
    """(forward FLOPs, forward seconds, backward FLOPs, backward seconds) of `model`'s training step on `batch` —
    the job's model cut to one block, its method applied, at the job's batch shape: what the model's kernels
    (matmuls at their real shapes, attention, element-wise work) run at on this device. FLOPs by torch's counter;
    seconds the best of `repeats` after a warm-up, more (up to 20) for a step so short that `repeats` would time
    less than `seconds` (short steps are the noisy ones); gradients are let go. `count=False`: times only (FLOPs
    NaN; torch's counter hooks every module's backward, which element-wise recomputation's own `autograd.grad`
    inside a backward does not allow). `steps`: gets each timed step's (forward seconds, backward seconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    timed = step_timer(model, batch, device, amp)
    f_flops = b_flops = math.nan
    if count:  # the warm-up, counted
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                loss = model(**batch).loss
            f_flops = counter.get_total_flops()
            loss.backward()
            b_flops = counter.get_total_flops() - f_flops
        model.zero_grad(set_to_none=True)
    else:
        timed()
    first = timed()
    times = [first] + [timed() for _ in range(max(repeats, min(20, int(seconds / max(sum(first), 1e-6)))) - 1)]
    if steps is not None:
        steps.extend(times)
    return float(f_flops), min(t[0] for t in times), float(b_flops), min(t[1] for t in times)


RACE_Z = 3.0  # a race's intervals (`race`): z standard errors (its looks are many, each one a chance to stop wrongly)
RACE_ROUNDS = 200  # a race's most rounds


def interleave(steps: dict, seconds: float, least: int = 3, most: int = 20, on_error=None,
               tolerance: float | None = None, most_seconds: float | None = None, z: float = RACE_Z) -> dict:
    """{name: [seconds of each of its steps]}: each of `steps` (name → a callable that runs one step and returns
    its seconds) run once a round, in one order and then the reverse, round after round — at least
    `least` rounds and until the steps took `seconds` × their number, at most `most` rounds. Where a step's speed
    is bound by the host, the host's speed drifts (roberta-large 32 × 128 on an H200: a fixed Python loop took
    204–441 ms from one minute to the next); plans timed one after another meet different moments of it, plans
    timed in alternation the same ones. A step that raises is left out of the later rounds (`on_error(name,
    err)` is called) and its name maps to None.

    `tolerance`: a race (`race`). After that, rounds go on while the race is not settled — a plan that is neither
    shown slower than the leader nor the leader shown within `tolerance` of it — until each step still running has
    taken `most_seconds` (default: no limit but `most`); a plan shown slower runs no more rounds (its steps so far
    are kept). The same host jitters from one step to the next too (the same step 136–211 ms), so two plans a few
    percent apart need tens of rounds to tell apart and plans far apart need few."""
    out: dict = {name: [] for name in steps}
    live = list(steps)
    for r in range(most):
        for name in (live if r % 2 == 0 else live[::-1]):
            try:
                out[name].append(float(steps[name]()))
            except Exception as err:  # noqa: BLE001 - the caller says what a failed step means
                out[name] = None
                if on_error is not None:
                    on_error(name, err)
        live = [name for name in live if out[name] is not None]
        if not live:
            break
        enough = r + 1 >= least and sum(sum(out[n]) for n in live) >= seconds * len(live)
        if not enough:
            continue
        if tolerance is None:
            break
        slower, settled = race({n: out[n] for n in live}, tolerance, z)
        live = [n for n in live if n not in slower]
        if settled or (most_seconds is not None and min(sum(out[n]) for n in live) >= most_seconds):
            break
    return out


def stopped(times: dict) -> list[str]:
    """The plans a race (`interleave` with a tolerance) stopped as shown slower than its leader: those timed in
    fewer rounds than the most (`times`: `interleave`'s result; a failed plan's None is not one). They are not
    chosen: their median steps come from fewer, earlier rounds than the others', and a host that slows down later
    would make a stopped plan look faster than the ones it lost to."""
    most = max((len(t) for t in times.values() if t), default=0)
    return [name for name, t in times.items() if t and len(t) < most]


def shown_slower(times: dict, tolerance: float = 0.0, z: float = RACE_Z) -> list[str]:
    """The plans timed side by side (`interleave`'s result) that are not chosen: those a race stopped (`stopped`),
    and of those timed in every round, each the race's test (`race`) shows slower than the leader on all of them —
    as a race's last round shows a plan slower and ends in the same round, and as plans timed without a race are
    judged. A plan timed a few percent slower in every round is slower, not a tie for the step-time model to
    break (llama-7b 8 × 1024, a 20.6 GiB budget: `offload_every2_keep`'s steps 2.3 % above the leader's in each of
    6 rounds)."""
    out = stopped(times)
    most = max((len(t) for t in times.values() if t), default=0)
    full = {name: t for name, t in times.items() if t and len(t) == most}
    slower = race(full, tolerance, z)[0]
    return out + [name for name in full if name in slower]


def race(times: dict, tolerance: float, z: float = RACE_Z) -> tuple[set, bool]:
    """(the plans shown slower than the leader, whether the race is settled) from plans' step times taken in
    alternation (`times`: name → its steps, one a round, the same rounds). The leader: the least median step. Each
    other plan's paired log-ratio to it, round by round (a round's two steps share the host's moment), its outlying
    rounds clipped to the median ± 3 scaled MADs from 6 rounds on (a garbage collection can double one step), gives
    a mean and its interval (`report.paired_ratio`: Student's t at the confidence of `z` standard errors, on
    len − 1 degrees of freedom, as the analysis judges plans timed side by side): wholly above 0, the plan is
    slower; its lower end at or above −log(1 + `tolerance`), the leader is within `tolerance` of it. Settled: every
    other plan is one or the other."""
    import statistics

    from . import report

    confidence = 2 * statistics.NormalDist().cdf(z) - 1  # two-sided: z standard errors each side
    names = [n for n, t in times.items() if t]
    if len(names) < 2:
        return set(), True
    leader = min(names, key=lambda n: statistics.median(times[n]))
    slower, settled = set(), True
    for name in names:
        if name == leader:
            continue
        d = [math.log(a / b) for a, b in zip(times[name], times[leader]) if a > 0 and b > 0]
        if len(d) < 2:
            settled = False
            continue
        if len(d) >= 6:  # (fewer: no spread to clip to)
            mid = statistics.median(d)
            spread = 3 * 1.4826 * statistics.median(abs(x - mid) for x in d)
            d = [min(max(x, mid - spread), mid + spread) for x in d]
        low = math.log(report.paired_ratio(map(math.exp, d), confidence)[1])
        if low > 0:
            slower.add(name)
        elif low < -math.log1p(tolerance):
            settled = False
    return slower, settled


@dataclass(frozen=True)
class Timeline:
    """Where a plan puts its work, for the step-time model: the model's blocks, those offloaded and those
    checkpointed, and how many bytes of copies may be in flight (`method.offload_inflight_mib`)."""

    n_blocks: int
    offloaded: tuple = ()
    checkpointed: tuple = ()
    inflight: int = 512 * 2**20
    weights: tuple = ()  # blocks whose frozen weights leave the device between forward and backward


def timeline(method, n_blocks: int) -> Timeline:
    """A plan's (its method keys') `Timeline` for a model of `n_blocks` blocks."""
    return Timeline(n_blocks, tuple(selected(method.get("offload", False), n_blocks, "method.offload")),
                    tuple(selected(method.get("gradient_checkpointing", False), n_blocks)),
                    int(float(method.get("offload_inflight_mib", 512)) * 2**20),
                    tuple(selected(method.get("offload_weights", False), n_blocks, "method.offload_weights")))


def _pipeline(line: Timeline, forward: float, backward: float, recompute: float, offloaded_bytes: float,
              copy_rate: float, chunks: int = 8, extra: list | None = None, weight_bytes: float = 0.0) -> float:
    """Seconds of a step whose blocks (uniform: the forward's and backward's seconds split evenly) run on the
    compute stream while the offloaded blocks' saved tensors go to the host and come back on one copy engine, as
    `Offload` runs them: each offloaded block's tensors leave in `chunks` pieces as its forward makes them; the
    forward waits while more than `inflight` bytes are in flight; backward starts once every copy is out; the
    tensors come back in reverse order, fetched while under `inflight` bytes ahead of their use, and a block's
    backward waits for the piece it needs. A checkpointed block's backward first recomputes its forward. `extra`:
    each block's own added (forward, backward) seconds (`Rates.block_extra`), in place of `recompute` spread over
    the checkpointed blocks. `weight_bytes`: the frozen weights of `line.weights`' blocks (evenly), which leave in
    forward at no cost and come back on the same copy engine, each block's fetched when backward reaches the block
    `Offload.WEIGHTS_AHEAD` after it (at once, for the last blocks), its backward waiting for them."""
    n = line.n_blocks
    off, ckpt = set(line.offloaded), set(line.checkpointed)
    f, b = forward / n, backward / n
    r = recompute / len(ckpt) if ckpt else 0.0
    extra = extra or [(0.0, r if i in ckpt else 0.0) for i in range(n)]
    piece = offloaded_bytes / len(off) / chunks if off else 0.0
    t = free = 0.0  # the compute stream's and the copy engine's clocks
    pending: list[float] = []  # copies out still in flight: their end times, oldest first
    for i in range(n):
        for _ in range(chunks):
            t += (f + extra[i][0]) / chunks
            if i in off:
                free = max(free, t) + piece / copy_rate
                pending.append(free)
                pending = [e for e in pending if e > t]
                while pending and len(pending) * piece > line.inflight:
                    t = max(t, pending.pop(0))
    t = start = max(t, free)
    pieces = sum(chunks for i in off)
    window = max(1, int(line.inflight // piece)) if piece else 1  # pieces that may be fetched ahead of their use
    fetched: list[float] = []
    used: list[float] = []

    def ready(k: int) -> float:  # when the k-th piece backward needs is back on the device
        nonlocal free
        while len(fetched) <= k:
            j = len(fetched)
            allowed = used[j - window] if j >= window else start
            free = max(free, allowed) + piece / copy_rate
            fetched.append(free)
        return fetched[k]

    away = set(line.weights) if weight_bytes else set()
    per_block = weight_bytes / len(away) if away else 0.0
    back: dict = {}  # block → when its weights are back on the device

    def fetch_weights(j: int) -> None:
        nonlocal free
        if j in away and j not in back:
            free = max(free, t) + per_block / copy_rate
            back[j] = free

    k = 0
    for i in reversed(range(n)):
        for j in range(i, max(-1, i - 1 - Offload.WEIGHTS_AHEAD), -1):  # (as `Offload._reached`)
            fetch_weights(j)
        if i in away:
            t = max(t, back[i])
        t += extra[i][1]
        for _ in range(chunks):
            if i in off:
                t = max(t, ready(k))
                used.append(t)
                k += 1
            t += b / chunks
    assert k == pieces
    return t


BLOCK_MODES = tuple(p.name for p in candidates(1))  # a one-block model's plans: one mode each


def block_modes(plan: Plan, line: Timeline) -> tuple[str, ...]:
    """The mode a plan puts each block in, named as the one-block model's plan that puts its block there
    (`BLOCK_MODES`, `candidates(1)`): kept, checkpointed (keeping nothing or the matmuls' outputs) or offloaded,
    with or without element-wise recomputation."""
    ew = plan.recompute == "elementwise"
    off, ckpt = set(line.offloaded), set(line.checkpointed)

    def mode(i: int) -> str:
        if i in off:
            return "offload_all" if ew else "offload_plain"  # (not a candidate: never profiled)
        if i in ckpt:
            return "all_matmuls" if plan.checkpoint_policy == "matmuls" else ("all_elementwise" if ew else "all")
        return "elementwise" if ew else "none"

    return tuple(mode(i) for i in range(line.n_blocks))


def step_seconds(pred, rates: Rates, line: Timeline | None = None, plain_backward_flops: float | None = None,
                 modes: tuple | None = None) -> float:
    """A plan's step time, modelled: its forward FLOPs at the forward's rate, its backward's (without
    recomputation: `plain_backward_flops`, a plan's that recomputes nothing) at the backward's, what it recomputes
    at the forward's — the rates of the job's own model where profiled (`Rates`), else the matmul rate — and its
    offloaded bytes moved at the copy rate, block by block as `_pipeline` lays them out (`line`; without one,
    the copies overlap the forward and the backward whole: max(forward, copy) + max(backward, copy)). Where each
    block's mode (`modes`, `block_modes`) has a measured cost (`Rates.block_extra`), that cost stands for the
    block's recomputation and hooks instead of FLOPs: it holds what FLOPs miss where a step is bound by the
    host's launches, not the device (roberta-large 32 × 128: checkpointing every block measured 2.3× the plain
    step, where its FLOPs say 1.3×)."""
    fwd_rate = rates.forward_flops or rates.matmul_flops
    bwd_rate = rates.backward_flops or rates.matmul_flops
    backward_flops = pred.flops - pred.flops_forward
    plain = min(backward_flops, plain_backward_flops) if plain_backward_flops is not None else backward_flops
    forward = pred.flops_forward / fwd_rate
    backward = plain / bwd_rate
    weights = pred.host_weights if line is not None and line.weights else 0
    offloaded = pred.host_offload if line is not None and line.offloaded else 0
    if modes is not None and rates.block_extra is not None and all(m in rates.block_extra for m in modes):
        extra = [rates.block_extra[m] for m in modes]
        if not offloaded and not weights:
            return forward + backward + sum(f + b for f, b in extra)
        return _pipeline(line, forward, backward, 0.0, offloaded, rates.copy_bytes, extra=extra,
                         weight_bytes=weights)
    recompute = (backward_flops - plain) / fwd_rate
    if not pred.host_offload and not weights:
        return forward + backward + recompute
    if not offloaded and not weights:
        copy = pred.host_offload / rates.copy_bytes
        return max(forward, copy) + max(backward + recompute, copy)
    return _pipeline(line, forward, backward, recompute, offloaded, rates.copy_bytes, weight_bytes=weights)


TRIAL_MARGIN = 2.0  # a plan modelled within this factor of the fastest fitting one is worth timing (`shortlist`)
TRIAL_TOLERANCE = 0.03  # timed within this fraction of the fastest: as fast (`pick_timed`)


def predicted(made, rates: Rates, lines: dict, plain: float | None) -> dict:
    """Every plan a budget predicted (`made`: (plan, prediction) pairs, in the order predicted, equal plans once),
    each with its modelled step (`step_seconds`, at the budget's rates and with `plain`, `plain_backward` of its
    candidates): name → (predicted peak in bytes, modelled seconds), smallest peak first."""
    out = {plan.name: (pred.peak, step_seconds(pred, rates, lines.get(plan), plain,
                                               block_modes(plan, lines[plan]) if plan in lines else None))
           for plan, pred in made}
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def format_predicted(table: dict, budget_bytes: float) -> str:
    """`predicted`'s table as lines of text: name, predicted peak (GiB), modelled step (s), `*` where it fits."""
    width = max((len(name) for name in table), default=0)
    return "\n".join(f"  {name:<{width}}  {peak / measure.GIB:8.3f}  {s:7.3f}{'  *' if peak <= budget_bytes else ''}"
                     for name, (peak, s) in table.items())


def plain_backward(options: list) -> float | None:
    """The backward FLOPs of a step that recomputes nothing: the least of the predicted `options`'."""
    return min((p.flops - p.flops_forward for _, p in options if p is not None), default=None)


def ranked(options: list, budget_bytes: float, rates: Rates, budget_label: str, lines: dict | None = None,
           plain: float | None = None) -> list:
    """Every plan whose predicted peak fits the budget, fastest modelled first (ties: the one listed first —
    `candidates` lists the less intrusive first; the model counts element-wise recomputation as free), as
    (modelled seconds, plan, prediction), from `options`: (plan, prediction) pairs, a prediction None where it
    failed; `lines`: each plan's `Timeline`; `plain`: `plain_backward` of all the candidates (default: of
    `options`). None fits: bad input naming the smallest predicted peak and its plan."""
    lines = lines or {}
    plain = plain_backward(options) if plain is None else plain
    scored = [(step_seconds(p, rates, lines.get(plan), plain,
                            block_modes(plan, lines[plan]) if plan in lines else None), i, p.peak, plan, p)
              for i, (plan, p) in enumerate(options) if p is not None]
    fits = [s for s in scored if s[2] <= budget_bytes]
    if not fits:
        if not scored:
            raise BadInput(f"{budget_label}: no plan could be predicted")
        smallest = min(scored, key=lambda s: s[2])
        raise BadInput(f"{budget_label}: no plan fits; the smallest predicted peak is "
                       f"{smallest[2] / measure.GIB:.3g} GiB ({describe(smallest[3].keys())})")
    return [(seconds, plan, pred) for seconds, _, _, plan, pred in sorted(fits, key=lambda s: (s[0], s[1]))]


def choose(options: list, budget_bytes: float, rates: Rates, budget_label: str, lines: dict | None = None):
    """The fastest modelled plan whose predicted peak fits the budget (`ranked`'s first): (plan, prediction,
    seconds)."""
    seconds, plan, pred = ranked(options, budget_bytes, rates, budget_label, lines)[0]
    return plan, pred, seconds


def shortlist(fitting: list, trials: int, margin: float | None = None) -> list:
    """The plans worth timing on the job's own model (`ranked`'s entries): the first `trials` of those modelled
    within `margin` × the fastest's seconds. Where a step is bound by the host's kernel launches and copies,
    the model can miss by more than the plans differ (roberta-large 32 × 128 on an H200, LoRA-FA: `offload_all`
    modelled 0.116 s, measured 0.164; checkpointing every 2nd block with element-wise recomputation modelled 0.170,
    measured 0.099); timing a few of them settles it. The margin covers the largest miss seen (1.72×)."""
    if not fitting or trials < 1:
        return fitting[:1]
    margin, best = TRIAL_MARGIN if margin is None else margin, fitting[0][0]
    return [f for f in fitting if f[0] <= margin * best][:trials]


def keeping(plan: Plan, line: Timeline, k: int) -> Plan:
    """`plan` with `k` of its checkpointed blocks kept instead (saving their activations, recomputing nothing),
    spread evenly over them; named `<name>+keep<k>`. What a budget's room above a plan's peak buys (`fill`)."""
    ckpt = list(line.checkpointed)
    k = max(0, min(k, len(ckpt)))
    if not k:
        return plan
    kept = {ckpt[int((i + 0.5) * len(ckpt) / k)] for i in range(k)}
    rest = tuple(i for i in ckpt if i not in kept)
    base, _, weights = plan.name.partition("+weights")  # (`named`'s order: +keepK, then +weightsE)
    return replace(plan, gradient_checkpointing=rest or False,
                   name=f"{base}+keep{k}" + (f"+weights{weights}" if weights else ""))


def fill(plan: Plan, pred, line: Timeline, budget_bytes: float, predict) -> tuple:
    """The most of `plan`'s checkpointed blocks that can be kept under the budget (`keeping`), from `predict(plan)`
    (its prediction, or None): each kept block adds about the same bytes to the peak (its saved activations, all
    alive at the end of the forward), so the count comes from the peak with every one kept, and is checked by
    predicting it (one block fewer while it does not fit). Where the peak is not that straight a line in the count
    — with weights away it sits at the end of backward while few blocks are kept, and moves to the loss as more
    are — a count that fits with room for more is followed by the one the line through it and every block kept
    gives, while that one fits too. Returns (plan, prediction); the plan itself where no block can be kept."""
    return fill_many([(plan, pred, line)], budget_bytes, predict)[0]


def _fill_search(plan: Plan, pred, line: Timeline, budget_bytes: float):
    """`fill`'s search as a generator: yields each plan it needs predicted, is sent its prediction (or None), and
    returns (plan, prediction)."""
    m = len(line.checkpointed)
    if not m:
        return plan, pred
    every_kept = keeping(plan, line, m)
    every = yield every_kept
    if every is None:
        return plan, pred
    if every.peak <= budget_bytes:
        return every_kept, every
    per_block = (every.peak - pred.peak) / m
    k = min(m - 1, int((budget_bytes - pred.peak) // per_block)) if per_block > 0 else 0
    while 0 < k < m:
        kept = keeping(plan, line, k)
        got = yield kept
        if got is not None and got.peak <= budget_bytes:
            while k < m - 1 and every.peak > got.peak:  # room for more, by the line from here to every block kept
                more = min(m - 1, k + int((budget_bytes - got.peak) * (m - k) // (every.peak - got.peak)))
                if more <= k:
                    break
                bigger = keeping(plan, line, more)
                tried = yield bigger
                if tried is None or tried.peak > budget_bytes:
                    break
                k, kept, got = more, bigger, tried
            return kept, got
        k -= 1
    return plan, pred


def fill_many(items: list, budget_bytes: float, predict, prefetch=None) -> list:
    """`fill` for each (plan, prediction, timeline) of `items`, their searches run in step: each round, the plan
    every search still going needs next is handed to `prefetch` together (to be made at once, e.g. in worker
    processes: `lorafa.memory.prefetch`), then each is asked of `predict` in turn. The same (plan, prediction)
    pairs as `fill` one plan after another."""
    searches = [_fill_search(plan, pred, line, budget_bytes) for plan, pred, line in items]
    out: list = [None] * len(items)
    asks: dict = {}
    for i, search in enumerate(searches):
        try:
            asks[i] = next(search)
        except StopIteration as done:
            out[i] = done.value
    while asks:
        if prefetch is not None and len(asks) > 1:
            prefetch(list(asks.values()))
        for i in list(asks):
            try:
                asks[i] = searches[i].send(predict(asks[i]))
            except StopIteration as done:
                out[i] = done.value
                del asks[i]
    return out


def fill_weights_away(options: list, short: list, n_blocks: int, budget_bytes: float, predict,
                      lines: dict, prefetch=None) -> tuple[list, list]:
    """The candidates with their first blocks' frozen weights away (`weights_away`, each count `weight_counts`
    gives), each filled as `fill` fills (the room the weights leave, kept blocks) where it moves any
    weights and fits the budget: those of the `short` plans (of the shortlist of those that fit as they are, the
    ones still checkpointing blocks once filled: for the others the weights' room buys nothing), and of the plans
    that do not fit as they are but would without the weights' bytes (estimated from the first prediction's bytes
    a block; then predicted). `options`: (plan, prediction or None) pairs; `predict(plan)`: a
    prediction or None, noting its `Timeline` in `lines`. Returns (filled (plan, prediction) pairs, every
    (plan, prediction) predicted with weights away); none more once one moves no weights (the method trains them).
    The fills run in step (`fill_many`, `prefetch` as there); so do the tries: once the first tells the bytes a
    block, every try still to come that would fit by them is handed to `prefetch` together."""
    fits, tried, per_block, ahead = [], [], None, False
    todo = [(plan, pred, e) for plan, pred in options
            if pred is not None and (plan in short or pred.peak > budget_bytes)  # (a plan that fits but was not
            for e in weight_counts(n_blocks, bool(plan.offload))]            # shortlisted: not worth its predictions)

    def worth(plan, pred, e) -> bool:
        return plan in short or per_block is None or pred.peak - e * per_block <= budget_bytes

    for i, (plan, pred, e) in enumerate(todo):
        if not worth(plan, pred, e):
            continue
        away = weights_away(plan, e)
        got = predict(away)
        tried.append((away, got))
        if got is None:
            continue
        if not got.host_weights:  # the method trains its weights: none moves in any plan
            return fill_many(fits, budget_bytes, predict, prefetch), tried
        per_block = per_block or got.host_weights / e
        if prefetch is not None and not ahead:
            ahead = True
            rest = [weights_away(p, k) for p, q, k in todo[i + 1:] if worth(p, q, k)]
            if len(rest) > 1:
                prefetch(rest)
        if got.peak <= budget_bytes:
            fits.append((away, got, lines[away]))
    return fill_many(fits, budget_bytes, predict, prefetch), tried


def distinct(filled: list, named: list) -> list:
    """`fill`'s (plan, prediction) pairs, each plan that is one of the `named` candidates under another name (every
    checkpointed block kept: `every4+keep6` is `none`) given that name, and each plan once (the first): a plan is
    timed once, under the name a user would set."""
    names = {plan: plan for plan in named}  # (a plan's equality and hash leave its name out)
    out, seen = [], set()
    for plan, pred in filled:
        plan = names.get(plan, plan)
        if plan not in seen:
            seen.add(plan)
            out.append((plan, pred))
    return out


def to_retime(short: list, timed: dict, margin: float) -> list[str]:
    """The shortlisted plans (`shortlist`) timed again after every one was timed once: those timed within `margin`
    of the fastest (`timed`: plan name → seconds, None where a trial failed), in the reverse of the first pass's
    order; none where fewer than two are that close. Where a step is bound by the host, the host's speed can drift
    between one trial and the next (roberta-large 32 × 128 on an H200: a fixed Python loop took 204–441 ms from
    one minute to the next), so a plan timed at a slow moment loses to one timed at a fast one; timed again in
    reverse order, each close plan gets the other end of the drift, and keeps its better time."""
    ok = {name: t for name, t in timed.items() if t is not None}
    if len(ok) < 2 or margin <= 0:
        return []
    fastest = min(ok.values())
    close = [plan.name for _, plan, _ in short if plan.name in ok and ok[plan.name] <= (1 + margin) * fastest]
    return close[::-1] if len(close) >= 2 else []


def pick_timed(short: list, timed: dict, tolerance: float = TRIAL_TOLERANCE):
    """The shortlisted plan (`shortlist`) whose timed step (`timed`: plan name → seconds, None where its trial
    failed) was the shortest — the modelled faster of those timed within `tolerance` of the shortest, which a
    trial's noise cannot tell apart; none timed: the modelled fastest. Returns (plan, prediction, modelled
    seconds)."""
    ok = [(i, timed[plan.name]) for i, (_, plan, _) in enumerate(short) if timed.get(plan.name) is not None]
    fastest = min((t for _, t in ok), default=None)
    i = next((i for i, t in ok if t <= (1 + tolerance) * fastest), 0)
    seconds, plan, pred = short[i]
    return plan, pred, seconds
