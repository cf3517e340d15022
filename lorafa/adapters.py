"""Low-rank adapters on linear layers: LoRA (A and B trained) and LoRA-FA (A frozen at its random init).

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ        A: r × d_in (Kaiming-uniform), B: d_out × r (zero), s = α / r

The layout (A: r × d_in, B: d_out × r) is PEFT's, so `lora_A`/`lora_B` map one-to-one onto a PEFT adapter;
`save_peft` writes PEFT's files, `read_peft` + `load_peft` take a PEFT LoRA adapter back in (`model.adapter`), and
`merge` folds the adapters into the base weights.

Why LoRA-FA saves memory: with A trainable, backward needs the full-width N × d_in input of every adapted layer
(for dA). With W, b and A frozen, the only thing backward needs is h = s·dropout(x)Aᵀ, N × r (for dB); dx needs
only the weights. Eager autograd gets close to that by itself but still keeps dropout's N × d_in mask; the
LoRA-FA layer here is one autograd node (`_LoRAFAFunction`) that keeps exactly h, and redraws the mask.

On a base held in 4 or 8 bits (`model.quantize`, `lorafa.quantize.QuantizedLinear`) the same holds: W is dequantized
for the matmul and again for dx, so LoRA-FA still keeps only h; the adapters take the dtype the model was built in.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .quantize import QuantizedLinear


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D (GPT-2's linear layer, weight stored transposed), or a linear layer held in
    4 or 8 bits (`lorafa.quantize.QuantizedLinear`)."""
    return isinstance(module, (nn.Linear, QuantizedLinear)) or type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    if isinstance(module, (nn.Linear, QuantizedLinear)):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D: y = x W + b with W: d_in × d_out
    return d_in, d_out


