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

from contextlib import ExitStack, contextmanager
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
    spec = method.get("gradient_checkpointing", False)
    policy = str(method.get("checkpoint_policy", "full"))
    if policy not in POLICIES:
        raise BadInput(f"method.checkpoint_policy={policy}: expected one of {', '.join(POLICIES)}")
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
    """The plan in one line, for the row's `plan` column: checkpointing (which blocks, what they keep) and
    element-wise recomputation; `none` when the step saves everything."""
    parts = []
    kind, arg = parse(method.get("gradient_checkpointing", False))
    if kind != "none":
        which = ("all blocks" if kind == "all" else f"every:{arg} blocks" if kind == "every"
                 else f"the first {arg} blocks" if kind == "first" else "blocks " + ", ".join(map(str, arg)))
        parts.append(f"checkpoint {which} (keep {method.get('checkpoint_policy', 'full')})")
    if str(method.get("recompute", "none")) != "none":
        parts.append(f"recompute {method.recompute}")
    return "; ".join(parts) or "none"
