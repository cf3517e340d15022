"""Host memory of instruction data as it grows: peak RSS of a real job at 10k and 1M Alpaca-style records.

    python experiments/data_rss.py --out results/data_rss.parquet                 # 10k and 1M, both ways (2 CPU cores: ≈ 15 min)
    python experiments/data_rss.py --records 2000 20000 --steps 5 --out /tmp/r.parquet   # a quick look
    smoke: python experiments/data_rss.py --records 200 --steps 2 --out results.parquet

For each size, N synthetic records (instruction / input / output, ≈ 330 bytes each) are written to a JSON-lines
file in a temporary directory; then, each in a fresh process with a fresh datasets cache (so that loading and
tokenising are measured, not a cache hit), `lorafa.job.run` trains the tiny LLaMA (`model=tiny-llama`, the
tokenizer shipped in lorafa/assets) for `--steps` optimizer steps on it — task.streaming=false (the file loaded
into datasets' Arrow cache, tokenised by a batched map, read memory-mapped) and task.streaming=true (read,
shuffled through a 10,000-record buffer and tokenised as training goes). MMLU afterwards is limited to one
question per subject of the shipped sample. Each row: the process's peak RSS (`ru_maxrss`), the peak of its
anonymous memory (RssAnon, sampled every 20 ms: the heap, without the memory-mapped Arrow files the kernel may
drop), its RSS after imports (torch, transformers, datasets: the floor), and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ["the", "a", "model", "data", "train", "loss", "token", "memory", "adapter", "rank", "layer", "batch", "step",
         "learn", "answer", "question", "write", "list", "explain", "give", "three", "reasons", "describe", "summary",
         "translate", "sentence", "french", "capital", "city", "number", "add"]


def write_records(path: Path, n: int, seed: int = 0) -> int:
    """N Alpaca-format records as JSON lines; returns the file's size in bytes."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"instruction": f"{text(8)} {i}?", "input": text(6) if i % 3 else "", "output": text(40)}
            f.write(json.dumps(rec) + "\n")
    return path.stat().st_size


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(data_file: str, streaming: bool, steps: int, out_json: str) -> None:
    """One measurement, in this (fresh) process."""
    import resource
    import threading

    import lorafa  # noqa: F401  (the ${asset:} resolver)
    from lorafa.job import run
    from tests.conftest import compose_cfg

    floor = _status_kib("VmRSS")
    peak_anon, done = [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    overrides = ["model=tiny-llama", "method=lorafa", "task=alpaca_mmlu_sample", f"task.data_files.train={data_file}",
                 f"task.streaming={str(streaming).lower()}", f"train.max_steps={steps}", "train.batch_size=8",
                 "task.mmlu_limit=1", "task.num_fewshot=0", "train.log_every=1000"]
    row = run(compose_cfg(overrides, Path(out_json).with_suffix("")))
    done.set()
    Path(out_json).write_text(json.dumps({
        "status": row["status"], "error": row["error"], "train_steps": int(row["train_steps"]),
        "train_examples": int(row["train_examples"]), "wall_s": time.perf_counter() - started,
        "rss_floor_mib": floor / 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_anon_mib": max(peak_anon[0], _status_kib("RssAnon")) / 1024, "config_hash": row["config_hash"]}))


def measure(data_file: Path, streaming: bool, steps: int, work: Path) -> dict:
    out = work / f"m_{data_file.stem}_{int(streaming)}.json"
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / f"cache_{data_file.stem}_{int(streaming)}"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, __file__, "--child", str(data_file), str(int(streaming)), str(steps), str(out)],
                   check=True, env=env, cwd=ROOT)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (micro-batches of 8) each job trains")
    parser.add_argument("--out", default="results/data_rss.parquet")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data_file, streaming, steps, out_json = args.child
        child(data_file, streaming == "1", int(steps), out_json)
        return

    import datasets
    import pandas as pd
    import torch

    from lorafa import results

    sha, dirty = results.git_state()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafa-rss-") as tmp:
        work = Path(tmp)
        for n in args.records:
            data_file = work / f"alpaca_{n}.jsonl"
            size = write_records(data_file, n)
            for streaming in (True, False):
                m = measure(data_file, streaming, args.steps, work)
                rows.append({"experiment": "data_rss", "records": n, "file_mib": size / 2**20,
                             "streaming": streaming, **m})
                print(f"{n:>9,} records  streaming={streaming!s:<5}  peak RSS {m['peak_rss_mib']:7.0f} MiB  "
                      f"peak anon {m['peak_anon_mib']:7.0f} MiB  (floor {m['rss_floor_mib']:.0f})  "
                      f"{m['wall_s']:6.1f} s  {m['status']}", flush=True)
            data_file.unlink()
    table = pd.DataFrame(rows)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    # each row's config_hash is its job's; with the record count it identifies the measurement
    table["config_hash"] = [f"{h}-{n}" for h, n in zip(table["config_hash"], table["records"])]
    table = table.assign(schema_version=results.SCHEMA_VERSION, git_sha=sha, git_dirty=dirty, device="cpu",
                         cpu_count=os.cpu_count(), torch_version=torch.__version__,
                         datasets_version=datasets.__version__, python_version=sys.version.split()[0],
                         command=command)
    print(table[["records", "streaming", "peak_rss_mib", "peak_anon_mib", "rss_floor_mib", "wall_s"]]
          .to_string(index=False))
    if args.out:
        _, added = results.append_rows(table, args.out)
        print(f"{added} rows added to {args.out}")


if __name__ == "__main__":
    main()
