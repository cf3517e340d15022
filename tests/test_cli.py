"""End-to-end tests of the command line: the README's quickstart, a Hydra multirun, an offline sweep."""

import os
import re
import signal
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


@pytest.mark.fault("a killed sweep, rerun")
def test_multirun_over_families_and_methods_writes_one_table(tmp_path):
    """The README's user sweep over families and methods: 9 rows, all ok, all filled, LoRA-FA below LoRA. It is first killed
    (SIGKILL) in the middle of a job, which leaves no partial row; rerun with the same command and sweep dir, it
    skips the jobs whose row exists and runs the rest: every job exactly once. (Steps and dev examples capped
    to keep CI in minutes: evaluating the 1,000 dev sentences took a third of each job.)"""
    sweep = tmp_path / "sweep"
    args = ["-m", "model=tiny-roberta,tiny-t5,tiny-llama", "method=full,lora,lorafa", "train.max_steps=10",
            "task.max_eval_samples=64", f"hydra.sweep.dir={sweep}"]
    killed = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(sweep.rglob("result.parquet"))) < 2 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # into the next job
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("result.parquet")}
    started = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]
    assert 2 <= len(before) < 9 and len(started) > len(before)  # killed mid-sweep, inside a job that has no row
    for p in before:  # every row that exists is whole
        assert pd.read_parquet(p).iloc[0]["status"] == "ok"
    assert not (sweep / "results.parquet").exists()

    proc, _ = _run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished jobs were skipped, their rows untouched
    assert (proc.stdout + proc.stderr).count("skipped:") == len(before)
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


