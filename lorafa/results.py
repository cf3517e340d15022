"""Result rows: one parquet row per job, written atomically beside the job, gathered into one table per sweep.

    python -m lorafa.results collect SWEEP_DIR     # SWEEP_DIR/**/result.parquet → SWEEP_DIR/results.parquet
    python -m lorafa.results append SWEEP_DIR results/my_table.parquet    # add a sweep's new rows to a table

Tables in results/ are only ever appended to (`append_rows`): rows already there are never changed or dropped, and
a row whose `config_hash` is already in the table is not added again. Every write is atomic (temporary file, then
rename) and every row carries `schema_version`.

Every row carries what produced it: the resolved config (as JSON) and its hash, the git commit of the code and
whether the tree was dirty, the package versions and the device. At the end of a Hydra multirun the
`CollectResults` callback (registered in `conf/config.yaml`) does the collecting and prints the sweep's table.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

SCHEMA_VERSION = 1
ROW_FILE = "result.parquet"
TABLE_FILE = "results.parquet"
# keys that say where a job writes, not what it computes: left out of the config hash
NON_SEMANTIC_KEYS = ("output_dir",)
# every row has these, filled (the `eval_<metric>` columns of the task's metrics come on top)
REQUIRED_COLUMNS = [
    "model", "family", "method", "task", "seed", "status", "error", "rank", "batch_size", "seq_len", "metric", "score",
    "eval_loss", "mem_weights_gib", "mem_grads_gib", "mem_optimizer_gib", "mem_activations_gib", "mem_peak_gib",
    "pred_mem_weights_gib", "pred_mem_grads_gib", "pred_mem_optimizer_gib", "pred_mem_activations_gib",
    "pred_mem_peak_gib", "tokens_per_s", "samples_per_s", "step_time_s", "trainable_params", "total_params", "device", "torch_version",
    "transformers_version", "git_sha", "git_dirty", "config_hash", "wall_time_s",
]
SUMMARY_COLUMNS = ["model", "method", "task", "seed", "status", "metric", "score", "trainable_params",
                   "mem_activations_gib", "mem_peak_gib", "tokens_per_s"]


def config_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def config_hash(cfg: DictConfig) -> str:
    """sha256 (16 hex) of the resolved config without where-to-write keys: equal hash, equal job."""
    data = {k: v for k, v in config_dict(cfg).items() if k not in NON_SEMANTIC_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def git_state(path: Path | None = None) -> tuple[str, bool]:
    """(commit sha, dirty?) of the code that runs. LORAFA_GIT_SHA / LORAFA_GIT_DIRTY, when set, say it (a copy of
    the tree shipped to a GPU host may carry a stale .git); else the checkout holding the lorafa package; else
    ("unknown", True). Read once per process, at the first job's start: the code a sweep runs is the code it
    imported then."""
    if os.environ.get("LORAFA_GIT_SHA"):
        return os.environ["LORAFA_GIT_SHA"], os.environ.get("LORAFA_GIT_DIRTY", "1") != "0"
    where = str(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", True


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance(cfg: DictConfig, device) -> dict:
    import torch
    import transformers

    sha, dirty = git_state()
    return {"schema_version": SCHEMA_VERSION, "config_hash": config_hash(cfg),
            "config": json.dumps(config_dict(cfg), sort_keys=True, default=str),
            "git_sha": sha, "git_dirty": dirty, "device": device_name(device),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "python_version": sys.version.split()[0]}


def _atomic_write(frame: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see half a file, and a write
    that fails (a full disk) or is killed leaves the file as it was. A kill (SIGKILL) can leave its hidden
    temporary file (`.<name>.*.tmp`) behind; the next write of the same file removes it — its callers are the
    file's only writer at a time (one job per directory, `collect` per sweep, `append_rows` under a lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"{path} not written: {err.strerror or err} (the file as it was is intact)") \
            from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_row(row: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / ROW_FILE
    _atomic_write(pd.DataFrame([row]), path)
    return path


FINAL_STATUSES = ("ok", "oom", "diverged")  # a rerun keeps these; a `failed` job (maybe transient) runs again


def finished_row(out_dir: str | Path, cfg: DictConfig) -> dict | None:
    """The row already in `out_dir` for this very job (same config hash, a final status), else None: what lets a
    killed sweep, rerun with the same command and `hydra.sweep.dir`, skip the jobs it finished. A row of another
    config in the same directory (the sweep was changed) or an unreadable one does not count: the job runs."""
    path = Path(out_dir) / ROW_FILE
    if not path.is_file():
        return None
    try:
        row = pd.read_parquet(path).iloc[0].to_dict()
    except Exception as err:  # noqa: BLE001 - a foreign or broken file: run the job again, and say so
        warnings.warn(f"{path} is unreadable ({type(err).__name__}: {err}); running the job again", stacklevel=2)
        return None
    if row.get("config_hash") != config_hash(cfg) or row.get("status") not in FINAL_STATUSES:
        return None
    return row


def bad_inputs(sweep_dir: str | Path) -> dict[str, str]:
    """{job dir: its one-line error} for the jobs of a sweep refused for bad input (`lorafa.checks`)."""
    from .checks import INPUT_ERROR_FILE

    sweep_dir = Path(sweep_dir)
    return {str(p.parent.relative_to(sweep_dir)): p.read_text().strip()
            for p in sorted(sweep_dir.rglob(INPUT_ERROR_FILE))}


def collect(sweep_dir: str | Path, *, write: bool = True) -> pd.DataFrame:
    """Concatenate every job's row under `sweep_dir` into `sweep_dir/results.parquet`; rows of a tuned protocol
    get their selection columns (`lorafa.protocols.select`). Unreadable row files are named in a warning and
    skipped, never silently dropped."""
    sweep_dir = Path(sweep_dir)
    frames = []
    for path in sorted(sweep_dir.rglob(ROW_FILE)):
        try:
            frames.append(pd.read_parquet(path).assign(job_dir=str(path.parent.relative_to(sweep_dir))))
        except Exception as err:  # noqa: BLE001 - a corrupted or foreign file: say which, keep the rest
            warnings.warn(f"skipping unreadable result {path}: {type(err).__name__}: {err}", stacklevel=2)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if "protocol" in table and (table["protocol"] == "tuned").any():
        from .protocols import select

        table = select(table)
    if write:
        _atomic_write(table, sweep_dir / TABLE_FILE)
    return table


LOCK_TIMEOUT_S = 600  # waiting longer for another writer of the same table is an error


def append_rows(new: pd.DataFrame, path: str | Path) -> tuple[pd.DataFrame, int]:
    """Append `new` to the table at `path` (created if absent): existing rows are kept as they are, rows whose
    `config_hash` the table already holds (or that repeat one within `new`) are left out. Returns (table, rows
    added). Rows must carry `config_hash` and `schema_version`."""
    from filelock import FileLock

    path = Path(path)
    for col in ("config_hash", "schema_version"):
        if col not in new.columns or new[col].isna().any():
            raise ValueError(f"rows to append to {path} must all carry {col}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # several writers (a bench and a sweep, SLURM array jobs) append to one table: each reads, adds and writes
    # it holding the table's lock file, so that no writer's rows are lost to another's write
    with FileLock(str(path.with_name(f".{path.name}.lock")), timeout=LOCK_TIMEOUT_S):
        old = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["config_hash"])
        held = set(old["config_hash"].dropna()) if "config_hash" in old else set()  # older tables may lack it
        fresh = new[~new["config_hash"].isin(held)].drop_duplicates("config_hash")
        table = pd.concat([old, fresh], ignore_index=True) if len(old) else fresh.reset_index(drop=True)
        if len(fresh):
            _atomic_write(table, path)
    return table, len(fresh)


def summary(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no result rows)"
    cols = [c for c in SUMMARY_COLUMNS if c in table.columns]
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.precision", 4):
        return table[cols].to_string(index=False)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; this keeps `collect` usable without it
    Callback = object


class CollectResults(Callback):
    """Hydra callback: at the end of a multirun, gather the rows into `<sweep dir>/results.parquet`."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, process 0 wrote the rows and gathers them
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        table = collect(sweep_dir)
        print(f"\n{len(table)} result rows → {sweep_dir / TABLE_FILE}\n{summary(table)}", flush=True)
        if "selected" in table and table["selected"].any():  # a tuned protocol: both views, side by side
            from .protocols import compare

            with pd.option_context("display.width", 200, "display.max_columns", None):
                print(f"\neach method at its default lr and at the lr chosen on the held-out slice of train "
                      f"(dev set, %):\n{compare(table).to_string(index=False)}", flush=True)
        # the sweep's exit code: 0 when every job ended in a final row (ok, and the expected failures oom and
        # diverged, which are results); non-zero when a job was refused for bad input (no row) or failed (an
        # unexpected exception: its row says which, traceback.txt beside it; a rerun runs it again)
        problems = []
        refused = bad_inputs(sweep_dir)
        if refused:
            lines = "\n".join(f"  {job}: {msg}" for job, msg in refused.items())
            problems.append(f"{len(refused)} job(s) refused for bad input (no row):\n{lines}")
        failed = table[table["status"] == "failed"] if "status" in table else table.iloc[:0]
        if len(failed):
            lines = "\n".join(f"  {row['job_dir']}: {row['error']}" for _, row in failed.iterrows())
            problems.append(f"{len(failed)} job(s) failed (status failed, traceback.txt in the job directory; "
                            f"rerunning the sweep runs them again):\n{lines}")
        if problems:
            sys.exit("\n".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafa.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("collect", help="gather SWEEP_DIR/**/result.parquet into SWEEP_DIR/results.parquet")
    p.add_argument("sweep_dir", type=Path)
    p = sub.add_parser("append", help="add the rows of a sweep (directory) or table (parquet) to a results/ table, "
                                      "leaving out rows whose config_hash it already holds")
    p.add_argument("source", type=Path)
    p.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "append":
        if args.source.is_dir():
            new = collect(args.source, write=False)
        elif args.source.is_file():
            new = pd.read_parquet(args.source)
        else:
            parser.error(f"{args.source}: no such sweep directory or parquet file")
        table, added = append_rows(new, args.dest)
        print(f"{added} of {len(new)} rows added → {args.dest} ({len(table)} rows; rows already there by "
              f"config_hash left out)")
        return 0
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    table = collect(args.sweep_dir)
    print(f"{len(table)} result rows → {args.sweep_dir / TABLE_FILE}\n{summary(table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
