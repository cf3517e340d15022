"""A fine-tuning method is data (`conf/method/*.yaml`) read by the one function here.

| method    | rank | train_base | train_a | precondition_b | trained parameters                          |
|-----------|------|------------|---------|----------------|---------------------------------------------|
| full      | 0    | true       | –       | –              | every weight                                |
| lora      | r    | false      | true    | false          | A and B of each adapted layer (+ task head) |
| lorafa    | r    | false      | false   | false          | B of each adapted layer (+ task head), B at b_lr_ratio × lr (4: the recipe) |
| lorafa_v2 | r    | false      | false   | true           | B, its gradient times (A Aᵀ)⁻¹ / s², B at 4 × lr |
| frozen    | 0    | false      | –       | –              | only the task head; backward still runs through every block to the input embeddings (`input_grads`): the activation memory any adapter method must at least pay |

Any method also takes `gradient_checkpointing` (true, every:K, first:N or a list of blocks: recompute those blocks'
activations in backward, keeping what `checkpoint_policy` says; `lorafa.plans`),
`recompute: elementwise` (recompute dropout masks, norms and activation functions only; `lorafa.recompute`) and
`init_a: kaiming | orthogonal` and `stacked: true` (LoRA-FA: W and A held as one frozen matrix, so the forward
and the input gradient each take one matmul; same numbers, same memory) or `stacked: merged` (that, with the
adapter folded into the weight for the step, W + s·B·A: no activation-sized rank-r work; same memory). A new method is a new config file, not a new branch in the code.

Frozen weights can be held in a lower precision (`frozen_dtype`, bf16 under CUDA autocast by default): they take
half the memory, and autocast no longer makes — and saves for backward — a bf16 copy of each of them per matmul.
Trained parameters stay in fp32 (mixed precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from . import adapters, plans
from . import recompute as recomputed
from .checks import BadInput
from .models import Network, count_params, resolve_targets


@dataclass
class Applied:
    targets: list[str]  # adapted module names (empty for full fine-tuning)
    trainable_params: int
    total_params: int
    checkpointed_blocks: int = 0  # blocks that recompute their activations in backward (`lorafa.plans`)
    offload: object = None  # `lorafa.plans.Offload` when the blocks' saved tensors go to the host


def build_dtypes(method: DictConfig, frozen_dtype: torch.dtype | None, dtype: torch.dtype,
                 quantize=None) -> tuple[torch.dtype, torch.dtype | None]:
    """(the dtype to build a model in for `method`, `apply`'s `train_dtype`). Where the base model stays frozen in
    `frozen_dtype` (LoRA, LoRA-FA): built in that dtype — a model built in fp32 and cast after holds twice its frozen
    weights at once (llama-7b: 25 GiB, more than a 24 GB card) — and what trains made and held in `dtype`. Else
    (full fine-tuning, a quantized base, no frozen dtype): built in `dtype`, and no `train_dtype`."""
    if frozen_dtype is None or frozen_dtype == dtype or bool(method.get("train_base", False)) or quantize:
        return dtype, None
    return frozen_dtype, dtype


def apply(net: Network, method: DictConfig, target_presets=None, *, frozen_dtype: torch.dtype | None = None,
          stacked=None, adapter: adapters.PeftAdapter | None = None, train_dtype: torch.dtype | None = None) -> Applied:
    """Set what trains in `net.model` according to `method`, adding adapters where `method.rank > 0`. `stacked`:
    LoRA-FA's layer when not `method.stacked` (a job resolves `auto`: `lorafa.step.choose_layer`); `auto` left
    unresolved is the two-matmul layer (the same memory as the others: what `lorafa.memory` needs). `adapter`
    (`model.adapter`, `lorafa.adapters.read_peft`): its rank, alpha, dropout and layers replace the method's, and
    its A, B (and task head) are loaded into the new layers; what trains is still the method's (LoRA-FA: B).
    `train_dtype`: the adapters made, and what trains held, in it (a model built in its frozen dtype,
    `build_dtypes`, still trains in fp32); None: the dtype the model was built in."""
    model = net.model
    if adapter is not None:
        if not method.rank > 0:
            raise BadInput(f"model.adapter={adapter.path}: method={method.get('name')} has no adapter layers to load "
                           "it into; expected an adapter method (lora, lorafa, lorafa_v2)")
        method = OmegaConf.merge(method, adapter.method_keys())
    for p in model.parameters():
        p.requires_grad_(bool(method.train_base))
    names: list[str] = []
    if method.rank > 0:
        names = (adapters.peft_targets(model, adapter) if adapter is not None
                 else resolve_targets(model, method.targets, target_presets))
        adapters.inject(model, names, rank=int(method.rank), alpha=float(method.alpha),
                        dropout=float(method.dropout), train_a=bool(method.train_a),
                        init_a=str(method.get("init_a", "kaiming")),
                        precondition_b=bool(method.get("precondition_b", False)), dtype=train_dtype)
    if method.get("train_head", True):  # a fresh classification head is trained by every method
        for head in net.head_modules:
            model.get_submodule(head).requires_grad_(True)
    if train_dtype is not None:
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != train_dtype:
                p.data = p.data.to(train_dtype)
    if adapter is not None:  # before the frozen-dtype cast and the stacking below, which take these values
        adapters.load_peft(model, adapter, net.head_modules)
    if frozen_dtype is not None:
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(frozen_dtype)
    stacked = method.get("stacked", False) if stacked is None else stacked
    stacked = {"auto": False, "false": False, "true": True, "merged": "merged"}.get(str(stacked).lower(), stacked)
    if stacked not in (False, True, "merged"):
        raise ValueError(f"method.stacked={stacked!r}: expected auto, false, true or merged")
    if stacked:  # after the dtype change: the stack is made of the final frozen tensors
        for layer in adapters.lora_layers(model).values():
            layer.stack_frozen(merged=stacked == "merged")
    if method.get("input_grads", False):  # backprop through the frozen network to its input embeddings
        model.enable_input_require_grads()
    recompute = str(method.get("recompute", "none"))
    if recompute == "elementwise":
        recomputed.enable(model)
    elif recompute != "none":
        raise ValueError(f"method.recompute={recompute!r}: expected none or elementwise")
    checkpointed = plans.apply(model, method)  # which blocks recompute in backward, and what they keep
    offloaded = plans.offload(model, method)  # what the blocks save, held on the host
    trainable, total = count_params(model)
    return Applied(targets=names, trainable_params=trainable, total_params=total, checkpointed_blocks=checkpointed,
                   offload=offloaded)