@torch.compiler.disable  # eager under torch.compile too: compiled and eager runs draw the same masks
def _draw_seed() -> int:
    """A dropout seed from the global CPU generator, so `seed` in the config decides every mask. A real draw
    also under fake tensors (`lorafa.memory.predict`): the seed is a Python int either way."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return int(torch.randint(0, 2**62, (1,)))


# not nn.functional.dropout: it draws from the global generator and returns no mask, and backward must redraw this one
def _dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The inverted-dropout mask (0 or 1/(1-p)) that `seed` draws for a tensor like `like`: the same mask
    every time it is asked for, on any device, without touching the global random state."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=g).div_(1.0 - p)


@torch.compiler.disable
def _lorafa_with_dropout(x, weight, bias, lora_a, lora_b, scaling: float, p: float, quantized):
    """The LoRA-FA layer with adapter dropout: its mask's seed drawn and used in one eager call. Under torch.compile
    (`train.compile=blocks`) the block's graph breaks here; a seed that came back into compiled code would be a
    constant of the code after it, which would compile again for every draw until torch.compile gave up."""
    return _LoRAFAFunction.apply(x, weight, bias, lora_a, lora_b, scaling, p, _draw_seed(), quantized)


class _LoRAFAFunction(torch.autograd.Function):
    """A LoRA-FA layer in one autograd node, for when W, b and A are all frozen:

        h = s · (m ⊙ x) Aᵀ        (N × r; m the dropout mask, all ones without dropout)
        y = x Wᵀ + b + h Bᵀ
        dB = dyᵀ h,   dx = dy W + m ⊙ (s · (dy B) A)

    It saves h and, with dropout, one integer seed from which backward draws m again — never a full-width
    tensor, and no mask (eager autograd would keep dropout's N × d_in mask, one byte an element, per layer).
    Regenerating costs one more Bernoulli draw per adapted layer in backward. Under gradient checkpointing the
    recomputed forward draws the same seed, since checkpointing restores the random state it started from.
    Under autocast the forward's matmuls autocast as usual and backward computes in the dtype of dy.
    On a quantized base (`model.quantize`: `quantized` is the base layer, `weight` None) W is dequantized for the
    forward's matmul and again for dx (`lorafa.quantize`): still only h is saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, seed: int,
                quantized: QuantizedLinear | None = None):
        xa = x * _dropout_mask(x, p, seed) if p > 0 else x
        h = nn.functional.linear(xa, lora_a) * scaling
        del xa
        if quantized is not None:
            weight_x = quantized.dequantized(quantized.matmul_dtype(x))
            y = nn.functional.linear(x, weight_x, bias)
            del weight_x
            y = y + nn.functional.linear(h, lora_b)
        else:
            y = nn.functional.linear(x, weight, bias) + nn.functional.linear(h, lora_b)
        ctx.save_for_backward(h, weight, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.seed, ctx.quantized = scaling, p, seed, quantized
        return y

    @staticmethod
    def backward(ctx, dy):
        h, weight, lora_a, lora_b = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[4]:
            db = dy.reshape(-1, dy.shape[-1]).t() @ h.reshape(-1, h.shape[-1]).to(dy.dtype)
        if ctx.needs_input_grad[0]:
            through_adapter = ((dy @ lora_b.to(dy.dtype)) * ctx.scaling) @ lora_a.to(dy.dtype)
            if ctx.p > 0:
                through_adapter.mul_(_dropout_mask(through_adapter, ctx.p, ctx.seed))
            w = ctx.quantized.dequantized(dy.dtype) if ctx.quantized is not None else weight.to(dy.dtype)
            dx = (dy @ w).add_(through_adapter)
        return dx, None, None, None, db, None, None, None, None


class _LoRAFAStackedFunction(torch.autograd.Function):
    """The LoRA-FA layer without dropout, with W and A stacked in one frozen (d_out + r) × d_in matrix WA:

        [y₀ | u] = x WAᵀ (+ [b | 0])      one matmul for the base layer and the adapter's down-projection
        h = s · u                          (N × r, saved)
        y = y₀ + h Bᵀ                      one addmm
        dx = [dy | s · dy B] WA            one matmul (the concatenation is N × (d_out + r))
        dB = dyᵀ h

    Saves exactly what `_LoRAFAFunction` saves (h and the frozen weights): the same memory, fewer kernels —
    which matters where launching kernels is the cost (eager). Once the step is compiled and graphed the
    kernels' own time is what counts; there the two-matmul layer was the faster on an H200 and the merged one
    (`_LoRAFAMergedFunction`) faster still at the smaller models (see `lorafa.bench.layer_variants`), so the bench
    measures all three."""

    @staticmethod
    def forward(ctx, x, stacked, bias_ext, lora_b, scaling: float, d_out: int):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        yu = nn.functional.linear(x2, stacked, bias_ext)
        h = yu[:, d_out:] * scaling
        y = torch.addmm(yu[:, :d_out], h, lora_b.t().to(h.dtype))
        ctx.save_for_backward(h, stacked, lora_b)
        ctx.scaling, ctx.d_out = scaling, d_out
        return y.reshape(*lead, d_out)

    @staticmethod
    def backward(ctx, dy):
        h, stacked, lora_b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = db = None
        if ctx.needs_input_grad[3]:
            db = dy2.t() @ h.to(dy2.dtype)
        if ctx.needs_input_grad[0]:
            grad_u = (dy2 @ lora_b.to(dy2.dtype)) * ctx.scaling
            dx = torch.cat([dy2, grad_u], dim=-1) @ stacked.to(dy2.dtype)
            dx = dx.reshape(*dy.shape[:-1], -1)
        return dx, None, None, db, None, None


_UNROLL_RANK = 32  # up to this r the compiled merge is one pointwise kernel of r multiply-adds an element


def _merge(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, alpha: float, dt: torch.dtype) -> torch.Tensor:
    """W + alpha·B·A in dtype `dt` (the merged LoRA-FA layer's Wₑ). Eager: addmm. Under torch.compile: the sum over
    r of the outer products B[:, k] A[k, :], which inductor fuses with the add and the cast into one pass over the
    weights (r is small: 8 multiply-adds an element), where addmm copies W into its output and then reads and
    writes it again in a GEMM whose K = r leaves the tensor cores idle."""
    if torch.compiler.is_compiling() and b.shape[1] <= _UNROLL_RANK:
        merged = weight.float()
        for k in range(b.shape[1]):  # unrolled: a sum over r, as `.sum`, became a reduction kernel 20x slower
            merged = merged + alpha * b[:, k:k + 1].float() * a[k:k + 1, :].float()
        return merged.to(dt)
    return torch.addmm(weight.to(dt), b.to(dt), a.to(dt), alpha=alpha)


class _LoRAFAMergedFunction(torch.autograd.Function):
    """A LoRA-FA layer without dropout with the adapter folded into the weight for the step — W and A frozen, so
    x Wᵀ + s (x Aᵀ) Bᵀ = x (W + s B A)ᵀ:

        Wₑ = W + s B A          d_out × d_in: one small matmul (K = r), weight-sized output, not kept
        y = x Wₑᵀ + b           one matmul
        h = s · x Aᵀ            (N × r, saved)
        dx = dy Wₑ              one matmul, Wₑ formed again in backward (as W + (s B) A, see there)
        dB = dyᵀ h

    Against the other two layers it trades the activation-sized rank-r work (h Bᵀ added to y in the forward, the
    N × d_in product (dy B) A added to dx in backward: passes over N × d each) for weight-sized work (form Wₑ
    twice a step): the faster where a step's tokens outnumber the layer's width, as in roberta-base and t5-large
    at 32 × 128; the bench measures all three layers. Saves exactly what they save (h; the weights are weights).
    (One matmul x [Wₑ; A]ᵀ for y and h together would leave y a view of an N × (d_out + r) output, and whatever
    later keeps y for backward would keep the whole of it.) Numerics: Wₑ is rounded to the matmul's dtype once
    (bf16 under autocast), a rounding of the size of autocast's own cast of W; in fp32 it is the closed form.

    Forming Wₑ (`_merge`): eager calls addmm, which first copies W into its output and then runs a K = r GEMM
    over it (llama-7b on the H200: 12.8 ms a step of device-to-device copies alone, commit 7892838); compiled, it
    is written as a sum of r outer products, which the compiler makes one kernel that reads W once and writes Wₑ
    once, in fp32 arithmetic rounded once."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
        merged = _merge(weight, lora_b, lora_a, scaling, dt)
        y = nn.functional.linear(x, merged, bias)
        del merged
        h = nn.functional.linear(x, lora_a) * scaling
        ctx.save_for_backward(h, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        h, weight, lora_a, lora_b = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[4]:
            db = dy.reshape(-1, dy.shape[-1]).t() @ h.reshape(-1, h.shape[-1]).to(dy.dtype)
        if ctx.needs_input_grad[0]:
            # formed as W + (s B) A, not by the forward's expression (alpha = s): torch.compile's common-
            # subexpression pass would make the two one tensor and keep it for backward (a weight-sized tensor per
            # layer: +6 GB at llama-7b on the H200, commit daa7604). Not as Wᵀ + s Aᵀ Bᵀ either (commit f39aef8):
            # addmm then copies the transposed W into its output, a strided pass over the weights (+0.65 ms a
            # step at roberta-base, H200, commit fa46678). s B is rounded to the matmul dtype once, as B is.
            dt = dy.dtype
            merged = _merge(weight, lora_b * ctx.scaling, lora_a, 1.0, dt)
            dx = dy @ merged
        return dx, None, None, None, db, None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a rank-r update; `train_a=False` makes it a LoRA-FA layer.

    `init_a`: `kaiming` (Kaiming-uniform, as LoRA and PEFT) or `orthogonal` (orthonormal rows).
    `precondition_b` (LoRA-FA v2, PEFT's `create_lorafa_optimizer`): B's gradient is multiplied by
    (A Aᵀ)⁻¹ / s², which makes the update of ΔW = s·BA the closest one to the full fine-tuning gradient that a
    B-only update can be. A never changes, so the r × r inverse is computed once, at the first backward.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, train_a: bool = True,
                 init_a: str = "kaiming", precondition_b: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
        self.base = base
        self.rank, self.scaling, self.p = rank, alpha / rank, float(dropout)
        self.in_features, self.out_features = linear_dims(base)
        # `dtype`, else the dtype the model was built in (on a quantized base: its compute dtype)
        dtype = dtype or (base.compute_dtype if isinstance(base, QuantizedLinear) else base.weight.dtype)
        kw = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw), requires_grad=train_a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        if init_a == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init, and PEFT's
        elif init_a == "orthogonal":
            nn.init.orthogonal_(self.lora_A)
        else:
            raise ValueError(f"init_a={init_a!r}: expected kaiming or orthogonal")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._b_preconditioner = None
        self._stacked = self._bias_ext = None
        self._stack_ok = self._merged = False
        if precondition_b:
            if train_a:
                raise ValueError("precondition_b assumes A frozen (LoRA-FA); it does not apply with train_a")
            self.lora_B.register_hook(self._precondition)

    # a gradient hook, not PEFT's create_lorafa_optimizer: that is an optimizer of its own over a PeftModel, and the
    # step here stays torch's AdamW (fused, capturable)
    def _precondition(self, grad: torch.Tensor) -> torch.Tensor:
        if self._b_preconditioner is None or self._b_preconditioner.device != grad.device:
            a = self.lora_A.detach().double()
            eye = torch.eye(self.rank, dtype=a.dtype, device=a.device)
            # pinv(A Aᵀ + δI) / s², δ = 1e-8 as in PEFT's LoraFAOptimizer
            self._b_preconditioner = (torch.linalg.pinv(a @ a.t() + 1e-8 * eye) / self.scaling**2).float()
        with torch.autocast(grad.device.type, enabled=False):  # a backward run under autocast keeps grad's dtype
            return grad @ self._b_preconditioner.to(grad.dtype)

    # Model code reads these off its linear layers (T5 checks `wo.weight.dtype`): answer for the base layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _base_weight(self) -> torch.Tensor:
        """The base weight as d_out × d_in (Conv1D stores it transposed; `.t()` is a view, not a copy)."""
        return self.base.weight if isinstance(self.base, nn.Linear) else self.base.weight.t()

    def stack_frozen(self, merged: bool = False) -> bool:
        """Put the frozen W and A in one (d_out + r) × d_in storage (W and A become views of it: no extra memory),
        so the LoRA-FA forward and backward each need one big matmul instead of two (`_LoRAFAStackedFunction`);
        `merged`: the adapter folded into the weight for the step instead (`_LoRAFAMergedFunction`).
        Only for nn.Linear bases with W, b and A frozen in one dtype; returns whether it was done. Moving or
        casting the module (`.to`, `.cuda`, `.half`) re-checks the stack; code that swaps parameters otherwise
        (FSDP) must call `unstack()` first."""
        w, a = self.base.weight, self.lora_A
        if not isinstance(self.base, nn.Linear) or a.requires_grad or w.requires_grad or w.dtype != a.dtype \
                or (self.base.bias is not None and self.base.bias.requires_grad):
            return False
        stacked = torch.cat([w.detach(), a.detach()])
        w.data, a.data = stacked[: self.out_features], stacked[self.out_features:]
        self._stacked, self._merged = stacked, bool(merged)
        bias = self.base.bias
        self._bias_ext = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(self.rank)])
        # plain tensor attributes, not parameters: without this, CUDA graphs (torch.compile "reduce-overhead")
        # would copy every stack into a static buffer at every replay
        for t in (stacked, self._bias_ext):
            if t is not None:
                torch._dynamo.mark_static_address(t)
        self._stack_ok = self._check_stack()
        return True

    def unstack(self) -> None:
        """W and A back in storages of their own (the stacked path off)."""
        if getattr(self, "_stacked", None) is not None:
            self.base.weight.data = self.base.weight.data.clone()
            self.lora_A.data = self.lora_A.data.clone()
        self._stacked = self._bias_ext = None
        self._stack_ok = self._merged = False

    def _check_stack(self) -> bool:
        """W and A are still the views of the stack (nothing moved, cast or replaced them since)."""
        st = getattr(self, "_stacked", None)
        w, a = self.base.weight, self.lora_A
        return bool(st is not None and w.dtype == a.dtype == st.dtype and w.device == st.device
                    and torch._C._is_alias_of(w, st) and torch._C._is_alias_of(a, st)
                    and w.storage_offset() == 0 and a.storage_offset() == st[self.out_features:].storage_offset())

    def _apply(self, fn, recurse=True):
        # .to / .cuda / .half give W and A new storages: rebuild the stack from them
        out = super()._apply(fn, recurse)
        if getattr(self, "_stacked", None) is not None and not self._check_stack():
            self._stacked = None
            self.stack_frozen(self._merged)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not (self.lora_A.requires_grad or self.base.weight.requires_grad
                      or (self.base.bias is not None and self.base.bias.requires_grad))
        # `_stack_ok` is a plain bool, settled outside the forward: nothing here breaks a torch.compile graph
        if frozen and torch.is_grad_enabled() and (self.p == 0 or not self.training) and self._stack_ok:
            if self._merged:
                return _LoRAFAMergedFunction.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                                   self.scaling)
            return _LoRAFAStackedFunction.apply(x, self._stacked, self._bias_ext, self.lora_B, self.scaling,
                                                self.out_features)
        if frozen and torch.is_grad_enabled():
            p = self.p if self.training else 0.0
            quantized = self.base if isinstance(self.base, QuantizedLinear) else None
            weight = None if quantized is not None else self._base_weight()
            if p > 0:
                return _lorafa_with_dropout(x, weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, p,
                                            quantized)
            return _LoRAFAFunction.apply(x, weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, 0.0, 0,
                                         quantized)
        # LoRA (A trains) or a trainable base: plain autograd, which keeps x for dA and dropout's mask.
        # Scale the N × r product, not the N × d_out one: fewer flops, and a multiply by a Python scalar saves
        # nothing for backward.
        h = (self.dropout(x) @ self.lora_A.t()) * self.scaling
        return self.base(x) + h @ self.lora_B.t()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.p}, train_a={self.lora_A.requires_grad}"


def inject(model: nn.Module, names: list[str], *, rank: int, alpha: float, dropout: float, train_a: bool,
           init_a: str = "kaiming", precondition_b: bool = False,
           dtype: torch.dtype | None = None) -> dict[str, LoRALinear]:
    """Replace each named linear layer of `model` by a LoRALinear wrapping it (its A and B in `dtype`; None: the
    layer's own); returns the new modules by name.
    A rank above a layer's smaller side (min(d_in, d_out): the most a product B·A can have) is refused, before any
    layer is touched."""
    from .checks import BadInput

    for name in names:
        base = model.get_submodule(name)
        if is_linear(base) and rank > min(linear_dims(base)):
            raise BadInput(f"method.rank={rank}: larger than layer {name} allows (d_in × d_out = "
                           f"{' × '.join(map(str, linear_dims(base)))}); expected ≤ {min(linear_dims(base))}")
    added = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not is_linear(base):
            raise TypeError(f"{name} is {type(base).__name__}, not nn.Linear")
        layer = LoRALinear(base, rank, alpha, dropout, train_a, init_a=init_a, precondition_b=precondition_b,
                           dtype=dtype)
        setattr(parent, child, layer)
        added[name] = layer
    return added


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# PEFT's task types for the three families (they decide which PeftModel class loads the adapter)
PEFT_TASK_TYPES = {"encoder": "SEQ_CLS", "encoder-decoder": "SEQ_2_SEQ_LM", "decoder": "CAUSAL_LM"}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU in fp32 (FSDP's sharded DTensor gathered: a collective, every process calls it)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().cpu().contiguous()


# PEFT's format written and read without PEFT (beside save_pretrained, PeftModel.from_pretrained, merge_and_unload:
# this, `read_peft`, `merge`): those act on PEFT's own layers, not LoRALinear, and PEFT is a dev extra, not a dependency
def save_peft(model: nn.Module, out_dir, *, family: str, base_model: str | None = None,
              modules_to_save: list[str] | tuple = (), write: bool = True):
    """Write the adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), so that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads them; a trained task head goes in `modules_to_save`.
    Under FSDP every process calls it (the shards are gathered) and only the one with `write=True` writes."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no adapters to save")
    first = next(iter(layers.values()))
    prefix = "base_model.model."
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = _full(layer.lora_A)
        tensors[f"{prefix}{name}.lora_B.weight"] = _full(layer.lora_B)
    for head in modules_to_save:
        for pname, p in model.get_submodule(head).named_parameters():
            tensors[f"{prefix}{head}.{pname}"] = _full(p)
    config = {
        "peft_type": "LORA", "task_type": PEFT_TASK_TYPES[family], "base_model_name_or_path": base_model,
        "r": first.rank, "lora_alpha": first.scaling * first.rank, "lora_dropout": first.p,
        "target_modules": sorted(layers), "modules_to_save": list(modules_to_save) or None,
        "fan_in_fan_out": all(not isinstance(m.base, (nn.Linear, QuantizedLinear)) for m in layers.values()),
        "bias": "none", "init_lora_weights": True, "use_rslora": False, "inference_mode": True,
        # lorafa's own: A stayed frozen at its init (LoRA-FA). PEFT drops keys it does not know (with a warning)
        FROZEN_A_KEY: not any(m.lora_A.requires_grad for m in layers.values()),
    }
    out = Path(out_dir)
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


