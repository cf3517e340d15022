"""Smoke tests of run(cfg), the real job entry point, on the tiny random-init models of every family."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lorafa import results
from lorafa.job import run

from .conftest import compose_cfg

pytestmark = pytest.mark.slow

SMALL = ("task.max_train_samples=48", "task.max_eval_samples=24", "train.batch_size=8", "train.max_steps=5")


def assert_complete(row: dict, metrics: list[str]):
    missing = [c for c in results.REQUIRED_COLUMNS + [f"eval_{m}" for m in metrics] if c not in row]
    assert not missing, missing
    empty = [c for c in results.REQUIRED_COLUMNS if c != "error" and (row[c] is None or (
        isinstance(row[c], float) and math.isnan(row[c])))]
    assert not empty, {c: row[c] for c in empty}


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_every_method_runs_and_lorafa_saves_activation_memory(cfg_factory, model):
    rows = {m: run(cfg_factory(f"model={model}", f"method={m}", *SMALL)) for m in ("full", "lora", "lorafa")}
    for method, row in rows.items():
        assert row["status"] == "ok", row["error"]
        assert_complete(row, ["accuracy", "f1"])
        assert row["method"] == method and row["model"] == model and row["train_steps"] == 5
        assert 0.0 <= row["score"] <= 1.0 and row["metric"] == "accuracy"
        assert row["mem_source"] == "tensor_accounting" and row["timed_steps"] == 2
        # the row on disk is the row returned
        on_disk = pd.read_parquet(f"{row['config'] and ''}{_job_dir(row)}/result.parquet").iloc[0]
        assert on_disk["config_hash"] == row["config_hash"]
    full, lora, lorafa = rows["full"], rows["lora"], rows["lorafa"]
    assert full["trainable_params"] > lora["trainable_params"] > lorafa["trainable_params"] > 0
    assert lorafa["mem_activations_gib"] < lora["mem_activations_gib"]
    assert lorafa["mem_optimizer_gib"] < lora["mem_optimizer_gib"] < full["mem_optimizer_gib"]
    assert lorafa["mem_weights_gib"] == lora["mem_weights_gib"] > full["mem_weights_gib"]
    assert lorafa["adapted_layers"] == lora["adapted_layers"] > 0 == full["adapted_layers"]


def _job_dir(row):
    import json

    return json.loads(row["config"])["output_dir"]


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_synthetic_batches_have_the_exact_size(cfg_factory, model):
    row = run(cfg_factory(f"model={model}", "task=synthetic", "task.max_seq_len=32", "task.target_len=16",
                          "train.batch_size=4", "train.max_steps=4", "train.measure_warmup_steps=1"))
    assert row["status"] == "ok", row["error"]
    assert row["metric"] == "loss" and row["score"] == row["eval_loss"] > 0
    per_step = {"tiny-roberta": 4 * 32, "tiny-t5": 4 * (32 + 16), "tiny-llama": 4 * 32}[model]
    assert row["tokens_per_s"] * row["step_time_s"] == pytest.approx(per_step)


def test_lorafa_with_dropout_still_saves_less_than_lora(cfg_factory):
    rows = [run(cfg_factory(f"method={m}", "method.dropout=0.1", "task=synthetic", "train.max_steps=1",
                            "train.batch_size=4")) for m in ("lora", "lorafa")]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[1]["mem_activations_gib"] < rows[0]["mem_activations_gib"]


def test_same_config_and_seed_give_the_same_run(cfg_factory):
    a, b = (run(cfg_factory(*SMALL, "model=tiny-llama")) for _ in range(2))
    assert list(a["loss_curve"]) == list(b["loss_curve"]) and a["score"] == b["score"]  # bit for bit
    metrics = sorted(k for k in a if k.startswith("eval_"))
    assert len(metrics) >= 2 and [a[k] for k in metrics] == [b[k] for k in metrics] and a["eval_history"] == b["eval_history"]
    assert a["config_hash"] == b["config_hash"]
    c = run(cfg_factory(*SMALL, "model=tiny-llama", "seed=1"))
    assert list(c["loss_curve"]) != list(a["loss_curve"])


def test_regression_and_two_eval_splits_from_local_files(cfg_factory, tmp_path):
    pairs = pd.DataFrame({"sentence1": ["a cat sat", "dogs run", "it rains", "sun"] * 6,
                          "sentence2": ["a cat sits", "cats sleep", "it pours", "moon"] * 6,
                          "label": [4.8, 1.0, 3.9, 0.4] * 6})
    nli = pd.DataFrame({"premise": ["p q", "r s", "t u"] * 8, "hypothesis": ["q", "s t", "v"] * 8,
                        "label": [0, 1, 2] * 8})
    for name, frame in (("sts", pairs), ("nli", nli)):
        frame.to_parquet(tmp_path / f"{name}.parquet")
    for model in ("tiny-roberta", "tiny-t5"):
        sts = run(cfg_factory(f"model={model}", "task=glue_stsb", f"task.data_files.train={tmp_path}/sts.parquet",
                              f"task.data_files.validation={tmp_path}/sts.parquet", "train.max_steps=2"))
        assert sts["status"] == "ok", sts["error"]
        assert sts["metric"] == "pearson" and "eval_spearman" in sts
    mnli = run(cfg_factory("model=tiny-llama", "task=glue_mnli", f"task.data_files.train={tmp_path}/nli.parquet",
                           f"task.data_files.validation_matched={tmp_path}/nli.parquet",
                           f"task.data_files.validation_mismatched={tmp_path}/nli.parquet", "train.max_steps=2"))
    assert mnli["status"] == "ok", mnli["error"]
    assert mnli["metric"] == "accuracy_m" and {"eval_accuracy_m", "eval_accuracy_mm", "eval_loss"} <= set(mnli)
    assert mnli["eval_accuracy_m"] == mnli["eval_accuracy_mm"]  # same file for both


def test_local_checkpoint_with_text_cls(cfg_factory, tmp_path):
    """model=local + task=text_cls: a saved checkpoint (here a tiny GPT-2) and a csv with integer labels."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafa.sources import asset

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               bos_token_id=0, eos_token_id=2)).save_pretrained(tmp_path / "gpt")
    pd.DataFrame({"text": ["great", "awful", "superb", "dull"] * 5, "label": [1, 0, 1, 0] * 5}).to_csv(
        tmp_path / "d.csv", index=False)
    row = run(cfg_factory("model=local", f"model.path={tmp_path / 'gpt'}",
                          f"model.tokenizer={asset('tokenizers/tiny-llama')}", "task=text_cls",
                          f"task.data_files.train={tmp_path / 'd.csv'}",
                          f"task.data_files.validation={tmp_path / 'd.csv'}", "train.max_steps=3"))
    assert row["status"] == "ok", row["error"]
    assert row["family"] == "decoder" and row["model"] == "gpt" and row["adapted_layers"] == 2 * 4


