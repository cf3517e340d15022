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


# ----------------------------------------------------------------- exactness against a float64 reference
def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("train_a", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradients_equal_a_float64_reference_with_the_same_dropout_mask(train_a, p):
    """dx, dB (and dA for LoRA) against plain autograd on the formula, same mask, float64, rel. error < 1e-10."""
    layer = _layer(train_a=train_a, dropout=p)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 9, 12, dtype=torch.float64)
    torch.manual_seed(123)
    layer(x).backward(dy)

    # the mask the layer used: LoRA-FA draws a seed from the global generator, LoRA's nn.Dropout a Bernoulli
    torch.manual_seed(123)
    if p == 0:
        mask = torch.ones_like(x)
    elif train_a:
        mask = nn.functional.dropout(torch.ones_like(x), p)
    else:
        mask = adapters._dropout_mask(x, p, int(torch.randint(0, 2**62, (1,))))
    xr = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    y = xr @ layer.base.weight.T + layer.base.bias + layer.scaling * ((xr * mask) @ A.T) @ B.T
    y.backward(dy)
    assert _rel(x.grad, xr.grad) < 1e-10
    assert _rel(layer.lora_B.grad, B.grad) < 1e-10
    if train_a:
        assert _rel(layer.lora_A.grad, A.grad) < 1e-10
    else:
        assert layer.lora_A.grad is None


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_lorafa_exactly_n_r_lora_full_width(p):
    """Beyond the frozen layer (which saves nothing but its weight): LoRA-FA saves N·r elements, dropout or not;
    LoRA saves the full-width input too (and, with dropout, its 1-byte mask)."""
    n, d_in, rank = 64, 32, 4
    x = torch.randn(n, d_in, requires_grad=True)
    saved = {}
    for train_a in (False, True):
        layer = _layer(train_a=train_a, d_in=d_in, d_out=24, rank=rank, dropout=p, dtype=torch.float32)
        with measure.SavedTensorMeter(layer) as meter:
            layer(x)
        saved[train_a] = meter.bytes
    assert saved[False] == n * rank * 4
    lora_extra = saved[True] - n * rank * 4 - n * d_in * 4  # beyond h and the (dropped-out) input
    if p == 0:
        assert lora_extra == 0
    else:  # dropout's mask: 1 byte an element on CUDA (bool), 4 on CPU (a float noise tensor)
        assert lora_extra in (n * d_in, n * d_in * 4)


@pytest.mark.parametrize("stacked", [False, True])
def test_lorafa_dropout_keeps_each_input_with_probability_1_minus_p_scaled_by_its_inverse(stacked):
    """The mask a LoRA-FA layer applies, read back from the layer itself (not from the code that draws it): with W
    and b zero, dx = m ⊙ g where g = s·(dy B)A is known, so m = dx / g. Every entry is 0 or 1/(1−p), the kept
    share is 1−p within 4 standard errors, the forward used the same mask, and backward redrew that mask."""
    p, n, d_in = 0.3, 256, 128
    layer = _layer(train_a=False, dropout=p, d_in=d_in, d_out=24, rank=4)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.base.bias.zero_()
        layer.lora_B.normal_()
    assert layer.stack_frozen() if stacked else True
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(n, 24, dtype=torch.float64)
    y = layer(x)
    y.backward(dy)
    g = layer.scaling * (dy @ layer.lora_B.detach()) @ layer.lora_A.detach()
    assert bool((g.abs() > 1e-9).all())
    m = x.grad / g
    keep = 1 / (1 - p)
    assert bool(((m.abs() < 1e-9) | ((m - keep).abs() < 1e-9)).all()), "mask entries other than 0 and 1/(1-p)"
    kept = float((m > 0.5).double().mean())
    assert abs(kept - (1 - p)) < 4 * ((p * (1 - p)) / m.numel()) ** 0.5, kept
    expected = layer.scaling * ((x.detach() * m) @ layer.lora_A.detach().T) @ layer.lora_B.detach().T
    torch.testing.assert_close(y.detach(), expected, rtol=1e-10, atol=1e-10)


