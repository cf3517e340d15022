"""lorafa.memory.predict: the memory of a run from its config alone, beside the measurement in every row."""

from __future__ import annotations

import math

import pytest
import torch

from lorafa import measure, memory
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


def test_one_llama_block_keeps_what_a_count_by_hand_says(cfg_factory):
    """An independent check of the predictor and the measurement (both count saved tensors with hooks; on CPU a
    row's peak is the sum of its parts, so the hooks are all the CPU tests compare): one LLaMA block (d = 128,
    f = 344, r = 8 on its 7 linears), N = 2 × 16 tokens, fp32, counted by hand from what each method's backward
    needs, relative to the frozen network (nothing trains; backward to the embeddings, the speed bound):
    - LoRA − LoRA-FA = N (2d + f) floats: LoRA's A needs its layer's input — q/k/v's one normed input, gate/up's,
      down's (N × f) — which LoRA-FA does not keep; o_proj's input is the attention output, which SDPA keeps
      for its own backward anyway.
    - LoRA-FA − frozen = 7 N r (each layer's h = x Aᵀ) − N (d + 1): the frozen network's backward reaches the
      embeddings, so the first RMSNorm keeps its input and 1/rms; below LoRA-FA's lowest adapter nothing needs
      a gradient.
    - full − frozen = N (3d + d + 2d + f) floats + N int64: the three RMSNorms' normalised inputs (for their
      weights), the output projection's input, the linears' inputs as for LoRA, and the embedding's token ids;
      and, as full fine-tuning trains the head and so runs transformers' loss where the others fuse it
      (`lorafa.loss`), + N V floats + N int64 + 4 bytes (cross-entropy's log-probabilities, its targets and total
      weight) − N d floats (the hidden states' gradient the fused loss keeps).
    Weights, gradients and AdamW state: the parameter counts (2 moments and a 4-byte step per trained tensor)."""
    N, d, f, r, vocab = 2 * 16, 128, 344, 8, 4096
    adapted = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]  # (d_in, d_out): q, k, v, o, gate, up, down
    a_params, b_params = sum(r * i for i, _ in adapted), sum(o * r for _, o in adapted)
    base = 2 * vocab * d + 4 * d * d + 3 * d * f + 3 * d  # embeddings, output projection, block, three norms
    common = ["model=tiny-llama", "model.arch.num_hidden_layers=1", "task=synthetic", "task.max_seq_len=16",
              "train.batch_size=2", "train.max_steps=1", "train.measure_warmup_steps=0"]
    methods_ = {"frozen": [], "lora": ["method.rank=8"], "lorafa": ["method.rank=8", "method.stacked=false"],
                "lorafa_stacked": ["method=lorafa", "method.stacked=true"], "full": []}
    rows, preds = {}, {}
    for name, extra in methods_.items():
        cfg = cfg_factory(*common, f"method={name.split('_')[0]}", *extra)
        preds[name] = memory.predict(cfg.model, cfg.method, batch_size=2, seq_len=16, device="cpu")
        rows[name] = run(cfg)
        assert rows[name]["status"] == "ok", rows[name]["error"]
    fl = 4  # bytes per fp32 value
    by_hand = {"lora": N * (2 * d + f) * fl + 7 * N * r * fl - N * (d + 1) * fl,
               "lorafa": 7 * N * r * fl - N * (d + 1) * fl,
               "lorafa_stacked": 7 * N * r * fl - N * (d + 1) * fl,
               "full": N * (6 * d + f) * fl + N * 8 + (N * vocab * fl + N * 8 + 4 - N * d * fl)}
    trained = {"lora": (a_params + b_params, 14), "lorafa": (b_params, 7), "lorafa_stacked": (b_params, 7),
               "full": (base, 12)}
    for name, expected in by_hand.items():
        for got, frozen, source in ((preds[name].activations, preds["frozen"].activations, "predicted"),
                                    (rows[name]["mem_activations_gib"] * measure.GIB,
                                     rows["frozen"]["mem_activations_gib"] * measure.GIB, "measured")):
            assert got - frozen == pytest.approx(expected, abs=0.5), (name, source)
        params, tensors = trained[name]
        assert preds[name].grads == params * fl == pytest.approx(rows[name]["mem_grads_gib"] * measure.GIB), name
        assert preds[name].optimizer == 2 * params * fl + 4 * tensors == pytest.approx(
            rows[name]["mem_optimizer_gib"] * measure.GIB), name
    assert preds["frozen"].grads == preds["frozen"].optimizer == 0


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


