"""Selective recomputation of cheap element-wise activations (`method.recompute=elementwise`).

Freezing A removes every adapted layer's full-width input from what backward keeps; what is left is the frozen
network's own activations. Some of those are element-wise functions of a tensor that is kept anyway, or random
masks, and are cheaper to recompute in backward than to store. With `recompute=elementwise` these modules of the
model run as autograd nodes that keep less (the output values are the same as the model's own code):

| module (detected by structure)            | eager PyTorch keeps                    | here it keeps                  |
|-------------------------------------------|----------------------------------------|--------------------------------|
| `nn.Dropout`                              | the mask (1 B/element on CUDA, 4 on CPU) | one integer seed: the mask is redrawn in backward |
| RMSNorm (LLaMA, T5), input in bf16        | an fp32 copy of the input (+ fp32 x̂ for a trained weight) | the input as it came, and 1/rms per token |
| gated MLP `down(act(gate(x)) · up(x))`    | gate, act(gate), up                    | gate and up; act(gate) recomputed |
| `nn.ReLU`                                 | its output (2 B/element in bf16)       | a bool mask (1 B/element)      |

GELU and LayerNorm are left alone: backward needs their input, which is what they keep. The cost is one extra
element-wise pass (and one Bernoulli draw per dropout) in backward; the memory/speed trade-off at real scale
is measured in `results/memory.parquet` (`experiments/memory.py`). Dropout masks come from `lorafa.adapters._dropout_mask` and are drawn
from a seed taken from the global generator, so runs stay reproducible under `seed`; the masks differ from
`nn.Dropout`'s own stream (same distribution). Recomputation composes with gradient checkpointing.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .adapters import _draw_seed, _dropout_mask


# autograd functions, not torch.utils.checkpoint around each module: a checkpoint keeps the module's input (for dropout
# and ReLU at least as large as what they keep) and recomputes all of it (RMSNorm's reduction too)
class _SeedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):
        ctx.p, ctx.seed = p, seed
        return x * _dropout_mask(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return dy * _dropout_mask(dy, ctx.p, ctx.seed), None, None


def _dropout_forward(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.p == 0 or not torch.is_grad_enabled():
        return nn.functional.dropout(x, self.p, self.training)
    if self.p >= 1:
        return torch.zeros_like(x)
    return _seeded_dropout(x, float(self.p))


@torch.compiler.disable
def _seeded_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """The seed drawn and used in one eager call, also under torch.compile: a seed that came back into compiled code
    would be a constant of it (see `lorafa.adapters._lorafa_with_dropout`)."""
    return _SeedDropout.apply(x, p, _draw_seed())


class _RMSNorm(torch.autograd.Function):
    """y = w · cast(x̂), x̂ = x · rstd, rstd = 1/sqrt(mean(x²) + eps) in fp32; keeps x (in its own dtype) and
    rstd (N × 1), and recomputes x̂ in backward.

    The arithmetic is each model's own: LLaMA forms x̂ from fp32 x and casts it back to the input dtype; T5
    multiplies x as it is by the fp32 rstd (type promotion) and casts to the weight's dtype when that is half
    precision."""

    @staticmethod
    def _xhat(x, rstd, t5_style: bool):
        return (x if t5_style else x.float()) * rstd

    @staticmethod
    def forward(ctx, x, weight, eps: float, t5_style: bool):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        xhat = _RMSNorm._xhat(x, rstd, t5_style)
        if t5_style:
            cast = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else xhat.dtype
        else:
            cast = x.dtype
        ctx.save_for_backward(x, weight, rstd)
        ctx.cast, ctx.t5_style = cast, t5_style
        return weight * xhat.to(cast)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = _RMSNorm._xhat(x, rstd, ctx.t5_style)
        work = xhat.dtype  # fp32, or fp64 for T5 on fp64 input
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.to(work) * xhat.to(ctx.cast).to(work)).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        g = dy.to(work) * weight.to(work)
        dx = rstd.to(work) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None, None


def _rmsnorm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return self._lorafa_forward(x)
    return _RMSNorm.apply(x, self.weight, float(self.variance_epsilon), type(self).__name__ == "T5LayerNorm")


class _GatedAct(torch.autograd.Function):
    """act(g) · u keeping g and u only; act(g) and its derivative are recomputed from g in backward."""

    @staticmethod
    def forward(ctx, g, u, act):
        ctx.act = act
        ctx.save_for_backward(g, u)
        return act(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        with torch.enable_grad():
            gg = g.detach().requires_grad_(True)
            a = ctx.act(gg)
        du = dy * a.detach() if ctx.needs_input_grad[1] else None
        dg = torch.autograd.grad(a, gg, dy * u)[0] if ctx.needs_input_grad[0] else None
        return dg, du, None


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return self._lorafa_forward(x)
    return self.down_proj(_GatedAct.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


class _ReLUMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y > 0)
        return y

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensors
        return dy * mask


def _relu_forward(self: nn.ReLU, x: torch.Tensor) -> torch.Tensor:
    return _ReLUMask.apply(x) if torch.is_grad_enabled() else torch.relu(x)


def _is_rmsnorm(m: nn.Module) -> bool:
    name = type(m).__name__
    return (name.endswith("RMSNorm") or name == "T5LayerNorm") and hasattr(m, "variance_epsilon") \
        and isinstance(getattr(m, "weight", None), torch.Tensor) and getattr(m, "bias", None) is None


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _patch(module: nn.Module, forward) -> None:
    """Swap the instance's forward (parameter names, state dicts and PEFT export stay as they were)."""
    module._lorafa_forward = module.forward
    module.forward = types.MethodType(forward, module)


def enable(model: nn.Module) -> dict[str, int]:
    """Switch the model's element-wise modules to their recomputing versions; returns how many of each."""
    counts = {"dropout": 0, "rmsnorm": 0, "gated_mlp": 0, "relu": 0}
    for m in model.modules():
        if hasattr(m, "_lorafa_forward"):
            continue
        if isinstance(m, nn.Dropout):
            _patch(m, _dropout_forward)
            counts["dropout"] += 1
        elif _is_rmsnorm(m):
            _patch(m, _rmsnorm_forward)
            counts["rmsnorm"] += 1
        elif _is_gated_mlp(m):
            _patch(m, _gated_mlp_forward)
            counts["gated_mlp"] += 1
        elif isinstance(m, nn.ReLU):
            _patch(m, _relu_forward)
            counts["relu"] += 1
    return counts
