"""Unit tests of task data loading, label handling, posing for each family, and metrics."""

from itertools import pairwise

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from lorafa import tasks
from lorafa.checks import BadInput
from lorafa.models import load_tokenizer

from .conftest import compose_cfg


# -------------------------------------------------------------------------------------------------- metrics
def test_metrics_match_their_definitions():
    y = [1, 1, 0, 0, 1, 0]
    p = [1, 0, 0, 1, 1, 0]
    m = tasks.compute_metrics(["accuracy", "f1", "matthews_corr"], y, p)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 / 3)  # tp=2, fp=1, fn=1
    assert m["matthews_corr"] == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))
    r = tasks.compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 10.0])
    assert r["spearman"] == pytest.approx(1.0) and 0.8 < r["pearson"] < 0.95
    assert np.isnan(tasks.compute_metrics(["pearson"], [1.0, 2.0], [3.0, 3.0])["pearson"])
    with pytest.raises(ValueError, match="unknown metrics"):
        tasks.compute_metrics(["rouge"], y, p)


# ---------------------------------------------------------------------------------------------------- data
def test_shipped_default_dataset_is_real_and_balanced():
    data = tasks.load_data(compose_cfg().task)
    assert data.labels == ["negative", "positive"] and data.kind == "classification"
    assert len(data.splits["train"]) == 8568 and len(data.splits["validation"]) == 1000
    share = data.splits["train"]["label"].mean()
    assert 0.45 < share < 0.55
    first = data.splits["train"]["label"].iloc[:200].mean()  # shipped shuffled: a prefix is not one class
    assert 0.3 < first < 0.7


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_text_cls_reads_any_local_format_and_its_label_set(tmp_path, suffix):
    frame = pd.DataFrame({"text": ["good", "bad", "meh", "fine"], "label": ["pos", "neg", "neu", "pos"]})
    paths = {}
    for split in ("train", "validation"):
        path = tmp_path / f"{split}{suffix}"
        {".csv": lambda p: frame.to_csv(p, index=False),
         ".tsv": lambda p: frame.to_csv(p, sep="\t", index=False),
         ".jsonl": lambda p: frame.to_json(p, orient="records", lines=True),
         ".json": lambda p: frame.to_json(p, orient="records"),
         ".parquet": lambda p: frame.to_parquet(p)}[suffix](path)
        paths[split] = path
    cfg = compose_cfg(["task=text_cls", f"task.data_files.train={paths['train']}",
                       f"task.data_files.validation={paths['validation']}"])
    data = tasks.load_data(cfg.task)
    assert data.labels == ["neg", "neu", "pos"]  # read from the data, sorted
    assert data.splits["train"]["label"].tolist() == [2, 0, 1, 2]
    assert "text_pair" not in data.splits["train"]


def test_integer_labels_and_labels_outside_the_set(tmp_path):
    pd.DataFrame({"text": ["a", "b"], "text_pair": ["c", "d"], "label": [0, 3]}).to_csv(tmp_path / "t.csv")
    pd.DataFrame({"text": ["a"], "text_pair": ["c"], "label": [7]}).to_csv(tmp_path / "v.csv")
    cfg = compose_cfg(["task=text_cls", f"task.data_files.train={tmp_path / 't.csv'}",
                       f"task.data_files.validation={tmp_path / 'v.csv'}"])
    with pytest.raises(ValueError, match=r"labels \['7'\] are not in the task's label set \['0', '3'\]"):
        tasks.load_data(cfg.task)


def test_glue_from_local_files_uses_the_hub_column_names_and_mnli_splits(tmp_path):
    frame = pd.DataFrame({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [0, 2], "idx": [0, 1]})
    overrides = ["task=glue_mnli"]
    for split in ("train", "validation_matched", "validation_mismatched"):
        frame.to_parquet(tmp_path / f"{split}.parquet")
        overrides.append(f"task.data_files.{split}={tmp_path / split}.parquet")
    data = tasks.load_data(compose_cfg(overrides).task)
    assert set(data.splits) == {"train", "m", "mm"}
    assert data.splits["m"][["text", "text_pair", "label"]].values.tolist() == [["p1", "h1", 0], ["p2", "h2", 2]]