def test_lorafa_dropout_mask_is_fresh_each_step_and_off_in_eval():
    layer = _layer(train_a=False, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16, dtype=torch.float64)
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)  # a new seed each call
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    expected = x @ layer.base.weight.T + layer.base.bias + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_orthogonal_init_and_unknown_init():
    layer = adapters.LoRALinear(nn.Linear(16, 8), rank=4, alpha=4, train_a=False, init_a="orthogonal")
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="init_a='xavier'"):
        adapters.LoRALinear(nn.Linear(16, 8), rank=4, alpha=4, init_a="xavier")


def test_a_is_bit_identical_after_training_a_whole_model():
    from lorafa import models

    from .conftest import compose_cfg

    cfg = compose_cfg(["model=tiny-llama", "method=lorafa", "method.dropout=0.1"])
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    methods.apply(net, cfg.method, cfg.model.target_modules)
    before = {n: p.detach().clone() for n, p in net.model.named_parameters() if n.endswith("lora_A")}
    assert len(before) == 14
    opt = torch.optim.AdamW([p for p in net.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ids = torch.randint(5, 4096, (2, 16))
        net.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(net.model.named_parameters())
    assert all(torch.equal(after[n], a) for n, a in before.items())
    assert any(after[n.replace("lora_A", "lora_B")].abs().sum() > 0 for n in before)


# ----------------------------------------------------------------------- LoRA-FA v2 against PEFT's optimizer
def test_lorafa_v2_matches_peft_lorafa_optimizer_step_for_step(monkeypatch):
    """Same net, same A, same data: B after each AdamW step equals PEFT's LoraFAOptimizer's (rtol 1e-5).

    PEFT's optimizer is AdamW in transformers' old convention (eps added to sqrt(v) before bias correction,
    decay after the update); ours is torch's AdamW. With eps → 0 and no decay the two conventions coincide, so
    what is compared is the LoRA-FA v2 gradient (A Aᵀ)⁻¹ g / s². PEFT rounds that product to bf16 when bf16 is
    available; it is made to compute it in float32 here, as we do.
    """
    peft = pytest.importorskip("peft")
    import peft.optimizers.lorafa as peft_lorafa

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    peft_model = peft.get_peft_model(_clone(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    ours = _clone(base).requires_grad_(False)
    layers = adapters.inject(ours, ["0", "2"], rank=4, alpha=8, dropout=0.0, train_a=False, precondition_b=True)
    for name, layer in layers.items():  # start from PEFT's A (and its zero B)
        layer.lora_A.data.copy_(peft_model.base_model.model.get_submodule(name).lora_A["default"].weight)
    opt_peft = peft.optimizers.create_lorafa_optimizer(peft_model, r=4, lora_alpha=8, lr=1e-2)
    for group in opt_peft.param_groups:
        group["eps"] = 1e-16
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, eps=1e-16,
                                 weight_decay=0.0)
    for step in range(5):
        x = torch.randn(32, 12)
        for model, opt in ((peft_model, opt_peft), (ours, opt_ours)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        for name, layer in layers.items():
            theirs = peft_model.base_model.model.get_submodule(name).lora_B["default"].weight
            torch.testing.assert_close(layer.lora_B, theirs, rtol=1e-5, atol=1e-7, msg=f"{name} step {step}")


def test_lorafa_v2_gradient_is_the_plain_gradient_times_inverse_a_at_over_s_squared():
    """The preconditioned gradient itself (which AdamW's scale invariance would hide): B's gradient under
    `precondition_b` equals the plain gradient times (A Aᵀ)⁻¹ / s², computed here in float64 (PEFT's formula,
    s = α/r = 2 so that 1/s and 1/s² differ), and one SGD step moves B by exactly lr times it."""
    grads = {}
    for pre in (False, True):
        torch.manual_seed(0)
        base = nn.Linear(16, 12, dtype=torch.float64).requires_grad_(False)
        layer = adapters.LoRALinear(base, rank=4, alpha=8, train_a=False, precondition_b=pre)
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
        x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        before = layer.lora_B.detach().clone()
        layer(x).pow(2).mean().backward()
        grads[pre] = layer.lora_B.grad.clone()
        if pre:
            torch.optim.SGD([layer.lora_B], lr=0.1).step()
            stepped = before - layer.lora_B.detach()
    a = layer.lora_A.detach()
    assert layer.scaling == 2.0
    expected = grads[False] @ torch.linalg.inv(a @ a.T) / layer.scaling**2
    torch.testing.assert_close(grads[True], expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stepped, 0.1 * expected, rtol=1e-5, atol=1e-9)


def _clone(module):
    import copy

    return copy.deepcopy(module)


def _cxx_missing() -> str:
    """Why inductor cannot generate CPU code here ('' when it can): it compiles C++ with the compiler it finds."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return ""
    except Exception as err:  # noqa: BLE001 (any failure to find one is the reason shown)
        return f"inductor on CPU needs a C++ compiler: {type(err).__name__}: {err}"


NEEDS_CXX = pytest.mark.skipif(bool(_cxx_missing()), reason=_cxx_missing() or "-")


@pytest.mark.slow
@NEEDS_CXX
@pytest.mark.parametrize("p, stacked", [(0.0, False), (0.2, False), (0.0, True), (0.0, "merged")])
def test_torch_compile_gives_the_eager_result(p, stacked):
    """Inductor (CPU code generation) on the LoRA-FA layers: the eager layers' output and gradients."""
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).requires_grad_(False)
        for layer in adapters.inject(m, ["0", "2"], rank=4, alpha=8, dropout=p, train_a=False).values():
            layer.lora_B.data.normal_()
            assert layer.stack_frozen(merged=stacked == "merged") if stacked else True
        return m

    eager, compiled = make(), make()
    run_compiled = torch.compile(compiled, backend="inductor")
    x = torch.randn(8, 32, requires_grad=True)
    xc = x.detach().clone().requires_grad_(True)
    torch.manual_seed(5)
    eager(x).square().sum().backward()
    torch.manual_seed(5)
    run_compiled(xc).square().sum().backward()
    tol = {"rtol": 1e-4, "atol": 1e-4}  # inductor fuses and reorders fp32 arithmetic
    torch.testing.assert_close(xc.grad, x.grad, **tol)
    for name in ("0", "2"):
        torch.testing.assert_close(compiled.get_submodule(name).lora_B.grad, eager.get_submodule(name).lora_B.grad,
                                   **tol)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=NEEDS_CXX)])
