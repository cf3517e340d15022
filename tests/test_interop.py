"""Adapters leave lorafa in PEFT's format (PeftModel loads them, same outputs) and merge into plain weights."""

import pytest
import torch

from lorafa import adapters, methods, models

from .conftest import compose_cfg

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow

HEADS = {"tiny-roberta": "AutoModelForSequenceClassification", "tiny-t5": "AutoModelForSeq2SeqLM",
         "tiny-llama": "AutoModelForCausalLM"}


def _trained(model_name, method, tmp_path):
    """A tiny model saved as a 'pretrained' checkpoint, then adapted and given non-zero B and head weights."""
    cfg = compose_cfg([f"model={model_name}", f"method={method}", "method.dropout=0.1"])
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    net.model.save_pretrained(tmp_path / "base")
    methods.apply(net, cfg.method, cfg.model.target_modules)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    net.model.eval()
    return net


def _logits(model):
    torch.manual_seed(0)
    ids = torch.randint(5, 4096, (2, 12))
    kwargs = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits


@pytest.mark.parametrize("model_name", sorted(HEADS))
@pytest.mark.parametrize("method", ["lorafa", "lora"])
def test_peft_loads_our_adapters_with_the_same_logits(model_name, method, tmp_path):
    import transformers

    net = _trained(model_name, method, tmp_path)
    adapters.save_peft(net.model, tmp_path / "adapter", family=net.family, base_model=str(tmp_path / "base"),
                       modules_to_save=net.head_modules)
    base = getattr(transformers, HEADS[model_name]).from_pretrained(tmp_path / "base")
    base_logits = _logits(base.eval())
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # adapts `base` in place
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].lora_alpha == 16
    torch.testing.assert_close(_logits(loaded), _logits(net.model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base_logits, _logits(net.model), atol=1e-3)  # the adapters do change outputs


@pytest.mark.parametrize("model_name", sorted(HEADS))
def test_merged_model_is_plain_and_gives_the_same_logits(model_name, tmp_path):
    net = _trained(model_name, "lorafa", tmp_path)
    before = _logits(net.model)
    merged = adapters.merge(net.model)
    assert not adapters.lora_layers(merged)
    torch.testing.assert_close(_logits(merged), before, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # an ordinary checkpoint again