@pytest.mark.bad_input("a data file missing, unreadable, empty or without the task's columns")
def test_missing_file_and_missing_column_are_named(tmp_path):
    cfg = compose_cfg(["task=text_cls", f"task.data_files.train={tmp_path / 'nope.csv'}",
                       f"task.data_files.validation={tmp_path / 'nope.csv'}"])
    with pytest.raises(BadInput, match=r"task.data_files.train=.*nope.csv: no such file"):
        tasks.load_data(cfg.task)
    pd.DataFrame({"sentence": ["x"], "label": [1]}).to_csv(tmp_path / "x.csv", index=False)
    cfg = compose_cfg(["task=text_cls", f"task.data_files.train={tmp_path / 'x.csv'}",
                       f"task.data_files.validation={tmp_path / 'x.csv'}"])
    with pytest.raises(ValueError, match=r"no column 'text'.*\['sentence', 'label'\]"):
        tasks.load_data(cfg.task)


# --------------------------------------------------------------------------------------------------- posing
def test_collate_pads_inputs_and_labels():
    feats = [{"input_ids": [5, 6, 7], "labels": [7, 8]}, {"input_ids": [5], "labels": [9]}]
    b = tasks.collate(feats, pad_id=1, pad_to=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["labels"].tolist() == [[7, 8], [9, -100]]
    aligned = tasks.collate(feats, pad_id=1, aligned_labels=True)
    assert aligned["labels"].shape == aligned["input_ids"].shape
    assert tasks.collate([{"input_ids": [1], "labels": 1.5}], 0)["labels"].dtype == torch.float32


def _poser(model: str, task="movie_polarity", extra=()):
    cfg = compose_cfg([f"model={model}", f"task={task}", *extra])
    data = tasks.TaskData("t", "classification", {}, ["negative", "positive"]) if task == "movie_polarity" else \
        tasks.TaskData("t", "regression", {}, None)
    family = {"tiny-roberta": "encoder", "tiny-t5": "encoder-decoder", "tiny-llama": "decoder"}[model]
    return tasks.poser_for(family, data, cfg.task, load_tokenizer(cfg.model)), cfg


def test_encoder_encodes_pairs_with_the_tokenizers_framing():
    poser, _ = _poser("tiny-roberta")
    (f,) = poser.encode(pd.DataFrame({"text": ["good"], "text_pair": ["film"], "label": [1]}))
    toks = poser.tok.convert_ids_to_tokens(f["input_ids"])
    assert toks[0] == "<s>" and toks.count("</s>") == 3 and f["labels"] == 1


def test_t5_gets_the_prompt_and_the_label_word():
    poser, _ = _poser("tiny-t5")
    (f,) = poser.encode(pd.DataFrame({"text": ["a fine film"], "label": [1]}))
    assert poser.tok.decode(f["input_ids"], skip_special_tokens=True) == "sentiment: a fine film"
    assert poser.tok.decode(f["labels"], skip_special_tokens=True) == "positive"
    assert len(poser.candidates) == 2


def test_decoder_masks_the_prompt_and_keeps_the_answer_cue_when_truncating():
    poser, _ = _poser("tiny-llama", extra=["task.max_seq_len=12"])
    long = " ".join(["word"] * 50)
    (f,) = poser.encode(pd.DataFrame({"text": [long], "label": [0]}))
    assert len(f["input_ids"]) <= 12 and len(f["input_ids"]) == len(f["labels"])
    answer = [t for t in f["labels"] if t != -100]
    assert poser.tok.decode(answer, skip_special_tokens=True).strip() == "negative"
    assert poser.tok.decode(f["input_ids"][: f["prompt_len"]]).endswith("Answer:")


class _FakeLM(torch.nn.Module):
    """Logits that always prefer one token: label scoring must pick the label made of it."""

    def __init__(self, favourite: int, vocab: int):
        super().__init__()
        self.favourite, self.vocab = favourite, vocab

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = 5.0
        return type("Out", (), {"logits": logits})


@pytest.mark.parametrize("label", [0, 1])
def test_decoder_label_scoring_picks_the_likeliest_label(label):
    poser, _ = _poser("tiny-llama")
    favourite = poser.candidates[label][0]
    feats = poser.encode(pd.DataFrame({"text": ["x y", "z"], "label": [0, 1]}))
    batch = tasks.collate(feats, poser.tok.pad_token_id, aligned_labels=True)
    preds = poser.predict(_FakeLM(favourite, len(poser.tok)), batch)
    assert preds.tolist() == [label, label]


def test_regression_answers_on_the_t5_grid():
    poser, _ = _poser("tiny-t5", task="glue_stsb")
    words = poser.label_words()
    assert words[0] == "0.0" and words[-1] == "5.0" and len(words) == 26
    assert poser.verbalise(3.13) == "3.2" and poser.verbalise(0.09) == "0.0"
    assert poser.from_choice(torch.tensor([16])).tolist() == [pytest.approx(3.2)]


def test_every_task_config_composes_with_consistent_metrics():
    from .conftest import CONF

    for path in sorted((CONF / "task").glob("*.yaml")):
        cfg = compose_cfg([f"task={path.stem}"])
        t = cfg.task
        assert t.name == path.stem, path
        metrics = list(t.metrics)
        splits = list(t.eval_splits)
        names = metrics if len(splits) == 1 else [f"{m}_{s}" for s in splits for m in metrics]
        if t.kind == "instruction":  # scored by lm-eval after training, not per eval split
            assert t.main_metric == "mmlu_acc" and not splits, path
            continue
        assert t.main_metric in names + ["loss"], path
        if t.kind == "classification" and t.get("labels"):
            assert len(set(t.labels)) == len(t.labels)
        assert OmegaConf.select(cfg, "train.lr") is not None


def test_hub_dataset_path_maps_columns(monkeypatch):
    """The hub branch (datasets.load_dataset) with the network faked: columns and splits as for local files."""
    import datasets

    from lorafa import sources

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1, 0],
                                           "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(sources, "hub_reachable", lambda: True)
    data = tasks.load_data(compose_cfg(["task=glue_mrpc"]).task)
    assert calls == [("nyu-mll/glue", "mrpc", "train"), ("nyu-mll/glue", "mrpc", "validation")]
    assert data.splits["validation"].to_dict("list") == {"text": ["a", "b"], "text_pair": ["c", "d"], "label": [1, 0]}
    assert data.labels == ["not_equivalent", "equivalent"]