FROZEN_A_KEY = "lorafa_frozen_a"  # adapter_config.json: A was frozen (LoRA-FA) in the job that saved it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PeftModel.save_pretrained writes
_PREFIX = "base_model.model."
# adapter_config.json keys read here, or that say nothing about the loaded forward (metadata; the options of inits
# and of variants, which are refused when those are on)
_READ_KEYS = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
              "modules_to_save", "fan_in_fan_out", "use_rslora", "init_lora_weights", "base_model_name_or_path",
              "revision", "inference_mode", "auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
              "loftq_config", "eva_config", "corda_config", "lora_ga_config", FROZEN_A_KEY}
# inits that only drew A and B (the saved weights say the rest); PiSSA, OLoRA, CorDA, LoftQ, ... also changed the
# base weights the adapter was trained against, and MiCA is a layer variant
_PLAIN_INITS = ("true", "false", "gaussian", "eva", "orthogonal")
# every other key must be off (null, false, empty, "none"): what an option that is on asks of the layer
_UNSUPPORTED = {"use_dora": "DoRA's magnitude vector", "bias": "trained biases of the base layers",
                "lora_bias": "a bias on B", "rank_pattern": "a rank per layer (it has one rank)",
                "alpha_pattern": "an alpha per layer (it has one alpha)",
                "layers_pattern": "layer selection by pattern", "layers_to_transform": "layer selection by index",
                "layer_replication": "replicated layers", "use_qalora": "QA-LoRA's pooled input",
                "target_parameters": "LoRA on parameters, not linear layers",
                "trainable_token_indices": "trained token embeddings", "alora_invocation_tokens": "activated LoRA",
                "megatron_config": "Megatron layers", "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow"}


