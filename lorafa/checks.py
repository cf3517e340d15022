"""Bad input: caught before a job spends anything, reported in one line that names the key, the value and what is
accepted. A bad input is not a result: it writes no row (`lorafa.job.run` lets `BadInput` through; `run.py` prints
the line and exits non-zero; in a sweep the other jobs still run and the sweep exits non-zero at the end).

Where a value can be judged only against the model or the data (a rank larger than a layer, a sequence longer
than the model's positions, a data file without the task's columns), the code that meets it raises `BadInput`
the same way (`lorafa.models`, `lorafa.tasks`, `lorafa.adapters`, `lorafa.sources`).
"""

from __future__ import annotations

import math
from pathlib import Path

GROUPS = ("model", "method", "task", "protocol", "experiments")  # chosen by conf/<group>/<option>.yaml (experiments/ beside conf/)
INPUT_ERROR_FILE = "input_error.txt"  # in a sweep: the job directory of a job refused for bad input


class BadInput(ValueError):
    """A config value, file or model the job cannot run with. Its message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the parts said


def choices(group: str, conf_dir: str | Path) -> list[str]:
    folder = Path(conf_dir).parent / "experiments" if group == "experiments" else Path(conf_dir) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_choices(overrides: list[str], conf_dir: str | Path) -> None:
    """`model=`, `method=`, `task=` on the command line (sweeps: comma lists) name options that exist in
    conf/. Hydra would say so too, over many lines and only for the first; this names the key, the value and every
    choice. Sweep syntax beyond a comma list (glob(), range()) is left to Hydra."""
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS or "(" in value:
            continue
        known = choices(key, conf_dir)
        for option in value.split(","):
            if option and option not in known:
                raise BadInput(f"{key}={option}: no such option; choices are {', '.join(known)}")


def _number(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    return node


def check_config(cfg) -> None:
    """The values a job is refused for whatever the model and data: ranges of the method's and training's
    numbers."""
    def need(key: str, ok, accepted: str):
        value = _number(cfg, key)
        if value is None:
            return
        try:
            good = ok(float(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise BadInput(f"{key}={value}: expected {accepted}")

    positive = lambda v: v > 0 and math.isfinite(v)
    if cfg.method.get("name") not in ("full", "frozen"):  # the adapter's numbers mean nothing for these
        need("method.rank", lambda v: v >= 1 and v == int(v), "an integer ≥ 1")
        need("method.alpha", positive, "a number > 0")
        need("method.dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
        need("method.b_lr_ratio", positive, "a number > 0")
    need("train.batch_size", lambda v: v >= 1 and v == int(v), "an integer ≥ 1")
    need("train.grad_accum", lambda v: v >= 1 and v == int(v), "an integer ≥ 1")
    if not (cfg.train.get("max_steps") or 0) > 0:  # epochs decide the length: none would train nothing
        need("train.epochs", lambda v: v >= 1 and v == int(v), "an integer ≥ 1 (or train.max_steps > 0)")
    need("train.lr", positive, "a number > 0")
    need("protocol.lr_scale", positive, "a number > 0")
    need("task.max_seq_len", lambda v: v >= 1 and v == int(v), "an integer ≥ 1")
    compile_ = str(cfg.train.get("compile", "auto"))
    if compile_ not in ("auto", "none", "blocks", "graph", "eager_graph"):
        raise BadInput(f"train.compile={compile_}: expected auto, none, blocks, graph or eager_graph")
    if compile_ in ("blocks", "graph", "eager_graph") and str(cfg.train.get("strategy", "single")) == "fsdp":
        raise BadInput(f"train.compile={compile_}: not supported with train.strategy=fsdp yet (untested); "
                       "expected train.strategy=single or ddp")
    bucket = cfg.train.get("bucket", "auto")
    if str(bucket) != "auto" and not (isinstance(bucket, int) and not isinstance(bucket, bool) and bucket >= 0):
        raise BadInput(f"train.bucket={bucket}: expected auto or an integer ≥ 0 (0: each batch padded to its longest)")
    need("train.log_every", lambda v: v >= 1 and v == int(v), "an integer ≥ 1")
    if not isinstance(cfg.train.get("group_by_length", False), bool):
        raise BadInput(f"train.group_by_length={cfg.train.group_by_length}: expected true or false")
    impl = str(cfg.train.get("optimizer_impl", "auto"))
    if impl not in ("auto", "fused", "foreach"):
        raise BadInput(f"train.optimizer_impl={impl}: expected auto, fused or foreach")
    from . import plans  # (plans imports this module)

    plans.check(cfg.method)
    segments = cfg.train.get("expandable_segments", "auto")
    if str(segments) != "auto" and not isinstance(segments, bool):
        raise BadInput(f"train.expandable_segments={segments}: expected auto, true or false")
    if cfg.train.get("device_memory_gib") is not None:
        need("train.device_memory_gib", positive, "a number > 0 (GiB) or null")
    if cfg.train.get("memory_budget_gib") is not None:
        need("train.memory_budget_gib", positive, "a number > 0 (GiB) or null")
        need("train.plan_trials", lambda v: v >= 0 and v == int(v), "an integer ≥ 0 (0: the step-time model chooses)")
        need("train.plan_trial_s", lambda v: v >= 0, "a number ≥ 0 (seconds a trial times, at least 3 steps)")
        need("train.plan_trial_max_s", lambda v: v >= 0,
             "a number ≥ 0 (seconds of steps a plan races for at most; ≤ train.plan_trial_s: no race)")
        need("train.plan_retime", lambda v: v >= 0, "a number ≥ 0 (0: each plan timed once)")
        workers = cfg.train.get("plan_workers", "auto")
        if str(workers) != "auto" and not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
            raise BadInput(f"train.plan_workers={workers}: expected auto or an integer ≥ 1 (1: predicted here, one "
                           "after another)")
        if not isinstance(cfg.train.get("plan_interleave", True), bool):
            raise BadInput(f"train.plan_interleave={cfg.train.plan_interleave}: expected true or false")
        if cfg.train.get("plan"):
            raise BadInput(f"train.plan={cfg.train.plan}: not with train.memory_budget_gib (the budget chooses the "
                             "plan); expected one of them")
    if (plans.parse(cfg.method.get("offload", False), "method.offload")[0] != "none" and compile_ == "blocks"
            and str(cfg.method.get("offload_ops", "all")) == "linear_outputs"):
        raise BadInput("train.compile=blocks: not with method.offload_ops=linear_outputs (a compiled block's linear "
                       "outputs are inside its graph, where the offload cannot tell them); expected "
                       "method.offload_ops=all, or train.compile=auto or none")
    if plans.parse(cfg.method.get("offload_weights", False), "method.offload_weights")[0] != "none":
        strategy = str(cfg.train.get("strategy") or "single")
        if strategy == "fsdp":
            raise BadInput("method.offload_weights: not with train.strategy=fsdp (FSDP moves the blocks' weights "
                           "itself); expected train.strategy=single or ddp, or method.offload_weights=false")
        if cfg.get("model") is not None and cfg.model.get("quantize"):
            raise BadInput(f"method.offload_weights: not with model.quantize={cfg.model.quantize} (untested with "
                           "quantized weights); expected method.offload_weights=false")
    need("method.offload_min_kib", lambda v: v >= 0, "a number ≥ 0")
    need("method.offload_inflight_mib", lambda v: v > 0, "a number > 0")
    stacked = str(cfg.method.get("stacked", False)).lower()
    if stacked not in ("auto", "false", "true", "merged"):
        raise BadInput(f"method.stacked={cfg.method.stacked}: expected auto, false, true or merged")
    check_quantize(cfg)
    from . import loss  # (loss imports this module)

    loss.setting(cfg.model.get("fused_loss", "auto"))
    if cfg.model.get("path"):
        check_model_dir(str(cfg.model.path))
    if cfg.model.get("adapter"):
        check_adapter_dir(str(cfg.model.adapter))
        if not int(cfg.method.get("rank") or 0) > 0:
            raise BadInput(f"model.adapter={cfg.model.adapter}: method={cfg.method.get('name')} has no adapter layers "
                           "to load it into; expected an adapter method (lora, lorafa, lorafa_v2)")


def check_quantize(cfg) -> None:
    """`model.quantize` (nf4, int8 or null; `lorafa.quantize`): bitsandbytes importable, and only with what a frozen
    quantized base can run with — an adapter or frozen method, one process, the eager step, a device bitsandbytes
    has kernels for (the device `auto` resolves to is checked when the model is built)."""
    from . import quantize

    kind = cfg.model.get("quantize")
    if kind is None:
        return
    where = f"model.quantize={kind}"
    if kind not in quantize.KINDS:
        raise BadInput(f"{where}: expected {', '.join(quantize.KINDS)} or null")
    if cfg.method.get("train_base", False):
        raise BadInput(f"{where}: not with method={cfg.method.get('name')}, which trains the base weights (a quantized "
                       "weight takes no gradient); expected an adapter method (lora, lorafa, lorafa_v2) or frozen")
    strategy = str(cfg.train.get("strategy") or "single")
    if strategy != "single":
        raise BadInput(f"{where}: not with train.strategy={strategy} (sharding or broadcasting the packed weights "
                       "apart from their quantization state is untested); expected train.strategy=single")
    compile_ = str(cfg.train.get("compile", "auto"))
    if compile_ not in ("auto", "none"):
        raise BadInput(f"{where}: not with train.compile={compile_} (the quantized layers run eager: untested compiled "
                       "or in a CUDA graph); expected train.compile=auto or none")
    device = str(cfg.get("device") or "auto")
    if device != "auto":
        check_quantize_device(kind, device)
    why = quantize.available()
    if why is not None:
        raise BadInput(f"{where}: bitsandbytes does not import ({why}); expected it installed: "
                       "pip install 'lorafa[quant]'")


def check_quantize_device(kind: str, device) -> None:
    from . import quantize

    kind_of = str(device).split(":")[0]
    if kind_of not in quantize.DEVICES:
        raise BadInput(f"model.quantize={kind}: not on device {device} (bitsandbytes has no 4- or 8-bit kernels "
                       f"there); expected a {', '.join(quantize.DEVICES)} device or model.quantize=null")


def check_adapter_dir(path: str) -> None:
    """`model.adapter` must be a PEFT adapter directory: adapter_config.json and adapter_model.safetensors (or
    .bin), as `PeftModel.save_pretrained` writes them. What the files hold is judged by `lorafa.adapters.read_peft`."""
    where = Path(path).expanduser()
    expected = "expected a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)"
    if not where.is_dir():
        raise BadInput(f"model.adapter={path}: no such directory; {expected}")
    found = sorted(p.name for p in where.iterdir())[:8]
    if not (where / "adapter_config.json").is_file():
        raise BadInput(f"model.adapter={path}: not an adapter directory (no adapter_config.json; it holds {found}); "
                       f"{expected}")
    if not any((where / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise BadInput(f"model.adapter={path}: no adapter_model.safetensors or adapter_model.bin (it holds {found}); "
                       f"{expected}")


def check_model_dir(path: str) -> None:
    """`model.path` must be a Hugging Face checkpoint directory: a folder with config.json."""
    where = Path(path).expanduser()
    if not where.is_dir():
        raise BadInput(f"model.path={path}: no such directory; expected a Hugging Face checkpoint directory "
                       "(config.json and the weights)")
    if not (where / "config.json").is_file():
        found = sorted(p.name for p in where.iterdir())[:8]
        raise BadInput(f"model.path={path}: not a model directory (no config.json; it holds {found}); expected a "
                       "Hugging Face checkpoint directory, e.g. one written by save_pretrained")


def positions_limit(config, family: str) -> int | None:
    """The longest input the model can take, from its config: learned absolute positions (RoBERTa keeps
    padding_idx + 1 of them unused), rotary/learned positions of decoders; None for relative positions (T5)."""
    if family == "encoder-decoder":
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return int(limit)


def check_positions(cfg, config, family: str) -> None:
    limit = positions_limit(config, family)
    seq = int(cfg.task.max_seq_len)
    if limit is not None and seq > limit:
        raise BadInput(f"task.max_seq_len={seq}: larger than the model's {limit} positions "
                       f"({getattr(config, 'model_type', '?')} max_position_embeddings); expected ≤ {limit}")
