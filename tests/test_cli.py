"""End-to-end tests of the command line: the README's quickstart, a Hydra multirun, an offline sweep."""

import os
import re
import subprocess
import sys
import time

import pandas as pd
import pytest

from lorafa import results

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _run(args, cwd, env=None, timeout=600):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return proc, time.perf_counter() - started


def test_readme_quickstart_runs_offline_in_under_two_minutes(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^python run\.py$", readme, re.MULTILINE), "the README must show the bare `python run.py`"
    proc, seconds = _run([], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row_file,) = list((tmp_path / "outputs").rglob("result.parquet"))
    row = pd.read_parquet(row_file).iloc[0]
    assert row["status"] == "ok" and row["model"] == "tiny-roberta" and row["method"] == "lorafa"
    assert row["task"] == "movie_polarity" and row["epochs_completed"] == 2 and row["train_examples"] == 8568
    assert row[results.REQUIRED_COLUMNS].notna().all()
    assert seconds < 120, f"the default job took {seconds:.0f} s"


def test_multirun_over_families_and_methods_writes_one_table(tmp_path):
    """The issue's acceptance sweep, verbatim: 9 rows, all ok, all filled, LoRA-FA below LoRA."""
    sweep = tmp_path / "sweep"
    proc, _ = _run(["-m", "model=tiny-roberta,tiny-t5,tiny-llama", "method=full,lora,lorafa", "train.max_steps=20",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 9 and (table["status"] == "ok").all()
    assert table.drop(columns=["error"]).notna().all().all(), table.columns[table.isna().any()].tolist()
    assert (table["error"] == "").all() and table["config_hash"].nunique() == 9
    for model, rows in table.groupby("model"):
        by = rows.set_index("method")
        assert by.loc["lorafa", "mem_activations_gib"] < by.loc["lora", "mem_activations_gib"], model
        assert by.loc["full", "trainable_params"] > by.loc["lora", "trainable_params"] > \
            by.loc["lorafa", "trainable_params"], model
    assert "9 result rows" in proc.stdout  # the sweep's table is printed
    assert results.collect(sweep, write=False).shape == table.shape  # `collect` by hand gives the same table


def test_offline_sweep_records_each_failure_and_ends_normally(tmp_path):
    sweep = tmp_path / "sweep"
    proc, seconds = _run(["-m", "model=roberta-base,t5-large", "method=lora,lorafa", "task=glue_sst2",
                          f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 4 and (table["status"] == "failed").all()
    assert table["error"].str.contains("model.path=").all() and table["error"].str.contains("task.data_files").all()
    assert all((sweep / d / "traceback.txt").exists() for d in table["job_dir"])
    assert seconds < 120


def test_a_single_failed_job_exits_non_zero_but_keeps_its_row(tmp_path):
    proc, _ = _run(["model=roberta-base", "task=glue_sst2"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "job failed" in proc.stderr
    (row_file,) = list((tmp_path / "outputs").rglob("result.parquet"))
    assert pd.read_parquet(row_file).iloc[0]["status"] == "failed"


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from .conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 720 and list(launcher.setup) == []


def test_submitit_local_launcher_runs_a_sweep_and_gathers_its_table(tmp_path):
    """The SLURM path on this machine: each job in its own process through submitit, rows gathered at the end."""
    sweep = tmp_path / "sweep"
    proc, _ = _run(["-m", "hydra/launcher=submitit_local", "model=tiny-roberta", "method=lora,lorafa",
                    "train.max_steps=2", "task.max_train_samples=32", "task.max_eval_samples=16",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(sweep / "results.parquet")
    assert sorted(table["method"]) == ["lora", "lorafa"] and (table["status"] == "ok").all()
    assert (sweep / ".submitit").is_dir() and any((sweep / ".submitit").rglob("*_result.pkl"))
