"""The network of a job: its family, its weights (hub, local directory or random init), its head and its tokenizer.

Three families, told apart from the checkpoint's own config, each with the head the paper's experiments use:

| family            | example        | head                                  | loss / prediction                      |
|-------------------|----------------|---------------------------------------|----------------------------------------|
| `encoder`         | RoBERTa, BERT  | sequence classification (1 = regress) | cross-entropy or MSE on the head       |
| `encoder-decoder` | T5             | the LM head, labels verbalised        | seq2seq LM loss; label scoring         |
| `decoder`         | LLaMA          | the LM head, prompt → label word      | LM loss on the answer; label scoring   |

`model.init=random` builds the full-size architecture from `model.arch` (the hub checkpoint's config.json, kept in
`conf/model/*.yaml`) directly on the target device, so memory and speed at real scale need no download.
`model.quantize=nf4|int8` then holds the linear layers of the blocks in 4 or 8 bits (`lorafa.quantize`), random
init or pretrained alike.
"""

from __future__ import annotations

import logging
import re
import types
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from . import checks, loss, sources
from .adapters import is_linear
from .checks import BadInput

log = logging.getLogger(__name__)
FAMILIES = ("encoder", "encoder-decoder", "decoder")


@dataclass
class Network:
    model: nn.Module
    family: str
    alias: str  # the short name rows carry (`roberta-base`, `tiny-llama`, or the local directory's name)
    head_modules: list[str] = field(default_factory=list)  # newly initialised task head, trained by every method

    @property
    def fused_loss(self) -> bool:
        """The training forward fuses the LM head and its loss (`lorafa.loss`, `model.fused_loss`)."""
        return loss.installed(self.model)