def test_translation_data_both_layouts_and_bleu():
    """WMT's `translation` records and flat en/ro columns both load; BLEU/chrF are sacrebleu's corpus scores."""
    import sacrebleu

    data = tasks.load_data(compose_cfg(["task=wmt16_en_ro_sample"]).task)
    assert data.kind == "translation" and set(data.splits) == {"train", "validation"}
    assert len(data.splits["train"]) == 16 and len(data.splits["validation"]) == 8  # records / flat columns
    assert data.splits["train"].loc[0, "label"] == "Comitetul se va reuni din nou săptămâna viitoare."
    refs = data.splits["validation"]["label"].tolist()
    hyps = [r.replace("a", "o") for r in refs]
    got = tasks.compute_metrics(["bleu", "chrf"], np.asarray(refs), np.asarray(hyps))
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert tasks.compute_metrics(["bleu"], np.asarray(refs), np.asarray(refs))["bleu"] == pytest.approx(100.0)


def test_t5_translation_teacher_forces_the_reference_and_generates_text():
    cfg = compose_cfg(["model=tiny-t5", "task=wmt16_en_ro_sample", "task.target_len=8"])
    data = tasks.load_data(cfg.task)
    poser = tasks.poser_for("encoder-decoder", data, cfg.task, load_tokenizer(cfg.model))
    feats = poser.encode(data.splits["validation"])
    assert poser.tok.decode(feats[0]["input_ids"], skip_special_tokens=True).startswith(
        "translate English to Romanian: ")
    assert max(len(f["labels"]) for f in feats) == 8  # references cut at target_len
    from lorafa import models

    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    batch = tasks.collate(feats[:3], pad_id=poser.tok.pad_token_id)
    out = poser.predict(net.model.eval(), batch)
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(t, str) for t in out)
    with pytest.raises(ValueError, match="encoder-decoder models"):
        tasks.poser_for("decoder", data, cfg.task, load_tokenizer(compose_cfg(["model=tiny-llama"]).model))


