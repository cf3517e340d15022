"""Selective recomputation (`method.recompute=elementwise`): same values and gradients, fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

from lorafa import recompute
from lorafa.adapters import _dropout_mask
from lorafa.job import run
from lorafa.measure import SavedTensorMeter


def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (y * dy).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in module.parameters() if p.requires_grad]
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def _saved(module, x):
    x = x.detach().clone().requires_grad_(True)
    with SavedTensorMeter(module) as meter:
        module(x)
    return meter.bytes


@pytest.mark.parametrize("make", [lambda: LlamaRMSNorm(16, eps=1e-6), lambda: T5LayerNorm(16, eps=1e-6)],
                         ids=["llama", "t5"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rmsnorm_same_output_and_gradients(make, dtype):
    torch.manual_seed(0)
    ref = make().to(dtype)
    nn.init.normal_(ref.weight, 1.0, 0.2)
    x, dy = torch.randn(3, 5, 16, dtype=dtype), torch.randn(3, 5, 16, dtype=dtype)
    want_y, want_g = _grads(ref, x, dy)
    recompute.enable(ref)
    got_y, got_g = _grads(ref, x, dy)
    assert torch.equal(got_y, want_y)  # forward is the model's own arithmetic
    # both norms compute in fp32 whatever the input dtype: fp32 rounding is the floor of agreement
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, **tol)


def test_rmsnorm_keeps_input_in_its_dtype_not_an_fp32_copy():
    norm = LlamaRMSNorm(64).to(torch.bfloat16)
    x = torch.randn(4, 32, 64, dtype=torch.bfloat16)
    before = _saved(norm, x)
    recompute.enable(norm)
    after = _saved(norm, x)
    n = 4 * 32
    assert after == n * 64 * 2 + n * 4  # bf16 input + fp32 1/rms per token
    assert before >= n * 64 * 4  # eager keeps (at least) the fp32 copy


def test_gated_mlp_same_gradients_keeps_two_of_three():
    from transformers import LlamaConfig

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, hidden_act="silu", num_attention_heads=2,
                                 num_key_value_heads=2)).double()
    mlp.requires_grad_(False)  # frozen, as under LoRA-FA: no weight needs the inputs of the projections
    x, dy = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    want_y, want_g = _grads(mlp, x, dy)
    before = _saved(mlp, x)
    recompute.enable(mlp)
    got_y, got_g = _grads(mlp, x, dy)
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_g[0], want_g[0], rtol=1e-10, atol=1e-12)
    n_f = 2 * 7 * 40 * 8
    assert before == 3 * n_f and _saved(mlp, x) == 2 * n_f


def test_relu_keeps_a_bool_mask():
    relu = ACT2FN["relu"]
    x, dy = torch.randn(5, 9), torch.randn(5, 9)
    want_y, want_g = _grads(relu, x, dy)
    recompute.enable(relu)
    got_y, got_g = _grads(relu, x, dy)
    assert torch.equal(got_y, want_y) and torch.equal(got_g[0], want_g[0])
    assert _saved(relu, x) == 5 * 9  # one byte per element


def test_dropout_keeps_no_mask_and_backward_uses_the_forward_mask():
    drop = nn.Dropout(0.3)
    recompute.enable(drop)
    x, dy = torch.randn(6, 11, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    torch.manual_seed(5)
    _, (gx,) = _grads(drop, x, dy)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,)))  # the seed the layer drew
    mask = _dropout_mask(x, 0.3, seed)
    torch.manual_seed(5)
    y = drop(x.clone().requires_grad_(True))
    torch.testing.assert_close(y, x * mask, rtol=0, atol=0)
    torch.testing.assert_close(gx, dy * mask, rtol=0, atol=0)
    assert _saved(drop, x) == 0
    drop.eval()
    assert torch.equal(drop(x), x)


@pytest.mark.slow
def test_whole_model_same_losses_fewer_saved_bytes(cfg_factory):
    common = ("model=tiny-llama", "method=lorafa", "train.max_steps=4", "task.max_train_samples=64",
              "task.max_eval_samples=32", "train.batch_size=16")
    plain = run(cfg_factory(*common))
    lean = run(cfg_factory(*common, "method.recompute=elementwise"))
    assert plain["status"] == lean["status"] == "ok"
    assert lean["loss_curve"] == pytest.approx(plain["loss_curve"], rel=1e-5)
    assert lean["mem_activations_gib"] < 0.95 * plain["mem_activations_gib"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5"])
def test_dropout_models_run_with_less_activation_memory(cfg_factory, model):
    common = (f"model={model}", "method=lorafa", "task=synthetic", "task.max_seq_len=32", "task.target_len=16",
              "train.batch_size=4", "train.max_steps=3")
    plain = run(cfg_factory(*common))
    lean = run(cfg_factory(*common, "method.recompute=elementwise"))
    assert plain["status"] == lean["status"] == "ok", lean["error"]
    assert lean["mem_activations_gib"] < 0.95 * plain["mem_activations_gib"]
    assert abs(lean["final_train_loss"] - plain["final_train_loss"]) < 0.5  # other masks, same training
