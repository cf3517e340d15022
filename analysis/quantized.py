# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LoRA vs LoRA-FA on a 4-bit base (QLoRA-style)
# Rows of `experiments/quantized.yaml`: LLaMA-7B with its blocks' linear layers in NF4 (`model.quantize=nf4`,
# bitsandbytes, double quantization; adapters in fp32, bf16 autocast) beside the same jobs on an unquantized (bf16)
# base, at each batch × length: the memory split, the allocator's peak and `lorafa.memory.predict`'s, tokens/s, and
# the peak ratio LoRA ÷ LoRA-FA per shape and base (`docs/methods.md`, "Quantized bases").

# %%
import numpy as np
import pandas as pd

from lorafa import report

P = report.params()
EXPERIMENT = "quantized"
frame = report.rows(report.load(P.results), EXPERIMENT, ok_only=False)
frame = frame.assign(base=frame["quantize"].fillna("none") if "quantize" in frame else "none")


def gib(r, col):
    v = r.get(col, np.nan)
    return "—" if r["status"] != "ok" or pd.isna(v) else f"{v:.2f}"


# %%
lines = []
for (model, bs, seq, base), g in frame.groupby(["model", "batch_size", "seq_len", "base"], sort=False):
    by = {m: r for m, r in g.set_index("method").iterrows()} if g["method"].is_unique else {}
    for method in ("lora", "lorafa"):
        r = by.get(method)
        if r is None:
            continue
        ok = r["status"] == "ok"
        line = {"model": model, "batch × seq": f"{bs} × {seq}", "base": base, "method": report.method_label(method),
                "status": r["status"]}
        for part in ("weights", "grads", "optimizer", "activations", "peak"):
            line[f"{part} GiB"] = gib(r, f"mem_{part}_gib")
        line["predicted peak GiB"] = gib(r, "pred_mem_peak_gib")
        line["tokens/s"] = f"{r['tokens_per_s']:.0f}" if ok and pd.notna(r.get("tokens_per_s")) else "—"
        both = {"lora", "lorafa"} <= set(by) and all(by[m]["status"] == "ok" for m in ("lora", "lorafa"))
        line["peak LoRA ÷ LoRA-FA"] = (f"{by['lora']['mem_peak_gib'] / by['lorafa']['mem_peak_gib']:.2f}"
                                       if both and method == "lorafa" else "")
        lines.append(line)
table = pd.DataFrame(lines)
report.write_table(table, EXPERIMENT, title="LoRA vs LoRA-FA on an NF4 base and on a bf16 base: memory (GiB), "
                   "measured and predicted, and tokens/s",
                   notes=["Command: python run.py -m experiments=quantized (results/README.md).",
                          ("base: the storage of the blocks' linear layers (nf4: 4 bits + 8-bit block absmax; none: "
                           "bf16 under CUDA autocast); embeddings and LM head bf16, adapters fp32."),
                          report.provenance(frame)])
table
