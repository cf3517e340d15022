"""Table: every memory plan of a memory-budget sweep timed side by side (`memory_budget_side_by_side`).

    python experiments/memory_budget_side_by_side.py --model roberta-large --out results/memory_plan_speed_h200.parquet
    python experiments/memory_budget_side_by_side.py --model roberta-large --methods lora --run-id 20261204T0230 ...   # one method per command
    smoke: python experiments/memory_budget_side_by_side.py --model tiny-llama --device cpu --plans none all all+keep1 --rounds 1 --steps 1 --warmup 1 --out results.parquet

Jobs of `experiments/memory_budget.yaml` run one after another, and where a step is bound by the host (roberta-large
32 × 128) the host's speed moves between them by more than the plans differ. This times the same plans in one
process instead: for each method, every plan the sweep's rows of `--model` ran (`--sweep`: each hand-set plan and
each budget's choice, `plan_name`; or the plans `--plans` names) becomes a setting of `python -m lorafa.bench
--plans`, built, warmed up and timed in turn, round after round in alternating order, eager, at the batch size,
length and adapter dropout of the sweep's rows (with `--plans`: of `memory_budget.yaml`'s setting for the model),
LoRA-FA on the layer the sweep's jobs ran (with `--plans`: two_matmul). Methods run one after another under one
`run_id` (give `--run-id` to join separate commands, e.g. one method per time-limited device call). `python -m
analysis --only memory_budget` then judges each budget's choice against the fastest plan of the model's latest
run that fits (tables `memory_budget_side_by_side`, `memory_budget_side_by_side_passes`).

How: `side_by_side` in the yaml's setting for the model, else each plan rebuilt every round (3 rounds of 5 warm-up
and 15 timed steps; a 7B model's plans do not fit on one device together). roberta-large keeps every plan on the
device (`bench --resident`) and times 24 rounds of 3 steps: two plans' steps in a round are seconds apart, so a
ratio paired by round cancels the host's drift, and 24 rounds give its interval. --resident/--no-resident,
--rounds, --steps and --warmup override it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "memory_budget"  # the sweep's rows and settings (`experiments/memory_budget.yaml`)
METHODS = ("lora", "lorafa")  # what the sweep compares


def _experiment():
    """experiments/memory_budget.yaml as written (its `setting` per model, its named `plans`)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "experiments" / f"{EXPERIMENT}.yaml")


def from_sweep(sweep, model: str, methods: list[str] | None = None) -> list[dict]:
    """Per method of the sweep's ok rows at `model`: the plans its jobs ran (in the sweep's order), its batch size,
    length, adapter dropout and LoRA-FA layer — bad input where the rows disagree on one of them (two shapes: two
    sweeps to time apart) or where the sweep has no row of a method asked for."""
    from lorafa import report
    from lorafa.bench import LAYERS
    from lorafa.checks import BadInput

    named = list(_experiment()["plans"].values())  # the plans the variants name, in the experiment's order
    rows = report.rows(sweep, EXPERIMENT)  # its ok rows
    rows = rows[rows["model"] == model]
    have = list(dict.fromkeys(rows["method"]))
    if not have:
        raise BadInput(f"no ok rows of experiment {EXPERIMENT} at model {model} in the sweep "
                       f"(models there: {', '.join(sorted(set(sweep['model'].astype(str))))})")
    missing = sorted(set(methods or []) - set(have))
    if missing:
        raise BadInput(f"--methods {' '.join(missing)}: the sweep has no ok row of them at {model} "
                       f"(it has {', '.join(have)})")
    out = []
    for method in methods or have:
        g = rows[rows["method"] == method]
        one = {}
        for column in ("batch_size", "seq_len", "dropout"):
            values = sorted(set(g[column]))
            if len(values) != 1:
                raise BadInput(f"the sweep's {method} rows at {model} ran at {column} {values}: time each "
                               "sweep apart (--sweep a file of one)")
            one[column] = values[0]
        layers = set(g["layer"]) & set(LAYERS)  # LoRA's rows say "none"
        ran = set(g["plan_name"])  # the named plans in the experiment's order, then the budgets' others by name
        out.append({"method": method, "plans": [p for p in named if p in ran] + sorted(ran - set(named)),
                    "batch_size": int(one["batch_size"]), "seq_len": int(one["seq_len"]),
                    "dropout": float(one["dropout"]), "layer": layers.pop() if len(layers) == 1 else "two_matmul"})
    return out