def detect_family(config) -> str:
    """encoder | encoder-decoder | decoder, from a transformers config (model_type and is_encoder_decoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    # BERT-likes also have a *ForCausalLM class, so ask "masked LM?" first: only encoders have one.
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise ValueError(f"model_type {config.model_type!r} is neither an encoder (masked LM), an encoder-decoder nor "
                     "a decoder (causal LM) known to transformers")


def source_of(mcfg: DictConfig) -> str:
    """The directory or hub id weights and config come from: `model.path` wins over `model.name`."""
    ref = mcfg.get("path") or mcfg.get("name")
    if not ref:
        raise BadInput("model.path or model.name must be set")
    return str(ref)


def alias_of(mcfg: DictConfig) -> str:
    """`model.alias`, else the last component of the directory or hub id (`/ckpt/my-bert` → `my-bert`)."""
    return mcfg.get("alias") or re.split(r"[/\\]", source_of(mcfg).rstrip("/\\"))[-1]


def load_config(mcfg: DictConfig):
    """The transformers config: from `model.arch` for random init, else from the checkpoint (local or hub)."""
    from transformers import AutoConfig

    arch = mcfg.get("arch")
    if mcfg.init == "random" and arch:
        arch = OmegaConf.to_container(arch, resolve=True)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    ref = source_of(mcfg)
    if mcfg.get("path"):
        checks.check_model_dir(str(mcfg.path))
    if sources.is_local(ref):
        return AutoConfig.from_pretrained(ref)
    return sources.from_hub("model config", AutoConfig.from_pretrained, ref)


SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")


def align_special_tokens(config, tokenizer) -> dict[str, tuple]:
    """A random-init model takes its pad/bos/eos ids from the tokenizer it runs with. The hub config's ids
    describe the hub tokenizer; with another one they can point at real tokens, and `pad_token_id` is the
    embedding's `padding_idx`, whose row is initialised to zero. LLaMA-7B's config (pad 0) with the tiny
    tokenizer (bos 0) gave every sequence a zero first hidden state, which stays zero through every layer, so each
    RMSNorm's backward multiplies its gradient by 1/sqrt(eps) = 1000: NaN gradients by layer 1 of 16 with a finite
    loss. Returns {key: (old, new)} of what changed."""
    changed = {}
    for key in SPECIAL_TOKENS:
        new = getattr(tokenizer, key, None)
        old = getattr(config, key, None)
        if new is not None and new < config.vocab_size and new != old:
            setattr(config, key, new)
            changed[key] = (old, new)
    return changed


def build(mcfg: DictConfig, *, num_labels: int, device: torch.device | str, dtype: torch.dtype,
          weights: bool = True, tokenizer=None, blocks: int | None = None) -> Network:
    """Build the network for a task with `num_labels` outputs (1 = regression; ignored by LM-headed families).
    `weights=False` builds the architecture only (random init, whatever `model.init` says): what
    `lorafa.memory.predict` runs on fake tensors. With a `tokenizer`, a random-init model's special token ids
    follow it (`align_special_tokens`). `blocks`: the architecture cut to that many blocks (in the encoder and in
    the decoder), random init — the step-time profile of `lorafa.plans.profile_step`."""
    if mcfg.init not in ("pretrained", "random"):
        raise BadInput(f"model.init={mcfg.init!r}: expected pretrained or random")
    config = load_config(mcfg)
    if blocks:
        weights = False
        for key in ("num_hidden_layers", "num_layers", "num_decoder_layers"):
            if getattr(config, key, None):
                setattr(config, key, int(blocks))
    if tokenizer is not None and (mcfg.init == "random" or not weights):
        for key, (old, new) in align_special_tokens(config, tokenizer).items():
            log.info("random init: %s %s → %s (the tokenizer's)", key, old, new)
    family = detect_family(config)
    if mcfg.get("family") and mcfg.family != family:
        raise BadInput(f"model.family={mcfg.family!r} but the checkpoint's config says {family!r}")
    if family == "encoder":
        config.num_labels = num_labels
        config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    cls = model_class(family)
    fresh: list[str] = []  # modules the checkpoint did not hold
    if mcfg.init == "random" or not weights:
        with torch.device(device):  # allocate and initialise on the GPU: seconds for 7B, not minutes on CPU
            model = cls.from_config(config, dtype=dtype)
    else:
        ref = source_of(mcfg)

        def load(r):
            return cls.from_pretrained(r, config=config, dtype=dtype, output_loading_info=True)

        model, info = load(ref) if sources.is_local(ref) else sources.from_hub("model weights", load, ref)
        if mcfg.get("quantize"):  # layer by layer onto the device, before the rest: the float weights never all go
            quantize_blocks(model, str(mcfg.quantize), device)
        model = model.to(device)
        fresh = fresh_modules(model, info.get("missing_keys") or ())
    if mcfg.get("quantize") and (mcfg.init == "random" or not weights):
        quantize_blocks(model, str(mcfg.quantize), device)
    fuse_relative_position_bias(model)
    no_kv_cache(model)
    loss.install(model, mcfg.get("fused_loss", "auto"), family)
    heads = []
    if family == "encoder":  # everything beside the pretrained body (e.g. `roberta`) is the fresh task head
        heads = [n for n, m in model.named_children()
                 if n != model.base_model_prefix and any(True for _ in m.parameters())]
    # and any layer of the body the checkpoint did not hold (a BERT pooler that an export pruned): randomly
    # initialised, it trains with the head rather than stay frozen at random
    heads += [n for n in fresh if not any(n == h or n.startswith(f"{h}.") for h in heads)]
    return Network(model=model, family=family, alias=alias_of(mcfg), head_modules=heads)


def quantize_blocks(model: nn.Module, kind: str, device) -> int:
    """`model.quantize`: the linear layers of the blocks (`block_linears`) held in `kind` (nf4 or int8) on `device`
    (`lorafa.quantize`); embeddings, norms and heads stay as they are. Returns the number of layers quantized."""
    from . import quantize

    checks.check_quantize_device(kind, torch.device(device))
    n = quantize.quantize(model, kind, block_linears(model), device)
    log.info("model.quantize=%s: %d linear layers of the blocks quantized", kind, n)
    return n


def fresh_modules(model, missing_keys) -> list[str]:
    """The modules whose weights a checkpoint did not hold (`from_pretrained`'s missing keys), outermost first:
    a tied or buffer-only key names no trainable module and is left out."""
    params = dict(model.named_parameters())
    names = sorted({k.rpartition(".")[0] for k in missing_keys if k in params})
    return [n for n in names if n and not any(n.startswith(f"{o}.") for o in names if o != n)]


def no_kv_cache(model) -> None:
    """Training and scoring forwards build no key/value cache. transformers' decoders default to one
    (`config.use_cache`): a training step would fill a cache it never reads, and a compiled block, guarding on
    each layer's cache entry, would recompile per layer until torch.compile gives up on the rest. `generate` keeps
    its cache (its own `generation_config.use_cache`)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    for config in configs.values():  # T5's encoder and decoder stacks hold copies of the model's config
        if getattr(config, "use_cache", None):
            config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True


def model_class(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    return {"encoder": AutoModelForSequenceClassification, "encoder-decoder": AutoModelForSeq2SeqLM,
            "decoder": AutoModelForCausalLM}[family]


def _fused_compute_bias(self, *args, **kwargs):
    bias = self._lorafa_compute_bias(*args, **kwargs).contiguous()
    device_type = bias.device.type
    if torch.is_autocast_enabled(device_type):
        bias = bias.to(torch.get_autocast_dtype(device_type))
    return bias


def fuse_relative_position_bias(model: nn.Module) -> int:
    """Let T5's self-attention use a fused SDPA kernel. transformers builds T5's relative position bias with a
    `permute`, so its last dimension is strided; CUDA's fused kernels (memory-efficient attention, which takes an
    additive bias and dropout) require stride 1 and a bias in the query's dtype, so every T5 self-attention fell
    back to SDPA's math path, which upcasts to fp32 and keeps the b·h·s·s scores, probabilities and dropout mask
    for backward (≈ 2/3 of t5-large's activation memory at 32×128, for every method). A contiguous bias in the
    autocast dtype gives the same attention from the fused kernel. Returns the number of layers changed."""
    n = 0
    for m in model.modules():
        if getattr(m, "has_relative_attention_bias", False) and hasattr(m, "compute_bias") \
                and not hasattr(m, "_lorafa_compute_bias"):
            m._lorafa_compute_bias = m.compute_bias
            m.compute_bias = types.MethodType(_fused_compute_bias, m)
            n += 1
    return n


def load_tokenizer(mcfg: DictConfig):
    """`model.tokenizer`, else the checkpoint's own; decoders without a pad token pad with eos (masked anyway)."""
    from transformers import AutoTokenizer

    ref = str(mcfg.get("tokenizer") or source_of(mcfg))
    tok = (AutoTokenizer.from_pretrained(ref) if sources.is_local(ref)
           else sources.from_hub("tokenizer", AutoTokenizer.from_pretrained, ref))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def block_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers (nn.Linear, GPT-2's Conv1D) inside the model's repeated blocks (a numbered path component such as
    `layer.3.` or `layers.17.`): attention and FFN projections, never embeddings or heads."""
    return [name for name, m in model.named_modules() if is_linear(m) and re.search(r"(^|\.)\d+\.", name)]


def resolve_targets(model: nn.Module, spec, presets: DictConfig | dict | None = None) -> list[str]:
    """Module names to adapt. `spec` is a preset name of `model.target_modules` (`all`, `qv`), the word `auto`
    (every linear layer of the blocks), or a list of name suffixes as in PEFT (`query` matches `...self.query`)."""
    if isinstance(spec, str) and spec != "auto":
        if not presets or spec not in presets:
            raise BadInput(f"method.targets={spec!r} is not a preset of this model "
                           f"(model.target_modules has {sorted(presets or {})}); give a preset, auto or a list")
        spec = presets[spec]
    linears = block_linears(model)
    if spec == "auto":
        names = linears
    else:
        suffixes = [str(s) for s in (spec if isinstance(spec, (list, tuple, ListConfig)) else [spec])]
        names = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        kinds = sorted({re.sub(r"^.*?\d+\.", "", n) for n in linears})
        raise BadInput(f"method.targets={spec!r} matches no linear layer; the blocks' linear layers are {kinds}")
    return names


# not transformers' `num_parameters`: a PreTrainedModel method, and `lorafa.methods.apply` takes any nn.Module
def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