def _off(value) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list, str)) and not value)


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read from its directory (`read_peft`): what a job's method takes from it
    (`method_keys`) and the weights `load_peft` copies into the model's adapter layers."""
    path: str
    rank: int
    alpha: float  # lora_alpha; lora_alpha·√r under use_rslora, so that alpha / r is PEFT's scale α/√r
    dropout: float
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # adapted module name → (A: r × d_in, B: d_out × r)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save parameters by name
    frozen_a: bool | None = None  # lorafa's FROZEN_A_KEY when the adapter came from lorafa, else None

    def method_keys(self) -> dict:
        """The method keys the adapter overrides: its rank, alpha, dropout and exactly its layers."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.lora)}


def read_peft(path, *, config=None, family: str | None = None) -> PeftAdapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin, as
    `peft.PeftModel.save_pretrained` or `save_peft` writes it). What lorafa's layer cannot be is refused in one line
    (`BadInput`): another PEFT type, DoRA, trained biases, per-layer ranks or alphas, an init that changed the base
    weights, or any other option on (`_UNSUPPORTED`); with a transformers `config` and the `family`, an adapter
    made for another model type (its base_model_name_or_path, when a local checkpoint) or another head (task_type)."""
    from .checks import BadInput, check_adapter_dir

    check_adapter_dir(str(path))
    where = f"model.adapter={path}"
    folder = Path(path).expanduser()
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"{where}: {ADAPTER_CONFIG} is not readable JSON ({err})") from err

    def refuse(key, why, expected):
        raise BadInput(f"{where}: {ADAPTER_CONFIG} has {key}={json.dumps(cfg.get(key))}: {why}; expected {expected}")

    if cfg.get("peft_type") != "LORA":
        refuse("peft_type", "lorafa loads LoRA adapters only", "LORA")
    for key, value in sorted(cfg.items()):
        if key not in _READ_KEYS and not _off(value):
            refuse(key, f"lorafa cannot load {_UNSUPPORTED.get(key, 'an option it does not know')}",
                   "it off (null, false, empty or none)")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init not in _PLAIN_INITS:
        refuse("init_lora_weights", "that init changes the base weights (or the layer) the adapter was trained "
               "with; convert it to plain LoRA first (PEFT: "
               "save_pretrained(path_initial_model_for_weight_conversion=…))", "true, gaussian, eva or orthogonal")
    rank, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout", 0.0) or 0.0
    if not (isinstance(rank, int) and rank >= 1):
        refuse("r", "not a rank", "an integer ≥ 1")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        refuse("lora_alpha", "lorafa's scale α/r must be > 0", "a number > 0")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        refuse("lora_dropout", "not a dropout probability", "a number in [0, 1)")
    if config is not None:
        base = cfg.get("base_model_name_or_path")
        theirs = Path(str(base)).expanduser() / "config.json" if base else None
        if theirs is not None and theirs.is_file():
            their_type = json.loads(theirs.read_text()).get("model_type")
            if their_type and their_type != config.model_type:
                raise BadInput(f"{where}: made for a {their_type} model (base_model_name_or_path={base}); the model "
                               f"is {config.model_type}; expected an adapter of a {config.model_type} model")
    if family is not None and cfg.get("task_type") not in (None, PEFT_TASK_TYPES[family]):
        made_for = {v: k for k, v in PEFT_TASK_TYPES.items()}.get(cfg["task_type"], "another kind of")
        refuse("task_type", f"made for {made_for} models; the model is {family}", PEFT_TASK_TYPES[family])

    weights = next(folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file())
    try:
        tensors = (load_file(weights) if weights.suffix == ".safetensors"
                   else torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as err:  # any unreadable weights file is bad input
        raise BadInput(f"{where}: {weights.name} is not readable ({type(err).__name__}: {err})") from err
    parts: dict[str, dict[str, torch.Tensor]] = {}
    heads = {}
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX):
            raise BadInput(f"{where}: {weights.name} holds {key}, not a weight of a PEFT model ({_PREFIX}…)")
        name = key[len(_PREFIX):]
        found = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if found:
            parts.setdefault(found[1], {})[found[2]] = tensor
        elif re.search(r"(^|\.)lora_", name):
            raise BadInput(f"{where}: {weights.name} holds {key}: not the A or B of a LoRA linear layer; expected "
                           "lora_A.weight and lora_B.weight only")
        else:
            heads[name] = tensor  # modules_to_save: checked against the model's task head by `load_peft`
    if not parts:
        raise BadInput(f"{where}: {weights.name} holds no lora_A / lora_B weights")
    lora = {}
    for name, ab in parts.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            shapes = {k: tuple(v.shape) for k, v in ab.items()}
            raise BadInput(f"{where}: layer {name} has {shapes}; expected A: r × d_in and B: d_out × r with r={rank}")
        lora[name] = (a, b)
    frozen_a = cfg.get(FROZEN_A_KEY)
    return PeftAdapter(path=str(path), rank=rank, alpha=float(alpha) * (math.sqrt(rank) if cfg.get("use_rslora")
                                                                         else 1.0),
                       dropout=float(dropout), lora=lora, heads=heads,
                       frozen_a=None if frozen_a is None else bool(frozen_a))


