"""Training throughput of full, lora, lorafa and lorafa_v2 on the same model and batch, in one process, interleaved.

    python -m lorafa.bench                                              # roberta-base, t5-large, llama-7b (a GPU)
    python -m lorafa.bench --models roberta-base --shape 32x128 --modes eager compile
    python -m lorafa.bench --models tiny-roberta --device cpu --steps 2 --rounds 1 --out /tmp/t.parquet   # smoke

For each model: random-init weights from its real config (no download), synthetic full-length batches, bf16
autocast with frozen weights in bf16 on CUDA, r = 8 on every linear layer of the blocks, no adapter dropout, AdamW
(fused on CUDA) over what trains. Every (method, mode) is one *setting*. Modes:
  eager           plain PyTorch
  compile         torch.compile (default mode) of each transformer block (`--compile-scope blocks`: identical
                  blocks share one compiled graph, so compiling takes seconds) or of the whole model (`model`)
  graph           the whole training step (forward, backward, AdamW) captured once as a CUDA graph and replayed:
                  eager kernels, no CPU work per step (CUDA)
  compile_graph   compile, then the whole step as a CUDA graph (CUDA)
  cudagraphs      torch.compile(mode="reduce-overhead"): inductor's CUDA graphs of the compiled regions (CUDA)
Default: eager, compile, graph, compile_graph on CUDA; eager elsewhere. Each round builds every setting in turn,
runs `--warmup` optimizer steps (compilation happens there), then `--steps` timed steps (synchronised), and frees
it; the order of
the settings alternates between rounds, so slow drift (clocks, temperature) falls on every setting alike. A
setting's tokens/s is its median over rounds; a method's best setting (`best=True`) is its fastest. LoRA-FA's
layer is part of the setting (`--layers`, column `layer`): `two_matmul` (`_LoRAFAFunction`), `stacked` (W and A
in one matrix, `_LoRAFAStackedFunction`) or `merged` (W + s·B·A formed for the step, `_LoRAFAMergedFunction`).
So is a memory plan (`--plans`, column `plan_name`: the names `train.plan` takes, `lorafa.plans`, e.g. `none all
offload_all all+keep4`; default: none given, the method as configured): plans compared side by side, interleaved,
where jobs one after another would measure each at another moment of the host's speed.

    python -m lorafa.bench --models roberta-large --methods lorafa --modes eager --layers two_matmul \\
        --override method.dropout=0.1 --plans none elementwise all offload_all --rounds 5 --out /tmp/plans.parquet

`--resident` builds each setting once, in the first round (warm-up, memory, FLOPs as above), keeps it on the
device, and has later rounds only time `--steps` steps of each: rounds of seconds, not of a build and warm-up of
every setting, so many short rounds fit in a run and a ratio paired by round compares steps seconds apart (eager
mode; where every setting fits on the device at once; column `resident`).

MFU: the FLOPs of one training step are counted once per setting with `torch.utils.flop_counter` (forward and
backward as executed: LoRA-FA has no weight-gradient matmuls), and `--peak-tflops` is the device's bf16 matmul
rate, measured here on 8192³ products unless given; `mfu` = step FLOPs / step time / that rate.

Writes `--out` (default `results/throughput.parquet`: model, method, batch_size, seq_len, compiled, compile_mode,
tokens_per_s, step_time_s, mem_peak_gib, device, best, ratios, MFU and provenance) and prints the ratios
LoRA-FA ÷ full and LoRA-FA ÷ LoRA at each method's best setting.
"""

from __future__ import annotations

import argparse
import gc
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch

from . import measure
from .step import after_failed_capture as _after_failed_capture
from .step import compile_limits as _compile_limits
from .step import unseen_capture  # the capture code jobs share (`lorafa.step`)

METHODS = ("full", "lora", "lorafa", "lorafa_v2")
MODES = ("eager", "compile", "graph", "compile_graph", "cudagraphs")
CUDA_MODES = ("graph", "compile_graph", "cudagraphs")
DEFAULT_CUDA_MODES = ("eager", "compile", "graph", "compile_graph")
SHAPES = {"roberta-base": (32, 128), "roberta-large": (32, 128), "t5-large": (32, 128), "t5-base": (32, 128),
          "llama-7b": (4, 512), "llama-13b": (4, 512)}
