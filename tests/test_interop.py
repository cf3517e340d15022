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


# PEFT → lorafa: `model.adapter=DIR` loads a PEFT LoRA adapter into lorafa's layers (lorafa.adapters.read_peft)

LORA_TARGETS = {"tiny-roberta": ["query", "value", "intermediate.dense"], "tiny-t5": ["q", "v", "wo"],
                "tiny-llama": ["q_proj", "v_proj", "down_proj"]}
N_ADAPTED = {"tiny-roberta": 6, "tiny-t5": 16, "tiny-llama": 6}  # 2 blocks (T5: 2 + 2, the decoder's q, v twice)


def _base(model_name, where):
    """A tiny model (random init, seed 0) saved as a 'pretrained' checkpoint: the base both sides load."""
    cfg = compose_cfg([f"model={model_name}"])
    torch.manual_seed(0)
    models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32).model.save_pretrained(where)
    return where


def _peft_adapter(model_name, base_dir, out, **lora):
    """An adapter made by PEFT itself (get_peft_model, then non-zero B and a changed head, save_pretrained): r=4,
    alpha 12, dropout 0.05 and three kinds of layer, none of them the lorafa method's defaults."""
    import transformers

    base = getattr(transformers, HEADS[model_name]).from_pretrained(base_dir)
    family = models.detect_family(base.config)
    config = peft.LoraConfig(task_type=adapters.PEFT_TASK_TYPES[family], r=4, lora_alpha=12, lora_dropout=0.05,
                             target_modules=LORA_TARGETS[model_name], **lora)
    made = peft.get_peft_model(base, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if p.requires_grad and "lora_A" not in name:  # B (zero at init) and the head's copy (modules_to_save)
                p.add_(torch.randn_like(p) * 0.05)
    made.save_pretrained(out)
    return out


def _peft_logits(model_name, base_dir, adapter_dir):
    import transformers

    base = getattr(transformers, HEADS[model_name]).from_pretrained(base_dir)
    return _logits(peft.PeftModel.from_pretrained(base, adapter_dir).eval())


def _lorafa_loaded(model_name, base_dir, adapter_dir, *overrides):
    """lorafa's network on the same base with the adapter loaded, as a job does it (read_peft, then methods.apply);
    the method's own rank, alpha and targets (8, 16, all) are what the adapter must override."""
    cfg = compose_cfg([f"model={model_name}", "model.init=pretrained", f"model.path={base_dir}",
                       f"model.adapter={adapter_dir}", *overrides])
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    adapter = adapters.read_peft(cfg.model.adapter, config=net.model.config, family=net.family)
    methods.apply(net, cfg.method, cfg.model.target_modules, adapter=adapter)
    net.model.eval()
    return net, adapter


@pytest.mark.parametrize("model_name, rslora", [("tiny-roberta", False), ("tiny-t5", False), ("tiny-llama", False),
                                                ("tiny-llama", True)])
def test_a_peft_made_adapter_loads_with_peft_logits(model_name, rslora, tmp_path):
    base_dir = _base(model_name, tmp_path / "base")
    adapter_dir = _peft_adapter(model_name, base_dir, tmp_path / "adapter", use_rslora=rslora)
    expected = _peft_logits(model_name, base_dir, adapter_dir)
    net, adapter = _lorafa_loaded(model_name, base_dir, adapter_dir, "method=lorafa")
    torch.testing.assert_close(_logits(net.model), expected, rtol=1e-5, atol=1e-5)
    layers = adapters.lora_layers(net.model)  # the adapter's layers, rank, scale and dropout, not the method's
    assert sorted(layers) == sorted(adapter.lora) and len(layers) == N_ADAPTED[model_name]
    scale = 12 / 4**0.5 if rslora else 12 / 4
    assert all(m.rank == 4 and m.scaling == pytest.approx(scale, rel=1e-12) and m.p == 0.05 for m in layers.values())
    assert all(not m.lora_A.requires_grad and m.lora_B.requires_grad for m in layers.values())  # LoRA-FA: B trains
    import transformers

    plain = getattr(transformers, HEADS[model_name]).from_pretrained(base_dir).eval()
    assert not torch.allclose(_logits(plain), expected, atol=1e-3)  # the adapter does change the outputs


@pytest.mark.parametrize("model_name", sorted(HEADS))
def test_lorafa_loads_its_own_export_with_the_same_logits(model_name, tmp_path):
    net = _trained(model_name, "lorafa", tmp_path)  # rank 8, alpha 16, every block linear, dropout 0.1
    out = adapters.save_peft(net.model, tmp_path / "adapter", family=net.family, base_model=str(tmp_path / "base"),
                             modules_to_save=net.head_modules)
    import json

    assert json.loads((out / "adapter_config.json").read_text())[adapters.FROZEN_A_KEY] is True
    with pytest.warns(UserWarning, match=adapters.FROZEN_A_KEY):  # PEFT drops a key it does not know, and says so
        assert peft.LoraConfig.from_pretrained(str(out)).r == 8
    loaded, adapter = _lorafa_loaded(model_name, tmp_path / "base", out, "method=lora", "method.rank=2",
                                     "method.alpha=3", "method.targets=qv")
    assert adapter.frozen_a is True and (adapter.rank, adapter.alpha, adapter.dropout) == (8, 16.0, 0.1)
    assert sorted(adapters.lora_layers(loaded.model)) == sorted(adapters.lora_layers(net.model))
    assert all(m.lora_A.requires_grad for m in adapters.lora_layers(loaded.model).values())  # method=lora: A trains
    torch.testing.assert_close(_logits(loaded.model), _logits(net.model), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def roberta_adapter(tmp_path_factory):
    """(base checkpoint, PEFT-made adapter) for tiny-roberta: r=4, alpha 12, dropout 0.05, head in modules_to_save."""
    where = tmp_path_factory.mktemp("peft-roberta")
    base_dir = _base("tiny-roberta", where / "base")
    return base_dir, _peft_adapter("tiny-roberta", base_dir, where / "adapter")


SMALL = ("task.max_train_samples=16", "task.max_eval_samples=8", "train.max_steps=2")


@pytest.mark.parametrize("method", ["lorafa", "lora"])
def test_a_job_continues_training_a_loaded_adapter(cfg_factory, roberta_adapter, method):
    """`model.adapter` in a job: the adapter's rank, alpha and layers in the row, its path in `adapter`; training on
    from it as LoRA-FA keeps A exactly as loaded and changes B (as LoRA changes both); the exported adapter says
    which."""
    import json

    from safetensors.torch import load_file

    from lorafa.job import run

    base_dir, adapter_dir = roberta_adapter
    row = run(cfg_factory(*SMALL, "model=tiny-roberta", "model.init=pretrained", f"model.path={base_dir}",
                          f"model.adapter={adapter_dir}", f"method={method}", "train.save_adapter=true"))
    assert row["status"] == "ok", row["error"]
    assert row["adapter"] == str(adapter_dir) and (row["rank"], row["alpha"], row["dropout"]) == (4, 12.0, 0.05)
    assert row["adapted_layers"] == 6
    loaded = load_file(adapter_dir / "adapter_model.safetensors")
    trained = load_file(f"{row['adapter_dir']}/adapter_model.safetensors")
    assert sorted(trained) == sorted(loaded)  # the same layers and head, nothing more
    a_keys = [k for k in loaded if ".lora_A." in k]
    b_keys = [k for k in loaded if ".lora_B." in k]
    assert len(a_keys) == len(b_keys) == 6
    assert all(not torch.equal(trained[k], loaded[k]) for k in b_keys)  # B trained on
    if method == "lorafa":
        assert all(torch.equal(trained[k], loaded[k]) for k in a_keys)  # A exactly as loaded
    else:
        assert all(not torch.equal(trained[k], loaded[k]) for k in a_keys)
    config = json.loads((adapter_dir.parent / row["adapter_dir"] / "adapter_config.json").read_text())
    assert config[adapters.FROZEN_A_KEY] is (method == "lorafa") and config["r"] == 4 and config["lora_alpha"] == 12


def _edit(adapter_dir, to, *, config=None, tensors=None):
    """A copy of the adapter with its adapter_config.json keys or its weights changed."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, to)
    if config:
        path = to / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        weights = load_file(to / "adapter_model.safetensors")
        save_file(tensors(weights), to / "adapter_model.safetensors")
    return to


def _three_labels(weights):
    key = "base_model.model.classifier.out_proj.weight"
    weights[key] = torch.cat([weights[key], weights[key][:1]])
    return weights


def _embedding_lora(weights):
    weights["base_model.model.roberta.embeddings.word_embeddings.lora_embedding_A"] = torch.zeros(4, 4096)
    return weights


def _folder(where, **files):
    """A directory holding `files` (name → text)."""
    where.mkdir()
    for name, text in files.items():
        (where / name).write_text(text)
    return where


def _config(**keys):
    return lambda good, tmp: _edit(good, tmp / "edited", config=keys)


LLAMA_CONFIG = '{"model_type": "llama"}'
ADAPTER_CASES = {  # case: (the adapter dir, made from the good one; the model (None: the good one's base); the line)
    "no directory": (lambda good, tmp: tmp / "missing", None, "model.adapter={}: no such directory"),
    "no adapter_config.json": (lambda good, tmp: _folder(tmp / "empty"), None,
                               "not an adapter directory (no adapter_config.json"),
    "no weights": (lambda good, tmp: _folder(tmp / "c", **{"adapter_config.json": "{}"}), None,
                   "no adapter_model.safetensors or adapter_model.bin"),
    "not LoRA": (_config(peft_type="IA3"), None, 'peft_type="IA3": lorafa loads LoRA adapters only; expected LORA'),
    "DoRA": (_config(use_dora=True), None, "use_dora=true: lorafa cannot load DoRA's magnitude vector"),
    "trained biases": (_config(bias="lora_only"), None, 'bias="lora_only": lorafa cannot load trained biases'),
    "rank per layer": (_config(rank_pattern={"query": 2}), None,
                       'rank_pattern={"query": 2}: lorafa cannot load a rank per layer'),
    "alpha per layer": (_config(alpha_pattern={"value": 4}), None,
                        'alpha_pattern={"value": 4}: lorafa cannot load an alpha per layer'),
    "layers by pattern": (_config(layers_pattern="layer", layers_to_transform=[0]), None,
                          'layers_pattern="layer": lorafa cannot load layer selection by pattern'),
    "an option lorafa does not know": (_config(use_new_trick=True), None,
                                       "use_new_trick=true: lorafa cannot load an option it does not know"),
    "PiSSA init": (_config(init_lora_weights="pissa"), None,
                   'init_lora_weights="pissa": that init changes the base weights'),
    "another model type": (lambda good, tmp: _edit(good, tmp / "edited", config={
        "base_model_name_or_path": str(_folder(tmp / "llama", **{"config.json": LLAMA_CONFIG}))}), None,
        "made for a llama model"),
    "another family's head": (_config(task_type="CAUSAL_LM"), None,
                              'task_type="CAUSAL_LM": made for decoder models; the model is encoder; expected SEQ_CLS'),
    "another model's layers": (_config(task_type=None, base_model_name_or_path=None), ("model=tiny-llama",),
                               "adapts roberta.encoder.layer.0.attention.self.query, which this llama model"),
    "another model size": (lambda good, tmp: good, ("model=tiny-roberta", "model.arch.hidden_size=64"),
                           "is 64 → 64 in this roberta model, the adapter's 128 → 128"),
    "a head for other labels": (lambda good, tmp: _edit(good, tmp / "edited", tensors=_three_labels), None,
                                "classifier.out_proj.weight is (3, 128) in the adapter, (2, 128) in the model"),
    "an embedding adapter": (lambda good, tmp: _edit(good, tmp / "edited", tensors=_embedding_lora), None,
                             "lora_embedding_A: not the A or B of a LoRA linear layer"),
    "a method without adapters": (lambda good, tmp: good, None, "method=full has no adapter layers to load it into"),
}


@pytest.mark.bad_input("a PEFT adapter lorafa cannot load")
@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_an_adapter_lorafa_cannot_load_is_refused_in_one_line_with_no_row(cfg_factory, roberta_adapter, case,
                                                                          tmp_path):
    from lorafa import results
    from lorafa.checks import BadInput
    from lorafa.job import run

    base_dir, good = roberta_adapter
    make, model, says = ADAPTER_CASES[case]
    adapter_dir = make(good, tmp_path)
    model = model or ("model=tiny-roberta", "model.init=pretrained", f"model.path={base_dir}")
    method = ("method=full",) if case == "a method without adapters" else ()
    cfg = cfg_factory(*SMALL, *model, *method, f"model.adapter={adapter_dir}")
    with pytest.raises(BadInput) as err:
        run(cfg)
    message = str(err.value)
    assert says.replace("{}", str(adapter_dir)) in message and "\n" not in message, message
    assert message.startswith(f"model.adapter={adapter_dir}: "), message
    assert not list(cfg_factory.root.rglob(results.ROW_FILE))  # no row, no partial file
