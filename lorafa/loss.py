"""The LM loss without its full logits (`model.fused_loss`).

transformers' LM heads compute the loss from the whole logits tensor: the head writes N × V logits in the compute
dtype, the loss upcasts them to fp32, and cross-entropy keeps its fp32 log-probabilities for backward, which then
writes an fp32 gradient of the same size and casts it back. At LLaMA-7B 8 × 1024 (V = 32,000) that is 0.5 + 1 + 1
GiB in forward and up to 3 GiB at the start of backward — where a checkpointed step peaks — for a head that LoRA
and LoRA-FA never train.

`model.fused_loss` runs the head and the loss together, a slice of rows at a time (as Liger Kernel's fused linear
cross-entropy and torchtune's chunked output loss do):

| what                         | transformers                 | fused                                                |
|------------------------------|------------------------------|------------------------------------------------------|
| logits alive at once         | all N rows, bf16 and fp32    | one slice (N / ⌈V / H⌉ rows, about the hidden states' size; 128 MiB of fp32 logits at least) |
| kept for backward            | fp32 log-probabilities, N × V | the gradient of the hidden states, N × H              |
| FLOPs                        | head forward + backward      | the same, all in forward                             |

The model's own forward runs without labels (a T5 gets the decoder input it would have made from them); its head
hands over its input and makes no logits, and the loss is taken from there. Each slice's gradient is computed in
forward, while its logits are at hand, so nothing is recomputed: backward only scales what forward left by the
loss's incoming gradient (gradient accumulation's share). The values are the model's own: labels shifted as a
causal LM shifts them (T5: as they are), `-100` ignored, the mean over the tokens that count (or
`num_items_in_batch`), the head's matmul in the autocast dtype, softmax and the loss in fp32, the gradient cast to
the head's compute dtype before it meets the weight — as autograd does it: under bf16 autocast the gradients are
the unfused ones bit for bit, and the loss's value differs by rounding (it is summed slice by slice).

The head must be frozen, as LoRA and LoRA-FA keep it. Where it trains (full fine-tuning, a tied embedding that
trains), the training forward runs transformers' loss: the weight's gradient, made in forward, would be held until
backward (V × H in fp32), more than the log-probabilities at short sequences (`active`).

It applies where the loss is cross-entropy of a bias-free linear head's logits: the model types in `FUSED_TYPES`,
where nothing is done to the logits after the head or only what `LOGIT_OPS` does for that type, slice by slice, in
the same dtype and order (Gemma 2 and 3's soft-capping, Cohere's scale, Granite's divisor), and backward through it
as autograd goes. A config that scales the logits some other way is refused. Mixtures of experts (Mixtral, Qwen2-
and Qwen3-MoE, OLMoE) add their routers' balance loss to it, as they do to their own. Under `auto` (the default) other
models (and encoders, whose heads classify) keep transformers' loss; `true` on them is bad input.
Forwards without labels or without gradients (scoring, generation) run the model's own forward and return logits;
a fused training forward returns the loss and no logits. An evaluation that needs only the loss asks for it
(`loss_only`): a labelled forward without gradients then takes it slice by slice too, and keeps nothing — so an
eval batch holds no N × V logits either (at LLaMA-7B, 64 eval rows of 1,024 tokens would otherwise make 3.9 GiB
of bf16 logits and two fp32 tensors of 7.8 GiB each). Without gradients a trained head (full fine-tuning) costs
nothing, so that loss is sliced whatever trains.
"""

from __future__ import annotations

import contextlib
import math
import threading
import types

import torch
from torch import nn

from .checks import BadInput

IGNORE = -100
# by family, the model types whose LM loss is cross-entropy of a bias-free head's logits (as they are, or after the
# type's `LOGIT_OPS`; a mixture of experts' balance loss added):
# transformers' causal-LM loss (labels shifted left) and T5's (labels as they are, the decoder's input shifted right)
# (tests/test_loss.py checks each against the model's own loss and gradients)
FUSED_TYPES = {"decoder": ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2",
                           "gemma3_text", "gpt_neox", "starcoder2", "granite", "cohere", "cohere2", "glm",
                           "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
               "encoder-decoder": ("t5", "mt5")}
_SCALED = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# what a model type does to the head's logits before the loss, in the head's compute dtype (the config attribute
# holding its constant): Gemma 2 and 3 soft-cap them (cap · tanh(logits / cap)), Cohere multiplies, Granite divides
LOGIT_OPS = {"gemma2": ("softcap", "final_logit_softcapping"), "gemma3_text": ("softcap", "final_logit_softcapping"),
             "cohere": ("mul", "logit_scale"), "cohere2": ("mul", "logit_scale"), "granite": ("div", "logits_scaling")}


MIN_SLICE_BYTES = 128 * 2**20  # a slice's fp32 logits at least this (where there are that many): see chunks_for


