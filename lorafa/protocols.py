"""Comparison protocols: how the settings a reported number used were chosen.

`protocol=none` (the default): every job runs at the settings its config gives — each method's own default
learning rate (`conf/method/*.yaml`). `protocol=tuned` (and `experiments=tuned_compare`, which selects it): each
method at its own best learning rate, chosen where the reported score cannot see it.

    python run.py -m experiments=tuned_compare model=... task=... method=lora,lorafa

1. `task.holdout` (10 % by default) of the **training** split is set aside: one fixed slice for every job
   (`lorafa.tasks.holdout_split`); the jobs train on the rest.
2. The sweep runs each method over a learning-rate grid — `protocol.lr_scale` × the method's own default lr
   (0.25, 0.5, 1, 2, 4: a ×16 range centred on the default, so the grid moves with the method, the model and the
   experiment's settings) — on every seed (3 by default). Each job scores the held-out slice (`heldout_score`) and
   the dev set (`score`), as usual.
3. `select` (run by the sweep's `CollectResults`, or `python -m lorafa.protocols select ...` over several sweeps'
   rows): per selection group — the job's config less its seed and learning rate — the lr whose mean held-out score
   over the seeds is highest (a seed that diverged or failed scores −∞ there: an lr that breaks is never chosen).
   The group's rows get `selected_lr`, `selection_score` (that mean), `lr_grid` (the lrs tried) and `selected`
   (the row ran at the selected lr): the final runs, ≥ 3 seeds, scored on the dev set that chose nothing.

`compare` shows both views side by side: every method at its shipped default (`lr_scale` = 1) and every method at
its own selected lr, with the LoRA-FA − LoRA difference paired by seed and its 95 % t-interval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

NONE, TUNED = "none", "tuned"
# config keys that differ between the jobs of one selection group (what the protocol varies, and where it writes)
VARIED = (("seed",), ("train", "lr"), ("protocol", "lr_scale"), ("output_dir",), ("hydra",), ("train", "progress"),
          ("train", "resume"))
SELECTION_COLUMNS = ["selected_lr", "selection_score", "lr_grid", "selected"]


def name_of(cfg: DictConfig) -> str:
    protocol = cfg.get("protocol")
    return str(protocol.get("name") or NONE) if protocol is not None else NONE


def lr_scale_of(cfg: DictConfig) -> float:
    protocol = cfg.get("protocol")
    value = protocol.get("lr_scale") if protocol is not None else None
    return 1.0 if value is None else float(value)


def lr_of(cfg: DictConfig) -> float:
    """The learning rate a job trains with: `train.lr` × `protocol.lr_scale` (the config keeps both as given, so a
    row's config says where its lr came from; the row's `lr` column is this product)."""
    scale = lr_scale_of(cfg)
    if not (scale > 0 and math.isfinite(scale)):
        from .checks import BadInput

        raise BadInput(f"protocol.lr_scale={scale}: expected a number > 0")
    return float(cfg.train.lr) * scale


def selection_group(cfg: DictConfig) -> str:
    """The hash of the job's resolved config less what a protocol varies (seed, learning rate, lr scale, where it
    writes): jobs with equal groups differ only in seed and lr, and the protocol chooses among their lrs."""
    from .results import config_dict

    data = config_dict(cfg)
    for path in VARIED:
        node = data
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def columns(cfg: DictConfig) -> dict:
    """The protocol columns every row carries (known before the job runs)."""
    return {"protocol": name_of(cfg), "lr_scale": lr_scale_of(cfg), "selection_group": selection_group(cfg)}


def _selection_value(row) -> float:
    """A job's held-out score for selection: its main metric on the held-out slice, or, where the task has none
    there (instruction data: loss only), minus its held-out loss; −∞ for a job that did not finish ok."""
    if row.get("status") != "ok":
        return -math.inf
    score = row.get("heldout_score", math.nan)
    if score is not None and not pd.isna(score):
        return float(score)
    loss = row.get("heldout_loss", math.nan)
    return -float(loss) if loss is not None and not pd.isna(loss) else math.nan


def select(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with the selection columns filled for the rows of tuned protocols (see the module's docstring);
    other rows get NaN / False. Rows without a held-out score cannot select: their group stays unselected."""
    out = table.copy()
    out["selected_lr"] = math.nan
    out["selection_score"] = math.nan
    out["lr_grid"] = ""
    out["selected"] = False
    if out.empty or "protocol" not in out or "selection_group" not in out:
        return out
    tuned = out[out["protocol"] == TUNED]
    for _, group in tuned.groupby("selection_group"):
        values = group.apply(_selection_value, axis=1)
        per_lr = values.groupby(group["lr"]).mean()  # a seed at −∞ makes its lr −∞: never chosen; NaN is skipped
        per_lr = per_lr.dropna()
        if per_lr.empty or not math.isfinite(per_lr.max()):
            continue
        best = float(per_lr.idxmax())
        grid = ",".join(f"{lr:g}" for lr in sorted(group["lr"].unique()))
        out.loc[group.index, "selected_lr"] = best
        out.loc[group.index, "selection_score"] = float(per_lr.max())
        out.loc[group.index, "lr_grid"] = grid
        out.loc[group.index, "selected"] = (group["lr"] - best).abs() <= 1e-12 * best
    return out


