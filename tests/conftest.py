"""Shared fixtures: compose the real Hydra config (as run.py does) with overrides, shrunk for CPU tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import lorafa  # noqa: F401  (registers the ${asset:} resolver)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_cfg(overrides: list[str] | tuple = (), output_dir: Path | str = "/tmp/lorafa-test"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"output_dir={output_dir}", "train.progress=false"])


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