DEFAULT_SHAPE = (4, 32)  # tiny models (smoke runs)
CAPTURE_WARMUP = 3  # eager (or compiling) steps on a side stream before a whole-step capture
TARGET_LEN = 128  # T5's target length (32 × 128 inputs + 128 targets)


def compose(model: str, method: str, batch: int, seq: int, extra: list[str] = (), layer: str = "stacked"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from . import sources

    conf = Path(sources.experiments_root()) / "conf"
    overrides = [f"model={model}", "model.init=random", f"method={method}", "task=synthetic",
                 f"task.max_seq_len={seq}", f"task.target_len={TARGET_LEN if 't5' in model else seq}",
                 f"train.batch_size={batch}", "output_dir=/tmp/lorafa-bench",
                 *([] if method == "full" else ["method.dropout=0"]),
                 *([f"method.stacked={STACKED_KEY[layer]}"] if method.startswith("lorafa") else []), *extra]
    with initialize_config_dir(str(conf), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


class Setting:
    """One (method, mode) built on the device: model, optimizer, one batch, and its step function."""

    def __init__(self, cfg, mode: str, device: torch.device, scope: str = "blocks"):
        from . import loss, methods, models, plans
        from .train import autocast_dtype, frozen_weight_dtype, make_optimizer

        torch.manual_seed(0)
        self.mode, self.device = mode, device
        self.amp = autocast_dtype(str(cfg.train.precision), device)
        net = models.build(cfg.model, num_labels=2, device=device, dtype=torch.float32)
        method = cfg.method
        if cfg.train.get("plan"):  # a memory plan's method keys, as a job with `train.plan` takes them
            from omegaconf import OmegaConf

            plan = plans.named(str(cfg.train.plan), len(plans.checkpoint_layers(net.model)),
                               offload=device.type == "cuda")
            method = OmegaConf.merge(cfg.method, plan.keys())
            if mode.endswith("graph") and method.get("offload", False):  # a failed capture can abort the process
                raise ValueError(f"plan {cfg.train.plan} in mode {mode}: offloading is not captured in a CUDA graph "
                                 "(host copies on a side stream, decided per tensor on the host)")
        applied = methods.apply(net, method, cfg.model.get("target_modules"),
                                frozen_dtype=frozen_weight_dtype(cfg.train, device))
        self.trainable = applied.trainable_params
        self.fused_loss = loss.active(net.model)
        self.plan = plans.describe(method)
        # torch's FLOP counter hooks every module's backward, which element-wise recomputation's own autograd.grad
        # inside a backward does not allow: such a setting's FLOPs (and MFU) stay NaN
        self.counts_flops = str(method.get("recompute", "none")) == "none"
        self.checkpointed_blocks = applied.checkpointed_blocks
        self.model = net.model.train()
        self.optimizer = make_optimizer(self.model, cfg.train, fused=device.type == "cuda",
                                        capturable=mode.endswith("graph"),
                                        b_lr_ratio=float(cfg.method.get("b_lr_ratio", 1.0)))
        self.batch = _batch(net.family, int(cfg.train.batch_size), int(cfg.task.max_seq_len),
                            int(cfg.task.target_len), net.model.config.vocab_size, device)
        self.tokens = self.batch["input_ids"].numel() + (self.batch["labels"].numel()
                                                         if net.family == "encoder-decoder" else 0)
        self.forward, self.scope, self.graph = self.model, scope, None
        self.steps_taken, self.loss = 0, None  # optimizer steps taken by `prepare`; the last step's loss

    def host_offload_gib(self) -> float:
        """Saved tensors the last step held on the host (`lorafa.plans.host_bytes`), GiB."""
        from . import plans

        return plans.host_bytes(self.model) / 1024**3

    def host_weights_gib(self) -> float:
        """Frozen weights held on the host between forward and backward (`lorafa.plans.host_weight_bytes`), GiB."""
        from . import plans

        return plans.host_weight_bytes(self.model) / 1024**3

    def prepare(self) -> None:
        """Compile and/or capture for the setting's mode (after `flops`, which counts the eager model)."""
        from .distributed import transformer_blocks

        if self.mode in ("compile", "compile_graph", "cudagraphs"):
            _compile_limits()
            kw = {"mode": "reduce-overhead"} if self.mode == "cudagraphs" else {}
            blocks = transformer_blocks(self.model) if self.scope == "blocks" else []
            if blocks:  # regional compilation: identical blocks share one compiled graph (seconds, not minutes)
                for block in blocks:
                    block.compile(**kw)
            else:
                self.forward = torch.compile(self.model, **kw)
        if self.mode.endswith("graph"):
            self._capture()

    def _autocast(self):
        # a whole-step CUDA graph needs autocast's cast cache off (cached casts made during capture would be freed)
        return torch.autocast(self.device.type, dtype=self.amp, cache_enabled=not self.mode.endswith("graph")) \
            if self.amp else nullcontext()

    def _eager_step(self, zero: bool = True) -> None:
        with self._autocast():
            loss = self.forward(**self.batch).loss
        loss.backward()
        self.loss = loss.detach()  # in a captured step: the graph's output, rewritten by every replay
        if self.optimizer is not None:
            self.optimizer.step()
        if zero:
            self.model.zero_grad(set_to_none=True)

    def _capture(self) -> None:
        """The whole training step (forward, backward, optimizer step) as one CUDA graph, as in PyTorch's
        whole-network capture recipe: 3 warm-up steps on a side stream (compiles what is compiled), then the
        capture with gradients unset, so backward allocates them in the graph's pool and every replay rewrites
        them. No CPU work is left per step: no Python, no dispatch, no kernel launches."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP):
                self._eager_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.steps_taken = CAPTURE_WARMUP
        self.model.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # compiled code must not recompile inside the capture (compiling launches work that invalidates it): the
        # capture runs on the warm-up's stream (torch.compile guards on the current stream where code touches it),
        # transformers takes the warm-up's path (`unseen_capture`), and a recompile raises at once, naming the guard
        stance = torch.compiler.set_stance("fail_on_recompile") if self.mode == "compile_graph" else nullcontext()
        pool, current = torch.cuda.graph_pool_handle(), torch.cuda.current_stream(self.device)
        # the step's memory is what the capture allocates (activations, gradients: its pool); replays allocate nothing
        measure.reset_peak(self.device)
        try:
            # thread_local: the backward runs in autograd's device thread, which is part of this capture
            with stance, torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"), \
                    unseen_capture():
                self._eager_step(zero=False)
        except Exception:
            _after_failed_capture(self.device, graph, pool, current)
            raise
        self.graph = graph

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        self._eager_step()

    def flops(self) -> int:
        """FLOPs of one forward + backward as executed (eager; the optimizer's elementwise work not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
                loss = self.model(**self.batch).loss
            loss.backward()  # outside autocast, as in `step`
        self.model.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def _batch(family: str, batch: int, seq: int, target_len: int, vocab: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), generator=g).to(device)
    if family == "encoder":
        labels = torch.randint(0, 2, (batch,), generator=g).to(device)
    elif family == "encoder-decoder":
        labels = torch.randint(5, vocab, (batch, target_len), generator=g).to(device)
    else:
        labels = ids.clone()
    return {"input_ids": ids, "labels": labels}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# a plain timed loop, not torch.utils.benchmark.Timer (whose timeit warms up twice): the rate the rows record was
# measured by this one
def measure_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """The device's bf16 matmul rate on random n³ products (mean of `reps` after 3 warm-ups), TFLOP/s."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def profile_steps(s: Setting, steps: int, out: Path | None) -> dict:
    """Device time per step over `steps` more steps (torch.profiler): `busy_s`, the sum of kernel times, and
    `kernels_ms`, that sum by kind of kernel (`kernel_kind`). Busy time ÷ step time near 1: the step is bound by
    the GPU's work; far below 1: by launching it (Python, dispatch, kernel launches). With `out`, the profiler's
    table of the costliest operators is written there."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            s.step()
        _sync(s.device)
    events = prof.key_averages()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        key = "self_device_time_total" if s.device.type == "cuda" else "self_cpu_time_total"
        out.write_text(events.table(sort_by=key, row_limit=40))
    if s.device.type != "cuda":
        return {"busy_s": float("nan"), "kernels_ms": {}}
    kinds = device_seconds_by_kind(prof.events())
    return {"busy_s": sum(kinds.values()) / steps, "kernels_ms": {k: v / steps * 1e3 for k, v in kinds.items()}}


KERNEL_KINDS = ("matmul_fp32", "matmul", "attention", "optimizer", "inductor", "copy", "other")


def kernel_kind(name: str) -> str:
    """What a device kernel does, from its name: `matmul_fp32` (fp32 GEMMs: under bf16 autocast a sign that
    something left the bf16 path, e.g. SDPA's math kernel), `matmul` (cuBLAS / cuBLASLt / CUTLASS GEMMs),
    `attention` (flash, memory-efficient, cuDNN attention and softmax), `optimizer` (the fused / multi-tensor
    AdamW), `inductor` (torch.compile's generated Triton kernels), `copy` (memcpy / memset) or `other` (ATen's
    elementwise, reductions, norms, embeddings, losses)."""
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "copy"
    if any(k in n for k in ("flash", "fmha", "attention", "softmax", "attn", "sdpa")):  # before matmul: fmha_cutlass
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "gemv", "splitkreduce")):
        return "matmul_fp32" if "f32f32" in n or "sgemm" in n else "matmul"
    if "adam" in n or "multi_tensor_apply" in n:
        return "optimizer"
    if n.startswith("triton") or "triton_" in n:
        return "inductor"
    return "other"