def _two_steps_tracked(model_cfg, method_cfg, batch_size: int, seq_len: int, target_len: int) -> tuple:
    """The reference for `predict`'s steady-state step: two training steps from a fresh optimizer, as a job runs
    them, on fake tensors; (the most bytes alive at once over both, each step's FLOPs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorafa import methods, models
    from lorafa.step import masking_as

    tracker = memory._LiveBytes("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True), tracker, masking_as(memory._never_traced):
        net = models.build(model_cfg, num_labels=2, device=torch.device("cpu"), dtype=torch.float32, weights=False)
        methods.apply(net, method_cfg, model_cfg.get("target_modules"))
        net.model.train()
        trainable = [p for p in net.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
        batch = memory._batch(net.family, batch_size, seq_len, target_len, 2, torch.device("cpu"))
        peaks, flops = [], []
        for _ in range(2):
            tracker.reset_peak()
            with memory._Flops() as counter:
                net.model(**batch).loss.backward()
            flops.append(counter.total)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            net.model.zero_grad(set_to_none=True)
            peaks.append(tracker.peak)
    return max(peaks), flops


@pytest.mark.parametrize("model,plan", [("tiny-llama", ""), ("tiny-llama", "method.gradient_checkpointing=every:2"),
                                        ("tiny-llama", "method.recompute=elementwise"),
                                        ("tiny-llama", "method.offload=every:2"),
                                        ("tiny-roberta", "method.gradient_checkpointing=every:2"),
                                        ("tiny-t5", "method.offload=every:2")])
def test_the_predicted_step_is_a_jobs_steady_state_step(model, plan):
    """`predict` makes the optimizer's state as a first step leaves it and dry-runs one step: the most bytes alive
    at once in it are the most over a job's first two steps (the first builds the state; from the second on every
    step is the same), for each kind of plan — checkpointing, element-wise recomputation, offloading."""
    cfg = compose_cfg([f"model={model}", "method=lorafa", *SYNTH, *([plan] if plan else [])])
    pred = memory.predict(cfg.model, cfg.method, batch_size=4, seq_len=32, target_len=16, device="cpu")
    peak, flops = _two_steps_tracked(cfg.model, cfg.method, 4, 32, 16)
    assert pred.tracked_peak == peak and pred.flops == flops[0] == flops[1], (pred, peak, flops)


def test_a_prediction_kept_on_disk_is_read_back_only_for_the_same_inputs_and_code(cfg_factory, tmp_path,
                                                                                   monkeypatch):
    """`LORAFA_CACHE`: `predict_job` keeps each prediction it makes on disk, and a later process asking for the same
    inputs (here: this one, its own cache cleared) reads it instead of predicting, as `prefetch` does instead of
    making it in a worker. Other inputs, other code (lorafa's source, torch's or transformers' version) or a local
    model's edited config.json make it anew; a file that does not read back is made again; `off` keeps nothing."""
    from lorafa import memory

    monkeypatch.setenv("LORAFA_CACHE", str(tmp_path / "cache"))
    kept = lambda: sorted((tmp_path / "cache" / "predictions").glob("*.json"))
    kwargs = {"num_labels": 2, "amp": None, "frozen_dtype": None, "stacked": "false"}
    cfg, other = (cfg_factory("model=tiny-llama", "task=synthetic", "task.max_seq_len=32", f"train.batch_size={b}")
                  for b in (2, 3))
    cpu = torch.device("cpu")
    made = memory.predict_job(cfg, cpu, **kwargs)
    assert len(kept()) == 1
    calls, real = [], memory.predict
    monkeypatch.setattr(memory, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))

    def anew(c) -> memory.Prediction:
        memory._CACHE.clear()
        return memory.predict_job(c, cpu, **kwargs)

    read = memory.READ_FROM_DISK[0]
    assert anew(cfg) == made and calls == [] and memory.READ_FROM_DISK[0] == read + 1  # read, not predicted
    assert anew(other).peak > made.peak and len(calls) == 1 and len(kept()) == 2  # other inputs
    code = memory._code
    monkeypatch.setattr(memory, "_code", lambda: "other code")
    assert anew(cfg) == made and len(calls) == 2 and len(kept()) == 3
    monkeypatch.setattr(memory, "_code", code)
    for path in kept():  # torn or foreign files: made again, and kept whole
        path.write_text("{")
    assert anew(cfg) == made and len(calls) == 3 and made in [memory._read(p) for p in kept()]
    # `prefetch` reads what is kept instead of making it in worker processes (`other`'s file is still torn: made
    # there, with cfg's read, one prediction is left to make — in this process, when asked for)
    memory._CACHE.clear()
    read = memory.READ_FROM_DISK[0]
    assert memory.prefetch([(cfg, cpu, kwargs), (other, cpu, kwargs)], 2) == 0 and list(memory._CACHE.values()) == [made]
    assert memory.READ_FROM_DISK[0] == read + 1 and len(calls) == 3
    memory.predict_job(other, cpu, **kwargs)
    memory._CACHE.clear()
    assert memory.prefetch([(cfg, cpu, kwargs), (other, cpu, kwargs)], 2) == 0 and len(memory._CACHE) == 2
    assert memory.READ_FROM_DISK[0] == read + 3 and len(calls) == 4
    # a local model: its config.json is part of the name
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    first = memory._disk_path("key", {"path": str(model)}, cpu)
    assert memory._disk_path("key", {"path": str(model)}, cpu) == first
    (model / "config.json").write_text('{"hidden_size": 16}')
    assert memory._disk_path("key", {"path": str(model)}, cpu) != first
    # on CUDA the device's name and compute capability are part of it (the attention kernel the step picks)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    names = {}
    for gpu in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index, gpu=gpu: gpu)
        names[gpu] = memory._disk_path("key", {}, torch.device("cuda"))
        assert memory._disk_path("key", {}, torch.device("cuda:0")) == names[gpu] != memory._disk_path("key", {}, cpu)
    assert len(set(names.values())) == 2
    monkeypatch.delenv("LORAFA_CACHE")  # the default: under XDG_CACHE_HOME, or ~/.cache; none without a home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert memory.cache_dir() == tmp_path / "xdg" / "lorafa" / "predictions"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(memory.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert memory.cache_dir() is None
    monkeypatch.setenv("LORAFA_CACHE", "off")
    n = len(kept())
    assert memory.cache_dir() is None and anew(cfg) == made and len(calls) == 5 and len(kept()) == n


