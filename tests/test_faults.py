"""Faults a long sweep meets: a kill in the middle of a write, a full disk, several writers of one results table, a
corrupted or foreign checkpoint, failed jobs inside a sweep. Each leaves the files as they were (or whole) and
says what happened in one line; none leaves half a row."""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from lorafa import measure, results, train
from lorafa.checks import BadInput

from .conftest import ROOT, compose_cfg

CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _row(i: int, writer: int = 0) -> dict:
    return {"config_hash": f"w{writer}-r{i}", "schema_version": results.SCHEMA_VERSION, "writer": writer, "i": i}


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=CHILD_ENV, capture_output=True, text=True, timeout=120,
                          check=False)


# ---- a kill (SIGKILL) in the middle of a write: the file as it was, and no partial file once written again

KILLED_ROW_WRITE = """
import os, signal, pandas as pd
from lorafa import results
def torn(self, path, **kw):
    with open(path, "wb") as f:
        f.write(b"PAR1 half a row")
    os.kill(os.getpid(), signal.SIGKILL)
pd.DataFrame.to_parquet = torn
results.write_row({"config_hash": "second", "schema_version": 1}, %r)
"""


@pytest.mark.fault("a kill during a row write")
def test_a_kill_during_the_row_write_leaves_the_previous_row(tmp_path):
    results.write_row(_row(1), tmp_path)
    proc = _child(KILLED_ROW_WRITE % str(tmp_path))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert pd.read_parquet(tmp_path / results.ROW_FILE).iloc[0]["config_hash"] == "w0-r1"  # intact
    left = list(tmp_path.glob(f".{results.ROW_FILE}.*.tmp"))
    assert len(left) == 1 and left[0].read_bytes() == b"PAR1 half a row"  # a hidden temporary, never the row file
    assert len(results.collect(tmp_path, write=False)) == 1  # a sweep's table never reads it
    results.write_row(_row(2), tmp_path)  # the next write of the same file removes it
    assert pd.read_parquet(tmp_path / results.ROW_FILE).iloc[0]["config_hash"] == "w0-r2"
    assert not list(tmp_path.glob(".*.tmp"))


KILLED_CHECKPOINT_WRITE = """
import os, signal, torch
from pathlib import Path
from torch import nn
from lorafa import measure, train
model = nn.Linear(4, 2)
opt = torch.optim.AdamW(model.parameters())
def save(steps):
    train.save_checkpoint(Path(%r), model, opt, None, torch.Generator(), [0, 1], 1, train.History(steps=steps),
                          measure.Memory())
save(3)
def torn(obj, f, *a, **k):  # whatever is being written (torch.distributed.checkpoint's pieces, state.pt) is cut
    if hasattr(f, "write"):
        f.write(b"half a checkpoint")
    else:
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn
save(6)
"""


@pytest.mark.fault("a kill during a checkpoint write")
def test_a_kill_during_the_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint" / "state.pt"
    proc = _child(KILLED_CHECKPOINT_WRITE % str(path))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.load(path, weights_only=False)["history"]["steps"] == 3  # the step-3 checkpoint, whole
    assert train.checkpoint_path(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.next"]  # the torn one aside
    # the next save replaces the torn folder
    train.save_checkpoint(path, torch.nn.Linear(4, 2), None, None, torch.Generator(), [0], 0,
                          train.History(steps=9), measure.Memory())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert torch.load(path, weights_only=False)["history"]["steps"] == 9


# ---- a full disk (ENOSPC, simulated): a clear error, the previous file intact, no temporary left

@pytest.mark.fault("a full disk")
@pytest.mark.fault("a write that fails")
def test_a_full_disk_fails_the_write_with_a_clear_error_and_keeps_the_previous_files(tmp_path, monkeypatch):
    results.write_row(_row(1), tmp_path)
    ckpt = tmp_path / "checkpoint" / "state.pt"
    model = torch.nn.Linear(4, 2)
    train.save_checkpoint(ckpt, model, None, None, torch.Generator(), [0], 0, train.History(steps=3),
                          measure.Memory())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    with pytest.raises(OSError, match=r"result.parquet not written: No space left on device \(the file as it was "
                                      r"is intact\)") as err:
        results.write_row(_row(2), tmp_path)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"state.pt not written: No space left on device \(the previous checkpoint is "
                                      r"intact\)"):
        train.save_checkpoint(ckpt, model, None, None, torch.Generator(), [0], 0, train.History(steps=6),
                              measure.Memory())
    monkeypatch.undo()
    assert pd.read_parquet(tmp_path / results.ROW_FILE).iloc[0]["config_hash"] == "w0-r1"
    assert torch.load(ckpt, weights_only=False)["history"]["steps"] == 3
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "checkpoint.next").exists()


# ---- several writers appending to one results table at once

def _append_rows(path: str, writer: int, n: int) -> None:
    for i in range(n):  # one row at a time: the most read-add-write cycles
        results.append_rows(pd.DataFrame([_row(i, writer)]), path)


@pytest.mark.fault("several writers of one results table")
@pytest.mark.slow
def test_eight_writers_appending_at_once_lose_no_row(tmp_path):
    path = tmp_path / "results" / "table.parquet"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_rows, args=(str(path), w, 50)) for w in range(8)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(timeout=300)
    assert [p.exitcode for p in writers] == [0] * 8
    table = pd.read_parquet(path)
    assert len(table) == 400 and table["config_hash"].is_unique, len(table)
    assert sorted(map(tuple, table[["writer", "i"]].to_numpy().tolist())) == [(w, i) for w in range(8)
                                                                              for i in range(50)]
    assert not list(path.parent.glob(".*.tmp"))


# ---- a checkpoint that cannot be continued: bad input, one line, nothing overwritten

CKPT_JOB = ["model=tiny-roberta", "method=lorafa", "task=synthetic", "task.max_seq_len=16", "task.num_train=32",
            "train.batch_size=8", "train.max_steps=4", "train.checkpoint_every=2"]


@pytest.fixture
def written_checkpoint(tmp_path):
    """A finished job's directory with its step-2 checkpoint, the row removed (so that the rerun runs)."""
    from lorafa.job import run

    job = tmp_path / "job"
    assert run(compose_cfg(CKPT_JOB, job))["status"] == "ok"
    (job / results.ROW_FILE).unlink()
    return job


@pytest.mark.bad_input("a checkpoint train.resume cannot continue")
@pytest.mark.parametrize("damage", ["truncated", "garbage", "two processes"])
def test_a_checkpoint_that_cannot_be_continued_is_refused_and_left_as_it_is(written_checkpoint, damage):
    from lorafa.job import run

    path = written_checkpoint / train.CHECKPOINT
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        says = "is unreadable"
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint")
        says = "is unreadable"
    else:  # written by a 2-process DDP job
        state = torch.load(path, weights_only=False)
        state["rng_ranks"] = [state["rng"], state["rng"]]
        torch.save(state, path)
        says = "was written by a job on 2 processes; this one has 1 (resume with the same number)"
    before = path.read_bytes()
    with pytest.raises(BadInput) as err:
        run(compose_cfg([*CKPT_JOB, "train.resume=true"], written_checkpoint))
    message = str(err.value)
    assert message.startswith(f"train.resume=true: {path}") and says in message and "\n" not in message, message
    assert path.read_bytes() == before and not (written_checkpoint / results.ROW_FILE).exists()