def device_seconds_by_kind(events) -> dict[str, float]:
    """Seconds of device work among profiler events (kernels, copies and memsets only), by `kernel_kind`. CPU
    operators carry the device time of the kernels they launched, and user annotations on the device timeline
    ("## Call CompiledFxGraph", "Optimizer.step") span kernels: both would count the same kernels twice."""
    from torch.autograd import DeviceType

    out = dict.fromkeys(KERNEL_KINDS, 0.0)
    for e in events:
        if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False):
            out[kernel_kind(e.name)] += e.self_device_time_total / 1e6
    return out


def device_seconds(events) -> float:
    """Seconds of device work among profiler events (see `device_seconds_by_kind`)."""
    return sum(device_seconds_by_kind(events).values())


def run_setting(cfg, mode: str, device: torch.device, warmup: int, steps: int, count_flops: bool,
                profile_to: Path | None = None, scope: str = "blocks", keep: bool = False) -> dict:
    """Build, warm up, time `steps` optimizer steps, free. Returns step time, peak memory, (once) FLOPs, and
    with `profile_to` the device-busy time per step (`profile_steps`, after the timed steps). `keep`: do not free;
    the built setting is returned as `setting`, for `time_steps` in later rounds (`--resident`).

    `mem_peak_gib`: the most allocated by one training step (weights, gradients, optimizer state, activations),
    less what was allocated before the setting was built (`mem_held_gib`: what earlier settings left, ~0; with
    `--resident`, the settings kept before it: on an H200 the peaks come out the same to 8 KiB). Without
    a CUDA graph that is the peak over the timed steps; with one it is the capture's peak, because a replay
    allocates nothing and a graph's activations are free blocks of its private pool between replays (counting
    only the timed replays, as commit 6703f21 did, left activations out: t5-large LoRA 1.57 GiB, weights alone).
    `mem_reserved_gib`: the most the caching allocator reserved over the same span (a graph's whole pool, the
    allocator's rounding and fragmentation), less what it reserved before the build: the device memory the
    setting occupied, as `nvidia-smi` would show it without the CUDA context. Neither is the process's peak, which
    also held the eager FLOP-count step, compilation and whatever earlier settings left — at commit 7892838
    roberta-base full FT read 4.07 GiB interleaved against 3.12 run first."""
    held, reserved = measure.settle(device)
    s = Setting(cfg, mode, device, scope)
    from torch._dynamo.utils import counters

    flops = s.flops() if count_flops and s.counts_flops else None
    counters.clear()
    t0 = time.perf_counter()
    s.prepare()  # compiles lazily; the graph modes take CAPTURE_WARMUP of the warm-up steps and capture
    for _ in range(max(0, warmup - s.steps_taken)):
        s.step()
    _sync(device)
    warmup_s = time.perf_counter() - t0  # compilation and CUDA-graph capture happen here
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if s.graph is None:  # a graph's peak was started before its capture
        measure.reset_peak(device)
    elapsed = time_steps(s, steps)
    cuda, gib = device.type == "cuda", 1024**3
    out = {"step_time_s": elapsed, "tokens": s.tokens,
           "mem_peak_gib": (torch.cuda.max_memory_allocated(device) - held) / gib if cuda else float("nan"),
           "mem_reserved_gib": (torch.cuda.max_memory_reserved(device) - reserved) / gib if cuda else float("nan"),
           "mem_held_gib": held / gib if cuda else float("nan"), "flops": flops,
           "trainable_params": s.trainable, "fused_loss": s.fused_loss, "plan": s.plan, "checkpointed_blocks": s.checkpointed_blocks,
           "host_offload_gib": s.host_offload_gib(), "host_weights_gib": s.host_weights_gib(), "warmup_s": warmup_s,
           "compiled_graphs": graphs, "graph_breaks": breaks,
           "final_loss": float(s.loss), "optimizer_steps": max(warmup, s.steps_taken) + steps}
    if profile_to is not None:
        out.update(profile_steps(s, 3, profile_to))
    if keep:
        return {**out, "setting": s}
    del s
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # the next setting compiles its own model
    return out


