"""Where weights and data come from: the Hugging Face hub, a local path, or the assets shipped in this package.

Owns the one question every loader asks first ("can the hub be reached?") so that a job on an offline machine
fails in seconds with a message that says how to point the job at local files, instead of retrying for half a
minute per file. If the hub cannot be reached, the Hugging Face libraries are switched to offline mode, so
checkpoints and datasets already in the local cache still load.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .checks import BadInput

ASSETS = Path(__file__).resolve().parent / "assets"

OFFLINE_HINT = (
    "Point the job at local files instead: model.path=/dir/with/config.json (any Hugging Face checkpoint "
    "directory; model.init=random builds the architecture from conf/model/*.yaml with no download), and "
    "task.data_files.train=FILE task.data_files.validation=FILE (csv/tsv/json/jsonl/parquet)."
)


class HubUnavailable(BadInput):
    """A model, tokenizer or dataset had to come from the hub and could not (offline, or not in the cache)."""

    def __init__(self, what: str, cause: BaseException | None = None):
        detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
        super().__init__(f"could not load {what} from the Hugging Face hub or its local cache{detail}. "
                         + OFFLINE_HINT)


def experiments_root() -> str:
    """The folder that holds `experiments/`: the checkout this package runs from (an editable install, or the
    source tree), else the working directory (a non-editable install run from a checkout)."""
    checkout = ASSETS.parents[1]
    return str(checkout if (checkout / "experiments").is_dir() else Path.cwd())


def asset(relative: str) -> str:
    """Absolute path of a file shipped in `lorafa/assets` (the `${asset:...}` resolver in the configs)."""
    path = ASSETS / relative
    if not path.exists():
        raise FileNotFoundError(f"no shipped asset {relative!r} under {ASSETS}")
    return str(path)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint; switches the HF libraries to offline mode if it fails."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        _go_offline()
        return False


def _go_offline() -> None:
    # huggingface_hub and datasets read HF_HUB_OFFLINE once at import; set the module flags they consult, so
    # that files in the local cache load and anything else fails at once instead of after ~25 s of retries.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
            datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:  # datasets is only needed for hub datasets
        pass


def is_local(ref: str | os.PathLike | None) -> bool:
    return ref is not None and Path(str(ref)).expanduser().exists()


def from_hub(what: str, load, ref: str):
    """Call `load(ref)` for a hub id; if the hub is out of reach and the cache lacks it, raise HubUnavailable."""
    reachable = hub_reachable()
    try:
        return load(ref)
    except (OSError, ConnectionError) as err:  # HF raises OSError subclasses for missing/unreachable files
        if reachable:  # a wrong id or a gated repo: the library's own message says it best
            raise
        raise HubUnavailable(f"{what} {ref!r}", err) from err