def chunks_for(vocab: int, hidden: int, rows: int | None = None) -> int:
    """Row slices: ⌈V / H⌉, so one slice's logits are about the size of all rows' hidden states — but fewer where
    that would leave a slice's fp32 logits under `MIN_SLICE_BYTES`: each slice is some fifteen kernels the host
    launches, and a small hidden size with a large vocabulary (Qwen2.5-0.5B: 170 slices) would make the loss
    bound by launches. At LLaMA-7B 8 × 1024 both give 8 slices."""
    n = max(1, math.ceil(vocab / max(1, hidden)))
    if rows and MIN_SLICE_BYTES > 0:
        n = min(n, max(1, math.ceil(rows * vocab * 4 / MIN_SLICE_BYTES)))
    return n


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp over the last of 2 dims, op for op as ATen computes it (the same values, bit for bit), but
    with its exp(x − max) temporary, the size of `x`, made by an op of its own: ATen makes it inside its kernel,
    where the predictor, which sees the ops, does not (an H200 measured a fused step's peak 0.115 GiB above its
    prediction with slices of 1024 rows × 32,000, whose fp32 logits are 0.12 GiB)."""
    m = x.amax(1, keepdim=True)
    m.masked_fill_(m.abs() == math.inf, 0)
    out = (x - m).exp_().sum(1)
    return out.log_().add_(m.squeeze(1))


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over counted rows of cross_entropy(hidden @ weightᵀ, labels), slice by slice, for a frozen `weight`;
    the hidden states' gradient is made in forward and kept (`ctx`) until backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, count, chunks: int, dtype, transform=None):
        op, c = transform or (None, None)
        want_h = ctx.needs_input_grad[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            h = hidden.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(h) if want_h else None
            denom = count.to(torch.float32)
            step = math.ceil(h.shape[0] / chunks) if h.shape[0] else 1
            for start in range(0, h.shape[0], step):
                rows = slice(start, start + step)
                z = h[rows] @ w.t()
                if op == "softcap":
                    t = torch.tanh(z / c)
                    z = t * c
                elif op is not None:
                    z = z * c if op == "mul" else z / c
                logits = z.float()
                del z
                y = labels[rows]
                counted = y != IGNORE
                target = torch.where(counted, y, 0).unsqueeze(1)
                lse = _logsumexp(logits)
                total += ((lse - logits.gather(1, target).squeeze(1)) * counted).sum()
                if want_h:  # d loss / d logits = (softmax − one-hot) / count, on counted rows
                    g = logits.sub_(lse.unsqueeze(1)).exp_()
                    g.scatter_add_(1, target, -counted.unsqueeze(1).to(g.dtype))
                    g.mul_((counted.to(g.dtype) / denom).unsqueeze(1))
                    g = g.to(dtype)  # back through the ops on the logits, as autograd goes, in their dtype
                    if op == "softcap":
                        g = torch.ops.aten.tanh_backward(g * c, t) / c
                    elif op is not None:
                        g = g * c if op == "mul" else g / c
                    torch.matmul(g, w, out=grad_h[rows])
                del logits
        ctx.save_for_backward(grad_h)
        ctx.dtype = hidden.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype)).to(ctx.dtype), None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, shift: bool = True,
                         num_items_in_batch=None, chunks: int | None = None,
                         transform: tuple[str, float] | None = None) -> torch.Tensor:
    """transformers' LM loss of `hidden` (B × T × H) through a frozen bias-free head `weight` (V × H) against
    `labels` (B × T), without the full logits: shifted as a causal LM's (`shift`), or as they are (T5's decoder
    reads them shifted right instead); `transform`: an op of `LOGIT_OPS` and its constant, applied to the logits
    first."""
    if not torch.is_grad_enabled():  # the loss only (`loss_only`): no gradient made, nothing kept
        hidden = hidden.detach()
    elif weight.requires_grad:
        raise ValueError("linear_cross_entropy: the head's weight requires a gradient; it takes a frozen head")
    if shift:
        labels = nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    flat_labels = labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if num_items_in_batch is None:
        count = (flat_labels != IGNORE).sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=hidden.device)
    n = chunks or chunks_for(weight.shape[0], weight.shape[1], flat.shape[0])
    return _LinearCrossEntropy.apply(flat, weight, flat_labels, count, n, dtype, transform)


def logit_transform(config) -> tuple[str, float] | None:
    """What `config`'s model type does to its logits before the loss (`LOGIT_OPS`), with its constant; None where
    nothing."""
    op, key = LOGIT_OPS.get(getattr(config, "model_type", None), (None, None))
    value = getattr(config, key, None) if key else None
    return None if value is None else (op, float(value))


def fusable(model: nn.Module, family: str) -> str:
    """Why `model`'s loss cannot be fused ('' where it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    types_ = FUSED_TYPES.get(family, ())
    if kind not in types_:
        if not types_:
            return f"the family is {family}"
        return f"model_type {kind!r} is not one of {', '.join(types_)}"
    handled = LOGIT_OPS.get(kind, (None, None))[1]
    scaled = [k for k in _SCALED if k != handled and getattr(config, k, None) not in (None, 1, 1.0)]
    if scaled:
        return f"its config scales the logits ({', '.join(scaled)})"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        biased = " with a bias" if getattr(head, "bias", None) is not None else ""
        return f"its LM head is {type(head).__name__}{biased}, not a bias-free nn.Linear"
    return ""