def test_gradient_accumulation_matches_the_larger_batch(cfg_factory):
    """bs 4 × accum 2 and bs 8 × accum 1 see the same examples per step: same loss curve (no dropout)."""
    no_dropout = ("model.arch.hidden_dropout_prob=0", "model.arch.attention_probs_dropout_prob=0", "method=full")
    small = ("task.max_train_samples=48", "task.max_eval_samples=8", "train.max_steps=4")
    a = run(cfg_factory(*no_dropout, *small, "train.batch_size=4", "train.grad_accum=2"))
    b = run(cfg_factory(*no_dropout, *small, "train.batch_size=8", "train.grad_accum=1"))
    assert a["status"] == b["status"] == "ok"
    assert a["loss_curve"] == pytest.approx(b["loss_curve"], rel=1e-4)
    assert a["samples_per_s"] * a["step_time_s"] == pytest.approx(8)


def test_eval_after_each_epoch_and_at_the_end(cfg_factory):
    row = run(cfg_factory("task.max_train_samples=32", "task.max_eval_samples=8", "train.batch_size=8",
                          "train.epochs=2"))
    import json

    history = json.loads(row["eval_history"])
    assert [h["step"] for h in history] == [4, 8] and [h["epoch"] for h in history] == [1, 2]
    assert row["epochs_completed"] == 2 and row["score"] == history[-1]["accuracy"]


