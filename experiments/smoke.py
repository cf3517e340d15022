"""Run every experiment file's smoke command (its `smoke:` line: the same sweep on tiny models, in seconds), each
into its own sweep directory, so the analysis has rows from every experiment to run on. CI does this.

    python experiments/smoke.py --out /tmp/smoke
    python -m analysis --results '/tmp/smoke/*/results.parquet' --out /tmp/smoke/report
    python experiments/smoke.py --out /tmp/smoke --only glue_roberta memory

Experiment files without a smoke line are listed and skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "experiments"
SMOKE = re.compile(r"^\s*#?\s*smoke:\s*((?:python|torchrun) .+)$", re.MULTILINE)


def experiment_files() -> list[Path]:
    return sorted(p for p in HERE.iterdir() if p.suffix in (".yaml", ".py") and not p.name.startswith(("_", "smoke")))


def smoke_command(path: Path) -> list[str] | None:
    """The file's smoke command as argv, or None."""
    found = SMOKE.search(path.read_text())
    return shlex.split(found.group(1)) if found else None


def argv_for(path: Path, out_dir: Path) -> list[str]:
    """The smoke command made runnable here: this Python, paths from the checkout, output into `out_dir`."""
    args = smoke_command(path)
    if args is None:
        raise ValueError(f"{path.name} has no smoke line")
    if args[0] == "torchrun":  # torchrun [options] script ...: this Python's torch.distributed.run, on a free port
        script = next(i for i, a in enumerate(args) if a.endswith(".py"))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args[1:script]]
        args = [*launcher, str(ROOT / args[script]), *args[script + 1:]]
    else:
        args = [sys.executable, str(ROOT / args[1]), *args[2:]]
    if path.suffix == ".yaml":
        return [*args, f"hydra.sweep.dir={out_dir}", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    i = args.index("--out")
    return [*args[: i + 1], str(out_dir / "results.parquet"), *args[i + 2:]]


def run_one(path: Path, out: Path) -> tuple[str, int, float, str]:
    started = time.perf_counter()
    out_dir = out / path.stem
    # tiny models gain nothing from intra-op threads: one each, so the sweeps run side by side without contention
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv_for(path, out_dir), cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    (out / f"{path.stem}.log").write_text(proc.stdout + proc.stderr)
    return path.stem, proc.returncode, time.perf_counter() - started, (proc.stdout + proc.stderr)[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", help="experiment names (default: every file with a smoke line)")
    parser.add_argument("--jobs", type=int, default=2, help="smoke sweeps run at once")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = [p for p in experiment_files() if not args.only or p.stem in args.only]
    runnable = [p for p in files if smoke_command(p)]
    for p in sorted(set(files) - set(runnable)):
        print(f"{p.stem:22s} skipped (no smoke line)")
    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, rc, seconds, tail in pool.map(lambda p: run_one(p, args.out), runnable):
            ok = rc == 0 and (args.out / name / "results.parquet").is_file()
            failed += not ok
            print(f"{name:22s} {'ok' if ok else f'FAILED (exit {rc})'} {seconds:6.1f} s")
            if not ok:
                print(tail, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
