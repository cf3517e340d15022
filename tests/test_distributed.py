"""Several processes, one job (`train.strategy`, lorafa/distributed.py): the batch arithmetic, the launch errors,
FSDP's units, and a real 2-process torchrun run on CPU (gloo) that must equal the single-process run."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lorafa import distributed, job, models
from lorafa.distributed import Dist

from .conftest import ROOT, compose_cfg, undocumented

# dropout off everywhere, so a 2-process run and a 1-process run draw nothing that differs
EXACT = ["model=tiny-roberta", "method=lorafa", "task=movie_polarity", "task.max_train_samples=60",
         "task.max_eval_samples=32", "train.max_steps=6", "model.arch.hidden_dropout_prob=0",
         "model.arch.attention_probs_dropout_prob=0", "method.dropout=0", "train.measure_warmup_steps=1"]


@pytest.mark.parametrize("n, world", [(8, 2), (7, 2), (5, 3), (2, 2)])
def test_shards_cover_a_micro_batch_once_in_order(n, world):
    idx = list(range(100, 100 + n))
    parts = [distributed.shard(idx, Dist("ddp", r, world)) for r in range(world)]
    assert [i for p in parts for i in p] == idx and max(map(len, parts)) - min(map(len, parts)) <= 1 and all(parts)


def test_micro_batches_are_global_and_drop_only_a_tail_too_small_to_share():
    order = list(range(11))
    assert distributed.micro_batches(order, 4, distributed.SINGLE) == [order[0:4], order[4:8], order[8:11]]
    two = Dist("ddp", 0, 2)
    assert distributed.micro_batches(order, 2, two) == [order[0:4], order[4:8], order[8:11]]
    assert distributed.micro_batches(list(range(9)), 2, two) == [list(range(4)), list(range(4, 8))]  # 1 left: dropped


def test_launch_errors_are_clear(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="train.strategy='zero3': expected one of single, ddp, fsdp"):
        distributed.setup("zero3", "cpu")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N run.py"):
        distributed.setup("fsdp", "cpu")
    assert distributed.setup("single", "cpu") == (distributed.SINGLE, torch.device("cpu"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes but train.strategy=single"):
        distributed.setup("single", "cpu")


def test_a_distributed_job_outside_torchrun_fails_before_writing_anything(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    cfg = compose_cfg(["train.strategy=ddp"], tmp_path / "job")
    with pytest.raises(ValueError, match="torchrun"):
        job.run(cfg)
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("name, lists, blocks, others", [
    ("tiny-roberta", ["roberta.encoder.layer"], 2, ["roberta.embeddings"]),
    ("tiny-t5", ["encoder.block", "decoder.block"], 4, []), ("tiny-llama", ["model.layers"], 2, []),
    ("llama-7b", ["model.layers"], 32, []), ("t5-large", ["encoder.block", "decoder.block"], 48, [])])
def test_fsdp_units_are_the_transformer_blocks(name, lists, blocks, others, monkeypatch):
    """The units are the model's `_no_split_modules` (what accelerate's FSDP wraps): the blocks of its layer lists,
    plus RoBERTa's embeddings; `fully_shard` goes on each of them, then on the root."""
    mcfg = compose_cfg([f"model={name}", "model.init=random"]).model
    model = models.build(mcfg, num_labels=2, device="meta", dtype=torch.float32).model
    listed = [m for path in lists for m in model.get_submodule(path)]
    assert len(listed) == blocks
    found = distributed.transformer_blocks(model)
    assert [id(b) for b in found] == [id(b) for b in listed]  # the blocks, each once, in order
    assert all(type(b).__name__.endswith(("Layer", "Block", "DecoderLayer")) for b in found)
    units = distributed.fsdp_units(model)
    assert {id(u) for u in units} == {id(b) for b in listed} | {id(model.get_submodule(p)) for p in others}
    assert len(units) == blocks + len(others)
    assert {type(u).__name__ for u in units} == set(model._no_split_modules)
    sharded = []
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", sharded.append)
    assert distributed.wrap(model, Dist("fsdp", 0, 2), torch.device("cpu")) is model
    assert [id(m) for m in sharded] == [id(u) for u in reversed(units)] + [id(model)]
    # a model that names no `_no_split_modules` (DistilBERT, DeBERTa …): the blocks of its layer lists
    monkeypatch.setattr(model, "_no_split_modules", None, raising=False)
    assert [id(u) for u in distributed.fsdp_units(model)] == [id(b) for b in listed]
    assert [id(b) for b in distributed.transformer_blocks(model)] == [id(b) for b in listed]