@pytest.mark.bad_input("the hub out of reach")
def test_offline_sweep_refuses_each_job_in_one_line_runs_the_rest_and_exits_non_zero(tmp_path):
    """The hub out of reach is bad input: each hub job fails fast with the line that says how to use local
    paths, writes no row (its line goes to input_error.txt), the other jobs run, and the sweep exits non-zero."""
    sweep = tmp_path / "sweep"
    proc, seconds = _run(["-m", "model=roberta-base,tiny-roberta", "task=glue_sst2,movie_polarity",
                          "train.max_steps=2", "task.max_eval_samples=32", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "3 job(s) refused for bad input (no row)" in proc.stderr  # roberta-base's weights, glue_sst2's data
    refused = results.bad_inputs(sweep)
    assert len(refused) == 3 and all("model.path=" in m and "task.data_files" in m for m in refused.values())
    assert all("\n" not in m for m in refused.values())
    table = pd.read_parquet(sweep / "results.parquet")  # the one job that needs no hub ran, after refused ones
    assert list(table["model"]) == ["tiny-roberta"] and list(table["task"]) == ["movie_polarity"]
    assert (table["status"] == "ok").all() and len(list(sweep.rglob("result.parquet"))) == 1
    assert seconds < 120


@pytest.mark.bad_input("an unknown model, method, task or experiments option", "method.rank out of range")
def test_a_single_job_with_bad_input_exits_non_zero_with_one_line_and_no_row(tmp_path):
    proc, _ = _run(["method.rank=0"], cwd=tmp_path)
    assert proc.returncode != 0 and proc.stderr.strip() == "error: method.rank=0: expected an integer ≥ 1"
    assert not list(tmp_path.rglob("result.parquet"))
    proc, _ = _run(["-m", "model=tiny-roberta,tiny-bert"], cwd=tmp_path)  # before Hydra composes anything
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: model=tiny-bert: no such option; choices")
    assert not (tmp_path / "multirun").exists() and not list(tmp_path.rglob("result.parquet"))


@pytest.mark.fault("a NaN/inf loss or gradient")
def test_a_single_job_that_faults_exits_non_zero_and_keeps_its_row(tmp_path):
    proc, _ = _run(["+model.arch.initializer_range=1e30", "train.max_steps=2", "task.max_train_samples=16",
                    "task.max_eval_samples=8"], cwd=tmp_path)  # overflowing weights: a NaN loss at once
    assert proc.returncode != 0 and "job diverged: training loss is nan at step 0" in proc.stderr
    (row_file,) = list((tmp_path / "outputs").rglob("result.parquet"))
    assert pd.read_parquet(row_file).iloc[0]["status"] == "diverged"


# run.py with `lorafa.job.fit` wrapped: seed 1 runs out of memory, seed 2 (while FAULTY=1) raises; others train
FAULTY_RUN = """\
import os, runpy, sys

import torch

sys.path.insert(0, {root!r})
from lorafa import job

real_fit = job.fit


def fit(*args, cfg, **kwargs):
    if int(cfg.seed) == 1:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (simulated)")
    if int(cfg.seed) == 2 and os.environ.get("FAULTY") == "1":
        raise RuntimeError("simulated fault")
    return real_fit(*args, cfg=cfg, **kwargs)


job.fit = fit
sys.argv[0] = {run_py!r}
runpy.run_path({run_py!r}, run_name="__main__")
"""


@pytest.mark.fault("out of memory", "any other exception", "faults inside a sweep")
def test_a_sweep_with_an_oom_and_a_failed_job_runs_the_rest_and_exits_non_zero_for_the_failure(tmp_path):
    """Seeds 0-3: 1 out of memory, 2 failed, 0 and 3 train. Every job runs and writes its row, the table holds all
    four, and the sweep exits non-zero naming the failed job (an `oom` is a result, not a fault of the sweep). Rerun
    with the fault gone: the finished jobs are skipped, the failed one runs again, and the sweep exits 0 though its
    table still holds the `oom` row."""
    wrapper = tmp_path / "faulty_run.py"
    wrapper.write_text(FAULTY_RUN.format(root=str(ROOT), run_py=str(ROOT / "run.py")))
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(wrapper), "-m", "seed=0,1,2,3", "train.max_steps=2", "task.max_train_samples=16",
            "task.max_eval_samples=8", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                          env={**env, "FAULTY": "1"})
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "1 job(s) failed (status failed" in proc.stderr and "RuntimeError: simulated fault" in proc.stderr
    table = pd.read_parquet(sweep / "results.parquet").sort_values("seed")
    assert list(table["status"]) == ["ok", "oom", "failed", "ok"], table[["seed", "status", "error"]]
    assert (sweep / "2" / "traceback.txt").is_file()
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(sweep / "results.parquet").sort_values("seed")
    assert list(table["status"]) == ["ok", "oom", "ok", "ok"]
    assert (proc.stdout + proc.stderr).count("skipped: ") == 3  # the final rows (ok, oom) stay; only the failed job ran again


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


def test_ci_installs_and_tests_with_the_readmes_commands_verbatim():
    """CI (`.ci/run`) runs the README's install and test commands line for line, so a missing install step shows;
    the CPU torch pin CI needs lives in its constraints file, not in the command users copy."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install and test", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands and commands[0].startswith("pip install") and commands[-1].startswith("pytest"), commands
    assert "torch==" not in commands[0], "the README's install pins torch: a GPU user would lose their CUDA build"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci, f".ci/run does not run the README's `{command}`"
    pin = ROOT / ".ci" / "constraints.txt"
    export = 'export PIP_CONSTRAINT="$PWD/.ci/constraints.txt"'
    assert export in ci and "torch==" in pin.read_text()
    assert ci.index(export) < ci.index(commands[0])


def test_every_path_the_readme_names_exists_and_every_docs_page_is_in_its_map():
    """The README is the front door: each file or folder it names in backquotes (`docs/…`, `results/…`,
    `experiments/…`, …) exists, every page in docs/ is in its documentation map, and it stays within 200 lines."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    named = set(re.findall(r"`((?:docs|results|experiments|analysis|conf|lorafa|tests|\.ci)/[\w./-]*?)`", readme))
    named |= set(re.findall(r"\]\(((?!https?:)[^)#\s]+)\)", readme))  # markdown links and images
    assert len(named) >= 10, named
    missing = sorted(n for n in named if "*" not in n and not (ROOT / n).exists())
    assert not missing, missing
    for target, anchor in re.findall(r"\]\(((?!https?:)[^)#\s]+\.md)#([^)\s]+)\)", readme):  # GitHub's heading slugs
        headings = re.findall(r"^#+ (.+)$", (ROOT / target).read_text(), re.MULTILINE)
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        assert anchor in slugs, f"README links {target}#{anchor}: no such heading there"
    mapped = set(re.findall(r"^\| `(docs/[\w.-]+\.md)` \|", readme, re.MULTILINE))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages == mapped, f"docs pages not in the README's map: {sorted(pages - mapped)}; gone: {sorted(mapped - pages)}"


def test_no_development_history_in_the_project_text():
    """Users read results, not how they were reached: no issue titles or references to "the issue" anywhere in the
    project's text and code, and no commit hashes in the README or docs/ (a row's commit is its `git_sha`)."""
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "results").rglob("*.md"),
             *(ROOT / "experiments").iterdir(), *(ROOT / "analysis").glob("*.py"), ROOT / "analysis" / "README.md",
             *(ROOT / "lorafa").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "conf").rglob("*.yaml")]
    issue = re.compile(r"\bissue ['\"]|\bthe issue\b|\bissue's\b", re.IGNORECASE)
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts if p.is_file() and p.suffix in (".md", ".py", ".yaml")
             for m in issue.finditer(p.read_text()) if p.name != "test_cli.py"]
    assert not found, found
    hashes = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
              for m in re.finditer(r"`[0-9a-f]{7,40}`", p.read_text())]
    assert not hashes, hashes
