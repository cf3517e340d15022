"""Memory of LoRA, LoRA-FA and their bounds at the paper's scale: the memory benchmark.

    python experiments/memory.py --out results/memory.parquet            # on a CUDA GPU (H200: ~10 min)
    python experiments/memory.py --models roberta-base --shape 16x512 --out m.parquet   # another batch × length
    python experiments/memory.py --models tiny-llama --device cpu --out /tmp/m.parquet   # a quick CPU run
    smoke: python experiments/memory.py --models tiny-llama --variants full lora lorafa frozen --device cpu --steps 4 --out results.parquet

Random-init weights built from each model's real config (no download), synthetic batches of exactly
batch_size × seq_len, bf16 autocast on CUDA (frozen weights held in bf16), r = 8 on every attention and FFN linear,
the same settings for every method of a model, all in one process. Per model: full fine-tuning (an `oom` row where it
does not fit), lora, lorafa, lorafa_v2, lora and lorafa with gradient checkpointing, lora / lorafa / frozen with
element-wise recomputation, and the frozen model (no adapter, backward to the input embeddings) as the lower bound;
for language models also lora and lorafa, with and without checkpointing, on transformers' LM loss instead of the
fused one (`model.fused_loss`).
Each row carries the measured memory split (mem_*_gib), the prediction of `lorafa.memory.predict` beside it
(pred_mem_*_gib) and tokens/s after warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# model → (batch_size, seq_len, adapter dropout, extra overrides): the paper-scale settings
SETTINGS = {
    "roberta-base": (32, 128, 0.1, []),
    "roberta-large": (32, 128, 0.1, []),
    "t5-large": (32, 128, 0.0, ["task.target_len=128"]),
    "llama-7b": (8, 1024, 0.0, []),
    # smoke-test sizes (CPU)
    "tiny-roberta": (4, 32, 0.1, []),
    "tiny-t5": (4, 32, 0.0, ["task.target_len=16"]),
    "tiny-llama": (4, 32, 0.0, []),
}
# label → method overrides
VARIANTS = {
    "full": ["method=full"],
    "lora": ["method=lora"],
    "lorafa": ["method=lorafa"],
    "lorafa_v2": ["method=lorafa_v2"],
    "lora+ckpt": ["method=lora", "method.gradient_checkpointing=true"],
    "lorafa+ckpt": ["method=lorafa", "method.gradient_checkpointing=true"],
    "lora+recompute": ["method=lora", "method.recompute=elementwise"],
    "lorafa+recompute": ["method=lorafa", "method.recompute=elementwise"],
    "frozen": ["method=frozen"],
    "frozen+recompute": ["method=frozen", "method.recompute=elementwise"],
    # transformers' LM loss instead of the fused one (the default, `model.fused_loss`): what fusing saves, side by
    # side (language models only: an encoder's head classifies)
    "lora+unfused_loss": ["method=lora", "model.fused_loss=false"],
    "lorafa+unfused_loss": ["method=lorafa", "model.fused_loss=false"],
    "lora+ckpt+unfused_loss": ["method=lora", "method.gradient_checkpointing=true", "model.fused_loss=false"],
    "lorafa+ckpt+unfused_loss": ["method=lorafa", "method.gradient_checkpointing=true", "model.fused_loss=false"],
}
COLUMNS = ["model", "variant", "method", "gradient_checkpointing", "recompute", "batch_size", "seq_len", "dropout",
           "fused_loss", "status", "mem_weights_gib", "mem_grads_gib", "mem_optimizer_gib", "mem_activations_gib", "mem_peak_gib",
           "pred_mem_weights_gib", "pred_mem_grads_gib", "pred_mem_optimizer_gib", "pred_mem_activations_gib",
           "pred_mem_peak_gib", "tokens_per_s", "step_time_s", "trainable_params", "device"]


def overrides_for(model: str, variant: str, device: str, steps: int, shape: tuple[int, int] | None = None) -> list[str]:
    """The job's overrides; `shape` = (batch_size, seq_len) replaces the model's default setting."""
    bs, seq, dropout, extra = SETTINGS[model]
    bs, seq = shape or (bs, seq)
    return ["experiment=memory", f"model={model}", "model.init=random", "task=synthetic", f"task.max_seq_len={seq}",
            "task.num_eval=8",
            f"train.batch_size={bs}", "train.eval_batch_size=8", f"train.max_steps={steps}",
            "train.measure_warmup_steps=3", f"device={device}", *extra, *VARIANTS[variant],
            # every adapter method: its config's r = 8 on all linear layers; the adapter dropout as the setting says
            *([f"method.dropout={dropout}"] if variant.split("+")[0] not in ("full", "frozen") else [])]


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["roberta-base", "roberta-large", "t5-large", "llama-7b"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--shape", help="BATCHxSEQ for every model of this run instead of its setting, e.g. 16x512")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per job (3 are warm-up)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir

    from lorafa import results
    from lorafa.job import run

    rows = []
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for model in args.models:
            for variant in args.variants:
                shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape else None
                overrides = overrides_for(model, variant, args.device, args.steps, shape)
                cfg = compose("config", overrides=[*overrides, f"output_dir={tmp}/{model}/{variant}/{args.shape}",
                                                   "train.progress=false"])
                if variant.endswith("+unfused_loss") and cfg.model.family == "encoder":
                    continue
                row = run(cfg)
                row["variant"] = variant
                rows.append(row)
                # each row as it comes (an interrupted run keeps its rows), append-only: rows of `--out` stay, a
                # job whose config hash it holds already is not added twice
                results.append_rows(pd.DataFrame([row]), args.out)
                print(f"{model:14s} {variant:18s} {row['status']:7s} peak {row.get('mem_peak_gib', float('nan')):7.2f}"
                      f" GiB (pred {row.get('pred_mem_peak_gib', float('nan')):7.2f}) activations "
                      f"{row.get('mem_activations_gib', float('nan')):7.2f} GiB (pred "
                      f"{row.get('pred_mem_activations_gib', float('nan')):7.2f}) "
                      f"{row.get('tokens_per_s', float('nan')):9.0f} tok/s", flush=True)
    table = pd.DataFrame(rows)
    shown = [c for c in COLUMNS if c in table]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return table


if __name__ == "__main__":
    main()