def views(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the two views, labelled in a `view` column: `default` (each method at its shipped lr,
    `lr_scale` = 1) and `selected` (each at the lr its held-out slice chose). Ok rows of tuned protocols only."""
    frame = select(table) if "selected" not in table else table
    frame = frame[(frame.get("protocol") == TUNED) & (frame["status"] == "ok")] if len(frame) else frame
    if frame.empty:
        return frame.assign(view=pd.Series(dtype=str))
    default = frame[(frame["lr_scale"] - 1.0).abs() < 1e-9].assign(view="default")
    chosen = frame[frame["selected"].astype(bool)].assign(view="selected")
    return pd.concat([default, chosen], ignore_index=True)


def variant_label(row, labels: dict, with_rank: bool = False) -> str:
    """The printed name of a row's method with what sets it apart: the rank (`with_rank`), B's lr ratio where B
    trains alone (LoRA-FA), an orthogonal A: `LoRA-FA (r=16, B ×4)`."""
    name = labels.get(row["method"], row["method"])
    extra = [f"r={int(row['rank'])}"] if with_rank and row.get("rank", 0) else []
    ratio = row.get("b_lr_ratio", 1.0)
    if row["method"] in ("lorafa", "lorafa_v2") or (ratio is not None and not pd.isna(ratio) and ratio != 1.0):
        extra.append(f"B ×{1.0 if ratio is None or pd.isna(ratio) else ratio:g}")
    if row.get("init_a") == "orthogonal":
        extra.append("orthogonal A")
    return f"{name} ({', '.join(extra)})" if extra else name


def compare(table: pd.DataFrame, against: str = "lora", value: str = "score") -> pd.DataFrame:
    """One line per model × task × method × view: mean ± std of `value` (×100 for fractions), its lr, the seeds,
    and for methods other than `against`, method − `against` paired by seed with a 95 % t-interval."""
    from .report import METHOD_LABEL, format_ci, mean_std, paired_difference

    frame = views(table)
    if frame.empty:
        return pd.DataFrame()
    ranks = frame.loc[frame["rank"] > 0, "rank"].nunique() if "rank" in frame else 1
    labels = frame.apply(lambda r: variant_label(r, METHOD_LABEL, with_rank=ranks > 1), axis=1)
    base = sorted(set(labels[frame["method"] == against]))  # what the others are paired with: `against`'s rows
    frame = frame.assign(method=labels)
    against = base[0] if base else METHOD_LABEL.get(against, against)
    frame = frame.assign(points=frame[value] * (100.0 if frame["metric"].isin(["bleu", "chrf", "loss"]).sum() == 0
                                                else 1.0))
    lines = []
    for (model, task, view), g in frame.groupby(["model", "task", "view"], sort=False):
        diffs = {m: paired_difference(g, m, against, value="points", by=("model", "task"))
                 for m in g["method"].unique() if m != against}
        for method, m in g.groupby("method", sort=False):
            lrs = sorted(m["lr"].unique())
            d = diffs.get(method)
            lines.append({"model": model, "task": task, "view": view, "method": method,
                          "lr": ", ".join(f"{lr:g}" for lr in lrs), "score": mean_std(m["points"]),
                          "seeds": int(m["seed"].nunique()),
                          f"− {against} [95 % CI]": "—" if d is None or d.empty else format_ci(d.iloc[0].to_dict())})
    order = {"default": 0, "selected": 1}
    return pd.DataFrame(lines).sort_values(["model", "task", "view"], key=lambda s: s.map(order).fillna(s)
                                           if s.name == "view" else s, kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafa.protocols", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("select", help="fill the selection columns over the rows of one or more sweeps / tables")
    p.add_argument("sources", nargs="+", type=Path, help="sweep directories or parquet tables")
    p.add_argument("--out", type=Path, required=True, help="the parquet table to write")
    args = parser.parse_args(argv)
    from .results import _atomic_write, collect

    frames = [collect(s, write=False) if s.is_dir() else pd.read_parquet(s) for s in args.sources]
    table = select(pd.concat(frames, ignore_index=True).drop(columns=SELECTION_COLUMNS, errors="ignore"))
    _atomic_write(table, args.out)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(compare(table).to_string(index=False))
    print(f"{len(table)} rows → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