def from_plans(plans: list[str], model: str, methods: list[str] | None = None) -> list[dict]:
    """Per method: the plans given, at `memory_budget.yaml`'s batch size, length and adapter dropout for `model`
    (its `default` entry for a model it does not name), LoRA-FA on two_matmul."""
    table = _experiment()["setting"]
    s = table[model] if model in table else table["default"]
    return [{"method": method, "plans": list(plans), "batch_size": int(s.batch_size), "seq_len": int(s.seq_len),
             "dropout": float(s.dropout), "layer": "two_matmul"} for method in methods or METHODS]


TIMING = {"resident": False, "rounds": 3, "steps": 15, "warmup": 5}  # where the yaml names no `side_by_side`


def timing(model: str, args) -> dict:
    """How to time `model`'s plans: the command line's --resident/--rounds/--steps/--warmup, else `side_by_side` in
    `memory_budget.yaml`'s setting for the model, else `TIMING` (each plan rebuilt every round: a 7B model's plans
    do not fit on one device together)."""
    table = _experiment()["setting"]
    given = dict(table[model].get("side_by_side") or {}) if model in table else {}
    return {k: getattr(args, k) if getattr(args, k) is not None else given.get(k, v) for k, v in TIMING.items()}


def bench_argv(s: dict, model: str, args) -> list[str]:
    """The `python -m lorafa.bench` command line for one method's plans."""
    t = timing(model, args)
    return ["--models", model, "--shape", f"{s['batch_size']}x{s['seq_len']}", "--methods", s["method"],
            "--modes", "eager", "--layers", s["layer"], "--override", f"method.dropout={s['dropout']:g}",
            "--plans", *s["plans"], "--rounds", str(t["rounds"]), "--steps", str(t["steps"]),
            "--warmup", str(t["warmup"]), *(["--resident"] if t["resident"] else []), "--device", args.device,
            "--run-id", args.run_id, "--out", str(args.out),
            *(["--peak-tflops", f"{args.peak_tflops:g}"] if args.peak_tflops else [])]


def main(argv: list[str] | None = None) -> int:
    from lorafa import bench, report
    from lorafa.checks import BadInput

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sweep", type=Path, default=ROOT / "results" / "memory_budget.parquet",
                        help="the memory-budget sweep's rows (a sweep's results.parquet, or the committed table)")
    parser.add_argument("--plans", nargs="+", default=None, metavar="PLAN",
                        help="time these plans (`train.plan` names) instead of the sweep's")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="default: every method the sweep ran (with --plans: lora lorafa)")
    parser.add_argument("--resident", action=argparse.BooleanOptionalAction, default=None,
                        help="keep every plan on the device and time many short rounds (`bench --resident`), or "
                             "rebuild each plan every round (default: the model's `side_by_side` in "
                             "memory_budget.yaml, else rebuilt)")
    parser.add_argument("--rounds", type=int, default=None, help="default: the yaml's, else 3")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per plan and round "
                        "(default: the yaml's, else 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps per plan (and round, "
                        "where plans are rebuilt; default: the yaml's, else 5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 matmul rate (default: measured)")
    parser.add_argument("--run-id", default=None, help="the rows' run_id (default: the start time)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "memory_plan_speed.parquet")
    parser.add_argument("--dry-run", action="store_true", help="print each method's bench command, run nothing")
    args = parser.parse_args(argv)
    args.run_id = args.run_id or time.strftime("%Y%m%dT%H%M%S")
    try:
        todo = from_plans(args.plans, args.model, args.methods) if args.plans \
            else from_sweep(report.load([str(args.sweep)]), args.model, args.methods)
    except BadInput as err:
        parser.error(str(err))
    for s in todo:
        line = bench_argv(s, args.model, args)
        print(f"{s['method']}: {len(s['plans'])} plans\n  python -m lorafa.bench {' '.join(line)}", flush=True)
        if not args.dry_run and bench.main(line):  # stopped (a time limit, a scheduler): later methods not run
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
