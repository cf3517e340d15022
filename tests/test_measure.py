"""Unit tests of the memory accounting and the throughput timer."""

import torch
from torch import nn

from lorafa import measure


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(100, dtype=torch.float32)
    b = torch.zeros(10, dtype=torch.float64)
    assert measure.tensor_bytes([a, a[:10], a.view(10, 10), b]) == 400 + 80
    lin = nn.Linear(4, 4)
    tied = nn.ModuleDict({"x": lin, "y": lin})
    assert measure.weight_bytes(tied) == (16 + 4) * 4


def test_saved_tensor_meter_excludes_weights_and_dedups():
    w = nn.Parameter(torch.randn(32, 32))
    model = nn.Module()
    model.w = w
    x = torch.randn(8, 32, requires_grad=True)
    with measure.SavedTensorMeter(model) as meter:
        h = x @ w  # saves x (for dw) and w (for dx): w is a weight, excluded
        y = torch.tanh(h)  # saves its output, 8×32
        z = y * y  # saves y twice: one storage
    assert meter.bytes == (8 * 32) * 4 * 2
    z.sum().backward()  # the hooks did not break autograd
    assert x.grad is not None and w.grad is not None


def test_saved_tensor_meter_sees_nothing_without_grad():
    model = nn.Linear(8, 8)
    with torch.no_grad(), measure.SavedTensorMeter(model) as meter:
        model(torch.randn(4, 8))
    assert meter.bytes == 0


def test_memory_split_and_optimizer_state():
    model = nn.Linear(10, 10)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    grads = measure.grad_bytes(model)
    opt.step()
    mem = measure.Memory(weights=measure.weight_bytes(model), grads=grads,
                         optimizer=measure.optimizer_bytes(opt), activations=123)
    assert mem.weights == 110 * 4 and mem.grads == 110 * 4
    assert mem.optimizer >= 2 * 110 * 4  # exp_avg + exp_avg_sq (+ step counters)
    cols = mem.columns()
    assert cols["mem_source"] == "tensor_accounting" and "mem_reserved_gib" not in cols  # no allocator
    assert cols["mem_peak_gib"] * measure.GIB == mem.weights + mem.grads + mem.optimizer + 123
    mem.allocator.update(peak=5 * measure.GIB, build=measure.GIB, reserved=6 * measure.GIB)
    cols = mem.columns()
    assert cols["mem_peak_gib"] == 5 and cols["alloc_build_gib"] == 1 and cols["mem_source"] == "cuda_allocator"
    assert cols["mem_reserved_gib"] == 6


def test_throughput_leaves_out_warmup_steps_and_time_between_windows(monkeypatch):
    """Steps are timed in windows between synchronisation points, not one by one: the warm-up steps' tokens and
    the time before the warm-up ends, and time between a closed window and the next (evaluation), are left out."""
    clock = iter([0.0, 5.0, 6.0, 8.0, 100.0, 103.0])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    t = measure.Throughput(torch.device("cpu"), warmup_steps=2)
    t.synced(0)  # t=0: still in warm-up, no window opens
    for step, tokens in enumerate((1000, 1000)):
        t.add(step, tokens, 1)
    t.synced(2)  # t=5: the warm-up is over: a window opens
    for step in (2, 3):
        t.add(step, 10, 1)
    t.synced(4)  # t=6: 2 steps in 1 s
    t.add(4, 10, 1)
    t.synced(5, resume=False)  # t=8: 1 step in 2 s; evaluation follows
    t.synced(5)  # t=100: the window reopens after it
    t.add(5, 10, 1)
    t.synced(6)  # t=103
    cols = t.columns()
    assert cols["timed_steps"] == 4 and t.seconds == 1 + 2 + 3
    assert cols["tokens_per_s"] == 40 / 6 and cols["samples_per_s"] == 4 / 6
    assert cols["step_time_windows_s"] == [0.5, 2.0, 3.0]  # each window's seconds per step, in order
    assert measure.Throughput(torch.device("cpu"), 5).columns()["timed_steps"] == 0


def test_unmeasured_memory_is_nan_not_zero():
    import math

    cols = measure.Memory(weights=1024).columns()
    assert cols["mem_weights_gib"] == 1024 / measure.GIB
    assert all(math.isnan(cols[f"mem_{k}_gib"]) for k in ("grads", "optimizer", "activations", "peak"))