def test_predictions_made_in_worker_processes_are_those_made_here(cfg_factory, tmp_path, monkeypatch):
    """`prefetch` makes a budget's predictions in spawned processes at once: each the prediction this process
    would make, kept for `predict_job` to find (and on disk, `LORAFA_CACHE`); one that fails there is not kept
    (asked for, it fails here)."""
    from lorafa import memory

    monkeypatch.setenv("LORAFA_CACHE", str(tmp_path / "cache"))

    kwargs = {"num_labels": 2, "amp": None, "frozen_dtype": None, "stacked": "false"}
    cfgs = [cfg_factory("model=tiny-llama", "task=synthetic", "task.max_seq_len=32", "train.batch_size=2", *extra)
            for extra in ([], ["method.gradient_checkpointing=true"], ["method=lora"])]
    broken = cfg_factory("model=tiny-llama", "task=synthetic", "task.max_seq_len=32", "model.arch.hidden_size=30")
    cpu = torch.device("cpu")
    made = memory.prefetch([(c, cpu, kwargs) for c in [*cfgs, broken]], 2)
    assert made == 3 and len(memory._CACHE) == 3
    assert len(list((tmp_path / "cache" / "predictions").glob("*.json"))) == 3
    monkeypatch.setenv("LORAFA_CACHE", "off")  # (below: made here, not read back)
    there = [memory.predict_job(c, cpu, **kwargs) for c in cfgs]
    assert len(memory._CACHE) == 3  # found, not made again
    memory._CACHE.clear()
    here = [memory.predict_job(c, cpu, **kwargs) for c in cfgs]
    assert there == here and len({p.peak for p in here}) == 3, (there, here)
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):  # as it raised there
        memory.predict_job(broken, cpu, **kwargs)
    assert memory.prefetch([(c, cpu, kwargs) for c in cfgs], 2) == 0  # all made already
    assert memory.workers(1, 5) == 1 and memory.workers(4, 2) == 2 and 1 <= memory.workers("auto", 20) <= 8
