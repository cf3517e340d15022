"""A fine-tuning method is data (`conf/method/*.yaml`) read by the one function here.

| method  | rank | train_base | train_a | trained parameters                          |
|---------|------|------------|---------|---------------------------------------------|
| full    | 0    | true       | –       | every weight                                |
| lora    | r    | false      | true    | A and B of each adapted layer (+ task head) |
| lorafa  | r    | false      | false   | B of each adapted layer (+ task head)       |

A new method is a new config file, not a new branch: e.g. LoRA with a trainable base is `train_base: true`.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from . import adapters
from .models import Network, count_params, resolve_targets


@dataclass
class Applied:
    targets: list[str]  # adapted module names (empty for full fine-tuning)
    trainable_params: int
    total_params: int


def apply(net: Network, method: DictConfig, target_presets=None) -> Applied:
    """Set what trains in `net.model` according to `method`, adding adapters where `method.rank > 0`."""
    model = net.model
    for p in model.parameters():
        p.requires_grad_(bool(method.train_base))
    names: list[str] = []
    if method.rank > 0:
        names = resolve_targets(model, method.targets, target_presets)
        adapters.inject(model, names, rank=int(method.rank), alpha=float(method.alpha),
                        dropout=float(method.dropout), train_a=bool(method.train_a))
    if method.get("train_head", True):  # a fresh classification head is trained by every method
        for head in net.head_modules:
            model.get_submodule(head).requires_grad_(True)
    trainable, total = count_params(model)
    return Applied(targets=names, trainable_params=trainable, total_params=total)