def peft_targets(model: nn.Module, adapter: PeftAdapter) -> list[str]:
    """The layers the adapter adapts, in the model's order, each checked to be a linear layer of the model's blocks
    with the adapter's shapes (else an adapter for another model: `BadInput`)."""
    from .checks import BadInput
    from .models import block_linears

    where = f"model.adapter={adapter.path}"
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    linears = block_linears(model)
    names = set(linears)
    for name, (a, b) in adapter.lora.items():
        if name not in names:
            has = dict(model.named_modules()).get(name)
            if has is None:
                raise BadInput(f"{where}: adapts {name}, which this {kind} model does not have: an adapter made for "
                               "another model; expected one made on this model's base")
            raise BadInput(f"{where}: adapts {name} ({type(has).__name__}), not a linear layer of the model's blocks; "
                           "lorafa adapts those only")
        d_in, d_out = linear_dims(model.get_submodule(name))
        if (a.shape[1], b.shape[0]) != (d_in, d_out):
            raise BadInput(f"{where}: layer {name} is {d_in} → {d_out} in this {kind} model, the adapter's "
                           f"{a.shape[1]} → {b.shape[0]}: an adapter made for another model size")
    return [n for n in linears if n in adapter.lora]


@torch.no_grad()
def load_peft(model: nn.Module, adapter: PeftAdapter, head_modules: list[str] | tuple = ()) -> None:
    """Copy the adapter's A and B into the model's adapter layers (made by `inject` on `peft_targets`), and its
    modules_to_save into the task head (`head_modules`: the head lorafa trains; any other module refused)."""
    from .checks import BadInput

    where = f"model.adapter={adapter.path}"
    layers = lora_layers(model)
    for name, (a, b) in adapter.lora.items():
        layer = layers.get(name)
        if layer is None or layer.lora_A.shape != a.shape or layer.lora_B.shape != b.shape:
            raise BadInput(f"{where}: layer {name} has no adapter of rank {adapter.rank} here; expected the method "
                           "applied with the adapter's keys (PeftAdapter.method_keys)")
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    params = dict(model.named_parameters())
    named = set()
    for name, tensor in adapter.heads.items():
        head = next((h for h in head_modules if name.startswith(f"{h}.")), None)
        if head is None:
            raise BadInput(f"{where}: modules_to_save holds {name}, outside the task head lorafa trains "
                           f"({', '.join(head_modules) or 'none for this model'}); expected only the head's weights")
        if name not in params or params[name].shape != tensor.shape:
            have = tuple(params[name].shape) if name in params else "nothing"
            raise BadInput(f"{where}: {name} is {tuple(tensor.shape)} in the adapter, {have} in the model (a head "
                           "for another number of labels?); expected the same shapes")
        params[name].copy_(tensor)
        named.add(head)
    for head in named:
        missing = [f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()
                   if f"{head}.{n}" not in adapter.heads]
        if missing:
            raise BadInput(f"{where}: the head {head} is in the adapter without {missing}; expected all of it")


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += s·B·A, computed in fp32) and put the plain layer back:
    the result is an ordinary transformers model, for `save_pretrained` and export."""
    for name, layer in lora_layers(model).items():
        if isinstance(layer.base, QuantizedLinear):
            raise TypeError(f"{name}: cannot merge an adapter into a {layer.base.kind} base layer (model.quantize); "
                             "expected a model built without quantization")
    for name, layer in lora_layers(model).items():
        delta = layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())  # d_out × d_in
        weight = layer.base.weight
        weight.add_((delta if isinstance(layer.base, nn.Linear) else delta.t()).to(weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model
