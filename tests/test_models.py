"""Unit tests of model building: every model file's architecture, families, targets, tokenizers, local dirs."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig

from lorafa import models

from .conftest import CONF, compose_cfg

# Published sizes (transformers' own counts of the hub checkpoints), with the 2-class head for RoBERTa.
# The real network at real size, built on the meta device: no memory, no download.
EXPECTED = {
    "roberta-base": ("encoder", 124_647_170, 72, 24),
    "roberta-large": ("encoder", 355_361_794, 144, 48),
    "t5-small": ("encoder-decoder", 60_506_624, 96, 36),
    "t5-base": ("encoder-decoder", 222_903_552, 192, 72),
    "t5-large": ("encoder-decoder", 737_668_096, 384, 144),
    "t5-3b": ("encoder-decoder", 2_851_598_336, 384, 144),
    "llama-7b": ("decoder", 6_738_415_616, 224, 64),
    "llama-13b": ("decoder", 13_015_864_320, 280, 80),
}


def test_every_model_file_is_listed_here():
    files = {p.stem for p in (CONF / "model").glob("*.yaml")}
    assert files == set(EXPECTED) | {"tiny-roberta", "tiny-t5", "tiny-llama", "local"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_random_init_builds_the_real_architecture(name):
    family, params, n_all, n_qv = EXPECTED[name]
    mcfg = compose_cfg([f"model={name}", "model.init=random"]).model
    net = models.build(mcfg, num_labels=2, device="meta", dtype=torch.float32)
    assert net.family == family == mcfg.family and net.alias == name
    assert models.count_params(net.model)[1] == params
    assert len(models.resolve_targets(net.model, "all", mcfg.target_modules)) == n_all
    assert len(models.resolve_targets(net.model, "qv", mcfg.target_modules)) == n_qv
    # the `all` preset is exactly every linear layer of the blocks
    assert models.resolve_targets(net.model, "all", mcfg.target_modules) == models.block_linears(net.model)


@pytest.mark.parametrize("name", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_tiny_models_are_tiny_and_match_their_tokenizer(name):
    mcfg = compose_cfg([f"model={name}"]).model
    tok = models.load_tokenizer(mcfg)
    net = models.build(mcfg, num_labels=2, device="cpu", dtype=torch.float32)
    config = net.model.config
    assert config.vocab_size == len(tok) == 4096
    assert getattr(config, "num_hidden_layers", None) or config.num_layers == 2
    assert max(getattr(config, "hidden_size", 0), getattr(config, "d_model", 0)) <= 128
    assert config.pad_token_id == tok.pad_token_id


def test_random_init_takes_special_token_ids_from_its_tokenizer():
    """llama-7b's hub config says pad 0 (the embedding row zeroed at init); the tiny tokenizer's bos is 0. Without
    aligning, every sequence starts with a zero hidden state (found as NaN gradients at 16 × 4096)."""
    mcfg = compose_cfg(["model=tiny-llama", "model.arch.pad_token_id=0", "model.arch.bos_token_id=1"]).model
    tok = models.load_tokenizer(mcfg)
    assert (tok.bos_token_id, tok.pad_token_id) == (0, 1)
    torch.manual_seed(0)
    unaligned = models.build(mcfg, num_labels=2, device="cpu", dtype=torch.float32).model
    assert unaligned.get_input_embeddings().weight[tok.bos_token_id].abs().sum() == 0  # the trap
    net = models.build(mcfg, num_labels=2, device="cpu", dtype=torch.float32, tokenizer=tok).model
    assert (net.config.pad_token_id, net.config.bos_token_id) == (1, 0)
    emb = net.get_input_embeddings().weight
    assert emb[tok.bos_token_id].abs().sum() > 0 and emb[tok.pad_token_id].abs().sum() == 0


@pytest.mark.parametrize("model_type, family", [("bert", "encoder"), ("roberta", "encoder"),
                                                 ("t5", "encoder-decoder"), ("bart", "encoder-decoder"),
                                                 ("llama", "decoder"), ("gpt2", "decoder")])
def test_family_detection(model_type, family):
    assert models.detect_family(AutoConfig.for_model(model_type)) == family


def test_unknown_targets_list_the_linear_layers():
    mcfg = compose_cfg(["model=tiny-roberta"]).model
    net = models.build(mcfg, num_labels=2, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"matches no linear layer.*'attention.self.query'"):
        models.resolve_targets(net.model, ["q_proj"], mcfg.target_modules)
    with pytest.raises(ValueError, match="not a preset"):
        models.resolve_targets(net.model, "mlp_only", mcfg.target_modules)


def test_local_checkpoint_directory(tmp_path):
    """model=local: any saved HF checkpoint; family detected, adapters on every block linear."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "my-bert")
    cfg = compose_cfg(["model=local", f"model.path={tmp_path / 'my-bert'}"])
    net = models.build(cfg.model, num_labels=3, device="cpu", dtype=torch.float32)
    assert net.family == "encoder" and net.alias == "my-bert" and net.head_modules == ["classifier"]
    assert net.model.config.num_labels == 3
    names = models.resolve_targets(net.model, "all", cfg.model.target_modules)
    assert len(names) == 2 * 6 and not any("pooler" in n or "classifier" in n for n in names)


