"""`model.quantize=nf4|int8` (lorafa/quantize.py): frozen base layers in 4 / 8 bits through bitsandbytes, LoRA and
LoRA-FA adapters on top in the training dtype. Skipped, with the reason shown, where bitsandbytes does not import
(the refusals run everywhere)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lorafa import adapters, measure, memory, models, quantize
from lorafa.checks import BadInput, check_config
from lorafa.job import run
from tests.conftest import ROOT, compose_cfg

MISSING = quantize.available()
needs_bnb = pytest.mark.skipif(MISSING is not None, reason=f"bitsandbytes does not import here: {MISSING}")
PARTS = ("weights", "grads", "optimizer", "activations", "peak")
SYNTH = ("task=synthetic", "task.max_seq_len=32", "task.target_len=16", "train.batch_size=4", "train.max_steps=2",
         "train.measure_warmup_steps=0")
REFUSED = "model.quantize with a method, strategy, compile mode or device it cannot run with, or without bitsandbytes"


def _linear(d_in=256, d_out=128, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


@needs_bnb
@pytest.mark.parametrize("kind, tol", [("nf4", 0.2), ("int8", 0.01)])
def test_the_layer_is_its_dequantized_weight_and_saves_nothing(kind, tol):
    lin = _linear()
    q = quantize.QuantizedLinear(lin, kind)
    w = q.dequantized(torch.float32)
    assert w.shape == lin.weight.shape
    # quantization error, relative to the weights' scale (nf4: 16 levels per 64-block; int8: 255 per row)
    assert (w - lin.weight).abs().max() <= tol * lin.weight.abs().max()
    x = torch.randn(3, 5, 256, requires_grad=True)
    with measure.SavedTensorMeter(q) as meter:
        y = q(x)
    assert meter.bytes == 0  # dx = dy·W needs only the (quantized) weight
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(y, nn.functional.linear(x, w, lin.bias))
    torch.testing.assert_close(x.grad, dy @ w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16


@needs_bnb
def test_weights_bytes_drop_by_the_expected_factor():
    d_in, d_out = 512, 256
    lin = _linear(d_in, d_out, bias=False)
    n = d_in * d_out
    per_weight = {}
    for kind in quantize.KINDS:
        q = quantize.QuantizedLinear(lin, kind)
        per_weight[kind] = measure.weight_bytes(q) / n
    # nf4: 4 bits + an 8-bit absmax per 64 weights + an fp32 scale per 256 absmaxes, the mean and the 256-value code
    assert per_weight["nf4"] == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + (4 + 256 * 4) / n)
    assert per_weight["int8"] == pytest.approx(1 + 4 / d_in)  # 1 byte + an fp32 scale per output row
    # the whole model: the blocks' linear layers quantized, embeddings, norms and the LM head at fp32
    cfg = compose_cfg(["model=tiny-llama"])
    full = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32).model
    shapes = [full.get_submodule(m).weight.shape for m in models.block_linears(full)]
    other = measure.weight_bytes(full) - 4 * sum(o * i for o, i in shapes)
    expected = {"nf4": sum(o * i // 2 + o * i // 64 + 4 * -(o * i // 64 // -256) + 4 + 256 * 4 for o, i in shapes),
                "int8": sum(o * i + 4 * o for o, i in shapes)}
    for kind in quantize.KINDS:
        quantized = models.build(compose_cfg(["model=tiny-llama", f"model.quantize={kind}"]).model, num_labels=2,
                                 device="cpu", dtype=torch.float32).model
        assert sum(isinstance(m, quantize.QuantizedLinear) for m in quantized.modules()) == len(shapes) == 14
        assert measure.weight_bytes(quantized) == other + expected[kind], kind


def _dequantized_copy(quantized: nn.Module) -> nn.Module:
    """The quantized model with every quantized layer an fp32 nn.Linear holding its dequantized weight."""
    model = copy.deepcopy(quantized)
    for name, m in list(model.named_modules()):
        if isinstance(m, quantize.QuantizedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantized(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


@needs_bnb
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-roberta"])
@pytest.mark.parametrize("kind", quantize.KINDS)
def test_quantized_logits_are_the_dequantized_fp32_models(model, kind):
    torch.manual_seed(0)
    float_model = models.build(compose_cfg([f"model={model}"]).model, num_labels=2, device="cpu",
                               dtype=torch.float32).model.eval()
    torch.manual_seed(0)  # the same random init, then quantized
    net = models.build(compose_cfg([f"model={model}", f"model.quantize={kind}"]).model, num_labels=2, device="cpu",
                       dtype=torch.float32)
    q = net.model.eval()
    reference = _dequantized_copy(q).eval()
    ids = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        got, want, orig = (m(input_ids=ids).logits for m in (q, reference, float_model))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and near the unquantized model: quantization noise, not another network
    assert (got - orig).abs().mean() < 0.25 * orig.abs().mean()


@needs_bnb
@pytest.mark.parametrize("kind", quantize.KINDS)
def test_lorafa_on_a_quantized_base_saves_only_x_a_per_layer(kind):
    n, r = 3 * 7, 4
    base = quantize.QuantizedLinear(_linear(), kind)
    for train_a, expected in ((False, n * r * 4), (True, n * 256 * 4 + n * r * 4)):  # LoRA-FA: h; LoRA: x and h
        layer = adapters.LoRALinear(copy.deepcopy(base), rank=r, alpha=8, train_a=train_a)
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # the adapters in the training dtype
        x = torch.randn(3, 7, 256, requires_grad=True)
        with measure.SavedTensorMeter(layer) as meter:
            y = layer(x)
        assert meter.bytes == expected, train_a
        y.sum().backward()
        assert layer.lora_B.grad is not None and (layer.lora_A.grad is not None) == train_a
        # dx through the dequantized weight and the adapter
        w = layer.base.dequantized(torch.float32)
        dx = torch.ones(3, 7, 128) @ (w + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach())
        torch.testing.assert_close(x.grad, dx)


@needs_bnb
@pytest.mark.parametrize("kind", quantize.KINDS)
def test_lorafa_keeps_the_same_activations_as_on_a_float_base(kind, cfg_factory):
    """Per adapted layer LoRA-FA saves N × r on a quantized base as on a float one; the quantized base adds nothing."""
    from lorafa import methods

    saved = {}
    for q in (None, kind):
        cfg = cfg_factory("model=tiny-llama", "method=lorafa", *SYNTH, *([f"model.quantize={q}"] if q else []))
        torch.manual_seed(0)
        net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
        applied = methods.apply(net, cfg.method, cfg.model.get("target_modules"))
        ids = torch.randint(3, 1000, (4, 32))
        with measure.SavedTensorMeter(net.model) as meter:
            net.model(input_ids=ids, labels=ids).loss.backward()
        saved[q] = meter.bytes
    assert len(applied.targets) == 14
    assert saved[kind] == saved[None] > 0


@needs_bnb
@pytest.mark.parametrize("kind", quantize.KINDS)
def test_lorafa_trains_b_only_and_the_quantized_base_stays(kind, cfg_factory):
    from lorafa import methods

    cfg = cfg_factory("model=tiny-llama", "method=lorafa", f"model.quantize={kind}", *SYNTH)
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    methods.apply(net, cfg.method, cfg.model.get("target_modules"))
    layers = adapters.lora_layers(net.model)
    before = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.base.weight.detach().clone())
              for n, m in layers.items()}
    trainable = [p for p in net.model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(m.lora_B) for m in layers.values()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 1000, (4, 32))
    for _ in range(2):
        net.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, m in layers.items():
        a, b, w = before[n]
        assert torch.equal(m.lora_A, a) and torch.equal(m.base.weight, w), n
        assert not torch.equal(m.lora_B, b), n
    saved = adapters.save_peft(net.model, Path(cfg.output_dir) / "adapter", family=net.family)  # A and B, as PEFT's
    assert '"fan_in_fan_out": false' in (saved / "adapter_config.json").read_text()
    with pytest.raises(TypeError, match=r"cannot merge an adapter into a .* base layer \(model.quantize\)"):
        adapters.merge(net.model)  # a 4/8-bit weight cannot take W + s·B·A without quantizing it again


def _run_and_compare(cfg_factory, *overrides):
    row = run(cfg_factory(*overrides, *SYNTH))
    assert row["status"] == "ok", row["error"]
    assert row["pred_error"] == ""
    for part in PARTS:
        assert row[f"pred_mem_{part}_gib"] == pytest.approx(row[f"mem_{part}_gib"], rel=0.05, abs=1e-9), part
    return row


@needs_bnb
@pytest.mark.parametrize("kind", quantize.KINDS)
def test_a_quantized_lorafa_job_runs_and_its_memory_is_predicted(kind, cfg_factory):
    row = _run_and_compare(cfg_factory, "model=tiny-llama", "method=lorafa", f"model.quantize={kind}")
    assert row["quantize"] == kind and row["adapted_layers"] == 14
    plain = _run_and_compare(cfg_factory, "model=tiny-llama", "method=lorafa")
    assert plain["quantize"] == "none"
    assert row["mem_weights_gib"] < plain["mem_weights_gib"]
    assert row["mem_activations_gib"] == plain["mem_activations_gib"]


@pytest.mark.slow
@needs_bnb
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-roberta", "tiny-t5"])
@pytest.mark.parametrize("method", ["lora", "lorafa", "frozen"])
@pytest.mark.parametrize("kind", quantize.KINDS)
def test_every_family_and_method_runs_quantized_and_predicted(kind, method, model, cfg_factory):
    row = _run_and_compare(cfg_factory, f"model={model}", f"method={method}", f"model.quantize={kind}")
    assert row["quantize"] == kind and row["score"] == row["score"]  # not NaN


@pytest.mark.gpu
@needs_bnb
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "lorafa"])
def test_cuda_quantized_prediction_within_5_percent(method, cfg_factory):
    row = run(cfg_factory("model=tiny-llama", f"method={method}", "model.quantize=nf4", "task=synthetic",
                          "task.max_seq_len=256", "train.batch_size=64", "train.max_steps=2"))
    assert row["status"] == "ok", row["error"]
    for part in PARTS:
        assert row[f"pred_mem_{part}_gib"] == pytest.approx(row[f"mem_{part}_gib"], rel=0.05), part


def test_the_predictor_builds_a_quantized_7b_without_its_weights():
    if MISSING is not None:
        pytest.skip(f"bitsandbytes does not import here: {MISSING}")
    cfg = compose_cfg(["model=llama-7b", "model.init=random", "model.quantize=nf4", "method=lorafa", *SYNTH])
    p = memory.predict(cfg.model, cfg.method, batch_size=1, seq_len=64, device="cpu")
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q, k, v, o; gate, up; down (d_out, d_in)
    nf4 = 32 * sum(o * i // 2 + o * i // 64 + 4 * (o * i // 64 // 256) + 4 + 256 * 4 for o, i in shapes)
    adapter = 32 * 8 * 4 * sum(o + i for o, i in shapes)  # fp32 A (r × d_in) and B (d_out × r), r = 8
    rest = 4 * 2 * 32000 * 4096 + 4 * 4096 * 65  # fp32 embeddings, LM head and norms
    assert nf4 + adapter + rest <= p.weights <= nf4 + adapter + rest + 1024  # + the rotary embedding's buffer
    assert p.weights / 2**30 == pytest.approx(4.16, abs=0.01)  # fp32 (CPU): 25.1 GiB unquantized


@pytest.mark.bad_input(REFUSED)
@pytest.mark.parametrize("overrides, message", [
    (["model.quantize=fp8"], r"^model.quantize=fp8: expected nf4, int8 or null$"),
    (["method=full"], (r"^model.quantize=nf4: not with method=full, which trains the base weights .*; expected an "
                       r"adapter method")),
    (["train.strategy=fsdp"], r"^model.quantize=nf4: not with train.strategy=fsdp .*; expected train.strategy=single$"),
    (["train.strategy=ddp"], r"^model.quantize=nf4: not with train.strategy=ddp"),
    (["train.compile=graph"], (r"^model.quantize=nf4: not with train.compile=graph .*; expected train.compile=auto "
                               r"or none$")),
    (["train.compile=blocks"], r"^model.quantize=nf4: not with train.compile=blocks"),
    (["device=mps"], (r"^model.quantize=nf4: not on device mps \(bitsandbytes has no 4- or 8-bit kernels there\); "
                      r"expected a cpu, cuda, xpu device or model.quantize=null$")),
])
def test_what_a_quantized_base_cannot_run_with_is_refused_in_one_line(overrides, message, cfg_factory):
    overrides = overrides if any(o.startswith("model.quantize") for o in overrides) else ["model.quantize=nf4",
                                                                                          *overrides]
    cfg = cfg_factory("model=tiny-llama", *overrides, *SYNTH)
    with pytest.raises(BadInput, match=message) as err:
        run(cfg)  # refused before any row
    assert "\n" not in str(err.value)
    assert not (ROOT / cfg.output_dir / "result.parquet").exists()


@pytest.mark.bad_input(REFUSED)
def test_quantize_without_bitsandbytes_is_refused_and_the_device_auto_resolves_to_is_checked(cfg_factory,
                                                                                             monkeypatch):
    monkeypatch.setattr(quantize, "available", lambda: "ModuleNotFoundError: No module named 'bitsandbytes'")
    with pytest.raises(BadInput, match=r"^model.quantize=int8: bitsandbytes does not import \(ModuleNotFoundError: "
                                       r"No module named 'bitsandbytes'\); expected it installed: pip install "
                                       r"'lorafa\[quant\]'$"):
        check_config(cfg_factory("model=tiny-llama", "model.quantize=int8"))
    monkeypatch.undo()
    with pytest.raises(BadInput, match=r"^model.quantize=nf4: not on device meta"):  # where `auto` resolved
        models.build(compose_cfg(["model=tiny-llama", "model.quantize=nf4"]).model, num_labels=2, device="meta",
                     dtype=torch.float32)


def test_a_quantized_step_is_eager_on_auto(cfg_factory):
    from lorafa import step

    mode, why = step.resolve_mode(cfg_factory("model.quantize=nf4"), torch.device("cuda"), 10_000)
    assert mode == "none" and "model.quantize=nf4" in why


@pytest.mark.slow
@pytest.mark.bad_input(REFUSED)
def test_the_command_line_refuses_a_quantized_full_fine_tuning_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "model=tiny-llama", "method=full", "model.quantize=nf4",
                           f"hydra.run.dir={tmp_path}"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: model.quantize=nf4: not with method=full")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "result.parquet").exists()