def installed(model: nn.Module) -> bool:
    return hasattr(model, "_lorafa_own_forward")


def active(model: nn.Module) -> bool:
    """Whether `model`'s training forward fuses its loss now: installed, its head the one installed on, and frozen
    (a trained head — full fine-tuning — keeps transformers' loss: its weight's gradient, made in forward, would be
    held until backward)."""
    head = _installed_head(model)
    return head is not None and not head.weight.requires_grad


def _installed_head(model: nn.Module) -> nn.Module | None:
    """`model`'s LM head where the loss is installed on it; None otherwise (a head replaced since, e.g. by an
    adapter layer on it, is not the one installed: transformers' loss)."""
    head = model.get_output_embeddings() if installed(model) else None
    return head if head is not None and hasattr(head, "_lorafa_linear") else None


_LOSS_ONLY = threading.local()


@contextlib.contextmanager
def loss_only():
    """Inside: a labelled forward without gradients (an evaluation's loss) of a model the loss is installed on
    runs the fused loss and returns no logits, whether or not its head trains."""
    depth = getattr(_LOSS_ONLY, "depth", 0)
    _LOSS_ONLY.depth = depth + 1
    try:
        yield
    finally:
        _LOSS_ONLY.depth = depth


def _fuses_now(model: nn.Module) -> bool:
    """Whether this labelled forward fuses: a training forward where `active`; without gradients, only inside
    `loss_only`, on the head installed on."""
    if torch.is_grad_enabled():
        return active(model)
    return bool(getattr(_LOSS_ONLY, "depth", 0)) and _installed_head(model) is not None


def _head_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The LM head: its logits, or — inside a fused training forward — its input taken, and no logits made."""
    if self._lorafa_take is None:
        return self._lorafa_linear(x)
    self._lorafa_take.append(x)
    return x.new_empty(0)


def _fused_forward(self, *args, labels=None, **kwargs):
    seq2seq = bool(getattr(self.config, "is_encoder_decoder", False))
    unfused = (kwargs.get("shift_labels") is not None or kwargs.get("logits_to_keep") not in (None, 0)
               or (seq2seq and kwargs.get("num_items_in_batch") is not None))
    if labels is None or args or unfused or not _fuses_now(self):
        return self._lorafa_own_forward(*args, labels=labels, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    if seq2seq and kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
        kwargs["decoder_input_ids"] = self._shift_right(labels)  # what the model does with labels itself
    head = self.get_output_embeddings()
    head._lorafa_take = taken = []
    try:  # the model's own forward, without labels: everything up to the head, whose input is taken
        out = self._lorafa_own_forward(**kwargs)
    finally:
        head._lorafa_take = None
    if len(taken) != 1:
        raise RuntimeError(f"fused loss: the LM head ran {len(taken)} times in one forward; expected once "
                           "(model.fused_loss=false runs transformers' loss)")
    loss = linear_cross_entropy(taken[0], head.weight, labels, shift=not seq2seq, num_items_in_batch=num_items,
                                transform=logit_transform(self.config))
    if out.get("aux_loss") is not None:  # a mixture of experts' router balance, added as the model adds it
        loss = loss + self.router_aux_loss_coef * out["aux_loss"].to(loss.device)
    return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "logits"})


def setting(value) -> str:
    """`model.fused_loss` as auto, true or false (bad input otherwise)."""
    word = str(value).lower() if value is not None else "auto"
    if word not in ("auto", "true", "false"):
        raise BadInput(f"model.fused_loss={value}: expected auto, true or false")
    return word


def install(model: nn.Module, value, family: str) -> bool:
    """`model.fused_loss` (auto | true | false): make `model`'s training forward fuse its head and loss where it
    can. Returns whether it does."""
    word = setting(value)
    if word == "false":
        return False
    why = fusable(model, family)
    if why:
        if word == "auto":
            return False
        raise BadInput(f"model.fused_loss=true but the loss cannot be fused: {why}")
    if not installed(model):
        head = model.get_output_embeddings()
        head._lorafa_linear, head._lorafa_take = head.forward, None
        head.forward = types.MethodType(_head_forward, head)
        model._lorafa_own_forward = model.forward
        model.forward = types.MethodType(_fused_forward, model)
    return True
