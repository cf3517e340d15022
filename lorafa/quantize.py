"""Frozen base layers held in 4 or 8 bits (`model.quantize=nf4|int8`, QLoRA-style), through bitsandbytes' kernels.

    nf4:  W ≈ absmax_block · NF4[q],  q 4 bits an element (two a byte), one absmax per 64 elements, itself stored in
          8 bits (one fp32 scale per 256 absmaxes, and their mean): QLoRA's NormalFloat4 with double quantization
          ≈ 0.516 bytes a weight, against 2 in bf16 and 4 in fp32
    int8: W ≈ s_row / 127 · q,  q int8, one fp32 scale per output row (LLM.int8's vector-wise quantization,
          without outlier columns): ≈ 1 byte a weight

Which layers: every linear layer of the model's repeated blocks (`lorafa.models.block_linears`: attention and FFN
projections), as QLoRA; embeddings, norms, the LM head and a task head stay at their dtype, and so do layers a
transformers model keeps in fp32 (`_keep_in_fp32_modules`: T5's `wo`). Quantizing needs the weights once in a float
dtype, on the device they go to; the float weight of each layer is freed as soon as its quantized copy exists.

`QuantizedLinear` keeps the packed weight as its (frozen) `weight` parameter and the quantization state (absmaxes,
scales, codebook) as buffers, so `.to()`, `state_dict` and the weight count of `lorafa.measure` (parameters and
buffers) see all of it. Its matmul dequantizes W into the compute dtype (the autocast dtype, else the dtype the model
was built in) for the one matmul, and drops it: bitsandbytes' own training matmul does the same for a batch of
tokens (its fused kernel is for one token at a time). Backward to x dequantizes W again (dx = dy·W): nothing is
saved, so the base layer keeps no activation — what an adapter on top keeps is the adapter's (`lorafa.adapters`).

It works on fake tensors as on real ones (bitsandbytes registers shapes for its ops), which is how
`lorafa.memory.predict` counts a quantized model without building it. The weights are frozen for good: no gradient
reaches them (full fine-tuning on a quantized base is refused, `lorafa.checks`).
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("nf4", "int8")
DEVICES = ("cpu", "cuda", "xpu")  # where bitsandbytes has its 4- and 8-bit kernels (its docs; cpu and cuda tested)
BLOCKSIZE = 64  # elements per absmax: QLoRA's and bitsandbytes' default
ABSMAX_BLOCKSIZE = 256  # absmaxes per fp32 scale in the double quantization (bitsandbytes' nested state)


def available() -> str | None:
    """None when bitsandbytes imports, else why not (one line)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure (missing package, missing native library)
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def _ops():
    import bitsandbytes  # noqa: F401 - registers torch.ops.bitsandbytes

    return torch.ops.bitsandbytes


# not bitsandbytes' Linear4bit / Linear8bitLt: they hold the quantization state on the weight (Params4bit.quant_state,
# Int8Params.SCB), not in buffers, so `lorafa.measure` (parameters and buffers) would not count it
class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is held in `kind` (nf4 or int8); y = x Wᵀ + b with W dequantized for the
    matmul. `compute_dtype`: the dtype of the dequantized W outside autocast (the float dtype it was built in)."""

    def __init__(self, linear: nn.Linear, kind: str, device: torch.device | str | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"quantize={kind!r}: expected one of {KINDS}")
        ops = _ops()
        w = linear.weight.detach()
        w = w.to(device) if device is not None else w
        if not w.is_floating_point():
            raise ValueError(f"cannot quantize a {w.dtype} weight")
        self.kind = kind
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = w.dtype
        if kind == "nf4":
            packed, absmax = ops.quantize_4bit.default(w, BLOCKSIZE, "nf4", torch.uint8)
            # double quantization (QLoRA): the fp32 absmaxes, less their mean, in 8 bits with bitsandbytes'
            # dynamic code, one fp32 scale per 256 of them
            offset = absmax.mean()
            code = _dynamic_code(w.device)
            absmax_q, absmax_scale = ops.quantize_blockwise.default(absmax - offset, code, ABSMAX_BLOCKSIZE)
            del absmax
            self.weight = nn.Parameter(packed, requires_grad=False)
            self.register_buffer("absmax", absmax_q)  # uint8, one per 64 weights
            self.register_buffer("absmax_scale", absmax_scale)  # fp32, one per 256 absmaxes
            self.register_buffer("absmax_offset", offset)  # fp32 scalar
            self.register_buffer("absmax_code", code)  # fp32, 256 values
        else:
            q, scale, _ = ops.int8_vectorwise_quant.default(w, 0.0)
            self.weight = nn.Parameter(q, requires_grad=False)
            self.register_buffer("scale", scale)  # fp32 absmax of each output row
        del w
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(self.weight.device), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W (d_out × d_in) in `dtype`: one weight-sized tensor, made for one matmul."""
        if self.kind == "nf4":
            ops = _ops()
            absmax = ops.dequantize_blockwise.default(self.absmax, self.absmax_scale, self.absmax_code,
                                                      ABSMAX_BLOCKSIZE, torch.float32) + self.absmax_offset
            return ops.dequantize_4bit.default(self.weight, absmax, BLOCKSIZE, "nf4",
                                               [self.out_features, self.in_features], dtype)
        # bitsandbytes' own int8 backward: q · (s / 127), row by row, in the matmul's dtype
        return self.weight.to(dtype).mul_((self.scale * (1.0 / 127.0)).to(dtype).unsqueeze(1))

    def matmul_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the matmul runs in: autocast's where it is on, else the layer's compute dtype."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedLinearFunction.apply(x, self.bias, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantize={self.kind}"


_CODE: list[float] = []  # bitsandbytes' dynamic 8-bit code, as Python floats


def _dynamic_code(device) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code (256 values), a tensor of each layer's own. Not bitsandbytes' module-level
    cache, which keeps whatever tensor its first call made (a fake one, under `lorafa.memory.predict`); the values
    are computed once on real tensors (making them reads tensor values, which fake tensors have none of)."""
    if not _CODE:
        from bitsandbytes.functional import create_dynamic_map
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            _CODE.extend(create_dynamic_map().tolist())
    return torch.tensor(_CODE, dtype=torch.float32, device=device)


class _QuantizedLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized for the matmul; dx = dy W with W dequantized again. Saves nothing: W and b
    are the frozen layer's own."""

    @staticmethod
    def forward(ctx, x, bias, layer: QuantizedLinear):
        ctx.layer = layer
        return nn.functional.linear(x, layer.dequantized(layer.matmul_dtype(x)), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = dy @ ctx.layer.dequantized(dy.dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None


def quantize(model: nn.Module, kind: str, names: list[str], device: torch.device | str | None = None) -> int:
    """Replace each named nn.Linear of `model` by its `QuantizedLinear` on `device` (None: where it is), one layer at
    a time; returns how many. Layers in the model's `_keep_in_fp32_modules` are left as they are."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    n = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if not isinstance(layer, nn.Linear) or any(k in name.split(".") for k in keep):
            continue
        setattr(parent, child, QuantizedLinear(layer, kind, device))
        del layer
        n += 1
    return n