def test_instruction_data_in_the_alpaca_template_with_the_loss_on_the_response_only():
    cfg = compose_cfg(["model=tiny-llama", "task=alpaca_mmlu_sample"])
    data = tasks.load_data(cfg.task)
    assert data.kind == "instruction" and len(data.splits["train"]) == 16
    with_input = data.splits["train"][1]  # "Translate the sentence into French." with an input
    assert with_input["prompt"] == tasks.ALPACA_PROMPT.format(instruction="Translate the sentence into French.",
                                                              input="The cat sleeps on the sofa.")
    assert data.splits["train"][0]["prompt"].startswith("Below is an instruction that describes a task. Write")
    assert data.splits["train"][0]["prompt"].endswith("### Response:\n")
    tok = load_tokenizer(cfg.model)
    poser = tasks.poser_for("decoder", data, cfg.task, tok)
    feats = poser.encode(data.splits["train"])
    for f, r in zip(feats, data.splits["train"]):  # a datasets.Dataset: rows as dicts
        n_prompt = len(tok(r["prompt"])["input_ids"])
        assert f["labels"][:n_prompt] == [-100] * n_prompt  # no loss on the prompt
        assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:] and f["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(f["input_ids"][n_prompt:-1]) == r["response"]
    short = tasks.poser_for("decoder", data, OmegaConf.merge(cfg.task, {"max_seq_len": 80}), tok).encode(
        data.splits["train"])
    assert max(len(f["input_ids"]) for f in short) == 80 and all(len(f["labels"]) == len(f["input_ids"]) for f in short)
    with pytest.raises(ValueError, match="decoder models"):
        tasks.poser_for("encoder", data, cfg.task, tok)


def test_flan_format_and_missing_fields(tmp_path):
    cfg = compose_cfg(["task=alpaca_mmlu_sample", "task.format=flan",
                       f"task.data_files.train={tasks.sources.asset('alpaca_sample/flan.jsonl')}"])
    frame = tasks.load_data(cfg.task).splits["train"]
    assert frame[3]["prompt"] == tasks.ALPACA_PROMPT_NO_INPUT.format(instruction="Question: Name the capital of "
                                                                                     "Italy.")
    assert frame[3]["response"] == "Rome."
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"no column \['inputs', 'targets'\]"):
        tasks.load_data(compose_cfg(["task=alpaca_mmlu_sample", "task.format=flan", f"task.data_files.train={bad}"]).task)
    with pytest.raises(ValueError, match="task.format='chat'"):
        tasks.load_data(compose_cfg(["task=alpaca_mmlu_sample", "task.format=chat"]).task)


def test_packing_keeps_whole_examples_each_with_its_own_positions():
    """`task.packing`: whole examples share windows of at most max_seq_len tokens, none split, none lost; each
    carries positions from 0 and -100 on its first label (transformers' padding-free format). That attention stays
    within an example is tests/test_packing.py's."""
    cfg = compose_cfg(["model=tiny-llama", "task=alpaca_mmlu_sample", "task.packing=true"])
    data = tasks.load_data(cfg.task)
    tok = load_tokenizer(cfg.model)
    plain = tasks.poser_for("decoder", data, OmegaConf.merge(cfg.task, {"packing": False}), tok).encode(
        data.splits["train"])
    packed = tasks.poser_for("decoder", data, cfg.task, tok).encode(data.splits["train"])
    assert len(packed) < len(plain) and all(0 < len(f["input_ids"]) <= 256 for f in packed)
    found = []
    for f in packed:
        assert len(f["labels"]) == len(f["position_ids"]) == len(f["input_ids"])
        starts = [i for i, p in enumerate(f["position_ids"]) if p == 0] + [len(f["input_ids"])]
        assert starts[0] == 0
        for a, b in pairwise(starts):
            assert f["position_ids"][a:b] == list(range(b - a))
            example = next(e for e in plain if e["input_ids"] == f["input_ids"][a:b])
            assert f["labels"][a:b] == [-100] + example["labels"][1:]
            found.append(plain.index(example))
    assert sorted(found) == list(range(len(plain)))  # every example once, whole (the sample's are all distinct)
    assert sum(len(f["input_ids"]) for f in packed) == sum(len(f["input_ids"]) for f in plain)
    assert tasks.pack([{"input_ids": [0, 5, 2], "labels": [-100, 5, 2]}] * 3, 7) == [
        {"input_ids": [0, 5, 2, 0, 5, 2], "labels": [-100, 5, 2, -100, 5, 2], "position_ids": [0, 1, 2, 0, 1, 2]},
        {"input_ids": [0, 5, 2], "labels": [-100, 5, 2], "position_ids": [0, 1, 2]}]
    with pytest.raises(ValueError, match="does not fit"):
        tasks.pack([{"input_ids": [0] * 8, "labels": [-100] * 8}], 7)