def test_job_memory_is_per_gpu_max_and_job_sum(monkeypatch):
    cols = {"mem_weights_gib": 1.0, "mem_grads_gib": 0.5, "mem_optimizer_gib": 1.0, "mem_activations_gib": 2.0,
            "mem_peak_gib": 4.0, "mem_source": "cuda_allocator", "alloc_peak_gib": 4.0}
    other = {**cols, "mem_activations_gib": 3.0, "mem_peak_gib": 5.0, "alloc_peak_gib": 5.0}
    monkeypatch.setattr(distributed, "gather", lambda obj, d: [obj, {k: v for k, v in other.items()
                                                                     if isinstance(v, float)}])
    out = distributed.job_memory(cols, Dist("fsdp", 0, 2))
    assert out["mem_peak_gib"] == 5.0 and out["mem_activations_gib"] == 3.0 and out["alloc_peak_gib"] == 5.0
    assert out["job_mem_peak_gib"] == 9.0 and out["job_mem_weights_gib"] == 2.0
    assert out["mem_peak_ranks_gib"] == [4.0, 5.0] and out["mem_source"] == "cuda_allocator"
    assert distributed.job_memory(cols, distributed.SINGLE) == cols


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 run.py -m train.strategy=ddp,fsdp` (gloo) with 2 × 4 examples a step gives the
    single-process run's loss curve and eval loss with 8 a step; process 0 writes one row per job, and memory
    comes per process and for the job (FSDP: each process holds half the weights)."""
    single = job.run(compose_cfg([*EXACT, "train.batch_size=8"], tmp_path / "single"))
    assert single["status"] == "ok" and single["strategy"] == "single" and single["world_size"] == 1
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "run.py"), "-m", *EXACT, "train.batch_size=4", "train.strategy=ddp,fsdp",
                           "train.progress=false", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = pd.read_parquet(sweep / "results.parquet").sort_values("strategy")
    assert list(table["strategy"]) == ["ddp", "fsdp"] and set(table["world_size"]) == {2}
    assert len(list(sweep.rglob("result.parquet"))) == 2  # one row per job, not per process
    for _, row in table.iterrows():
        assert row["status"] == "ok", row["error"]
        assert row["train_examples"] == single["train_examples"] and row["train_steps"] == 6
        np.testing.assert_allclose(row["loss_curve"], single["loss_curve"], rtol=1e-5)
        np.testing.assert_allclose(row["eval_loss"], single["eval_loss"], rtol=1e-5)
        assert row["score"] == single["score"]
        assert len(row["mem_peak_ranks_gib"]) == 2 and row["job_mem_peak_gib"] == pytest.approx(
            sum(row["mem_peak_ranks_gib"]))
        assert np.isnan(row["pred_mem_peak_gib"]) and "not predicted" in row["pred_error"]
        assert not undocumented(row.to_dict()), undocumented(row.to_dict())
    ddp, fsdp = table.iloc[0], table.iloc[1]
    assert ddp["mem_weights_gib"] == pytest.approx(single["mem_weights_gib"])  # every process: the whole model
    assert ddp["job_mem_weights_gib"] == pytest.approx(2 * single["mem_weights_gib"])
    assert fsdp["mem_weights_gib"] == pytest.approx(single["mem_weights_gib"] / 2, rel=0.02)  # sharded
    assert fsdp["mem_optimizer_gib"] == pytest.approx(single["mem_optimizer_gib"] / 2, rel=0.05)


@pytest.mark.fault("a fault on one of several processes")
def test_the_job_status_is_the_worst_of_its_processes(monkeypatch):
    two = Dist("fsdp", 0, 2)
    monkeypatch.setattr(distributed, "gather", lambda obj, d: [("ok", ""), ("oom", "CUDA out of memory")])
    assert distributed.agree("ok", "", two) == ("oom", "rank 1: CUDA out of memory")
    monkeypatch.setattr(distributed, "gather", lambda obj, d: [("diverged", "loss is nan"), ("diverged", "loss is nan")])
    assert distributed.agree("diverged", "loss is nan", two) == ("diverged", "rank 0: loss is nan")
    monkeypatch.setattr(distributed, "gather", lambda obj, d: [("ok", ""), ("ok", "")])
    assert distributed.agree("ok", "", two) == ("ok", "")
    assert distributed.agree("failed", "x", distributed.SINGLE) == ("failed", "x")


@pytest.mark.slow
def test_torchrun_fsdp_instruction_tuning_scores_mmlu_once(tmp_path):
    """The instruction-tuning pipeline past one process: alpaca_mmlu_sample under FSDP (gloo), lm-eval run by every process on
    the sharded model (each sees itself as the only one), one row and one per-subject file, written by process 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "run.py"), "model=tiny-llama", "method=lorafa", "task=alpaca_mmlu_sample",
                           "train.strategy=fsdp", "train.max_steps=3", "train.batch_size=2", "train.progress=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(jobs) == 1, jobs  # Hydra's clock-named directory of process 0 only (process 1's, if apart, removed)
    row = pd.read_parquet(jobs[0] / "result.parquet").iloc[0]
    assert row["status"] == "ok" and row["metric"] == "mmlu_acc" and row["strategy"] == "fsdp", row["error"]
    assert 0 <= row["score"] <= 1 and row["mmlu_examples"] == 14
    assert (jobs[0] / "mmlu_subjects.json").is_file()


# run.py as torchrun launches it, with `measure.Throughput.add` (called once an optimizer step, with its 0-based
# index) wrapped: every process appends the step's index to <STEP_LOG>.rank<RANK>, and at step KILL_AT it kills
# itself (SIGKILL: nothing caught, nothing written, as a preempted job dies). A test hook from outside, so the
# production code carries none.
WRAPPED_RUN = """\
import os, runpy, signal, sys

sys.path.insert(0, {root!r})  # where run.py, launched directly, would find lorafa
from lorafa import measure

real_add = measure.Throughput.add
log = os.environ["STEP_LOG"] + ".rank" + os.environ["RANK"]
kill_at = int(os.environ.get("KILL_AT", "-1"))


def add(self, step, *args):
    with open(log, "a") as f:
        f.write(f"{{step}}\\n")
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_add(self, step, *args)


measure.Throughput.add = add
sys.argv[0] = {run_py!r}
runpy.run_path({run_py!r}, run_name="__main__")
"""


@pytest.mark.fault("a job killed mid-run, resumed")
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_resume_continues_the_same_run(tmp_path, strategy):
    """DDP and FSDP checkpoints (torch.distributed.checkpoint: every process writes its share — FSDP's shards —
    and process 0 every process's RNG state) and resume: a job killed (SIGKILL, both processes) during step 5,
    after its step-3 checkpoint, and resumed (train.resume=true, same job dir) takes steps 4-6 only, and its loss
    curve and scores equal the uninterrupted job's. Dropout on: the two processes' dropout streams differ. Resumed
    on one process instead, the 2-process checkpoint is refused in one line (bad input), left as it is."""
    wrapper = tmp_path / "wrapped_run.py"
    wrapper.write_text(WRAPPED_RUN.format(root=str(ROOT), run_py=str(ROOT / "run.py")))
    args = ["model=tiny-roberta", "method=lorafa", "task=movie_polarity", "task.max_train_samples=60",
            "task.max_eval_samples=16", "train.max_steps=6", "train.batch_size=4", f"train.strategy={strategy}",
            "train.checkpoint_every=3", "train.progress=false"]

    def torchrun(launch: str, job_dir: str, *extra: str, kill_at: int = -1):
        """One 2-process launch into `job_dir`: (the process, the step indices each process took)."""
        log = tmp_path / f"steps-{launch}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "STEP_LOG": str(log),
               "KILL_AT": str(kill_at)}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               "2", str(wrapper), *args, f"hydra.run.dir={tmp_path / job_dir}", *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
        steps = [[int(x) for x in Path(f"{log}.rank{r}").read_text().split()]
                 if Path(f"{log}.rank{r}").is_file() else [] for r in range(2)]
        return proc, steps

    proc, steps = torchrun("whole", "whole")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert steps == [list(range(6))] * 2, steps
    whole = pd.read_parquet(tmp_path / "whole" / "result.parquet").iloc[0]
    assert whole["status"] == "ok", whole["error"]

    proc, steps = torchrun("killed", "job", kill_at=4)  # killed during step 5 (index 4), before its loss is read
    assert proc.returncode != 0, "the killed job finished"
    # process 0 took steps 0-4 and died; process 1 too, or was stopped by torchrun just before its step-4 record
    assert steps[0] == list(range(5)) and steps[1] in (list(range(4)), list(range(5))), (steps, proc.stderr[-4000:])
    assert not (tmp_path / "job" / "result.parquet").exists()  # it died: no row
    state = torch.load(tmp_path / "job" / "checkpoint" / "state.pt", weights_only=False)
    assert state["history"]["steps"] == 3, state["history"]  # the step-3 checkpoint, the only one it wrote
    assert state["history"]["losses"] == list(whole["loss_curve"][:3])
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["torch"],
                                                            state["rng_ranks"][1]["torch"])

    proc, steps = torchrun("resumed", "job", "train.resume=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert steps == [[3, 4, 5]] * 2, f"the resumed job took steps {steps}, not 3-5: it did not continue at step 4"
    resumed = pd.read_parquet(tmp_path / "job" / "result.parquet").iloc[0]
    assert resumed["status"] == "ok" and resumed["train_steps"] == 6, resumed["error"]
    np.testing.assert_array_equal(resumed["loss_curve"], whole["loss_curve"])
    assert resumed["eval_loss"] == whole["eval_loss"] and resumed["score"] == whole["score"]

    # the same checkpoint on one process: refused in one line, nothing touched
    (tmp_path / "job" / "result.parquet").unlink()
    before = (tmp_path / "job" / "checkpoint" / "state.pt").read_bytes()
    single = [a for a in args if not a.startswith("train.strategy=")]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *single, "train.resume=true",
                           f"hydra.run.dir={tmp_path / 'job'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: train.resume=true: ") and \
        "was written by a job on 2 processes; this one has 1" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert (tmp_path / "job" / "checkpoint" / "state.pt").read_bytes() == before
    assert not (tmp_path / "job" / "result.parquet").exists()
