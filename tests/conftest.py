"""Shared fixtures: compose the real Hydra config (as run.py does) with overrides, shrunk for CPU tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

import lorafa  # noqa: F401  (registers the ${asset:} resolver)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# local data files go through `datasets`, which caches what it reads: in a directory of this test session (its
# subprocesses inherit it), not the user's ~/.cache/huggingface/datasets
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="lorafa-test-datasets-"))


def compose_cfg(overrides: list[str] | tuple = (), output_dir: Path | str = "/tmp/lorafa-test"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"output_dir={output_dir}", "train.progress=false"])


@pytest.fixture(autouse=True)
def _fresh_predictions(monkeypatch):
    """Each test predicts anew: a prediction cached by an earlier test (`lorafa.memory.predict_job`) would hide a
    change the test makes to the predictor. Nor are predictions kept on disk (`LORAFA_CACHE`, read by every later
    process of the same code): a test that changes the predictor would leave its predictions for the next run. A
    test of that cache points it at a directory of its own."""
    from lorafa import memory

    monkeypatch.setenv("LORAFA_CACHE", "off")
    memory._CACHE.clear()
    yield
    memory._CACHE.clear()


@pytest.fixture
def cfg_factory(tmp_path):
    """cfg_factory(*overrides) → a composed config writing into a fresh temporary directory."""
    counter = iter(range(1000))

    def make(*overrides: str):
        return compose_cfg(overrides, tmp_path / f"job{next(counter)}")

    make.root = tmp_path  # where every job of the test writes
    return make


@pytest.fixture
def offline(monkeypatch):
    """Make the hub unreachable for this test, whatever the machine's network."""
    from lorafa import sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    sources.hub_reachable.cache_clear()
    yield
    sources.hub_reachable.cache_clear()


class HostReads(TorchDispatchMode):
    """Every host read of a tensor's value (`.item()`, `bool(t)`, `float(t)`) met while active, with where it came
    from: each goes through one operator, `aten._local_scalar_dense`. A CUDA graph capture fails at the first."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            import traceback

            self.reads.append("".join(traceback.format_stack(limit=6)[:-1]))
        return func(*args, **(kwargs or {}))


def undocumented(row: dict) -> list[str]:
    """The columns of a job's row that docs/measurement.md does not name (a backquoted name, or a pattern such as
    `eval_<metric>` or `job_mem_*_gib`)."""
    import re

    text = (ROOT / "docs" / "measurement.md").read_text()
    names = set(re.findall(r"`([a-z][a-z0-9_<>*]*)`", text))
    patterns = [re.compile("^" + re.sub(r"<[a-z_]+>|\\\*", r"[a-z0-9_]+", re.escape(n)) + "$") for n in names]
    return sorted(c for c in row if not any(p.match(c) for p in patterns))