@pytest.mark.parametrize("stacked", [False, True, "merged"])
def test_compiled_lorafa_layers_keep_only_h_for_backward(stacked, backend):
    """Under torch.compile (graph capture and autograd alone, and inductor's CPU code) a LoRA-FA layer keeps what
    it keeps in eager: h (N × r), nothing full-width and nothing weight-sized. (The merged layer once formed
    W + s·B·A by the same expression in forward and backward; the compiler's common-subexpression pass made them
    one tensor and kept it for backward: +6 GB at llama-7b.)"""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)).requires_grad_(False)
    for layer in adapters.inject(m, ["0", "2"], rank=4, alpha=8, dropout=0.0, train_a=False).values():
        layer.lora_B.data.normal_()
        assert layer.stack_frozen(merged=stacked == "merged") if stacked else True
    x = torch.randn(64, 32, requires_grad=True)
    saved = {}
    for mode in ("eager", backend):
        torch._dynamo.reset()
        run = m if mode == "eager" else torch.compile(m, backend=backend)
        with measure.SavedTensorMeter(m) as meter:
            y = run(x)
        y.sum().backward()
        saved[mode] = sorted(meter.storages.values())
    # two h (64 × 4 fp32) and the GELU's input (64 × 48); x itself is the caller's, no layer keeps it
    assert saved["eager"] == saved[backend] == [64 * 4 * 4, 64 * 4 * 4, 64 * 48 * 4]


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_lorafa_equals_the_closed_form_and_keeps_the_same_bytes(bias, merged):
    """`stack_frozen`: W and A become views of one (d_out + r) × d_in storage; forward, dx and dB are unchanged
    (float64, closed form), A's values and the weight bytes are the same, and backward keeps exactly h (N × r).
    `merged` (W + s·B·A formed for the step): the same, and B's value at the forward is what backward uses."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=bias, dtype=torch.float64).requires_grad_(False)
    layer = adapters.LoRALinear(base, rank=4, alpha=8, train_a=False)
    with torch.no_grad():
        layer.lora_B.normal_()
    a_before, bytes_before = layer.lora_A.detach().clone(), measure.weight_bytes(layer)
    assert layer.stack_frozen(merged) and layer._stack_ok and layer._check_stack()
    assert torch.equal(layer.lora_A, a_before) and measure.weight_bytes(layer) == bytes_before
    assert layer.base.weight.untyped_storage().data_ptr() == layer.lora_A.untyped_storage().data_ptr()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 7, 12, dtype=torch.float64)
    with measure.SavedTensorMeter(layer) as meter:
        y = layer(x)
    assert y.grad_fn.name().endswith("_LoRAFAMergedFunctionBackward" if merged else "_LoRAFAStackedFunctionBackward")
    assert meter.bytes == 3 * 7 * 4 * 8  # h only: W, A and their stack are weights
    assert measure.weight_bytes(layer) == bytes_before  # nothing weight-sized kept either
    y.backward(dy)
    s, A, B, W = layer.scaling, a_before, layer.lora_B.detach(), base.weight.detach()
    expected = x.detach() @ W.T + (base.bias if bias else 0) + s * (x.detach() @ A.T) @ B.T
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dy @ W + s * dy @ B @ A, rtol=1e-10, atol=1e-12)
    flat_x, flat_dy = x.detach().reshape(-1, 16), dy.reshape(-1, 12)
    torch.testing.assert_close(layer.lora_B.grad, s * flat_dy.T @ (flat_x @ A.T), rtol=1e-10, atol=1e-12)


def test_stacking_applies_only_where_it_is_exact():
    assert not _layer(train_a=True).stack_frozen()  # LoRA: A trains
    layer = _layer(train_a=False, dropout=0.1)
    assert layer.stack_frozen()  # stacked, but with dropout in training the mask path runs
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    assert layer(x).grad_fn.name().endswith("_LoRAFAFunctionBackward")
    layer.p = 0.0
    assert layer(x).grad_fn.name().endswith("_LoRAFAStackedFunctionBackward")
    assert layer.stack_frozen(merged=True) and layer(x).grad_fn.name().endswith("_LoRAFAMergedFunctionBackward")
    layer.to(torch.float32)  # a cast gives W and A new storages: the stack is rebuilt from them, merged still
    assert layer._stack_ok and layer._stacked.dtype == torch.float32
    assert layer(x.float()).grad_fn.name().endswith("_LoRAFAMergedFunctionBackward")
    a = layer.lora_A.detach().clone()
    layer.unstack()  # what FSDP needs before it shards the parameters
    assert not layer._stack_ok and not layer._merged and torch.equal(layer.lora_A, a)
    assert not torch._C._is_alias_of(layer.lora_A, layer.base.weight)
    assert layer(x.float()).grad_fn.name().endswith("_LoRAFAFunctionBackward")


def test_lorafa_v2_preconditioner_keeps_the_gradient_dtype_under_autocast():
    """A backward run inside an autocast region (as FLOP counting does) must not turn B's fp32 gradient bf16."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12).requires_grad_(False)
    layer = adapters.LoRALinear(base, rank=4, alpha=8, train_a=False, precondition_b=True)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().square().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32