@pytest.mark.fault("a NaN/inf loss or gradient")
def test_nan_loss_stops_the_job_as_diverged(cfg_factory):
    row = run(cfg_factory("+model.arch.initializer_range=1e30", *SMALL))  # overflowing weights: NaN at once
    assert row["status"] == "diverged", row["error"]
    assert row["error"] == "training loss is nan at step 0"
    assert row["trainable_params"] > 0 and row["family"] == "encoder"  # what was known before is kept


@pytest.mark.fault("a NaN/inf loss or gradient")
def test_non_finite_gradients_stop_the_job_before_the_update(cfg_factory, monkeypatch):
    """A finite loss with an inf/NaN gradient would turn every weight and Adam moment into NaN at the update (even at
    lr 0); the job stops as diverged at that step instead, naming the gradient."""
    import torch

    real = torch.nn.utils.clip_grad_norm_

    def inf_norm(params, max_norm):
        real(params, max_norm)
        return torch.tensor(float("inf"))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_norm)
    row = run(cfg_factory(*SMALL))
    assert row["status"] == "diverged" and row["error"].startswith("gradient norm is inf at step 0 (loss ")


@pytest.mark.fault("any other exception")
def test_any_other_exception_is_a_failed_row_with_its_traceback_beside_it(cfg_factory, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("cuBLAS said no")

    monkeypatch.setattr("lorafa.job.fit", broken)
    cfg = cfg_factory(*SMALL)
    row = run(cfg)
    assert row["status"] == "failed" and row["error"] == "RuntimeError: cuBLAS said no"
    trace = (Path(cfg.output_dir) / "traceback.txt").read_text()
    assert "Traceback" in trace and "in broken" in trace and "cuBLAS said no" in trace
    assert pd.read_parquet(Path(cfg.output_dir) / "result.parquet").iloc[0]["status"] == "failed"
    assert "score" not in row  # nothing was scored: no number made up
    assert row["trainable_params"] > 0  # what was known before the failure is kept


@pytest.mark.fault("out of memory")
def test_out_of_memory_becomes_a_row(cfg_factory, monkeypatch):
    import torch

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB.")

    monkeypatch.setattr("lorafa.job.fit", oom)
    row = run(cfg_factory(*SMALL))
    assert row["status"] == "oom" and row["error"].startswith("CUDA out of memory")
    assert pd.read_parquet(cfg_factory.root / "job0" / "result.parquet").iloc[0]["status"] == "oom"  # written
    assert row["mem_weights_gib"] > 0  # what was measured before the failure is kept


@pytest.mark.fault("out of memory")
@pytest.mark.parametrize("error", ["oom", "diverged", "failed"])
def test_a_failed_jobs_model_is_freed_even_when_its_exception_lives_on(cfg_factory, monkeypatch, error):
    """PyTorch's autograd engine can keep an exception raised inside a CUDA backward alive after the job handled it
    (with its traceback). Simulated here by keeping every exception raised: the failed job's model must still be
    freed, so that the next job of a sweep does not count it (a real CUDA OOM left 0.65 GiB behind before)."""
    import gc
    import weakref

    import torch

    from lorafa.train import Diverged

    kept, refs = [], []

    def failing(model, *a, **k):
        refs.append(weakref.ref(model))
        activations = torch.ones(64, 64, requires_grad=True) * 2  # noqa: F841 - a local the traceback holds
        err = {"oom": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB."),
               "diverged": Diverged("training loss is nan at step 3"), "failed": RuntimeError("boom")}[error]
        kept.append(err)
        raise err

    monkeypatch.setattr("lorafa.job.fit", failing)
    row = run(cfg_factory(*SMALL))
    assert row["status"] == error and kept and kept[0].__traceback__ is not None
    gc.collect()
    assert refs[0]() is None, "the failed job's model is still alive"


@pytest.mark.fault("out of memory")
@pytest.mark.parametrize("loss", ["transformers", "fused"])
@pytest.mark.parametrize("plan", ["plain", "offload"])
def test_an_out_of_memory_in_the_loss_leaves_nothing_behind(cfg_factory, monkeypatch, plan, loss):
    """An out-of-memory in the loss (where a real one struck: the logits' fp32 copy; transformers' loss, or the
    fused one's first slice) ends the measured step's forward before its backward. The saved-tensor hooks that
    count (or offload) what the forward keeps must not tie the activations to their own graph: a cycle through
    autograd's C++ graph that Python cannot collect, which kept the model and its activations for the rest of the
    process (0.65 GiB on an H200 at the next job)."""
    import gc

    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensor

    def struck(real, only_with_grad: bool):
        def op(logits, *a, **k):
            if (not isinstance(logits, FakeTensor) and logits.device.type != "meta"
                    and (torch.is_grad_enabled() or not only_with_grad)):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB.")
            return real(logits, *a, **k)
        return op

    def alive():  # LLaMA models, and tensors of an autograd graph (earlier tests may have left some: not ours)
        gc.collect()
        objects = gc.get_objects()
        return ([o for o in objects if isinstance(o, torch.nn.Module) and type(o).__name__ == "LlamaForCausalLM"],
                [o for o in objects if isinstance(o, torch.Tensor) and o.grad_fn is not None])

    if loss == "transformers":
        monkeypatch.setattr(F, "cross_entropy", struck(F.cross_entropy, True))
    else:  # (inside the fused loss's autograd function, where gradients are off: its first slice's logsumexp)
        from lorafa import loss as fused_loss

        monkeypatch.setattr(fused_loss, "_logsumexp", struck(fused_loss._logsumexp, False))
    extra = ["method.offload=true", "method.offload_min_kib=0"] if plan == "offload" else []
    extra += ["model.fused_loss=false"] if loss == "transformers" else []
    models_before, graphs_before = alive()  # held (so no id of theirs is reused) until the check
    row = run(cfg_factory("model=tiny-llama", "method=lorafa", "task=synthetic", "task.max_seq_len=64",
                          "train.batch_size=4", "train.max_steps=2", *extra))
    assert row["status"] == "oom", row["error"]
    models, graphs = alive()
    seen = {id(o) for o in models_before + graphs_before}
    left = [type(o).__name__ for o in models if id(o) not in seen]
    graphs = [tuple(o.shape) for o in graphs if id(o) not in seen]
    assert not left and not graphs, (left, graphs[:5])


def test_gradient_checkpointing_same_losses_less_activation_memory(cfg_factory):
    common = ("model=tiny-llama", "method=lorafa", "method.dropout=0.1", *SMALL)
    plain = run(cfg_factory(*common))
    ckpt = run(cfg_factory(*common, "method.gradient_checkpointing=true"))
    assert plain["status"] == ckpt["status"] == "ok"
    assert ckpt["loss_curve"] == pytest.approx(plain["loss_curve"], rel=1e-5)  # same dropout masks, recomputed
    assert ckpt["mem_activations_gib"] < plain["mem_activations_gib"]


def test_lorafa_v2_runs_with_lorafa_memory(cfg_factory):
    v1, v2 = (run(cfg_factory(f"method={m}", *SMALL)) for m in ("lorafa", "lorafa_v2"))
    assert v1["status"] == v2["status"] == "ok"
    assert v2["mem_activations_gib"] == v1["mem_activations_gib"]
    assert v2["trainable_params"] == v1["trainable_params"]
    assert v2["loss_curve"][0] == v1["loss_curve"][0] and v2["loss_curve"][1:] != v1["loss_curve"][1:]


def test_frozen_weights_in_the_compute_dtype(cfg_factory):
    """bf16 autocast (here on CPU): frozen weights held in bf16 halve their bytes and stop autocast's copies."""
    common = ("model=tiny-llama", "method=lorafa", "task=synthetic", "train.max_steps=1", "train.precision=bf16")
    fp32 = run(cfg_factory(*common, "train.frozen_dtype=float32"))
    bf16 = run(cfg_factory(*common))  # frozen_dtype=auto → the autocast dtype
    assert fp32["status"] == bf16["status"] == "ok"
    assert bf16["frozen_dtype"] == "bfloat16" and fp32["frozen_dtype"] == "float32"
    assert bf16["mem_weights_gib"] < 0.6 * fp32["mem_weights_gib"]
    assert bf16["mem_activations_gib"] < fp32["mem_activations_gib"]


def test_a_frozen_base_is_built_in_its_frozen_dtype_and_what_trains_in_fp32(cfg_factory, monkeypatch):
    """Where the base stays frozen in bf16 (LoRA, LoRA-FA under bf16 autocast), the model is built in bf16: built
    in fp32 and cast after, llama-7b held 25 GiB at once, more than the budget of a 24 GB card (the job ran out of
    memory before its first step under a 22 GiB cap). What trains — the adapters and the classification head —
    is still fp32; full fine-tuning is built in fp32."""
    from lorafa import methods, models

    built, applied = [], []
    build, apply = models.build, methods.apply

    def recorded_build(*args, **kwargs):
        if kwargs.get("weights", True):  # (the job's model, not the predictor's on fake tensors)
            built.append(kwargs["dtype"])
        return build(*args, **kwargs)

    def recorded_apply(net, *args, **kwargs):
        out = apply(net, *args, **kwargs)
        applied.append({n: p.dtype for n, p in net.model.named_parameters()})
        return out

    monkeypatch.setattr(models, "build", recorded_build)
    monkeypatch.setattr(methods, "apply", recorded_apply)
    common = ("model=tiny-roberta", "task=synthetic", "train.max_steps=2", "train.precision=bf16")
    for method in ("lorafa", "lora", "full"):
        row = run(cfg_factory(*common, f"method={method}"))
        assert row["status"] == "ok", row["error"]
        dtypes = applied[-1]
        if method == "full":
            assert built[-1] == torch.float32 and set(dtypes.values()) == {torch.float32}
            continue
        assert built[-1] == torch.bfloat16, method
        trains = {n for n, d in dtypes.items() if "lora_B" in n or "classifier" in n
                  or (method == "lora" and "lora_A" in n)}
        assert trains and all(dtypes[n] == torch.float32 for n in trains), method
        assert all(d == torch.bfloat16 for n, d in dtypes.items() if n not in trains), method
    row = run(cfg_factory(*common, "method=lorafa", "train.frozen_dtype=float32"))
    assert row["status"] == "ok" and built[-1] == torch.float32


def test_save_adapter_writes_peft_files(cfg_factory):
    row = run(cfg_factory(*SMALL, "train.save_adapter=true"))
    assert row["status"] == "ok", row["error"]
    import json
    from pathlib import Path

    config = json.loads((Path(row["adapter_dir"]) / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and len(config["target_modules"]) == 12
    assert config["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_frozen_model_is_the_activation_lower_bound(cfg_factory, model):
    common = (f"model={model}", "task=synthetic", "task.max_seq_len=32", "task.target_len=16", "train.batch_size=4",
              "train.max_steps=2", "train.measure_warmup_steps=0")
    frozen = run(cfg_factory(*common, "method=frozen"))
    lorafa = run(cfg_factory(*common, "method=lorafa"))
    lora = run(cfg_factory(*common, "method=lora"))
    assert frozen["status"] == lorafa["status"] == lora["status"] == "ok"
    head = {"tiny-roberta": frozen["trainable_params"], "tiny-t5": 0, "tiny-llama": 0}[model]
    assert frozen["trainable_params"] == head and (head > 0) == (model == "tiny-roberta")
    if head == 0:  # nothing to optimise: backward runs for its memory, no optimizer state
        assert frozen["mem_optimizer_gib"] == 0 and frozen["mem_grads_gib"] == 0
    # LoRA-FA keeps what the frozen network keeps (give or take the first block, whose input needs no grad
    # under LoRA-FA) plus N × r per adapted layer; LoRA keeps every adapted layer's input on top
    assert lorafa["mem_activations_gib"] == pytest.approx(frozen["mem_activations_gib"], rel=0.05)
    assert lora["mem_activations_gib"] > 1.1 * frozen["mem_activations_gib"]


@pytest.mark.fault("a job killed mid-run, resumed")
@pytest.mark.bad_input("a checkpoint train.resume cannot continue")
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_a_killed_run_resumed_from_its_checkpoint_is_the_uninterrupted_run(tmp_path, monkeypatch, impl):
    """12 steps over 2 epochs, checkpoints every 4, killed during step 9: the resumed run (train.resume=true, same
    job dir) continues from step 8 — mid-epoch — and its loss curve and scores equal the uninterrupted run's
    exactly (LoRA-FA with adapter dropout: the RNG and the data order are restored too). `fused`: the loop of a CUDA
    job, whose losses stay on the device between reads (`train.log_every`)."""
    from lorafa import measure
    from lorafa.job import run

    common = ["model=tiny-roberta", "method=lorafa", "task.max_train_samples=48", "task.max_eval_samples=32",
              "train.batch_size=8", "train.epochs=2", "train.checkpoint_every=4", "method.dropout=0.1",
              f"train.optimizer_impl={impl}", "train.log_every=5"]
    straight = run(compose_cfg(common, tmp_path / "straight"))
    assert straight["status"] == "ok" and straight["train_steps"] == 12

    calls = {"n": 0}
    real_add = measure.Throughput.add  # called once a step

    def killed_at_step_9(self, *args):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("killed")
        return real_add(self, *args)

    monkeypatch.setattr(measure.Throughput, "add", killed_at_step_9)
    first = run(compose_cfg(common, tmp_path / "resumed"))
    assert first["status"] == "failed" and "killed" in first["error"]
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()

    def counted(self, *args):
        calls["n"] += 1
        return real_add(self, *args)

    calls["n"] = 0
    monkeypatch.setattr(measure.Throughput, "add", counted)
    resumed = run(compose_cfg([*common, "train.resume=true"], tmp_path / "resumed"))
    assert calls["n"] == 4  # steps 9–12 only: it continued, it did not start over
    assert resumed["status"] == "ok" and resumed["train_steps"] == 12 and resumed["epochs_completed"] == 2
    assert list(resumed["loss_curve"]) == list(straight["loss_curve"])
    assert resumed["score"] == straight["score"] and resumed["eval_loss"] == straight["eval_loss"]
    assert resumed["eval_history"] == straight["eval_history"]
    assert resumed["mem_activations_gib"] == straight["mem_activations_gib"]  # measured at step 0, kept
    from lorafa.checks import BadInput

    state = (tmp_path / "resumed" / "checkpoint" / "state.pt").read_bytes()
    with pytest.raises(BadInput, match="written by a job with another config"):  # never continues another job
        run(compose_cfg([*common, "train.resume=true", "train.lr=3e-3"], tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").read_bytes() == state  # refused, nothing touched


def test_linear_schedule_is_transformers_linear_schedule_with_warmup():
    """`train.linear_schedule` (written out so a job need not import transformers.optimization, which imports
    PEFT) gives transformers' `get_linear_schedule_with_warmup` learning rates step for step."""
    from transformers import get_linear_schedule_with_warmup

    from lorafa.train import linear_schedule

    for warmup, steps in ((0, 7), (3, 10), (10, 10), (4, 3)):
        ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5) for _ in range(2))
        a, b = linear_schedule(ours, warmup, steps), get_linear_schedule_with_warmup(theirs, warmup, steps)
        for _ in range(steps + 2):
            assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"], (warmup, steps)
            ours.step(), theirs.step(), a.step(), b.step()


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-llama"])
def test_compiled_blocks_train_like_eager_and_keep_the_activation_accounting(cfg_factory, model):
    """`train.compile=blocks`: every transformer block compiled for training, the same loss curve as eager,
    evaluation eager, and the activation accounting still sees what backward keeps: the compiled graphs' saved
    tensors pass through the saved-tensor hooks. A compiled graph may keep less than eager autograd does (its
    partitioner chooses what to keep; measured 85-91 % of eager here), never more.
    aot_eager: torch.compile's graph capture and autograd without code generation (inductor's numerics are tested
    on the LoRA-FA layers, `test_adapters`), to keep CI in minutes."""
    common = [f"model={model}", "method=lorafa", "method.stacked=merged", "task=synthetic", "task.max_seq_len=32",
              "train.batch_size=4", "train.max_steps=4", "train.lr=1e-2"]
    from torch._dynamo.utils import counters

    eager = run(cfg_factory(*common))
    counters.clear()
    compiled = run(cfg_factory(*common, "train.compile=blocks", "train.compile_backend=aot_eager"))
    assert counters["stats"]["unique_graphs"] >= 1  # compiled code ran
    assert eager["status"] == compiled["status"] == "ok"
    assert eager["compiled_blocks"] == 0 and compiled["compiled_blocks"] == 2  # the tiny models' two blocks
    np.testing.assert_allclose(compiled["loss_curve"], eager["loss_curve"], rtol=1e-5)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-5)
    assert 0.5 * eager["mem_activations_gib"] < compiled["mem_activations_gib"] <= eager["mem_activations_gib"]


def test_compiled_blocks_with_seeded_dropout_train_like_eager(cfg_factory):
    """LoRA-FA's adapter dropout and element-wise recomputation's dropout draw a seed per call on the host. Under
    `train.compile=blocks` each draw runs eager inside the block (a graph break), so the seed never becomes a
    constant of compiled code: otherwise every draw compiled the code after it again and the job failed at
    torch.compile's recompile limit within a few steps (roberta-large, dropout 0.1, on an H200). Same masks, same
    loss curve as eager."""
    from torch._dynamo.utils import counters

    common = ["model=tiny-roberta", "method=lorafa", "method.dropout=0.1", "method.recompute=elementwise",
              "task=synthetic", "task.max_seq_len=32", "train.batch_size=4", "train.max_steps=30", "train.lr=1e-2"]
    eager = run(cfg_factory(*common))
    counters.clear()
    compiled = run(cfg_factory(*common, "train.compile=blocks", "train.compile_backend=aot_eager"))
    assert compiled["status"] == "ok", compiled["error"]
    assert compiled["compiled_blocks"] == 2 and counters["stats"]["unique_graphs"] >= 1
    assert counters["stats"]["unique_graphs"] < 64  # a handful per block code path, not one per draw
    np.testing.assert_allclose(compiled["loss_curve"], eager["loss_curve"], rtol=1e-5)
    assert len(eager["loss_curve"]) == 30


@pytest.mark.bad_input("a step option out of its values")
def test_train_compile_refuses_what_it_does_not_do(cfg_factory):
    from lorafa.checks import BadInput, check_config

    with pytest.raises(BadInput, match=r"^train.compile=everything: expected auto, none, blocks, graph or "
                                       r"eager_graph$"):
        check_config(cfg_factory("train.compile=everything"))
    with pytest.raises(BadInput, match=r"train.strategy=fsdp"):
        check_config(cfg_factory("train.compile=blocks", "train.strategy=fsdp"))
    with pytest.raises(BadInput, match=r"^train.compile=graph: not possible here: device cpu"):
        run(cfg_factory("train.compile=graph", "train.max_steps=1"))  # refused before any row
