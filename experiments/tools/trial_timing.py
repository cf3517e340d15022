"""How a budget's trial times a plan, against how the side-by-side bench times it (`lorafa.bench --resident`).

    python experiments/tools/trial_timing.py --method lora --plans offload_all,all+keep5,all+keep9 --rounds 16 \
        --out trial_timing.parquet

roberta-large 32 × 128 (adapter dropout 0.1, eager, bf16 autocast, random init) under each named plan, every plan
kept on the device, warmed up by 5 optimizer steps; then rounds, in alternating order of plans and of ways, each
timing every plan three ways:
  split  a budget trial's step (`lorafa.plans.step_timer`: the device synchronised after forward and after
         backward; no optimizer step)
  whole  one whole optimizer step (forward, backward, fused AdamW, gradients let go), synchronised before and after
  run3   three whole steps back to back (`lorafa.bench.time_steps`, the side-by-side bench's round)
One row per plan, way and round (`step_s`: seconds per step), with the run's provenance. Needs a CUDA device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lorafa import bench, plans, results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--plans", required=True, help="comma-separated plan names (`train.plan`)")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--model", default="roberta-large")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import pandas as pd

    dev = torch.device("cuda")
    names = args.plans.split(",")
    layer = "two_matmul" if args.method.startswith("lorafa") else "none"
    batch, seq = bench.SHAPES[args.model]
    built = {}
    for name in names:
        cfg = bench.compose(args.model, args.method, batch, seq,
                            ["device=cuda", "method.dropout=0.1", f"train.plan={name}"], layer=layer)
        s = bench.Setting(cfg, "eager", dev)
        for _ in range(5):
            s.step()
        built[name] = s
    torch.cuda.synchronize()

    def split(s):
        return sum(plans.step_timer(s.model, s.batch, dev, s.amp)())

    ways = {"split": split, "whole": lambda s: bench.time_steps(s, 1), "run3": lambda s: bench.time_steps(s, 3)}
    rows = []
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                rows.append({"model": args.model, "method": args.method, "batch_size": batch, "seq_len": seq,
                             "plan_name": name, "way": way, "round": r, "step_s": ways[way](built[name])})
    import transformers

    sha, dirty = results.git_state()
    out = pd.DataFrame(rows).assign(device=results.device_name(dev), torch_version=torch.__version__,
                                    transformers_version=transformers.__version__, git_sha=sha, git_dirty=dirty,
                                    command=" ".join(["python", *sys.argv]))
    out.to_parquet(args.out, index=False)
    print(out.groupby(["plan_name", "way"])["step_s"].median().unstack().mul(1e3).round(1))


if __name__ == "__main__":
    main()
