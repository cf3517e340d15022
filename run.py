"""Run one job, or a sweep of them (-m), from the Hydra config in conf/.

    python run.py                                                     # the offline default, < 2 min on CPU
    python run.py -m model=roberta-base,t5-large method=lora,lorafa task=glue_sst2
    python run.py model=local model.path=/ckpt task=text_cls task.data_files.train=a.csv task.data_files.validation=b.csv

Each job writes one row to <job dir>/result.parquet; a sweep gathers them into <sweep dir>/results.parquet.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import lorafa  # noqa: F401  (registers the ${asset:...} resolver the configs use)
from lorafa.job import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    row = run(cfg)
    if row["status"] != "ok" and HydraConfig.get().mode == RunMode.RUN:
        sys.exit(f"job {row['status']}: {row['error']}")  # a sweep goes on; a single failed job exits non-zero
    return row.get("score")


if __name__ == "__main__":
    main()