def test_layers_the_checkpoint_lacks_train_with_the_head(tmp_path):
    """A checkpoint without its pooler (an export that pruned it, as paraphrase-MiniLM-L3-v2's): the pooler is
    randomly initialised, so it trains with the fresh head instead of staying frozen at random."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    from lorafa import methods

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "no-pooler")
    weights = tmp_path / "no-pooler" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "pooler" not in k}, weights, metadata={"format": "pt"})
    cfg = compose_cfg(["model=local", f"model.path={tmp_path / 'no-pooler'}", "method=lorafa"])
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    assert net.head_modules == ["classifier", "bert.pooler.dense"]
    methods.apply(net, cfg.method, cfg.model.target_modules)
    trains = {n for n, p in net.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trains == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert models.fresh_modules(net.model, ["bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                            "bert.embeddings.position_ids"]) == ["bert.pooler.dense"]


def test_family_mismatch_is_an_error():
    mcfg = compose_cfg(["model=tiny-t5", "model.family=decoder"]).model
    with pytest.raises(ValueError, match="model.family='decoder' but the checkpoint's config says"):
        models.build(mcfg, num_labels=2, device="meta", dtype=torch.float32)


def test_hub_model_offline_fails_fast_with_the_local_path_hint(offline):
    import time

    from lorafa.sources import HubUnavailable

    mcfg = OmegaConf.create({"name": "FacebookAI/roberta-base", "path": None, "init": "pretrained"})
    t0 = time.perf_counter()
    with pytest.raises(HubUnavailable, match=r"model\.path=.*task\.data_files\.train="):
        models.build(mcfg, num_labels=2, device="cpu", dtype=torch.float32)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_training_forwards_build_no_kv_cache_and_generate_keeps_one(name):
    """A training forward returns no key/value cache (one per layer would be filled and never read, and compiled
    blocks would recompile per layer); `generate` still decodes with its cache, to the same tokens."""
    mcfg = compose_cfg([f"model={name}"]).model
    net = models.build(mcfg, num_labels=2, device="cpu", dtype=torch.float32)
    ids = torch.randint(5, 100, (2, 8))
    out = net.model.train()(input_ids=ids, labels=ids)
    assert out.past_key_values is None and out.loss.isfinite()
    assert net.model.generation_config.use_cache is True
    net.model.eval()
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": net.model.config.pad_token_id}
    cached = net.model.generate(input_ids=ids, **kw)
    assert torch.equal(cached, net.model.generate(input_ids=ids, use_cache=False, **kw))