def time_steps(s: Setting, steps: int) -> float:
    """Seconds per optimizer step over `steps` steps of a built setting (synchronised before and after)."""
    _sync(s.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        s.step()
    _sync(s.device)
    return (time.perf_counter() - t0) / steps


class Stopped(BaseException):
    """SIGTERM (`timeout`, a scheduler) or Ctrl-C: the bench stops and writes the rounds it finished. A
    BaseException, so a setting's `except Exception` (failures are rows) does not swallow it."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


LAYERS = ("stacked", "two_matmul", "merged")  # LoRA-FA's layers (`lorafa.adapters`)
STACKED_KEY = {"two_matmul": "false", "stacked": "true", "merged": "merged"}  # their `method.stacked`


def layer_variants(method: str, layers=LAYERS) -> list[str]:
    """The LoRA-FA layers to try for a method; "none" for the methods without one. No layer wins
    everywhere on an H200 (commit 4cd9f6a, ms a step): the stacked one in eager and in `graph` (roberta-base
    10.1 vs 10.5, t5-large 79.8 vs 81.0), the two-matmul one in `compile_graph` (8.27 vs 8.61, 54.7 vs 55.5); in
    both their rank-r work on N × d activations took more matmul time than full fine-tuning's weight gradients
    (t5-large 30.1 and 27.0 vs 25.7 ms), which the merged layer removes. So the default tries all three."""
    if not method.startswith("lorafa"):
        return ["none"]
    return [layer for layer in LAYERS if layer in layers]


def bench_model(model: str, methods: list[str], modes: list[str], *, shape: tuple[int, int], device: torch.device,
                warmup: int, steps: int, rounds: int, layers=LAYERS, scope: str = "blocks",
                profile_dir: Path | None = None, overrides: list[str] = (), plans=(), resident: bool = False,
                log=print) -> list[dict]:
    batch, seq = shape
    settings = [(m, mode, lay, plan) for m in methods for mode in modes for lay in layer_variants(m, layers)
                for plan in (plans or [""])]
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    info: dict[tuple, dict] = {}
    at = {"round": 0}
    try:
        _run_rounds(model, settings, times, info, at, device=device, batch=batch, seq=seq, warmup=warmup,
                    steps=steps, rounds=rounds, scope=scope, profile_dir=profile_dir, overrides=overrides,
                    resident=resident, log=log)
        stopped = ""
    except (Stopped, KeyboardInterrupt) as why:
        stopped = f"stopped by {why or type(why).__name__} in round {at['round']} of {rounds}"
        log(f"  {model}: {stopped}; writing the rounds finished")
        gc.collect()
    rows = []
    for key in settings:
        method, mode, layer, plan = key
        slot, t = info.get(key, {}), times[key]
        ok = bool(t)
        step = statistics.median(t) if ok else float("nan")
        status = "ok" if ok else ("stopped" if stopped and key not in info else slot.get("status", "failed"))
        rows.append({"model": model, "method": method, "batch_size": batch, "seq_len": seq,
                     "compiled": mode != "eager", "compile_mode": mode,
                     "compile_scope": "none" if mode == "eager" else scope,
                     "layer": layer, "stacked": layer in ("stacked", "merged"), "plan_name": plan,
                     "plan": slot.get("plan", ""), "checkpointed_blocks": slot.get("checkpointed_blocks", 0),
                     "host_offload_gib": slot.get("host_offload_gib", float("nan")),
                     "host_weights_gib": slot.get("host_weights_gib", float("nan")),
                     "fused_loss": slot.get("fused_loss", False), "status": status,
                     "stopped": stopped,
                     "error": slot.get("error", stopped if status == "stopped" else ""),
                     "tokens_per_s": slot.get("tokens", 0) / step if ok else float("nan"),
                     "step_time_s": step, "step_time_all_s": t, "mem_peak_gib": slot.get("mem_peak_gib", float("nan")),
                     "mem_reserved_gib": slot.get("mem_reserved_gib", float("nan")),
                     "mem_held_gib": slot.get("mem_held_gib", float("nan")),
                     "step_flops": float(slot.get("flops") or float("nan")),
                     "device_busy_frac": slot.get("busy_s", float("nan")) / step if ok else float("nan"),
                     **{f"kernel_{k}_ms": slot.get("kernels_ms", {}).get(k, float("nan")) for k in KERNEL_KINDS},
                     "trainable_params": slot.get("trainable_params", 0), "rounds": len(t), "steps": steps,
                     "warmup_s": slot.get("warmup_s", float("nan")),
                     "final_loss": slot.get("final_loss", float("nan")),
                     "optimizer_steps": slot.get("optimizer_steps", 0),
                     "compiled_graphs": slot.get("compiled_graphs", 0), "graph_breaks": slot.get("graph_breaks", 0),
                     "warmup_steps": warmup, "resident": resident})
    return rows


def _run_rounds(model, settings, times, info, at, *, device, batch, seq, warmup, steps, rounds, scope, profile_dir,
                overrides=(), resident=False, log=print):
    """Every setting once a round, in alternating order. `resident`: each setting is built (warm-up, memory, FLOPs)
    in the first round and kept, and later rounds only time its `steps` steps, so that rounds are short and many:
    two settings' steps in one round are seconds apart, not a build and warm-up of every other setting apart."""
    live: dict[tuple, Setting] = {}
    try:
        for r in range(rounds):
            at["round"] = r + 1
            order = settings if r % 2 == 0 else settings[::-1]
            for key in order:
                if resident and key in info and key not in live:  # failed when built: not built again
                    continue
                if key in live:
                    _time_resident(key, live, times, info, r, model, steps, device, log)
                    continue
                _build_and_time(key, live if resident else None, times, info, r, model=model, device=device,
                                batch=batch, seq=seq, warmup=warmup, steps=steps, scope=scope,
                                profile_dir=profile_dir, overrides=overrides, log=log)
    finally:
        live.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _setting_name(key) -> str:
    method, _, layer, plan = key
    return (method if layer in ("none", "two_matmul") else f"{method}_{layer}") + (f"_{plan}" if plan else "")


def _time_resident(key, live, times, info, r, model, steps, device, log) -> None:
    """A later round of a kept setting: its `steps` steps timed, nothing rebuilt or measured again."""
    name, mode = _setting_name(key), key[1]
    try:
        step = time_steps(live[key], steps)
    except Exception as err:  # noqa: BLE001 - kept settings share the device: one that stops fitting is dropped
        live.pop(key)
        info[key]["error"] = f"round {r + 1}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        log(f"  round {r + 1} {model} {name:17s} {mode:10s} dropped: {info[key]['error'][:160]}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    times[key].append(step)
    log(f"  round {r + 1} {model} {name:17s} {mode:10s} {step * 1e3:8.2f} ms/step "
        f"{live[key].tokens / step:10.0f} tok/s  (kept)")


def _build_and_time(key, live, times, info, r, *, model, device, batch, seq, warmup, steps, scope, profile_dir,
                    overrides, log) -> None:
    """Build a setting, warm it up, time it and measure its memory (`run_setting`); kept in `live` unless None."""
    method, mode, layer, plan = key
    cfg = compose(model, method, batch, seq, [f"device={device.type}", *overrides,
                                              *([f"train.plan={plan}"] if plan else [])], layer=layer)
    name = _setting_name(key)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    failed = False
    started = time.perf_counter()
    try:
        first = key not in info
        res = run_setting(cfg, mode, device, warmup, steps, count_flops=first, scope=scope,
                          profile_to=profile_dir / f"{model}_{batch}x{seq}_{name}_{mode}.txt"
                          if profile_dir is not None and first else None, keep=live is not None)
    except Exception as err:  # noqa: BLE001 - an expected failure (OOM, a compile error) is a row
        oom = isinstance(err, torch.cuda.OutOfMemoryError)
        head = (str(err).splitlines() or [""])[0]
        info.setdefault(key, {}).update(status="oom" if oom else "failed",
                                        error=f"{type(err).__name__}: {head}")
        log(f"  round {r + 1} {model} {name:17s} {mode:10s} {info[key]['error'][:160]}")
        if not oom:  # the whole story on stderr: a failed capture or compile is found from it
            import traceback

            traceback.print_exc(limit=-12)
        failed = True
    if failed:  # cleaned up here, not in `except`: the exception's frames hold the setting's model
        _free_after_failure(device, held, log)
        return
    if live is not None:
        live[key] = res.pop("setting")
    times[key].append(res["step_time_s"])
    slot = info.setdefault(key, {})
    slot.setdefault("warmup_s", res["warmup_s"])  # the first round's: a cold compile
    mem = ("mem_peak_gib", "mem_reserved_gib", "mem_held_gib")
    slot.update({k: v for k, v in res.items() if v is not None and k not in ("step_time_s", "warmup_s", *mem)})
    for k in mem:  # the most any round saw (NaN off CUDA)
        if k in res and (k not in slot or res[k] > slot[k]):
            slot[k] = res[k]
    log(f"  round {r + 1} {model} {name:17s} {mode:10s} {res['step_time_s'] * 1e3:8.2f} ms/step "
        f"{res['tokens'] / res['step_time_s']:10.0f} tok/s  {res.get('mem_peak_gib', float('nan')):6.2f} GiB  "
        f"setting {time.perf_counter() - started:4.0f} s")
    if res.get("kernels_ms"):
        log("    kernels, ms a step: " + ", ".join(f"{k} {v:.2f}" for k, v in res["kernels_ms"].items()))


def _free_after_failure(device: torch.device, held: int, log) -> None:
    """Free what a failed setting left, and say how much stays allocated: every later setting would run with that
    much less (a failed capture's private pool is given back by `_after_failed_capture`)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        left = (torch.cuda.memory_allocated(device) - held) / 1024**3
        if left > 1.0:
            log(f"    {left:.1f} GiB stay allocated after the failure; later settings run with that much less")


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mark each method's best setting and the ratios of LoRA-FA (and every method) to full FT and LoRA there."""
    table = table.copy()
    table["best"] = False
    ok = table[table["status"] == "ok"]
    for _, g in ok.groupby(["model", "batch_size", "seq_len", "method"]):
        table.loc[g["tokens_per_s"].idxmax(), "best"] = True
    best = table[table["best"]].set_index(["model", "batch_size", "seq_len", "method"])["tokens_per_s"]
    for ref in ("full", "lora"):
        def ratio(row, ref=ref):
            key = (row["model"], row["batch_size"], row["seq_len"], ref)
            return row["tokens_per_s"] / best[key] if key in best.index else float("nan")
        table[f"vs_{ref}_best"] = table.apply(ratio, axis=1)
    return table


def _finish(frame: pd.DataFrame, peak: float, device: torch.device, run_id: str = "",
            command: str = "") -> pd.DataFrame:
    """Best settings, ratios, MFU and provenance columns; `config_hash` names a setting measured by one protocol
    (steps, warm-up, rounds) with one commit on one device: the key of the append-only table."""
    import hashlib
    import json

    import transformers

    from . import results

    table = summarise(frame)
    table["tflops"] = table["step_flops"] / table["step_time_s"] / 1e12
    table["matmul_tflops"] = peak
    table["mfu"] = table["tflops"] / peak
    sha, dirty = results.git_state()
    table = table.assign(device=results.device_name(device), torch_version=torch.__version__,
                         transformers_version=transformers.__version__, git_sha=sha, git_dirty=dirty,
                         experiment="bench", schema_version=results.SCHEMA_VERSION, run_id=run_id, command=command)
    planned = table["plan_name"] != ""  # memory plans compared (`--plans`): not the methods' benchmark (speed.py)
    table.loc[planned, "experiment"] = "bench_plans"
    keys = ["model", "method", "batch_size", "seq_len", "compile_mode", "compile_scope", "stacked", "layer", "steps",
            "warmup_steps", "rounds", "device", "git_sha", "git_dirty", "torch_version"]
    if planned.any():  # rows without a plan keep their keys
        keys.append("plan_name")
    if table["resident"].any():  # so do rows of rebuilt settings
        keys.append("resident")
    table["config_hash"] = [hashlib.sha256(json.dumps([str(r[k]) for k in keys]).encode()).hexdigest()[:16]
                            for _, r in table[keys].iterrows()]
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafa.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["roberta-base", "t5-large", "llama-7b"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES,
                        help="default: eager compile graph compile_graph on CUDA, eager elsewhere")
    parser.add_argument("--shape", help="BATCHxSEQ for every model (default: the paper-scale shape per model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps per setting and round")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS,
                        help="LoRA-FA's layers to measure, each a setting of its own (default: all three; each is "
                             "the faster in some mode or model)")
    parser.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                        help="compile each transformer block (identical blocks share one compiled graph; the "
                             "default) or the whole model as one graph (minutes per setting at 7B scale)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="profile 3 more steps of each setting (first round): DIR/<setting>.txt, and the "
                             "device_busy_frac column (kernel time ÷ step time)")
    parser.add_argument("--plans", nargs="+", default=[], metavar="PLAN",
                        help="memory plans, each a setting of its own (`train.plan` names: none, all, offload_all, "
                             "all+keep4, ...; default: the method as configured)")
    parser.add_argument("--resident", action="store_true",
                        help="build each setting once (first round: warm-up, memory, FLOPs) and keep it on the "
                             "device; later rounds only time --steps steps of each, so rounds can be short and "
                             "many (eager mode only; column resident)")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every setting (e.g. model.arch.hidden_dropout_prob=0)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 matmul rate (default: measured)")
    parser.add_argument("--out", type=Path, default=Path("results/throughput.parquet"))
    parser.add_argument("--run-id", default=None,
                        help="the rows' run_id (default: the start time): one id for a run split over several "
                             "commands, one model each, where one command may not run long enough for all")
    args = parser.parse_args(argv)

    from . import results

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    modes = args.modes or (list(DEFAULT_CUDA_MODES) if device.type == "cuda" else ["eager"])
    if device.type != "cuda" and set(modes) & set(CUDA_MODES):
        parser.error(f"--modes {' '.join(sorted(set(modes) & set(CUDA_MODES)))} need a CUDA device")
    if args.resident and set(modes) != {"eager"}:
        parser.error(f"--resident with --modes {' '.join(sorted(set(modes) - {'eager'}))}: only eager settings are "
                     "kept (compiled ones share torch.compile's caches; graphed ones were not tested kept)")
    peak = args.peak_tflops or measure_matmul_tflops(device)
    if device.type == "cuda":
        print(f"bf16 matmul rate: {peak:.0f} TFLOP/s ({'given' if args.peak_tflops else 'measured, 8192³'})")
    rows = []
    run_id = args.run_id or time.strftime("%Y%m%dT%H%M%S")
    command = " ".join(["python -m lorafa.bench", *(sys.argv[1:] if argv is None else argv)])
    previous = signal.signal(signal.SIGTERM, _raise_stopped)  # `timeout` / a scheduler: keep the finished rounds
    try:
        stopped = ""
        for model in args.models:
            shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape \
                else SHAPES.get(model, DEFAULT_SHAPE)
            print(f"{model} {shape[0]}×{shape[1]}: {', '.join(args.methods)} × {', '.join(modes)}", flush=True)
            rows += bench_model(model, args.methods, modes, shape=shape, device=device, warmup=args.warmup,
                                steps=args.steps, rounds=args.rounds, layers=args.layers, scope=args.compile_scope,
                                profile_dir=args.profile, overrides=args.override, plans=args.plans,
                                resident=args.resident, log=lambda s: print(s, flush=True))
            table = _finish(pd.DataFrame(rows), peak, device, run_id, command)
            # after each model (an interrupted run keeps what it measured), append-only (`results.append_rows`):
            # earlier runs' rows stay; the same setting by the same commit on the same device is not added twice
            _, added = results.append_rows(table[table["model"] == model], args.out)
            print(f"{added} rows added → {args.out}", flush=True)
            stopped = table.loc[table["model"] == model, "stopped"].iloc[0]
            if stopped:
                print(f"{model}: {stopped}; its rows hold the rounds finished (column rounds)"
                      f"{', later models not run' if model != args.models[-1] else ''}", file=sys.stderr)
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
    best = table[table["best"]]
    cols = ["model", "method", "compile_mode", "layer", *(["plan_name"] if args.plans else []), "tokens_per_s",
            "step_time_s", "mem_peak_gib", "mfu", "vs_full_best", "vs_lora_best", "rounds"]
    print(best[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for model, g in best.groupby("model", sort=False):
        fa = g[g["method"] == "lorafa"]
        if len(fa):
            r = fa.iloc[0]
            print(f"{model}: LoRA-FA ({r['compile_mode']}) ÷ full FT {r['vs_full_best']:.2f}×, "
                  f"÷ LoRA {r['vs_lora_best']:.2f}×")
    return 3 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
