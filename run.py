"""Run one job, or a sweep of them (-m), from the Hydra config in conf/.

    python run.py                                                     # the offline default, < 2 min on CPU
    python run.py -m model=roberta-base,t5-large method=lora,lorafa task=glue_sst2
    python run.py model=local model.path=/ckpt task=text_cls task.data_files.train=a.csv task.data_files.validation=b.csv

Each job writes one row to <job dir>/result.parquet; a sweep gathers them into <sweep dir>/results.parquet.
Bad input (lorafa.checks) is one line on stderr and a non-zero exit, with no row: at once for a single job; in a
sweep the other jobs still run, the refused job's line goes to <job dir>/input_error.txt, and the sweep exits
non-zero at the end. A single job exits non-zero unless its row is ok; a sweep exits 0 when every job ended in a
final row (ok, oom, diverged: results) and non-zero when a job was refused or failed. Rerunning a sweep with the
same command and hydra.sweep.dir skips the jobs that already have a final row (a failed job runs again).
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import lorafa  # noqa: F401  (registers the ${asset:...} resolver the configs use)
from lorafa.checks import INPUT_ERROR_FILE, BadInput, check_choices
from lorafa.job import run

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    single = HydraConfig.get().mode == RunMode.RUN
    (Path(cfg.output_dir) / INPUT_ERROR_FILE).unlink(missing_ok=True)  # a rerun judges its input afresh
    try:
        row = run(cfg)
    except BadInput as err:
        if single:
            sys.exit(f"error: {err}")
        print(f"error: {err}", file=sys.stderr, flush=True)  # the sweep goes on; it exits non-zero at the end
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / INPUT_ERROR_FILE).write_text(f"{err}\n")
        return None
    if row["status"] != "ok" and single:
        sys.exit(f"job {row['status']}: {row['error']}")  # a sweep goes on; a single failed job exits non-zero
    return row.get("score")


if __name__ == "__main__":
    try:
        check_choices(sys.argv[1:], CONF)
    except BadInput as err:
        sys.exit(f"error: {err}")
    main()
