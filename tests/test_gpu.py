"""CUDA tier: the allocator readings and bf16 autocast. Skipped, with the reason shown, where no GPU is present."""

import pytest
import torch

from lorafa.job import run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_cuda_rows_carry_the_allocator_phases(cfg_factory, model):
    rows = {m: run(cfg_factory(f"model={model}", f"method={m}", "task=synthetic", "task.max_seq_len=64",
                               "task.target_len=16", "train.batch_size=16", "train.max_steps=6"))
            for m in ("lora", "lorafa")}
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        assert row["mem_source"] == "cuda_allocator" and row["device"] == torch.cuda.get_device_name()
        # the allocator holds at least the tensors counted, and its phases are ordered
        assert row["alloc_build_gib"] >= row["mem_weights_gib"] * 0.99
        assert row["alloc_after_step_gib"] >= row["alloc_build_gib"]
        assert row["mem_peak_gib"] == row["alloc_peak_gib"] >= row["alloc_fwd_bwd_peak_gib"]
        assert row["mem_peak_gib"] >= row["mem_weights_gib"] + row["mem_activations_gib"]
    assert rows["lorafa"]["mem_activations_gib"] < rows["lora"]["mem_activations_gib"]
    assert rows["lorafa"]["mem_peak_gib"] < rows["lora"]["mem_peak_gib"]


def test_bf16_autocast_is_the_cuda_default(cfg_factory):
    from lorafa.train import autocast_dtype

    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    row = run(cfg_factory("task=synthetic", "train.max_steps=2", "train.precision=fp32"))
    bf16 = run(cfg_factory("task=synthetic", "train.max_steps=2"))
    assert row["status"] == bf16["status"] == "ok"
    assert bf16["mem_activations_gib"] < row["mem_activations_gib"]  # half-width saved activations