@pytest.mark.parametrize("stacked", ["true", "merged"])
def test_stacked_method_trains_the_same_model(cfg_factory, stacked):
    """method.stacked=true|merged on a whole model: the same loss curve as the two-matmul layer (fp32, CPU)."""
    from lorafa.job import run

    common = ["model=tiny-llama", "method=lorafa", "task=synthetic", "task.max_seq_len=32", "train.batch_size=4",
              "train.max_steps=4"]
    kind = {"true": "stacked", "merged": "merged"}[stacked]
    plain, stacked = run(cfg_factory(*common)), run(cfg_factory(*common, f"method.stacked={stacked}"))
    assert plain["status"] == stacked["status"] == "ok"
    assert plain["layer"] == "two_matmul" and stacked["layer"] == kind, (plain["layer"], stacked["layer"])
    torch.testing.assert_close(torch.tensor(stacked["loss_curve"]), torch.tensor(plain["loss_curve"]),
                               rtol=1e-5, atol=1e-6)
    assert stacked["mem_weights_gib"] == plain["mem_weights_gib"]
    assert stacked["mem_activations_gib"] == plain["mem_activations_gib"]


def test_lorafa_layers_under_bf16_autocast_stay_within_bf16s_own_error(cfg_factory):
    """The numerics bar for a fast layer: under bf16 autocast (frozen weights in bf16) its loss curve stays
    within bf16 tolerance of the reference layer's. Tolerance measured, not assumed: the reference layer's own
    bf16 curve differs from its fp32 curve by some amount; the stacked and merged layers' bf16 curves must differ
    from the reference's bf16 curve by no more than twice that (the merged layer rounds W + s·B·A to bf16 once)."""
    from lorafa.job import run

    common = ["model=tiny-llama", "method=lorafa", "task=synthetic", "task.max_seq_len=32", "train.batch_size=4",
              "train.max_steps=8", "train.lr=1e-2", "task.num_train=4"]  # one batch, learnt by heart
    rows = {name: run(cfg_factory(*common, *extra))
            for name, extra in {"fp32": [], "bf16": ["train.precision=bf16"],
                                "stacked": ["train.precision=bf16", "method.stacked=true"],
                                "merged": ["train.precision=bf16", "method.stacked=merged"]}.items()}
    assert {name: row["layer"] for name, row in rows.items()} == {  # the layer each curve came from really ran
        "fp32": "two_matmul", "bf16": "two_matmul", "stacked": "stacked", "merged": "merged"}
    curve = {name: torch.tensor(row["loss_curve"]) for name, row in rows.items()}
    bf16_error = (curve["bf16"] - curve["fp32"]).abs().max().item()
    assert 0 < bf16_error < 0.05 * curve["fp32"].abs().max().item()  # bf16 does change the curve, a little
    assert curve["fp32"][-1] < curve["fp32"][0] - 0.1  # and it is a curve: B moved far enough for ΔW to matter
    for name in ("stacked", "merged"):
        assert (curve[name] - curve["bf16"]).abs().max().item() <= 2 * bf16_error, (name, curve, bf16_error)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", ["true", "merged"])  # the fast paths; the plain layer's is tested above
def test_a_lorafa_model_compiles_into_one_graph(stacked):
    """No graph break in a whole LoRA-FA model's forward (a break per layer made compiled LoRA-FA slower than
    eager on the H200: the stacked layer once checked its storage inside the forward)."""
    from lorafa import models

    from .conftest import compose_cfg

    cfg = compose_cfg(["model=tiny-roberta", "method=lorafa", f"method.stacked={stacked}"])
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    methods.apply(net, cfg.method, cfg.model.target_modules)
    assert all(layer._stack_ok and layer._merged == (stacked == "merged")
               for layer in adapters.lora_layers(net.model).values())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net.model.train())(input_ids=torch.randint(5, 100, (2, 16)),
                                                         labels=torch.tensor([0, 1]))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
