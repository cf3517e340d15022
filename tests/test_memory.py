"""lorafa.memory.predict: the memory of a run from its config alone, beside the measurement in every row."""

from __future__ import annotations

import math

import pytest
import torch

from lorafa import memory
from lorafa.job import run
from tests.conftest import compose_cfg

PARTS = ("weights", "grads", "optimizer", "activations", "peak")
SYNTH = ("task=synthetic", "task.max_seq_len=32", "task.target_len=16", "train.batch_size=4", "train.max_steps=2",
         "train.measure_warmup_steps=0")


def test_prediction_scales_with_the_batch_and_allocates_nothing():
    cfg = compose_cfg(["model=tiny-llama", "method=lorafa", *SYNTH])

    def pred(batch):
        return memory.predict(cfg.model, cfg.method, batch_size=batch, seq_len=32, device="cpu")

    small, large = pred(4), pred(8)
    assert small.weights == large.weights > 0 and small.optimizer == large.optimizer > 0
    assert large.activations == pytest.approx(2 * small.activations, rel=0.02)  # saved tensors are per token
    # a 7B model "builds" in seconds without its 27 GB: fake tensors carry no storage
    big = compose_cfg(["model=llama-7b", "model.init=random", "method=lorafa", *SYNTH])
    p = memory.predict(big.model, big.method, batch_size=1, seq_len=64, device="cpu")
    assert p.weights > 6.7e9 * 4 * 0.99  # fp32 parameters (frozen weights stay fp32 on CPU)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
@pytest.mark.parametrize("method", ["method=lora", "method=lorafa", "method=full", "method=frozen",
                                    "method=lorafa method.dropout=0.1 method.recompute=elementwise",
                                    "method=lora method.gradient_checkpointing=true"])
def test_prediction_within_5_percent_of_measurement(cfg_factory, model, method):
    row = run(cfg_factory(f"model={model}", *method.split(), *SYNTH))
    assert row["status"] == "ok", row["error"]
    assert row["pred_error"] == ""
    for part in PARTS:
        measured, predicted = row[f"mem_{part}_gib"], row[f"pred_mem_{part}_gib"]
        assert predicted == pytest.approx(measured, rel=0.05, abs=1e-9), part


@pytest.mark.slow
def test_a_failed_prediction_is_nan_columns_not_a_failed_job(cfg_factory, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated")

    monkeypatch.setattr(memory, "predict_job", broken)
    row = run(cfg_factory(*SYNTH))
    assert row["status"] == "ok" and row["pred_error"] == "RuntimeError: simulated"
    assert all(math.isnan(row[f"pred_mem_{p}_gib"]) for p in PARTS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_cuda_prediction_within_5_percent(cfg_factory, model):
    # big enough that the cuBLAS workspace constant is not the whole peak
    row = run(cfg_factory(f"model={model}", "method=lorafa", "task=synthetic", "task.max_seq_len=256",
                          "task.target_len=64", "train.batch_size=64", "train.max_steps=2"))
    assert row["status"] == "ok", row["error"]
    for part in PARTS:
        assert row[f"pred_mem_{part}_gib"] == pytest.approx(row[f"mem_{part}_gib"], rel=0.05), part
