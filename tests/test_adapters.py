"""Unit tests of the LoRA / LoRA-FA layer and of how methods set what trains."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lorafa import adapters, measure, methods
from lorafa.models import Network


def _layer(train_a: bool, dropout=0.0, d_in=16, d_out=12, rank=4, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, dtype=dtype).requires_grad_(False)
    return adapters.LoRALinear(base, rank=rank, alpha=8, dropout=dropout, train_a=train_a)


def test_forward_is_base_plus_scaled_low_rank_update():
    layer = _layer(train_a=True)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base(x))  # B = 0 at init: the adapted model starts as the base
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ layer.base.weight.T + layer.base.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer.scaling == 2.0 and layer.weight is layer.base.weight  # alpha / rank; model code reads .weight


@pytest.mark.parametrize("train_a", [True, False])
def test_gradients_match_the_closed_form(train_a):
    layer = _layer(train_a=train_a)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 12, dtype=torch.float64)
    layer(x).backward(dy)
    s, A, B, W = layer.scaling, layer.lora_A.detach(), layer.lora_B.detach(), layer.base.weight
    torch.testing.assert_close(layer.lora_B.grad, s * dy.T @ (x.detach() @ A.T), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, dy @ W + s * dy @ B @ A, rtol=1e-10, atol=1e-12)
    if train_a:
        torch.testing.assert_close(layer.lora_A.grad, s * (dy @ B).T @ x.detach(), rtol=1e-10, atol=1e-12)
    else:
        assert layer.lora_A.grad is None


def test_lorafa_keeps_only_the_rank_r_product_for_backward():
    """Saved bytes beyond the frozen layer: N·r for LoRA-FA, plus the full-width input for LoRA."""
    n, d_in, rank = 64, 32, 4
    x = torch.randn(n, d_in, requires_grad=True)
    saved = {}
    for train_a in (False, True):
        layer = _layer(train_a=train_a, d_in=d_in, d_out=24, rank=rank, dtype=torch.float32)
        with measure.SavedTensorMeter(layer) as meter:
            layer(x)
        saved[train_a] = meter.bytes
    with measure.SavedTensorMeter(layer.base) as frozen:
        layer.base(x)
    assert frozen.bytes == 0  # W frozen: the base matmul keeps nothing but W itself
    assert saved[False] == n * rank * 4
    assert saved[True] == n * rank * 4 + n * d_in * 4


def test_lorafa_step_leaves_a_bit_identical():
    layer = _layer(train_a=False, dtype=torch.float32)
    a0 = layer.lora_A.detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        layer(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.lora_A, a0)
    assert layer.lora_B.abs().sum() > 0


def test_inject_replaces_only_named_linears():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    added = adapters.inject(model, ["0"], rank=2, alpha=4, dropout=0.0, train_a=False)
    assert list(added) == ["0"] and isinstance(model[0], adapters.LoRALinear) and isinstance(model[2], nn.Linear)
    with pytest.raises(TypeError, match="not nn.Linear"):
        adapters.inject(model, ["1"], rank=2, alpha=4, dropout=0.0, train_a=False)
    with pytest.raises(ValueError, match="rank must be > 0"):
        adapters.LoRALinear(nn.Linear(4, 4), rank=0, alpha=1)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.value, self.dense = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


class _Toy(nn.Module):
    base_model_prefix = "body"

    def __init__(self):
        super().__init__()
        self.body = nn.ModuleDict({"layer": nn.ModuleList([_Block(), _Block()])})
        self.classifier = nn.Linear(8, 2)


@pytest.mark.parametrize(
    "method, trainable",
    [
        # full: 3 linears × 2 blocks × (64 + 8) + head (16 + 2)
        ({"rank": 0, "train_base": True, "train_a": False}, 6 * 72 + 18),
        # lora, q and v of 2 blocks: (A 2×8 + B 8×2) × 4 + head
        ({"rank": 2, "train_base": False, "train_a": True}, 4 * 32 + 18),
        # lorafa: B only
        ({"rank": 2, "train_base": False, "train_a": False}, 4 * 16 + 18),
    ],
)
def test_methods_are_data(method, trainable):
    net = Network(model=_Toy(), family="encoder", alias="toy", head_modules=["classifier"])
    cfg = OmegaConf.create({"alpha": 4, "dropout": 0.0, "train_head": True, "targets": "qv", **method})
    applied = methods.apply(net, cfg, {"qv": ["query", "value"]})
    assert applied.trainable_params == trainable
    assert len(applied.targets) == (0 if method["rank"] == 0 else 4)
