"""Run several sweeps at once on one machine: small models leave a GPU mostly idle between kernel launches, and
independent `run.py -m` processes fill it. Reads one command a line (a `python run.py -m ...` sweep with its own
`hydra.sweep.dir`), runs up to --workers at a time in the listed order, and stops what is still running at
--deadline seconds (its finished jobs keep their rows: a sweep writes one row per job as it goes).

    python experiments/tools/parallel.py --workers 12 --deadline 480 commands.txt
    python -m lorafa.protocols select SWEEP_DIR ... --out table.parquet     # the rows of all of them, selected

Each command's output goes to <log dir>/<line number>.log. Exit status: 0 if every command finished with 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commands", type=Path, help="a file of shell commands, one a line (# comments allowed)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=None, help="seconds; then running commands are stopped")
    parser.add_argument("--logs", type=Path, default=Path("outputs/parallel_logs"))
    args = parser.parse_args(argv)
    lines = [ln.strip() for ln in args.commands.read_text().splitlines()]
    todo = [(i, ln) for i, ln in enumerate(lines, 1) if ln and not ln.startswith("#")]
    args.logs.mkdir(parents=True, exist_ok=True)
    started, running, codes = time.monotonic(), {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    while todo or running:
        late = args.deadline is not None and time.monotonic() - started > args.deadline
        while todo and len(running) < args.workers and not late:
            i, cmd = todo.pop(0)
            log = open(args.logs / f"{i}.log", "w")  # noqa: SIM115 - closed when its command ends
            running[i] = (subprocess.Popen(shlex.split(cmd), stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True), log)
        for i, (proc, log) in list(running.items()):
            if late and proc.poll() is None:  # the whole process group: the sweep and anything it started
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is not None:
                codes[i] = proc.returncode
                log.close()
                del running[i]
        if late:
            codes.update({i: -1 for i, _ in todo})  # never started
            todo = []
        time.sleep(0.5)
    failed = {i: c for i, c in codes.items() if c != 0}
    print(f"{len(codes) - len(failed)} of {len(codes)} commands finished with 0 in {time.monotonic() - started:.0f} s"
          + (f"; not 0: {dict(sorted(failed.items()))} (logs in {args.logs})" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
