"""Low-rank adapters on nn.Linear layers: LoRA (A and B trained) and LoRA-FA (A frozen at its random init).

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ        A: r × d_in (Kaiming-uniform), B: d_out × r (zero), s = α / r

The layout (A: r × d_in, B: d_out × r) is PEFT's, so `lora_A`/`lora_B` map one-to-one onto a PEFT adapter.

Why LoRA-FA saves memory: autograd saves a matmul's input only if the other operand needs a gradient. With A
trainable, `dropout(x) @ Aᵀ` must keep the full-width N × d_in input for dA. With A frozen it keeps nothing for
that product (dx needs only A, a parameter), and `h @ Bᵀ` keeps only h = s · dropout(x) Aᵀ, N × r. The base
`x @ Wᵀ` keeps nothing either, since W is frozen. A dropout > 0 still keeps its N × d_in mask (1 byte/element).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear layer, weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D: y = x W + b with W: d_in × d_out
    return d_in, d_out


class LoRALinear(nn.Module):
    """A frozen linear layer plus a rank-r update; `train_a=False` makes it a LoRA-FA layer."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, train_a: bool = True):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        self.in_features, self.out_features = linear_dims(base)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw), requires_grad=train_a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init, and PEFT's
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # Model code reads these off its linear layers (T5 checks `wo.weight.dtype`): answer for the base layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scale the N × r product, not the N × d_out one: fewer flops, and a multiply by a Python scalar saves
        # nothing for backward.
        h = (self.dropout(x) @ self.lora_A.t()) * self.scaling
        return self.base(x) + h @ self.lora_B.t()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, train_a={self.lora_A.requires_grad}"


def inject(model: nn.Module, names: list[str], *, rank: int, alpha: float, dropout: float,
           train_a: bool) -> dict[str, LoRALinear]:
    """Replace each named linear layer of `model` by a LoRALinear wrapping it; returns the new modules by name."""
    added = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not is_linear(base):
            raise TypeError(f"{name} is {type(base).__name__}, not nn.Linear")
        layer = LoRALinear(base, rank, alpha, dropout, train_a)
        setattr(parent, child, layer)
        added[name] = layer
    return added
