"""Predict a run's memory before it starts: `predict(...)` dry-runs a training step on fake tensors.

    from lorafa.memory import predict
    p = predict(model_cfg, method_cfg, batch_size=8, seq_len=1024, device="cuda")   # allocates nothing
    p.columns()   # {'pred_mem_weights_gib': ..., 'pred_mem_activations_gib': ..., 'pred_mem_peak_gib': ...}

The model is built from its config alone (no weights are read) inside PyTorch's `FakeTensorMode`: every tensor
carries shape, dtype and device but no storage, so a 7B model "builds" in seconds on any machine. The method is
applied by the same code path as a real job (`lorafa.methods.apply`: adapters, frozen-weight dtype, recomputation,
checkpointing), the optimizer's state is made as a first step leaves it, and one training step runs on a synthetic
batch of exactly batch_size × seq_len under the same autocast as the job: a steady-state step, as a job's second and
later steps are. What is counted is what `lorafa.measure` measures on a real run:

- weights, gradients and optimizer state: the distinct storages of parameters and buffers, of `.grad` after the
  backward, and of AdamW's state;
- activations: the bytes autograd saves during one forward, through the same saved-tensor hooks, each storage
  once, parameters excluded — the bytes of exactly the tensors the real code would save, whatever the model,
  the transformers version or the attention kernel the device picks;
- peak: on CUDA, the most bytes alive at once during that step (every storage created, freed when its last
  reference dies: what the caching allocator's `max_memory_allocated` reads) plus the cuBLAS workspaces
  (`CUDA_WORKSPACE_BYTES`, a measured constant); elsewhere the sum of the four parts, as the CPU rows define it.

What it does not see: allocator block rounding and fragmentation, kernel workspaces other than cuBLAS', and
memory of other processes. Predicting a CUDA run needs a CUDA build of PyTorch (a GPU need not be present for the fake build, but
the attention kernel choice queries the device, so predictions for CUDA are made on the GPU host in practice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import measure, methods, models, plans
from .measure import GIB
from .step import masking_as

log = logging.getLogger(__name__)
PARTS = ("weights", "grads", "optimizer", "activations", "peak")
# The CUDA peak also holds cuBLAS / cuBLASLt workspaces, which no tensor op creates: 66 MiB measured on an H200
# with torch 2.11 (the constant gap between measured and simulated peaks over all 29 rows of
# results/memory.parquet, ±1 MiB but for two). Pass `cuda_workspace` to predict for other GPUs or settings.
CUDA_WORKSPACE_BYTES = 66 * 2**20


@dataclass
class Prediction:
    weights: int
    grads: int
    optimizer: int
    activations: int
    peak: int
    host_offload: int = 0  # bytes the forward puts in host memory (`method.offload`): not on the device
    host_weights: int = 0  # frozen weights' bytes off the device from forward to backward (`method.offload_weights`)
    flops: int = 0  # one step's forward and backward (recomputation included), counted by torch's FLOP counter
    flops_forward: int = 0  # of which the forward's
    tracked_peak: int = 0  # the most bytes alive at once on the device during a steady-state step (CUDA: `peak` less
    # the cuBLAS workspaces)

    def columns(self) -> dict[str, float]:
        return {**{f"pred_mem_{k}_gib": getattr(self, k) / GIB for k in PARTS},
                "pred_host_offload_gib": self.host_offload / GIB, "pred_host_weights_gib": self.host_weights / GIB,
                "pred_step_tflop": self.flops / 1e12,
                "pred_forward_tflop": self.flops_forward / 1e12}


# beside torch's MemTracker (torch.distributed._tools.mem_tracker), which also keeps a live peak by category: a private
# module, whose activations are what the forward allocates, where `lorafa.measure` counts what autograd saves
class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive at once on one kind of device (each created storage counted until it is freed)
    and their peak: host copies (`method.offload`) leave the device."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        n = storage.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


class _Flops(TorchDispatchMode):
    """FLOPs of the ops run while active, by torch's FLOP formulas (`torch.utils.flop_counter`), without its module
    tracking (whose backward hooks element-wise recomputation's `autograd.grad` cannot run under)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.total = flop_registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def _never_traced(real):
    """transformers' `is_tracing` for masking_utils in the predictor: a fake tensor is not taken for a traced one.
    Taken for one, masking_utils builds the full attention mask — a decoder's causal mask — that a real step of the
    same batch leaves to SDPA's `is_causal`: SDPA, handed a mask, leaves the flash kernel and saves a mask-sized
    tensor per block (16 MiB a block at llama-7b 8 × 1024). The predictor's batches carry no padding mask."""

    def is_tracing(tensor=None) -> bool:
        return real(None)

    return is_tracing


def _distinct_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[measure.storage_id(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _batch(family: str, batch_size: int, seq_len: int, target_len: int | None, num_labels: int,
           device: torch.device) -> dict:
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    if family == "encoder":
        labels = (torch.zeros(batch_size, device=device) if num_labels == 1
                  else torch.zeros(batch_size, dtype=torch.long, device=device))
    elif family == "encoder-decoder":
        labels = torch.zeros(batch_size, target_len or seq_len, dtype=torch.long, device=device)
    else:
        labels = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    # no attention mask: full-length sequences, as the measured steps of synthetic batches
    return {"input_ids": ids, "labels": labels}


def predict(model_cfg: DictConfig, method_cfg: DictConfig, *, batch_size: int, seq_len: int,
            target_len: int | None = None, num_labels: int = 2, device: str | torch.device = "cpu",
            amp: torch.dtype | None = None, frozen_dtype: torch.dtype | None = None,
            param_dtype: torch.dtype = torch.float32, lr: float = 1e-4, max_grad_norm: float | None = 1.0,
            cuda_workspace: int = CUDA_WORKSPACE_BYTES, stacked=None) -> Prediction:
    """Memory of a training job with this model config (`conf/model/*`), method (`conf/method/*`), batch and
    sequence length, autocast dtype (`amp`) and frozen-weight dtype; see the module docstring. `stacked`: the
    LoRA-FA layer the job runs, as `lorafa.methods.apply` takes it (None: `method.stacked`; what a selective
    checkpoint keeps depends on it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device(device)
    tracker = _LiveBytes(device.type)
    with FakeTensorMode(allow_non_fake_inputs=True), tracker, masking_as(_never_traced):
        net = models.build(model_cfg, num_labels=num_labels, device=device, dtype=param_dtype, weights=False)
        methods.apply(net, method_cfg, model_cfg.get("target_modules"), frozen_dtype=frozen_dtype, stacked=stacked)
        model = net.model
        model.train()
        weights = _distinct_bytes(list(model.parameters()) + list(model.buffers()))
        trainable = [p for p in model.parameters() if p.requires_grad]
        # the optimizer the job builds (AdamW, foreach where the device has the kernels, as torch's default)
        optimizer = torch.optim.AdamW(trainable, lr=lr, foreach=device.type == "cuda") if trainable else None
        batch = _batch(net.family, batch_size, seq_len, target_len, num_labels, device)
        excluded = measure.Storages.of(model)
        saved: dict[int, int] = {}

        def pack(t):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not excluded.holds(t):
                saved.setdefault(measure.storage_id(t), t.untyped_storage().nbytes())
            return measure.kept(t)

        opt_bytes = 0
        if optimizer is not None:
            # the state a first step leaves (AdamW's moments), made without running the model: the step below is
            # then a steady-state one, as a job's second and later steps are (whose peak the allocator reports)
            for p in trainable:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            opt_bytes = _distinct_bytes(v for st in optimizer.state.values() for v in st.values())
            model.zero_grad(set_to_none=True)
        # one training step: what autograd saves (and a selective checkpoint's cache), FLOPs, gradients, host copies
        tracker.reset_peak()
        with _Flops() as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), measure.counting(pack), \
                    (torch.autocast(device.type, dtype=amp) if amp else nullcontext()):
                loss = model(**batch).loss
            flops_forward = counter.total
            loss.backward()
        del loss
        flops = counter.total
        grads = _distinct_bytes(p.grad for p in trainable if p.grad is not None)
        host = plans.host_bytes(model)
        host_weights = plans.host_weight_bytes(model)
        if optimizer is not None:
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
        model.zero_grad(set_to_none=True)
        tracked = tracker.peak
        activations = sum(saved.values())
    # CUDA: the allocator's peak of that step; elsewhere the sum of the four counts, as the CPU rows define the peak
    peak = tracked + cuda_workspace if device.type == "cuda" else weights + grads + opt_bytes + activations
    return Prediction(weights=weights, grads=grads, optimizer=opt_bytes, activations=activations, peak=peak,
                      host_offload=host, host_weights=host_weights, flops=flops, flops_forward=flops_forward, tracked_peak=tracked)


_CACHE: dict = {}  # predictions made in this process (a sweep's jobs, a budget's plans): by everything they read
_CACHE_SIZE = 256


def _job_inputs(cfg: DictConfig, device: torch.device, *, num_labels: int, target_len: int | None = None,
                amp: torch.dtype | None = None, frozen_dtype: torch.dtype | None = None, stacked=None) -> tuple:
    """`predict_job`'s cache key and `predict`'s arguments (model and method as plain containers: they cross to
    a worker process) for a composed job config."""
    from omegaconf import OmegaConf

    dtype = getattr(torch, cfg.model.get("dtype") or "float32")
    kwargs = {"batch_size": int(cfg.train.batch_size), "seq_len": int(cfg.task.max_seq_len),
              "target_len": target_len, "num_labels": num_labels, "device": torch.device(device), "amp": amp,
              "frozen_dtype": frozen_dtype, "param_dtype": dtype, "lr": float(cfg.train.lr),
              "max_grad_norm": cfg.train.get("max_grad_norm"), "stacked": stacked}
    key = (OmegaConf.to_yaml(cfg.model, resolve=True), OmegaConf.to_yaml(cfg.method, resolve=True),
           repr(sorted(kwargs.items())), CUDA_WORKSPACE_BYTES)
    return key, (OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.method, resolve=True),
                 kwargs)


def _store(key, pred: Prediction) -> None:
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = pred


def _predict_inputs(model, method, kwargs) -> Prediction | str:
    """A worker's prediction (`prefetch`), or what it raised as text: not every exception crosses back whole."""
    from omegaconf import OmegaConf

    try:
        return predict(OmegaConf.create(model), OmegaConf.create(method), **kwargs)
    except Exception as err:  # noqa: BLE001 - the parent makes it again and raises it there
        return f"{type(err).__name__}: {err}"


def cache_dir() -> Path | None:
    """Where predictions are kept across processes: `LORAFA_CACHE`/predictions (default ~/.cache/lorafa, or under
    `XDG_CACHE_HOME`); None where `LORAFA_CACHE=off`."""
    root = os.environ.get("LORAFA_CACHE")
    if root is not None and root.strip().lower() in ("off", "0", "false", "no", ""):
        return None
    if root is None:
        try:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafa"
        except RuntimeError:  # no home directory to be found (a bare container): nothing kept
            return None
    return Path(root) / "predictions"


@lru_cache(maxsize=1)
def _code() -> str:
    """What a prediction's result depends on beside its inputs: lorafa's source, torch's and transformers' versions."""
    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.relative_to(Path(__file__).parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _disk_path(key, model: dict, device: torch.device) -> Path | None:
    """A prediction's file in `cache_dir()`: named by the hash of its inputs (`key`), the code (`_code`), a local
    model's config.json and, on CUDA, the device's name and compute capability (the attention kernel the step
    picks: what it saves)."""
    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(repr(key).encode() + _code().encode())
    path = model.get("path")
    if path and (Path(path) / "config.json").is_file():
        digest.update((Path(path) / "config.json").read_bytes())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        digest.update(f"{torch.cuda.get_device_name(index)} {torch.cuda.get_device_capability(index)}".encode())
    return root / f"{digest.hexdigest()}.json"


READ_FROM_DISK = [0]  # predictions this process read from `cache_dir()` instead of making them (a budget job's log)


def _read(path: Path | None) -> Prediction | None:
    """A kept prediction (counted in `READ_FROM_DISK`), or None (none kept, or not one that reads back)."""
    if path is None or not path.is_file():
        return None
    try:
        pred = Prediction(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    READ_FROM_DISK[0] += 1
    return pred


def _keep(path: Path | None, pred: Prediction) -> None:
    """Keeps a prediction on disk (atomically: readers see the whole file or none); a cache that cannot be written
    is passed over."""
    if path is None:
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(asdict(pred)))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        log.debug("prediction not kept in %s: %s", path.parent, err)


def predict_job(cfg: DictConfig, device: torch.device, *, num_labels: int, target_len: int | None = None,
                amp: torch.dtype | None = None, frozen_dtype: torch.dtype | None = None, stacked=None) -> Prediction:
    """`predict` for a composed job config: its model, method, batch size and `task.max_seq_len`. A prediction
    this process already made for the same inputs is reused (a budget's job and the sweep's hand-set plans), as is
    one `prefetch` made, and one an earlier process kept on disk for the same inputs and code (`cache_dir`)."""
    key, (model, _, kwargs) = _job_inputs(cfg, device, num_labels=num_labels, target_len=target_len, amp=amp,
                                          frozen_dtype=frozen_dtype, stacked=stacked)
    if key not in _CACHE:
        path = _disk_path(key, model, kwargs["device"])
        pred = _read(path)
        if pred is None:
            pred = predict(cfg.model, cfg.method, **kwargs)
            _keep(path, pred)
        _store(key, pred)
    return _CACHE[key]


def workers(setting, jobs: int) -> int:
    """How many processes `prefetch` predicts `jobs` predictions in: `setting` (`train.plan_workers`) as a number,
    or auto (None, "auto"): the CPUs this process may run on, at most 8 (each worker imports torch and
    transformers and holds a fake model: ~0.4 GB of host memory at llama-7b) — never more than the jobs."""
    if setting in (None, "auto"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = min(cpus, 8)
    else:
        n = int(setting)
    return max(1, min(n, jobs))


@contextmanager
def worker_pool(n_workers: int):
    """A pool of `n_workers` spawned processes that `prefetch` calls within it share (a worker's start costs
    seconds); None with fewer than 2. Closed, its workers gone, on leaving."""
    if n_workers < 2:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold a CUDA context and threads; a worker starts from a clean import
    with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def prefetch(requests: list, n_workers, pool=None) -> int:
    """Makes the predictions `predict_job` will be asked for, each `requests` entry its arguments `(cfg, device,
    kwargs)`, those not yet made at once in `workers(n_workers, ...)` spawned processes (a prediction is a
    single-threaded dry run of a whole training step: at llama-7b seconds each, and a budget asks for tens). Each
    is kept as `predict_job` keeps its own; one that fails in a worker is not kept, so `predict_job` makes it
    again in this process and raises as it would have. Returns how many it made; with one worker, none (each is
    made when asked for). `pool`: a `worker_pool` to make them in (`n_workers` then only says whether to)."""
    todo, paths = {}, {}  # (each one's file in `cache_dir()`, named once)
    for cfg, device, kwargs in requests:
        key, args = _job_inputs(cfg, device, **kwargs)
        if key in _CACHE or key in todo:
            continue
        path = _disk_path(key, args[0], args[2]["device"])
        kept = _read(path)
        if kept is not None:  # (made by an earlier process)
            _store(key, kept)
        else:
            todo[key], paths[key] = args, path
    n = workers(n_workers, len(todo))
    if n < 2:
        return 0
    made, failed = 0, []
    with nullcontext(pool) if pool is not None else worker_pool(n) as executor:
        futures = {key: executor.submit(_predict_inputs, *args) for key, args in todo.items()}
        for key, future in futures.items():
            try:
                pred = future.result()
            except Exception as err:  # noqa: BLE001 - a worker that died: made again here when asked for
                pred = f"{type(err).__name__}: {err}"
            if isinstance(pred, Prediction):
                _store(key, pred)
                _keep(paths[key], pred)
                made += 1
            else:
                failed.append(pred)
    if failed:  # (a plan the model cannot take fails here too, and says why where it is asked for)
        log.info("%d of %d predictions failed in worker processes (the first: %s); made here when asked for",
                 len(failed), len(todo), failed[0][:300])
    return made
